"""Every recipe in recipes/ validates and applies to the model it names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune as prune

from prunerecipe import Pruner, apply_recipe, load_recipe, plan_recipe
from prunerecipe.methods import method_names
from prunerecipe.modelspec import load_model

from .conftest import ROOT

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_there_are_example_recipes():
    assert {p.name for p in RECIPES} >= {"lenet-seed-conv1.yaml", "lenet-layerwise-l1.yaml", "lenet-global-l1.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates_plans_and_applies(path: Path):
    text = path.read_text()
    assert text.startswith("#"), "each example recipe is documented in a comment header"
    recipe = load_recipe(path)
    missing = {s.method for s in recipe.steps} - set(method_names())
    if missing:
        pytest.skip(f"needs plugin methods {missing} (installed by .ci/run)")
    assert recipe.model, "example recipes name their model"
    model = load_model(recipe.model)
    plan = plan_recipe(model, recipe)
    assert plan.targets
    if all(s.schedule is not None for s in recipe.steps):  # a training-time recipe: run its events
        pruner = Pruner(model, recipe)
        last = max(e.time for e in pruner.events)
        pruner.step(epoch=last, step=last)
        assert not pruner.pending()
        assert any(prune.is_pruned(m) for m in model.modules())
        return
    report = apply_recipe(model, recipe)
    assert report.global_after > report.global_before or any(s.schedule for s in recipe.steps)
    if getattr(model, "forward", None) is not None and recipe.model == "prunerecipe.zoo:LeNet":
        assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
