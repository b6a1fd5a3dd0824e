"""Masks from cuts: torch's ``l1_unstructured`` and ``global_unstructured`` (L1) without
``topk``, and the in-place fold that one-shot ``finalize`` uses.

The re-parametrization stays torch's own (:func:`prunerecipe.torchprune.attach` with real
``L1Unstructured``/``CustomFromMask`` objects in the history). Masks equal torch's wherever
``|w|`` has no ties at the cut. With ties in a tensor (or global group) of up to
:data:`EXACT_TIES_UP_TO` entries, torch itself computes the mask, so even its tie order is
kept; beyond that, exactly the requested count is pruned, earliest entries first.
"""

from __future__ import annotations

import bisect
import itertools
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.utils.prune as prune
from torch import nn

from ..amounts import checked_nparams
from ..torchprune import apply_any_layout, attach, global_unstructured, move_to_end, original, owned_mask
from . import workers
from .cuts import select
from .pieces import INF_KEY, KEY_DTYPES, SMALLEST_NORMAL_KEY, Piece, Threshold, eligible_part, float_of, flushes_subnormals
from .workers import buffer

#: Up to this many entries (a tensor, or a global group), a tie at the cut is broken by
#: torch's own ``topk``, so masks equal hand-written code even then (zero-initialized biases
#: are all ties). Beyond it, ties go to the earliest entries: same count, maybe other entries.
EXACT_TIES_UP_TO = 1 << 20


def piece_for(module: nn.Module, name: str) -> Piece:
    """What torch ranks for ``module.<name>`` (``getattr(module, name)``: the weight as the last
    forward pre-hook computed it), and what it may prune (the entries whose mask is 1)."""
    return Piece(getattr(module, name), owned_mask(module, name))


def _keep_flags(values: torch.Tensor, below: int, out: torch.Tensor, fast: bool) -> torch.Tensor:
    """``out = 1`` where the key of ``values`` is at least ``below``, else 0. ``fast``: the values
    are finite and subnormals are not flushed, so float ops rank them as their keys do."""
    clear = KEY_DTYPES[values.dtype][1]
    if below <= 0:
        return out.fill_(1)
    if below > clear:
        return out.zero_()
    int_dtype = KEY_DTYPES[values.dtype][0]
    floor = _floor(below, values.dtype)
    # a chunk of finite values ranks by float ops as well, unless the cut itself lies among the
    # NaN keys (its floor would be NaN) or the subnormals (which may be flushed)
    if fast or (SMALLEST_NORMAL_KEY[values.dtype] <= below - 1 <= INF_KEY[values.dtype] and torch.isfinite(values).all()):
        # keys >= below are exactly the |x| > floor; such x are never 0, so sign() is 1 there
        return torch.hardshrink(values, floor, out=out).sign_().abs_()
    keys = torch.bitwise_and(values.view(int_dtype), clear)  # NaN, or a subnormal cut with flush-to-zero: compare keys
    return out.copy_(keys >= below)


def _floor(below: int, dtype: torch.dtype) -> float:
    """The largest magnitude that a cut at key ``below`` prunes (the float of key ``below - 1``)."""
    return float(torch.tensor([below - 1], dtype=KEY_DTYPES[dtype][0]).view(dtype).item())


def _split_ties(values: torch.Tensor, key: int, quota: int, keep: torch.Tensor, eligible: torch.Tensor | None, fast: bool = False) -> int:
    """Prune (set ``keep`` to 0 at) the first ``quota`` eligible entries whose key is ``key``;
    returns how many of the quota are left for later chunks. ``fast``: as for
    :func:`_keep_flags`, which wrote ``keep`` (then the ties are found in ``keep`` itself)."""
    if quota <= 0:
        return 0
    if fast and eligible is None and keep.dtype == values.dtype and 0 < key <= KEY_DTYPES[values.dtype][1]:
        # No chunk-sized temporaries (on a worker thread, its heap would keep them resident):
        # |x| where the key is at least ``key``, then 1 where it is exactly that, then the flags again
        floor = _floor(key, values.dtype)
        torch.eq(torch.hardshrink(values, floor, out=keep).abs_(), float_of(key, values.dtype), out=keep)
        at = torch.nonzero(keep).view(-1)[:quota]
        torch.hardshrink(values, floor, out=keep).sign_().abs_()
        keep.index_fill_(0, at, 0)
        return quota - at.numel()
    int_dtype, clear = KEY_DTYPES[values.dtype]
    ties = torch.bitwise_and(values.view(int_dtype), clear) == key
    if eligible is not None:
        ties &= eligible != 0
    at = torch.nonzero(ties).view(-1)[:quota]
    keep.index_fill_(0, at, 0)
    return quota - at.numel()


Write = tuple[Piece, Threshold, int, torch.Tensor, bool]  # (piece, cut, index in the cut, flat out, multiply)


def write_keep(piece: Piece, threshold: Threshold, index: int, out: torch.Tensor, multiply: bool = False) -> None:
    """Write 1 (kept) / 0 (pruned) for every entry of ``piece`` into the flat ``out`` (or, with
    ``multiply``, multiply ``out`` by those flags in place: the fold). Entries that are not
    eligible count as kept."""
    write_all([(piece, threshold, index, out, multiply)])


def write_all(writes: Sequence[Write]) -> None:
    """:func:`write_keep` for many pieces, in one parallel run over all their chunks (a piece
    whose tie quota is split goes through its chunks in order, in one thread)."""
    flush = flushes_subnormals()
    # per device: one record per piece; item i is chunk i - starts[r] of record r (or all of its
    # chunks, in order, for a split tie quota): no object per chunk (its memory would stay resident)
    by_device: dict[torch.device, list[tuple[Piece, int, int, torch.Tensor, bool, bool]]] = {}
    for piece, threshold, index, out, multiply in writes:
        below, quota = threshold.rule(index)
        by_device.setdefault(out.device, []).append((piece, below, quota, out, multiply, threshold.finite and not flush))
    for device, records in by_device.items():
        starts = list(itertools.accumulate((1 if r[2] else -(-r[0].numel // workers.CHUNK) for r in records), initial=0))

        def job(i: int, scratch: dict[Any, Any], records: list = records, starts: list[int] = starts) -> None:
            r = bisect.bisect_right(starts, i) - 1
            piece, below, quota, out, multiply, fast = records[r]
            if quota:  # the earliest ties go first
                for a in range(0, piece.numel, workers.CHUNK):
                    quota = _write_chunk(piece, below, out, multiply, fast, a, min(a + workers.CHUNK, piece.numel), scratch, quota)
                return
            a = (i - starts[r]) * workers.CHUNK
            _write_chunk(piece, below, out, multiply, fast, a, min(a + workers.CHUNK, piece.numel), scratch)

        workers.run(job, starts[-1], device, lambda _: {})


def _write_chunk(
    piece: Piece, below: int, out: torch.Tensor, multiply: bool, fast: bool, a: int, b: int, scratch: dict[Any, Any], quota: int = 0
) -> int:
    """Entries ``a:b``; returns what is left of the tie quota."""
    values = piece.flat()[a:b]
    if multiply and _direct(piece, below, quota, fast):
        # w * keep in two ops: hardshrink keeps |w| > floor and zeroes the rest; copysign then
        # gives those zeros w's sign, exactly as w * 0.0 does
        kept = torch.hardshrink(values, _floor(below, values.dtype), out=buffer(scratch, "keep", b - a, out.dtype, out.device))
        torch.copysign(kept, values, out=out[a:b])
        return 0
    keep = buffer(scratch, "keep", b - a, out.dtype, out.device) if multiply else out[a:b]
    _keep_flags(values, below, keep, fast)
    eligible = eligible_part(piece, a, b, keep.dtype)
    quota = _split_ties(values, below, quota, keep, eligible, fast)
    if eligible is not None:  # entries torch could not prune keep their old mask value
        keep.mul_(eligible).add_(eligible.neg().add_(1))
    if multiply:
        out[a:b].mul_(keep)
    return quota


def fold_into(piece: Piece, threshold: Threshold, index: int, out: torch.Tensor) -> None:
    """``out = values * keep`` for piece ``index`` of a cut, into another tensor of the same shape
    and dtype (its contents are not read): what ``prune`` then ``remove`` leave, bit for bit
    (``-0.0`` where ``w * 0.0`` gives it), while ``values`` is only read (a memory-mapped tensor)."""
    below, quota = threshold.rule(index)
    flat = out.view(-1)
    if not _direct(piece, below, quota, threshold.finite and not flushes_subnormals()):  # the in-place fold multiplies what is there
        flat.copy_(piece.flat())
    write_keep(piece, threshold, index, flat, multiply=True)


def _direct(piece: Piece, below: int, quota: int, fast: bool) -> bool:
    """Whether a fold writes ``values * keep`` without reading what ``out`` holds (two float ops)."""
    return fast and not quota and piece.eligible is None and 0 < below <= KEY_DTYPES[piece.values.dtype][1]


def blank_mask(t: torch.Tensor) -> torch.Tensor:
    """A mask to be written: contiguous, as torch's are, and not yet touched (so not yet resident)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def new_mask(piece: Piece, default: torch.Tensor | None, threshold: Threshold, index: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The mask torch registers: the old one (or ones) in the parameter's dtype, newly pruned
    entries zeroed; written into ``out`` (a :func:`blank_mask`) when given."""
    mask = blank_mask(piece.values) if out is None else out
    write_keep(piece, threshold, index, mask.view(-1))
    return _keep_old(mask, default)


def _keep_old(mask: torch.Tensor, default: torch.Tensor | None) -> torch.Tensor:
    """Fold the old mask in: pruned entries stay pruned, other old values are kept."""
    if default is not None:
        mask.mul_(default.detach().to(dtype=mask.dtype))
    return mask


def zeros_after(piece: Piece, threshold: Threshold, index: int) -> int | None:
    """Zero entries of ``orig * mask`` after a first cut, known without a pass over the weights:
    every surviving entry has ``|w|`` at or above a cut that is a normal number, so it is not
    zero. None when that does not hold (a cut among subnormals, or earlier pruning)."""
    if piece.eligible is not None or threshold.nothing or threshold.pruned is None:
        return None
    if threshold.key <= SMALLEST_NORMAL_KEY[piece.values.dtype]:
        return None
    return threshold.pruned[index]


def l1_local(module: nn.Module, name: str, amount: int | float, zeros: dict[tuple[int, str], int] | None = None, finite: bool = False) -> None:
    """``prune.l1_unstructured(module, name, amount)``: the same result, without ``topk``.

    Args:
        module, name, amount: as for torch's function (``amount`` counts eligible entries).
        zeros: receives ``(id(module), name) -> zero entries after``, when known for free.
        finite: the caller checked that the weights are finite (saves a pass).
    """
    l1_local_many([(module, name, amount)], zeros, finite)


def l1_local_many(items: Sequence[tuple[nn.Module, str, int | float]], zeros: dict[tuple[int, str], int] | None = None, finite: bool = False) -> None:
    """:func:`l1_local` for each ``(module, name, amount)``, in order, with every cut found in
    one scan over all of them. The parameters must be distinct."""
    pieces = [piece_for(m, n) for m, n, _ in items]
    masks = [blank_mask(p.values) for p in pieces]  # the select's scratch lives in them until they are written
    groups = [([p], checked_nparams(amount, p.eligible_count())) for p, (_, _, amount) in zip(pieces, items)]
    cuts = select(groups, finite=finite, arena=masks)
    _release(pieces)
    torch_picks = [c.quotas is not None and p.numel <= EXACT_TIES_UP_TO for p, c in zip(pieces, cuts)]
    write_all([(p, c, 0, m.view(-1), False) for p, c, m, theirs in zip(pieces, cuts, masks, torch_picks) if not theirs])
    counts = [None if theirs else zeros_after(p, c, 0) for p, c, theirs in zip(pieces, cuts, torch_picks)]
    del cuts  # the cuts' candidates, and what the writes freed in the workers' arenas, go back
    _release(pieces)  # before the masked weights are made
    for (module, name, amount), mask, count, theirs in zip(items, masks, counts, torch_picks):
        if theirs:  # ties in a small tensor: let torch pick, as by hand
            apply_any_layout(prune.L1Unstructured, module, name, amount=amount)
            continue
        _keep_old(mask, owned_mask(module, name))
        _note(zeros, module, name, count)
        attach(module, name, prune.L1Unstructured(amount), mask)


def l1_global(
    params: Sequence[tuple[nn.Module, str]], amount: int | float, zeros: dict[tuple[int, str], int] | None = None, finite: bool = False
) -> None:
    """``prune.global_unstructured(params, L1Unstructured, amount=amount)``: the same masks and
    ``CustomFromMask`` histories, without concatenating the parameters. ``zeros`` and
    ``finite`` as for :func:`l1_local`."""
    pieces = [piece_for(m, n) for m, n in params]
    masks = [blank_mask(p.values) for p in pieces]  # the select's scratch lives in them until they are written
    (threshold,) = select([(pieces, checked_nparams(amount, sum(p.eligible_count() for p in pieces)))], finite=finite, arena=masks)
    _release(pieces)
    if threshold.quotas is not None and sum(p.numel for p in pieces) <= EXACT_TIES_UP_TO:
        del masks
        global_unstructured(list(params), pruning_method=prune.L1Unstructured, amount=amount)  # ties: torch picks (any layout)
        return
    apply_global_cut(params, threshold, zeros, pieces, masks)


def apply_global_cut(
    params: Sequence[tuple[nn.Module, str]],
    threshold: Threshold,
    zeros: dict[tuple[int, str], int] | None = None,
    pieces: Sequence[Piece] | None = None,
    masks: Sequence[torch.Tensor] | None = None,
) -> None:
    """The re-parametrization ``global_unstructured`` leaves, for a group's cut found
    elsewhere (over a stream of tensors, or over the processes of a distributed job):
    ``params[i]`` is piece ``i`` of ``threshold``. ``pieces`` and blank ``masks`` may be
    passed when already made."""
    pieces = [piece_for(m, n) for m, n in params] if pieces is None else pieces
    masks = [blank_mask(p.values) for p in pieces] if masks is None else masks
    write_all([(p, threshold, i, m.view(-1), False) for i, (p, m) in enumerate(zip(pieces, masks))])
    _release(pieces)  # what the writes freed in the workers' arenas, before the masked weights are made
    for i, ((module, name), piece, mask) in enumerate(zip(params, pieces, masks)):
        default = owned_mask(module, name)
        _keep_old(mask, default)
        if default is not None:
            # torch multiplies the old mask in twice (once building the global mask, once more in
            # CustomFromMask): a no-op for 0/1 masks, the square for any other value
            mask = mask * default.detach().to(dtype=mask.dtype)
        _note(zeros, module, name, zeros_after(piece, threshold, i))
        attach(module, name, prune.CustomFromMask(mask), mask)


def _release(pieces: Sequence[Piece]) -> None:
    """After a big select or the masks' writes on the host: what they freed goes back to the
    system before the next allocations, so peak memory stays what torch's own
    re-parametrization holds."""
    if sum(p.numel for p in pieces) >= workers.CHUNK and pieces[0].values.device.type == "cpu":
        workers.trim_heap()


def _note(zeros: dict[tuple[int, str], int] | None, module: nn.Module, name: str, count: int | None) -> None:
    if zeros is not None and count is not None:
        zeros[(id(module), name)] = count


Fold = tuple[nn.Module, str, Piece, Threshold, int]  # (module, name, piece, cut, index in the cut's pieces)


def fold(folds: Sequence[Fold]) -> dict[tuple[int, str], int]:
    """The data side of ``prune`` then ``prune.remove``, without the re-parametrization in
    between: ``weight *= mask`` in place (the same arithmetic, so -0.0 comes out as torch
    makes it), then each parameter moved to the end of its module's parameters, in order, as
    ``remove`` moves it. Returns the zero entries after, where known without counting."""
    known: dict[tuple[int, str], int] = {}
    with torch.no_grad():
        strided = []
        writes: list[Write] = []
        for module, name, piece, threshold, index in folds:
            param = original(module, name)
            if param.is_contiguous():
                writes.append((piece, threshold, index, param.view(-1), True))
            else:
                strided.append((param, piece, threshold, index))
            _note(known, module, name, zeros_after(piece, threshold, index))
        write_all(writes)
        for param, piece, threshold, index in strided:  # unusual strides: one whole-tensor mask
            keep = torch.empty(piece.numel, dtype=param.dtype, device=param.device)
            write_keep(piece, threshold, index, keep)
            param.mul_(keep.view(piece.values.shape))
    for module, name, *_ in folds:
        move_to_end(module, name)
    return known


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, so an in-place pass is never left half done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[tuple[Any, ...]] = []
    previous = signal.getsignal(signal.SIGINT)

    def hold(signum: int, frame: Any) -> None:
        received.append((signum, frame))

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(*received[0])
