"""Magnitude pruning without ``topk``: an exact select over the float bits of ``|w|``, run in
cache-sized chunks on worker threads (:mod:`.workers`), and the masks and in-place folds built
from its cuts (:mod:`.masks`). Equal to torch's ``l1_unstructured``/``global_unstructured``.
The same cut is found from histograms (:mod:`.histogram`) where the tensors are never all at
hand: streamed one at a time, or held by several processes."""

from __future__ import annotations

from .cuts import select
from .histogram import DigitCut
from .masks import (
    EXACT_TIES_UP_TO,
    Fold,
    apply_global_cut,
    deferred_interrupts,
    fold,
    fold_into,
    l1_global,
    l1_local,
    l1_local_many,
    piece_for,
    write_keep,
)
from .pieces import Piece, Threshold, census, flushes_subnormals, supported

__all__ = [
    "EXACT_TIES_UP_TO",
    "DigitCut",
    "Fold",
    "Piece",
    "Threshold",
    "apply_global_cut",
    "census",
    "deferred_interrupts",
    "flushes_subnormals",
    "fold",
    "fold_into",
    "l1_global",
    "l1_local",
    "l1_local_many",
    "piece_for",
    "select",
    "supported",
    "write_keep",
]
