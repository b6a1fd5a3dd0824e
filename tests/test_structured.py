"""scope: group and compaction on convolutional models: group masks against a direct
computation, compacted outputs against the masked model, and every refusal leaving the
model as it was."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from prunerecipe import ApplyError, RecipeError, apply_recipe, compact, finalize, parse_recipe, plan_recipe
from prunerecipe.errors import StructuredError
from prunerecipe.zoo import ResNet

from .conftest import pruning_history

pytest.importorskip("torch_pruning")

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))

GROUP = """
version: 1
inputs: [{shape: [1, 3, 32, 32]}]
steps:
  - name: channels
    select: {types: [Conv2d]}
    method: ln_structured
    amount: 0.5
    scope: group
    args: {n: 2}
"""


PER_LAYER = GROUP.replace("    scope: group\n", "").replace("args: {n: 2}", "args: {n: 2, dim: 0}")  # each conv picks its own channels


def resnet(seed: int = 0) -> ResNet:
    """A narrow ResNet-18 with trained-looking BatchNorms (a masked channel then emits beta
    after BN, which compaction must get rid of exactly)."""
    torch.manual_seed(seed)
    model = ResNet(width=4, num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), k


def channel_keep(module: nn.Module, param: str, dim: int) -> torch.Tensor:
    """Which slices along ``dim`` the mask of ``module.param`` keeps (any entry alive)."""
    mask = getattr(module, param + "_mask")
    return mask.movedim(dim, 0).reshape(mask.shape[dim], -1).ne(0).any(dim=1)


def direct_keep(group_members: list[tuple[nn.Module, str]], channels: int, amount: float) -> torch.Tensor:
    """The group's kept channels computed by hand: each member's weight entries of a channel
    side by side (producers' rows, BatchNorm scales, consumers' columns), then torch's own
    LnStructured along the channels."""
    parts = []
    for module, role in group_members:
        w = getattr(module, "weight_orig", module.weight).detach()
        if role == "out":
            parts.append(w.reshape(channels, -1))
        elif role == "norm":
            parts.append(w.reshape(channels, 1))
        else:
            parts.append(w.transpose(0, 1).reshape(channels, -1))
    matrix = torch.cat(parts, dim=1)
    mask = prune.LnStructured(amount, n=2, dim=0).compute_mask(matrix, torch.ones_like(matrix))
    return mask.ne(0).any(dim=1)


def test_group_masks_are_one_mask_per_group_and_equal_a_direct_computation():
    model = resnet()
    recipe = parse_recipe(GROUP)
    plan = plan_recipe(model, recipe)
    (ps,) = plan.steps
    assert len(ps.groups) == 12 and not ps.skipped_groups  # fc is a consumer only: layer4's group is kept
    apply_recipe(model, recipe, plan=plan)
    stage1 = next(pg.group for pg in ps.groups if pg.group.root == "conv1")
    roles = {(m.name, m.role) for m in stage1.members}
    assert roles == {
        ("conv1", "out"),
        ("bn1", "norm"),
        ("layer1.0.conv1", "in"),
        ("layer1.0.conv2", "out"),
        ("layer1.0.bn2", "norm"),
        ("layer1.1.conv1", "in"),
        ("layer1.1.conv2", "out"),
        ("layer1.1.bn2", "norm"),
        ("layer2.0.conv1", "in"),
        ("layer2.0.downsample.0", "in"),
    }
    modules = dict(model.named_modules())
    members = [(modules[n], r) for n, r in sorted(roles, key=lambda nr: list(modules).index(nr[0]))]
    expected = direct_keep(members, 4, 0.5)
    assert int(expected.sum()) == 2
    for name, role in roles:
        module = modules[name]
        dim = 1 if role == "in" else 0
        assert torch.equal(channel_keep(module, "weight", dim), expected), name
        if role == "norm":
            assert torch.equal(channel_keep(module, "bias", 0), expected), name
    # torch's own re-parametrization: one CustomFromMask per parameter, weight == orig * mask
    conv = model.layer1[0].conv1
    assert pruning_history(conv, "weight") == [prune.CustomFromMask]
    assert torch.equal(conv.weight, conv.weight_orig * conv.weight_mask)
    assert {"layer1.0.conv1.weight_orig", "layer1.0.conv1.weight_mask", "bn1.bias_mask"} <= set(model.state_dict())
    assert not hasattr(model.fc, "weight_mask")  # not selected: never masked


def test_every_group_member_carries_the_same_channels():
    model = resnet(1)
    recipe = parse_recipe(GROUP)
    plan = plan_recipe(model, recipe)
    apply_recipe(model, recipe, plan=plan)
    for pg in plan.steps[0].groups:
        keeps = []
        for m in pg.group.members:
            if not m.masked:
                continue
            keep = channel_keep(m.module, "weight", m.dim)
            keeps.append(keep[m.positions][torch.argsort(m.channels)])
        assert all(torch.equal(k, keeps[0]) for k in keeps), pg.group.root
        assert int((~keeps[0]).sum()) == pg.to_prune == pg.group.channels // 2


def test_plan_lists_groups_with_members_and_channel_counts():
    plan = plan_recipe(resnet(), parse_recipe(GROUP))
    text = str(plan)
    assert "group  root" in text and "layer4.0.conv2  32        0       16" in text
    assert "fc (Linear, in, not selected: unmasked)" in text
    data = plan.to_dict()["steps"][0]
    first = data["groups"][0]
    assert first["root"] == "conv1" and first["channels"] == 4 and first["to_prune"] == 2
    assert {"name": "bn1", "type": "BatchNorm2d", "role": "norm", "masked": True, "params": ["weight", "bias"]} in first["members"]
    assert {t["name"] for t in data["targets"]} >= {"conv1.weight", "bn1.weight", "bn1.bias", "layer4.1.conv2.weight"}


def test_plan_changes_nothing_and_restores_train_mode():
    model = resnet().train()
    before = state(model)
    plan_recipe(model, parse_recipe(GROUP))
    assert_unchanged(model, before)  # BatchNorm running stats untouched by tracing
    assert all(m.training for m in model.modules())


def test_sparsity_counts_channels_per_group_and_amount_compounds():
    model = resnet()
    twice = GROUP.replace("amount: 0.5", "sparsity: 0.5") + GROUP.split("steps:\n")[1].replace("channels", "again").replace(
        "amount: 0.5", "sparsity: 0.5"
    )
    report = apply_recipe(model, parse_recipe(twice))
    assert report.steps[1].note == "no-op: every group is already at or above sparsity 0.5"
    model = resnet()
    compounding = GROUP + GROUP.split("steps:\n")[1].replace("channels", "again")
    plan = plan_recipe(model, parse_recipe(compounding))
    assert all((pg.done, pg.to_prune) == (pg.group.channels // 2, pg.group.channels // 4) for pg in plan.steps[1].groups)  # half of what is left
    apply_recipe(model, parse_recipe(compounding), plan=plan)
    assert int(channel_keep(model.layer4[1].conv1, "weight", 0).sum()) == 8  # 32 -> 16 -> 8
    assert pruning_history(model.layer1[0].conv1, "weight") == [prune.CustomFromMask, prune.CustomFromMask]


def test_random_structured_groups_are_seeded_like_torch():
    recipe = parse_recipe(GROUP.replace("ln_structured", "random_structured").replace("args: {n: 2}", "seed: 5"))
    a, b = resnet(), resnet()
    apply_recipe(a, recipe)
    apply_recipe(b, recipe)
    for (name, ma), mb in zip(a.named_modules(), b.modules()):
        if hasattr(ma, "weight_mask"):
            assert torch.equal(ma.weight_mask, mb.weight_mask), name
    torch.manual_seed(5)
    first = prune.RandomStructured(2, dim=0).compute_mask(torch.ones(4, 7), torch.ones(4, 7)).ne(0).any(dim=1)
    assert torch.equal(channel_keep(a.conv1, "weight", 0), first)  # the first group draws first, right after the seed


def test_compaction_gives_the_masked_model_outputs_and_fewer_parameters():
    model = resnet()
    apply_recipe(model, parse_recipe(GROUP))
    with torch.no_grad():
        masked = model(X)
    result = compact(model, X[:1])
    with torch.no_grad():
        out = model(X)
    assert torch.allclose(out, masked, atol=1e-5 * float(masked.abs().max()), rtol=0)
    assert model.conv1.out_channels == 2 and model.layer4[1].conv2.out_channels == 16 and model.fc.in_features == 16
    assert model.layer1[0].bn1.num_features == 2 and model.layer1[0].bn1.running_mean.shape == (2,)
    assert result.params_after < 0.3 * result.params_before and result.macs_after < 0.4 * result.macs_before
    assert result.removed_channels == sum(g.channels for g in result.groups) // 2 and len(result.groups) == 12
    assert not any(prune.is_pruned(m) for m in model.modules())
    assert "__prunerecipe_compaction__" in model.state_dict()
    assert "compacted: 12 group(s)" in str(result)


def test_finalize_compact_in_a_recipe_reports_removed_entries_as_pruned():
    model = resnet()
    report = apply_recipe(model, parse_recipe(GROUP.replace("steps:", "finalize: compact\nsteps:")))
    assert report.compaction is not None and report.finalized
    assert report["layer1.0.conv1.weight"].after == pytest.approx(0.75)  # half the rows and half the columns
    assert report["layer1.0.conv1.weight"].shape == (4, 4, 3, 3)  # counted against the shape before
    assert report.to_dict()["compaction"]["params_after"] == sum(p.numel() for p in model.parameters())
    assert "compacted: 12 group(s)" in str(report)


def test_compacting_twice_keeps_one_record_of_the_first_model():
    from prunerecipe.structured import record

    model = resnet()
    apply_recipe(model, parse_recipe(GROUP.replace("steps:", "finalize: compact\nsteps:")))
    apply_recipe(model, parse_recipe(GROUP.replace("steps:", "finalize: compact\nsteps:")))
    assert model.conv1.out_channels == 1
    entry = record.current(model)["modules"]["conv1"]
    assert entry["out"]["size"] == 4 and len(entry["out"]["removed"]) == 3


def test_inconsistent_group_masks_are_refused_naming_the_members():
    model = resnet()
    apply_recipe(model, parse_recipe(PER_LAYER))  # per-layer channels: each conv picks its own
    before = state(model)
    with pytest.raises(StructuredError) as err:
        compact(model, X[:1])
    message = str(err.value)
    assert "the group of conv1 (members: conv1, bn1, layer1.0.conv1" in message and "has masks that disagree" in message
    assert "prune with scope: group" in message and message.endswith("nothing was changed")
    assert err.value.problems[0].code == "inconsistent-masks"
    assert_unchanged(model, before)
    assert prune.is_pruned(model.conv1)


def test_a_failed_output_check_says_by_how_much_and_changes_nothing():
    model = resnet()
    model.layer1[0].bn1.bias.data.fill_(3.0)  # positive after BatchNorm and ReLU even for a zero input
    prune.ln_structured(model.layer1[0].conv1, "weight", amount=0.5, n=2, dim=0)  # bn1 not masked: beta leaks through
    before = state(model)
    with pytest.raises(StructuredError) as err:
        compact(model, X[:1])
    problem = err.value.problems[0]
    assert problem.code == "output-check"
    assert "the compacted model's outputs differ from the masked model's by " in problem.message
    assert "allowed 1e-05 x output scale" in problem.message and problem.message.endswith("nothing was changed")
    assert_unchanged(model, before)
    assert model.layer1[0].conv1.out_channels == 4 and prune.is_pruned(model.layer1[0].conv1)


def test_a_recipe_whose_compaction_fails_leaves_the_model_unpruned():
    model = resnet()
    before = state(model)
    recipe = parse_recipe(PER_LAYER.replace("steps:", "finalize: compact\nsteps:"))
    with pytest.raises(ApplyError) as err:
        apply_recipe(model, recipe)
    assert str(err.value).startswith("<string>:4:11: finalize: cannot compact: the group of conv1")
    assert_unchanged(model, before)
    assert not any(prune.is_pruned(m) for m in model.modules())


def test_missing_inputs_are_an_error_at_the_step_and_at_finalize():
    recipe = parse_recipe(GROUP.replace("inputs: [{shape: [1, 3, 32, 32]}]\n", "finalize: compact\n"))
    model = resnet()
    before = state(model)
    with pytest.raises(RecipeError) as err:
        apply_recipe(model, recipe)
    codes = {(p.path, p.code) for p in err.value.problems}
    assert codes == {(("finalize",), "inputs"), (("steps", 0, "scope"), "inputs")}
    assert "step 'channels': scope: group traces the model and needs example inputs" in str(err.value)
    assert_unchanged(model, before)
    with pytest.raises(StructuredError, match="needs example inputs"):
        compact(model)


class Mixer(nn.Module):
    """A Linear whose channels go through a LayerNorm (not exact to remove), and a depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.down = nn.Linear(16, 4)
        self.conv = nn.Conv2d(4, 4, 3, groups=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(self.norm(self.up(x)))
        return self.conv(y[:, :, None, None].expand(-1, -1, 3, 3)).flatten(1)


def test_unsupported_layers_are_refused_at_plan_time():
    recipe = """
version: 1
inputs: [{shape: [2, 8]}]
steps:
  - select: {names: [%s]}
    method: ln_structured
    amount: 0.5
    scope: group
    args: {n: 2}
"""
    model = Mixer()
    with pytest.raises(RecipeError) as err:
        plan_recipe(model, parse_recipe(recipe % "up"))
    assert err.value.problems[0].code == "unsupported"
    assert "the group of up holds layers that cannot be masked per channel: norm (LayerNorm)" in str(err.value)
    with pytest.raises(RecipeError, match=r"unsupported: conv \(Conv2d\)"):
        plan_recipe(model, parse_recipe(recipe % "conv"))


def test_a_group_step_that_reaches_the_output_or_only_unselected_layers_says_why():
    model = resnet()
    recipe = GROUP.replace("types: [Conv2d]", "types: [Conv2d], exclude: {names: [conv1]}")
    plan = plan_recipe(model, parse_recipe(recipe))
    assert "skipped: layer1.0.conv2: its channels are shared with layers the step does not select: conv1" in str(plan)
    with pytest.raises(
        RecipeError, match="no channel group to prune: every group of the selected layers was skipped: fc: its channels reach the model's output"
    ):
        plan_recipe(model, parse_recipe(GROUP.replace("types: [Conv2d]", "names: [fc]")))


def test_bad_keys_for_group_steps():
    with pytest.raises(RecipeError, match=r"steps\[0\].args.dim: step 'channels': scope: group ranks output channels"):
        plan_recipe(resnet(), parse_recipe(GROUP.replace("args: {n: 2}", "args: {n: 2, dim: 1}")))
    with pytest.raises(RecipeError, match=r"steps\[0\].params: .* remove 'params'"):
        plan_recipe(resnet(), parse_recipe(GROUP.replace("method:", "params: [weight, bias]\n    method:")))


def test_compaction_of_a_model_without_removable_channels_just_finalizes():
    model = resnet()
    prune.l1_unstructured(model.fc, "weight", amount=0.3)
    with torch.no_grad():
        masked = model(X)
    result = compact(model, X[:1])
    assert result.groups == () and result.params_after == result.params_before
    assert not prune.is_pruned(model.fc) and torch.equal(model(X), masked)


def test_a_group_feeding_the_output_is_kept_and_noted():
    model = resnet()
    prune.ln_structured(model.fc, "weight", amount=0.5, n=2, dim=0)
    result = compact(model, X[:1])
    assert model.fc.out_features == 10
    assert result.notes == ("kept (cannot be removed): fc: its channels reach the model's output",)


def test_time_limit_stops_a_python_loop():
    from prunerecipe.structured.graph import TimeLimitExceeded, time_limit

    def step(n: int) -> int:
        return n + 1

    def spin() -> None:
        n = 0
        while True:
            n = step(n)  # a Python call each turn, as torch-pruning's loops make

    with pytest.raises(TimeLimitExceeded, match="spinning took longer than 0.05 s and was stopped"):
        with time_limit(0.05, "spinning"):
            spin()


def test_a_missing_torch_pruning_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    model = resnet()
    with pytest.raises(RecipeError, match=r'need torch-pruning: pip install "prunerecipe\[structured\]"'):
        plan_recipe(model, parse_recipe(GROUP))
    prune.ln_structured(model.conv1, "weight", amount=0.5, n=2, dim=0)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(StructuredError, match="need torch-pruning"):
        compact(model, X[:1])
    assert_unchanged(model, before)


def test_finalize_alone_still_means_prune_remove():
    model = resnet()
    apply_recipe(model, parse_recipe(GROUP.replace("steps:", "finalize: true\nsteps:")))
    assert model.conv1.out_channels == 4 and not prune.is_pruned(model.conv1)
    assert finalize(model) == []


def test_scheduled_group_steps_run_in_the_pruner_and_compaction_waits_for_the_end_of_training():
    from prunerecipe import Pruner

    schedule = GROUP.replace("amount: 0.5", "sparsity: 0.5\n    schedule: {start: 0, end: 2}")
    model = resnet()
    pruner = Pruner(model, parse_recipe(schedule))
    for epoch in range(3):
        pruner.step(epoch=epoch)
    assert torch.equal(channel_keep(model.conv1, "weight", 0), channel_keep(model.bn1, "weight", 0))
    assert int(channel_keep(model.layer4[1].conv1, "weight", 0).sum()) == 16
    with pytest.raises(RecipeError, match="finalize: compact changes parameter shapes, which a training loop cannot follow"):
        Pruner(resnet(), parse_recipe(schedule.replace("steps:", "finalize: compact\nsteps:")))


def test_a_selected_layer_the_forward_pass_never_calls_is_skipped():
    model = resnet()
    model.spare = nn.Conv2d(3, 4, 1)
    plan = plan_recipe(model, parse_recipe(GROUP))
    assert "skipped: spare: not used by the forward pass on the example inputs" in str(plan)
    with pytest.raises(RecipeError, match="scope: group prunes the output channels of convolutions, Linear or Conv1D layers; the step selects none"):
        plan_recipe(model, parse_recipe(GROUP.replace("types: [Conv2d]", "types: [BatchNorm2d]")))


def test_a_group_masked_entirely_is_not_removed():
    model = resnet()
    apply_recipe(model, parse_recipe(GROUP.replace("types: [Conv2d]", "names: [layer1.0.conv1]").replace("amount: 0.5", "amount: 1.0")))
    before = state(model)
    with pytest.raises(
        StructuredError, match="the group of layer1.0.conv1 has all its 4 channels masked: removing them all would cut the model in two"
    ):
        compact(model, X[:1])
    assert_unchanged(model, before)


def test_a_body_that_ends_past_the_deadline_ends_normally():
    """The limit stops code still running; it never raises out of its own exit (it once leaked
    an internal BaseException there when the body returned just past the deadline)."""
    import time

    from prunerecipe.structured.graph import TimeLimitExceeded, time_limit

    with time_limit(0.02, "sleeping"):
        time.sleep(0.05)  # one C call: no Python call to stop it at

    def step() -> None:
        time.sleep(0.001)

    with pytest.raises(TimeLimitExceeded, match="outer took longer than 0.02 s"):  # the outer end applies inside, and is named
        with time_limit(0.02, "outer"), time_limit(10, "inner"):
            while True:
                step()  # a Python call: where the limit can stop it
