"""Recipe + model -> :class:`Plan`: every step resolved to its targets, nothing changed.

The plan also projects how much each step prunes, following torch's arithmetic
(``round(amount * unpruned)`` for a float amount, the count itself for an int).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Any

from torch import nn

from .amounts import normalize_dim
from .blocks import Blocks, calibration_target_problem, find_blocks
from .errors import MethodError, Problem, RecipeError, RecipeWarning, SelectorError
from .load import load_recipe
from .methods import MethodSpec, get_importance, get_method
from .methods.binding import argument_default, importance_problem
from .planned import Plan, PlannedStep, PlannedTarget, pruned_entries, pruned_slices
from .projection import PlanProblem, Projection, check_scheduled_count, plan_n_of_m, step_count
from .select import NameIndex, Target, param_owners, resolve_targets, unused_entries
from .spec import Recipe, Step
from .structured.planning import GroupProblem, compaction_problems, plan_groups
from .text import short
from .torchprune import is_pruned, unpruned_name


def plan_recipe(model: nn.Module, recipe: Recipe | str | os.PathLike[str], *, spread: bool = False) -> Plan:
    """Resolve every step of ``recipe`` against ``model`` without changing it.

    Args:
        model: the model (real tensors, or on the ``meta`` device: shapes are enough).
        recipe: a :class:`~prunerecipe.spec.Recipe` or the path of a recipe file.
        spread: the model is one of several processes' parts (:mod:`prunerecipe.distributed`):
            a step may have no target here, and a global step's count is checked over the
            union of every process's targets when it runs.

    Returns:
        The :class:`Plan`; ``str(plan)`` is the dry-run table, with projected figures (``?``
        where they depend on the weights; :func:`~prunerecipe.preview.preview` computes
        them from real weights, as ``prunerecipe plan`` prints them).

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
    index: NameIndex | None = None  # built when a selector first needs it
    shared: dict[tuple[Any, ...], list[tuple[str, list[str], list[str]]]] = {}  # selector -> its tied targets and their owners
    proj = Projection()
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
                if not spread:  # one rank may hold none of what an entry names
                    index = index or NameIndex(modules)
                    for part, message in unused_entries(index, step.select, step.params, resolved[key]):
                        at = recipe.problem(step.path + (("params",) if part == "params" else ("select", part)), message, code="select")
                        warnings.warn(RecipeWarning(str(at)), stacklevel=2)
            targets = resolved[key]
        except SelectorError as exc:
            code = "no-targets" if type(exc) is SelectorError else exc.code
            problems.append(recipe.problem(step.path + ("select",), _named(step, str(exc)), code=code))
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
        except PlanProblem as exc:
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


def _plan_step(
    recipe: Recipe, step: Step, spec: MethodSpec, targets: list[Target], proj: Projection, scheduled: bool, spread: bool = False
) -> PlannedStep:
    how = "sparsity" if step.sparsity is not None else "amount"
    if scheduled:
        rows: list[PlannedTarget] = []
        for t in targets:
            done = int(proj.entries_of(t))
            exact = proj.state(t).entries_exact
            rows.append(PlannedTarget(t, t.original.numel(), "entries", done, None, done, None, t.original.numel(), exact, False))
        check_scheduled_count(step, spec, rows)
        return PlannedStep(step, spec, tuple(rows), True)

    if step.scope == "global" and spec.name == "identity":  # masks of ones: every count stays what it was
        rows = []
        for t in targets:
            st = proj.state(t)
            rows.append(
                PlannedTarget(t, st.numel, "entries", int(st.entries), 0, int(st.entries), st.entries, st.numel, st.entries_exact, st.entries_exact)
            )
            st.touched = True
        return PlannedStep(step, spec, tuple(rows), False, sum(st.numel for st in (proj.state(t) for t in targets)), 0)
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
            k, note = step_count(step, total, int(masked), what, how, exact)
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
            rows.append(plan_n_of_m(step, spec, t, st, pattern))
        elif structured:
            shape = tuple(t.original.shape)
            if len(shape) <= 1:
                raise PlanProblem("method", f"{spec.name} is structured and needs a tensor with 2 or more dims; {t.qualname} has shape {shape}")
            if not isinstance(dim_arg, int) or isinstance(dim_arg, bool) or not -len(shape) <= dim_arg < len(shape):
                raise PlanProblem("args", f"dim {dim_arg!r} is out of range for {t.qualname} of shape {shape}")
            d = normalize_dim(dim_arg, len(shape))
            units = shape[d]
            done, exact = proj.slices_of(t, d)
            if takes_amount:
                k, note = step_count(
                    step, units, done, functools.partial("the {} unpruned slices along dim {} of {.qualname}".format, units - done, d, t), how, exact
                )
                after: float | None = entries_before + ((numel - entries_before) * k / (units - done) if units - done else 0.0)
                st.entries = after  # type: ignore[assignment]
                st.slices = {d: (done + k, exact)}
            else:
                k, after = None, None
                st.slices = {}
            # whole fresh slices on a mask of whole slices (or none): k * slice entries, exactly
            exact_after = k is not None and exact and before_exact and entries_before == done * (numel // units)
            st.entries_exact = exact_after
            st.touched = True
            rows.append(PlannedTarget(t, units, f"slices (dim {d})", done, k, int(entries_before), after, numel, exact and before_exact, exact_after))
        elif takes_amount:
            done = int(entries_before)
            exact = st.entries_exact
            k, note = step_count(step, numel, done, functools.partial("the {} unpruned entries of {.qualname}".format, numel - done, t), how, exact)
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


def _plan_group_step(model: nn.Module, recipe: Recipe, step: Step, spec: MethodSpec, targets: list[Target], proj: Projection) -> PlannedStep:
    """A ``scope: group`` step: its dependency groups, and a row per parameter it masks."""
    exact = not any(proj.state(t).touched for t in targets)
    found = plan_groups(model, recipe, step, spec, targets, exact, proj.groups)
    rows = []
    for gt in found.targets:
        t, pg = gt.target, gt.group
        st = proj.state(t)
        before = st.entries
        after = before + (st.numel - before) * (1.0 - gt.kept_fraction)
        # a fact only where what is masked already is whole channels (the step picks among the
        # others); entries masked one by one may or may not fall in the channels it picks
        aligned = before == 0 or before == pg.done * (st.numel // pg.group.channels)
        rows.append(
            PlannedTarget(
                t, pg.group.channels, "channels (group)", pg.done, pg.to_prune, int(before), after, st.numel, st.entries_exact, exact and aligned
            )
        )
        st.entries, st.entries_exact, st.slices, st.touched = after, False, {}, True
    return PlannedStep(step, spec, tuple(rows), False, groups=found.groups, skipped_groups=found.skipped)


__all__ = ["Plan", "PlannedStep", "PlannedTarget", "plan_recipe", "pruned_entries", "pruned_slices"]
