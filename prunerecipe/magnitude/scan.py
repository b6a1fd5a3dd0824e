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
from .pieces import KEY_DTYPES, Piece, Segment, Threshold, float_of, flushes_subnormals, gather, jobs_for, keys_of, make_cut, positions
from .workers import buffer

_DIGIT = 16


class Found:
    """One worker thread's candidate keys, and their owners (piece numbers counted over every
    scan of a :func:`scan_all` run), appended in the order of the thread's jobs.

    They go into blocks carved from the lent arena region (else allocated), never into one
    tensor per job: a scan over a big model then leaves no small objects behind. Jobs are
    taken in increasing order, so owners never decrease within a thread's blocks."""

    BLOCK = 1 << 16  # entries per block

    def __init__(self, scratch: dict[Any, Any], key_dtype: torch.dtype, device: torch.device, owner_dtype: torch.dtype = torch.int32) -> None:
        # the thread's lent region (shared with its buffers), not its scratch dict, which holds this
        # object: no reference cycle, so nothing waits for the garbage collector
        self.lent = {k: scratch[k] for k in ("arena", "spare") if k in scratch}
        self.key_dtype, self.owner_dtype, self.device = key_dtype, owner_dtype, device
        self.blocks: list[tuple[torch.Tensor, torch.Tensor, list[int]]] = []  # (keys, owners, [used])

    def add(self, keys: torch.Tensor, owners: torch.Tensor | int) -> None:
        n = keys.numel()
        if not n:
            return
        block = self.blocks[-1] if self.blocks else None
        if block is None or block[2][0] + n > block[0].numel():
            block = self._new_block(max(n, self.BLOCK))
        at = block[2][0]
        block[0][at : at + n].copy_(keys.view(-1))
        place = block[1][at : at + n]
        place.fill_(owners) if isinstance(owners, int) else place.copy_(owners)
        block[2][0] = at + n

    def _new_block(self, n: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        size = self.key_dtype.itemsize
        room = workers.carve(self.lent, n * (size + self.owner_dtype.itemsize), self.device)
        if room is None:
            keys, owners = torch.empty(n, dtype=self.key_dtype, device=self.device), torch.empty(n, dtype=self.owner_dtype, device=self.device)
        else:  # keys first: their size is a multiple of the owners'
            keys, owners = room[: n * size].view(self.key_dtype), room[n * size :].view(self.owner_dtype)
        block = (keys, owners, [0])
        self.blocks.append(block)
        return block


class Scan:
    """One group's scan: per piece, entries at or below ``lo`` and the keys in ``(lo, hi]``.

    The fast flavour uses float ops only (``hardshrink`` keeps ``|x| > lambda``) and needs
    finite data and no flushed subnormals; the robust one compares integer keys. Per-job
    results go into tensors made up front (counts per segment, sums per job) and the
    thread's :class:`Found` blocks: nothing is kept per job.
    """

    def __init__(
        self, index: int, pieces: list[Piece], k: int, lo: int, hi: int, robust: bool = False, count_zeros: bool = False, verify: bool = False
    ) -> None:
        self.index, self.pieces, self.k, self.lo, self.hi = index, pieces, k, lo, hi
        self.count_zeros = count_zeros
        self.dtype = pieces[0].values.dtype
        self.robust = robust or flushes_subnormals()
        self.lo_value = float_of(lo, self.dtype) if lo >= 0 else -1.0
        self.hi_value = float_of(hi, self.dtype)
        # jobs of two chunks: the scan's ops are few and cheap, so the Python between them (which
        # holds the GIL) weighs more than a working set that spills from the core's cache
        self.jobs = jobs_for(pieces, 2 * workers.CHUNK)
        device = pieces[0].values.device
        # Per segment (read in finish()), float sums of 0/1 flags (exact: a segment is at most a job
        # (two chunks), far below 2**24). Row 0: eligible entries at or below lo (robust), or at or below
        # hi (fast: those not among the candidates are at or below lo); row 1: zero entries
        # (robust) or nonzero ones (fast).
        self.counts = torch.zeros(2, self.jobs.segments, dtype=torch.float32, device=device)
        # verify: the fast flavour finds NaN and inf among its candidates, except with a bracket
        # from key 0 (lo < 0), where a sum of |x| per job checks instead (NaN, inf, or an overflow
        # send the group to the exact path)
        total = torch.float32 if self.dtype.itemsize < 4 else self.dtype
        self.sums = torch.zeros(len(self.jobs), dtype=total, device=device) if verify and lo < 0 else None
        self.first = 0  # this scan's first owner number (set by scan_all)
        self.found: list[tuple[torch.Tensor, torch.Tensor]] = []  # (keys, owners) runs, set by scan_all

    def run(self, j: int, scratch: dict[Any, Any]) -> None:
        job = self.jobs[j]
        values, eligible = gather(self.pieces, job, scratch)
        if self.robust:
            self._robust(j, job, values, eligible, scratch["found"])
        else:
            self._fast(j, job, values, eligible, scratch)

    def _fast(self, j: int, job: list[Segment], values: torch.Tensor, eligible: torch.Tensor | None, scratch: dict[Any, Any]) -> None:
        # Few, chunk-sized ops (each a pass over the chunk in cache): the Python between them
        # holds the GIL, the ops do not.
        n = values.numel()
        device = values.device
        size = torch.abs(values, out=buffer(scratch, "size", n, values.dtype, device))
        if eligible is not None:  # ineligible entries become the largest float: above the bracket
            size.mul_(eligible).add_(eligible.neg().add_(1), alpha=torch.finfo(values.dtype).max)
        if self.sums is not None:
            torch.sum(size, 0, dtype=self.sums.dtype, out=self.sums[j])
        # 1.0 where |x| is at or below hi (a comparison into a float tensor: as fast as a float op)
        low = torch.le(size, self.hi_value, out=buffer(scratch, "low", n, values.dtype, device))
        self._per_segment(j, job, 0, low)
        inside = buffer(scratch, "inside", n, values.dtype, device)
        if self.lo_value < 0:  # every key is above lo: the candidates are the entries at or below hi
            flags = buffer(scratch, "flags", n, torch.bool, device).copy_(low)
        else:
            # |x| inside (lo, hi], else 0 (hardshrink keeps |x| > lambda). NaN stays NaN and inf
            # gives inf * 0: both are candidates, whose keys lie above hi, and finish() sees them.
            torch.hardshrink(torch.mul(size, low, out=inside), self.lo_value, out=inside)
            flags = buffer(scratch, "flags", n, torch.bool, device).copy_(inside)  # nonzero: a candidate
        if self.count_zeros:
            self._per_segment(j, job, 1, torch.gt(size, 0, out=low))
        int_dtype = KEY_DTYPES[values.dtype][0]
        found: Found = scratch["found"]
        if len(job) > 1 or n % 8:  # packed pieces, or a ragged tail: positions tell the pieces apart
            at = positions(flags.view(torch.uint8))
            found.add(size.index_select(0, at).view(int_dtype), self._owner_of(job, at))
            return
        # Eight flags at a time as one int64: only the groups of eight with a candidate are
        # read. Every result goes into this thread's buffers (out=, sized for the worst case):
        # a worker thread's own heap would keep what such temporaries touched resident.
        hit = torch.nonzero(flags.view(torch.uint8).view(torch.int64), out=buffer(scratch, "hit", n // 8, torch.int64, device, n // 8)[:0])
        hit = hit.view(-1)
        groups = torch.index_select(size.view(-1, 8), 0, hit, out=low[:0])  # low is free again
        marks = torch.index_select(flags.view(-1, 8), 0, hit, out=buffer(scratch, "marks", n, torch.bool, device)[:0])
        inner = torch.nonzero(marks.view(-1), out=buffer(scratch, "inner", n, torch.int64, device)[:0]).view(-1)
        chosen = torch.index_select(groups.view(-1), 0, inner, out=inside[:0])  # and so is inside
        found.add(chosen.view(int_dtype), self.first + job[0][0])

    def _robust(self, j: int, job: list[Segment], values: torch.Tensor, eligible: torch.Tensor | None, found: Found) -> None:
        keys = keys_of(values)
        ok = None if eligible is None else eligible != 0
        low = keys <= self.lo
        inside = (keys > self.lo) & (keys <= self.hi)
        zero = keys == 0
        if ok is not None:
            low &= ok
            inside &= ok
            zero &= ok
        self._per_segment(j, job, 0, low.to(torch.float32))
        if self.count_zeros:
            self._per_segment(j, job, 1, zero.to(torch.float32))
        at = torch.nonzero(inside).view(-1)
        if at.numel():
            found.add(keys.index_select(0, at), self._owner_of(job, at))

    def _per_segment(self, j: int, job: list[Segment], row: int, flags: torch.Tensor) -> None:
        """Sums of 0/1 ``flags`` over each segment of job ``j``, into ``counts[row]``."""
        first = self.jobs.first_segment(j)
        if len(job) == 1:
            torch.sum(flags, 0, dtype=torch.float32, out=self.counts[row, first])
            return
        ends = torch.tensor([0, *(b - a for _, a, b in job)], device=flags.device).cumsum(0)
        sums = torch.cat([flags.new_zeros(1, dtype=torch.float32), flags.cumsum(0, dtype=torch.float32)]).index_select(0, ends)
        self.counts[row, first : first + len(job)] = sums[1:] - sums[:-1]

    def _owner_of(self, job: list[Segment], at: torch.Tensor) -> torch.Tensor | int:
        """The owner number of each candidate at positions ``at`` of a job."""
        if len(job) == 1:
            return self.first + job[0][0]
        starts = torch.tensor([0] + [b - a for _, a, b in job], device=at.device).cumsum(0)[1:-1]
        which = torch.bucketize(at, starts, right=True)
        return torch.tensor([self.first + i for i, _, _ in job], device=at.device).index_select(0, which)

    def finish(self) -> Threshold | None:
        """The cut, or None when the bracket missed or a chunk was not finite."""
        if self.sums is not None and not bool(torch.isfinite(self.sums).all().item()):
            return None
        count = len(self.pieces)
        keys = owner = None
        if self.found:  # (one run: its views as they are; owners stay in their small dtype, as bincount takes them)
            keys = self.found[0][0] if len(self.found) == 1 else torch.cat([keys for keys, _ in self.found])
            owner = self.found[0][1] if len(self.found) == 1 else torch.cat([owners for _, owners in self.found])
            if self.first:
                owner = owner - self.first
            if not self.robust and int(keys.max().item()) > self.hi:  # NaN or inf (fast flavour): the exact path ranks them
                return None
        owner_of_segment = torch.tensor(self.jobs.segment_pieces(), dtype=torch.int64)
        per_piece = torch.zeros(2, count, dtype=torch.float64)
        per_piece.index_add_(1, owner_of_segment, self.counts.to(device="cpu", dtype=torch.float64))
        first_row, second_row = ([int(x) for x in row] for row in per_piece.tolist())
        if self.robust:  # at or below lo, zero entries
            le_lo, zero_count = first_row, second_row
        else:  # at or below hi, nonzero entries
            inside_of = torch.bincount(owner, minlength=count).tolist() if owner is not None else [0] * count
            le_lo = [a - c for a, c in zip(first_row, inside_of)]
            zero_count = [p.numel - z for p, z in zip(self.pieces, second_row)]
        zeros: tuple[int | None, ...] = tuple(z if p.eligible is None and self.count_zeros else None for p, z in zip(self.pieces, zero_count))
        inside = 0 if keys is None else keys.numel()
        if keys is None or owner is None or not sum(le_lo) < self.k <= sum(le_lo) + inside:
            return None
        t = kth(keys, self.k - sum(le_lo))
        below = torch.bincount(owner[keys < t], minlength=count).tolist()
        ties = torch.bincount(owner[keys == t], minlength=count).tolist()
        return make_cut(t, self.k, [a + b for a, b in zip(le_lo, below)], ties, zeros, not self.robust)


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
        firsts = list(itertools.accumulate((len(s.pieces) for s in group), initial=0))
        for s, first in zip(group, firsts):
            s.first, s.found = first, []
        key_dtype = torch.int64 if any(s.dtype == torch.float64 for s in group) else torch.int32
        owner_dtype = torch.int16 if firsts[-1] < 1 << 15 else torch.int32
        found: list[Found] = []

        def job(i: int, scratch: dict[Any, Any], group: list[Scan] = group, starts: list[int] = starts) -> None:
            g = bisect.bisect_right(starts, i) - 1
            group[g].run(i - starts[g], scratch)

        lent = workers.Arena([t for t in arena if t.device == device], workers.worker_count(device, starts[-1]))

        def scratch(
            index: int,
            lent: workers.Arena = lent,
            key_dtype: torch.dtype = key_dtype,
            owner_dtype: torch.dtype = owner_dtype,
            device: torch.device = device,
            found: list[Found] = found,
        ) -> dict[Any, Any]:
            state = lent.scratch(index)
            state["found"] = Found(state, key_dtype, device, owner_dtype)
            found.append(state["found"])
            return state

        workers.run(job, starts[-1], device, scratch)
        # hand each scan its runs of candidates: owners never decrease within a thread's blocks
        bounds = torch.tensor(firsts, dtype=owner_dtype, device=device)
        for f in found:
            for keys, owners, used in f.blocks:
                owners, keys = owners[: used[0]], keys[: used[0]]
                edges = torch.searchsorted(owners, bounds).tolist()
                for s, a, b in zip(group, edges, edges[1:]):
                    if b > a:
                        s.found.append((keys[a:b], owners[a:b]))
