"""Pruning one tensor by importance scores, and installing SparseGPT's result.

Scores go to the method the way torch hands them over: as ``importance_scores`` in
``BasePruningMethod.apply``, so ``compute_mask`` ranks them in place of the tensor. One
exception: an importance that compares within output rows (Wanda), on ``l1_unstructured``,
is realized here, since torch's ``L1Unstructured`` ranks the whole tensor: the step's count
(torch's amount arithmetic over the tensor) is split over the rows in proportion to their
unpruned entries, and each row prunes its lowest scores; the hook is torch's
``L1Unstructured`` with the step's amount, as after ``prune.l1_unstructured``.
"""

from __future__ import annotations

import torch
import torch.nn.utils.prune as prune

from ..amounts import checked_nparams
from ..layout import from_canonical, input_dim, to_canonical
from ..methods import BUILTIN, ImportanceSpec, InputStats, SparseGPT
from ..methods.ranking import prune_smallest_in_rows, split_count
from ..plan import PlannedStep
from ..select import Target
from ..torchprune import attach, attach_rewritten, effective, is_pruned, match_mask_dtype, original, owned_mask
from .sparsegpt import sparsegpt


def importance_scores(importance: ImportanceSpec, target: Target, stats: InputStats | None) -> torch.Tensor:
    """``importance``'s scores for ``target`` (in the tensor's own layout), from its effective
    weight (``orig * mask``, as torch's default ranks) with its input dimension at dim 1.

    Raises:
        ValueError: the function raised, or gave scores of another shape or not finite.
    """
    tensor = effective(target.module, target.param)
    if importance.origin != BUILTIN and not is_pruned(target.module, target.param):
        tensor = tensor.clone()  # the parameter's own data: a plugin that writes into its argument must not change the model
    dim = input_dim(target.module, target.param, tensor.dim())
    canonical = to_canonical(tensor, dim)
    try:
        scores = importance.fn(canonical, stats) if importance.calibrated else importance.fn(canonical)
    except Exception as exc:  # a plugin's function, whatever it raises
        raise ValueError(f"importance {importance.name!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(scores, torch.Tensor) or scores.shape != canonical.shape:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"importance {importance.name!r} returned {got} for a weight of shape {tuple(canonical.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"importance {importance.name!r} returned NaN or infinite scores")
    return from_canonical(scores.detach(), dim)


def prune_scored(ps: PlannedStep, target: Target, scores: torch.Tensor, amount: int | float | None) -> None:
    """Apply ``ps``'s method to ``target`` ranking ``scores`` (see the module's docstring)."""
    module, name = target.module, target.param
    if ps.importance is not None and ps.importance.per_row and ps.method.cls is prune.L1Unstructured:
        assert amount is not None
        mask = _per_row_mask(target, scores, amount)
        attach(module, name, prune.L1Unstructured(amount=amount), mask)
        return
    call = ps.target_kwargs(target)
    if ps.method.needs_amount(call):
        call["amount"] = amount
    ps.method.cls.apply(module, name, importance_scores=scores_for(target, scores), **call)
    match_mask_dtype(module, name)


def scores_for(target: Target, scores: torch.Tensor) -> torch.Tensor:
    """``scores`` as they are ranked: in the weight's dtype, but never coarser than float32 (a
    half-precision cast would tie scores the importance tells apart; the reference Wanda ranks
    in float32). A chained mask then comes out in float32, and :func:`prune_scored` gives it
    the weight's dtype back."""
    dtype = original(target.module, target.param).dtype
    want = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return scores if scores.dtype == want else scores.to(want)


def _per_row_mask(target: Target, scores: torch.Tensor, amount: int | float) -> torch.Tensor:
    orig = original(target.module, target.param)
    current = owned_mask(target.module, target.param)
    keep = torch.ones_like(orig, dtype=torch.bool) if current is None else current != 0
    dim = input_dim(target.module, target.param, orig.dim())
    canonical_shape = to_canonical(orig, dim).shape
    rows = canonical_shape[0] if orig.dim() >= 2 else 1
    keep_rows = to_canonical(keep, dim).reshape(rows, -1)
    unpruned = keep_rows.sum(dim=1).tolist()
    k = checked_nparams(amount, sum(unpruned))
    new = prune_smallest_in_rows(to_canonical(scores, dim).reshape(rows, -1), keep_rows, split_count(k, unpruned))
    return from_canonical(new.reshape(canonical_shape), dim).to(orig.dtype).contiguous()


def prune_sparsegpt(ps: PlannedStep, target: Target, hessian: torch.Tensor, amount: int | float | None) -> None:
    """Run SparseGPT on ``target`` and install its result: the reconstructed weights become
    ``<param>_orig`` where the new mask keeps them (masked entries keep their old values, as
    torch leaves them), the new mask the mask, a :class:`SparseGPT` hook in the history."""
    module, name = target.module, target.param
    kwargs = dict(ps.step.args)
    orig = original(module, name)
    current = owned_mask(module, name)
    keep = torch.ones_like(orig, dtype=torch.bool) if current is None else current != 0
    dim = input_dim(module, name, orig.dim())
    n_m = ps.method.nm_pattern(kwargs)
    count = None if n_m is not None else checked_nparams(amount if amount is not None else 0, int(keep.sum()))
    new_weight, new_keep = sparsegpt(
        to_canonical(effective(module, name), dim),
        hessian,
        to_canonical(keep, dim),
        count=count,
        n_m=n_m,
        block_size=int(kwargs.get("block_size", 128)),
        damp=float(kwargs.get("damp", 0.01)),
    )
    new_keep = from_canonical(new_keep, dim)
    values = torch.where(new_keep, from_canonical(new_weight, dim).to(orig.dtype), orig.detach())
    if n_m is None:
        kwargs["amount"] = amount
    attach_rewritten(module, name, SparseGPT(**kwargs), new_keep.to(orig.dtype).contiguous(), values)
