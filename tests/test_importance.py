"""Importances: the registry (built-ins, in-process, entry points), plan-time checks, and
steps ranking by scores exactly as torch's own ``importance_scores`` would."""

from __future__ import annotations

import dataclasses
import sys
import textwrap

import pytest
import torch
import torch.nn.utils.prune as prune
from click.testing import CliRunner
from torch import nn

from prunerecipe import RecipeError, apply_recipe, get_importance, importance_names, parse_recipe, plan_recipe, register_importance
from prunerecipe import methods as registry
from prunerecipe.cli import cli

from .conftest import assert_same_pruning, make_lenet


def squared(weight):
    return weight**2


def test_builtins_are_listed_and_described():
    assert importance_names()[:2] == ["magnitude", "wanda"]
    assert get_importance("wanda").calibrated and get_importance("wanda").per_row
    assert not get_importance("magnitude").calibrated


@pytest.mark.parametrize("scope", ["local", "global"])
def test_a_registered_importance_ranks_as_torchs_importance_scores(scope):
    register_importance("squared", squared)
    ours, theirs = make_lenet(), make_lenet()
    recipe = parse_recipe(
        f"version: 1\nsteps:\n  - {{select: {{types: [Linear]}}, method: l1_unstructured, importance: squared, amount: 0.3, scope: {scope}}}\n"
    )
    apply_recipe(ours, recipe)
    layers = [theirs.fc1, theirs.fc2, theirs.fc3]
    if scope == "global":
        scores = {(m, "weight"): m.weight.detach() ** 2 for m in layers}
        prune.global_unstructured([(m, "weight") for m in layers], prune.L1Unstructured, importance_scores=scores, amount=0.3)
    else:
        for m in layers:
            prune.l1_unstructured(m, "weight", amount=0.3, importance_scores=m.weight.detach() ** 2)
    assert_same_pruning(ours, theirs)


def test_ln_structured_ranks_channels_by_the_norm_of_their_scores():
    register_importance("squared", squared)
    ours, theirs = make_lenet(), make_lenet()
    apply_recipe(
        ours,
        parse_recipe(
            "version: 1\nsteps:\n  - {select: {names: [conv2]}, method: ln_structured, importance: squared, amount: 0.5, args: {n: 1, dim: 0}}\n"
        ),
    )
    prune.ln_structured(theirs.conv2, "weight", amount=0.5, n=1, dim=0, importance_scores=theirs.conv2.weight.detach() ** 2)
    assert_same_pruning(ours, theirs)


def test_a_method_plugin_declaring_it_receives_the_scores():
    seen = []

    class Spy(prune.BasePruningMethod):
        PRUNING_TYPE = "unstructured"
        USES_IMPORTANCE = True

        def compute_mask(self, t, default_mask):
            seen.append(t.clone())
            return default_mask

    registry.register_method("spy", Spy)
    register_importance("squared", squared)
    model = make_lenet()
    apply_recipe(model, parse_recipe("version: 1\nsteps:\n  - {select: {names: [fc3]}, method: spy, importance: squared}\n"))
    assert torch.equal(seen[0], model.fc3.weight_orig.detach() ** 2)


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (
            "method: random_unstructured, importance: wanda, amount: 0.5",
            "steps[0].importance: method 'random_unstructured' does not rank by importance; importance 'wanda' works with "
            "l1_unstructured, semi_structured, ln_structured, or a method class declaring USES_IMPORTANCE = True",
        ),
        ("method: sparsegpt, importance: wanda, amount: 0.5", "steps[0].importance: sparsegpt ranks entries by its own saliency"),
        (
            "method: l1_unstructured, importance: wanda, amount: 0.5, scope: global",
            "steps[0].scope: importance 'wanda' compares scores within each output row; scope 'global' ranks across tensors",
        ),
        (
            "method: l1_unstructured, importance: wanda, sparsity: 0.5, schedule: {start: 1, end: 3}",
            "steps[0].schedule: steps that need calibration data run once, in apply_recipe with calibration, not on a schedule",
        ),
        (
            "method: l1_unstructured, importance: wanda, amount: 0.5, select: {names: [conv1]}",
            "steps[0].select: conv1.weight: steps that need calibration data prune the weights of nn.Linear and Conv1D layers",
        ),
    ],
)
def test_plan_refuses_what_does_not_go_together(step, message):
    select = "" if "select" in step else "select: {types: [Linear]}, "
    recipe = parse_recipe(f"version: 1\nsteps:\n  - {{{select}{step}}}\n", "r.yaml")
    with pytest.raises(RecipeError) as info:
        plan_recipe(make_lenet(), recipe)
    assert message in str(info.value)
    assert info.value.problems[0].code in ("importance", "calibration")


def test_an_unknown_importance_is_an_error_at_load_and_at_plan_time():
    text = "version: 1\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, importance: wandaa, amount: 0.5}\n"
    message = "steps[0].importance: unknown importance 'wandaa' (did you mean 'wanda'?); available: magnitude, wanda"
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "r.yaml")
    assert str(info.value) == f"r.yaml:3:70: {message}"
    recipe = parse_recipe(text.replace("wandaa", "wanda"), "r.yaml")
    made_in_code = dataclasses.replace(recipe, steps=(dataclasses.replace(recipe.steps[0], importance="wandaa"),))
    with pytest.raises(RecipeError) as info:
        plan_recipe(make_lenet(), made_in_code)
    assert str(info.value) == f"r.yaml:3:70: {message}" and info.value.problems[0].code == "importance"


def test_register_refuses_taken_names_and_bad_functions():
    with pytest.raises(RecipeError, match="importance 'wanda' is already registered"):
        register_importance("wanda", squared)
    with pytest.raises(RecipeError, match=r"must take \(weight\) or \(weight, stats\)"):
        register_importance("bad", lambda weight, other: weight)


def test_scores_of_the_wrong_shape_are_an_apply_error_and_change_nothing():
    register_importance("flat", lambda weight: weight.reshape(-1))
    model = make_lenet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match=r"importance 'flat' returned \(840,\) for a weight of shape \(10, 84\); the model was left unchanged"):
        apply_recipe(
            model, parse_recipe("version: 1\nsteps:\n  - {select: {names: [fc3]}, method: l1_unstructured, importance: flat, amount: 0.5}\n")
        )
    assert model.state_dict().keys() == before.keys()


@pytest.fixture
def site(tmp_path, monkeypatch):
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    registry.refresh()
    sys.modules.pop("my_scores", None)


def write_plugin(site, code: str) -> None:
    (site / "my_scores.py").write_text(textwrap.dedent(code))
    info = site / "my_scores-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-scores\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text("[prunerecipe.importances]\nsquares = my_scores:squares\n")
    registry.refresh()


def test_an_entry_point_plugin_is_listed_without_importing_and_used_by_name(site):
    write_plugin(site, "import sys\nsys.modules[__name__].imported = True\ndef squares(weight):\n    return weight ** 2\nsquares.per_row = True\n")
    assert "squares" in importance_names() and "my_scores" not in sys.modules
    spec = get_importance("squares")
    assert spec.origin == "my-scores 1.2" and spec.per_row
    model = make_lenet()
    apply_recipe(
        model, parse_recipe("version: 1\nsteps:\n  - {select: {names: [fc3]}, method: l1_unstructured, importance: squares, sparsity: 0.5}\n")
    )
    assert (model.fc3.weight_mask == 0).sum(1).tolist() == [42] * 10  # compared within each row
    out = CliRunner().invoke(cli, ["importances"])
    assert out.exit_code == 0 and "squares" in out.output and "my-scores 1.2" in out.output


def test_a_broken_plugin_is_reported_with_its_distribution(site):
    write_plugin(site, "raise ImportError('no numpy here')\n")
    with pytest.raises(RecipeError) as info:
        parse_recipe("version: 1\nsteps:\n  - {select: {names: [fc3]}, method: l1_unstructured, importance: squares, amount: 0.5}\n", "r.yaml")
    assert (
        "steps[0].importance: importance 'squares' (entry point 'squares = my_scores:squares' from my-scores 1.2) failed to import: "
        "ImportError: no numpy here" in str(info.value)
    )
    model = nn.Linear(4, 4)
    apply_recipe(model, parse_recipe("version: 1\nsteps:\n  - {select: {}, method: l1_unstructured, amount: 0.5}\n"))  # others unaffected
