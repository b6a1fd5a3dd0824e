"""Pruning over the processes ("ranks") of a ``torch.distributed`` job.

When ``torch.distributed`` is initialized with more than one rank (or a ``process_group`` is
passed), :func:`~prunerecipe.apply.apply_recipe` and the :class:`~prunerecipe.Pruner` run a
recipe on every rank together:

- every rank plans and checks before anything changes, and a failure on any rank is raised on
  every rank (never a rank left waiting in a collective);
- each step's targets are compared across ranks: either the same names on every rank
  (data-parallel *replicas*: their values and masks must agree, and are checked), or names
  unique to each rank (*layer-split*, pipeline-style: each rank holds its own modules). Ranks
  that share some names but not all are an error;
- a ``scope: global`` L1 step over layer-split ranks ranks the union of their targets. The exact
  cut comes from histogram all-reduces over the float bits of ``|w|`` (16 bits per round:
  :class:`~prunerecipe.magnitude.DigitCut`), never from gathering the weights. Ties at the cut
  are pruned in a fixed order: rank, then parameter order on that rank, then index. Replicas
  hold the union each, and prune it locally (as one process would, ties included);
- random steps start from rank 0's generator state; a layer-split rank then skips the numbers
  the ranks before it draw, so the union is drawn as one process holding every target draws
  it, and every rank ends with the same state.

Collectives use CPU tensors (gloo), or the current CUDA device with NCCL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.utils.prune as prune

from .amounts import checked_nparams, sparsity_count
from .errors import ApplyError, Problem, problem
from .magnitude import DigitCut, apply_global_cut, piece_for
from .magnitude.workers import trim_heap
from .rng import skip
from .select import Target
from .spec import Recipe, Step

T = TypeVar("T")


class PeerFailure(ApplyError):
    """Raised on the ranks that did not fail themselves when another rank failed."""

    code = "distributed"


def resolve_group(process_group: Any = None) -> Any | None:
    """The process group a run coordinates over, or None when it runs alone.

    Args:
        process_group: a ``torch.distributed`` group; None: the default group when
            ``torch.distributed`` is initialized; False: none (this process prunes alone, e.g.
            rank 0 exporting a model, which would otherwise wait for the other ranks).

    Returns:
        The group, or None (alone, not initialized, or a single rank).

    Raises:
        ApplyError: a group was passed but ``torch.distributed`` is not initialized.
    """
    if process_group is False:
        return None
    initialized = dist.is_available() and dist.is_initialized()
    if process_group is None:
        if not initialized:
            return None
        process_group = dist.group.WORLD
    elif not initialized:
        raise ApplyError(problem("process_group was passed, but torch.distributed is not initialized", code="distributed"))
    return process_group if dist.get_world_size(process_group) > 1 else None


def _device(group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_bytes(group: Any, data: bytes) -> list[bytes]:
    """Every rank's ``data``, in rank order (two all-gathers of small tensors; no pickling)."""
    device = _device(group)
    world = dist.get_world_size(group)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s.item()) for s in sizes]
    buf = torch.zeros(max(1, max(lengths)), dtype=torch.uint8, device=device)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    bufs = [torch.zeros_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf, group=group)
    return [bytes(b[:n].cpu().numpy().tobytes()) for b, n in zip(bufs, lengths)]


def all_sum(group: Any, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks (a new CPU tensor; ``tensor`` is left as it is)."""
    out = tensor.to(_device(group), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out.cpu()


def agree(group: Any, error: BaseException | None) -> None:
    """Tell every rank whether any failed. A rank that failed passes its ``error`` (and raises it
    itself afterwards); the others raise :class:`PeerFailure` naming the ranks that failed and why."""
    text = "" if error is None else (str(error) or type(error).__name__)
    found = gather_bytes(group, (b"1" if error is not None else b"0") + text.encode())
    failed = [(rank, msg[1:].decode(errors="replace")) for rank, msg in enumerate(found) if msg[:1] == b"1"]
    if failed and error is None:
        raise PeerFailure([problem(f"rank {rank} failed: {msg}", code="distributed") for rank, msg in failed])


def agreed(group: Any, fn: Callable[[], T]) -> T:
    """``fn()`` on every rank; if it raises on any, every rank raises (see :func:`agree`).

    The failing rank's exception is marked as agreed (:func:`was_agreed`): its caller must not
    ask the other ranks again, since they have stopped already."""
    try:
        out = fn()
    except Exception as exc:
        agree(group, exc)
        with contextlib.suppress(Exception):
            exc._prunerecipe_agreed = True  # type: ignore[attr-defined]
        raise
    agree(group, None)
    return out


def was_agreed(exc: BaseException) -> bool:
    """Whether every rank already knows of ``exc`` (raised by :func:`agreed`, or a :class:`PeerFailure`)."""
    return isinstance(exc, PeerFailure) or bool(getattr(exc, "_prunerecipe_agreed", False))


def all_agree(group: Any, value: bool) -> bool:
    """Whether ``value`` holds on every rank (a decision that must be the same everywhere)."""
    return all(b == b"1" for b in gather_bytes(group, b"1" if value else b"0"))


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    """A digest of a tensor's dtype, shape and bytes (to tell replicas apart)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    h = hashlib.blake2b(f"{t.dtype}{tuple(t.shape)}".encode(), digest_size=8)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


def _step_text(recipe: Recipe, step: Step) -> list[Any]:
    return [step.index, step.method, step.scope, step.amount, step.sparsity, dict(step.args), recipe.step_seed(step), list(step.params)]


class Coordinator:
    """The ranks' agreement for one run of some steps: which steps are layer-split, and the
    collectives those steps need. Made on every rank together (it checks as it is made).

    Args:
        group: the process group.
        recipe: the recipe (every rank must run the same steps).
        steps: ``(step, method class, targets)`` for each step that runs, in order.

    Raises:
        ApplyError: on every rank alike, when the ranks run different steps, share some targets
            of a step but not all, hold no target of a step at all, hold replicas that differ,
            or split a global step of a method other than torch's L1 (or identity).
    """

    def __init__(self, group: Any, recipe: Recipe, steps: Sequence[tuple[Step, type, Sequence[Target]]]) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.recipe = recipe
        self.split: set[int] = set()  # indices of steps whose targets differ per rank
        self._offsets: dict[int, tuple[int, int]] = {}
        self._after = 0  # draws of the later ranks, skipped when a random step ends
        self._check(steps)

    # --- agreement -----------------------------------------------------------------------

    def agree(self, error: BaseException | None) -> None:
        """See :func:`agree`."""
        agree(self.group, error)

    def _fail(self, step: Step | None, message: str) -> ApplyError:
        where: Problem = self.recipe.problem(step.path if step is not None else (), message, code="distributed")
        return ApplyError(where)

    def _check(self, steps: Sequence[tuple[Step, type, Sequence[Target]]]) -> None:
        recipe = self.recipe
        listed = [[[t.qualname, list(t.shape), str(t.original.dtype)] for t in targets] for _, _, targets in steps]
        mine = {
            "recipe": _digest(json.dumps([_step_text(recipe, s) for s, _, _ in steps], default=repr).encode()),
            "steps": [_digest(json.dumps(names).encode()) for names in listed],
        }
        seen = [json.loads(b) for b in gather_bytes(self.group, json.dumps(mine).encode())]
        if any(s["recipe"] != seen[0]["recipe"] or len(s["steps"]) != len(seen[0]["steps"]) for s in seen):
            raise self._fail(None, "the ranks run different recipes (steps, amounts or seeds differ); every rank must run the same one")
        differ = [i for i in range(len(steps)) if any(s["steps"][i] != seen[0]["steps"][i] for s in seen)]
        for i, (step, _, targets) in enumerate(steps):
            if i not in differ and not targets:
                raise self._fail(step, "no rank holds a target of this step")
        if differ:
            names = [json.loads(b) for b in gather_bytes(self.group, json.dumps({str(i): listed[i] for i in differ}).encode())]
            for i in differ:
                step, cls = steps[i][0], steps[i][1]
                where: dict[str, list[int]] = {}
                for rank, got in enumerate(names):
                    for name, _, _ in got[str(i)]:
                        where.setdefault(name, []).append(rank)
                shared = {n: r for n, r in where.items() if len(r) > 1}
                if shared:
                    shown = "; ".join(f"{n} on ranks {', '.join(map(str, r))}" for n, r in list(shared.items())[:4])
                    raise self._fail(
                        step,
                        f"the ranks share some targets of this step but not all ({shown}{'; ...' if len(shared) > 4 else ''}): "
                        "each rank must hold the same targets (data-parallel replicas) or targets no other rank holds (layer-split)",
                    )
                if not where:
                    raise self._fail(step, "no rank holds a target of this step")
                if step.scope == "global" and cls not in (prune.L1Unstructured, prune.Identity):
                    raise self._fail(
                        step,
                        f"{step.method} with scope: global over ranks that hold different tensors is not supported (only "
                        "l1_unstructured ranks the union across ranks); use scope: local, or run it where one process holds every target",
                    )
                self.split.add(step.index)
                counts = [len(got[str(i)]) for got in names]
                self._offsets[step.index] = (sum(counts[: self.rank]), sum(counts))
        self._check_replicas([(s, t) for i, (s, _, t) in enumerate(steps) if i not in differ])

    def _check_replicas(self, steps: Sequence[tuple[Step, Sequence[Target]]]) -> None:
        """Replicas must hold the same values and masks: compared by digest, never gathered."""
        distinct: dict[str, Target] = {}
        for _, targets in steps:
            for t in targets:
                distinct.setdefault(t.qualname, t)
        if not distinct:
            return
        mine = {name: tensor_digest(t.original) + (tensor_digest(t.mask) if t.mask is not None else "") for name, t in distinct.items()}
        seen = [json.loads(b) for b in gather_bytes(self.group, json.dumps(mine).encode())]
        bad = {name: [r for r, got in enumerate(seen) if got.get(name) != seen[0].get(name)] for name in distinct}
        bad = {name: ranks for name, ranks in bad.items() if ranks}
        if bad:
            shown = "; ".join(f"{n} (rank {', '.join(map(str, r))} vs rank 0)" for n, r in list(bad.items())[:4])
            step = next(s for s, ts in steps if any(t.qualname in bad for t in ts))
            raise self._fail(
                step,
                f"data-parallel replicas disagree: {len(bad)} target(s) differ in value or mask: {shown}{'; ...' if len(bad) > 4 else ''}. "
                "Replicas must hold the same weights (broadcast them from rank 0, or load the same checkpoint) before pruning",
            )

    # --- steps -------------------------------------------------------------------------

    def random_state(self, step: Step, draws: int) -> None:
        """Before a random step: every rank takes rank 0's generator state; on layer-split ranks,
        rank ``r`` then skips the ``draws`` of the ranks before it (and :meth:`random_done` the
        draws of those after it)."""
        state = torch.get_rng_state().to(_device(self.group))
        dist.broadcast(state, src=dist.get_global_rank(self.group, 0), group=self.group)
        torch.set_rng_state(state.cpu())
        if step.index in self.split:
            counts = all_sum(self.group, _one_hot(self.rank, self.world, draws))
            skip(int(counts[: self.rank].sum().item()))
            self._after = int(counts[self.rank + 1 :].sum().item())
        else:
            self._after = 0

    def random_done(self) -> None:
        """After a random step: skip what the later ranks drew, so every rank ends alike."""
        skip(self._after)
        self._after = 0

    def global_l1(self, step: Step, targets: Sequence[Target], zeros: dict[tuple[int, str], int] | None) -> str | None:
        """A layer-split global L1 step: the union's exact cut by histogram all-reduces, then
        this rank's masks, as ``global_unstructured`` over the union would leave them.

        Returns:
            A note when the step is a no-op (its sparsity is reached already), else None.
        """
        # local work between the collectives is agreed first: a rank failing there must not leave
        # the others waiting in an all-reduce it will never join
        pieces = agreed(self.group, lambda: [piece_for(t.module, t.param) for t in targets])
        info = torch.zeros(self.world, 3, dtype=torch.int64)
        info[self.rank] = torch.tensor(
            [_dtype_code({p.values.dtype for p in pieces}), sum(p.numel for p in pieces), sum(p.eligible_count() for p in pieces)]
        )
        info = all_sum(self.group, info)
        codes = set(info[:, 0].tolist()) - {0}
        if len(codes) != 1 or not 0 < next(iter(codes)) <= len(_DTYPES):
            raise ValueError("a global step across ranks needs every target in one floating-point dtype (fp16, bf16, fp32 or fp64)")
        dtype = _DTYPES[int(codes.pop()) - 1]
        numel, eligible = int(info[:, 1].sum().item()), int(info[:, 2].sum().item())
        if step.sparsity is not None:
            k = sparsity_count(step.sparsity, numel, numel - eligible)
            if k <= 0:
                return f"no-op: already at or above sparsity {step.sparsity:g}"
        else:
            assert step.amount is not None
            k = checked_nparams(step.amount, eligible)
        cut = DigitCut(dtype, len(pieces), k, reduce=lambda h: all_sum(self.group, h))

        def count() -> None:
            for i, p in enumerate(pieces):
                cut.add(i, p)
                if i % 32 == 31:  # each piece's histograms leave heap behind
                    trim_heap()

        while not cut.done:
            agreed(self.group, count)
            cut.end_pass()
        if cut.key is None:
            threshold = cut.threshold()
        else:
            first, total = self._offsets[step.index]
            counts = torch.zeros(2, total, dtype=torch.int64)
            counts[0, first : first + len(pieces)] = torch.tensor(cut.below, dtype=torch.int64)
            counts[1, first : first + len(pieces)] = torch.tensor(cut.ties, dtype=torch.int64)
            counts = all_sum(self.group, counts)
            union = cut.threshold(counts[0].tolist(), counts[1].tolist())
            threshold = union.part(first, len(pieces))
        apply_global_cut([(t.module, t.param) for t in targets], threshold, zeros, pieces)
        return None


_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _dtype_code(dtypes: set[torch.dtype]) -> int:
    """0: no tensor; 1-4: one supported dtype; 5: several, or another."""
    if not dtypes:
        return 0
    (only,) = dtypes if len(dtypes) == 1 else (None,)
    return _DTYPES.index(only) + 1 if only in _DTYPES else len(_DTYPES) + 1


def _one_hot(rank: int, world: int, value: int) -> torch.Tensor:
    out = torch.zeros(world, dtype=torch.int64)
    out[rank] = value
    return out


__all__ = ["Coordinator", "PeerFailure", "agree", "agreed", "all_sum", "gather_bytes", "resolve_group", "tensor_digest"]
