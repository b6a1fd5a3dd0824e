"""The data of a magnitude select: pieces (the tensors ranked), cuts (what they give up),
integer keys, and how pieces are cut into jobs for the worker threads.

For non-negative floats the IEEE-754 bits, read as an integer (the *key*), order like the
values: ``|w|``'s key is ``w``'s bits with the sign bit cleared.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import workers
from .workers import buffer

# float dtype -> (integer view dtype, mask that clears the sign bit)
KEY_DTYPES = {
    torch.float16: (torch.int16, 0x7FFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF),
}
# float dtype -> the key of its smallest normal number: keys below it are zero or subnormal
SMALLEST_NORMAL_KEY = {torch.float16: 0x0400, torch.bfloat16: 0x0080, torch.float32: 0x00800000, torch.float64: 0x0010000000000000}
# float dtype -> the key of infinity: keys above it are NaN
INF_KEY = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80, torch.float32: 0x7F800000, torch.float64: 0x7FF0000000000000}


#: Groups up to this many entries are selected directly (one ``kthvalue`` over their keys).
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

    def part(self, first: int, count: int) -> Threshold:
        """The cut as it reads for pieces ``first .. first + count`` of its group (renumbered from 0):
        for the pieces one process, or one pass over a stream, holds."""

        def some(values: tuple[Any, ...] | None) -> Any:
            return None if values is None else tuple(values[first : first + count])

        return Threshold(self.key, some(self.quotas), self.nothing, some(self.pruned), some(self.zeros), some(self.ties), self.finite)

    def rule(self, index: int) -> tuple[int, int]:
        """Piece ``index``'s rule ``(below, quota)``: prune keys ``< below``, and then the first
        ``quota`` entries whose key equals ``below`` (0: none)."""
        if self.nothing:
            return 0, 0
        quota = self.quotas[index] if self.quotas is not None else 0
        if quota and self.ties is not None and quota >= self.ties[index]:
            return self.key + 1, 0  # all of this piece's ties: a plain cut for it
        return self.key, quota


def keys_of(flat: torch.Tensor) -> torch.Tensor:
    int_dtype, clear = KEY_DTYPES[flat.dtype]
    return torch.bitwise_and(flat.view(int_dtype), clear)


def key_of(value: float, dtype: torch.dtype) -> int:
    return int(keys_of(torch.tensor([value], dtype=dtype)).item())


def float_of(key: int, dtype: torch.dtype) -> float:
    int_dtype, _ = KEY_DTYPES[dtype]
    return float(torch.tensor([key], dtype=int_dtype).view(dtype).item())


def make_cut(t: int, k: int, below: Sequence[int], ties: Sequence[int], zeros: tuple[int | None, ...] | None, finite: bool) -> Threshold:
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


def stored(keys: torch.Tensor) -> torch.Tensor:
    """Sampled keys as ranked: int32 (int64 for float64 keys)."""
    return keys.to(torch.int64 if keys.dtype == torch.int64 else torch.int32)


Segment = tuple[int, int, int]  # (piece index, start, stop)


class Jobs(Sequence[list[Segment]]):
    """The pieces cut into jobs of at most one chunk: a big piece alone, chunk by chunk; small
    pieces packed together. Job ``j`` lists its segments ``(piece index, start, stop)``.

    Jobs are made when asked for (``jobs[j]``), from one record per big piece or bundle: a scan
    over a big model then keeps no object per chunk, whose memory would stay resident."""

    def __init__(self, pieces: Sequence[Piece], chunk: int | None = None) -> None:
        self.chunk = chunk or workers.CHUNK
        # runs: a big piece (its index and size, then its chunks are jobs) or a bundle (one job)
        self._runs: list[tuple[int, int] | list[Segment]] = []
        bundle: list[Segment] = []
        used = 0
        for i, p in enumerate(pieces):
            if p.numel >= self.chunk // 4:
                self._runs.append((i, p.numel))
                continue
            if used + p.numel > self.chunk:
                self._runs.append(bundle)
                bundle, used = [], 0
            bundle.append((i, 0, p.numel))
            used += p.numel
        self._runs.append(bundle)
        self._runs = [r for r in self._runs if (r[1] if isinstance(r, tuple) else sum(b - a for _, a, b in r))]
        self._first: list[int] = []  # each run's first job
        self._first_segment: list[int] = []  # and first segment
        jobs = segments = 0
        for r in self._runs:
            self._first.append(jobs)
            self._first_segment.append(segments)
            n = -(-r[1] // self.chunk) if isinstance(r, tuple) else 1
            jobs += n
            segments += n if isinstance(r, tuple) else len(r)
        self._count, self.segments = jobs, segments

    def __len__(self) -> int:
        return self._count

    def _locate(self, j: int) -> tuple[int, int]:
        if not 0 <= j < self._count:
            raise IndexError(j)
        r = bisect.bisect_right(self._first, j) - 1
        return r, j - self._first[r]

    def __getitem__(self, j: int) -> list[Segment]:  # type: ignore[override]
        r, c = self._locate(j)
        run = self._runs[r]
        if isinstance(run, list):
            return run
        i, numel = run
        return [(i, c * self.chunk, min((c + 1) * self.chunk, numel))]

    def segment_pieces(self) -> list[int]:
        """The piece index of every segment, in order."""
        out: list[int] = []
        for run in self._runs:
            if isinstance(run, list):
                out.extend(i for i, _, _ in run)
            else:
                out.extend([run[0]] * -(-run[1] // self.chunk))
        return out

    def first_segment(self, j: int) -> int:
        """The index of job ``j``'s first segment, counting the segments of every job before it."""
        r, c = self._locate(j)
        return self._first_segment[r] + c


def jobs_for(pieces: Sequence[Piece], chunk: int | None = None) -> Jobs:
    """The pieces cut into jobs of at most ``chunk`` entries (default :data:`.workers.CHUNK`; see :class:`Jobs`)."""
    return Jobs(pieces, chunk)


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

        def count(j: int, scratch: dict[Any, torch.Tensor], group: list[Piece] = group, jobs: Jobs = jobs, members: list[int] = members) -> None:
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
