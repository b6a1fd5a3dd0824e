"""Every recipe in recipes/ validates and applies to the model it names."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune as prune

from prunerecipe import Pruner, apply_recipe, load_recipe, plan_recipe
from prunerecipe.calibrate import call_calibration, load_calibration
from prunerecipe.methods import method_names
from prunerecipe.modelspec import load_model
from prunerecipe.spec import Calibration

from .conftest import ROOT

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_there_are_example_recipes():
    assert {p.name for p in RECIPES} >= {
        "lenet-seed-conv1.yaml",
        "lenet-layerwise-l1.yaml",
        "lenet-global-l1.yaml",
        "nm-2-4-magnitude.yaml",
        "wanda-50.yaml",
        "sparsegpt-50.yaml",
        "sparsegpt-2-4.yaml",
    }


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
    calibration = None
    if plan.needs_calibration:  # the documented calibration function, fewer samples to stay fast
        recipe = dataclasses.replace(recipe, calibration=Calibration(samples=16, batch_size=8))
        plan = plan_recipe(model, recipe)
        fn = load_calibration(f"{ROOT / 'examples' / 'calibration.py'}:stdlib_text")
        calibration = call_calibration(fn, model=model, samples=16)
    report = apply_recipe(model, recipe, plan=plan, calibration=calibration)
    assert report.global_after > report.global_before or any(s.schedule for s in recipe.steps)
    if any(ps.method.name == "sparsegpt" for ps in plan.steps):
        assert report.steps[0].rewritten
    if getattr(model, "forward", None) is not None and recipe.model == "prunerecipe.zoo:LeNet":
        assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
