from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from prunerecipe import ApplyError, RecipeError, apply_recipe, finalize, parse_recipe, plan_recipe, register_method
from prunerecipe.zoo import LeNet

from .conftest import make_lenet, pruning_history


def fingerprint(model: nn.Module) -> list:
    """Everything pruning touches, by identity and by value."""
    out = []
    for name, m in model.named_modules():
        out.append(
            (
                name,
                [(k, id(v), v.detach().clone() if v is not None else None) for k, v in m._parameters.items()],
                [(k, v.clone() if v is not None else None) for k, v in m._buffers.items()],
                [(k, id(h), len(h) if isinstance(h, prune.PruningContainer) else -1) for k, h in m._forward_pre_hooks.items()],
                sorted(m.__dict__),
                [(k, v.data_ptr()) for k, v in m._parameters.items() if v is not None],
            )
        )
    return out


def assert_same_fingerprint(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (n1, p1, b1, h1, d1, ptr1), (n2, p2, b2, h2, d2, ptr2) in zip(a, b):
        assert n1 == n2
        assert [(k, i) for k, i, _ in p1] == [(k, i) for k, i, _ in p2], n1
        assert all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(p1, p2)), n1
        assert [k for k, _ in b1] == [k for k, _ in b2], n1
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(b1, b2)), n1
        assert h1 == h2, n1
        assert d1 == d2, n1
        assert ptr1 == ptr2, n1


class FailsOnThird(prune.BasePruningMethod):
    PRUNING_TYPE = "unstructured"
    calls = 0

    def __init__(self, amount):
        self.amount = amount

    def compute_mask(self, t, default_mask):
        FailsOnThird.calls += 1
        if FailsOnThird.calls == 3:
            raise RuntimeError("boom on the third tensor")
        mask = default_mask.clone()
        mask.view(-1)[: int(self.amount * t.numel())] = 0
        return mask


def test_failure_midway_leaves_the_model_bit_identical():
    register_method("fails_on_third", FailsOnThird)
    FailsOnThird.calls = 0
    model = make_lenet()
    prune.l1_unstructured(model.fc2, "weight", amount=0.1)  # an existing container must survive too
    prune.random_unstructured(model.fc2, "weight", amount=0.1)
    before = fingerprint(model)
    recipe = parse_recipe(
        """
version: 1
steps:
  - {name: first, select: {types: [Conv2d]}, params: [weight, bias], method: l1_unstructured, amount: 0.5}
  - {name: second, select: {types: [Linear]}, method: fails_on_third, amount: 0.5}
""",
        "atomic.yaml",
    )
    with pytest.raises(ApplyError) as err:
        apply_recipe(model, recipe)
    assert str(err.value) == (
        "atomic.yaml:5:5: steps[1]: step 'second' (fails_on_third) failed on fc3.weight: RuntimeError: boom on the third tensor; "
        "the model was left unchanged"
    )
    assert isinstance(err.value, RecipeError)
    assert_same_fingerprint(fingerprint(model), before)
    assert pruning_history(model.fc2, "weight") == [prune.L1Unstructured, prune.RandomUnstructured]
    # the model still works and can still be pruned
    model(torch.zeros(1, 1, 28, 28))
    FailsOnThird.calls = -100
    apply_recipe(model, recipe)
    assert pruning_history(model.fc2, "weight") == [prune.L1Unstructured, prune.RandomUnstructured, FailsOnThird]


def test_failure_in_global_step_and_in_finalize_rolls_back(write_recipe):
    class BadGlobal(prune.BasePruningMethod):
        PRUNING_TYPE = "unstructured"

        def __init__(self, amount):
            self.amount = amount

        def compute_mask(self, t, default_mask):
            raise ValueError("cannot rank")

    register_method("bad_global", BadGlobal)
    model = make_lenet()
    before = fingerprint(model)
    path = write_recipe("""
        version: 1
        finalize: true
        steps:
          - {select: {names: [conv1]}, method: l1_unstructured, amount: 0.5}
          - {select: {types: [Linear]}, method: bad_global, amount: 0.5, scope: global}
    """)
    with pytest.raises(ApplyError, match=r"steps\[1\]: bad_global failed: ValueError: cannot rank"):
        apply_recipe(model, path)
    assert_same_fingerprint(fingerprint(model), before)


def test_keyboard_interrupt_also_rolls_back_and_propagates():
    class Interrupt(prune.BasePruningMethod):
        PRUNING_TYPE = "unstructured"

        def compute_mask(self, t, default_mask):
            raise KeyboardInterrupt

    register_method("interrupt", Interrupt)
    model = make_lenet()
    before = fingerprint(model)
    recipe = parse_recipe(
        "version: 1\nsteps:\n  - {select: {names: [conv1]}, method: l1_unstructured, amount: 0.5}\n  - {select: {names: [fc1]}, method: interrupt}\n"
    )
    with pytest.raises(KeyboardInterrupt):
        apply_recipe(model, recipe)
    assert_same_fingerprint(fingerprint(model), before)


def test_plan_changes_nothing_and_projects_torch_counts():
    model = make_lenet()
    before = fingerprint(model)
    recipe = parse_recipe("""
version: 1
steps:
  - {select: {names: [conv1]}, params: [bias], method: l1_unstructured, amount: 0.5}
  - {select: {names: [conv1]}, params: [bias], method: l1_unstructured, amount: 0.5}
  - {select: {names: [fc1]}, method: ln_structured, amount: 0.25, args: {n: 2, dim: 0}}
  - {select: {types: [Linear]}, method: l1_unstructured, sparsity: 0.5, scope: global}
""")
    plan = plan_recipe(model, recipe)
    assert_same_fingerprint(fingerprint(model), before)
    counts = [[pt.to_prune for pt in ps.targets] for ps in plan.steps]
    assert counts[0] == [3] and counts[1] == [2]  # round(0.5 * 3) == 2: torch rounds half to even
    assert counts[2] == [30] and plan.steps[2].targets[0].unit == "slices (dim 0)"
    total = 48000 + 10080 + 840
    assert plan.steps[3].group_to_prune == round(0.5 * total) - 30 * 400
    text = str(plan)
    assert "conv1.bias" in text and "slices (dim 0)" in text and "global group: 3 tensors" in text
    report = apply_recipe(model, recipe, plan=plan)
    assert int((model.conv1.bias_mask == 0).sum()) == 5
    assert report.steps[0].targets == ("conv1.bias",)


def test_report_counts_zeros_before_and_after():
    model = make_lenet()
    with torch.no_grad():
        model.fc3.weight[0, :4] = 0.0  # zeros before pruning count as sparsity
    recipe = parse_recipe("version: 1\nsteps:\n  - {select: {names: [fc3]}, method: l1_unstructured, amount: 10}\n")
    report = apply_recipe(model, recipe)
    row = report["fc3.weight"]
    assert (row.zeros_before, row.zeros_after, row.numel) == (4, 10, 840)
    assert report.global_before == 4 / 840 and report.global_after == 10 / 840
    assert report.to_dict()["global"]["numel"] == 840
    assert "fc3.weight" in str(report)


def test_only_scheduled_steps_is_a_clear_error_and_scheduled_steps_are_skipped(write_recipe):
    only = write_recipe(
        """
        version: 1
        steps:
          - select: {types: [Linear]}
            method: l1_unstructured
            sparsity: 0.8
            schedule: {start: 1, end: 5}
    """,
        "only.yaml",
    )
    with pytest.raises(RecipeError, match="every step has a 'schedule'"):
        apply_recipe(make_lenet(), only)
    mixed = write_recipe(
        """
        version: 1
        steps:
          - {select: {names: [conv1]}, method: l1_unstructured, amount: 0.5}
          - select: {types: [Linear]}
            method: l1_unstructured
            sparsity: 0.8
            schedule: {start: 1, end: 5}
    """,
        "mixed.yaml",
    )
    model = make_lenet()
    report = apply_recipe(model, mixed)
    assert report.skipped == ("steps[1]",)
    assert not prune.is_pruned(model.fc1) and prune.is_pruned(model.conv1)
    assert "skipped" in str(report)


def test_seeded_random_steps_are_reproducible(write_recipe):
    path = write_recipe("""
        version: 1
        seed: 5
        steps:
          - {select: {types: [Linear]}, method: random_unstructured, amount: 0.5}
          - {select: {types: [Conv2d]}, method: random_structured, amount: 0.5, args: {dim: 0}, seed: 9}
    """)
    a, b = make_lenet(), make_lenet()
    apply_recipe(a, path)
    torch.manual_seed(999)  # the global RNG state before the call does not matter
    apply_recipe(b, path)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])


def test_finalize_api_folds_every_pruned_parameter():
    model = make_lenet()
    prune.l1_unstructured(model.conv1, "weight", amount=0.5)
    prune.l1_unstructured(model.conv1, "bias", amount=2)
    prune.random_unstructured(model.fc1, "weight", amount=0.2)
    expected = {k: v.clone() for k, v in [("conv1.weight", model.conv1.weight), ("fc1.weight", model.fc1.weight)]}
    assert finalize(model) == ["conv1.weight", "conv1.bias", "fc1.weight"]
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())
    assert torch.equal(model.conv1.weight, expected["conv1.weight"]) and torch.equal(model.fc1.weight, expected["fc1.weight"])
    assert isinstance(model.conv1.weight, nn.Parameter)
    assert finalize(model) == []


def test_apply_needs_a_module_and_a_recipe():
    with pytest.raises(TypeError):
        plan_recipe("not a model", parse_recipe("version: 1\nsteps:\n  - {select: {}, method: identity}\n"))
    with pytest.raises(RecipeError, match="no such recipe file"):
        apply_recipe(LeNet(), "does/not/exist.yaml")


def test_pruned_model_trains_and_masks_hold():
    model = make_lenet()
    apply_recipe(model, parse_recipe("version: 1\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert torch.all(model.fc1.weight[model.fc1.weight_mask == 0] == 0)
    assert model.fc1.weight_orig.grad is not None


def test_failure_during_finalize_restores_already_finalized_parameters(write_recipe):
    class BadRemove(prune.BasePruningMethod):
        PRUNING_TYPE = "unstructured"

        def compute_mask(self, t, default_mask):
            return default_mask

        def remove(self, module):
            raise RuntimeError("cannot fold")

    register_method("bad_remove", BadRemove)
    model = make_lenet()
    before = fingerprint(model)
    path = write_recipe("""
        version: 1
        finalize: true
        steps:
          - {select: {names: [conv1]}, method: l1_unstructured, amount: 0.5}
          - {select: {names: [fc1]}, method: bad_remove}
    """)
    with pytest.raises(ApplyError, match="finalize failed: RuntimeError: cannot fold; the model was left unchanged"):
        apply_recipe(model, path)
    assert_same_fingerprint(fingerprint(model), before)


def test_methods_without_amount_work_in_global_and_structured_form():
    import torch.nn.utils.prune as prune

    from prunerecipe import pruning_method

    @pruning_method("structured")
    def first_row(t, default_mask, dim=0):
        mask = default_mask.clone()
        mask.select(dim, 0).zero_()
        return mask

    register_method("first_row", first_row)
    ours, theirs = make_lenet(), make_lenet()
    recipe = parse_recipe("""
version: 1
steps:
  - {select: {types: [Linear]}, method: identity, scope: global}
  - {select: {names: [fc1]}, method: first_row, args: {dim: 1}}
  - {select: {names: [fc1]}, method: l1_unstructured, amount: 100}
""")
    plan = plan_recipe(ours, recipe)
    assert plan.steps[0].group_to_prune == 0 and plan.steps[1].targets[0].to_prune is None  # identity prunes nothing: a fact
    apply_recipe(ours, recipe, plan=plan)
    prune.global_unstructured([(m, "weight") for m in (theirs.fc1, theirs.fc2, theirs.fc3)], pruning_method=prune.Identity)
    first_row.apply(theirs.fc1, "weight", dim=1)
    prune.l1_unstructured(theirs.fc1, "weight", amount=100)
    from .conftest import assert_same_pruning

    assert_same_pruning(ours, theirs)


def test_int_amounts_after_a_global_step_are_not_rejected_on_an_estimate():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(10, 1, bias=False)
            self.b = nn.Linear(10, 1, bias=False)
            with torch.no_grad():
                self.a.weight.fill_(0.01)
                self.b.weight.copy_(torch.arange(1.0, 11.0))

    recipe = parse_recipe("""
version: 1
steps:
  - {select: {}, method: l1_unstructured, amount: 0.5, scope: global}
  - {select: {names: [b]}, method: l1_unstructured, amount: 10}
""")
    model = Two()
    apply_recipe(model, recipe)  # the global step prunes all of a and none of b: 10 are left in b
    assert int((model.b.weight_mask == 0).sum()) == 10 and int((model.a.weight_mask == 0).sum()) == 10
    # an exact count is still checked: 11 is more than b has at all
    with pytest.raises(RecipeError, match="amount 11 is more than the 10 unpruned entries of b.weight"):
        plan_recipe(Two(), parse_recipe("version: 1\nsteps:\n  - {select: {names: [b]}, method: l1_unstructured, amount: 11}\n"))
