"""The exact cut for magnitude pruning: which ``k`` entries of a group of tensors have the
smallest ``|w|``, without ``topk`` and without concatenating the tensors.

For non-negative floats the IEEE-754 bits, read as an integer (the *key*), order like the
values. A cut is a key ``T`` (prune every eligible entry with a smaller key) plus, when
``T`` is tied, how many of its ties each tensor gives up (earliest first, in
``parameters_to_vector`` order). It is found in three stages:

1. a small sample (runs of 64 entries, from a private generator) brackets the k-th value;
2. one parallel scan over the group counts the entries at or below the bracket and
   collects the few inside it (:mod:`.workers`: cache-sized chunks, robust on a busy CPU);
3. the k-th key is picked among those candidates.

If the bracket misses (odd data, heavy ties), an exact histogram of the keys' top bits gives
a bracket that cannot miss, and the scan runs again. Every path is exact; only speed differs.
Finite values are assumed on the fast path (callers refuse NaN and inf); non-finite data is
still ranked as ``torch.topk`` ranks it (NaN above everything) by the exact path.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import workers
from .workers import buffer, stash

# float dtype -> (integer view dtype, mask that clears the sign bit)
KEY_DTYPES = {
    torch.float16: (torch.int16, 0x7FFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF),
}
# float dtype -> the key of its smallest normal number: keys below it are zero or subnormal
SMALLEST_NORMAL_KEY = {torch.float16: 0x0400, torch.bfloat16: 0x0080, torch.float32: 0x00800000, torch.float64: 0x0010000000000000}

#: Groups up to this many entries are selected directly (one ``kthvalue`` over their keys).
DIRECT_UP_TO = workers.CHUNK
_RUN = 16  # entries per sample run (a cache line of float32)
_Z = 5.0  # half-width of the bracket, in standard deviations of the sampled rank
_DIGIT = 16


def supported(t: torch.Tensor) -> bool:
    """Whether the magnitude select handles this tensor (real floating point, not on ``meta``)."""
    return t.dtype in KEY_DTYPES and t.device.type != "meta"


@dataclass
class Piece:
    """One tensor taking part in a select: what is ranked (by ``|values|``), and which
    entries may be pruned (``eligible``, bool or 0/1 of the same shape; None: all)."""

    values: torch.Tensor
    eligible: torch.Tensor | None = None
    _flat: torch.Tensor | None = field(default=None, repr=False)
    _count: int | None = field(default=None, repr=False)

    @property
    def numel(self) -> int:
        return self.values.numel()

    def flat(self) -> torch.Tensor:
        """The values, flat, in logical order (a view when contiguous)."""
        if self._flat is None:
            t = self.values.detach()
            self._flat = t.view(-1) if t.is_contiguous() else t.reshape(-1)
        return self._flat

    def flat_eligible(self) -> torch.Tensor | None:
        """Eligibility as a flat float 0/1 tensor of the values' dtype (None: all eligible)."""
        if self.eligible is None:
            return None
        e = self.eligible.detach().reshape(-1)
        return e.to(self.values.dtype)

    def eligible_count(self) -> int:
        if self._count is None:
            self._count = self.numel if self.eligible is None else int(torch.count_nonzero(self.eligible).item())
        return self._count


@dataclass(frozen=True)
class Threshold:
    """A cut: prune eligible entries whose key is below ``key``; with ``quotas``, also that
    many entries whose key equals ``key``, per piece, earliest first. ``nothing``: prune none.

    ``pruned`` (entries pruned per piece) and ``zeros`` (zero entries per piece before the
    cut, where the scan counted them) come along when known; they are not part of equality.
    """

    key: int
    quotas: tuple[int, ...] | None = None
    nothing: bool = False
    pruned: tuple[int, ...] | None = field(default=None, compare=False)
    zeros: tuple[int | None, ...] | None = field(default=None, compare=False)
    ties: tuple[int, ...] | None = field(default=None, compare=False)
    #: the data was seen to be finite (masks may then be written with float ops)
    finite: bool = field(default=False, compare=False)

    def rule(self, index: int) -> tuple[int, int]:
        """Piece ``index``'s rule ``(below, quota)``: prune keys ``< below``, and then the first
        ``quota`` entries whose key equals ``below`` (0: none)."""
        if self.nothing:
            return 0, 0
        quota = self.quotas[index] if self.quotas is not None else 0
        if quota and self.ties is not None and quota >= self.ties[index]:
            return self.key + 1, 0  # all of this piece's ties: a plain cut for it
        return self.key, quota


def select(
    groups: Sequence[tuple[Sequence[Piece], int]], count_zeros: bool = False, finite: bool = False, arena: torch.Tensor | None = None
) -> list[Threshold]:
    """The cut that prunes exactly the ``k`` smallest-magnitude eligible entries, per group.

    Args:
        groups: ``(pieces, k)`` pairs; all pieces of a group share a dtype and a device.
            ``k`` counts eligible entries (``0 <= k <= eligible entries``).
        count_zeros: also count each fully eligible piece's zero entries (``Threshold.zeros``).
        finite: the caller has checked that every value is finite (else it is checked here,
            and non-finite data is ranked on the exact path, as ``topk`` ranks it).
        arena: a tensor not written yet (a mask to be built) whose memory the scans may use
            as scratch until this returns.

    Returns:
        One :class:`Threshold` per group, with ``pruned`` counts per piece.
    """
    out: list[Threshold | None] = [None] * len(groups)
    sampled: list[tuple[int, list[Piece], int]] = []
    for j, (pieces, k) in enumerate(groups):
        pieces = list(pieces)
        eligible = sum(p.eligible_count() for p in pieces)
        if k <= 0 or not pieces:
            out[j] = Threshold(0, nothing=True, pruned=tuple(0 for _ in pieces))
        elif k >= eligible:  # every eligible entry: a cut above every key
            clear = KEY_DTYPES[pieces[0].values.dtype][1]
            out[j] = Threshold(clear + 1, pruned=tuple(p.eligible_count() for p in pieces))
        elif sum(p.numel for p in pieces) <= DIRECT_UP_TO:
            out[j] = _direct(pieces, k)
        else:
            sampled.append((j, pieces, k))
    brackets: list[tuple[int, int]] = [(0, 0)] * len(sampled)

    def bracket(i: int, _scratch: Any) -> None:
        brackets[i] = _sampled_bracket(sampled[i][1], sampled[i][2])

    if sampled:  # each group's sample drawn and ranked on the worker threads too
        workers.run(bracket, len(sampled), sampled[0][1][0].values.device)
    scans = [_Scan(j, pieces, k, *b, count_zeros=count_zeros, verify=not finite) for (j, pieces, k), b in zip(sampled, brackets)]
    _scan_all(scans, arena)
    retry = []
    for s in scans:
        cut = s.finish()
        if cut is None:  # the sample's bracket missed, or the data is not finite: exact bracket
            retry.append(s)
        else:
            out[s.index] = cut
    if retry:
        exact = [_Scan(s.index, s.pieces, s.k, *_histogram_bracket(s.pieces, s.k), robust=True, count_zeros=count_zeros) for s in retry]
        _scan_all(exact, arena)
        for s in exact:
            cut = s.finish()
            assert cut is not None, "an exact bracket cannot miss"
            out[s.index] = cut
    return [c for c in out if c is not None]


# --- small groups ----------------------------------------------------------------------------


def _keys(flat: torch.Tensor) -> torch.Tensor:
    int_dtype, clear = KEY_DTYPES[flat.dtype]
    return torch.bitwise_and(flat.view(int_dtype), clear)


def _direct(pieces: list[Piece], k: int) -> Threshold:
    keys = [_keys(p.flat()) for p in pieces]
    chosen = [key if p.eligible is None else key[eligible_part(p, 0, p.numel, torch.bool)] for key, p in zip(keys, pieces)]
    every = torch.cat(chosen) if len(chosen) > 1 else chosen[0]
    t = int(torch.kthvalue(every.to(torch.int64) if every.dtype == torch.int16 else every, k).values.item())
    below = [int(torch.count_nonzero(c < t).item()) for c in chosen]
    ties = [int(torch.count_nonzero(c == t).item()) for c in chosen]
    zeros = tuple(int(torch.count_nonzero(key == 0).item()) if p.eligible is None else None for key, p in zip(keys, pieces))
    finite = all(bool(torch.isfinite(p.flat()).all().item()) for p in pieces)
    return _cut(t, k, below, ties, zeros, finite)


def _cut(t: int, k: int, below: Sequence[int], ties: Sequence[int], zeros: tuple[int | None, ...] | None, finite: bool) -> Threshold:
    """The threshold at key ``t`` that prunes ``k`` entries, ``below[i]`` of piece i being under it."""
    remaining = k - sum(below)
    if remaining == sum(ties):  # every entry equal to the k-th is pruned: a plain cut
        return Threshold(t + 1, pruned=tuple(b + s for b, s in zip(below, ties)), zeros=zeros, ties=tuple(ties), finite=finite)
    quotas = []
    for count in ties:
        take = min(count, remaining)
        quotas.append(take)
        remaining -= take
    return Threshold(t, tuple(quotas), pruned=tuple(b + q for b, q in zip(below, quotas)), zeros=zeros, ties=tuple(ties), finite=finite)


# --- brackets ---------------------------------------------------------------------------------


def _key_of(value: float, dtype: torch.dtype) -> int:
    return int(_keys(torch.tensor([value], dtype=dtype)).item())


def _float_of(key: int, dtype: torch.dtype) -> float:
    int_dtype, _ = KEY_DTYPES[dtype]
    return float(torch.tensor([key], dtype=int_dtype).view(dtype).item())


def _sampled_bracket(pieces: list[Piece], k: int) -> tuple[int, int]:
    """Keys ``(lo, hi)`` such that the k-th smallest eligible key lies in ``(lo, hi]``, most likely."""
    total = sum(p.numel for p in pieces)
    # A bigger sample narrows the bracket (fewer candidates to collect and rank) but costs
    # more to draw and rank itself; the two balance near (5 N) ** (2/3) entries.
    wanted = min(1 << 20, max(1 << 12, round((5 * total) ** (2 / 3))))
    gen = torch.Generator(device=pieces[0].values.device).manual_seed(0x5EED)
    samples = []
    for p in pieces:
        flat = p.flat()
        runs = flat.numel() // _RUN
        take = min(runs, max(1, round(wanted / _RUN * p.numel / total)))
        if runs == 0:
            continue
        rows = torch.randint(runs, (take,), generator=gen, device=flat.device)
        keys = _keys(flat[: runs * _RUN].view(runs, _RUN).index_select(0, rows).reshape(-1))
        if p.eligible is not None:
            el = p.eligible.detach().reshape(-1)[: runs * _RUN].view(runs, _RUN).index_select(0, rows).reshape(-1)
            keys = keys[el if el.dtype == torch.bool else el == 1]
        samples.append(_stored(keys))
    if not samples:
        return _histogram_bracket(pieces, k)
    sample = torch.cat(samples)
    m = sample.numel()
    eligible = sum(p.eligible_count() for p in pieces)
    q = k / eligible
    spread = _Z * math.sqrt(max(m * q * (1 - q), 1.0))
    top = _key_of(torch.finfo(pieces[0].values.dtype).max, pieces[0].values.dtype) - 1  # below the largest float
    lo_rank, hi_rank = math.floor(q * m - spread), math.ceil(q * m + spread)
    lo = int(torch.kthvalue(sample, lo_rank).values.item()) if 1 <= lo_rank <= m else -1
    hi = min(int(torch.kthvalue(sample, hi_rank).values.item()), top) if 1 <= hi_rank <= m else top
    if hi <= lo:  # many equal values: bracket exactly their key
        lo = hi - 1
    return lo, hi


def _histogram_bracket(pieces: list[Piece], k: int) -> tuple[int, int]:
    """An exact bracket: the bin of the keys' top 15 bits (below the sign) that holds the
    k-th smallest eligible key. For 16-bit floats the bin is one key."""
    dtype = pieces[0].values.dtype
    shift = torch.iinfo(KEY_DTYPES[dtype][0]).bits - _DIGIT
    bins = 1 << (_DIGIT - 1)
    device = pieces[0].values.device
    jobs = jobs_for(pieces)
    hists: list[torch.Tensor] = []

    def histogram(i: int, scratch: dict[Any, torch.Tensor]) -> None:
        values, eligible = gather(pieces, jobs[i], scratch)
        digits = (_keys(values) >> shift).to(torch.int64)
        if eligible is not None:  # ineligible entries go to an extra bin
            ok = eligible.to(torch.int64)
            digits.mul_(ok).add_(ok.neg_().add_(1), alpha=bins)
        scratch["hist"].add_(torch.bincount(digits, minlength=bins + 1))

    def make(_index: int) -> dict[Any, torch.Tensor]:
        hist = torch.zeros(bins + 1, dtype=torch.int64, device=device)
        hists.append(hist)
        return {"hist": hist}

    workers.run(histogram, len(jobs), device, make)
    cum = torch.cumsum(torch.stack(hists).sum(0)[:bins], 0)
    b = int(torch.searchsorted(cum, torch.tensor([k], device=device, dtype=cum.dtype)).item())
    return (b << shift) - 1, ((b + 1) << shift) - 1


# --- the scan ---------------------------------------------------------------------------------


def jobs_for(pieces: Sequence[Piece]) -> list[list[tuple[int, int, int]]]:
    """The pieces cut into jobs of at most one chunk: a big piece alone, chunk by chunk; small
    pieces packed together. Each job lists its segments ``(piece index, start, stop)``."""
    jobs: list[list[tuple[int, int, int]]] = []
    bundle: list[tuple[int, int, int]] = []
    used = 0
    for i, p in enumerate(pieces):
        if p.numel >= workers.CHUNK // 4:
            jobs.extend([[(i, a, b)] for a, b in workers.chunks(p.numel)])
            continue
        if used + p.numel > workers.CHUNK:
            jobs.append(bundle)
            bundle, used = [], 0
        bundle.append((i, 0, p.numel))
        used += p.numel
    if bundle:
        jobs.append(bundle)
    return [job for job in jobs if sum(b - a for _, a, b in job)]


def eligible_part(piece: Piece, a: int, b: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Entries ``a:b`` of the piece's eligibility as 1/0 of ``dtype`` (torch's rule: ``mask == 1``)."""
    if piece.eligible is None:
        return None
    part = piece.eligible.detach().reshape(-1)[a:b]
    return (part if part.dtype == torch.bool else part == 1).to(dtype)


def gather(pieces: Sequence[Piece], job: list[tuple[int, int, int]], scratch: dict[Any, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A job's values, flat (a view for one segment, packed into scratch for several), and
    their eligibility (None when every entry is eligible)."""
    first = pieces[job[0][0]].flat()
    if len(job) == 1:
        i, a, b = job[0]
        return pieces[i].flat()[a:b], eligible_part(pieces[i], a, b, first.dtype)
    n = sum(b - a for _, a, b in job)
    values = buffer(scratch, "values", n, first.dtype, first.device)
    eligible = None
    if any(pieces[i].eligible is not None for i, _, _ in job):
        eligible = buffer(scratch, "eligible", n, first.dtype, first.device)
    off = 0
    for i, a, b in job:
        values[off : off + b - a].copy_(pieces[i].flat()[a:b])
        if eligible is not None:
            part = eligible_part(pieces[i], a, b, first.dtype)
            eligible[off : off + b - a].copy_(part) if part is not None else eligible[off : off + b - a].fill_(1)
        off += b - a
    return values, eligible


class _Scan:
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
        self.lo_value = _float_of(lo, self.dtype) if lo >= 0 else -1.0
        self.hi_value = _float_of(hi, self.dtype)
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
            self.found[j] = (stash(scratch, _stored(size.index_select(0, at).view(int_dtype))), stash(scratch, self._piece_of(j, at)))
            return
        # eight flags at a time as one int64: only the groups of eight with a candidate are read
        hit = torch.nonzero(flags.view(torch.uint8).view(torch.int64)).view(-1)
        groups = size.view(-1, 8).index_select(0, hit)
        chosen = torch.masked_select(groups, flags.view(-1, 8).index_select(0, hit))
        self.found[j] = (stash(scratch, _stored(chosen.view(int_dtype))), job[0][0])

    def _robust(self, j: int, values: torch.Tensor, eligible: torch.Tensor | None) -> None:
        keys = _keys(values)
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
            self.found[j] = (_stored(keys.index_select(0, at)), self._piece_of(j, at))

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
        return _cut(t, self.k, [a + b for a, b in zip(le_lo, below)], ties, tuple(zeros), not self.robust)


def _stored(keys: torch.Tensor) -> torch.Tensor:
    """Candidate keys as kept until the pick: int32 (int64 for float64 keys)."""
    return keys if keys.dtype == torch.int64 else keys.to(torch.int32)


def positions(flags: torch.Tensor) -> torch.Tensor:
    """Indices of the nonzero bytes of ``flags``: eight bytes are tested at a time as one int64."""
    n = flags.numel()
    whole = n - n % 8
    found = []
    if whole:
        words = flags[:whole].view(torch.int64)
        hit = torch.nonzero(words).view(-1)
        if hit.numel():
            inner = torch.nonzero(flags[:whole].view(-1, 8).index_select(0, hit))
            found.append(hit.index_select(0, inner[:, 0]) * 8 + inner[:, 1])
    if whole < n:
        found.append(torch.nonzero(flags[whole:]).view(-1) + whole)
    if not found:
        return torch.zeros(0, dtype=torch.int64, device=flags.device)
    return torch.cat(found) if len(found) > 1 else found[0]


def kth(keys: torch.Tensor, r: int) -> int:
    """The ``r``-th smallest (1-based) of integer ``keys`` (>= 0): narrowed by 16-bit histograms while big."""
    while keys.numel() > DIRECT_UP_TO:
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


def _scan_all(scans: list[_Scan], arena: torch.Tensor | None = None) -> None:
    """Every group's scan, one parallel run per device (one pass over all their chunks)."""
    by_device: dict[torch.device, list[tuple[_Scan, int]]] = {}
    for s in scans:
        by_device.setdefault(s.pieces[0].values.device, []).extend((s, j) for j in range(len(s.jobs)))
    for device, jobs in by_device.items():
        lent = workers.Arena(arena if arena is not None and arena.device == device else None, workers.worker_count(device, len(jobs)))
        workers.run_each([functools.partial(scan.run, j) for scan, j in jobs], device, lent.scratch)


def census(tensors: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """``(zero entries, non-finite entries)`` of each floating-point tensor, in one parallel pass
    per dtype and device."""
    pieces = [Piece(t) for t in tensors]
    zeros = [0] * len(pieces)
    bad = [0] * len(pieces)
    lock = threading.Lock()
    kinds: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        kinds.setdefault((t.dtype, t.device), []).append(i)
    for (_, device), members in kinds.items():
        group = [pieces[i] for i in members]
        jobs = jobs_for(group)

        def count(j: int, scratch: dict[Any, torch.Tensor], group: list[Piece] = group, jobs: list = jobs, members: list[int] = members) -> None:
            values, _ = gather(group, jobs[j], scratch)
            seg = [(members[i], off, off + b - a) for (i, a, b), off in zip(jobs[j], _offsets(jobs[j]))]
            if bool(torch.isfinite(values.sum()).item()):  # (no scratch: census runs before any mask exists)
                found = [(i, (b - a) - int(torch.count_nonzero(values[a:b]).item()), 0) for i, a, b in seg]
            else:
                found = [
                    (i, int(torch.count_nonzero(values[a:b] == 0).item()), int(torch.count_nonzero(~torch.isfinite(values[a:b])).item()))
                    for i, a, b in seg
                ]
            with lock:
                for i, z, n in found:
                    zeros[i] += z
                    bad[i] += n

        workers.run(count, len(jobs), device, lambda _: {})
    return list(zip(zeros, bad))


def _offsets(job: list[tuple[int, int, int]]) -> list[int]:
    out, off = [], 0
    for _, a, b in job:
        out.append(off)
        off += b - a
    return out


# The smallest positive subnormal float32, made from its bits (a float literal would itself be
# flushed to zero when the module is imported with flush-to-zero on).
_SUBNORMAL = torch.tensor([1], dtype=torch.int32).view(torch.float32)


def flushes_subnormals() -> bool:
    """Whether ``torch.set_flush_denormal(True)`` is in effect (float compares then see
    subnormals as zero, so only integer keys rank them as torch's own ``topk`` sees them)."""
    return not bool(_SUBNORMAL.ne(0).item())
