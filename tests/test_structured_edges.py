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


# --- found in review: every output counts, records nest and carry prefixes, frozen stays frozen


def _group(select, shape, finalize="false", amount=0.5):
    return parse_recipe(
        f"version: 1\ninputs: [{{shape: {shape}}}]\nfinalize: {finalize}\nsteps:\n"
        f"  - {{select: {select}, method: ln_structured, amount: {amount}, scope: group, args: {{n: 2}}}}\n"
    )


class TwoOutputs(nn.Module):
    def __init__(self, aux_layer=False):
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 16), nn.Linear(16, 3)
        self.aux = nn.Linear(16, 2) if aux_layer else None

    def forward(self, x):
        h = torch.relu(self.l1(x))
        return (self.l2(h), h) if self.aux is None else {"main": self.l2(h), "aux": self.aux(h)}


def test_channels_that_reach_any_output_are_not_removed():
    # the features the model also returns would change shape: the group is skipped, not compacted
    with pytest.raises(RecipeError, match="l1: its channels reach the model's output"):
        plan_recipe(TwoOutputs(), _group("{names: [l1]}", "[4, 6]"))


def test_every_output_is_compared_after_compaction():
    import copy

    torch.manual_seed(0)
    model = TwoOutputs(aux_layer=True).eval()
    masked = copy.deepcopy(model)
    apply_recipe(masked, _group("{names: [l1]}", "[4, 6]"))
    report = apply_recipe(model, _group("{names: [l1]}", "[4, 6]", "compact"))
    assert model.l1.out_features == 8 and model.aux.in_features == 8  # the aux head reads the group too
    assert report.compaction is not None
    x = torch.randn(5, 6)
    with torch.no_grad():
        a, b = masked(x), model(x)
    for key in ("main", "aux"):
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_an_output_the_compaction_would_change_is_refused_and_named():
    class Shifted(nn.Module):  # the second output reads the channels through a sigmoid: not removable exactly
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.l3 = nn.Linear(6, 16), nn.Linear(16, 3), nn.Linear(16, 2)

        def forward(self, x):
            h = self.l1(x)
            return self.l2(torch.relu(h)), self.l3(torch.sigmoid(h))

    torch.manual_seed(0)
    model = Shifted().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match="output 2 of 2 differs from the masked model's"):
        apply_recipe(model, _group("{names: [l1]}", "[4, 6]", "compact"))
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_empty_example_inputs_are_refused():
    model = nn.Sequential(nn.Linear(6, 8), nn.Sigmoid(), nn.Linear(8, 2)).eval()
    torch.nn.utils.prune.ln_structured(model[0], "weight", amount=0.5, n=2, dim=0)
    torch.nn.utils.prune.custom_from_mask(model[0], "bias", model[0].weight_mask[:, 0])
    with pytest.raises(RecipeError, match="outputs on the example inputs are empty"):
        compact(model, torch.empty(0, 6))
    assert hasattr(model[0], "weight_orig")  # nothing changed


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 32), nn.Linear(32, 6)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.net, self.head = Inner(), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.net(x))


def test_compacting_a_submodule_then_the_whole_model_reloads_into_a_fresh_one():
    torch.manual_seed(0)
    model = Outer().eval()
    x = torch.randn(4, 6)
    apply_recipe(model.net, _group("{names: [a]}", "[4, 6]", "compact"))
    assert model.net.a.out_features == 16
    apply_recipe(model, _group("{names: [net.a]}", "[4, 6]", "compact"))
    assert model.net.a.out_features == 8
    state = model.state_dict()
    assert [k for k in state if k.endswith("__prunerecipe_compaction__")] == ["__prunerecipe_compaction__"]
    fresh = Outer().eval()
    load_pruned_state_dict(fresh, state)
    assert fresh.net.a.out_features == 8
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("prefix", ["module.", "model.", "net."])
@pytest.mark.parametrize("explicit", [False, True])
def test_compacted_checkpoints_with_a_key_prefix_load(prefix, explicit):
    torch.manual_seed(0)
    model = Inner().eval()
    apply_recipe(model, _group("{names: [a]}", "[4, 6]", "compact"))
    state = {prefix + k: v for k, v in model.state_dict().items()}
    fresh = Inner().eval()
    load_pruned_state_dict(fresh, state, strip_prefix=prefix if explicit else None)
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_a_wrapper_compacted_as_a_whole_loads_into_the_bare_network():
    class Wrapper(nn.Module):  # as a LightningModule holds its network
        def __init__(self):
            super().__init__()
            self.model = Inner()

        def forward(self, x):
            return self.model(x)

    torch.manual_seed(0)
    wrapper = Wrapper().eval()
    apply_recipe(wrapper, _group("{names: [model.a]}", "[4, 6]", "compact"))
    bare = Inner().eval()
    load_pruned_state_dict(bare, wrapper.state_dict())
    assert bare.a.out_features == 16
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(bare(x), wrapper(x), atol=0, rtol=0)


def test_frozen_parameters_stay_frozen_through_compaction_and_reload():
    torch.manual_seed(0)
    model = Inner().eval()
    model.requires_grad_(False)
    apply_recipe(model, _group("{names: [a]}", "[4, 6]", "compact"))
    assert not any(p.requires_grad for p in model.parameters())
    fresh = Inner().eval()
    fresh.requires_grad_(False)
    fresh.b.bias.requires_grad_(True)
    load_pruned_state_dict(fresh, model.state_dict())
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == ["b.bias"]


@pytest.mark.parametrize(
    "part",
    ['{"size": 32, "removed": [true]}', "[1, 2]", '{"size": 32, "removed": "0"}', '{"size": 1.5, "removed": []}'],
)
def test_a_tampered_compaction_record_is_a_checkpoint_error(part):
    from prunerecipe.errors import CheckpointError

    torch.manual_seed(0)
    model = Inner().eval()
    apply_recipe(model, _group("{names: [a]}", "[4, 6]", "compact"))
    state = model.state_dict()
    text = '{"format":"prunerecipe-compaction","version":1,"modules":{"a":{"type":"Linear","out":' + part + "}}}"
    state["__prunerecipe_compaction__"] = torch.tensor(list(text.encode()), dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_pruned_state_dict(Inner(), state)
    deep = "[" * 100000 + "]" * 100000
    state["__prunerecipe_compaction__"] = torch.tensor(list(deep.encode()), dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_pruned_state_dict(Inner(), state)


def test_a_block_keeping_its_attention_head_count_does_not_make_its_mlp_attention():
    class Block(nn.Module):
        def __init__(self, d=16, heads=4):
            super().__init__()
            self.num_heads = heads
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
            self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            x = x + self.attn(x, x, x, need_weights=False)[0]
            return x + self.fc2(torch.relu(self.fc1(x)))

    plan = plan_recipe(Block(), _group("{names: [fc1]}", "[2, 5, 16]"))
    assert plan.steps[0].groups
    with pytest.raises(RecipeError, match="attention"):
        plan_recipe(Block(), _group("{names: ['attn.out_proj']}", "[2, 5, 16]"))


def test_batchnorm_without_affine_parameters_is_refused_at_plan_time():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    with pytest.raises(RecipeError, match="affine=False"):
        plan_recipe(model, _group("{names: ['0']}", "[2, 3, 8, 8]"))


def test_half_precision_models_compact_within_their_own_resolution():
    torch.manual_seed(0)
    model = ResNet(width=8).eval().half()
    report = apply_recipe(
        model, parse_recipe("version: 1\ninputs: [{shape: [2, 3, 32, 32], dtype: float16}]\nfinalize: compact\nsteps:\n  - " + GROUP % "" + "\n")
    )
    assert report.compaction is not None and report.compaction.tolerance == pytest.approx(4 * torch.finfo(torch.float16).eps)


def test_a_group_step_over_entries_masked_one_by_one_is_not_planned_as_a_fact():
    from prunerecipe.preview import preview

    model = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 5)).eval()
    recipe = parse_recipe(
        "version: 1\ninputs: [{shape: [2, 12]}]\nsteps:\n"
        "  - {select: {names: ['4']}, params: [weight], method: random_unstructured, amount: 0.25, seed: 1}\n"
        "  - {select: {types: [Linear]}, method: ln_structured, args: {n: 1, dim: 0}, amount: 2, scope: group}\n"
    )
    for plan in (plan_recipe(model, recipe), preview(model, plan_recipe(model, recipe))):
        row = next(pt for pt in plan.steps[1].targets if pt.target.qualname == "4.weight")
        assert not row.exact_after and row.known_after is None
    untouched = next(pt for pt in plan_recipe(model, recipe).steps[1].targets if pt.target.qualname == "0.weight")
    assert untouched.exact_after  # nothing masked there before: the count is a fact


def test_a_self_written_attention_with_a_parameter_free_helper_is_still_attention():
    class ScaledDotProductAttention(nn.Module):  # a helper with no projections of its own
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2), -1) @ v

    class Mix(Heads):
        def __init__(self):
            super().__init__()
            self.attend = ScaledDotProductAttention()

    model = nn.Sequential(Mix())
    with pytest.raises(RecipeError, match="attention"):
        plan_recipe(model, _group("{names: ['0.q']}", "[2, 5, 32]"))


def test_an_empty_output_beside_real_ones_does_not_stop_compaction():
    class WithNothing(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(6, 16), nn.Linear(16, 3)

        def forward(self, x):
            return self.l2(torch.relu(self.l1(x))), torch.zeros(0)  # no auxiliary losses this time

    torch.manual_seed(0)
    model = WithNothing().eval()
    report = apply_recipe(model, _group("{names: [l1]}", "[4, 6]", "compact"))
    assert report.compaction is not None and model.l1.out_features == 8
