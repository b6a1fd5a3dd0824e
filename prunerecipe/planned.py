"""What a plan is made of: :class:`PlannedTarget` rows, :class:`PlannedStep`, :class:`Plan`
(its dry-run table and JSON), and the masked counts a plan starts from."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .amounts import normalize_dim, sparsity_count
from .blocks import Blocks
from .layout import input_dim
from .methods import ImportanceSpec, MethodSpec
from .methods.binding import argument_default
from .rng import is_random
from .schedule import step_events
from .select import Target
from .spec import Calibration, Recipe, Step
from .structured.planning import PlannedGroup, describe_groups
from .text import format_table, pct, shape_text
from .torchprune import masked_slices, zero_entries


def pruned_entries(target: Target) -> int:
    """Entries of ``target`` masked so far (0 when it is not pruned, or lives on ``meta``)."""
    mask = target.mask
    return 0 if mask is None else zero_entries(mask)


def pruned_slices(target: Target, dim: int) -> int:
    """Slices of ``target`` along ``dim`` that are entirely masked (what torch's container skips)."""
    return masked_slices(target.mask, dim)


class PlannedTarget(NamedTuple):
    """A target of a step with torch-arithmetic projections (``None`` where they depend on values).

    ``exact_before``/``exact_after``: whether those figures are facts (read from masks, or
    computed by torch's arithmetic from facts) rather than depending on weights not looked at.
    """

    target: Target
    units: int
    unit: str
    pruned_before: int
    to_prune: int | None
    entries_before: int
    entries_after: float | None
    numel: int
    exact_before: bool = True
    exact_after: bool = True

    @property
    def qualname(self) -> str:
        return self.target.qualname

    @property
    def sparsity_before(self) -> float:
        return self.entries_before / self.numel if self.numel else 0.0

    @property
    def sparsity_after(self) -> float | None:
        if self.entries_after is None:
            return None
        return self.entries_after / self.numel if self.numel else 0.0

    @property
    def known_before(self) -> float | None:
        """The sparsity before, when it is a fact (else None)."""
        return self.sparsity_before if self.exact_before else None

    @property
    def known_after(self) -> float | None:
        """The sparsity after, when it is a fact (else None)."""
        return self.sparsity_after if self.exact_after else None


@dataclass(frozen=True)
class PlannedStep:
    step: Step
    method: MethodSpec
    targets: tuple[PlannedTarget, ...]
    scheduled: bool
    group_units: int = 0
    group_to_prune: int | None = None
    note: str | None = None
    groups: tuple[PlannedGroup, ...] = ()  # scope: group: the dependency groups, each with its channels
    skipped_groups: tuple[str, ...] = ()  # groups of selected layers left alone, with the reason
    importance: ImportanceSpec | None = None  # None: magnitude, the tensor itself (torch's default)
    calibrated: bool = False  # needs calibration data: run block by block

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.step.args)

    @property
    def how_much(self) -> str:
        """``sparsity=0.5``, ``amount=3``, or an N:M pattern such as ``2:4``."""
        pattern = self.method.nm_pattern(self.step.args)
        return f"{pattern[0]}:{pattern[1]}" if pattern is not None else self.step.how_much

    def live_amount(self, targets: list[Target]) -> int | float | None:
        """The torch ``amount`` for this step on ``targets`` now (one tensor, or a global group):
        as written, or converted from an absolute ``sparsity`` (zero or less: a no-op)."""
        step = self.step
        if step.sparsity is None:
            return step.amount
        if step.scope == "global":
            total = sum(t.original.numel() for t in targets)
            return sparsity_count(step.sparsity, total, sum(pruned_entries(t) for t in targets))
        (t,) = targets
        if self.method.pruning_type == "structured":
            dim = step.args.get("dim", argument_default(self.method, "dim", -1))
            d = normalize_dim(dim, t.original.dim())
            return sparsity_count(step.sparsity, t.original.shape[d], pruned_slices(t, d))
        return sparsity_count(step.sparsity, t.original.numel(), pruned_entries(t))

    def target_kwargs(self, target: Target) -> dict[str, Any]:
        """The method's keyword arguments for one target: ``args``, with an input-dimension
        argument the step leaves out (``semi_structured``'s ``dim``) filled for that tensor."""
        kwargs = dict(self.step.args)
        arg = self.method.input_dim_arg
        if arg is not None and kwargs.get(arg) is None:
            kwargs[arg] = input_dim(target.module, target.param, target.original.dim())
        # an argument the method's constructor defaults but its `apply` requires (torch's
        # LnStructured.apply needs `dim`; LnStructured(dim=-1) does not): the default, as planned
        for name, param in _required_by_apply(self.method.cls).items():
            if name not in kwargs and name in self.method.arguments:
                default = self.method.arguments[name].default
                if default is not param.empty:
                    kwargs[name] = default
        return kwargs


@functools.cache
def _required_by_apply(cls: type) -> dict[str, inspect.Parameter]:
    """Parameters of ``cls.apply`` without a default, besides the module, the name and the amount."""
    try:
        params = inspect.signature(cls.apply).parameters  # type: ignore[attr-defined]
    except (TypeError, ValueError, AttributeError):
        return {}
    return {
        n: p
        for n, p in params.items()
        if p.default is p.empty and n not in ("module", "name", "amount", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


@dataclass(frozen=True)
class Plan:
    """The resolved recipe. ``str(plan)`` is the dry-run table the CLI prints."""

    recipe: Recipe
    steps: tuple[PlannedStep, ...]
    model_type: str = ""
    _final_entries: Mapping[tuple[int, str], tuple[int, float]] = field(default_factory=dict, repr=False)
    _final_exact: bool = field(default=True, repr=False)
    #: figures computed from the weights (``prunerecipe.preview``), not projected
    computed: bool = False
    blocks: Blocks | None = None  # where calibration-based steps run, block by block
    #: zero entries no mask covers, in the targets as computed (a finalized or dense checkpoint's)
    unmasked_zeros: int = 0

    @property
    def needs_calibration(self) -> bool:
        """Whether an unscheduled step needs calibration data (``apply_recipe(..., calibration=...)``)."""
        return any(ps.calibrated and not ps.scheduled for ps in self.steps)

    @property
    def targets(self) -> list[Target]:
        """Every distinct target of the plan, first-seen order."""
        seen: dict[tuple[int, str], Target] = {}
        for ps in self.steps:
            for pt in ps.targets:
                seen.setdefault((id(pt.target.module), pt.target.param), pt.target)
        return list(seen.values())

    def projected_sparsity(self) -> tuple[float | None, float | None]:
        """Masked fraction over all targeted entries: (before, after); None where it depends on
        weights the plan did not look at."""
        first: dict[str, PlannedTarget] = {}
        for ps in self.steps:
            for pt in ps.targets:
                first.setdefault(pt.target.qualname, pt)
        total = sum(n for n, _ in self._final_entries.values())
        after = sum(e for _, e in self._final_entries.values())
        before = sum(pt.entries_before for pt in first.values()) / total if total else 0.0
        known = all(pt.exact_before for pt in first.values())
        return (before if known else None, (after / total if total else 0.0) if self._final_exact else None)

    def to_dict(self) -> dict[str, Any]:
        before, after = self.projected_sparsity()
        return {
            "recipe": self.recipe.source,
            "name": self.recipe.name,
            "model": self.model_type,
            "steps": [
                {
                    "step": ps.step.label,
                    "method": ps.method.name,
                    "amount": ps.step.amount,
                    "sparsity": ps.step.sparsity,
                    "scope": ps.step.scope,
                    "args": dict(ps.step.args),
                    "scheduled": ps.scheduled,
                    "events": [{"unit": e.unit, "time": e.time, "sparsity": e.sparsity, "amount": e.amount} for e in step_events(ps.step)],
                    "group_to_prune": ps.group_to_prune,
                    "note": ps.note,
                    "groups": [pg.to_dict() for pg in ps.groups],
                    "skipped_groups": list(ps.skipped_groups),
                    "importance": ps.importance.name if ps.importance else "magnitude",
                    "calibrated": ps.calibrated,
                    "targets": [
                        {
                            "name": pt.target.qualname,
                            "type": pt.target.module_type,
                            "shape": list(pt.target.shape),
                            "units": pt.units,
                            "unit": pt.unit,
                            "to_prune": pt.to_prune if pt.exact_before else None,  # as the text's "?"
                            "sparsity_before": pt.known_before,
                            "sparsity_after": pt.known_after,
                        }
                        for pt in ps.targets
                    ],
                }
                for ps in self.steps
            ],
            "sparsity_before": before,
            "sparsity_after": after,
            "computed": self.computed,
            "unmasked_zeros": self.unmasked_zeros,
            "blocks": list(self.blocks.names) if self.blocks is not None else None,
        }

    def __str__(self) -> str:
        lines = [
            f"plan: {self.recipe.source}"
            + (f" ({self.recipe.name})" if self.recipe.name else "")
            + (f" on {self.model_type}" if self.model_type else "")
        ]
        for ps in self.steps:
            step = ps.step
            head = f"{step.label}: {ps.method.name} {ps.how_much} scope={step.scope}"
            if ps.importance is not None:
                head += f" importance={ps.importance.name}"
            if step.args:
                head += " args=" + ", ".join(f"{k}={v!r}" for k, v in step.args.items())
            seed = self.recipe.step_seed(step)
            if seed is not None:
                head += f" seed={seed}"
            if ps.scheduled:
                head += "  [scheduled: runs during training, not at apply]"
            lines.append("")
            lines.append(head)
            if ps.scheduled:
                lines.append("  timeline: " + _timeline_text(step))
            if ps.note:
                lines.append(f"  note: {ps.note}")
            if step.scope == "global" and ps.group_to_prune is not None:
                lines.append(f"  global group: {len(ps.targets)} tensors, {ps.group_units} entries, prunes {ps.group_to_prune}")
            if step.scope == "group":
                lines.extend("  " + line for line in describe_groups(ps.groups, ps.skipped_groups))
            rows = [
                [
                    pt.target.qualname,
                    pt.target.module_type,
                    shape_text(pt.target.shape),
                    f"{pt.units} {pt.unit}",
                    "?" if pt.to_prune is None or not pt.exact_before else str(pt.to_prune),
                    "?" if pt.known_before is None else pct(pt.known_before),
                    "?" if pt.known_after is None else pct(pt.known_after),
                ]
                for pt in ps.targets
            ]
            lines.extend("  " + r for r in format_table(["target", "type", "shape", "of", "prunes", "before", "after"], rows))
        before, after = self.projected_sparsity()
        lines.append("")
        how = "computed from the weights" if self.computed else "projected"
        if any(ps.scheduled for ps in self.steps):
            how += "; before the scheduled steps, which run during training"
        lines.append(f"targeted entries masked: {'?' if before is None else pct(before)} -> {'?' if after is None else pct(after)} ({how})")
        unseeded = [ps.step.label for ps in self.steps if not ps.scheduled and is_random(ps.method.cls) and self.recipe.step_seed(ps.step) is None]
        if self.computed and unseeded:
            lines.append(
                f"note: {', '.join(unseeded)} {'is' if len(unseeded) == 1 else 'are'} random without a seed: apply draws other numbers than "
                "this plan did, so per-tensor figures from there on may differ (give the step or the recipe a seed: to repeat them)"
            )
        if self.steps and all(ps.scheduled for ps in self.steps):
            lines.append(
                "note: every step has a schedule: this recipe prunes during training (prunerecipe.Pruner, the Lightning "
                "callback RecipePruning); a one-shot apply refuses it"
            )
        if self.unmasked_zeros:
            lines.append(
                f"note: the weights already hold {self.unmasked_zeros} zero entries that no mask covers (zeros of the weights themselves: "
                "a finalized checkpoint's, zero-initialized biases): "
                "the figures above count masks; apply's report counts zeros, these included"
            )
        if not self.computed and (before is None or after is None or any(pt.known_after is None for ps in self.steps for pt in ps.targets)):
            lines.append(
                "?: depends on the weights (global steps, structured methods, methods without an amount); with real weights, "
                "prunerecipe plan computes them (prunerecipe.preview(model, plan) in code)"
            )
        if self.blocks is not None and self.needs_calibration:
            calibration = self.recipe.calibration or Calibration()
            lines.append(
                f"calibration: {calibration.samples} samples in batches of {calibration.batch_size}, "
                f"through {self.blocks.describe()}; needs data (--calibration, or calibration= in apply_recipe)"
            )
        return "\n".join(lines)


def _timeline_text(step: Step) -> str:
    events = step_events(step)
    unit = events[0].unit if events else "epoch"
    parts = [f"{e.time} -> {pct(e.sparsity)}" if e.sparsity is not None else f"{e.time} -> amount {e.amount}" for e in events]
    shown = parts if len(parts) <= 12 else parts[:6] + ["..."] + parts[-5:]
    return f"{unit} " + ", ".join(shown)
