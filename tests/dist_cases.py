"""What each rank of the distributed tests runs (``torch.multiprocessing.spawn`` imports this
module in every child). Each case writes ``<case>-<rank>.json`` into the run's folder; the
tests in ``test_distributed.py`` read them. Expected results are computed in one process,
before the process group exists, with torch's own functions on the whole model."""

from __future__ import annotations

import copy
import json
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.utils.prune as prune
from torch import nn

from prunerecipe import Pruner, apply_recipe, parse_recipe
from prunerecipe.errors import RecipeError

LAYERS = [(64, 48), (48, 40), (40, 32), (32, 24), (24, 16), (16, 8)]


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(a, b) for a, b in LAYERS]).to(dtype)


def owned(i: int, rank: int, world: int) -> bool:
    """Layer-split like a pipeline: rank r holds a contiguous block of layers."""
    return i * world // len(LAYERS) == rank


def split(model: nn.Sequential, rank: int, world: int) -> nn.Sequential:
    """This rank's part: the other layers are replaced by Identity (names stay those of the whole model)."""
    part = copy.deepcopy(model)
    for i in range(len(LAYERS)):
        if not owned(i, rank, world):
            part[i] = nn.Identity()
    return part


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k[: -len("_mask")]: v.detach().clone() for k, v in model.state_dict().items() if k.endswith("_mask")}


def recipe(text: str):
    return parse_recipe("version: 1\nsteps:\n" + text, source="dist.yaml")


GLOBAL_50 = "  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5, scope: global}\n"
CHAIN = (
    "  - {select: {names: ['0']}, method: l1_unstructured, amount: 0.3}\n"
    "  - {select: {types: [Linear]}, method: l1_unstructured, sparsity: 0.6, scope: global}\n"
    "  - {select: {types: [Linear]}, method: l1_unstructured, amount: 500, scope: global}\n"
)
RANDOM = (
    "  - {select: {types: [Linear]}, method: random_unstructured, amount: 0.4}\n"
    "  - {select: {types: [Linear]}, method: random_structured, amount: 0.25, args: {dim: 0}}\n"
    "  - {select: {types: [Linear]}, params: [bias], method: random_unstructured, amount: 0.5, scope: global}\n"
)


def single(model: nn.Module, text: str, rng: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The whole model pruned in this process by torch's own functions, step by step."""
    model = copy.deepcopy(model)
    if rng is not None:
        torch.set_rng_state(rng)
    r = recipe(text)
    for step in r.steps:
        linears = [(m, step.params[0]) for m in model if isinstance(m, nn.Linear)]
        if step.select.names:
            linears = [(model[int(n)], step.params[0]) for n in step.select.names]
        if step.scope == "global":
            if step.sparsity is not None:
                total = sum(getattr(m, p).numel() for m, p in linears)
                done = sum(int((getattr(m, p + "_mask") == 0).sum()) if hasattr(m, p + "_mask") else 0 for m, p in linears)
                amount = round(step.sparsity * total) - done
            else:
                amount = step.amount
            method = prune.L1Unstructured if step.method == "l1_unstructured" else prune.RandomUnstructured
            prune.global_unstructured(linears, pruning_method=method, amount=amount)
        else:
            for m, p in linears:
                if step.method == "l1_unstructured":
                    prune.l1_unstructured(m, p, amount=step.amount)
                elif step.method == "random_unstructured":
                    prune.random_unstructured(m, p, amount=step.amount)
                else:
                    prune.random_structured(m, p, amount=step.amount, dim=step.args["dim"])
    return masks(model)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) <= set(b) and all(torch.equal(a[k], b[k]) for k in a)


def gather_floats(values: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-d tensor, concatenated in rank order (test side only)."""
    world = dist.get_world_size()
    n = torch.tensor([values.numel()])
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    buf = torch.zeros(max(longest, 1), dtype=torch.float32)
    buf[: values.numel()] = values.float()
    bufs = [torch.zeros_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf)
    return torch.cat([b[: int(s.item())] for b, s in zip(bufs, sizes)])


# --- cases ----------------------------------------------------------------------------------


def case_split_equals_torch(rank: int, world: int) -> dict[str, Any]:
    """Layer-split ranks: the union's masks equal global_unstructured on the whole model."""
    out = {}
    whole = make_model(1)
    for name, text in (("global", GLOBAL_50), ("chain", CHAIN)):
        expected = single(whole, text)
        part = split(whole, rank, world)
        apply_recipe(part, recipe(text), process_group=dist.group.WORLD if name == "chain" else None)  # passed, or found
        got = masks(part)
        out[name] = same(got, expected) and len(got) == sum(1 for i in range(len(LAYERS)) if owned(i, rank, world))
    return out


def case_split_bf16_ties(rank: int, world: int) -> dict[str, Any]:
    """bf16 has many ties at the cut: the count is exact, pruned <= kept, ties go rank first."""
    whole = make_model(2, torch.bfloat16)
    part = split(whole, rank, world)
    apply_recipe(part, recipe(GLOBAL_50))
    first = masks(part)
    again = split(whole, rank, world)
    apply_recipe(again, recipe(GLOBAL_50))
    values, kept = [], []
    for i in range(len(LAYERS)):
        if owned(i, rank, world):
            values.append(whole[i].weight.detach().abs().reshape(-1))
            kept.append(first[f"{i}.weight"].reshape(-1))
    w = gather_floats(torch.cat(values))
    k = gather_floats(torch.cat(kept))
    pruned_w, kept_w = w[k == 0], w[k == 1]
    cut = float(pruned_w.max())
    ties = k[w == cut]  # in union order: rank, then parameter order, then index
    first_kept = int((ties == 1).nonzero()[0]) if bool((ties == 1).any()) else ties.numel()
    return {
        "count": int((k == 0).sum()) == round(0.5 * w.numel()),
        "ordered": bool(pruned_w.max() <= kept_w.min()),
        "ties_at_cut": int(ties.numel()),
        "ties_rank_first": bool((ties[:first_kept] == 0).all() and (ties[first_kept:] == 1).all()),
        "deterministic": same(first, masks(again)),
    }


def case_replicas(rank: int, world: int) -> dict[str, Any]:
    """Data-parallel replicas: identical masks on every rank, equal to one process's, even for
    random steps drawn from generators that differed before the call."""
    whole = make_model(3)
    state = torch.get_rng_state()
    expected = single(whole, GLOBAL_50 + RANDOM, rng=state)
    torch.manual_seed(100 + rank)  # the ranks' generators differ ...
    if rank == 0:
        torch.set_rng_state(state)  # ... and rank 0's is the one a single process would have had
    model = copy.deepcopy(whole)
    apply_recipe(model, recipe(GLOBAL_50 + RANDOM))
    got = masks(model)
    digest = torch.cat([v.reshape(-1).float() for _, v in sorted(got.items())])
    everyone = gather_floats(digest).view(world, -1)
    return {"identical": bool((everyone == everyone[0]).all()), "equals_single": same(got, expected) and len(got) == len(expected)}


def case_split_random(rank: int, world: int) -> dict[str, Any]:
    """Layer-split ranks draw random masks as one process holding every layer would."""
    whole = make_model(4)
    torch.manual_seed(7)
    text = RANDOM.split("\n")[0] + "\n" + RANDOM.split("\n")[1] + "\n"
    expected = single(whole, text, rng=torch.get_rng_state())
    torch.manual_seed(7)
    part = split(whole, rank, world)
    apply_recipe(part, recipe(text))
    after = torch.get_rng_state()
    everyone = gather_floats(after.float()).view(world, -1)
    return {"equals_single": same(masks(part), expected), "rng_alike": bool((everyone == everyone[0]).all())}


def _error(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except RecipeError as exc:
        return str(exc)
    return ""


def case_errors(rank: int, world: int) -> dict[str, Any]:
    """Diverged replicas, half-shared targets, NaN on one rank, a recipe that differs: a clear
    error on every rank, and the model unchanged; never a hang."""
    out: dict[str, Any] = {}
    model = make_model(5)
    if rank == world - 1:
        with torch.no_grad():
            model[2].weight[0, 0] += 1.0
    before = copy.deepcopy(model.state_dict())
    out["diverged"] = _error(lambda: apply_recipe(model, recipe(GLOBAL_50)))
    out["unchanged"] = list(model.state_dict()) == list(before) and all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    part = make_model(5)
    if rank == 0:
        part[0] = nn.Identity()  # rank 0 lacks layer 0; the others hold everything
    out["half_shared"] = _error(lambda: apply_recipe(part, recipe(GLOBAL_50)))
    bad = split(make_model(6), rank, world)
    if rank == 1:
        with torch.no_grad():
            next(m for m in bad if isinstance(m, nn.Linear)).weight[0, 0] = float("nan")
    out["nan"] = _error(lambda: apply_recipe(bad, recipe(GLOBAL_50)))
    other = GLOBAL_50 if rank == 0 else GLOBAL_50.replace("0.5", "0.6")
    out["recipes"] = _error(lambda: apply_recipe(split(make_model(6), rank, world), recipe(other)))
    # a rank failing inside the cut, between two all-reduces (out of memory, say): every rank
    # raises, none waits in a collective the failed one never joins
    import prunerecipe.distributed as pd

    original_add = pd.DigitCut.add
    if rank == 1:

        def failing(self: Any, index: int, piece: Any) -> None:
            raise RuntimeError("simulated failure inside the cut")

        pd.DigitCut.add = failing  # type: ignore[method-assign]
    try:
        out["in_cut"] = _error(lambda: apply_recipe(split(make_model(6), rank, world), recipe(GLOBAL_50)))
    finally:
        pd.DigitCut.add = original_add  # type: ignore[method-assign]
    # replicas that would take different paths (one has an unrelated pruned parameter, so only
    # the other could fold in place): the path is agreed, and they prune alike
    twin = make_model(7)
    if rank == 1:
        prune.identity(twin[4], "bias")
    fold = "version: 1\nfinalize: true\nsteps:\n  - {select: {names: ['0', '2']}, method: l1_unstructured, amount: 0.5}\n"
    apply_recipe(twin, parse_recipe(fold, source="fold.yaml"))
    out["fold_weights"] = gather_floats(torch.cat([twin[0].weight.detach().reshape(-1), twin[2].weight.detach().reshape(-1)])).tolist()
    # the group still works after every error: a good run follows
    fine = split(make_model(6), rank, world)
    apply_recipe(fine, recipe(GLOBAL_50))
    out["after"] = bool(masks(fine))
    # one rank alone (process_group=False) prunes its own layers by themselves, waiting for nobody
    if rank == 0:
        alone = split(make_model(6), rank, world)
        apply_recipe(alone, recipe(GLOBAL_50), process_group=False)
        out["alone"] = not same(masks(alone), masks(fine))  # its own cut, not the union's
    dist.barrier()
    return out


SCHEDULED = (
    "  - select: {types: [Linear]}\n"
    "    method: l1_unstructured\n"
    "    sparsity: 0.7\n"
    "    scope: global\n"
    "    schedule: {start: 0, end: 2, curve: linear, initial_sparsity: 0.1}\n"
)


def case_pruner(rank: int, world: int) -> dict[str, Any]:
    """Schedules in the Pruner: layer-split ranks reach the whole model's masks at every event."""
    whole = make_model(8)
    out = {}
    part = split(whole, rank, world)
    pruner = Pruner(part, recipe(SCHEDULED))
    single_model = copy.deepcopy(whole)
    for epoch in range(3):
        pruner.step(epoch=epoch)
        sparsity = 0.1 + (0.7 - 0.1) * epoch / 2
        linears = [(m, "weight") for m in single_model]
        total = sum(m.weight.numel() for m, _ in linears)
        done = sum(int((m.weight_mask == 0).sum()) if hasattr(m, "weight_mask") else 0 for m, _ in linears)
        prune.global_unstructured(linears, pruning_method=prune.L1Unstructured, amount=round(sparsity * total) - done)
        out[f"epoch{epoch}"] = same(masks(part), masks(single_model))
    return out


CASES: dict[str, Callable[[int, int], dict[str, Any]]] = {
    "split_equals_torch": case_split_equals_torch,
    "split_bf16_ties": case_split_bf16_ties,
    "replicas": case_replicas,
    "split_random": case_split_random,
    "errors": case_errors,
    "pruner": case_pruner,
}


def run(rank: int, world: int, folder: str, names: list[str]) -> None:
    """The body of every spawned rank: join the group, run the cases, write their results."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(folder, "rendezvous"), rank=rank, world_size=world)
    try:
        for name in names:
            try:
                result = CASES[name](rank, world)
            except Exception:
                result = {"crashed": traceback.format_exc()}
            Path(folder, f"{name}-{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
