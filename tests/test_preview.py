"""plan never shows a guess as a fact: with real weights its figures are computed (and equal
what apply then does), on the meta device the figures that depend on the weights are unknown."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunerecipe import apply_recipe, parse_recipe, plan_recipe
from prunerecipe.preview import preview

from .conftest import make_lenet

CHAINS = [
    # a global step, then a local one: the second step's "before" depends on where the first cut fell
    """
version: 1
steps:
  - {select: {types: [Conv2d, Linear]}, method: l1_unstructured, amount: 0.5, scope: global}
  - {select: {types: [Linear]}, method: l1_unstructured, sparsity: 0.6}
  - {select: {names: [conv2]}, method: ln_structured, amount: 0.25, args: {n: 1, dim: 0}}
""",
    """
version: 1
seed: 3
steps:
  - {select: {names: [conv1]}, method: random_unstructured, amount: 0.3}
  - {select: {names: [conv1]}, method: ln_structured, amount: 0.5, args: {n: 2, dim: 0}}
  - {select: {types: [Linear]}, method: random_unstructured, sparsity: 0.4, scope: global}
  - {select: {names: [fc3]}, params: [bias], method: l1_unstructured, amount: 3}
""",
]


@pytest.mark.parametrize("text", CHAINS)
def test_computed_figures_equal_what_apply_does_and_change_nothing(text):
    model = make_lenet()
    recipe = parse_recipe(text)
    rng = torch.get_rng_state()
    state = copy.deepcopy(model.state_dict())
    exact = preview(model, plan_recipe(model, recipe))
    assert exact.computed and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and set(model.state_dict()) == set(state)
    report = apply_recipe(model, recipe)
    last = {pt.qualname: pt for ps in exact.steps for pt in ps.targets}
    for row in report.targets:
        pt = last[row.name]
        assert pt.exact_after and int(pt.entries_after) == int(
            (getattr(model.get_submodule(row.name.rsplit(".", 1)[0]), row.name.rsplit(".", 1)[1] + "_mask") == 0).sum()
        ), row.name
    before, after = exact.projected_sparsity()
    assert before == 0.0 and after is not None


def test_on_the_meta_device_figures_that_depend_on_weights_are_unknown():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    recipe = parse_recipe(
        "version: 1\nsteps:\n"
        "  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5, scope: global}\n"
        "  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n"
    )
    plan = plan_recipe(model, recipe)
    second = plan.steps[1].targets[0]
    assert not second.exact_before and second.known_before is None and second.known_after is None
    assert plan.projected_sparsity()[1] is None
    text = str(plan)
    assert "-> ? (projected)" in text and "depends on the weights" in text
    with pytest.raises(ValueError, match="meta"):
        preview(model, plan)
