"""Applying a plan to a model, atomically, with torch.nn.utils.prune itself.

Every step runs on all its targets before the next; ``l1_unstructured`` goes through the
exact magnitude select (:mod:`prunerecipe.magnitude`), every other method through torch's
own ``apply``. Anything that fails puts the model back exactly as it was.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.utils.prune as prune
from torch import nn

from . import magnitude
from .amounts import checked_nparams, sparsity_count
from .calibrate import Batch, Current, draw_batches, importance_scores, prune_scored, run_calibrated
from .calibrate.scored import scores_for
from .errors import ApplyError, CalibrationError, RecipeError
from .load import load_recipe
from .plan import Plan, PlannedStep, plan_recipe
from .report import Report, StepOutcome, TargetSparsity, measure
from .select import Target
from .spec import Recipe
from .torchprune import ModelSnapshot, finalize, make_copyable, pruned_parameters, pruning_hooks

Key = tuple[int, str]  # (id(module), parameter name)


def apply_recipe(
    model: nn.Module,
    recipe: Recipe | str | os.PathLike[str],
    *,
    plan: Plan | None = None,
    progress: Callable[[str], None] | None = None,
    calibration: Iterable[Any] | None = None,
) -> Report:
    """Apply every unscheduled step of ``recipe`` to ``model``, in place, in file order.

    Steps chain through torch's ``PruningContainer`` exactly as hand-written
    ``torch.nn.utils.prune`` calls would. If anything fails, the model is restored to its
    exact prior state.

    Args:
        model: the model to prune, in place.
        recipe: a :class:`~prunerecipe.spec.Recipe` or the path of a recipe file.
        plan: a plan made earlier by :func:`~prunerecipe.plan.plan_recipe` for this model and recipe.
        progress: called with a line of text as each step starts (and each block, for
            steps that run block by block).
        calibration: calibration samples for steps that need them (``importance: wanda``,
            ``sparsegpt``): an iterable of tensors or dicts of tensors, one sample each, no
            batch dimension; ``calibration: {samples, batch_size}`` says how many are drawn
            and how they are batched. Ignored when no step needs it.

    Returns:
        A :class:`~prunerecipe.report.Report`: per-target and global sparsity before and after.

    Raises:
        RecipeError: the recipe does not fit the model, or a step needs calibration data
            and none was given (nothing was changed).
        CalibrationError: the calibration data is empty, of the wrong type or shape, not
            finite, or the model fails on it (the model was restored).
        ApplyError: a step failed; the model was restored.

    Example:
        >>> from prunerecipe.zoo import LeNet
        >>> report = apply_recipe(LeNet(), "recipes/lenet-global-l1.yaml")  # doctest: +SKIP
        >>> round(report.global_after, 2)  # doctest: +SKIP
        0.2
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if plan is None:
        plan = plan_recipe(model, recipe)
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

    batches = _calibration_batches(recipe, active, calibration)
    seen: dict[Key, tuple[str, nn.Module, str]] = {}
    for ps in active:
        for pt in ps.targets:
            t = pt.target
            seen.setdefault((id(t.module), t.param), (t.qualname, t.module, t.param))
    watched = list(seen.values())
    # Every pass before the first change only reads: for a one-shot fold, every cut (whose
    # scan also counts the zeros before and spots NaN or inf); otherwise the finiteness check,
    # which counts the zeros before on the way.
    usable = _usable(recipe, active)
    cuts = _find_cuts(recipe, active, progress) if _can_fold(recipe, active, model) else None
    if cuts is not None:
        outcomes, folds, seeds, counted, suspect = cuts
        if suspect:  # a cut took the exact path: NaN or inf there, perhaps
            _finite_zeros(recipe, [(ps, t) for ps, t in usable if (id(t.module), t.param) in suspect])
        before = measure(watched, counted)
        after = measure(watched, _fold(recipe, folds, seeds))
        return Report(_rows(watched, before, after), tuple(outcomes), True, recipe.source, skipped)
    before = measure(watched, _finite_zeros(recipe, usable))

    modules = [m for _, m, _ in watched]
    if recipe.finalize:
        modules += [m for _, m, _ in pruned_parameters(model)]
    snapshot = ModelSnapshot(modules)
    outcomes = []
    current = Current()
    known: dict[Key, int] = {}
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
                outcomes.extend(run_calibrated(model, plan.blocks, run, batches, current, progress, snapshot.journal))
            else:
                current.step = ps
                outcomes.append(_run_step(recipe, ps, current, known))
            current.step = current.target = None
            i += len(run)
        if recipe.finalize:
            finalize(model)
    except BaseException as exc:
        snapshot.restore()
        if not isinstance(exc, Exception):
            raise
        raise _failure(recipe, active, current, exc) from exc
    finally:
        snapshot.close()

    for _, module, _ in watched:
        if pruning_hooks(module):
            make_copyable(module)
    # Counted again unless a fast path already knows (it does so without touching the weights);
    # finalize changes what was counted.
    after = measure(watched, None if recipe.finalize else known)
    return Report(_rows(watched, before, after), tuple(outcomes), bool(recipe.finalize), recipe.source, skipped)


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


def _calibration_batches(recipe: Recipe, active: list[PlannedStep], calibration: Iterable[Any] | None) -> list[Batch] | None:
    """The calibration batches, drawn and checked before anything changes (None when no step needs them)."""
    needing = [ps for ps in active if ps.calibrated]
    if not needing:
        return None
    first = needing[0]
    if calibration is None:
        why = first.method.name if first.method.calibrated else f"importance {first.importance.name!r}" if first.importance else first.method.name
        raise RecipeError(
            recipe.problem(
                first.step.path,
                f"{first.step.label} needs calibration data ({why}): pass --calibration SPEC to prunerecipe apply, "
                "or calibration= to apply_recipe; nothing was changed",
                code="calibration",
            )
        )
    where = ("calibration",) if recipe.calibration is not None else first.step.path
    batches, _ = draw_batches(calibration, recipe, where)
    return batches


def _rows(watched: list[tuple[str, nn.Module, str]], before: dict[str, Any], after: dict[str, Any]) -> tuple[TargetSparsity, ...]:
    return tuple(TargetSparsity(name, before[name][0], before[name][1], before[name][2], after[name][2]) for name, _, _ in watched)


Checked = list[tuple[PlannedStep, Target]]


def _usable(recipe: Recipe, active: list[PlannedStep]) -> Checked:
    """Refuse, before anything changes, tensors pruning cannot handle: inference tensors
    (torch cannot re-parametrize them) and meta tensors. Returns the floating-point targets,
    each once, with the first step that names it."""
    problems = []
    checked: set[Key] = set()
    todo: Checked = []
    for ps in active:
        for pt in ps.targets:
            t = pt.target
            key = (id(t.module), t.param)
            if key in checked:
                continue
            checked.add(key)
            tensor = t.original
            if tensor.is_inference():
                problems.append(
                    recipe.problem(
                        ps.step.path,
                        f"{t.qualname} is an inference tensor (made under torch.inference_mode()), which pruning cannot "
                        "re-parametrize; build or clone the model outside inference mode; nothing was changed",
                        code="apply",
                    )
                )
            elif tensor.device.type == "meta":
                problems.append(
                    recipe.problem(
                        ps.step.path,
                        f"{t.qualname} is on the meta device (shapes only, no data): plan works on such models, "
                        "apply needs real tensors; nothing was changed",
                        code="apply",
                    )
                )
            elif tensor.is_floating_point() and tensor.numel() > 0:
                todo.append((ps, t))
    if problems:
        raise ApplyError(problems)
    return todo


def _finite_zeros(recipe: Recipe, todo: Checked) -> dict[Key, int]:
    """Refuse NaN or inf in a weight (a diverged model; torch's own l1_unstructured would rank
    NaN above everything and carry on). Returns the zero entries of each target not pruned
    yet, counted on the way (as the report counts them: the parameter's own zeros)."""
    problems = []
    zeros: dict[Key, int] = {}
    for (ps, t), (z, bad) in zip(todo, magnitude.census([t.original.detach() for _, t in todo])):
        if bad:
            nan = int(torch.isnan(t.original).sum().item())
            problems.append(
                recipe.problem(
                    ps.step.path,
                    f"{t.qualname} has {nan} NaN and {bad - nan} infinite entries; refusing to prune a diverged model "
                    "(fix or re-initialize those weights first); nothing was changed",
                    code="nonfinite",
                )
            )
        elif not t.is_pruned:  # a pruned target's report zeros are orig * mask's: counted later
            zeros[(id(t.module), t.param)] = z
    if problems:
        raise ApplyError(problems)
    return zeros


def _can_fold(recipe: Recipe, active: list[PlannedStep], model: nn.Module) -> bool:
    """One-shot magnitude pruning with ``finalize``: each target pruned once, by torch's own
    L1Unstructured, nothing pruned before. Then the weights can be masked in place, with no
    ``*_orig``/``*_mask`` ever built (the result is what prune + remove would leave)."""
    if not recipe.finalize or pruned_parameters(model):
        return False
    seen: set[Key] = set()
    for ps in active:
        if not _fast_l1(ps):
            return False
        dtypes = set()
        for pt in ps.targets:
            t = pt.target
            key = (id(t.module), t.param)
            tensor = t.original
            # the in-place pass must be unable to fail halfway: plain, contiguous, ordinary tensors only
            if key in seen or not magnitude.supported(tensor) or not tensor.is_contiguous() or tensor.is_inference() or not tensor.is_leaf:
                return False
            seen.add(key)
            dtypes.add(tensor.dtype)
        if ps.step.scope == "global" and len(dtypes) > 1:
            return False
    return True


def _find_cuts(
    recipe: Recipe, active: list[PlannedStep], progress: Callable[[str], None] | None
) -> tuple[list[StepOutcome], list[magnitude.Fold], list[int], dict[Key, int], set[Key]] | None:
    """Every cut of a one-shot fold, found before anything changes: the outcomes, the folds,
    the steps' seeds (set when the fold happens), the zeros before counted by the scans, and
    the targets whose cut took the exact path (they may hold NaN or inf).

    Returns None when a small tensor or group has ties at its cut: the regular path then
    lets torch's own ``topk`` break them, exactly as hand-written code would."""
    outcomes = []
    seeds: list[int] = []
    jobs: list[tuple[list[Target], list[magnitude.Piece], int]] = []
    for i, ps in enumerate(active, 1):
        step = ps.step
        if progress is not None:
            progress(f"[{i}/{len(active)}] {step.label}: {ps.method.name} {step.how_much} on {len(ps.targets)} tensor(s)")
        seed = recipe.step_seed(step)
        if seed is not None:
            seeds.append(seed)
        targets = [pt.target for pt in ps.targets]
        groups = [targets] if step.scope == "global" else [[t] for t in targets]
        noops: list[str] = []
        for group in groups:
            pieces = [magnitude.Piece(t.original) for t in group]
            total = sum(p.numel for p in pieces)
            if step.sparsity is not None:
                k = sparsity_count(step.sparsity, total, 0)
                if k <= 0:
                    noops.extend(t.qualname for t in group)
                    continue
            else:
                assert step.amount is not None
                k = checked_nparams(step.amount, total)
            jobs.append((group, pieces, k))
        note = f"no-op on {', '.join(noops)}: already at or above sparsity {step.sparsity:g}" if noops else None
        outcomes.append(StepOutcome(step.label, ps.method.name, tuple(t.qualname for t in targets), note))
    cuts = magnitude.select([(pieces, k) for _, pieces, k in jobs], count_zeros=True)
    folds: list[magnitude.Fold] = []
    zeros: dict[Key, int] = {}
    suspect: set[Key] = set()
    for (group, pieces, _), cut in zip(jobs, cuts):
        if cut.quotas is not None and sum(p.numel for p in pieces) <= magnitude.EXACT_TIES_UP_TO:
            return None
        for j, (t, piece) in enumerate(zip(group, pieces)):
            folds.append((t.module, t.param, piece, cut, j))
            count = cut.zeros[j] if cut.zeros is not None else None
            if count is not None:
                zeros[(id(t.module), t.param)] = count
            if not cut.finite:
                suspect.add((id(t.module), t.param))
    return outcomes, folds, seeds, zeros, suspect


def _fold(recipe: Recipe, folds: list[magnitude.Fold], seeds: list[int]) -> dict[Key, int]:
    """Mask the weights in place, with Ctrl-C held; returns the zeros after where known."""
    for seed in seeds:
        torch.manual_seed(seed)  # as the regular path does, so the RNG state after apply is the same
    with magnitude.deferred_interrupts():
        try:
            return magnitude.fold(folds)
        except Exception as exc:  # pragma: no cover - _can_fold admits only tensors this cannot fail on
            raise ApplyError(recipe.problem((), f"masking weights in place failed: {type(exc).__name__}: {exc}", code="apply")) from exc


def _fast_l1(ps: PlannedStep) -> bool:
    """Only torch's own L1Unstructured ranking the weights themselves takes the fast path
    (subclasses may change compute_mask; importance scores rank something else)."""
    return ps.method.cls is prune.L1Unstructured and ps.importance is None and not ps.calibrated


def _run_step(recipe: Recipe, ps: PlannedStep, current: Current, zeros: dict[Key, int]) -> StepOutcome:
    """Run one step. ``zeros`` holds, per ``(id(module), param)``, the zero count after the last
    step that touched it, where a fast path knew it without counting (the report uses it)."""
    step, spec = ps.step, ps.method
    seed = recipe.step_seed(step)
    if seed is not None:
        torch.manual_seed(seed)
    targets = [pt.target for pt in ps.targets]
    for t in targets:
        zeros.pop((id(t.module), t.param), None)
    names = tuple(t.qualname for t in targets)
    kwargs = dict(step.args)

    if step.scope == "global":
        params = [(t.module, t.param) for t in targets]
        if not spec.takes_amount:
            prune.global_unstructured(params, pruning_method=spec.cls, **kwargs)
            return StepOutcome(step.label, spec.name, names)
        amount = ps.live_amount(targets)
        assert amount is not None
        if step.sparsity is not None and amount <= 0:
            return StepOutcome(step.label, spec.name, names, f"no-op: already at or above sparsity {step.sparsity:g}")
        if _fast_l1(ps) and len({t.original.dtype for t in targets}) == 1 and all(magnitude.supported(t.original) for t in targets):
            magnitude.l1_global(params, amount, zeros, finite=True)  # the preflight checked
        elif ps.importance is not None:
            scores = {(t.module, t.param): scores_for(t, importance_scores(ps.importance, t, None)) for t in targets}
            prune.global_unstructured(params, pruning_method=spec.cls, importance_scores=scores, amount=amount, **kwargs)
        else:
            prune.global_unstructured(params, pruning_method=spec.cls, amount=amount, **kwargs)
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
        if _fast_l1(ps) and magnitude.supported(t.original):
            fast.append((t.module, t.param, call["amount"]))
        elif ps.importance is not None:
            prune_scored(ps, t, importance_scores(ps.importance, t, None), amount)
        else:
            spec.cls.apply(t.module, t.param, **call)
    current.target = None
    if fast:
        magnitude.l1_local_many(fast, zeros, finite=True)  # the preflight checked
    note = f"no-op on {', '.join(noops)}: already at or above sparsity {step.sparsity:g}" if noops else None
    return StepOutcome(step.label, spec.name, names, note)


__all__ = ["apply_recipe", "finalize", "pruned_parameters"]
