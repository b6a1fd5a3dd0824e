"""Recipe + model -> :class:`Plan`: every step resolved to its targets, nothing changed.

The plan also projects how much each step prunes, following torch's arithmetic
(``round(amount * unpruned)`` for a float amount, the count itself for an int).
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from .errors import Problem, RecipeError
from .methods import MethodError, MethodSpec, get_method
from .recipe import Recipe, Step, load_recipe
from .selectors import SelectorError, Target, is_pruned_param, param_owners, resolve_targets


def nparams_to_prune(amount: int | float, size: int) -> int:
    """torch's ``_compute_nparams_toprune``: an int is a count, a float a fraction rounded half-to-even."""
    if isinstance(amount, numbers.Integral):
        return int(amount)
    return round(amount * size)


def _is_meta(t: torch.Tensor) -> bool:
    return t.device.type == "meta"


def pruned_entries(target: Target) -> int:
    """Entries of ``target`` masked so far (0 when it is not pruned, or lives on ``meta``)."""
    mask = target.mask
    if mask is None or _is_meta(mask):
        return 0
    return int(mask.numel() - torch.count_nonzero(mask).item())


def pruned_slices(target: Target, dim: int) -> int:
    """Slices along ``dim`` that are entirely masked (what torch's container skips)."""
    mask = target.mask
    if mask is None or _is_meta(mask):
        return 0
    other = [d for d in range(mask.dim()) if d != dim]
    alive = mask.sum(dim=other) != 0 if other else mask != 0
    return int(mask.shape[dim] - torch.count_nonzero(alive).item())


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


@dataclass(frozen=True)
class PlannedTarget:
    """A target of a step with torch-arithmetic projections (``None`` where they depend on values)."""

    target: Target
    units: int
    unit: str
    pruned_before: int
    to_prune: int | None
    entries_before: int
    entries_after: float | None

    @property
    def qualname(self) -> str:
        return self.target.qualname

    @property
    def numel(self) -> int:
        return self.target.original.numel()

    @property
    def sparsity_before(self) -> float:
        return self.entries_before / self.numel if self.numel else 0.0

    @property
    def sparsity_after(self) -> float | None:
        if self.entries_after is None:
            return None
        return self.entries_after / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class PlannedStep:
    step: Step
    method: MethodSpec
    targets: tuple[PlannedTarget, ...]
    scheduled: bool
    group_units: int = 0
    group_to_prune: int | None = None
    note: str | None = None

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.step.args)


@dataclass(frozen=True)
class Plan:
    """The resolved recipe. ``str(plan)`` is the dry-run table the CLI prints."""

    recipe: Recipe
    steps: tuple[PlannedStep, ...]
    model_type: str = ""
    _final_entries: Mapping[str, tuple[int, float]] = field(default_factory=dict, repr=False)

    @property
    def targets(self) -> list[Target]:
        """Every distinct target of the plan, first-seen order."""
        seen: dict[tuple[int, str], Target] = {}
        for ps in self.steps:
            for pt in ps.targets:
                seen.setdefault((id(pt.target.module), pt.target.param), pt.target)
        return list(seen.values())

    def projected_sparsity(self) -> tuple[float, float]:
        """Masked fraction over all targeted entries: (before, projected after)."""
        first: dict[str, int] = {}
        for ps in self.steps:
            for pt in ps.targets:
                first.setdefault(pt.target.qualname, pt.entries_before)
        total = sum(n for n, _ in self._final_entries.values())
        after = sum(e for _, e in self._final_entries.values())
        return (sum(first.values()) / total if total else 0.0, after / total if total else 0.0)

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
                    "group_to_prune": ps.group_to_prune,
                    "note": ps.note,
                    "targets": [
                        {
                            "name": pt.target.qualname,
                            "type": pt.target.module_type,
                            "shape": list(pt.target.shape),
                            "units": pt.units,
                            "unit": pt.unit,
                            "to_prune": pt.to_prune,
                            "sparsity_before": pt.sparsity_before,
                            "sparsity_after": pt.sparsity_after,
                        }
                        for pt in ps.targets
                    ],
                }
                for ps in self.steps
            ],
            "sparsity_before": before,
            "sparsity_after": after,
        }

    def __str__(self) -> str:
        from .report import format_table, pct

        lines = [f"plan: {self.recipe.source}" + (f" ({self.recipe.name})" if self.recipe.name else "") + (f" on {self.model_type}" if self.model_type else "")]
        for ps in self.steps:
            step = ps.step
            head = f"{step.label}: {ps.method.name} {step.how_much} scope={step.scope}"
            if step.args:
                head += " args=" + ", ".join(f"{k}={v!r}" for k, v in step.args.items())
            seed = self.recipe.step_seed(step)
            if seed is not None:
                head += f" seed={seed}"
            if ps.scheduled:
                head += "  [scheduled: runs during training, not at apply]"
            lines.append("")
            lines.append(head)
            if ps.note:
                lines.append(f"  note: {ps.note}")
            if step.scope == "global" and ps.group_to_prune is not None:
                lines.append(f"  global group: {len(ps.targets)} tensors, {ps.group_units} entries, prunes {ps.group_to_prune}")
            rows = [
                [
                    pt.target.qualname,
                    pt.target.module_type,
                    "x".join(map(str, pt.target.shape)) or "scalar",
                    f"{pt.units} {pt.unit}",
                    "?" if pt.to_prune is None else str(pt.to_prune),
                    pct(pt.sparsity_before),
                    "?" if pt.sparsity_after is None else pct(pt.sparsity_after),
                ]
                for pt in ps.targets
            ]
            lines.extend("  " + r for r in format_table(["target", "type", "shape", "of", "prunes", "before", "after"], rows))
        before, after = self.projected_sparsity()
        lines.append("")
        lines.append(f"targeted entries masked: {pct(before)} -> {pct(after)} (projected; global steps are counted by group)")
        return "\n".join(lines)


class _Projection:
    """Masked-entry and masked-slice counts per target as the steps go, without touching tensors.

    Counts read from existing masks and advanced by local unstructured or structured steps
    are exact; after a global step, a method without an amount, or a structured step (for
    entries), they are estimates, and no int amount is rejected on the strength of one.
    """

    def __init__(self) -> None:
        self.entries: dict[tuple[int, str], float] = {}
        self.slices: dict[tuple[int, str, int], int] = {}
        self.inexact: set[tuple] = set()

    def entries_of(self, t: Target) -> float:
        key = (id(t.module), t.param)
        if key not in self.entries:
            self.entries[key] = pruned_entries(t)
        return self.entries[key]

    def slices_of(self, t: Target, dim: int) -> int:
        key = (id(t.module), t.param, dim)
        if key not in self.slices:
            self.slices[key] = pruned_slices(t, dim)
        return self.slices[key]

    def entries_exact(self, t: Target) -> bool:
        return (id(t.module), t.param) not in self.inexact and (id(t.module), t.param, "*") not in self.inexact

    def slices_exact(self, t: Target, dim: int) -> bool:
        return (id(t.module), t.param, dim) not in self.inexact and (id(t.module), t.param, "*") not in self.inexact

    def set_entries(self, t: Target, value: float, exact: bool) -> None:
        self.entries[(id(t.module), t.param)] = value
        if exact:
            self.inexact.discard((id(t.module), t.param))
        else:
            self.inexact.add((id(t.module), t.param))

    def forget(self, t: Target) -> None:
        """Nothing about this tensor's mask is known exactly any more."""
        self.inexact.add((id(t.module), t.param, "*"))


def plan_recipe(model: nn.Module, recipe: Recipe | str | os.PathLike[str]) -> Plan:
    """Resolve every step of ``recipe`` against ``model`` without changing it.

    Raises :class:`RecipeError` listing every step that resolves to no target, names a
    tied parameter, or asks for more than a tensor has.

    >>> plan = plan_recipe(LeNet(), "recipes/lenet-global-l1.yaml")  # doctest: +SKIP
    >>> print(plan)  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"plan_recipe needs an nn.Module, got {type(model).__name__}")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    modules = list(model.named_modules())
    owners: dict[int, list[str]] | None = None
    proj = _Projection()
    problems: list[Problem] = []
    planned: list[PlannedStep] = []
    final_entries: dict[str, tuple[int, float]] = {}

    for step in recipe.steps:
        try:
            spec = get_method(step.method)
        except MethodError as exc:  # e.g. a plugin uninstalled since the recipe was loaded
            problems.append(recipe.problem(step.path + ("method",), str(exc)))
            continue
        try:
            targets = resolve_targets(modules, step.select, step.params)
        except SelectorError as exc:
            problems.append(recipe.problem(step.path + ("select",), str(exc)))
            continue
        saved = [t for t in targets if t.param.endswith("_orig") and is_pruned_param(t.module, t.param[: -len("_orig")])]
        if saved:
            t = saved[0]
            base = t.param[: -len("_orig")]
            problems.append(
                recipe.problem(
                    step.path + ("params",),
                    f"{t.qualname} is the saved original of the pruned parameter {t.module_name + '.' if t.module_name else ''}{base}; "
                    f"name the parameter itself ({base!r}) to prune it further",
                )
            )
            continue
        if owners is None:
            owners = param_owners(model)
        tied = False
        for t in targets:
            names = owners.get(id(t.original), [])
            if len(names) > 1:
                tied = True
                problems.append(
                    recipe.problem(
                        step.path + ("select",),
                        f"parameter {t.qualname} is shared by {', '.join(names)} (tied weights); pruning it through one owner "
                        "would silently untie them. Exclude these modules, or untie the weights first",
                    )
                )
        if tied:
            continue
        scheduled = step.schedule is not None
        try:
            ps = _plan_step(recipe, step, spec, targets, proj, scheduled)
        except _PlanProblem as exc:
            problems.append(recipe.problem(step.path + (exc.key,), exc.message))
            continue
        planned.append(ps)
        for pt in ps.targets:
            final_entries[pt.target.qualname] = (pt.numel, proj.entries_of(pt.target))

    if problems:
        raise RecipeError.collect(problems)
    return Plan(recipe, tuple(planned), type(model).__name__, final_entries)


class _PlanProblem(Exception):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def _plan_step(recipe: Recipe, step: Step, spec: MethodSpec, targets: list[Target], proj: _Projection, scheduled: bool) -> PlannedStep:
    how = "sparsity" if step.sparsity is not None else "amount"
    if scheduled:
        rows = tuple(
            PlannedTarget(t, t.original.numel(), "entries", int(proj.entries_of(t)), None, int(proj.entries_of(t)), None) for t in targets
        )
        return PlannedStep(step, spec, rows, True)

    if step.scope == "global":
        sizes = [t.original.numel() for t in targets]
        total = sum(sizes)
        done = sum(proj.entries_of(t) for t in targets)
        exact = all(proj.entries_exact(t) for t in targets)
        rows = [PlannedTarget(t, n, "entries", int(proj.entries_of(t)), None, int(proj.entries_of(t)), None) for t, n in zip(targets, sizes)]
        if not spec.takes_amount:
            for t in targets:
                proj.forget(t)
            return PlannedStep(step, spec, tuple(rows), False, total, None)
        k, note = _count(step, total, int(done), f"the {total - int(done)} unpruned entries of the global group", how, exact)
        # The split across tensors depends on the values: spread the group's count
        # proportionally for the totals, and treat every tensor's count as an estimate.
        remaining = total - done
        for t, n in zip(targets, sizes):
            before = proj.entries_of(t)
            share = (n - before) / remaining if remaining else 0.0
            proj.set_entries(t, before + k * share, exact=False)
            proj.forget(t)
        return PlannedStep(step, spec, tuple(rows), False, total, k, note)

    rows = []
    notes = []
    for t in targets:
        shape = t.shape
        numel = t.original.numel()
        entries_before = proj.entries_of(t)
        note = None
        if spec.pruning_type == "structured":
            dim = step.args.get("dim", method_default(spec, "dim", -1))
            if len(shape) <= 1:
                raise _PlanProblem("method", f"{spec.name} is structured and needs a tensor with 2 or more dims; {t.qualname} has shape {tuple(shape)}")
            if not isinstance(dim, int) or isinstance(dim, bool) or not -len(shape) <= dim < len(shape):
                raise _PlanProblem("args", f"dim {dim!r} is out of range for {t.qualname} of shape {tuple(shape)}")
            d = normalize_dim(dim, len(shape))
            units = shape[d]
            done = proj.slices_of(t, d)
            if not spec.takes_amount:
                proj.forget(t)
                rows.append(PlannedTarget(t, units, f"slices (dim {d})", done, None, int(entries_before), None))
                continue
            k, note = _count(step, units, done, f"the {units - done} unpruned slices along dim {d} of {t.qualname}", how, proj.slices_exact(t, d))
            alive_entries = numel - entries_before
            after = entries_before + (alive_entries * k / (units - done) if units - done else 0.0)
            # slices along d stay exact (if they were); other dims and the entry count become estimates
            proj.slices[(id(t.module), t.param, d)] = done + k
            proj.set_entries(t, after, exact=False)
            proj.inexact.update((id(t.module), t.param, other) for other in range(len(shape)) if other != d)
            rows.append(PlannedTarget(t, units, f"slices (dim {d})", done, k, int(entries_before), after))
        elif spec.takes_amount:
            done = int(entries_before)
            exact = proj.entries_exact(t)
            k, note = _count(step, numel, done, f"the {numel - done} unpruned entries of {t.qualname}", how, exact)
            proj.set_entries(t, entries_before + k, exact=exact)
            if exact:  # whole slices may now be masked: counts along any dim are no longer known
                proj.inexact.update((id(t.module), t.param, d) for d in range(len(shape)))
            rows.append(PlannedTarget(t, numel, "entries", done, k, done, entries_before + k))
        elif spec.name == "identity":
            rows.append(PlannedTarget(t, numel, "entries", int(entries_before), 0, int(entries_before), entries_before))
        else:  # no amount (custom methods): the mask is whatever the method computes
            proj.forget(t)
            rows.append(PlannedTarget(t, numel, "entries", int(entries_before), None, int(entries_before), None))
        if note:
            notes.append(f"{t.qualname}: {note}")
    return PlannedStep(step, spec, tuple(rows), False, note="; ".join(notes) or None)


def method_default(spec: MethodSpec, name: str, fallback: Any) -> Any:
    param = spec.arguments.get(name)
    return fallback if param is None or param.default is param.empty else param.default


def _count(step: Step, units: int, done: int, what: str, how: str, exact: bool) -> tuple[int, str | None]:
    """Units this step prunes out of ``units`` with ``done`` already pruned.

    An int amount larger than what is left is an error only when ``done`` is exact.
    """
    if step.sparsity is not None:
        wanted = round(step.sparsity * units)
        if wanted <= done:
            return 0, f"already at {done}/{units} >= target sparsity {step.sparsity:g}: no-op" + ("" if exact else " (projected)")
        return wanted - done, None
    amount = step.amount if step.amount is not None else 0
    remaining = units - done
    k = nparams_to_prune(amount, remaining)
    if isinstance(amount, numbers.Integral) and k > remaining:
        if exact:
            raise _PlanProblem(how, f"amount {amount} is more than {what}")
        k = remaining
    return k, None
