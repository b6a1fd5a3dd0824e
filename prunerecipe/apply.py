"""Applying a plan to a model, atomically, with torch.nn.utils.prune itself."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import torch
import torch.nn.utils.prune as prune
from torch import nn

from . import fastprune
from .errors import ApplyError, RecipeError
from .methods import MethodSpec
from .plan import Plan, PlannedStep, method_default, normalize_dim, plan_recipe, pruned_entries, pruned_slices
from .recipe import Recipe, load_recipe
from .report import Report, StepOutcome, TargetSparsity, measure
from .selectors import Target, is_pruned_param

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_pre_hooks_always_called",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
_STATE_DICTS = ("_parameters", "_buffers") + _HOOK_DICTS


class ModelSnapshot:
    """Everything ``torch.nn.utils.prune`` changes on a set of modules, restorable in place.

    Saves references, not copies: parameters, buffers, hooks and pruning containers are
    put back as the same objects, so identity, ``state_dict`` and hooks are as before.
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self._saved: list[tuple[nn.Module, dict[str, Any], dict[str, Any], list[tuple[nn.Parameter, torch.Tensor]]]] = []
        self._containers: list[tuple[prune.PruningContainer, tuple]] = []
        seen: set[int] = set()
        for module in modules:
            if id(module) in seen:
                continue
            seen.add(id(module))
            inner = {k: dict(getattr(module, k)) for k in _STATE_DICTS if hasattr(module, k)}
            attrs = {k: v for k, v in module.__dict__.items() if k not in inner}
            data = [(p, p.data) for p in module._parameters.values() if p is not None]
            self._saved.append((module, inner, attrs, data))
            for hook in module._forward_pre_hooks.values():
                if isinstance(hook, prune.PruningContainer):
                    self._containers.append((hook, hook._pruning_methods))
        self._nonpersistent = {id(m): set(m._non_persistent_buffers_set) for m, *_ in self._saved}

    def restore(self) -> None:
        for container, methods in self._containers:
            container._pruning_methods = methods
        for module, inner, attrs, data in self._saved:
            for key, saved in inner.items():
                live = getattr(module, key)
                live.clear()
                live.update(saved)
            for key in [k for k in module.__dict__ if k not in inner and k not in attrs]:
                del module.__dict__[key]
            module.__dict__.update(attrs)
            module._non_persistent_buffers_set.clear()
            module._non_persistent_buffers_set.update(self._nonpersistent[id(module)])
            for param, tensor in data:
                if param.data is not tensor:
                    param.data = tensor


class PrunedGetState:
    """``__getstate__`` for one pruned module, installed on the instance.

    ``copy.deepcopy``, ``pickle`` and ``torch.save(model)`` then store the computed
    ``weight`` (``orig * mask``, a non-leaf tensor after a forward pass) detached, so they
    work at any time (plain ``torch.nn.utils.prune`` modules cannot be deep-copied after a
    forward: pytorch#37322, the reason EMA/SWA code trips on them). Nothing else changes:
    training and autograd are untouched, and the next forward recomputes ``weight``.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self) -> dict[str, Any]:
        state = self.module.__dict__.copy()
        for hook in self.module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                value = state.get(hook._tensor_name)
                if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                    state[hook._tensor_name] = value.detach()
        return state


def make_copyable(module: nn.Module) -> None:
    """Let a pruned module be deep-copied and pickled at any time (see :class:`PrunedGetState`)."""
    current = module.__dict__.get("__getstate__")
    if not (isinstance(current, PrunedGetState) and current.module is module):
        module.__dict__["__getstate__"] = PrunedGetState(module)


def pruned_parameters(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(qualified name, module, param)`` of every parameter carrying a pruning hook."""
    out = []
    for mod_name, module in model.named_modules():
        hooked = {h._tensor_name for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)}
        for key in module._parameters:
            name = key[: -len("_orig")]
            if key.endswith("_orig") and name in hooked:
                out.append((f"{mod_name}.{name}" if mod_name else name, module, name))
    return out


def finalize(model: nn.Module) -> list[str]:
    """Make all pruning permanent, in place: ``prune.remove`` on every pruned parameter.

    Returns the qualified names that were finalized.

    >>> finalize(model)  # doctest: +SKIP
    ['conv1.weight', 'conv1.bias']
    """
    done = []
    # Parameters are removed in the order their `*_orig` entries were registered, which is the
    # order a hand-written loop over the pruned names would use (weight before bias, say).
    for name, module, param in pruned_parameters(model):
        prune.remove(module, param)
        done.append(name)
    for module in model.modules():  # nothing pruned is left: no special copying needed
        if isinstance(module.__dict__.get("__getstate__"), PrunedGetState) and not any(
            isinstance(h, prune.BasePruningMethod) for h in module._forward_pre_hooks.values()
        ):
            del module.__dict__["__getstate__"]
    return done


def apply_recipe(
    model: nn.Module,
    recipe: Recipe | str | os.PathLike[str],
    *,
    plan: Plan | None = None,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Apply every unscheduled step of ``recipe`` to ``model``, in place, in file order.

    Steps chain through torch's ``PruningContainer`` exactly as hand-written
    ``torch.nn.utils.prune`` calls would. If anything fails, the model is restored to
    its exact prior state and an :class:`ApplyError` names the step and target.
    ``recipe`` is a :class:`Recipe` or the path of a recipe file; ``progress`` is called
    with a line of text as each step starts.

    >>> report = apply_recipe(model, "recipes/lenet-global-l1.yaml")  # doctest: +SKIP
    >>> print(report.global_after)  # doctest: +SKIP
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

    seen: dict[tuple[int, str], tuple[str, nn.Module, str]] = {}
    for ps in active:
        for pt in ps.targets:
            t = pt.target
            seen.setdefault((id(t.module), t.param), (t.qualname, t.module, t.param))
    watched = list(seen.values())
    # Every pass before the masking only reads: the cuts of a one-shot fold (which count zero
    # and non-finite entries on the way, where the C kernels run), the finiteness check, the
    # zeros before. Nothing changes until all of them are through.
    scanned: dict[tuple[int, str], tuple[int, int]] = {}
    cuts = _find_cuts(recipe, active, progress, scanned) if _can_fold(recipe, active, model) else None
    _check_finite(recipe, active, scanned)
    before = measure(watched, {key: zeros for key, (zeros, _) in scanned.items()})

    if cuts is not None:
        outcomes, folds, seeds = cuts
        after = measure(watched, _fold(recipe, folds, seeds))
        rows = tuple(TargetSparsity(name, before[name][0], before[name][1], before[name][2], after[name][2]) for name, _, _ in watched)
        return Report(rows, tuple(outcomes), True, recipe.source, skipped)

    modules = [m for _, m, _ in watched]
    if recipe.finalize:
        modules += [m for _, m, _ in pruned_parameters(model)]
    snapshot = ModelSnapshot(modules)
    outcomes = []
    current: list[Any] = [None, None]
    known: dict[tuple[int, str], int] = {}
    try:
        # Not under no_grad: hand-written prune calls leave `module.weight` with a grad_fn, and so do we.
        for i, ps in enumerate(active, 1):
            current[:] = [ps, None]
            if progress is not None:
                progress(f"[{i}/{len(active)}] {ps.step.label}: {ps.method.name} {ps.step.how_much} on {len(ps.targets)} tensor(s)")
            outcomes.append(_run_step(recipe, ps, current, known))
        current[:] = [None, None]
        if recipe.finalize:
            finalize(model)
    except BaseException as exc:
        snapshot.restore()
        if not isinstance(exc, Exception):
            raise
        ps, target = current
        if ps is None:
            raise ApplyError(recipe.problem(("finalize",), f"finalize failed: {type(exc).__name__}: {exc}; the model was left unchanged")) from exc
        on = f" on {target.qualname}" if target is not None else ""
        what = f"step {ps.step.name!r} ({ps.method.name})" if ps.step.name else ps.method.name
        raise ApplyError(
            recipe.problem(ps.step.path, f"{what} failed{on}: {type(exc).__name__}: {exc}; the model was left unchanged")
        ) from exc

    for _, module, _ in watched:
        if any(isinstance(h, prune.BasePruningMethod) for h in module._forward_pre_hooks.values()):
            make_copyable(module)
    # Counted again unless a fast path already knows (it does so without touching the weights,
    # which also keeps this count's scratch out of the peak); finalize keeps what it multiplied.
    after = measure(watched, None if recipe.finalize else known)
    rows = tuple(
        TargetSparsity(name, before[name][0], before[name][1], before[name][2], after[name][2]) for name, _, _ in watched
    )
    return Report(rows, tuple(outcomes), recipe.finalize, recipe.source, skipped)


def _live_amount(ps: PlannedStep, targets: list[Target]) -> int | float | None:
    """The torch ``amount`` for this step now: as written, or converted from an absolute ``sparsity``."""
    step = ps.step
    if step.sparsity is None:
        return step.amount
    if step.scope == "global":
        total = sum(t.original.numel() for t in targets)
        done = sum(pruned_entries(t) for t in targets)
        return round(step.sparsity * total) - done
    (t,) = targets
    if ps.method.pruning_type == "structured":
        dim = step.args.get("dim", method_default(ps.method, "dim", -1))
        d = normalize_dim(dim, t.original.dim())
        return round(step.sparsity * t.original.shape[d]) - pruned_slices(t, d)
    return round(step.sparsity * t.original.numel()) - pruned_entries(t)


@torch.no_grad()
def _check_finite(recipe: Recipe, active: list[PlannedStep], scanned: dict[tuple[int, str], tuple[int, int]]) -> None:
    """Refuse, before anything changes, what pruning must not or cannot handle: NaN or inf
    in a weight (a diverged model; torch's own l1_unstructured would rank NaN above
    everything and carry on), and inference tensors (torch cannot re-parametrize them).

    ``scanned`` maps ``(id(module), param)`` to ``(zeros, non-finite entries)`` for tensors
    already counted; float32 CPU tensors not in it are counted here in one pass of the C
    kernels (when built), and added to it when they are not pruned yet (the zeros are then
    the parameter's own, as the report counts them)."""
    problems = []
    checked: set[tuple[int, str]] = set()
    todo: list[tuple[PlannedStep, Target]] = []
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
                    )
                )
                continue
            if tensor.device.type == "meta":
                problems.append(
                    recipe.problem(
                        ps.step.path,
                        f"{t.qualname} is on the meta device (shapes only, no data): plan works on such models, "
                        "apply needs real tensors; nothing was changed",
                    )
                )
                continue
            if tensor.is_floating_point() and tensor.numel() > 0:
                todo.append((ps, t))
    # non-finite entries per tensor, where counted: by the fold's select, or here by the kernels
    nonfinite = {key: bad for key, (_, bad) in scanned.items()}
    counted = [t for _, t in todo if (id(t.module), t.param) not in nonfinite and fastprune.native_takes(t.original)]
    if counted and fastprune.native_ready():
        zeros, bads = fastprune.native_scan([t.original for t in counted])
        for t, z, bad in zip(counted, zeros, bads):
            key = (id(t.module), t.param)
            nonfinite[key] = bad
            if not is_pruned_param(t.module, t.param):  # the report's zeros are orig * mask's when pruned
                scanned[key] = (z, bad)
    for ps, t in todo:
        known = nonfinite.get((id(t.module), t.param))
        if known == 0:
            continue
        tensor = t.original
        if known is None and bool(torch.isfinite(tensor.sum()).item()):  # one fast pass; overflow falls through to the exact count
            continue
        nan = int(torch.isnan(tensor).sum().item())
        inf = int(torch.isinf(tensor).sum().item())
        if nan or inf:
            problems.append(
                recipe.problem(
                    ps.step.path,
                    f"{t.qualname} has {nan} NaN and {inf} infinite entries; refusing to prune a diverged model "
                    "(fix or re-initialize those weights first); nothing was changed",
                )
            )
    if problems:
        raise ApplyError(problems)


def _can_fold(recipe: Recipe, active: list[PlannedStep], model: nn.Module) -> bool:
    """One-shot magnitude pruning with ``finalize``: each target pruned once, by torch's own
    L1Unstructured, nothing pruned before. Then the weights can be masked in place, with no
    ``*_orig``/``*_mask`` ever built (the result is what prune + remove would leave)."""
    if not recipe.finalize or pruned_parameters(model):
        return False
    seen: set[tuple[int, str]] = set()
    for ps in active:
        if not _fast_l1(ps.method):
            return False
        dtypes = set()
        for pt in ps.targets:
            t = pt.target
            key = (id(t.module), t.param)
            tensor = t.original
            # the in-place pass must be unable to fail halfway: plain, contiguous, ordinary tensors only
            if key in seen or not fastprune.supported(tensor) or not tensor.is_contiguous() or tensor.is_inference() or not tensor.is_leaf:
                return False
            seen.add(key)
            dtypes.add(t.original.dtype)
        if ps.step.scope == "global" and len(dtypes) > 1:
            return False
    return True


def _find_cuts(
    recipe: Recipe, active: list[PlannedStep], progress: Callable[[str], None] | None, scanned: dict[tuple[int, str], tuple[int, int]]
) -> tuple[list[StepOutcome], list[fastprune.Fold], list[int]] | None:
    """Every cut of a one-shot fold, found before anything changes (the steps' seeds are
    returned, to be set when the fold happens); the tensors the C kernels read on the way get
    their zero and non-finite counts in ``scanned``.

    Returns None when a small tensor or group has ties at its cut: the regular path then
    lets torch break them, exactly as hand-written code would.
    """
    folds: list[fastprune.Fold] = []
    outcomes = []
    seeds: list[int] = []
    jobs: list[tuple[list[Target], list[fastprune.Piece], int]] = []  # every group's cut, found in one go
    for i, ps in enumerate(active, 1):
        step = ps.step
        if progress is not None:
            progress(f"[{i}/{len(active)}] {step.label}: {ps.method.name} {step.how_much} on {len(ps.targets)} tensor(s)")
        seed = recipe.step_seed(step)
        if seed is not None:
            seeds.append(seed)
        targets = [pt.target for pt in ps.targets]
        groups = [targets] if step.scope == "global" else [[t] for t in targets]
        noops = []
        for group in groups:
            pieces = [fastprune.Piece(t.original) for t in group]
            total = sum(p.numel for p in pieces)
            if step.sparsity is not None:
                k = round(step.sparsity * total)
                if k <= 0:
                    noops.extend(t.qualname for t in group)
                    continue
            else:
                assert step.amount is not None
                k = fastprune.nparams(step.amount, total)
            jobs.append((group, pieces, k))
        note = f"no-op on {', '.join(noops)}: already at or above sparsity {step.sparsity:g}" if noops else None
        outcomes.append(StepOutcome(step.label, ps.method.name, tuple(t.qualname for t in targets), note))
    # Groups too big for torch's own tie order keep no candidates: their fold finishes the cut.
    cuts = fastprune.select_many([(pieces, k) for _, pieces, k in jobs], {}, defer_above=fastprune.EXACT_TIES_UP_TO)
    for (group, pieces, _), (cut, zeros, nonfinite) in zip(jobs, cuts):
        if zeros is not None and nonfinite is not None:
            for t, z, bad in zip(group, zeros, nonfinite):
                scanned[(id(t.module), t.param)] = (z, bad)
        if isinstance(cut, fastprune.Threshold) and cut.quotas is not None and sum(p.numel for p in pieces) <= fastprune.EXACT_TIES_UP_TO:
            return None
        folds.extend((t.module, t.param, piece, cut, j) for j, (t, piece) in enumerate(zip(group, pieces)))
    return outcomes, folds, seeds


def _fold(recipe: Recipe, folds: list[fastprune.Fold], seeds: list[int]) -> dict[tuple[int, str], int]:
    """Mask the weights in place, with Ctrl-C held; returns the zeros after where counted on the way."""
    for seed in seeds:
        torch.manual_seed(seed)  # as the regular path does, so the RNG state after apply is the same
    with fastprune.deferred_interrupts():
        try:
            return fastprune.fold_all(folds, {})
        except Exception as exc:  # pragma: no cover - _can_fold admits only tensors this cannot fail on
            raise ApplyError(recipe.problem((), f"masking weights in place failed: {type(exc).__name__}: {exc}")) from exc


def _fast_l1(spec: MethodSpec) -> bool:
    """Only torch's own L1Unstructured takes the fast path (subclasses may change compute_mask)."""
    return spec.cls is prune.L1Unstructured


def _run_step(recipe: Recipe, ps: PlannedStep, current: list[Any], zeros: dict[tuple[int, str], int]) -> StepOutcome:
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
        amount = _live_amount(ps, targets)
        assert amount is not None
        if step.sparsity is not None and amount <= 0:
            return StepOutcome(step.label, spec.name, names, f"no-op: already at or above sparsity {step.sparsity:g}")
        if _fast_l1(spec) and len({t.original.dtype for t in targets}) == 1 and all(fastprune.supported(t.original) for t in targets):
            fastprune.l1_global(params, amount, zeros)
        else:
            prune.global_unstructured(params, pruning_method=spec.cls, amount=amount, **kwargs)
        return StepOutcome(step.label, spec.name, names)

    noops: list[str] = []
    for t in targets:
        current[1] = t
        call = dict(kwargs)
        if spec.takes_amount:
            amount = _live_amount(ps, [t])
            if step.sparsity is not None and amount is not None and amount <= 0:
                noops.append(t.qualname)
                continue
            call["amount"] = amount
        if _fast_l1(spec) and fastprune.supported(t.original):
            fastprune.l1_local(t.module, t.param, call["amount"], zeros)
        else:
            spec.cls.apply(t.module, t.param, **call)
    note = f"no-op on {', '.join(noops)}: already at or above sparsity {step.sparsity:g}" if noops else None
    return StepOutcome(step.label, spec.name, names, note)


__all__ = ["apply_recipe", "finalize", "pruned_parameters", "make_copyable", "ModelSnapshot", "PrunedGetState"]
