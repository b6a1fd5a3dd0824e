"""A recipe's result equals the hand-written torch.nn.utils.prune code's, mask for mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from prunerecipe import apply_recipe, load_recipe, parse_recipe
from prunerecipe.zoo import LeNet

from .conftest import ROOT, assert_same_pruning, make_lenet, pruning_history


def test_seed_module_pruning_and_iterative_chaining():
    ours, theirs = make_lenet(), make_lenet()
    apply_recipe(ours, load_recipe(ROOT / "recipes/lenet-seed-conv1.yaml"))

    m = theirs.conv1
    torch.manual_seed(0)
    prune.random_unstructured(m, name="weight", amount=0.3)
    prune.l1_unstructured(m, name="bias", amount=3)
    prune.ln_structured(m, name="weight", amount=0.5, n=2, dim=0)

    assert_same_pruning(ours, theirs)
    assert list(ours.state_dict()) == [
        "conv1.weight_orig",
        "conv1.bias_orig",
        "conv1.weight_mask",
        "conv1.bias_mask",
        "conv2.weight",
        "conv2.bias",
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
        "fc3.weight",
        "fc3.bias",
    ]
    assert pruning_history(ours.conv1, "weight") == [prune.RandomUnstructured, prune.LnStructured]
    assert pruning_history(ours.conv1, "bias") == [prune.L1Unstructured]
    # an int amount is a count: exactly 3 of the 6 bias entries
    assert int((ours.conv1.bias_mask == 0).sum()) == 3
    # hooks in the same order as torch's: the bias hook first, then the weight container
    assert [type(h) for h in ours.conv1._forward_pre_hooks.values()] == [prune.L1Unstructured, prune.PruningContainer]
    # exactly half of the 6 output channels are fully masked after the structured step
    channel_alive = ours.conv1.weight_mask.sum(dim=(1, 2, 3)) != 0
    assert int(channel_alive.sum()) == 3


def test_seed_layerwise_l1():
    ours, theirs = make_lenet(), make_lenet()
    apply_recipe(ours, ROOT / "recipes/lenet-layerwise-l1.yaml")
    for _, module in theirs.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            prune.l1_unstructured(module, name="weight", amount=0.2)
        elif isinstance(module, torch.nn.Linear):
            prune.l1_unstructured(module, name="weight", amount=0.4)
    assert_same_pruning(ours, theirs)
    assert sorted(dict(ours.named_buffers())) == [f"{n}.weight_mask" for n in ("conv1", "conv2", "fc1", "fc2", "fc3")]


def test_seed_global_l1_prunes_exactly_twenty_percent():
    ours, theirs = make_lenet(), make_lenet()
    report = apply_recipe(ours, ROOT / "recipes/lenet-global-l1.yaml")
    prune.global_unstructured(
        [(theirs.conv1, "weight"), (theirs.conv2, "weight"), (theirs.fc1, "weight"), (theirs.fc2, "weight"), (theirs.fc3, "weight")],
        pruning_method=prune.L1Unstructured,
        amount=0.2,
    )
    assert_same_pruning(ours, theirs)
    total = sum(getattr(ours, n).weight.numel() for n in ("conv1", "conv2", "fc1", "fc2", "fc3"))
    zeros = sum(int((getattr(ours, n).weight_mask == 0).sum()) for n in ("conv1", "conv2", "fc1", "fc2", "fc3"))
    assert zeros == round(0.2 * total)
    assert abs(report.global_after - zeros / total) < 1e-12
    # per-layer sparsity is uneven, as in the seed's printout
    assert len({round(t.after, 3) for t in report.targets}) > 1


def test_iterative_local_amount_compounds(write_recipe):
    path = write_recipe("""
        version: 1
        steps:
          - {select: {names: [fc1]}, method: l1_unstructured, amount: 0.5}
          - {select: {names: [fc1]}, method: l1_unstructured, amount: 0.5}
    """)
    ours, theirs = make_lenet(), make_lenet()
    apply_recipe(ours, path)
    prune.l1_unstructured(theirs.fc1, "weight", amount=0.5)
    prune.l1_unstructured(theirs.fc1, "weight", amount=0.5)
    assert_same_pruning(ours, theirs)
    assert float((ours.fc1.weight_mask == 0).float().mean()) == 0.75
    assert pruning_history(ours.fc1, "weight") == [prune.L1Unstructured, prune.L1Unstructured]


def test_iterative_global_then_local_then_structured_random(write_recipe):
    path = write_recipe("""
        version: 1
        seed: 11
        steps:
          - select: {types: [Linear]}
            method: random_unstructured
            amount: 0.3
            scope: global
          - select: {names: ["fc*"]}
            params: [weight, bias]
            method: l1_unstructured
            amount: 2
          - select: {types: [torch.nn.Linear], exclude: {names: [fc3]}}
            method: random_structured
            amount: 0.25
            args: {dim: 1}
    """)
    ours, theirs = make_lenet(), make_lenet()
    apply_recipe(ours, path)
    linears = [theirs.fc1, theirs.fc2, theirs.fc3]
    torch.manual_seed(11)
    prune.global_unstructured([(m, "weight") for m in linears], pruning_method=prune.RandomUnstructured, amount=0.3)
    torch.manual_seed(11)
    for m in linears:
        prune.l1_unstructured(m, "weight", amount=2)
        prune.l1_unstructured(m, "bias", amount=2)
    torch.manual_seed(11)
    for m in linears[:2]:
        prune.random_structured(m, "weight", amount=0.25, dim=1)
    assert_same_pruning(ours, theirs)
    assert pruning_history(ours.fc1, "weight") == [prune.CustomFromMask, prune.L1Unstructured, prune.RandomStructured]


def test_sparsity_target_equals_torch_amount_on_fresh_tensor(write_recipe):
    path = write_recipe("""
        version: 1
        steps:
          - {select: {types: [Conv2d, Linear]}, method: l1_unstructured, sparsity: 0.35}
          - {select: {types: [Linear]}, method: ln_structured, sparsity: 0.5, args: {n: 1, dim: 0}}
    """)
    ours, theirs = make_lenet(), make_lenet()
    apply_recipe(ours, path)
    for _, m in theirs.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            prune.l1_unstructured(m, "weight", amount=0.35)
    for _, m in theirs.named_modules():
        if isinstance(m, torch.nn.Linear):
            prune.ln_structured(m, "weight", amount=0.5, n=1, dim=0)
    assert_same_pruning(ours, theirs)


def test_sparsity_is_absolute_after_prior_pruning(write_recipe):
    path = write_recipe("""
        version: 1
        steps:
          - {select: {names: [fc2]}, method: l1_unstructured, amount: 0.5}
          - {select: {names: [fc2]}, method: l1_unstructured, sparsity: 0.8}
          - {select: {names: [fc2]}, method: l1_unstructured, sparsity: 0.6}
    """)
    model = make_lenet()
    report = apply_recipe(model, path)
    n = model.fc2.weight.numel()
    assert int((model.fc2.weight_mask == 0).sum()) == round(0.8 * n)
    # the third step asks for less than is already pruned: a no-op, said so, and no extra hook
    assert pruning_history(model.fc2, "weight") == [prune.L1Unstructured, prune.L1Unstructured]
    assert "no-op" in (report.steps[2].note or "")


def test_global_sparsity_target_after_local_pruning(write_recipe):
    path = write_recipe("""
        version: 1
        steps:
          - {select: {names: [fc1]}, method: l1_unstructured, amount: 0.3}
          - {select: {types: [Linear]}, method: l1_unstructured, sparsity: 0.5, scope: global}
    """)
    ours, theirs = make_lenet(), make_lenet()
    apply_recipe(ours, path)
    linears = [theirs.fc1, theirs.fc2, theirs.fc3]
    prune.l1_unstructured(theirs.fc1, "weight", amount=0.3)
    total = sum(m.weight.numel() for m in linears)
    done = int((theirs.fc1.weight_mask == 0).sum())
    prune.global_unstructured([(m, "weight") for m in linears], pruning_method=prune.L1Unstructured, amount=round(0.5 * total) - done)
    assert_same_pruning(ours, theirs)
    zeros = sum(int((m.weight_mask == 0).sum()) for m in (ours.fc1, ours.fc2, ours.fc3))
    assert zeros == round(0.5 * total)


def test_identity_and_finalize_match_prune_remove(write_recipe):
    path = write_recipe("""
        version: 1
        finalize: true
        steps:
          - {select: {names: [conv2]}, params: [weight, bias], method: identity}
          - {select: {names: [conv2, fc3]}, method: l1_unstructured, amount: 0.5}
    """)
    ours, theirs = make_lenet(), make_lenet()
    report = apply_recipe(ours, path)
    prune.identity(theirs.conv2, "weight")
    prune.identity(theirs.conv2, "bias")
    prune.l1_unstructured(theirs.conv2, "weight", amount=0.5)
    prune.l1_unstructured(theirs.fc3, "weight", amount=0.5)
    for m, name in ((theirs.conv2, "weight"), (theirs.conv2, "bias"), (theirs.fc3, "weight")):
        prune.remove(m, name)
    assert_same_pruning(ours, theirs)
    assert sorted(ours.state_dict()) == sorted(LeNet().state_dict())
    assert report.finalized and not ours.conv2._forward_pre_hooks


def test_recipe_on_already_pruned_model_continues_the_container(write_recipe):
    path = write_recipe("""
        version: 1
        steps:
          - {select: {names: [fc1]}, method: l1_unstructured, amount: 0.25}
    """)
    ours, theirs = make_lenet(), make_lenet()
    for model in (ours, theirs):
        torch.manual_seed(3)
        prune.random_unstructured(model.fc1, "weight", amount=0.5)
    apply_recipe(ours, path)
    prune.l1_unstructured(theirs.fc1, "weight", amount=0.25)
    assert_same_pruning(ours, theirs)
    assert pruning_history(ours.fc1, "weight") == [prune.RandomUnstructured, prune.L1Unstructured]


class BasicBlock(torch.nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False), torch.nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TinyResNet(torch.nn.Module):
    """torchvision's ResNet layout (conv1/bn1/layerN.M.convK/downsample/fc), small."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.layer1 = torch.nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = torch.nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16))
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean(dim=(2, 3)))


def test_torchvision_style_resnet_selection_and_equivalence(write_recipe):
    path = write_recipe("""
        version: 1
        seed: 3
        steps:
          - name: block-convs
            select: {names: ["layer*.*.conv*"], exclude: {names: ["layer1.0.*"]}}
            method: ln_structured
            amount: 0.25
            args: {n: 1, dim: 0}
          - name: everything-else-global
            select: {types: [Conv2d, Linear], exclude: {names: ["re:layer[12]\\\\.[01]\\\\.conv[12]"]}}
            method: l1_unstructured
            sparsity: 0.5
            scope: global
          - name: bn-random
            select: {types: [BatchNorm2d]}
            params: [weight, bias]
            method: random_unstructured
            amount: 1
    """)
    torch.manual_seed(0)
    ours = TinyResNet()
    theirs = TinyResNet()
    theirs.load_state_dict(ours.state_dict())
    apply_recipe(ours, path)

    named = dict(theirs.named_modules())
    torch.manual_seed(3)
    for name in ["layer1.1.conv1", "layer1.1.conv2", "layer2.0.conv1", "layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2"]:
        prune.ln_structured(named[name], "weight", amount=0.25, n=1, dim=0)
    torch.manual_seed(3)
    rest = [(named[n], "weight") for n in ["conv1", "layer2.0.downsample.0", "fc"]]
    total = sum(m.weight.numel() for m, _ in rest)
    prune.global_unstructured(rest, pruning_method=prune.L1Unstructured, amount=round(0.5 * total))
    torch.manual_seed(3)
    for module in theirs.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            prune.random_unstructured(module, "weight", amount=1)
            prune.random_unstructured(module, "bias", amount=1)
    assert_same_pruning(ours, theirs)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("scope", ["", ", scope: global"])
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_random_unstructured_on_weights_torch_cannot_flatten_draws_as_for_contiguous_ones(scope, layout):
    """torch's random_unstructured fails on a channels_last or transposed weight (view(-1)); ours
    gives the masks torch gives a contiguous copy, from the same draws."""

    def build():
        torch.manual_seed(5)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3))

    ours, theirs = build(), build()
    if layout == "channels_last":
        ours = ours.to(memory_format=torch.channels_last)
    else:
        for layer in ours:
            layer.weight = nn.Parameter(layer.weight.detach().transpose(0, 1).contiguous().transpose(0, 1))
    torch.manual_seed(0)
    step = "{select: {types: [Conv2d]}, method: random_unstructured, amount: 0.3" + scope + "}"
    apply_recipe(ours, parse_recipe("version: 1\nsteps:\n  - " + step + "\n"))
    after_ours = torch.get_rng_state()
    torch.manual_seed(0)
    if scope:
        prune.global_unstructured([(layer, "weight") for layer in theirs], pruning_method=prune.RandomUnstructured, amount=0.3)
    else:
        for layer in theirs:
            prune.random_unstructured(layer, "weight", amount=0.3)
    assert torch.equal(after_ours, torch.get_rng_state())
    for a, b in zip(ours, theirs):
        assert not a.weight_orig.is_contiguous() and torch.equal(a.weight_mask, b.weight_mask)
        assert [type(h).__name__ for h in a._forward_pre_hooks.values()] == [type(h).__name__ for h in b._forward_pre_hooks.values()]
