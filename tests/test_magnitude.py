"""The magnitude select gives torch's own masks: many shapes and dtypes, ties, chains, empty tensors,
big groups (sampled bracket, exact fallback), small tensors packed together, worker threads."""

from __future__ import annotations

import copy
import json
import struct
import subprocess
import sys

import pytest
import torch
import torch.nn.utils.prune as prune
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunerecipe import apply_recipe, parse_recipe
from prunerecipe import magnitude as fp
from prunerecipe.magnitude import cuts as sel
from prunerecipe.magnitude import masks, scan, workers
from prunerecipe.magnitude import pieces as pcs
from prunerecipe.torchprune import kept_entries

from .conftest import assert_same_pruning, make_lenet

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(0,), (1,), (7,), (5, 0), (33, 17), (4, 3, 5, 5), (300, 257)]


def holder(t: torch.Tensor) -> nn.Module:
    m = nn.Module()
    m.weight = nn.Parameter(t.clone())
    return m


def pruned_count(m: nn.Module) -> int:
    return int((m.weight_mask == 0).sum())


def has_ties(t: torch.Tensor) -> bool:
    a = t.abs().reshape(-1)
    return a.unique().numel() != a.numel()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("amount", [0, 0.0, 0.3, 0.5, 1.0, 1])
def test_local_l1_equals_torch_then_chains(dtype, shape, amount):
    torch.manual_seed(hash((str(dtype), shape)) % 1000)
    t = torch.randn(shape).to(dtype)
    if isinstance(amount, int) and amount > t.numel():
        pytest.skip("torch refuses it too")
    ours, theirs = holder(t), holder(t)
    prune.l1_unstructured(theirs, "weight", amount=amount)
    fp.l1_local(ours, "weight", amount)
    assert ours.weight_mask.dtype == theirs.weight_mask.dtype and ours.weight_mask.shape == theirs.weight_mask.shape
    if has_ties(t):
        assert pruned_count(ours) == pruned_count(theirs)
    else:
        assert torch.equal(ours.weight_mask, theirs.weight_mask)
    # a second round only ranks what is still unpruned
    prune.l1_unstructured(theirs, "weight", amount=0.4)
    fp.l1_local(ours, "weight", 0.4)
    assert pruned_count(ours) == pruned_count(theirs)
    if not has_ties(t):
        assert torch.equal(ours.weight_mask, theirs.weight_mask)
        assert torch.equal(ours.weight, theirs.weight)
    assert [type(h) for h in ours._forward_pre_hooks.values()] == [type(h) for h in theirs._forward_pre_hooks.values()]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_global_l1_equals_torch_over_mixed_shapes_and_prior_masks(dtype):
    torch.manual_seed(3)
    tensors = [torch.randn(s).to(dtype) for s in [(50, 30), (30,), (4, 3, 3, 3), (0, 4), (20, 5)]]
    ours, theirs = [holder(t) for t in tensors], [holder(t) for t in tensors]
    prune.random_unstructured(theirs[0], "weight", amount=0.5)
    ours[0].weight_mask = None  # replaced below by the same random mask
    del ours[0].weight_mask
    prune.custom_from_mask(ours[0], "weight", theirs[0].weight_mask.clone())
    prune.global_unstructured([(m, "weight") for m in theirs], pruning_method=prune.L1Unstructured, amount=0.6)
    fp.l1_global([(m, "weight") for m in ours], 0.6)
    total = sum(pruned_count(m) for m in ours)
    assert total == sum(pruned_count(m) for m in theirs)
    if not any(has_ties(t) for t in tensors) or dtype in (torch.float32, torch.float64):
        for a, b in zip(ours, theirs):
            assert torch.equal(a.weight_mask, b.weight_mask)
    assert all(type(list(m._forward_pre_hooks.values())[-1]) in (prune.CustomFromMask, prune.PruningContainer) for m in ours)


def test_ties_in_small_tensors_are_broken_by_torch_itself():
    t = torch.tensor([0.5, -0.5, 0.5, 0.1, 0.5, 0.5, -0.5, 0.9])
    ours, theirs = holder(t), holder(t)
    fp.l1_local(ours, "weight", 4)
    prune.l1_unstructured(theirs, "weight", amount=4)
    assert torch.equal(ours.weight_mask, theirs.weight_mask)
    assert type(next(iter(ours._forward_pre_hooks.values()))) is prune.L1Unstructured


def test_ties_in_large_tensors_prune_exactly_the_requested_count_earliest_first(monkeypatch):
    monkeypatch.setattr(masks, "EXACT_TIES_UP_TO", 0)  # as if the tensor were large
    t = torch.tensor([0.5, -0.5, 0.5, 0.1, 0.5, 0.5, -0.5, 0.9])
    m = holder(t)
    fp.l1_local(m, "weight", 4)  # 0.1 and then three of the six 0.5s
    assert m.weight_mask.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    same = holder(torch.full((10, 10), 0.25))
    fp.l1_local(same, "weight", 0.37)
    assert pruned_count(same) == 37 and m.weight_mask.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_ties_across_chunks_prune_the_earliest_in_masks_and_folds(dtype, scope, monkeypatch):
    monkeypatch.setattr(masks, "EXACT_TIES_UP_TO", 0)  # as if the tensors were large (torch picks below it)
    # A few levels only, so the cut's level holds entries in every chunk: the tie quota runs
    # across chunks, written in place of the masks and in the fold (finalize's values * keep)
    n = 3 * workers.CHUNK + 5
    levels = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=dtype)
    values = levels[torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(5))]
    values = torch.where(torch.arange(n) % 3 == 0, -values, values)
    params = [holder(values), holder(values.flip(0))]
    k = n // 3  # inside the 0.5 level
    if scope == "local":
        fp.l1_local_many([(m, "weight", k) for m in params])
        expected = [_earliest_k(m.weight_orig, k) for m in params]
    else:
        fp.l1_global([(m, "weight") for m in params], 2 * k)
        both = _earliest_k(torch.cat([m.weight_orig.view(-1) for m in params]), 2 * k)
        expected = [both[:n], both[n:]]
    for m, keep in zip(params, expected):
        assert torch.equal(m.weight_mask.view(-1), keep.to(dtype))
    # the fold gives values * keep for the same cut, bit for bit
    piece = pcs.Piece(values)
    (cut,) = sel.select([([piece], k)])
    out = torch.empty_like(values)
    masks.fold_into(piece, cut, 0, out)
    assert torch.equal(out, values * _earliest_k(values, k).to(dtype))


def _earliest_k(t: torch.Tensor, k: int) -> torch.Tensor:
    """1 to keep / 0 to prune: the k smallest magnitudes, ties broken by position."""
    order = torch.sort(t.abs().float().view(-1), stable=True).indices
    keep = torch.ones(t.numel(), dtype=torch.bool)
    keep[order[:k]] = False
    return keep


def test_a_cut_among_the_nans_prunes_every_finite_entry_even_in_all_finite_chunks():
    # NaN ranks above everything (as in topk): a cut that falls among them prunes all finite
    # entries; a chunk holding finite values only used to be ranked with a NaN floor (kept whole)
    n = 2**20 + 1
    w = torch.full((n,), float("nan"))
    w[: 2**18] = torch.linspace(0.1, 1.0, 2**18)
    ours, theirs = holder(w), holder(w)
    fp.l1_local(ours, "weight", n - 5)
    prune.l1_unstructured(theirs, "weight", amount=n - 5)
    assert int((ours.weight_mask == 0).sum()) == n - 5 == int((theirs.weight_mask == 0).sum())
    assert int(ours.weight_mask[: 2**18].sum()) == 0
    finite, nans = holder(torch.linspace(0.1, 1.0, 2**18)), holder(torch.full((2**20,), float("nan")))
    fp.l1_global([(finite, "weight"), (nans, "weight")], 2**18 + 10)
    assert int(finite.weight_mask.sum()) == 0 and int((nans.weight_mask == 0).sum()) == 10


@pytest.mark.parametrize("scope", ["local", "global"])
def test_ties_in_small_non_contiguous_weights_are_left_to_torch_on_a_contiguous_copy(scope):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    with torch.no_grad():
        conv.weight.copy_(torch.randint(-2, 3, conv.weight.shape).float())  # few levels: ties at the cut
    ref = nn.Conv2d(4, 8, 3)
    ref.load_state_dict(conv.state_dict())
    recipe = "version: 1\nsteps:\n  - {select: {types: [Conv2d]}, method: l1_unstructured, amount: 0.5, scope: " + scope + "}\n"
    apply_recipe(conv, parse_recipe(recipe))
    # torch's own functions fail on channels_last (view(-1)); on the same weights made contiguous:
    if scope == "local":
        prune.l1_unstructured(ref, "weight", amount=0.5)
    else:
        prune.global_unstructured([(ref, "weight")], pruning_method=prune.L1Unstructured, amount=0.5)
    assert torch.equal(conv.weight_mask, ref.weight_mask)


def test_arena_lends_one_whole_tensor_per_worker_or_splits_the_largest():
    masks_ = [torch.empty(1000), torch.empty(4000), torch.empty(2000)]
    whole = workers.Arena(masks_, 2)
    assert [r[0].numel() for r in whole.regions] == [16000, 8000]  # bytes: the two largest
    split = workers.Arena(masks_[:1], 2)
    assert [r[0].numel() for r in split.regions] == [1984, 1984]  # halves, 64-byte aligned
    assert workers.Arena([], 2).regions == [] and workers.Arena([torch.empty(0)], 1).regions == []
    scratch = whole.scratch(0)
    buf = workers.buffer(scratch, "x", 10, torch.int64, "cpu", least=10)
    assert buf.data_ptr() == masks_[1].data_ptr()  # carved from the lent tensor
    room = workers.carve(scratch, 100, "cpu")
    assert room is not None and room.numel() == 100
    assert room.data_ptr() == masks_[1].data_ptr() + 128  # after the buffer's 80 bytes, 64-byte aligned
    assert workers.carve(scratch, 15000, "cpu") is not None  # the rest of the first region
    spare = workers.carve(scratch, 3000, "cpu")  # no room left there: the spare tensor, whole
    assert spare is not None and spare.data_ptr() == masks_[0].data_ptr() and scratch["arena"][0].numel() == 4000
    assert workers.carve(scratch, 16000, "cpu") is None  # no room anywhere for that
    assert workers.carve({}, 8, "cpu") is None  # nothing lent
    assert workers.carve(split.scratch(1), 1984, "cpu") is not None and workers.carve(split.scratch(1), 1985, "cpu") is None  # no spares


def test_found_candidates_fill_blocks_in_order_carved_from_the_arena_else_allocated():
    lent = torch.empty(1 << 20)  # 4 MiB
    scratch = workers.Arena([lent], 1).scratch(0)
    found = scan.Found(scratch, torch.int32, torch.device("cpu"))
    found.add(torch.arange(5, dtype=torch.int16), 3)
    found.add(torch.tensor([7, 8], dtype=torch.int16), torch.tensor([4, 5]))
    found.add(torch.zeros(0, dtype=torch.int16), 9)  # nothing: no block
    big = torch.arange(scan.Found.BLOCK + 1, dtype=torch.int32)
    found.add(big, 6)  # does not fit what is left: a block of its own
    assert len(found.blocks) == 2
    (k1, o1, u1), (k2, o2, u2) = found.blocks
    assert k1[: u1[0]].tolist() == [0, 1, 2, 3, 4, 7, 8] and o1[: u1[0]].tolist() == [3] * 5 + [4, 5]
    assert torch.equal(k2[: u2[0]], big) and bool((o2[: u2[0]] == 6).all())
    start, end = lent.data_ptr(), lent.data_ptr() + lent.numel() * 4
    assert all(start <= t.data_ptr() < end for t in (k1, o1, k2, o2))  # carved from the lent tensor
    alone = scan.Found({}, torch.int64, torch.device("cpu"))  # nothing lent: allocated
    alone.add(torch.tensor([1, 2], dtype=torch.int16), 0)
    assert alone.blocks[0][0].dtype == torch.int64 and alone.blocks[0][0][:2].tolist() == [1, 2]


@pytest.mark.parametrize("odd", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("k", [300_000, 1_000])  # a bracket inside the data; one from key 0 (half the data is 0)
@pytest.mark.parametrize("packed", [False, True])  # big pieces, chunk by chunk; small ones packed together
def test_the_sampled_scan_sends_nan_and_inf_to_the_exact_path(odd, k, packed):
    torch.manual_seed(11)
    data = torch.randn(600_000)
    if k == 1_000:
        data[::2] = 0
    data[123_457] = float(odd)
    pieces = [fp.Piece(t) for t in (data.split(1_000) if packed else data.split(300_000))]
    (cut,) = fp.select([(pieces, k)], count_zeros=True)
    assert not cut.finite and cut == sel._direct(pieces, k)
    finite = [fp.Piece(p.values.nan_to_num(0.0, 0.0, 0.0)) for p in pieces]
    (cut,) = fp.select([(finite, k)], count_zeros=True)
    assert cut.finite and cut == sel._direct(finite, k)


def test_nan_ranks_above_every_number_as_in_topk():
    t = torch.tensor([float("nan"), 1.0, -3.0, float("inf"), 0.5])
    ours, theirs = holder(t), holder(t)
    prune.l1_unstructured(theirs, "weight", amount=4)
    fp.l1_local(ours, "weight", 4)
    assert torch.equal(ours.weight_mask, theirs.weight_mask)


def test_channels_last_and_non_contiguous_weights():
    conv = nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    ref = nn.Conv2d(8, 16, 3)
    ref.load_state_dict(conv.state_dict())
    fp.l1_local(conv, "weight", 0.5)
    prune.l1_unstructured(ref, "weight", amount=0.5)
    assert torch.equal(conv.weight_mask, ref.weight_mask)


def test_many_small_tensors_are_batched_and_exact():
    torch.manual_seed(0)
    ours = nn.ModuleList(nn.Linear(4, 4) for _ in range(700))
    theirs = copy.deepcopy(ours)
    fp.l1_global([(m, "weight") for m in ours], 0.55)
    prune.global_unstructured([(m, "weight") for m in theirs], pruning_method=prune.L1Unstructured, amount=0.55)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.weight_mask, b.weight_mask)


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(finite32, min_size=1, max_size=64), fraction=st.floats(0, 1), second=st.floats(0, 1))
def test_select_matches_sorting_on_arbitrary_floats(values, fraction, second):
    t = torch.tensor(values, dtype=torch.float32)
    ours, theirs = holder(t), holder(t)
    prune.l1_unstructured(theirs, "weight", amount=fraction)
    fp.l1_local(ours, "weight", fraction)
    assert pruned_count(ours) == pruned_count(theirs)
    # every pruned magnitude is <= every kept one
    pruned, kept = t.abs()[ours.weight_mask == 0], t.abs()[ours.weight_mask == 1]
    if pruned.numel() and kept.numel():
        assert pruned.max() <= kept.min()
    prune.l1_unstructured(theirs, "weight", amount=second)
    fp.l1_local(ours, "weight", second)
    assert pruned_count(ours) == pruned_count(theirs)


def test_keys_order_like_values_across_the_whole_float_range():
    values = torch.tensor([0.0, 1e-45, 1e-38, 1e-10, 0.5, 1.0, 3e38, float("inf")])
    keys = torch.bitwise_and(values.view(torch.int32), 0x7FFFFFFF)
    assert torch.equal(torch.sort(keys).values, keys)
    assert struct.unpack("<i", struct.pack("<f", 0.5))[0] == int(keys[4])


# --- the folded one-shot path (finalize without re-parametrization) -----------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_folded_finalize_equals_prune_then_remove(dtype):
    recipe = parse_recipe("""
version: 1
finalize: true
steps:
  - {select: {types: [Conv2d]}, params: [weight, bias], method: l1_unstructured, amount: 0.3}
  - {select: {names: [fc1, fc2]}, method: l1_unstructured, sparsity: 0.6, scope: global}
  - {select: {names: [fc3]}, params: [bias, weight], method: l1_unstructured, amount: 0}
""")
    ours, theirs = make_lenet().to(dtype), make_lenet().to(dtype)
    ids = {n: id(p) for n, p in ours.named_parameters()}
    report = apply_recipe(ours, recipe)
    for m in (theirs.conv1, theirs.conv2):
        prune.l1_unstructured(m, "weight", amount=0.3)
        prune.l1_unstructured(m, "bias", amount=0.3)
    total = theirs.fc1.weight.numel() + theirs.fc2.weight.numel()
    prune.global_unstructured([(theirs.fc1, "weight"), (theirs.fc2, "weight")], pruning_method=prune.L1Unstructured, amount=round(0.6 * total))
    prune.l1_unstructured(theirs.fc3, "bias", amount=0)
    prune.l1_unstructured(theirs.fc3, "weight", amount=0)
    for module in theirs.modules():  # remove in the order the pruned parameters were registered
        for key in [k for k in module._parameters if k.endswith("_orig")]:
            prune.remove(module, key[: -len("_orig")])
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert {n: id(p) for n, p in ours.named_parameters()} == ids  # same Parameter objects
    if dtype in (torch.float32, torch.float64):
        for key, value in ours.state_dict().items():
            # bit for bit: masked negatives are -0.0 in both
            assert torch.equal(
                value.view(torch.int32 if dtype == torch.float32 else torch.int64),
                theirs.state_dict()[key].view(value.view(torch.int32 if dtype == torch.float32 else torch.int64).dtype),
            ), key
    else:  # half precision has many ties: a global cut may split them differently, never count them differently
        zeros = lambda sd: sum(int((v == 0).sum()) for v in sd.values())  # noqa: E731
        assert zeros(ours.state_dict()) == zeros(theirs.state_dict())
    assert report.finalized and not any(k.endswith(("_orig", "_mask")) for k in ours.state_dict())
    assert not any(m._forward_pre_hooks for m in ours.modules())


def test_folded_path_is_not_used_when_it_would_differ():
    # a target pruned twice, or a model already pruned, goes through the re-parametrization
    from prunerecipe.oneshot import can_fold as _can_fold
    from prunerecipe.plan import plan_recipe

    twice = parse_recipe(
        "version: 1\nfinalize: true\nsteps:\n  - {select: {names: [fc1]}, method: l1_unstructured, amount: 0.5}\n  - {select: {names: [fc1]}, method: l1_unstructured, amount: 0.5}\n"
    )
    model = make_lenet()
    assert not _can_fold(twice, list(plan_recipe(model, twice).steps), model)
    ours, theirs = make_lenet(), make_lenet()
    apply_recipe(ours, twice)
    prune.l1_unstructured(theirs.fc1, "weight", amount=0.5)
    prune.l1_unstructured(theirs.fc1, "weight", amount=0.5)
    prune.remove(theirs.fc1, "weight")
    assert_same_pruning(ours, theirs)


def test_global_over_masks_with_values_other_than_0_and_1_matches_torch():
    # torch multiplies the old mask in twice on the global path (found in review)
    t = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]])
    ours, theirs = holder(t), holder(t)
    old = torch.tensor([[0.5, 1, 1, 0, 1]])
    prune.custom_from_mask(ours, "weight", old)
    prune.custom_from_mask(theirs, "weight", old)
    prune.global_unstructured([(theirs, "weight")], pruning_method=prune.L1Unstructured, amount=1)
    fp.l1_global([(ours, "weight")], 1)
    assert torch.equal(ours.weight_mask, theirs.weight_mask)


def test_many_exact_zeros_at_the_cut_are_counted_exactly():
    w = torch.zeros(3_000_000)
    w[:1_000_000] = torch.randn(1_000_000)
    m = holder(w.view(3000, 1000))
    fp.l1_local(m, "weight", 0.5)
    assert pruned_count(m) == 1_500_000
    assert bool((m.weight_mask.view(-1)[1_000_000:] == 0).sum() >= 1_500_000 - 1_000_000)


def test_in_place_fold_is_not_used_on_tensors_it_could_fail_on():
    from prunerecipe import apply_recipe, parse_recipe

    recipe = parse_recipe("version: 1\nfinalize: true\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n")
    from prunerecipe import ApplyError

    with torch.inference_mode():
        frozen = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(ApplyError, match="0.weight is an inference tensor"):  # torch cannot prune these either
        apply_recipe(frozen, recipe)
    assert not any(prune.is_pruned(m) for m in frozen)
    shared = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    shared[1].weight = nn.Parameter(torch.randn(1, 4).expand(4, 4))  # overlapping memory
    apply_recipe(shared, recipe)
    assert int((shared[0].weight == 0).sum()) == 8


def test_a_schedule_with_too_many_events_is_a_load_error():
    from prunerecipe import RecipeError, parse_recipe

    with pytest.raises(RecipeError, match="this schedule has 1000000001 pruning events; the limit is 1000000"):
        parse_recipe(
            "version: 1\nsteps:\n  - {select: {}, method: l1_unstructured, sparsity: 0.5, schedule: {unit: step, start: 0, end: 1000000000}}\n"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("amount", [0.1, 0.5, 0.9])
def test_report_counts_known_without_counting_equal_a_real_count(dtype, scope, amount, monkeypatch):
    # The fast paths derive the zeros after a first cut from the mask alone; exact zeros in the
    # weights (some below the cut, some above when the cut lands on zero) must not fool them.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(300, 200), nn.Linear(200, 300), nn.Linear(300, 10)).to(dtype)
    with torch.no_grad():
        model[0].weight.view(-1)[::7] = 0  # 1/7 zeros: amount 0.1 cuts inside them, the others above
        model[2].weight.zero_()
    recipe = parse_recipe(
        "version: 1\nsteps:\n"
        f"  - {{select: {{types: [Linear]}}, method: l1_unstructured, amount: {amount}, scope: {scope}}}\n"
        "  - {select: {names: ['1']}, method: l1_unstructured, amount: 0.2}\n"  # a chained second cut
    )
    import prunerecipe.report as report_module

    counted = []
    real = report_module.count_zeros
    monkeypatch.setattr(report_module, "count_zeros", lambda m, p, s=None: counted.append(m) or real(m, p, s))
    report = apply_recipe(model, recipe)
    for row in report.targets:
        module = model.get_submodule(row.name.rsplit(".", 1)[0])
        assert row.zeros_after == int((module.weight == 0).sum()), row.name
    if dtype == torch.float32 and amount == 0.5:
        # Counted again: the chained layer, and (local) the all-zero one, whose ties torch broke.
        # (The counts before come from the preflight scan.)
        assert counted == ([model[1], model[2]] if scope == "local" else [model[1]])


def test_kept_entries_is_exact_beyond_float32_integer_range():
    mask = torch.ones((1 << 24) + 5)
    mask[::3] = 0
    assert kept_entries(mask) == int(torch.count_nonzero(mask))
    half = torch.ones(70_000, dtype=torch.float16)  # half precision cannot even hold the count
    half[:3] = 0
    assert kept_entries(half) == 69_997


# --- the select itself, against a sort --------------------------------------------------------


def sorted_cut(pieces: list[fp.Piece], k: int) -> int:
    """The k-th smallest eligible key, by sorting (the reference)."""
    keys = []
    for p in pieces:
        int_dtype, clear = pcs.KEY_DTYPES[p.values.dtype]
        key = torch.bitwise_and(p.values.reshape(-1).view(int_dtype), clear).to(torch.int64)
        if p.eligible is not None:
            key = key[p.eligible.reshape(-1) == 1]
        keys.append(key)
    return int(torch.sort(torch.cat(keys)).values[k - 1])


def check_cut(pieces: list[fp.Piece], k: int, cut: fp.Threshold) -> None:
    t = sorted_cut(pieces, k)
    assert sum(cut.pruned) == k
    assert cut.key in (t, t + 1)  # t + 1: every tie of t pruned (a plain cut)
    if cut.quotas is not None:
        assert cut.key == t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fraction", [0.001, 0.3, 0.5, 0.97])
def test_big_groups_cut_exactly_where_a_sort_does(dtype, fraction):
    torch.manual_seed(7)
    rows = torch.rand(700, 1) * 10  # rows of very different scales: a hard case for a sample
    pieces = [fp.Piece((torch.randn(700, 600) * rows).to(dtype)), fp.Piece(torch.randn(90_000).to(dtype)), fp.Piece(torch.randn(33).to(dtype))]
    k = round(fraction * sum(p.numel for p in pieces))
    (cut,) = fp.select([(pieces, k)])
    check_cut(pieces, k, cut)


def test_a_bracket_that_misses_falls_back_to_the_exact_histogram(monkeypatch):
    torch.manual_seed(1)
    pieces = [fp.Piece(torch.randn(400_000)), fp.Piece(torch.randn(500, 700))]
    k = 300_000
    for wrong in [(-1, 0), (0x7F000000, 0x7F000001), (0x3F000000, 0x3F000000 + 1)]:  # below, above, around nothing
        monkeypatch.setattr(sel, "_sampled_bracket", lambda pieces, k, wrong=wrong: wrong)
        (cut,) = fp.select([(pieces, k)])
        check_cut(pieces, k, cut)


def test_eligible_entries_only_and_ties_split_earliest_first():
    torch.manual_seed(2)
    values = torch.randn(600_000).bfloat16()  # bf16: many ties at any cut
    eligible = torch.rand(600_000) < 0.7
    pieces = [fp.Piece(values, eligible.float()), fp.Piece(torch.randn(300_000).bfloat16())]
    k = 400_000
    (cut,) = fp.select([(pieces, k)])
    check_cut(pieces, k, cut)
    assert cut.quotas is not None  # ties at the cut: some pruned, earliest first
    keep = torch.empty(600_000, dtype=torch.bfloat16)
    masks.write_keep(pieces[0], cut, 0, keep)
    pruned = (keep == 0) & eligible
    assert not bool(((keep == 0) & ~eligible).any())  # ineligible entries are never newly pruned
    ties = torch.bitwise_and(values.view(torch.int16), 0x7FFF) == cut.key
    pruned_ties = torch.nonzero(pruned & ties).view(-1)
    kept_ties = torch.nonzero(~pruned & ties & eligible).view(-1)
    if pruned_ties.numel() and kept_ties.numel():
        assert int(pruned_ties.max()) < int(kept_ties.min())  # earliest first


def test_thousands_of_small_tensors_are_packed_into_chunks():
    torch.manual_seed(5)
    tensors = [torch.randn(int(torch.randint(1, 300, ()))) for _ in range(3000)]
    pieces = [fp.Piece(t) for t in tensors]
    jobs = pcs.jobs_for(pieces)
    assert len(jobs) < 10 and sorted(i for job in jobs for i, _, _ in job) == list(range(3000))
    total = sum(p.numel for p in pieces)
    monkeypatch_free = sel.DIRECT_UP_TO
    try:
        sel.DIRECT_UP_TO = 1000  # force the sampled path on this small group
        (cut,) = fp.select([(pieces, total // 2)])
    finally:
        sel.DIRECT_UP_TO = monkeypatch_free
    check_cut(pieces, total // 2, cut)


def test_jobs_are_made_on_demand_and_number_their_segments():
    chunk = workers.CHUNK
    sizes = [chunk * 2 + 5, 10, 0, 20, chunk // 4, 7, chunk - 3, 3]
    jobs = pcs.jobs_for([fp.Piece(torch.empty(n)) for n in sizes])
    expected = [
        [(0, 0, chunk)],  # a big piece (a quarter chunk or more): chunk by chunk
        [(0, chunk, 2 * chunk)],
        [(0, 2 * chunk, 2 * chunk + 5)],
        [(4, 0, chunk // 4)],
        [(6, 0, chunk - 3)],
        [(1, 0, 10), (2, 0, 0), (3, 0, 20), (5, 0, 7), (7, 0, 3)],  # small ones packed together, last
    ]
    assert len(jobs) == len(expected) and list(jobs) == expected
    assert [jobs.first_segment(j) for j in range(len(jobs))] == [0, 1, 2, 3, 4, 5]
    assert jobs.segments == 10 and jobs.segment_pieces() == [0, 0, 0, 4, 6, 1, 2, 3, 5, 7]
    with pytest.raises(IndexError):
        jobs[len(jobs)]
    assert len(pcs.jobs_for([fp.Piece(torch.empty(0))])) == 0
    wide = pcs.jobs_for([fp.Piece(torch.empty(n)) for n in sizes], 2 * chunk)  # a scan's jobs: two chunks
    assert list(wide)[:2] == [[(0, 0, 2 * chunk)], [(0, 2 * chunk, 2 * chunk + 5)]] and len(wide) == 4


def test_a_scan_keeps_its_candidates_in_a_few_blocks_not_one_tensor_per_chunk(monkeypatch):
    monkeypatch.setattr(workers, "CHUNK", 4096)
    torch.manual_seed(3)
    pieces = [fp.Piece(torch.randn(150_000)), fp.Piece(torch.randn(60_000, dtype=torch.float64))]
    k = 40_000
    lo, hi = sel._sampled_bracket(pieces[:1], k)
    scans = [scan.Scan(0, pieces[:1], k, lo, hi, count_zeros=True), scan.Scan(1, pieces[1:], 1000, *sel._sampled_bracket(pieces[1:], 1000))]
    assert len(scans[0].jobs) > 15  # jobs of two chunks
    scan.scan_all(scans, arena=[torch.empty(1 << 20)])
    assert len(scans[0].found) <= 4 and len(scans[1].found) <= 4  # per thread's block, not per job
    assert scans[0].finish() == sel._direct(pieces[:1], k) and scans[1].finish() == sel._direct(pieces[1:], 1000)


def test_more_pieces_than_a_16_bit_owner_number_holds():
    torch.manual_seed(6)
    pieces = [fp.Piece(t) for t in torch.randn(33_000, 8).unbind(0)]  # 264,000 entries: the sampled path
    (cut,) = fp.select([(pieces, 100_000)])
    check_cut(pieces, 100_000, cut)


def test_census_counts_zeros_and_non_finite_entries():
    a = torch.tensor([0.0, -0.0, 1.0, float("nan"), float("inf"), 2.0])
    b = torch.zeros(300_000)
    b[::3] = 1
    c = torch.tensor([0.0, 5.0], dtype=torch.float16)
    assert fp.census([a, b, c]) == [(2, 2), (200_000, 0), (1, 0)]


def test_byte_positions_and_histogram_pick():
    flags = torch.zeros(1003, dtype=torch.uint8)
    at = [0, 7, 8, 500, 1001, 1002]
    flags[at] = 1
    assert pcs.positions(flags).tolist() == at
    keys = torch.randint(0, 1 << 30, (700_000,), dtype=torch.int64)
    for r in (1, 12345, 700_000):
        assert scan.kth(keys, r) == int(torch.sort(keys).values[r - 1])


def test_workers_share_the_items_restore_the_thread_count_and_pass_errors_on():
    before = torch.get_num_threads()
    seen = []
    workers.run(lambda i, state: seen.append(i), 50, "cpu", lambda index: None)
    assert sorted(seen) == list(range(50)) and torch.get_num_threads() == before

    def boom(i, state):
        if i == 3:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        workers.run(boom, 20, "cpu")
    assert torch.get_num_threads() == before


def test_the_calling_threads_small_ops_run_single_threaded_and_the_setting_comes_back(monkeypatch):
    # On a busy CPU, every small op split over OpenMP threads waits for a descheduled one: the
    # samples and the picks (a few ops per tensor) run single-threaded, the scan on the workers.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with workers.inline_ops("cpu"):
            assert torch.get_num_threads() == (1 if workers._openmp() else 2)
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError), workers.inline_ops("cpu"):
            raise ValueError
        assert torch.get_num_threads() == 2
        with workers.inline_ops("meta"):
            assert torch.get_num_threads() == 2
        seen = {}
        for name in ("_sampled_bracket", "scan_all"):
            real = getattr(sel, name)

            def spy(*args, real=real, name=name):
                seen[name] = torch.get_num_threads()
                return real(*args)

            monkeypatch.setattr(sel, name, spy)
        torch.manual_seed(2)
        piece = fp.Piece(torch.randn(3 * workers.CHUNK))
        assert sel.select([([piece], 1000)]) == [sel._direct([piece], 1000)]
        assert seen == {"_sampled_bracket": 1 if workers._openmp() else 2, "scan_all": 2} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_worker_threads_run_their_ops_single_threaded():
    # torch sets a thread's OpenMP thread count from its global setting at the thread's first
    # split op: a worker that set 1 before that ran every op on a team of all cores (review finding).
    code = (
        "import threading, torch\n"
        "from prunerecipe.magnitude import workers\n"
        "torch.set_num_threads(2)\n"
        "seen = set()\n"
        "def job(i, state):\n"
        "    torch.ones(1 << 20).add_(1)\n"
        "    seen.add((threading.current_thread().name, torch.get_num_threads()))\n"
        "workers.run(job, 64, 'cpu')\n"
        "print(json.dumps([sorted({n for _, n in seen}), len(seen), torch.get_num_threads()]))\n"
    )
    if not workers._openmp():
        pytest.skip("not torch's OpenMP backend: the work runs in the calling thread")
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, check=True).stdout
    counts, threads, after = json.loads(out)
    assert counts == [1] and threads >= 1 and after == 2


def test_a_process_that_exits_right_after_a_parallel_run_exits_cleanly():
    # A worker that freed its scratch tensors after telling the caller it was done could still be
    # freeing them while the interpreter exited: torch lets go of the GIL to free a tensor, the
    # daemon thread was then killed inside torch, and the process aborted (exit status 134).
    code = (
        "import torch\n"
        "from prunerecipe.magnitude import workers\n"
        "torch.set_num_threads(2)\n"
        "workers.run(lambda i, state: None, 2, 'cpu', lambda index: {'big': torch.ones(1 << 24)})\n"
    )
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_the_worker_pool_stops_and_is_made_again():
    pool = workers._get_pool(2)
    pool.stop()
    assert pool.stopping and not any(t.is_alive() for t in pool.threads)
    seen = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        workers.run(lambda i, state: seen.append(i), 20, "cpu")
    finally:
        torch.set_num_threads(before)
    assert sorted(seen) == list(range(20)) and workers._pool is not pool


def test_report_counts_stay_true_when_subnormals_flush_to_zero():
    # With flush-to-zero, subnormal weights compare equal to 0: a cut among them must not be
    # turned into "every survivor is nonzero" (review finding).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 100))
    with torch.no_grad():
        model[0].weight[:50] = 0
        model[0].weight[50, :20] = 1e-39  # subnormal in fp32
    recipe = parse_recipe("version: 1\nsteps:\n  - {select: {names: ['0']}, method: l1_unstructured, amount: 5000}\n")
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals to zero")
    try:
        report = apply_recipe(model, recipe)
        actual = int((model[0].weight == 0).sum())
    finally:
        torch.set_flush_denormal(False)
    assert actual == 5020 and report.targets[0].zeros_after == actual


@pytest.mark.parametrize("scope", ["local", "global"])
def test_big_tensors_fold_and_mask_on_worker_threads_like_torch(scope):
    # several chunks per tensor: the worker threads write, under the caller's no_grad
    torch.manual_seed(11)
    big = nn.Sequential(nn.Linear(700, 900), nn.Linear(900, 400))
    theirs = copy.deepcopy(big)
    recipe = parse_recipe(
        f"version: 1\nfinalize: true\nsteps:\n  - {{select: {{types: [Linear]}}, method: l1_unstructured, amount: 0.4, scope: {scope}}}\n"
    )
    assert workers.worker_count("cpu", 4) == min(torch.get_num_threads(), 4)
    report = apply_recipe(big, recipe)
    params = [(m, "weight") for m in theirs]
    if scope == "global":
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.4)
    else:
        for m, n in params:
            prune.l1_unstructured(m, n, amount=0.4)
    for m, n in params:
        prune.remove(m, n)
    for a, b in zip(big, theirs):
        assert torch.equal(a.weight.view(torch.int32), b.weight.view(torch.int32))  # bit for bit, -0.0 included
        assert a.weight.requires_grad and a.weight.grad_fn is None
    assert report.targets[0].zeros_after == int((big[0].weight == 0).sum())
    masked = nn.Sequential(nn.Linear(700, 900))
    ref = copy.deepcopy(masked)
    fp.l1_local(masked[0], "weight", 0.3)
    prune.l1_unstructured(ref[0], "weight", amount=0.3)
    assert torch.equal(masked[0].weight_mask, ref[0].weight_mask) and masked[0].weight.grad_fn is not None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_histogram_cut_equals_select(dtype):
    """DigitCut (16 bits of the key per pass, for streams and across ranks) gives select's cut:
    the k-th smallest key, ties split earliest first, eligibility respected, all-or-nothing ends."""
    from prunerecipe.magnitude.histogram import DigitCut, find_cut

    g = torch.Generator().manual_seed(3)
    for trial in range(6):
        ts = [torch.randn(int(n), generator=g).to(dtype) for n in torch.randint(1, 4000, (3,), generator=g)]
        if trial % 2:
            ts = [(t * 4).round() / 4 for t in ts]  # heavy ties
        eligible = [None if trial % 3 else (torch.rand(t.shape, generator=g) > 0.3).float() for t in ts]
        pieces = [fp.Piece(t, e) for t, e in zip(ts, eligible)]
        n = sum(p.eligible_count() for p in pieces)
        for k in (0, 1, n // 3, n - 1, n):
            assert find_cut(pieces, k) == sel.select([(pieces, k)])[0], (trial, k)
    cut = DigitCut(dtype, 1, lambda eligible: eligible // 2)  # k from the eligible count, known after the first pass
    while not cut.done:
        cut.add(0, fp.Piece(torch.tensor([0.0, 1.0, -2.0, float("nan")], dtype=dtype)))
        cut.end_pass()
    assert cut.total_eligible == 4 and cut.k == 2 and cut.nonfinite == 1 and cut.zeros == [1]
