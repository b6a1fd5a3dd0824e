"""The read-only passes before ``apply`` changes anything, and the one-shot fold.

Every target is checked for NaN and infinity (counting its zeros on the way, for the
report); for one-shot magnitude pruning with ``finalize`` every cut is found first (the scan
counts and checks as it goes), then weights are masked in place with no ``*_orig``/``*_mask``
ever built: what prune + remove would leave.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.utils.prune as prune
from torch import nn

from . import magnitude
from .amounts import checked_nparams, sparsity_count
from .errors import ApplyError
from .plan import PlannedStep
from .report import StepOutcome
from .select import Target
from .spec import Recipe
from .torchprune import pruned_parameters

Key = tuple[int, str]  # (id(module), parameter name)


Checked = list[tuple[PlannedStep, Target]]


def usable(recipe: Recipe, active: list[PlannedStep]) -> Checked:
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


def finite_zeros(recipe: Recipe, todo: Checked) -> dict[Key, int]:
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


def can_fold(recipe: Recipe, active: list[PlannedStep], model: nn.Module) -> bool:
    """One-shot magnitude pruning with ``finalize``: each target pruned once, by torch's own
    L1Unstructured, nothing pruned before. Then the weights can be masked in place, with no
    ``*_orig``/``*_mask`` ever built (the result is what prune + remove would leave)."""
    if not recipe.finalize or recipe.compacts or pruned_parameters(model):
        return False
    seen: set[Key] = set()
    for ps in active:
        if not fast_l1(ps):
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


def fold(recipe: Recipe, folds: list[magnitude.Fold], seeds: list[int]) -> dict[Key, int]:
    """Mask the weights in place, with Ctrl-C held; returns the zeros after where known."""
    for seed in seeds:
        torch.manual_seed(seed)  # as the regular path does, so the RNG state after apply is the same
    with magnitude.deferred_interrupts():
        try:
            return magnitude.fold(folds)
        except Exception as exc:  # pragma: no cover - can_fold admits only tensors this cannot fail on
            raise ApplyError(recipe.problem((), f"masking weights in place failed: {type(exc).__name__}: {exc}", code="apply")) from exc


def fast_l1(ps: PlannedStep) -> bool:
    """Only torch's own L1Unstructured ranking the weights themselves takes the fast path
    (subclasses may change compute_mask; importance scores rank something else)."""
    return ps.method.cls is prune.L1Unstructured and ps.importance is None and not ps.calibrated


def checked_cuts(
    recipe: Recipe, active: list[PlannedStep], usable: Checked, progress: Callable[[str], None] | None
) -> tuple[list[StepOutcome], list[magnitude.Fold], list[int], dict[Key, int], set[Key]] | None:
    """:func:`_find_cuts`, then the finiteness check of the targets whose cut took the exact path."""
    cuts = _find_cuts(recipe, active, progress)
    if cuts is not None and cuts[4]:  # a cut took the exact path: NaN or inf there, perhaps
        suspect = cuts[4]
        finite_zeros(recipe, [(ps, t) for ps, t in usable if (id(t.module), t.param) in suspect])
    return cuts
