"""Wanda (Sun et al. 2023) against a direct implementation of the paper's formula: scores
|W_ij| * ||X_j||_2 over the calibration tokens, compared within each output row, block after
block on the outputs of the blocks already pruned."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunerecipe import apply_recipe, parse_recipe
from prunerecipe.methods import InputStats, get_importance

transformers = pytest.importorskip("transformers")


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, width: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def direct_scores(weight, inputs):
    """The paper's metric for a Linear (weight: out x in), inputs: tokens x in."""
    return weight.abs() * inputs.double().norm(dim=0).to(weight.dtype)


def direct_row_mask(scores, sparsity):
    """Prune the int(in * sparsity) lowest scores of every output row (earliest first on ties)."""
    k = int(scores.shape[1] * sparsity)
    order = scores.sort(dim=1, stable=True).indices[:, :k]
    return torch.ones_like(scores, dtype=torch.bool).scatter_(1, order, False)


def direct_n_of_m(scores, n, m):
    groups = scores.reshape(scores.shape[0], -1, m)
    order = groups.sort(dim=2, stable=True).indices[:, :, : m - n]
    return torch.ones_like(groups, dtype=torch.bool).scatter_(2, order, False).reshape(scores.shape)


def test_scores_are_the_papers_formula():
    torch.manual_seed(0)
    weight, X = torch.randn(6, 10), torch.randn(50, 10)
    stats = InputStats(50, (X.double() ** 2).sum(0))
    assert torch.allclose(get_importance("wanda").fn(weight, stats), direct_scores(weight, X))


@pytest.mark.parametrize("pattern", ["sparsity: 0.5", "sparsity: 0.25", "n_m"])
def test_block_by_block_masks_equal_the_direct_implementation(pattern):
    torch.manual_seed(0)
    ours = Stack()
    reference = Stack()
    reference.load_state_dict(ours.state_dict())
    data = torch.randn(24, 5, 8)
    if pattern == "n_m":
        step = "method: semi_structured, importance: wanda, args: {n: 2, m: 4}"
    else:
        step = f"method: l1_unstructured, importance: wanda, {pattern}"
    recipe = parse_recipe(f"""
version: 1
calibration: {{samples: 24, batch_size: 6}}
sequential: {{blocks: "blocks.*"}}
steps:
  - {{select: {{names: ["blocks.*"], types: [Linear]}}, {step}}}
""")
    apply_recipe(ours, recipe, calibration=data)

    hidden = data
    for block, mine in zip(reference.blocks, ours.blocks):
        with torch.no_grad():
            up_in = hidden.reshape(-1, 8)
            down_in = torch.relu(block.up(hidden)).reshape(-1, 16)  # the dense block's inputs, as collected
        for layer, inputs, pruned in ((block.up, up_in, mine.up), (block.down, down_in, mine.down)):
            scores = direct_scores(layer.weight.detach(), inputs)
            keep = direct_n_of_m(scores, 2, 4) if pattern == "n_m" else direct_row_mask(scores, float(pattern.split()[-1]))
            assert torch.equal(pruned.weight_mask.bool(), keep)
            with torch.no_grad():
                layer.weight.mul_(keep)
        with torch.no_grad():
            hidden = block(hidden)  # the pruned block's outputs feed the next block
    assert not hasattr(ours.head, "weight_mask")


def test_gpt2_conv1d_scores_use_the_input_features_of_its_transposed_weight():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    layer = model.transformer.h[0].mlp.c_fc
    dense = layer.weight.detach().clone()  # (in=16, out=64)
    ids = torch.randint(0, 40, (8, 12))
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, 16)))
    with torch.no_grad():
        model(ids)
    handle.remove()
    recipe = parse_recipe("""
version: 1
calibration: {samples: 8, batch_size: 4}
steps:
  - {select: {types: [Conv1D], names: ["transformer.h.*"]}, method: l1_unstructured, importance: wanda, sparsity: 0.5}
""")
    report = apply_recipe(model, recipe, calibration=ids)
    keep = direct_row_mask(direct_scores(dense.t(), torch.cat(seen)), 0.5)
    assert torch.equal(layer.weight_mask.bool().t(), keep)
    assert report.steps[0].rewritten == ()  # Wanda masks, it does not rewrite
    assert torch.equal(layer.weight_orig, dense)


def test_rows_share_an_odd_count_as_evenly_as_they_can():
    torch.manual_seed(0)
    model = Stack(width=4, depth=1)
    recipe = parse_recipe("""
version: 1
sequential: {blocks: "blocks.*"}
steps:
  - {select: {names: [blocks.0.up]}, method: l1_unstructured, importance: wanda, amount: 7}
""")
    apply_recipe(model, recipe, calibration=torch.randn(10, 4))
    per_row = (model.blocks[0].up.weight_mask == 0).sum(1).tolist()
    assert sum(per_row) == 7 and max(per_row) - min(per_row) <= 1
