"""Applying a plan to a model, atomically, with torch.nn.utils.prune itself.

Every step runs on all its targets before the next; ``l1_unstructured`` goes through the
exact magnitude select (:mod:`prunerecipe.magnitude`), every other method through torch's
own ``apply``. Anything that fails puts the model back exactly as it was.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
import torch.nn.utils.prune as prune
from torch import nn

from . import magnitude, rng
from .amounts import normalize_dim
from .calibrate import Batch, Current, draw_batches, importance_scores, prune_scored, run_calibrated
from .calibrate.scored import scores_for
from .distributed import Coordinator, PeerFailure, agreed, all_agree, resolve_group, was_agreed
from .errors import ApplyError, CalibrationError, RecipeError
from .load import load_recipe
from .methods.binding import argument_default
from .methods.guard import guarded
from .oneshot import Checked, can_fold, checked_cuts, fast_l1, finite_zeros, fold, usable
from .plan import Plan, PlannedStep, plan_recipe, pruned_slices
from .report import Report, StepOutcome, TargetSparsity, measure
from .select import Target
from .spec import Calibration, Recipe
from .structured import Compaction, compact
from .structured.masks import apply_masks, member_masks, rank
from .structured.planning import example_tensors
from .torchprune import (
    ModelSnapshot,
    apply_any_layout,
    finalize,
    global_unstructured,
    kept_entries,
    make_copyable,
    match_mask_dtype,
    pruned_parameters,
    pruning_hooks,
)

Key = tuple[int, str]  # (id(module), parameter name)


def apply_recipe(
    model: nn.Module,
    recipe: Recipe | str | os.PathLike[str],
    *,
    plan: Plan | None = None,
    progress: Callable[[str], None] | None = None,
    process_group: Any = None,
    calibration: Iterable[Any] | None = None,
) -> Report:
    """Apply every unscheduled step of ``recipe`` to ``model``, in place, in file order.

    Steps chain through torch's ``PruningContainer`` exactly as hand-written
    ``torch.nn.utils.prune`` calls would. If anything fails, the model is restored to its
    exact prior state.

    In a ``torch.distributed`` job (initialized, with more than one rank; or ``process_group``
    given) every rank calls this together: ``scope: global`` steps rank the union of the
    ranks' targets, data-parallel replicas are checked to agree, random steps draw alike
    (:mod:`prunerecipe.distributed`), and a failure on any rank is raised on every rank.

    Args:
        model: the model to prune, in place.
        recipe: a :class:`~prunerecipe.spec.Recipe` or the path of a recipe file.
        plan: a plan made earlier by :func:`~prunerecipe.plan.plan_recipe` for this model and recipe.
        progress: called with a line of text as each step starts (and each block, for
            steps that run block by block).
        process_group: the ``torch.distributed`` group to prune together with (default: the
            default group when ``torch.distributed`` is initialized; ``False``: this process
            alone, e.g. one rank pruning a copy for export, which the others do not join).
        calibration: calibration samples for steps that need them (``importance: wanda``,
            ``sparsegpt``): an iterable of tensors or dicts of tensors, one sample each, no
            batch dimension; ``calibration: {samples, batch_size}`` says how many are drawn
            and how they are batched. Ignored when no step needs it.

    Returns:
        A :class:`~prunerecipe.report.Report`: per-target and global sparsity before and after.

    Raises:
        RecipeError: the recipe does not fit the model (nothing was changed).
        ApplyError: a step failed; the model was restored.

    Example:
        >>> from prunerecipe.zoo import LeNet
        >>> report = apply_recipe(LeNet(), "recipes/lenet-global-l1.yaml")  # doctest: +SKIP
        >>> round(report.global_after, 2)  # doctest: +SKIP
        0.2
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    group = resolve_group(process_group)
    # Every pass before the first change only reads: the plan, the checks, and for a one-shot
    # fold every cut (whose scan also counts the zeros before and spots NaN or inf); otherwise
    # the finiteness check, which counts the zeros before on the way. Across ranks each is
    # agreed: a failure on one rank is raised on all.
    plan, active, skipped, watched, usable = _together(group, lambda: _prepare(model, recipe, plan, spread=group is not None))
    if group is not None and any(ps.calibrated for ps in active):
        first = next(ps for ps in active if ps.calibrated)
        raise RecipeError(
            recipe.problem(
                first.step.path,
                f"{first.step.label} runs on calibration data, which each process has its own of: prune in one process "
                "(process_group=False) and share the result",
                code="calibration",
            )
        )
    batches, drawn = _calibration_batches(model, recipe, active, calibration)
    coord = None
    if group is not None:
        coord = Coordinator(group, recipe, [(ps.step, ps.method.cls, [pt.target for pt in ps.targets]) for ps in active])
    folding = can_fold(recipe, active, model) and (coord is None or not coord.split)
    if group is not None:  # every rank takes the same path, or their collectives would not match
        folding = all_agree(group, folding)
    if folding:
        cuts = _together(group, lambda: checked_cuts(recipe, active, usable, progress))
        if cuts is not None:
            outcomes, folds, seeds, counted, _ = cuts
            before = measure(watched, counted)
            after = measure(watched, fold(recipe, folds, seeds))
            return Report(_rows(watched, before, after), tuple(outcomes), True, recipe.source, skipped)
    before = measure(watched, _together(group, lambda: finite_zeros(recipe, usable)))

    modules = [m for _, m, _ in watched]
    if recipe.finalize:
        modules += [m for _, m, _ in pruned_parameters(model)]
    snapshot = ModelSnapshot(modules)
    outcomes = []
    current = Current()
    known: dict[Key, int] = {}
    compaction: Compaction | None = None
    try:
        # Not under no_grad: hand-written prune calls leave `module.weight` with a grad_fn, and so do we.
        i = 0
        while i < len(active):
            ps = active[i]
            # consecutive calibration-based steps run together, block by block
            run = [ps] if not ps.calibrated else list(itertools.takewhile(lambda p: p.calibrated, active[i:]))
            for j, each in enumerate(run, i + 1):
                if progress is not None:
                    progress(f"[{j}/{len(active)}] {each.step.label}: {each.method.name} {each.how_much} on {len(each.targets)} tensor(s)")
            if ps.calibrated:
                assert plan.blocks is not None and batches is not None
                for each in run:  # counts a fast path knew before are stale now
                    for pt in each.targets:
                        known.pop((id(pt.target.module), pt.target.param), None)
                outcomes.extend(run_calibrated(model, plan.blocks, run, batches, current, progress, snapshot.journal))
            else:
                current.step = ps
                outcomes.append(_run_step(recipe, ps, current, known, coord))
                if coord is not None:
                    coord.agree(None)  # raises PeerFailure here when another rank failed this step
            current.step = current.target = None
            i += len(run)
        if recipe.compacts:
            compaction = compact(model, example_tensors(model, recipe), recipe=recipe)
        elif recipe.finalize:
            finalize(model)
    except BaseException as exc:
        snapshot.restore()
        if not isinstance(exc, Exception):
            raise
        if isinstance(exc, PeerFailure):
            raise
        if was_agreed(exc):  # the other ranks know already: located here, not asked again
            raise _failure(recipe, active, current, exc) from exc
        if coord is not None:
            coord.agree(_failure(recipe, active, current, exc))  # the others learn where it failed too
        if current.step is None and not current.where and isinstance(exc, RecipeError) and not isinstance(exc, CalibrationError):
            raise  # compaction's own located error; it restored its part
        raise _failure(recipe, active, current, exc) from exc
    finally:
        snapshot.close()

    for _, module, _ in watched:
        if pruning_hooks(module):
            make_copyable(module)
    # Counted again unless a fast path already knows (it does so without touching the weights);
    # finalize changes what was counted.
    after = measure(watched, None if recipe.finalize else known)
    if compaction is not None:  # entries removed with their channels count as pruned, of the shape before
        after = {n: (kind, before[n][1], zeros + math.prod(before[n][1]) - math.prod(shape)) for n, (kind, shape, zeros) in after.items()}
    used = None if batches is None else (drawn, (recipe.calibration or Calibration()).samples)
    return Report(_rows(watched, before, after), tuple(outcomes), bool(recipe.finalize), recipe.source, skipped, compaction, used)


T = TypeVar("T")


def _together(group: Any, fn: Callable[[], T]) -> T:
    """``fn()``; across ranks, agreed (a failure on any rank is raised on every rank)."""
    return fn() if group is None else agreed(group, fn)


def _prepare(
    model: nn.Module, recipe: Recipe, plan: Plan | None, spread: bool
) -> tuple[Plan, list[PlannedStep], tuple[str, ...], list[tuple[str, nn.Module, str]], Checked]:
    """The plan, its unscheduled steps, the skipped ones, every target once, and the usable targets."""
    if plan is None:
        plan = plan_recipe(model, recipe, spread=spread)
    elif plan.recipe is not recipe and plan.recipe != recipe:
        raise RecipeError(recipe.problem((), "the plan passed to apply_recipe was made from another recipe"))
    else:
        mine = {id(m) for m in model.modules()}
        if any(id(t.module) not in mine for t in plan.targets):
            raise RecipeError(recipe.problem((), "the plan passed to apply_recipe was made for another model"))
    active = [ps for ps in plan.steps if not ps.scheduled]
    skipped = tuple(ps.step.label for ps in plan.steps if ps.scheduled)
    if not active:
        raise RecipeError(
            recipe.problem(
                ("steps",),
                "every step has a 'schedule': scheduled steps run during training (prunerecipe.Pruner), not in a one-shot apply",
            )
        )
    seen: dict[Key, tuple[str, nn.Module, str]] = {}
    for ps in active:
        for pt in ps.targets:
            t = pt.target
            seen.setdefault((id(t.module), t.param), (t.qualname, t.module, t.param))
    return plan, active, skipped, list(seen.values()), usable(recipe, active)


def _failure(recipe: Recipe, active: list[PlannedStep], current: Current, exc: Exception) -> ApplyError | CalibrationError:
    """The error for a failure while applying, located at what was running (the model is restored)."""
    detail = "; ".join(p.message for p in exc.problems) if isinstance(exc, RecipeError) else f"{type(exc).__name__}: {exc}"
    if current.where or isinstance(exc, CalibrationError):
        where = ("calibration",) if recipe.calibration is not None else next(ps.step.path for ps in active if ps.calibrated)
        lead = f"{current.where}: " if current.where else ""
        return CalibrationError(recipe.problem(where, f"{lead}{detail}; the model was left unchanged", code="calibration"))
    ps, target = current.step, current.target
    if ps is None:
        return ApplyError(recipe.problem(("finalize",), f"finalize failed: {detail}; the model was left unchanged", code="apply"))
    on = f" on {target.qualname}" if target is not None else ""
    what = f"step {ps.step.name!r} ({ps.method.name})" if ps.step.name else ps.method.name
    return ApplyError(recipe.problem(ps.step.path, f"{what} failed{on}: {detail}; the model was left unchanged", code="apply"))


def _calibration_batches(
    model: nn.Module, recipe: Recipe, active: list[PlannedStep], calibration: Iterable[Any] | None
) -> tuple[list[Batch] | None, int]:
    """The calibration batches and how many samples they hold, drawn and checked before
    anything changes (None when no step needs them: the data is not even read)."""
    needing = [ps for ps in active if ps.calibrated]
    if not needing:
        return None, 0
    first = needing[0]
    if calibration is None:
        why = first.method.name if first.method.calibrated else f"importance {first.importance.name!r}" if first.importance else first.method.name
        raise RecipeError(
            recipe.problem(
                first.step.path,
                f"{f'step {first.step.name!r}' if first.step.name else 'this step'} needs calibration data ({why}): "
                "pass --calibration SPEC to prunerecipe apply, "
                "or calibration= to apply_recipe; nothing was changed",
                code="calibration",
            )
        )
    where = ("calibration",) if recipe.calibration is not None else first.step.path
    return draw_batches(calibration, recipe, where, model)


def _rows(watched: list[tuple[str, nn.Module, str]], before: dict[str, Any], after: dict[str, Any]) -> tuple[TargetSparsity, ...]:
    return tuple(TargetSparsity(name, before[name][0], before[name][1], before[name][2], after[name][2]) for name, _, _ in watched)


def _run_group_step(ps: PlannedStep, names: tuple[str, ...]) -> StepOutcome:
    """Rank every group of the step (all before any mask changes: a layer can sit in two
    groups), then mask each parameter once, in the plan's target order."""
    step = ps.step
    selections = []
    pruned = 0
    for pg in ps.groups:
        keep, _, k = rank(pg.group, ps.method, step.args, step.amount, step.sparsity)
        selections.append((pg.group, keep))
        pruned += k
    if step.sparsity is not None and pruned == 0:
        return StepOutcome(step.label, ps.method.name, names, f"no-op: every group is already at or above sparsity {step.sparsity:g}")
    apply_masks(member_masks(selections), [(pt.target.module, pt.target.param) for pt in ps.targets])
    return StepOutcome(step.label, ps.method.name, names)


def run_step(recipe: Recipe, ps: PlannedStep) -> StepOutcome:
    """Run one planned step on its targets, as :func:`apply_recipe` runs it (seeding included),
    with no rollback: for callers that keep their own copies (streaming, tensor by tensor)."""
    return _run_step(recipe, ps, Current(step=ps), {})


def _run_step(recipe: Recipe, ps: PlannedStep, current: Current, zeros: dict[Key, int], coord: Coordinator | None = None) -> StepOutcome:
    """Run one step. ``zeros`` holds, per ``(id(module), param)``, the zero count after the last
    step that touched it, where a fast path knew it without counting (the report uses it).
    ``coord``: the ranks' coordinator, in a distributed run."""
    step, spec = ps.step, ps.method
    seed = recipe.step_seed(step)
    if seed is not None:
        torch.manual_seed(seed)
    targets = [pt.target for pt in ps.targets]
    together = coord is not None and rng.is_random(spec.cls)
    if together:
        assert coord is not None
        coord.random_state(step, _draws(ps, targets))
    outcome = _run_targets(recipe, ps, targets, current, zeros, coord)
    if together:
        assert coord is not None
        coord.random_done()
    return outcome


def _draws(ps: PlannedStep, targets: list[Target]) -> int:
    """The CPU generator's 32-bit draws this step takes here (see :mod:`prunerecipe.rng`)."""
    step, spec = ps.step, ps.method
    if step.scope == "global":
        if not targets:
            return 0
        amount = ps.live_amount(targets)
        units = sum(_eligible(t) for t in targets)
        wide = any(t.original.dtype == torch.float64 for t in targets)  # torch.cat promotes to it
        return rng.draws(spec.cls, amount if amount is not None else 0, units, torch.float64 if wide else torch.float32)
    total = 0
    for t in targets:
        amount = ps.live_amount([t])
        if amount is None or (step.sparsity is not None and amount <= 0):
            continue
        if spec.pruning_type == "structured":
            d = normalize_dim(step.args.get("dim", argument_default(spec, "dim", -1)), t.original.dim())
            units = t.original.shape[d] - pruned_slices(t, d)
        else:
            units = _eligible(t)
        total += rng.draws(spec.cls, amount, units, t.original.dtype)
    return total


def _eligible(t: Target) -> int:
    """Entries torch's container would still rank (``mask == 1``), or all of them."""
    mask = t.mask
    return t.original.numel() if mask is None else kept_entries(mask)


def _run_targets(
    recipe: Recipe, ps: PlannedStep, targets: list[Target], current: Current, zeros: dict[Key, int], coord: Coordinator | None
) -> StepOutcome:
    step, spec = ps.step, ps.method
    for t in targets:
        zeros.pop((id(t.module), t.param), None)
    names = tuple(t.qualname for t in targets)
    kwargs = dict(step.args)

    if step.scope == "group":
        return _run_group_step(ps, names)
    if step.scope == "global":
        params = [(t.module, t.param) for t in targets]
        if coord is not None and step.index in coord.split and spec.cls is prune.L1Unstructured:
            return StepOutcome(step.label, spec.name, names, coord.global_l1(step, targets, zeros))  # the union's cut
        if not targets:
            return StepOutcome(step.label, spec.name, names)
        if not spec.takes_amount:
            with guarded(spec, targets):
                global_unstructured(params, spec.cls, **kwargs)
            return StepOutcome(step.label, spec.name, names)
        amount = ps.live_amount(targets)
        assert amount is not None
        if step.sparsity is not None and amount <= 0:
            return StepOutcome(step.label, spec.name, names, f"no-op: already at or above sparsity {step.sparsity:g}")
        if fast_l1(ps) and len({t.original.dtype for t in targets}) == 1 and all(magnitude.supported(t.original) for t in targets):
            magnitude.l1_global(params, amount, zeros, finite=True)  # the preflight checked
        elif ps.importance is not None:
            scores = {(t.module, t.param): scores_for(t, importance_scores(ps.importance, t, None)) for t in targets}
            with guarded(spec, targets):
                global_unstructured(params, spec.cls, importance_scores=scores, amount=amount, **kwargs)
            for t in targets:
                match_mask_dtype(t.module, t.param)
        else:
            with guarded(spec, targets):
                global_unstructured(params, spec.cls, amount=amount, **kwargs)
        return StepOutcome(step.label, spec.name, names)

    noops: list[str] = []
    fast: list[tuple[nn.Module, str, int | float]] = []  # L1 targets: every cut found in one scan
    for t in targets:
        current.target = t
        call = ps.target_kwargs(t)
        amount = None
        if spec.needs_amount(call):
            amount = ps.live_amount([t])
            if step.sparsity is not None and amount is not None and amount <= 0:
                noops.append(t.qualname)
                continue
            call["amount"] = amount
        if fast_l1(ps) and magnitude.supported(t.original):
            fast.append((t.module, t.param, call["amount"]))
        elif ps.importance is not None:
            with guarded(spec, [t]):
                prune_scored(ps, t, importance_scores(ps.importance, t, None), amount)
        else:
            with guarded(spec, [t]):
                apply_any_layout(spec.cls, t.module, t.param, **call)
    current.target = None
    if fast:
        magnitude.l1_local_many(fast, zeros, finite=True)  # the preflight checked
    note = f"no-op on {', '.join(noops)}: already at or above sparsity {step.sparsity:g}" if noops else None
    return StepOutcome(step.label, spec.name, names, note)


__all__ = ["apply_recipe", "finalize", "pruned_parameters"]
