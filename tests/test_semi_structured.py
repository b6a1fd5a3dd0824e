"""semi_structured: N:M masks along the input dimension, against a direct implementation and
hand-written torch code; shapes refused at plan time; the 2:4 GPU format when CUDA is there."""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from prunerecipe import RecipeError, apply_recipe, finalize, load_recipe, parse_recipe, plan_recipe
from prunerecipe.methods import SemiStructured

from .conftest import assert_same_pruning, pruning_history


def direct_n_of_m(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest |w| of every m consecutive entries of each row (rows: all but the last dim)."""
    groups = w.abs().reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    return keep.reshape(w.shape)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (1, 2)])
def test_mask_keeps_the_largest_n_of_every_m_along_the_input_dimension(n, m):
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    mask = SemiStructured(n=n, m=m).compute_mask(w, torch.ones_like(w))
    assert torch.equal(mask.bool(), direct_n_of_m(w, n, m))
    assert mask.dtype == w.dtype


def test_conv_weights_group_along_in_channels():
    torch.manual_seed(0)
    w = torch.randn(6, 8, 3, 3)
    mask = SemiStructured(n=2, m=4).compute_mask(w, torch.ones_like(w))
    assert torch.equal(mask.bool(), direct_n_of_m(w.movedim(1, -1), 2, 4).movedim(-1, 1))


def test_ties_go_to_the_earliest_entry_and_pruned_entries_count_as_pruned():
    w = torch.ones(1, 8)
    assert SemiStructured().compute_mask(w, torch.ones_like(w)).tolist() == [[0, 0, 1, 1, 0, 0, 1, 1]]
    before = torch.tensor([[1.0, 0, 1, 1, 0, 0, 0, 1]])
    w = torch.tensor([[5.0, 9, 1, 2, 7, 8, 6, 3]])
    # group 1 had one pruned entry: one more goes (the smallest left); group 2 had three: they stay pruned
    assert SemiStructured().compute_mask(w, before).tolist() == [[1, 0, 0, 1, 0, 0, 0, 1]]


def test_a_recipe_equals_hand_written_torch_code_and_chains(write_recipe):
    torch.manual_seed(3)
    ours = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    theirs = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    theirs.load_state_dict(ours.state_dict())
    path = write_recipe("""
        version: 1
        steps:
          - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.25}
          - {select: {types: [Linear]}, method: semi_structured, args: {n: 2, m: 4}}
        """)
    apply_recipe(ours, load_recipe(path))
    for layer in (theirs[0], theirs[2]):
        prune.l1_unstructured(layer, "weight", amount=0.25)
        SemiStructured.apply(layer, "weight", n=2, m=4, dim=1)
    assert_same_pruning(ours, theirs)
    assert pruning_history(ours[0], "weight") == [prune.L1Unstructured, SemiStructured]
    groups = ours[0].weight_mask.reshape(-1, 4)
    assert bool((groups.sum(1) <= 2).all())
    finalize(ours)
    assert int((ours[0].weight.reshape(-1, 4) != 0).sum(1).max()) <= 2


def test_gpt2_conv1d_groups_run_along_its_transposed_input_dimension():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    layer = model.transformer.h[0].mlp.c_fc  # weight (in=16, out=64)
    dense = layer.weight.detach().clone()
    apply_recipe(model, parse_recipe("version: 1\nsteps:\n  - {select: {names: [transformer.h.0.mlp.c_fc]}, method: semi_structured}\n"))
    assert torch.equal(layer.weight_mask.bool().t(), direct_n_of_m(dense.t(), 2, 4))


def test_a_dimension_that_is_not_a_multiple_of_m_is_a_plan_error_naming_the_tensor():
    model = nn.Sequential(nn.Linear(10, 4), nn.Linear(4, 2))
    recipe = parse_recipe("version: 1\nsteps:\n  - {select: {types: [Linear]}, method: semi_structured, args: {n: 2, m: 4}}\n", "nm.yaml")
    with pytest.raises(RecipeError) as info:
        plan_recipe(model, recipe)
    assert str(info.value) == ("nm.yaml:3:64: steps[0].args: 0.weight (shape 4x10) has 10 entries along its input dimension, not a multiple of m=4")


def test_the_plan_projects_the_pattern():
    plan = plan_recipe(
        nn.Sequential(nn.Linear(8, 4)), parse_recipe("version: 1\nsteps:\n  - {select: {}, method: semi_structured, args: {n: 1, m: 4}}\n")
    )
    (pt,) = plan.steps[0].targets
    assert pt.to_prune == 24 and pt.sparsity_after == 0.75 and "1:4" in str(plan)


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (
            "args: {n: 4, m: 4}",
            "steps[0].args: method 'semi_structured' rejected its arguments: ValueError: an N:M pattern needs 1 <= n < m, got n=4, m=4",
        ),
        ("args: {n: 2, m: 4}, sparsity: 0.5", "steps[0].sparsity: method 'semi_structured' takes no amount; remove 'sparsity'"),
        ("args: {n: 0}", "steps[0].args.n: 0 is less than the minimum of 1"),
        ("scope: global", "steps[0].scope: scope 'global' needs an unstructured method; 'semi_structured' is a whole-tensor method"),
    ],
)
def test_bad_arguments_are_load_errors(step, message):
    with pytest.raises(RecipeError) as info:
        parse_recipe(f"version: 1\nsteps:\n  - {{select: {{}}, method: semi_structured, {step}}}\n", "r.yaml")
    assert message in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="to_sparse_semi_structured needs a CUDA GPU")
def test_a_pruned_fp16_linear_runs_as_semi_structured_sparse_with_the_same_outputs():
    torch.manual_seed(0)
    layer = nn.Linear(128, 128).half().cuda().eval()
    apply_recipe(layer, parse_recipe("version: 1\nsteps:\n  - {select: {}, method: semi_structured, args: {n: 2, m: 4}}\n"))
    finalize(layer)
    x = torch.randn(64, 128, dtype=torch.half, device="cuda")
    with torch.no_grad():
        dense_out = layer(x)
        layer.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(layer.weight))
        sparse_out = layer(x)
    assert torch.allclose(sparse_out, dense_out, rtol=1e-3, atol=1e-3)


def test_conv_masks_are_contiguous_and_reload_to_the_same_outputs():
    """A permuted mask would spread its layout to the weight: the same values, other rounding in a conv."""
    from prunerecipe import load_pruned_state_dict
    from prunerecipe.zoo import ResNet

    torch.manual_seed(0)
    model = ResNet(width=8).eval()
    apply_recipe(
        model, parse_recipe("version: 1\nsteps:\n  - {select: {types: [Conv2d], names: ['layer2.*']}, method: semi_structured, args: {n: 2, m: 4}}\n")
    )
    masks = {n: b for n, b in model.named_buffers() if n.endswith("_mask")}
    assert masks and all(m.is_contiguous() for m in masks.values())
    fresh = ResNet(width=8).eval()
    load_pruned_state_dict(fresh, model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


class StackedExperts(nn.Module):
    """A MoE layer as transformers 5 stores it: one (experts, out, in) tensor, used as F.linear(x, W[e])."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(nn.functional.linear(x, self.gate_up_proj[e]) for e in range(3))


def test_a_stacked_parameter_of_an_unknown_module_needs_its_input_dimension_named():
    """Its input dimension is 2 here, not the dim 1 of a Linear: guessing would group the
    output dimension silently, so the step asks for ``dim``; given, the groups run along it."""
    model = nn.Sequential(StackedExperts())
    step = "  - {select: {types: [StackedExperts]}, params: [gate_up_proj], method: semi_structured, args: {n: 2, m: 4%s}}\n"
    with pytest.raises(RecipeError, match=r"0\.gate_up_proj is a 3-D parameter .* of StackedExperts.*give it with args: \{dim: \.\.\.\}"):
        plan_recipe(model, parse_recipe("version: 1\nsteps:\n" + step % ""))
    apply_recipe(model, parse_recipe("version: 1\nsteps:\n" + step % ", dim: 2"))
    w, mask = model[0].gate_up_proj_orig, model[0].gate_up_proj_mask
    assert torch.equal(mask.bool(), direct_n_of_m(w, 2, 4))  # groups of 4 along the last (input) dimension
