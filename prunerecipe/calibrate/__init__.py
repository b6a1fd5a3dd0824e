"""One-shot pruning with importance scores and calibration data: the data (:mod:`.data`),
input statistics collected with hooks (:mod:`.stats`), SparseGPT's algorithm
(:mod:`.sparsegpt`), pruning a tensor by scores (:mod:`.scored`) and the block-by-block
runner (:mod:`.runner`)."""

from __future__ import annotations

from .data import Batch, call_calibration, draw_batches, load_calibration
from .runner import Current, run_calibrated
from .scored import importance_scores, prune_scored
from .sparsegpt import sparsegpt

__all__ = [
    "Batch",
    "Current",
    "call_calibration",
    "draw_batches",
    "importance_scores",
    "load_calibration",
    "prune_scored",
    "run_calibrated",
    "sparsegpt",
]
