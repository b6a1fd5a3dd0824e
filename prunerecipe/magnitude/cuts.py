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

import math
from collections.abc import Sequence
from typing import Any

import torch

from . import workers
from .pieces import KEY_DTYPES, Piece, Threshold, eligible_part, gather, jobs_for, key_of, keys_of, make_cut, stored
from .scan import Scan, scan_all

DIRECT_UP_TO = workers.CHUNK
_RUN = 16  # entries per sample run (a cache line of float32)
_Z = 5.0  # half-width of the bracket, in standard deviations of the sampled rank
_DIGIT = 16


def select(
    groups: Sequence[tuple[Sequence[Piece], int]], count_zeros: bool = False, finite: bool = False, arena: Sequence[torch.Tensor] = ()
) -> list[Threshold]:
    """The cut that prunes exactly the ``k`` smallest-magnitude eligible entries, per group.

    Args:
        groups: ``(pieces, k)`` pairs; all pieces of a group share a dtype and a device.
            ``k`` counts eligible entries (``0 <= k <= eligible entries``).
        count_zeros: also count each fully eligible piece's zero entries (``Threshold.zeros``).
        finite: the caller has checked that every value is finite (else it is checked here,
            and non-finite data is ranked on the exact path, as ``topk`` ranks it).
        arena: tensors not written yet (masks to be built) whose memory the scans may use
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
    if not sampled:
        return [c for c in out if c is not None]
    # Samples are drawn and ranked in this thread: what torch allocates for them (kthvalue
    # copies its input) then comes from this thread's heap, which trim_heap hands back whole;
    # a worker thread's heap keeps its top resident (glibc trims only the main arena's top).
    # Their ops are small and many (a few per tensor): single-threaded (see inline_ops).
    device = sampled[0][1][0].values.device
    with workers.inline_ops(device):
        drawn = [_sampled_bracket(pieces, k) for _, pieces, k in sampled]
    brackets = [_histogram_bracket(pieces, k) if b is None else b for (_, pieces, k), b in zip(sampled, drawn)]
    scans = [Scan(j, pieces, k, *b, count_zeros=count_zeros, verify=not finite) for (j, pieces, k), b in zip(sampled, brackets)]
    scan_all(scans, arena)
    retry = []
    with workers.inline_ops(device):
        finished = [s.finish() for s in scans]
    for s, cut in zip(scans, finished):
        if cut is None:  # the sample's bracket missed, or the data is not finite: exact bracket
            retry.append(s)
        else:
            out[s.index] = cut
    if retry:
        exact = [Scan(s.index, s.pieces, s.k, *_histogram_bracket(s.pieces, s.k), robust=True, count_zeros=count_zeros) for s in retry]
        scan_all(exact, arena)
        for s in exact:
            cut = s.finish()
            assert cut is not None, "an exact bracket cannot miss"
            out[s.index] = cut
    return [c for c in out if c is not None]


# --- small groups ----------------------------------------------------------------------------


def _direct(pieces: list[Piece], k: int) -> Threshold:
    keys = [keys_of(p.flat()) for p in pieces]
    chosen = [key if p.eligible is None else key[eligible_part(p, 0, p.numel, torch.bool)] for key, p in zip(keys, pieces)]
    every = torch.cat(chosen) if len(chosen) > 1 else chosen[0]
    t = int(torch.kthvalue(every.to(torch.int64) if every.dtype == torch.int16 else every, k).values.item())
    below = [int(torch.count_nonzero(c < t).item()) for c in chosen]
    ties = [int(torch.count_nonzero(c == t).item()) for c in chosen]
    zeros = tuple(int(torch.count_nonzero(key == 0).item()) if p.eligible is None else None for key, p in zip(keys, pieces))
    finite = all(bool(torch.isfinite(p.flat()).all().item()) for p in pieces)
    return make_cut(t, k, below, ties, zeros, finite)


# --- brackets ---------------------------------------------------------------------------------


def _sampled_bracket(pieces: list[Piece], k: int) -> tuple[int, int] | None:
    """Keys ``(lo, hi)`` such that the k-th smallest eligible key lies in ``(lo, hi]``, most
    likely; None when the pieces are too small to sample (runs of ``_RUN`` entries)."""
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
        keys = keys_of(flat[: runs * _RUN].view(runs, _RUN).index_select(0, rows).reshape(-1))
        if p.eligible is not None:
            el = p.eligible.detach().reshape(-1)[: runs * _RUN].view(runs, _RUN).index_select(0, rows).reshape(-1)
            keys = keys[el if el.dtype == torch.bool else el == 1]
        samples.append(stored(keys))
    if not samples:
        return None
    sample = torch.cat(samples)
    m = sample.numel()
    eligible = sum(p.eligible_count() for p in pieces)
    q = k / eligible
    spread = _Z * math.sqrt(max(m * q * (1 - q), 1.0))
    top = key_of(torch.finfo(pieces[0].values.dtype).max, pieces[0].values.dtype) - 1  # below the largest float
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
        digits = (keys_of(values) >> shift).to(torch.int64)
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
