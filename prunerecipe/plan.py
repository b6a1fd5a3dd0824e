"""Recipe + model -> :class:`Plan`: every step resolved to its targets, nothing changed.

The plan also projects how much each step prunes, following torch's arithmetic
(``round(amount * unpruned)`` for a float amount, the count itself for an int).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import nn

from .amounts import is_count, normalize_dim, nparams_to_prune, sparsity_count
from .blocks import Blocks, calibration_target_problem, find_blocks
from .errors import MethodError, Problem, RecipeError, SelectorError
from .layout import input_dim
from .load import load_recipe
from .methods import ImportanceSpec, MethodSpec, get_importance, get_method
from .methods.binding import argument_default, importance_problem
from .methods.semi_structured import nm_problem
from .schedule import step_events
from .select import Target, param_owners, resolve_targets
from .spec import Calibration, Recipe, Step
from .structured.planning import GroupProblem, PlannedGroup, compaction_problems, describe_groups, plan_groups
from .text import format_table, pct, shape_text, short
from .torchprune import is_pruned, masked_slices, unpruned_name, zero_entries


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
        return kwargs


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
                            "to_prune": pt.to_prune,
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
        lines.append(f"targeted entries masked: {'?' if before is None else pct(before)} -> {'?' if after is None else pct(after)} ({how})")
        if not self.computed and (before is None or after is None or any(pt.known_after is None for ps in self.steps for pt in ps.targets)):
            lines.append("?: depends on the weights (global steps, structured methods, methods without an amount); plan with real weights shows them")
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


class _TensorState:
    """What the plan knows of one tensor's mask as the steps go."""

    __slots__ = ("entries", "entries_exact", "numel", "slices", "touched")

    def __init__(self, numel: int, entries: float) -> None:
        self.numel = numel
        self.entries = entries  # masked entries (exact, or an estimate)
        self.entries_exact = True
        self.slices: dict[int, tuple[int, bool]] = {}  # dim -> (masked slices, exact?)
        self.touched = False  # a planned step changed it: the model's mask no longer tells


class _Projection:
    """Masked-entry and masked-slice counts per target as the steps go, without touching tensors.

    Counts read from existing masks and advanced by local unstructured (entries) or
    structured (slices along that dim) steps are exact. After a global step or a method
    without an amount they are estimates, and no int amount is rejected on an estimate.
    """

    def __init__(self) -> None:
        self.states: dict[tuple[int, str], _TensorState] = {}
        self.groups: dict[tuple[str, ...], int] = {}  # scope: group: channels pruned, by the group's producers

    def state(self, t: Target) -> _TensorState:
        key = (id(t.module), t.param)
        st = self.states.get(key)
        if st is None:
            st = self.states[key] = _TensorState(t.original.numel(), pruned_entries(t) if t.is_pruned else 0)
        return st

    def entries_of(self, t: Target) -> float:
        return self.state(t).entries

    def slices_of(self, t: Target, dim: int) -> tuple[int, bool]:
        st = self.state(t)
        if dim not in st.slices:
            st.slices[dim] = (0, False) if st.touched else (pruned_slices(t, dim), True)
        return st.slices[dim]


def plan_recipe(model: nn.Module, recipe: Recipe | str | os.PathLike[str], *, spread: bool = False) -> Plan:
    """Resolve every step of ``recipe`` against ``model`` without changing it.

    Args:
        model: the model (real tensors, or on the ``meta`` device: shapes are enough).
        recipe: a :class:`~prunerecipe.spec.Recipe` or the path of a recipe file.
        spread: the model is one of several processes' parts (:mod:`prunerecipe.distributed`):
            a step may have no target here, and a global step's count is checked over the
            union of every process's targets when it runs.

    Returns:
        The :class:`Plan`; ``str(plan)`` is the dry-run table the CLI prints.

    Raises:
        RecipeError: listing every step that resolves to no target, names a tied parameter,
            or asks for more than a tensor has.

    Example:
        >>> from prunerecipe.zoo import LeNet
        >>> plan = plan_recipe(LeNet(), "recipes/lenet-global-l1.yaml")  # doctest: +SKIP
        >>> print(plan)  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"plan_recipe needs an nn.Module, got {type(model).__name__}")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    # every name a module is registered under, so an alias selects it too (targets stay unique)
    modules = list(model.named_modules(remove_duplicate=False))
    owners: dict[int, list[str]] | None = None
    resolved: dict[tuple, list[Target]] = {}
    shared: dict[tuple[Any, ...], list[tuple[str, list[str], list[str]]]] = {}  # selector -> its tied targets and their owners
    proj = _Projection()
    problems: list[Problem] = []
    planned: list[PlannedStep] = []

    problems.extend(recipe.problem(path, message, code) for path, message, code in compaction_problems(model, recipe))
    blocks: Blocks | None = None
    for step in recipe.steps:
        try:
            spec = get_method(step.method)
        except MethodError as exc:  # e.g. a plugin uninstalled since the recipe was loaded
            problems.append(recipe.problem(step.path + ("method",), str(exc), code="method"))
            continue
        try:
            importance = get_importance(step.importance) if step.importance is not None else None
        except MethodError as exc:
            problems.append(recipe.problem(step.path + ("importance",), _named(step, str(exc)), code="importance"))
            continue
        if importance is not None and importance.is_magnitude:
            importance = None
        calibrated = spec.calibrated or (importance is not None and importance.calibrated)
        found = importance_problem(step, spec, importance, calibrated)
        if found is not None:
            problems.append(recipe.problem(step.path + (found[0],), _named(step, found[1]), code=found[2]))
            continue
        try:
            key = (step.select, step.params)
            if key not in resolved:  # recipes often repeat a selector
                resolved[key] = resolve_targets(modules, step.select, step.params, allow_empty=spread)
            targets = resolved[key]
        except SelectorError as exc:
            problems.append(recipe.problem(step.path + ("select",), _named(step, str(exc)), code="no-targets"))
            continue
        saved = [t for t in targets if unpruned_name(t.param) != t.param and is_pruned(t.module, unpruned_name(t.param))]
        if saved:
            t = saved[0]
            base = unpruned_name(t.param)
            problems.append(
                recipe.problem(
                    step.path + ("params",),
                    f"{t.qualname} is the saved original of the pruned parameter {t.module_name + '.' if t.module_name else ''}{base}; "
                    f"name the parameter itself ({base!r}) to prune it further",
                    code="select",
                )
            )
            continue
        if not targets:  # spread: another process holds this step's targets
            planned.append(PlannedStep(step, spec, (), step.schedule is not None, note="no target in this process"))
            continue
        if owners is None:
            owners = param_owners(model)
        if key not in shared:  # once per selector: the owners do not change while planning
            shared[key] = _tied(targets, owners)
        for qualname, names, selected in shared[key]:
            paste = "exclude: {names: [" + ", ".join(selected) + "]}"
            problems.append(
                recipe.problem(
                    step.path + ("select",),
                    f"{_named(step, '')}parameter {qualname} is tied: one tensor shared by {', '.join(names)}; pruning it through "
                    f"one owner would silently untie them. Leave it out with `{paste}` in this step's select, or untie the weights first",
                    code="tied-weights",
                )
            )
        if shared[key]:
            continue
        scheduled = step.schedule is not None
        if calibrated:
            if blocks is None:
                try:
                    blocks = find_blocks(model, recipe.sequential)
                except SelectorError as exc:
                    where = ("sequential", "blocks") if recipe.sequential is not None else step.path
                    problems.append(recipe.problem(where, str(exc), code="calibration"))
                    continue
            outside = calibration_target_problem(targets, blocks)
            if outside is not None:
                problems.append(recipe.problem(step.path + ("select",), _named(step, outside), code="calibration"))
                continue
        try:
            if step.scope == "group" and not scheduled:
                ps = _plan_group_step(model, recipe, step, spec, targets, proj)
            else:
                ps = _plan_step(recipe, step, spec, targets, proj, scheduled, spread)
        except GroupProblem as exc:
            problems.append(recipe.problem(exc.path, _named(step, exc.message), code=exc.code))
            continue
        except _PlanProblem as exc:
            problems.append(
                recipe.problem(
                    step.path + (exc.key,), _named(step, exc.message), code="amount" if exc.key in ("amount", "sparsity") else "method-args"
                )
            )
            continue
        planned.append(dataclasses.replace(ps, importance=importance, calibrated=calibrated))

    if problems:
        raise RecipeError.collect(problems)
    final_entries = {key: (st.numel, st.entries) for key, st in proj.states.items()}
    return Plan(recipe, tuple(planned), type(model).__name__, final_entries, all(st.entries_exact for st in proj.states.values()), blocks=blocks)


def _named(step: Step, message: str) -> str:
    """Plan-time messages say which step by name too, when it has one."""
    return f"step {short(step.name)}: {message}" if step.name else message


def _tied(targets: list[Target], owners: dict[int, list[str]]) -> list[tuple[str, list[str], list[str]]]:
    """Each tied tensor the targets include, once: the first target naming it, its owners,
    and the modules the step selected."""
    out: dict[int, tuple[str, list[str], list[str]]] = {}
    for t in targets:
        names = owners.get(id(t.original), [])
        if len(names) > 1:
            out.setdefault(id(t.original), (t.qualname, names, []))[2].append(t.module_name or "(root)")
    return list(out.values())


class _PlanProblem(Exception):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def _plan_step(
    recipe: Recipe, step: Step, spec: MethodSpec, targets: list[Target], proj: _Projection, scheduled: bool, spread: bool = False
) -> PlannedStep:
    how = "sparsity" if step.sparsity is not None else "amount"
    if scheduled:
        rows: list[PlannedTarget] = []
        for t in targets:
            done = int(proj.entries_of(t))
            exact = proj.state(t).entries_exact
            rows.append(PlannedTarget(t, t.original.numel(), "entries", done, None, done, None, t.original.numel(), exact, False))
        return PlannedStep(step, spec, tuple(rows), True)

    if step.scope == "global":
        states = [proj.state(t) for t in targets]
        sizes = [t.original.numel() for t in targets]
        total = sum(sizes)
        masked = sum(st.entries for st in states)
        group = tuple(
            PlannedTarget(t, n, "entries", int(st.entries), None, int(st.entries), None, n, st.entries_exact, False)
            for t, n, st in zip(targets, sizes, states)
        )
        k = None
        note = None
        if spec.takes_amount:
            exact = all(st.entries_exact for st in states) and not spread  # spread: the union decides
            what = functools.partial("the {} unpruned entries of the global group".format, total - int(masked))
            k, note = _count(step, total, int(masked), what, how, exact)
        # The split across tensors depends on the values: spread the group's count
        # proportionally for the totals, and treat every tensor's count as an estimate.
        remaining = total - masked
        for st, n in zip(states, sizes):
            if k is not None and remaining:
                st.entries += k * (n - st.entries) / remaining
            st.entries_exact = False
            st.slices = {}
            st.touched = True
        return PlannedStep(step, spec, group, False, total, k, note)

    rows = []
    notes = []
    takes_amount = spec.takes_amount
    structured = spec.pruning_type == "structured"
    dim_arg = step.args.get("dim", argument_default(spec, "dim", -1)) if structured else None
    pattern = spec.nm_pattern(step.args)
    for t in targets:
        st = proj.state(t)
        numel = st.numel
        entries_before = st.entries
        before_exact = st.entries_exact
        note = None
        if pattern is not None:
            rows.append(_plan_n_of_m(step, spec, t, st, pattern))
        elif structured:
            shape = tuple(t.original.shape)
            if len(shape) <= 1:
                raise _PlanProblem("method", f"{spec.name} is structured and needs a tensor with 2 or more dims; {t.qualname} has shape {shape}")
            if not isinstance(dim_arg, int) or isinstance(dim_arg, bool) or not -len(shape) <= dim_arg < len(shape):
                raise _PlanProblem("args", f"dim {dim_arg!r} is out of range for {t.qualname} of shape {shape}")
            d = normalize_dim(dim_arg, len(shape))
            units = shape[d]
            done, exact = proj.slices_of(t, d)
            if takes_amount:
                k, note = _count(
                    step, units, done, functools.partial("the {} unpruned slices along dim {} of {.qualname}".format, units - done, d, t), how, exact
                )
                after: float | None = entries_before + ((numel - entries_before) * k / (units - done) if units - done else 0.0)
                st.entries = after  # type: ignore[assignment]
                st.slices = {d: (done + k, exact)}
            else:
                k, after = None, None
                st.slices = {}
            st.entries_exact = False
            st.touched = True
            rows.append(PlannedTarget(t, units, f"slices (dim {d})", done, k, int(entries_before), after, numel, exact and before_exact, False))
        elif takes_amount:
            done = int(entries_before)
            exact = st.entries_exact
            k, note = _count(step, numel, done, functools.partial("the {} unpruned entries of {.qualname}".format, numel - done, t), how, exact)
            st.entries = entries_before + k
            st.slices = {}  # whole slices may now be masked
            st.touched = True
            rows.append(PlannedTarget(t, numel, "entries", done, k, done, entries_before + k, numel, before_exact, before_exact))
        elif spec.name == "identity":
            rows.append(
                PlannedTarget(t, numel, "entries", int(entries_before), 0, int(entries_before), entries_before, numel, before_exact, before_exact)
            )
        else:  # no amount (custom methods): the mask is whatever the method computes
            st.entries_exact = False
            st.slices = {}
            st.touched = True
            rows.append(PlannedTarget(t, numel, "entries", int(entries_before), None, int(entries_before), None, numel, before_exact, False))
        if note:
            notes.append(f"{t.qualname}: {note}")
    return PlannedStep(step, spec, tuple(rows), False, note="; ".join(notes) or None)


def _plan_group_step(model: nn.Module, recipe: Recipe, step: Step, spec: MethodSpec, targets: list[Target], proj: _Projection) -> PlannedStep:
    """A ``scope: group`` step: its dependency groups, and a row per parameter it masks."""
    exact = not any(proj.state(t).touched for t in targets)
    found = plan_groups(model, recipe, step, spec, targets, exact, proj.groups)
    rows = []
    for gt in found.targets:
        t, pg = gt.target, gt.group
        st = proj.state(t)
        before = st.entries
        after = before + (st.numel - before) * (1.0 - gt.kept_fraction)
        rows.append(
            PlannedTarget(t, pg.group.channels, "channels (group)", pg.done, pg.to_prune, int(before), after, st.numel, st.entries_exact, exact)
        )
        st.entries, st.entries_exact, st.slices, st.touched = after, False, {}, True
    return PlannedStep(step, spec, tuple(rows), False, groups=found.groups, skipped_groups=found.skipped)


def _plan_n_of_m(step: Step, spec: MethodSpec, t: Target, st: _TensorState, pattern: tuple[int, int]) -> PlannedTarget:
    """An N:M step on one tensor: its input dimension must split into groups of ``m``; from a
    known mask with nothing pruned, exactly ``numel * (m - n) / m`` entries are pruned."""
    n, m = pattern
    shape = tuple(t.original.shape)
    if not shape:
        raise _PlanProblem("method", f"{spec.name} needs a tensor with at least one dimension; {t.qualname} is a scalar")
    arg = spec.input_dim_arg
    dim = step.args.get(arg) if arg is not None else None
    if dim is None:
        dim = input_dim(t.module, t.param, len(shape))
    if not isinstance(dim, int) or isinstance(dim, bool) or not -len(shape) <= dim < len(shape):
        raise _PlanProblem("args", f"dim {dim!r} is out of range for {t.qualname} of shape {shape}")
    problem = nm_problem(shape[normalize_dim(dim, len(shape))], m)
    if problem:
        raise _PlanProblem("args" if step.args else "method", f"{t.qualname} (shape {shape_text(shape)}) {problem}")
    numel = st.numel
    before = st.entries
    before_exact = st.entries_exact
    exact = st.entries_exact and before == 0
    after = numel * (m - n) // m if exact else max(before, numel * (m - n) / m)
    to_prune = int(after) if exact else None
    st.entries = after
    st.entries_exact = exact
    st.slices = {}
    st.touched = True
    return PlannedTarget(t, numel, f"entries ({n}:{m})", int(before), to_prune, int(before), after if exact else None, numel, before_exact, exact)


def _count(step: Step, units: int, done: int, what: Callable[[], str], how: str, exact: bool) -> tuple[int, str | None]:
    """Units this step prunes out of ``units`` with ``done`` already pruned (``what`` describes
    them, for the error; it is only built when needed).

    An int amount larger than what is left is an error only when ``done`` is exact.
    """
    if step.sparsity is not None:
        wanted = round(step.sparsity * units)
        if wanted <= done:
            return 0, (
                f"target sparsity {step.sparsity:g} means {wanted} of {units} masked; {done} already are: no-op" + ("" if exact else " (projected)")
            )
        return wanted - done, None
    amount = step.amount if step.amount is not None else 0
    remaining = units - done
    k = nparams_to_prune(amount, remaining)
    if k > remaining and is_count(amount):
        if exact:
            raise _PlanProblem(how, f"amount {amount} is more than {what()}")
        k = remaining
    return k, None
