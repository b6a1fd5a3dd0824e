"""The exact cut of a magnitude select found from histograms, 16 bits of the key per pass, for
data that is never all in one place: tensors streamed from a file one at a time, or held by
the different processes of a ``torch.distributed`` job.

Each pass counts, per piece, the next 16-bit digit of every eligible key inside the range the
digits chosen so far leave open; the histograms are summed (over the pieces, and by a
``reduce`` callback over processes: an all-reduce), the digit that holds the k-th smallest key
is chosen, and the next pass narrows to it. 16-bit floats take one pass, float32 two, float64
four. The result is the :class:`~.pieces.Threshold` :func:`~.cuts.select` gives for the same
pieces: the k-th smallest key, and the ties at it split earliest first in piece order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import workers
from .pieces import KEY_DTYPES, Piece, Threshold, eligible_part, key_of, keys_of, make_cut

DIGIT = 16
_BINS = 1 << DIGIT
_SPAN = 1 << 20  # entries keyed at a time: bounded scratch, whatever the tensor's size


class DigitCut:
    """The cut that prunes the ``k`` smallest-magnitude eligible entries of a group of pieces,
    found pass by pass: call :meth:`add` once per piece, then :meth:`end_pass`, until
    :attr:`done`; then :meth:`threshold`.

    Args:
        dtype: the pieces' dtype (all pieces share it).
        pieces: how many pieces this process adds (their indices are ``range(pieces)``).
        k: entries to prune (counted over every process's pieces when ``reduce`` sums them), or
            a function of the group's eligible entries (known after the first pass) that gives it.
        reduce: sums a histogram over processes (``None``: the pieces added here are all).
    """

    def __init__(
        self, dtype: torch.dtype, pieces: int, k: int | Callable[[int], int], reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> None:
        clear = KEY_DTYPES[dtype][1]
        bits = clear.bit_length()  # 15, 31 or 63 bits below the sign
        self.dtype = dtype
        self._k_of = k if callable(k) else None
        self.k = k if isinstance(k, int) else 0
        self.reduce = reduce
        self.shifts = list(range(((bits - 1) // DIGIT) * DIGIT, -1, -DIGIT))
        self.level = 0
        self.prefix = 0  # the digits chosen so far
        self.below_all = 0  # eligible keys (all processes) under the range still open
        self.below = [0] * pieces  # the same, per piece added here
        self.ties = [0] * pieces  # per piece: keys equal to the cut (once done)
        self.eligible: list[int] = [0] * pieces  # per piece: eligible entries (from the first pass)
        self.zeros: list[int] = [0] * pieces  # per piece: eligible entries that are zero (from the first pass)
        self.total_eligible: int | None = None
        self.nonfinite = 0  # NaN and inf among the eligible entries (all processes)
        self.key: int | None = None
        self._hist = torch.zeros(_BINS, dtype=torch.int64)
        self._parts: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * pieces
        self._result: Threshold | None = None

    @property
    def done(self) -> bool:
        """Whether the cut is known (no more passes)."""
        return self._result is not None or self.key is not None

    @property
    def passes(self) -> int:
        """Passes this dtype takes at most."""
        return len(self.shifts)

    def add(self, index: int, piece: Piece) -> None:
        """Count piece ``index`` (what is ranked, and which entries are eligible) for this pass."""
        if self.done:
            raise RuntimeError("the cut is known already")
        if piece.values.dtype != self.dtype:
            raise TypeError(f"piece {index} is {piece.values.dtype}, the cut ranks {self.dtype}")
        shift = self.shifts[self.level]
        flat = piece.flat()
        spans = workers.chunks(flat.numel(), _SPAN)
        hists: list[torch.Tensor] = []

        wide = shift > 0  # the first digit is not the whole key: zeros are counted apart
        bins = _BINS >> 1 if self.level == 0 else _BINS  # the first digit holds the 15 bits under the sign
        zeros: list[int] = []

        def count(j: int, hist: torch.Tensor) -> None:
            a, b = spans[j]
            keys = keys_of(flat[a:b])
            ok = eligible_part(piece, a, b, torch.bool)
            if ok is not None:
                keys = keys[ok]
            if self.level == 0 and wide:
                zeros.append(keys.numel() - int(torch.count_nonzero(keys).item()))
            if self.level:
                keys = keys[(keys >> (shift + DIGIT)) == self.prefix]
                digits = (keys >> shift) & (_BINS - 1) if shift else keys & (_BINS - 1)
            else:
                digits = keys >> shift if shift else keys
            if digits.numel():
                hist[:bins] += torch.bincount(digits, minlength=bins)

        def make(_index: int) -> torch.Tensor:
            hist = torch.zeros(_BINS, dtype=torch.int64)
            hists.append(hist)
            return hist

        workers.run(count, len(spans), flat.device, make)  # chunks on the worker threads, a histogram each
        hist = hists[0] if len(hists) == 1 else torch.stack(hists).sum(0) if hists else torch.zeros(_BINS, dtype=torch.int64)
        self._hist += hist
        at = torch.nonzero(hist).view(-1)
        self._parts[index] = (at, hist.index_select(0, at))
        if self.level == 0:
            self.eligible[index] = int(hist.sum().item())
            self.zeros[index] = sum(zeros) if wide else int(hist[0].item())

    def end_pass(self) -> None:
        """Sum this pass's histograms and choose the digit that holds the k-th smallest key."""
        total = self._hist if self.reduce is None else self.reduce(self._hist)
        shift = self.shifts[self.level]
        if self.level == 0:
            self.total_eligible = int(total.sum().item())
            if self._k_of is not None:
                self.k = self._k_of(self.total_eligible)
            inf = key_of(float("inf"), self.dtype)
            self.nonfinite = int(total[inf >> shift :].sum().item())
            if self.k <= 0:
                self._result = Threshold(0, nothing=True, pruned=tuple(0 for _ in self.below), finite=not self.nonfinite)
                return
            if self.k >= self.total_eligible:  # every eligible entry: a cut above every key
                clear = KEY_DTYPES[self.dtype][1]
                self._result = Threshold(clear + 1, pruned=tuple(self.eligible), finite=not self.nonfinite)
                return
        rank = self.k - self.below_all
        cum = torch.cumsum(total, 0)
        digit = int(torch.searchsorted(cum, torch.tensor([rank], dtype=cum.dtype)).item())
        self.below_all += int(cum[digit - 1].item()) if digit else 0
        for i, part in enumerate(self._parts):
            if part is None:
                continue
            at, counts = part
            self.below[i] += int(counts[at < digit].sum().item())
            self.ties[i] = int(counts[at == digit].sum().item())
        self.prefix = (self.prefix << DIGIT) | digit if self.level else digit
        self._parts = [None] * len(self._parts)
        self._hist.zero_()
        if self.level == len(self.shifts) - 1:
            self.key = self.prefix
        else:
            self.level += 1
            self.ties = [0] * len(self.ties)

    def threshold(self, below: Sequence[int] | None = None, ties: Sequence[int] | None = None) -> Threshold:
        """The cut, as :func:`~.cuts.select` gives it. ``below`` and ``ties`` (keys under and at
        the cut, per piece of the whole group, in the group's order) default to this process's."""
        if self._result is not None:
            return self._result
        if self.key is None:
            raise RuntimeError("the cut is not known yet: more passes are needed")
        return make_cut(
            self.key, self.k, list(self.below if below is None else below), list(self.ties if ties is None else ties), None, not self.nonfinite
        )


def find_cut(pieces: Sequence[Piece], k: int) -> Threshold:
    """:class:`DigitCut` over pieces that are all at hand (what a test compares with ``select``)."""
    cut = DigitCut(pieces[0].values.dtype, len(pieces), k)
    while not cut.done:
        for i, p in enumerate(pieces):
            cut.add(i, p)
        cut.end_pass()
    return cut.threshold()
