"""Edges of group steps and compaction found by trying them as users would."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from prunerecipe import apply_recipe, load_pruned_state_dict, parse_recipe, plan_recipe
from prunerecipe.errors import RecipeError

pytest.importorskip("torch_pruning")

from prunerecipe.structured import compact
from prunerecipe.zoo import ResNet

GROUP = "{select: {types: [Conv2d]%s}, method: ln_structured, amount: 0.5, args: {n: 2}, scope: group}"


class Chunked(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        p, q = self.a(x).chunk(2, dim=1)
        return self.b(p) + self.c(q)


def test_a_group_through_chunk_is_refused_at_plan_time():
    recipe = parse_recipe("version: 1\ninputs: [{shape: [1, 3, 8, 8]}]\nsteps:\n  - " + GROUP % "" + "\n")
    with pytest.raises(RecipeError, match="torch.split/chunk of these channels"):
        plan_recipe(Chunked(), recipe)


class Heads(nn.Module):
    """Self-written attention: no 'Attention' in the class name, but a head count."""

    def __init__(self, d=32, h=4):
        super().__init__()
        self.num_heads = h
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (m(x).view(b, t, self.num_heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        return self.o((torch.softmax(q @ k.transpose(-1, -2), -1) @ v).transpose(1, 2).reshape(b, t, d))


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"mix": Heads()}) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer["mix"](x)
        return x


def test_attention_found_by_its_head_count_is_refused_with_the_exclude_to_paste():
    recipe = parse_recipe(
        "version: 1\ninputs: [{shape: [2, 5, 32]}]\nsteps:\n"
        "  - {select: {types: [Linear]}, method: ln_structured, amount: 0.25, args: {n: 2}, scope: group}\n"
    )
    with pytest.raises(RecipeError, match=r"attention heads cannot be pruned by channel groups") as caught:
        plan_recipe(Blocks(), recipe)
    assert "exclude: {names: ['layers.*.mix.*']}" in str(caught.value)


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.net, self.head = ResNet(width=8), nn.Linear(1000, 3)

    def forward(self, x):
        return self.head(self.net(x))


def test_a_compacted_submodule_reloads_into_a_fresh_wrapper():
    torch.manual_seed(0)
    model = Wrapped().eval()
    apply_recipe(model, parse_recipe("version: 1\ninputs: [{shape: [1, 3, 64, 64]}]\nsteps:\n  - " + GROUP % ", names: ['net.layer*']" + "\n"))
    compact(model.net, torch.randn(1, 3, 64, 64))
    state = model.state_dict()
    assert "net.__prunerecipe_compaction__" in state
    fresh = Wrapped().eval()
    load_pruned_state_dict(fresh, state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x), atol=1e-5)
    assert sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in model.parameters())


def test_compacting_a_model_without_masks_says_nothing_was_masked():
    model = ResNet(width=8).eval()
    result = compact(model, torch.randn(1, 3, 64, 64))
    assert result.removed_channels == 0 and "no channel was masked" in str(result)
