"""Pruning across the ranks of a torch.distributed job (gloo on the CPU, 2 and 3 processes):
layer-split ranks rank the union of their targets exactly as one process holding the whole
model would; replicas agree (and a diverged one is a clear error on every rank, never a hang);
random steps draw alike; schedules in the Pruner follow. The ranks run ``tests/dist_cases.py``."""

from __future__ import annotations

import json
import time

import pytest
import torch.multiprocessing as mp

from . import dist_cases

TIMEOUT = 240  # seconds for a whole run; a hang fails the test instead of the suite


def launch(tmp_path, world: int, names: list[str]) -> list[dict]:
    """Run ``names`` on ``world`` spawned ranks; returns each case's results, one dict per rank."""
    context = mp.start_processes(dist_cases.run, args=(world, str(tmp_path), names), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the ranks did not finish within {TIMEOUT} s (a hang?)")
    results = {}
    for name in names:
        per_rank = [json.loads((tmp_path / f"{name}-{rank}.json").read_text()) for rank in range(world)]
        for rank, r in enumerate(per_rank):
            assert "crashed" not in r, f"{name} on rank {rank}:\n{r.get('crashed')}"
        results[name] = per_rank
    return results


def test_a_process_group_without_torch_distributed_is_a_clear_error():
    from prunerecipe import ApplyError, apply_recipe
    from prunerecipe.distributed import resolve_group

    assert resolve_group(None) is None  # not initialized: one process, as always
    with pytest.raises(ApplyError, match="process_group was passed, but torch.distributed is not initialized"):
        apply_recipe(dist_cases.make_model(), dist_cases.recipe(dist_cases.GLOBAL_50), process_group=object())


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("two"), 2, list(dist_cases.CASES))


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("three"), 3, ["split_equals_torch", "split_bf16_ties", "replicas", "split_random"])


@pytest.mark.slow
@pytest.mark.parametrize("world", ["two", "three"])
def test_layer_split_ranks_get_the_whole_models_masks_bit_for_bit(world, request):
    for r in request.getfixturevalue(world)["split_equals_torch"]:
        assert r == {"global": True, "chain": True}


@pytest.mark.slow
@pytest.mark.parametrize("world", ["two", "three"])
def test_bf16_ties_exact_count_ordered_and_pruned_rank_first(world, request):
    for r in request.getfixturevalue(world)["split_bf16_ties"]:
        assert r["ties_at_cut"] > 1  # the case does have ties at the cut
        assert r["count"] and r["ordered"] and r["ties_rank_first"] and r["deterministic"], r


@pytest.mark.slow
@pytest.mark.parametrize("world", ["two", "three"])
def test_replicas_get_identical_masks_equal_to_one_process(world, request):
    for r in request.getfixturevalue(world)["replicas"]:
        assert r == {"identical": True, "equals_single": True}


@pytest.mark.slow
@pytest.mark.parametrize("world", ["two", "three"])
def test_layer_split_random_steps_draw_as_one_process(world, request):
    for r in request.getfixturevalue(world)["split_random"]:
        assert r == {"equals_single": True, "rng_alike": True}


@pytest.mark.slow
def test_errors_are_raised_on_every_rank_and_change_nothing(two):
    for rank, r in enumerate(two["errors"]):
        assert "data-parallel replicas disagree" in r["diverged"] and "2.weight" in r["diverged"], (rank, r["diverged"])
        assert r["unchanged"]
        assert "share some targets of this step but not all" in r["half_shared"] and "1.weight on ranks 0, 1" in r["half_shared"], r["half_shared"]
        assert "NaN" in r["nan"] and ("rank 1 failed" in r["nan"]) == (rank != 1), r["nan"]
        assert "the ranks run different recipes" in r["recipes"]
        assert r["after"] and r.get("alone", True)
        assert "simulated failure inside the cut" in r["in_cut"] and ("rank 1 failed" in r["in_cut"]) == (rank != 1), r["in_cut"]
    assert two["errors"][0]["alone"]
    assert two["errors"][0]["fold_weights"] == two["errors"][1]["fold_weights"]  # one path taken, alike on both


@pytest.mark.slow
def test_pruner_schedules_across_layer_split_ranks(two):
    for r in two["pruner"]:
        assert r == {"epoch0": True, "epoch1": True, "epoch2": True}
