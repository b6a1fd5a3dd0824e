"""Pruning during training: the loop-agnostic :class:`~prunerecipe.training.pruner.Pruner`
(schedules come from :mod:`prunerecipe.schedule`) and the Lightning callback
(:mod:`.lightning`, imported on demand since Lightning is optional)."""

from __future__ import annotations

from .pruner import EventResult, Pruner

__all__ = ["EventResult", "Pruner"]
