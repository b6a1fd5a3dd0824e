"""A plan's figures computed from the weights: every unscheduled step run on scratch masks,
exactly as ``apply`` would run it, with the model left as it was (``prunerecipe plan``).

Masks come from the methods' own ``compute_mask`` (through a ``PruningContainer`` for a
tensor already pruned, as torch's ``apply`` does), or from the exact magnitude select for
``l1_unstructured``; seeds are set as ``apply`` sets them, and the global RNG state is put
back afterwards. Steps that cannot be previewed (they need calibration data, rank by an
importance, or trace dependency groups) keep the plan's own figures where those are facts
(an exact count from a known start: Wanda's or SparseGPT's 50%, 2:4, a group's channels);
their targets' masks are unknown from there on, so later steps on them show ``?``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.utils.prune as prune
from torch import nn

from . import magnitude
from .amounts import checked_nparams, normalize_dim, sparsity_count
from .methods.binding import argument_default
from .plan import Plan, PlannedStep, PlannedTarget
from .select import Target
from .torchprune import masked_slices, zero_entries

Key = tuple[int, str]


def preview(model: nn.Module, plan: Plan) -> Plan:
    """``plan`` with every figure computed from the model's weights; the model is not changed.

    Args:
        model: the model the plan was made for, with real tensors (not on ``meta``).
        plan: from :func:`~prunerecipe.plan.plan_recipe`.

    Returns:
        A :class:`~prunerecipe.plan.Plan` whose before/after figures are facts (``computed``).

    Raises:
        ValueError: a target lives on the ``meta`` device (nothing to compute from).

    Example:
        >>> from prunerecipe import plan_recipe
        >>> from prunerecipe.zoo import LeNet
        >>> model = LeNet()
        >>> exact = preview(model, plan_recipe(model, "recipes/lenet-global-l1.yaml"))  # doctest: +SKIP
        >>> print(exact)  # doctest: +SKIP
    """
    if any(t.original.device.type == "meta" for t in plan.targets):
        raise ValueError("preview needs real weights; the model is on the meta device")
    masks: dict[Key, torch.Tensor | None] = {}  # the scratch masks (None: not pruned)
    for t in plan.targets:
        mask = t.mask
        masks[(id(t.module), t.param)] = None if mask is None else mask.detach().clone()
    unknown: set[Key] = set()
    counted: dict[Key, float] = {}  # masks not simulated, but their counts are facts
    rng = torch.get_rng_state()
    steps = []
    try:
        with torch.no_grad():
            for ps in plan.steps:
                steps.append(ps if ps.scheduled else _step(plan, ps, masks, unknown, counted))
    finally:
        torch.set_rng_state(rng)
    unmasked = sum(zero_entries(t.original, t.mask) - _masked(t.mask) for t in plan.targets)
    final = {}
    for key, mask in masks.items():
        t = next(t for t in plan.targets if (id(t.module), t.param) == key)
        final[key] = (t.original.numel(), counted.get(key, float(_masked(mask))))
    return dataclasses.replace(plan, steps=tuple(steps), _final_entries=final, _final_exact=not unknown, computed=True, unmasked_zeros=unmasked)


def _ones_or(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(like) if mask is None else mask.to(like.dtype)


def _dim(unit: str) -> int | None:
    """The dim of a structured row's unit (``"slices (dim 0)"``), None for entries."""
    return int(unit.rsplit(" ", 1)[-1].rstrip(")")) if unit.startswith("slices") else None


def _masked(mask: torch.Tensor | None) -> int:
    return 0 if mask is None else zero_entries(mask)


def _importance(t: Target, mask: torch.Tensor | None) -> torch.Tensor:
    """What torch ranks: the weight as the pruning hook computes it (``orig * mask``)."""
    orig = t.original.detach()
    return orig if mask is None else orig * mask.to(orig.dtype)


def _amount(ps: PlannedStep, targets: list[Target], masks: dict[Key, torch.Tensor | None]) -> int | float | None:
    step = ps.step
    if step.sparsity is None:
        return step.amount
    if step.scope == "global":
        total = sum(t.original.numel() for t in targets)
        return sparsity_count(step.sparsity, total, sum(_masked(masks[(id(t.module), t.param)]) for t in targets))
    (t,) = targets
    mask = masks[(id(t.module), t.param)]
    if ps.method.pruning_type == "structured":
        d = normalize_dim(step.args.get("dim", argument_default(ps.method, "dim", -1)), t.original.dim())
        return sparsity_count(step.sparsity, t.original.shape[d], masked_slices(mask, d))
    return sparsity_count(step.sparsity, t.original.numel(), _masked(mask))


def _method(ps: PlannedStep, amount: int | float | None, name: str) -> prune.BasePruningMethod:
    kwargs: dict[str, Any] = dict(ps.step.args)
    if ps.method.takes_amount:
        kwargs["amount"] = amount
    method = ps.method.cls(**kwargs)
    method._tensor_name = name
    return method


def _new_mask(method: prune.BasePruningMethod, importance: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
    """The mask torch's ``apply`` would register: the method alone the first time, else the
    method added to a container (which works on the entries still unpruned)."""
    if old is None:
        return method.compute_mask(importance, default_mask=torch.ones_like(importance))
    container = prune.PruningContainer(method)
    return container.compute_mask(importance, default_mask=old.to(importance.dtype))


def _unknown(ps: PlannedStep, keys: list[Key], unknown: set[Key]) -> PlannedStep:
    unknown.update(keys)
    return dataclasses.replace(ps, targets=tuple(pt._replace(exact_before=False, exact_after=False, to_prune=None) for pt in ps.targets))


def _step(plan: Plan, ps: PlannedStep, masks: dict[Key, torch.Tensor | None], unknown: set[Key], counted: dict[Key, float]) -> PlannedStep:
    step = ps.step
    targets = [pt.target for pt in ps.targets]
    keys = [(id(t.module), t.param) for t in targets]
    before = {k: _masked(masks[k]) for k in keys}
    dims = {k: _dim(pt.unit) for pt, k in zip(ps.targets, keys)}
    slices_before = {k: masked_slices(masks[k], d) for k, d in dims.items() if d is not None}
    if any(k in unknown or k in counted for k in keys):
        return _unknown(ps, keys, unknown)
    if ps.importance is not None or ps.calibrated or step.importance not in (None, "magnitude") or step.scope not in ("local", "global"):
        # not simulated: the plan's figures stand where they are facts from the start we know
        facts = all(
            pt.exact_before and pt.exact_after and pt.entries_after is not None and pt.entries_before == before[k] for pt, k in zip(ps.targets, keys)
        )
        if not facts:
            return _unknown(ps, keys, unknown)
        for pt, k in zip(ps.targets, keys):
            counted[k] = float(pt.entries_after or 0)
        return ps
    seed = plan.recipe.step_seed(step)
    if seed is not None:
        torch.manual_seed(seed)
    try:
        if step.scope == "global":
            _global(ps, targets, keys, masks)
        else:
            for t, k in zip(targets, keys):
                amount = _amount(ps, [t], masks) if ps.method.takes_amount else None
                if step.sparsity is not None and amount is not None and amount <= 0:
                    continue
                masks[k] = _new_mask(_method(ps, amount, t.param), _importance(t, masks[k]), masks[k])
    except Exception:  # a method this preview cannot run (it may still run at apply): figures unknown
        return _unknown(ps, keys, unknown)
    done_rows: list[PlannedTarget] = []
    for pt, k in zip(ps.targets, keys):
        after = _masked(masks[k])
        d = dims[k]
        if d is None:
            pruned, done = after - before[k], before[k]
        else:
            pruned, done = masked_slices(masks[k], d) - slices_before[k], slices_before[k]
        done_rows.append(
            pt._replace(
                pruned_before=done, entries_before=before[k], entries_after=float(after), to_prune=pruned, exact_before=True, exact_after=True
            )
        )
    group_to_prune = sum(int(r.entries_after or 0) - r.entries_before for r in done_rows) if step.scope == "global" else ps.group_to_prune
    return dataclasses.replace(ps, targets=tuple(done_rows), group_to_prune=group_to_prune)


def _global(ps: PlannedStep, targets: list[Target], keys: list[Key], masks: dict[Key, torch.Tensor | None]) -> None:
    """torch's ``global_unstructured``: one ranking over the group, each tensor's mask its slice."""
    amount = _amount(ps, targets, masks) if ps.method.takes_amount else None
    if ps.step.sparsity is not None and amount is not None and amount <= 0:
        return
    importance = [_importance(t, masks[k]) for t, k in zip(targets, keys)]
    if ps.method.cls is prune.L1Unstructured and len({i.dtype for i in importance}) == 1 and all(magnitude.supported(i) for i in importance):
        pieces = [magnitude.Piece(i, masks[k]) for i, k in zip(importance, keys)]
        assert amount is not None
        (cut,) = magnitude.select([(pieces, checked_nparams(amount, sum(p.eligible_count() for p in pieces)))])
        if cut.quotas is None or sum(p.numel for p in pieces) > magnitude.EXACT_TIES_UP_TO:
            for piece, k, i in zip(pieces, keys, range(len(keys))):
                keep = torch.empty(piece.numel, dtype=piece.values.dtype)
                magnitude.masks.write_keep(piece, cut, i, keep)
                old = masks[k]
                masks[k] = keep.view(piece.values.shape) * (1 if old is None else old.to(keep.dtype))
            return
    vector = torch.nn.utils.parameters_to_vector(importance)
    defaults = torch.nn.utils.parameters_to_vector([_ones_or(masks[k], i) for i, k in zip(importance, keys)])
    container = prune.PruningContainer()
    container._tensor_name = "temp"
    method = _method(ps, amount, "temp")
    container.add_pruning_method(method)
    final = container.compute_mask(vector, default_mask=defaults)
    start = 0
    for imp, k in zip(importance, keys):
        part = final[start : start + imp.numel()].view_as(imp)
        start += imp.numel()
        old = masks[k]
        masks[k] = part if old is None else part * old.to(part.dtype)
