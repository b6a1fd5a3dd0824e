"""SparseGPT against a plain dense implementation of the algorithm (Frantar & Alistarh 2023):
the full inverse Hessian of the columns not yet fixed, recomputed at every column, and the
OBS update applied to all of them. Same masks, weights within 1e-4 relative."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunerecipe import CalibrationError, apply_recipe, parse_recipe
from prunerecipe.calibrate import sparsegpt
from prunerecipe.methods import SparseGPT
from prunerecipe.methods.ranking import split_count


def dense_sparsegpt(W, H, *, sparsity=None, n_m=None, block_size=128, damp=0.01):
    """SparseGPT column by column with full inverses, no Cholesky factor, no lazy batching.

    The mask of a block of columns is chosen at its start, by ``w**2 / [H_F^-1]_jj`` where
    ``H_F`` is the Hessian of the columns from j on (OBS saliency once earlier columns are
    fixed); exactly the block's share of the count, earliest first on ties, as our contract
    says. N:M groups are chosen when the loop reaches them.
    """
    W = W.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diagonal(H).mean() * torch.eye(cols, dtype=H.dtype)
    d2 = torch.tensor([torch.linalg.inv(H[j:, j:])[0, 0] for j in range(cols)], dtype=H.dtype)
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    starts = list(range(0, cols, block_size))
    if sparsity is not None:
        shares = split_count(round(sparsity * rows * cols), [rows * (min(s + block_size, cols) - s) for s in starts])
    for b, i1 in enumerate(starts):
        i2 = min(i1 + block_size, cols)
        if sparsity is not None:
            scores = (W[:, i1:i2] ** 2 / d2[i1:i2]).flatten()
            order = torch.sort(scores, stable=True).indices[: shares[b]]
            block = torch.zeros(rows * (i2 - i1), dtype=torch.bool)
            block[order] = True
            pruned[:, i1:i2] = block.reshape(rows, i2 - i1)
        for j in range(i1, i2):
            if n_m is not None and (j - i1) % n_m[1] == 0:
                n, m = n_m
                scores = W[:, j : j + m] ** 2 / d2[j : j + m]
                order = torch.sort(scores, dim=1, stable=True).indices[:, : m - n]
                pruned[:, j : j + m].scatter_(1, order, True)
            Hinv = torch.linalg.inv(H[j:, j:])  # the full inverse of what is left
            q = torch.where(pruned[:, j], torch.zeros_like(W[:, j]), W[:, j])
            err = (W[:, j] - q) / Hinv[0, 0]
            W[:, j:] -= err.unsqueeze(1) * Hinv[0, :].unsqueeze(0)
            W[:, j] = q
    return W, ~pruned


def problem(rows=12, cols=32, tokens=200, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=dtype)
    X = torch.randn(tokens, cols, generator=g, dtype=dtype) * torch.linspace(0.2, 3.0, cols, dtype=dtype)
    return W, X.t() @ X / tokens


def close(a, b, rel=1e-4):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


@pytest.mark.parametrize(("block_size", "sparsity"), [(8, 0.5), (32, 0.5), (12, 0.3), (5, 0.7)])
def test_unstructured_equals_the_dense_algorithm(block_size, sparsity):
    W, H = problem()
    ref_w, ref_keep = dense_sparsegpt(W, H, sparsity=sparsity, block_size=block_size)
    ours_w, ours_keep = sparsegpt(W, H, torch.ones_like(W, dtype=torch.bool), count=round(sparsity * W.numel()), block_size=block_size)
    assert torch.equal(ours_keep, ref_keep)
    assert int((~ours_keep).sum()) == round(sparsity * W.numel())  # the exact count, not one more per block
    assert close(ours_w, ref_w)
    assert bool((ours_w[~ours_keep] == 0).all())


@pytest.mark.parametrize(("n", "m", "block_size"), [(2, 4, 8), (2, 4, 32), (1, 4, 16), (3, 8, 16)])
def test_n_of_m_equals_the_dense_algorithm(n, m, block_size):
    W, H = problem(seed=1)
    ref_w, ref_keep = dense_sparsegpt(W, H, n_m=(n, m), block_size=block_size)
    ours_w, ours_keep = sparsegpt(W, H, torch.ones_like(W, dtype=torch.bool), n_m=(n, m), block_size=block_size)
    assert torch.equal(ours_keep, ref_keep)
    assert bool((ours_keep.reshape(W.shape[0], -1, m).sum(-1) == n).all())
    assert close(ours_w, ref_w)


def test_dead_inputs_are_zeroed_as_in_the_reference():
    W, H = problem(seed=2)
    H[3, :] = H[:, 3] = 0
    ref_w, ref_keep = dense_sparsegpt(W, H, sparsity=0.5, block_size=16)
    ours_w, ours_keep = sparsegpt(W, H, torch.ones_like(W, dtype=torch.bool), count=W.numel() // 2, block_size=16)
    assert torch.equal(ours_keep, ref_keep) and close(ours_w, ref_w)
    assert bool((ours_w[:, 3] == 0).all())


def test_a_hessian_that_is_not_positive_definite_is_refused():
    W = torch.randn(4, 4)
    H = -torch.eye(4)
    with pytest.raises(ValueError, match="not positive definite with damp=0; raise damp"):
        sparsegpt(W, H, torch.ones_like(W, dtype=torch.bool), count=8, damp=0.0)


class OneLinear(nn.Module):
    def __init__(self, cols=32, rows=12):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(cols, rows))

    def forward(self, x):
        return self.body(x)


RECIPE = """
version: 1
calibration: {samples: 40, batch_size: 8}
sequential: {blocks: "body"}
steps:
  - select: {names: [body.0]}
    method: sparsegpt
    %s
"""


@pytest.mark.parametrize("how", ["sparsity: 0.5\n    args: {block_size: 8}", "args: {n: 2, m: 4, block_size: 16}"])
def test_through_apply_recipe_equals_the_dense_algorithm_on_one_linear(how):
    torch.manual_seed(0)
    model = OneLinear()
    dense_weight = model.body[0].weight.detach().clone()
    data = torch.randn(40, 5, 32) * torch.linspace(0.2, 3.0, 32)
    recipe = parse_recipe(RECIPE % how)
    report = apply_recipe(model, recipe, calibration=data)
    X = data.reshape(-1, 32).double()
    args = {"sparsity": 0.5, "block_size": 8} if "sparsity" in how else {"n_m": (2, 4), "block_size": 16}
    ref_w, ref_keep = dense_sparsegpt(dense_weight, X.t() @ X / X.shape[0], **args)
    layer = model.body[0]
    assert torch.equal(layer.weight_mask.bool(), ref_keep)
    assert close(layer.weight, ref_w)
    assert report.steps[0].rewritten == ("body.0.weight",)
    assert type(layer._forward_pre_hooks[next(iter(layer._forward_pre_hooks))]) is SparseGPT
    # the masked entries keep their old values under the mask, as torch leaves them
    assert torch.equal(layer.weight_orig[~ref_keep], dense_weight[~ref_keep])
    assert torch.equal(layer.weight, layer.weight_orig * layer.weight_mask)


def test_on_a_pruned_weight_its_mask_is_kept_and_the_count_is_of_the_unpruned_entries():
    torch.manual_seed(0)
    model = OneLinear()
    recipe = parse_recipe(
        RECIPE.replace("  - select", "  - {select: {names: [body.0]}, method: l1_unstructured, amount: 0.25}\n  - select")
        % "amount: 0.5\n    args: {block_size: 8}"
    )
    apply_recipe(model, recipe, calibration=torch.randn(40, 32))
    layer = model.body[0]
    assert int((layer.weight_mask == 0).sum()) == 96 + 144  # 25% of 384, then half of the 288 left
    assert [type(m).__name__ for m in layer._forward_pre_hooks[next(iter(layer._forward_pre_hooks))]] == ["L1Unstructured", "SparseGPT"]


def test_the_method_alone_refuses_to_guess_without_calibration():
    with pytest.raises(RuntimeError, match="calibration inputs"):
        SparseGPT(amount=0.5).compute_mask(torch.ones(2, 2), torch.ones(2, 2))


def test_calibration_that_breaks_the_block_restores_the_model():
    torch.manual_seed(0)
    model = OneLinear()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        CalibrationError,
        match=r"calibration: calibration batch 0: RuntimeError: mat1 and mat2 shapes cannot be multiplied \(8x31 and 32x12\); the model was left unchanged",
    ):
        apply_recipe(model, parse_recipe(RECIPE % "sparsity: 0.5"), calibration=torch.randn(8, 31))
    assert list(model.state_dict()) == list(before) and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
