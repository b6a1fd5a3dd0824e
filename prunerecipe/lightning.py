"""``from prunerecipe.lightning import RecipePruning``: the Lightning callback
(:mod:`prunerecipe.training.lightning`), under its documented import path."""

from __future__ import annotations

from .training.lightning import AcceptFolded, RecipePruning

__all__ = ["AcceptFolded", "RecipePruning"]
