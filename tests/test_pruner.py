"""Schedules and the training-loop Pruner: math, events, idempotence, resume, lottery tickets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune

from prunerecipe import Pruner, RecipeError, load_pruned_state_dict, parse_recipe
from prunerecipe.schedule import event_times, target_at
from prunerecipe.spec import Schedule
from prunerecipe.zoo import LeNet

from .conftest import make_lenet, pruning_history

GRADUAL = """
version: 1
seed: 0
steps:
  - name: convs-once
    select: {types: [Conv2d]}
    method: l1_unstructured
    amount: 0.1
  - name: linears-gradual
    select: {types: [Linear]}
    method: l1_unstructured
    sparsity: 0.8
    scope: global
    schedule: {start: 1, end: 5, every: 2, curve: cubic, initial_sparsity: 0.1}
"""


def test_event_times_include_end_and_respect_every():
    assert event_times(Schedule(start=2, end=10, every=2)) == [2, 4, 6, 8, 10]
    assert event_times(Schedule(start=1, end=6, every=2)) == [1, 3, 5, 6]
    assert event_times(Schedule(start=3, end=3)) == [3]


@pytest.mark.parametrize("curve, power", [("cubic", 3), ("linear", 1)])
def test_targets_follow_the_formula(curve, power):
    sch = Schedule(start=2, end=12, every=1, curve=curve, initial_sparsity=0.1)
    for t in range(2, 13):
        expected = 0.9 + (0.1 - 0.9) * (1 - (t - 2) / 10) ** power
        assert target_at(sch, 0.9, t) == pytest.approx(expected, abs=1e-15)
    assert target_at(sch, 0.9, 2) == pytest.approx(0.1) and target_at(sch, 0.9, 12) == 0.9
    assert target_at(Schedule(start=0, end=4, curve="constant"), 0.7, 0) == 0.7
    assert target_at(Schedule(start=5, end=5), 0.7, 5) == 0.7


def linear_zeros(model) -> int:
    return sum(int((m.weight_mask == 0).sum()) for m in (model.fc1, model.fc2, model.fc3))


LINEAR_TOTAL = 48000 + 10080 + 840


def test_pruner_runs_unscheduled_at_creation_then_events_on_time():
    model = make_lenet()
    pruner = Pruner(model, parse_recipe(GRADUAL))
    assert prune.is_pruned(model.conv1) and not prune.is_pruned(model.fc1)
    assert [(e.time, round(e.sparsity, 6)) for e, _ in pruner.timeline()] == [
        (1, 0.1),
        (3, round(0.8 + (0.1 - 0.8) * 0.5**3, 6)),
        (5, 0.8),
    ]
    assert pruner.step(epoch=0) == []
    ran = pruner.step(epoch=1)
    assert [r.event.time for r in ran] == [1]
    assert linear_zeros(model) == round(0.1 * LINEAR_TOTAL)
    assert pruner.step(epoch=1) == []  # replaying an event does nothing
    pruner.step(epoch=2)
    ran = pruner.step(epoch=3)
    assert linear_zeros(model) == round(ran[0].event.sparsity * LINEAR_TOTAL)
    pruner.step(epoch=5)
    assert linear_zeros(model) == round(0.8 * LINEAR_TOTAL)
    assert not pruner.pending()
    assert pruning_history(model.fc1, "weight") == [prune.CustomFromMask] * 3


def test_catching_up_runs_missed_events_in_order_and_step_units_are_separate():
    recipe = parse_recipe("""
version: 1
steps:
  - {select: {names: [fc1]}, method: l1_unstructured, amount: 0.5, schedule: {unit: step, start: 10, end: 30, every: 10}}
  - {select: {names: [fc2]}, method: l1_unstructured, amount: 0.5, schedule: {unit: epoch, start: 0, end: 1}}
""")
    model = make_lenet()
    pruner = Pruner(model, recipe)
    assert pruner.step(epoch=5) != [] and not prune.is_pruned(model.fc1)
    ran = pruner.step(step=25)
    assert [r.event.time for r in ran] == [10, 20]
    assert float((model.fc1.weight_mask == 0).float().mean()) == 0.75  # amount applied at every event
    pruner.step(step=30)
    assert float((model.fc1.weight_mask == 0).float().mean()) == 0.875
    with pytest.raises(TypeError):
        pruner.step()


def train_epoch(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        x = torch.randn(16, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def run(model, pruner, opt, epochs):
    for e in epochs:
        train_epoch(model, opt, seed=e)
        pruner.step(epoch=e)


@pytest.mark.parametrize("resume_with", ["constructor", "load_state_dict"])
@pytest.mark.parametrize("lottery", [False, True])
def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path, resume_with, lottery):
    text = GRADUAL + ("lottery_ticket: true\n" if lottery else "")
    recipe = parse_recipe(text)

    straight = make_lenet()
    opt = torch.optim.SGD(straight.parameters(), lr=0.05, momentum=0.9)
    run(straight, Pruner(straight, recipe), opt, range(6))

    first = make_lenet()
    opt = torch.optim.SGD(first.parameters(), lr=0.05, momentum=0.9)
    pruner = Pruner(first, recipe)
    run(first, pruner, opt, range(3))
    torch.save({"model": first.state_dict(), "pruner": pruner.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    second = LeNet()
    opt = torch.optim.SGD(second.parameters(), lr=0.05, momentum=0.9)  # before the masks come back, as in the first run
    load_pruned_state_dict(second, saved["model"])
    opt.load_state_dict(saved["opt"])
    if resume_with == "constructor":
        resumed = Pruner(second, recipe, state=saved["pruner"])
    else:
        resumed = Pruner(second, recipe)  # re-runs the unscheduled step...
        resumed.load_state_dict(saved["pruner"])  # ...and this undoes it
    run(second, resumed, opt, range(3, 6))

    for (name, a), (_, b) in zip(straight.named_buffers(), second.named_buffers()):
        assert torch.equal(a, b), name  # masks bit-identical
    for name in ("fc1", "fc2", "fc3", "conv1", "conv2"):
        assert torch.equal(getattr(straight, name).weight, getattr(second, name).weight), name


def test_lottery_ticket_resets_survivors_to_their_initial_values():
    recipe = parse_recipe(GRADUAL + "lottery_ticket: true\n")
    model = make_lenet()
    initial = model.fc1.weight.detach().clone()
    pruner = Pruner(model, recipe)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train_epoch(model, opt, seed=0)
    assert not torch.equal(model.fc1.weight, initial)  # training moved it (no masks yet on fc1)
    pruner.step(epoch=1)
    mask = model.fc1.weight_mask.bool()
    assert torch.equal(model.fc1.weight[mask], initial[mask])
    assert torch.all(model.fc1.weight[~mask] == 0)


def test_finalize_after_the_last_event():
    recipe = parse_recipe(GRADUAL + "finalize: true\n")
    model = make_lenet()
    pruner = Pruner(model, recipe)
    pruner.step(epoch=3)
    assert prune.is_pruned(model.fc1)
    pruner.step(epoch=5)
    assert pruner.finalized and not any(k.endswith("_mask") for k in model.state_dict())
    assert pruner.step(epoch=6) == []


def test_a_state_from_another_recipe_is_refused():
    model = make_lenet()
    other = parse_recipe("version: 1\nsteps:\n  - {select: {names: [fc1]}, method: l1_unstructured, amount: 0.5, schedule: {start: 0, end: 9}}\n")
    state = Pruner(make_lenet(), other).state_dict()
    state["done"] = [[0, 9]]
    with pytest.raises(RecipeError, match="made with a different recipe"):
        Pruner(model, parse_recipe(GRADUAL), state=state)
    del state["schedule_digest"]  # an older or hand-made state: the events still have to fit
    with pytest.raises(RecipeError, match="was it saved with another recipe"):
        Pruner(model, parse_recipe(GRADUAL), state=state)
    # same events, other selection (found in review): refused too
    fc2 = parse_recipe(GRADUAL.replace("select: {types: [Linear]}", "select: {names: [fc2]}"))
    with pytest.raises(RecipeError, match="made with a different recipe"):
        Pruner(make_lenet(), fc2, state=Pruner(make_lenet(), parse_recipe(GRADUAL)).state_dict())
    with pytest.raises(RecipeError, match="not a prunerecipe Pruner state"):
        Pruner(model, parse_recipe(GRADUAL), state={"version": 99})


def test_load_state_dict_after_a_step_is_an_error():
    pruner = Pruner(make_lenet(), parse_recipe(GRADUAL))
    pruner.step(epoch=0)
    with pytest.raises(RuntimeError, match="before the first step"):
        pruner.load_state_dict(pruner.state_dict())


def test_impossible_schedules_are_load_errors():
    with pytest.raises(RecipeError) as err:
        parse_recipe(
            """
version: 1
steps:
  - select: {types: [Linear]}
    method: l1_unstructured
    sparsity: 0.5
    schedule: {start: 4, end: 2, every: 0, initial_sparsity: 0.7, curve: quadratic}
""",
            "s.yaml",
        )
    text = str(err.value)
    assert "s.yaml:7:31: steps[0].schedule.end: end (2) is before start (4)" in text
    assert "steps[0].schedule.every: 0 is less than the minimum of 1" in text
    assert "steps[0].schedule.initial_sparsity: initial_sparsity (0.7) is above the final sparsity (0.5)" in text
    assert "steps[0].schedule.curve: 'quadratic' is not one of ['cubic', 'linear', 'constant']" in text


@pytest.mark.parametrize("scope", ["local", "global"])
def test_a_scheduled_count_no_event_could_prune_is_refused_when_the_pruner_is_made(scope):
    # it used to pass creation and fail at the first event, mid-training
    model = make_lenet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = parse_recipe(
        "version: 1\nsteps:\n  - select: {names: [conv1]}\n    method: l1_unstructured\n    amount: 100\n"
        f"    scope: {scope}\n    schedule: {{start: 3, end: 5}}\n",
        "s.yaml",
    )
    with pytest.raises(RecipeError) as err:
        Pruner(model, recipe)
    of = "of conv1.weight" if scope == "local" else "of the 1 targets together"
    assert f"s.yaml:5:13: steps[0].amount: amount 100 is more than the 54 unpruned entries {of}" in str(err.value)
    assert list(model.state_dict()) == list(before) and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_model_checkpoint_loaded_between_creation_and_load_state_dict_is_kept(tmp_path):
    # the usual torch order: build everything, then load every state (found in review)
    recipe = parse_recipe(GRADUAL)
    first = make_lenet()
    pruner = Pruner(first, recipe)
    pruner.step(epoch=3)
    saved = {"model": first.state_dict(), "pruner": pruner.state_dict()}

    second = LeNet()
    resumed = Pruner(second, recipe)
    load_pruned_state_dict(second, saved["model"])
    resumed.load_state_dict(saved["pruner"])
    for (name, a), (_, b) in zip(first.named_buffers(), second.named_buffers()):
        assert torch.equal(a, b), name
    assert torch.equal(second(torch.ones(1, 1, 28, 28)), first(torch.ones(1, 1, 28, 28)))
    assert [e.time for e in resumed.pending()] == [5]


def test_a_rejected_state_changes_nothing():
    from .test_apply import assert_same_fingerprint, fingerprint

    model = make_lenet()
    pruner = Pruner(model, parse_recipe(GRADUAL))
    before = fingerprint(model)
    with pytest.raises(RecipeError):
        pruner.load_state_dict({"version": 1, "done": [[5, 5]], "unscheduled_done": True})
    assert_same_fingerprint(fingerprint(model), before)
    assert prune.is_pruned(model.conv1)


def test_long_step_schedules_cost_nothing_per_idle_call():
    import time

    recipe = parse_recipe(
        "version: 1\nsteps:\n  - {select: {names: [fc3]}, method: l1_unstructured, sparsity: 0.5, schedule: {unit: step, start: 50000, end: 200000}}\n"
    )
    pruner = Pruner(make_lenet(), recipe)
    start = time.perf_counter()
    for s in range(2000):
        pruner.step(step=s)
        pruner.has_pending("step")
    assert time.perf_counter() - start < 0.5


def test_a_lottery_ticket_state_is_refused_by_a_recipe_without_lottery_ticket():
    base = "version: 1\nlottery_ticket: LT\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.2, schedule: {start: 0, end: 3}}\n"
    model = LeNet()
    first = Pruner(model, parse_recipe(base.replace("LT", "true")))
    first.step(epoch=0)
    state = first.state_dict()
    with pytest.raises(RecipeError, match="lottery_ticket: false"):
        Pruner(model, parse_recipe(base.replace("LT", "false")), state=state)


def test_a_state_saved_under_another_seed_is_refused():
    base = "version: 1\nseed: SEED\nsteps:\n  - {select: {types: [Linear]}, method: random_unstructured, amount: 0.2, schedule: {start: 0, end: 3}}\n"
    model = LeNet()
    first = Pruner(model, parse_recipe(base.replace("SEED", "1")))
    first.step(epoch=0)
    state = first.state_dict()
    Pruner(LeNet(), parse_recipe(base.replace("SEED", "1")), state=state)  # the same recipe resumes
    with pytest.raises(RecipeError, match="seeds differ"):
        Pruner(LeNet(), parse_recipe(base.replace("SEED", "2")), state=state)


def test_a_deterministic_recipe_resumes_whatever_its_seed_and_old_digests_are_accepted():
    base = "version: 1\nseed: SEED\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.2, schedule: {start: 0, end: 3}}\n"
    first = Pruner(LeNet(), parse_recipe(base.replace("SEED", "1")))
    first.step(epoch=0)
    state = first.state_dict()
    Pruner(LeNet(), parse_recipe(base.replace("SEED", "2")), state=state)  # L1 draws nothing: the seed does not matter
    state["schedule_digest"] = first._digest(seeds=False)  # as states saved before seeds counted carry
    Pruner(LeNet(), parse_recipe(base.replace("SEED", "1")), state=state)


def _two_linears(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))


def test_pruner_then_checkpoint_then_state_keeps_the_checkpoints_masks():
    """The model's checkpoint copied into the tensors the Pruner just pruned (same objects): kept."""
    recipe = parse_recipe(
        "version: 1\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, sparsity: 0.5}\n"
        "  - {name: later, select: {types: [Linear]}, method: l1_unstructured, sparsity: 0.75, schedule: {start: 5, end: 5}}\n"
    )
    saved = _two_linears(0)
    pruner = Pruner(saved, recipe)
    checkpoint = {k: v.clone() for k, v in saved.state_dict().items()}
    state = pruner.state_dict()
    model = _two_linears(1)
    resumed = Pruner(model, recipe)
    load_pruned_state_dict(model, checkpoint)
    resumed.load_state_dict(state)
    assert model.state_dict().keys() == checkpoint.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in checkpoint.items())


def test_checkpoint_then_pruner_then_state_does_not_prune_a_finalized_model_twice():
    recipe = parse_recipe("version: 1\nfinalize: true\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n")
    saved = _two_linears(0)
    pruner = Pruner(saved, recipe)
    with torch.no_grad():
        saved[0].weight.add_(torch.randn(8, 8) * 0.01)  # training after finalize fills the zeros in
    checkpoint = {k: v.clone() for k, v in saved.state_dict().items()}
    model = _two_linears(1)
    load_pruned_state_dict(model, checkpoint)
    resumed = Pruner(model, recipe)
    resumed.load_state_dict(pruner.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in checkpoint.items())


def test_a_train_mode_forward_between_pruner_and_state_does_not_count_as_a_loaded_checkpoint():
    """BatchNorm's running statistics are written in place by a training forward pass: the
    model's checkpoint was still loaded before the Pruner, so its re-run steps are undone."""
    recipe = parse_recipe(
        "version: 1\nsteps:\n  - {select: {types: [Conv2d, BatchNorm2d]}, method: l1_unstructured, amount: 0.5}\n"
        "  - {name: later, select: {types: [Conv2d]}, method: l1_unstructured, sparsity: 0.9, schedule: {start: 5, end: 5}}\n"
    )

    def net(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))

    saved = net(0)
    state = Pruner(saved, recipe).state_dict()
    checkpoint = {k: v.clone() for k, v in saved.state_dict().items()}
    model = net(1)
    load_pruned_state_dict(model, checkpoint)
    pruner = Pruner(model, recipe)
    model.train()
    model(torch.randn(2, 3, 8, 8))
    pruner.load_state_dict(state)
    masks = {k: int((v == 0).sum()) for k, v in model.state_dict().items() if k.endswith("_mask")}
    assert masks == {k: int((v == 0).sum()) for k, v in checkpoint.items() if k.endswith("_mask")}
