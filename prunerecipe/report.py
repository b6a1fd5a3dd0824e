"""Sparsity measurement and the :class:`Report` that ``apply_recipe`` returns."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .structured import Compaction
from .text import format_table, listing, pct, shape_text
from .torchprune import count_zeros, original


@dataclass(frozen=True)
class TargetSparsity:
    """Zero counts of one parameter before and after a recipe."""

    name: str
    module_type: str
    shape: tuple[int, ...]
    zeros_before: int
    zeros_after: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def before(self) -> float:
        return self.zeros_before / self.numel if self.numel else 0.0

    @property
    def after(self) -> float:
        return self.zeros_after / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class StepOutcome:
    """What one step did: its targets, a note for no-ops and skipped (scheduled) steps, and the
    tensors whose values it rewrote (SparseGPT), not only masked."""

    label: str
    method: str
    targets: tuple[str, ...]
    note: str | None = None
    rewritten: tuple[str, ...] = ()


@dataclass(frozen=True)
class Report:
    """Per-target and global sparsity before and after ``apply_recipe``.

    Sparsity counts zero entries of the effective parameters (``orig * mask``), as
    ``torch.sum(module.weight == 0)`` would after a forward pass.
    """

    targets: tuple[TargetSparsity, ...]
    steps: tuple[StepOutcome, ...] = ()
    finalized: bool = False
    recipe: str = ""
    skipped: tuple[str, ...] = field(default=())
    compaction: Compaction | None = None  # finalize: compact: what was removed, and the cost before and after
    calibration: tuple[int, int] | None = None  # (samples used, samples asked for) when a step ran on calibration data

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.targets)

    @property
    def global_before(self) -> float:
        n = self.numel
        return sum(t.zeros_before for t in self.targets) / n if n else 0.0

    @property
    def global_after(self) -> float:
        n = self.numel
        return sum(t.zeros_after for t in self.targets) / n if n else 0.0

    def __getitem__(self, name: str) -> TargetSparsity:
        for t in self.targets:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "finalized": self.finalized,
            "targets": [
                {
                    "name": t.name,
                    "type": t.module_type,
                    "shape": list(t.shape),
                    "numel": t.numel,
                    "zeros_before": t.zeros_before,
                    "zeros_after": t.zeros_after,
                    "sparsity_before": t.before,
                    "sparsity_after": t.after,
                }
                for t in self.targets
            ],
            "steps": [
                {"step": s.label, "method": s.method, "targets": list(s.targets), "note": s.note, "rewritten": list(s.rewritten)} for s in self.steps
            ],
            "skipped": list(self.skipped),
            "global": {"numel": self.numel, "sparsity_before": self.global_before, "sparsity_after": self.global_after},
            "compaction": None if self.compaction is None else self.compaction.to_dict(),
            "calibration": None if self.calibration is None else {"samples": self.calibration[0], "asked": self.calibration[1]},
        }

    def __str__(self) -> str:
        rows = [[t.name, t.module_type, shape_text(t.shape), str(t.numel), pct(t.before), pct(t.after)] for t in self.targets]
        lines = format_table(["parameter", "type", "shape", "entries", "before", "after"], rows)
        lines.append(f"global: {self.numel} entries, sparsity {pct(self.global_before)} -> {pct(self.global_after)}")
        for s in self.steps:
            if s.note:
                lines.append(f"{s.label}: {s.note}")
            if s.rewritten:
                lines.append(
                    f"{s.label}: {listing(f'rewrote the values of {len(s.rewritten)} tensor(s) (in *_orig; masks as usual)', s.rewritten, 4)}"
                )
        if self.calibration is not None:
            used, asked = self.calibration
            lines.append(f"calibration: {used} sample(s)" + (f", of the {asked} asked for: the data ran out" if used < asked else ""))
        for label in self.skipped:
            lines.append(f"{label}: skipped (has a schedule; runs during training)")
        if self.finalized:
            lines.append("finalized: masks folded into the parameters (torch.nn.utils.prune.remove)")
        if self.compaction is not None:
            lines.append(str(self.compaction))
        return "\n".join(lines)


def measure(
    targets: Iterable[tuple[str, nn.Module, str]], known: dict[tuple[int, str], int] | None = None
) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """``{qualname: (module type, shape, zeros)}`` for each ``(qualname, module, param)``;
    zero counts found in ``known`` (keyed by ``(id(module), param)``) are taken from there."""
    out = {}
    scratch: dict[Any, Any] = {}
    for name, module, param in targets:
        zeros = known.get((id(module), param)) if known else None
        shape = tuple(original(module, param).shape)
        out[name] = (type(module).__name__, shape, count_zeros(module, param, scratch) if zeros is None else zeros)
    return out
