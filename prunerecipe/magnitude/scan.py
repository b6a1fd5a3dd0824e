"""One pass over a group's tensors: per piece, how many eligible entries lie at or below a
bracket's low key, and the keys inside the bracket, collected for the pick.

Runs on the worker threads (:mod:`.workers`) in cache-sized chunks. The fast flavour uses
float ops only (``hardshrink`` keeps ``|x| > lambda``); the robust one compares keys.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import Any

import torch

from . import workers
from .pieces import KEY_DTYPES, Piece, Threshold, float_of, flushes_subnormals, gather, jobs_for, keys_of, make_cut, positions, stored, stored_dtype
from .workers import buffer, stash

_DIGIT = 16


class Scan:
    """One group's scan: per piece, entries at or below ``lo`` and the keys in ``(lo, hi]``.

    The fast flavour uses float ops only (``hardshrink`` keeps ``|x| > lambda``) and needs
    finite data and no flushed subnormals; the robust one compares integer keys.
    """

    def __init__(
        self, index: int, pieces: list[Piece], k: int, lo: int, hi: int, robust: bool = False, count_zeros: bool = False, verify: bool = False
    ) -> None:
        self.index, self.pieces, self.k, self.lo, self.hi = index, pieces, k, lo, hi
        self.count_zeros = count_zeros
        self.verify = verify  # check each chunk for NaN/inf (the fast flavour cannot rank them)
        self.dtype = pieces[0].values.dtype
        self.robust = robust or flushes_subnormals()
        self.lo_value = float_of(lo, self.dtype) if lo >= 0 else -1.0
        self.hi_value = float_of(hi, self.dtype)
        self.jobs = jobs_for(pieces)
        n = len(self.jobs)
        self.le_lo: list[list[int]] = [[] for _ in range(n)]  # per segment
        self.sums: list[torch.Tensor | None] = [None] * n
        self.zeros: list[list[int]] = [[] for _ in range(n)]
        # per job: (candidate keys, their piece: an index tensor, or one index for the whole job)
        self.found: list[tuple[torch.Tensor, torch.Tensor | int] | None] = [None] * n

    def run(self, j: int, scratch: dict[Any, torch.Tensor]) -> None:
        job = self.jobs[j]
        values, eligible = gather(self.pieces, job, scratch)
        if self.robust:
            self._robust(j, values, eligible)
        else:
            self._fast(j, values, eligible, scratch)

    def _fast(self, j: int, values: torch.Tensor, eligible: torch.Tensor | None, scratch: dict[Any, torch.Tensor]) -> None:
        # Few, chunk-sized ops: the Python between them holds the GIL, the ops do not.
        n = values.numel()
        size = torch.abs(values, out=buffer(scratch, "size", n, values.dtype, values.device))
        if self.verify:  # read in finish(): NaN/inf (or huge values whose sum overflowed) send the group to the exact path
            self.sums[j] = size.sum(dtype=torch.float32 if size.element_size() < 4 else None)
        if eligible is not None:  # ineligible entries become the largest float: above the bracket
            size.mul_(eligible).add_(eligible.neg().add_(1), alpha=torch.finfo(values.dtype).max)
        over_lo = buffer(scratch, "over_lo", n, values.dtype, values.device)
        over_hi = buffer(scratch, "over_hi", n, values.dtype, values.device)
        if self.count_zeros:
            self.zeros[j] = self._per_segment(j, torch.sign(size, out=over_lo), complement=True)
        # sizes are >= 0: hardshrink keeps those > lambda, and sign() makes them 1
        if self.lo_value < 0:
            over_lo.fill_(1)
        else:
            torch.hardshrink(size, self.lo_value, out=over_lo).sign_()
        torch.hardshrink(size, self.hi_value, out=over_hi).sign_()
        self.le_lo[j] = self._per_segment(j, over_lo, complement=True)
        over_lo.sub_(over_hi)  # 1 inside (lo, hi]
        flags = buffer(scratch, "flags", n, torch.bool, values.device).copy_(over_lo)
        int_dtype = KEY_DTYPES[values.dtype][0]
        job = self.jobs[j]
        if len(job) > 1 or n % 8:  # packed pieces, or a ragged tail: positions tell the pieces apart
            at = positions(flags.view(torch.uint8))
            self.found[j] = (stash(scratch, stored(size.index_select(0, at).view(int_dtype))), stash(scratch, self._piece_of(j, at)))
            return
        # Eight flags at a time as one int64: only the groups of eight with a candidate are
        # read. Every result goes into this thread's buffers (out=, sized for the worst case):
        # a worker thread's own heap would keep what such temporaries touched resident.
        device = values.device
        hit = torch.nonzero(flags.view(torch.uint8).view(torch.int64), out=buffer(scratch, "hit", n // 8, torch.int64, device, n // 8)[:0])
        hit = hit.view(-1)
        groups = torch.index_select(size.view(-1, 8), 0, hit, out=over_hi[:0])  # over_hi is free again
        marks = torch.index_select(flags.view(-1, 8), 0, hit, out=buffer(scratch, "marks", n, torch.bool, device)[:0])
        inner = torch.nonzero(marks.view(-1), out=buffer(scratch, "inner", n, torch.int64, device)[:0]).view(-1)
        chosen = torch.index_select(groups.view(-1), 0, inner, out=over_lo[:0])  # and so is over_lo
        self.found[j] = (stash(scratch, chosen.view(int_dtype), copy=True, dtype=stored_dtype(int_dtype)), job[0][0])

    def _robust(self, j: int, values: torch.Tensor, eligible: torch.Tensor | None) -> None:
        keys = keys_of(values)
        ok = None if eligible is None else eligible != 0
        low = keys <= self.lo
        inside = (keys > self.lo) & (keys <= self.hi)
        zero = keys == 0
        if ok is not None:
            low &= ok
            inside &= ok
            zero &= ok
        self.le_lo[j] = self._per_segment(j, low.to(torch.float32))
        if self.count_zeros:
            self.zeros[j] = self._per_segment(j, zero.to(torch.float32))
        at = torch.nonzero(inside).view(-1)
        if at.numel():
            self.found[j] = (stored(keys.index_select(0, at)), self._piece_of(j, at))

    def _per_segment(self, j: int, flags: torch.Tensor, complement: bool = False) -> list[int]:
        """Sums of 0/1 ``flags`` over each segment of job ``j`` (or of ``1 - flags``)."""
        job = self.jobs[j]
        if len(job) == 1:  # float32 sums of 0/1 are exact up to 2**24, far above a chunk
            total = int(flags.sum(dtype=torch.float32).item())
            return [flags.numel() - total if complement else total]
        ends = torch.tensor([0] + [b - a for _, a, b in job], device=flags.device).cumsum(0)
        sums = torch.cat([flags.new_zeros(1, dtype=torch.float32), flags.cumsum(0, dtype=torch.float32)]).index_select(0, ends)
        out = (sums[1:] - sums[:-1]).to(torch.int64).tolist()
        return [(b - a) - s for (_, a, b), s in zip(job, out)] if complement else out

    def _piece_of(self, j: int, at: torch.Tensor) -> torch.Tensor:
        job = self.jobs[j]
        if len(job) == 1:
            return torch.full_like(at, job[0][0])
        starts = torch.tensor([0] + [b - a for _, a, b in job], device=at.device).cumsum(0)[1:-1]
        which = torch.bucketize(at, starts, right=True)
        return torch.tensor([i for i, _, _ in job], device=at.device).index_select(0, which)

    def finish(self) -> Threshold | None:
        """The cut, or None when the bracket missed or a chunk was not finite."""
        sums = [t for t in self.sums if t is not None]
        if sums and not bool(torch.isfinite(torch.stack(sums)).all().item()):
            return None
        count = len(self.pieces)
        le_lo = [0] * count
        zeros: list[int | None] = [0 if p.eligible is None and self.count_zeros else None for p in self.pieces]
        for job, lows, zs in zip(self.jobs, self.le_lo, self.zeros):
            for (i, _, _), low in zip(job, lows):
                le_lo[i] += low
            for (i, _, _), z in zip(job, zs):
                zi = zeros[i]
                zeros[i] = None if zi is None else zi + z
        found = [f for f in self.found if f is not None]
        inside = sum(f[0].numel() for f in found)
        if not sum(le_lo) < self.k <= sum(le_lo) + inside:
            return None
        keys = torch.cat([f[0] for f in found])
        owner = torch.cat([f[1] if isinstance(f[1], torch.Tensor) else torch.full_like(f[0], f[1]) for f in found])
        t = kth(keys, self.k - sum(le_lo))
        below = torch.bincount(owner[keys < t], minlength=count).tolist()
        ties = torch.bincount(owner[keys == t], minlength=count).tolist()
        return make_cut(t, self.k, [a + b for a, b in zip(le_lo, below)], ties, tuple(zeros), not self.robust)


def kth(keys: torch.Tensor, r: int) -> int:
    """The ``r``-th smallest (1-based) of integer ``keys`` (>= 0): narrowed by 16-bit histograms while big."""
    while keys.numel() > workers.CHUNK:
        lo = int(keys.min().item())
        span = int(keys.max().item()) - lo
        if span == 0:
            return lo
        shift = max(0, span.bit_length() - _DIGIT)
        digits = (keys - lo) >> shift
        cum = torch.cumsum(torch.bincount(digits), 0)
        b = int(torch.searchsorted(cum, torch.tensor([r], dtype=cum.dtype, device=cum.device)).item())
        r -= int(cum[b - 1].item()) if b > 0 else 0
        keys = keys[digits == b]
    return int(torch.kthvalue(keys, r).values.item())


def scan_all(scans: list[Scan], arena: Sequence[torch.Tensor] = ()) -> None:
    """Every group's scan, one parallel run per device (one pass over all their chunks), with
    scratch memory lent by the tensors in ``arena`` (see :class:`.workers.Arena`)."""
    by_device: dict[torch.device, list[Scan]] = {}
    for s in scans:
        by_device.setdefault(s.pieces[0].values.device, []).append(s)
    for device, group in by_device.items():
        # item i is job i - starts[g] of scan g: no object per job (their memory would stay resident)
        starts = list(itertools.accumulate((len(s.jobs) for s in group), initial=0))

        def job(i: int, scratch: dict[Any, torch.Tensor], group: list[Scan] = group, starts: list[int] = starts) -> None:
            g = bisect.bisect_right(starts, i) - 1
            group[g].run(i - starts[g], scratch)

        lent = workers.Arena([t for t in arena if t.device == device], workers.worker_count(device, starts[-1]))
        workers.run(job, starts[-1], device, lent.scratch)
