"""Structured pruning that makes models smaller: dependency groups and physical compaction.

``scope: group`` steps mask the same channels in every layer of a dependency group
(:mod:`.groups`, :mod:`.masks`, planned by :mod:`.planning`); :func:`compact` removes the
channels masked across their whole group (:mod:`.compact`) and leaves a record of them
(:mod:`.record`) so that a saved compacted model loads into a freshly built one.
torch-pruning (``pip install "prunerecipe[structured]"``) builds the graphs (:mod:`.graph`),
imported on first use.
"""

from __future__ import annotations

from .compact import Compaction, RemovedGroup, compact

__all__ = ["Compaction", "RemovedGroup", "compact"]
