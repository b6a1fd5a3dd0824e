"""Sparsity measurement and the :class:`Report` that ``apply_recipe`` returns."""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .selectors import is_pruned_param


def pct(x: float) -> str:
    return f"{100.0 * x:.2f}%"


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip()] + [fmt.format(*r).rstrip() for r in rows]


_CHUNK = 1 << 18  # float32 sums of 0/1 values are exact far beyond this (below 2**24)


@torch.no_grad()
def zero_entries(tensor: torch.Tensor, mask: torch.Tensor | None = None, scratch: dict | None = None) -> int:
    """Entries of ``tensor`` that are zero, or masked out by ``mask`` (0 for ``meta`` tensors).

    Counts with float sums over chunks (exact, and far faster than ``count_nonzero`` or
    summing bools on CPU) in two small buffers, reused through ``scratch`` across calls.
    """
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return 0
    flat = tensor.detach().reshape(-1)
    flat_mask = mask.detach().reshape(-1) if mask is not None else None
    scratch = {} if scratch is None else scratch
    key = str(flat.device)
    if key not in scratch:
        scratch[key] = (torch.empty(_CHUNK, dtype=torch.float32, device=flat.device), torch.empty(_CHUNK, dtype=torch.float32, device=flat.device))
    hits_all, other_all = scratch[key]
    total = 0
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK]
        n = part.numel()
        hits = hits_all[:n]
        torch.eq(part, 0, out=hits)
        if flat_mask is not None:
            other = other_all[:n]
            torch.eq(flat_mask[start : start + n], 0, out=other)
            torch.maximum(hits, other, out=hits)
        total += int(hits.sum().item())
    return total


def count_zeros(module: nn.Module, param: str, scratch: dict | None = None) -> int:
    """Zero entries of the parameter as the model computes with it (``orig * mask`` when pruned)."""
    if is_pruned_param(module, param):
        orig = module._parameters[param + "_orig"]
        mask = module._buffers[param + "_mask"]
        assert orig is not None and mask is not None
        return zero_entries(orig, mask, scratch)
    tensor = module._parameters[param]
    assert tensor is not None
    return zero_entries(tensor, None, scratch)


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
    """What one step did: its targets, and a note for no-ops and skipped (scheduled) steps."""

    label: str
    method: str
    targets: tuple[str, ...]
    note: str | None = None


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
            "steps": [{"step": s.label, "method": s.method, "targets": list(s.targets), "note": s.note} for s in self.steps],
            "skipped": list(self.skipped),
            "global": {"numel": self.numel, "sparsity_before": self.global_before, "sparsity_after": self.global_after},
        }

    def __str__(self) -> str:
        rows = [
            [t.name, t.module_type, "x".join(map(str, t.shape)) or "scalar", str(t.numel), pct(t.before), pct(t.after)]
            for t in self.targets
        ]
        lines = format_table(["parameter", "type", "shape", "entries", "before", "after"], rows)
        lines.append(f"global: {self.numel} entries, sparsity {pct(self.global_before)} -> {pct(self.global_after)}")
        for s in self.steps:
            if s.note:
                lines.append(f"{s.label}: {s.note}")
        for label in self.skipped:
            lines.append(f"{label}: skipped (has a schedule; runs during training)")
        if self.finalized:
            lines.append("finalized: masks folded into the parameters (torch.nn.utils.prune.remove)")
        return "\n".join(lines)


def measure(
    targets: Iterable[tuple[str, nn.Module, str]], known: dict[tuple[int, str], int] | None = None
) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """``{qualname: (module type, shape, zeros)}`` for each ``(qualname, module, param)``;
    zero counts found in ``known`` (keyed by ``(id(module), param)``) are taken from there."""
    out = {}
    scratch: dict = {}
    for name, module, param in targets:
        tensor = module._parameters.get(param + "_orig") if is_pruned_param(module, param) else module._parameters[param]
        assert tensor is not None
        zeros = known.get((id(module), param)) if known else None
        out[name] = (type(module).__name__, tuple(tensor.shape), count_zeros(module, param, scratch) if zeros is None else zeros)
    return out
