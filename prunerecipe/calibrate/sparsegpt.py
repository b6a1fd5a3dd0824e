"""SparseGPT (Frantar & Alistarh 2023) on one weight: mask selection and weight reconstruction.

As in the authors' code: the damped Hessian's inverse is factored once (the upper Cholesky
factor ``U`` of ``H^-1``: row ``j`` of ``U`` is the OBS update for column ``j`` once the columns
before it are fixed), columns are processed in blocks of ``block_size``, and within a block
one column at a time, each pruned entry's error spread over the columns after it. The mask of
a block is chosen at its start by the saliency ``w**2 / U_jj**2``; with N:M, each group of ``m``
columns is chosen when the loop reaches it. Input features calibration never saw (zero on the
Hessian's diagonal) have their weights zeroed, as in the reference.

Where this differs from the reference code, on purpose: the count is exact. The reference
prunes every entry whose saliency is ``<=`` the k-th smallest, which is one more than asked
(more on ties); here a block prunes exactly its share of the step's count (the count split over
blocks in proportion to their unpruned entries), ties going to the earliest entry (row-major).
Entries already pruned stay pruned (and are set to zero, their error spread like any other).
"""

from __future__ import annotations

import torch

from ..methods.ranking import prune_n_of_m, prune_smallest, split_count


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    keep: torch.Tensor,
    *,
    count: int | None = None,
    n_m: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (``(out, in)``) given the Hessian of its inputs (``(in, in)``).

    Args:
        weight: the layer's current (effective) weight, input dimension last.
        hessian: ``X^T X`` over the calibration tokens, up to a positive factor.
        keep: the current mask as bools; entries already pruned stay pruned.
        count: entries to prune beyond those already pruned (unstructured), or
        n_m: ``(n, m)``: keep at most ``n`` of every ``m`` consecutive entries in a row.
        block_size: columns chosen and updated together (a multiple of ``m`` with N:M).
        damp: added to the diagonal, as a fraction of its mean.

    Returns:
        ``(new weight, new keep mask)``: the weight has zeros where the mask prunes. Computed
        in float32, or in the weight's dtype when that is wider.

    Raises:
        ValueError: bad arguments, or a Hessian that is not positive definite even damped.

    Example:
        >>> w, keep = torch.tensor([[1.0, -0.1, 0.5, 2.0]]), torch.ones(1, 4, dtype=torch.bool)
        >>> new, mask = sparsegpt(w, torch.eye(4), keep, count=2)
        >>> mask.tolist()
        [[True, False, False, True]]
    """
    if (count is None) == (n_m is None):
        raise ValueError("give either count or n_m")
    cols = weight.shape[1]
    dtype = torch.promote_types(weight.dtype, torch.float32)
    W = weight.detach().to(dtype).clone(memory_format=torch.contiguous_format)
    if hessian.shape != (cols, cols):
        raise ValueError(f"the Hessian has shape {tuple(hessian.shape)}; the weight has {cols} input features")
    H = hessian.detach().to(dtype).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    # At most two in x in matrices at a time: the Hessian, its factor, the inverse, its factor.
    factor, info = torch.linalg.cholesky_ex(H)
    del H
    if int(info):
        raise ValueError(f"the Hessian of its inputs is not positive definite with damp={damp:g}; raise damp")
    inverse = torch.cholesky_inverse(factor)
    del factor
    U, info = torch.linalg.cholesky_ex(inverse, upper=True)
    del inverse
    if int(info):
        raise ValueError(f"the inverse Hessian is not positive definite with damp={damp:g}; raise damp")

    keep = keep.clone()
    starts = list(range(0, cols, block_size))
    if count is not None:
        unpruned = [int(keep[:, s : s + block_size].sum()) for s in starts]
        shares = split_count(count, unpruned)
    else:
        n, m = n_m  # type: ignore[misc]
        if block_size % m or cols % m:
            raise ValueError(f"with m={m}, block_size ({block_size}) and the input features ({cols}) must be multiples of m")
    for b, i1 in enumerate(starts):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        keep1 = keep[:, i1:i2]
        if count is not None:
            keep1 = prune_smallest(W1**2 / d**2, keep1, shares[b])
        for i in range(i2 - i1):
            if n_m is not None and i % m == 0:
                group = slice(i, i + m)
                keep1[:, group] = prune_n_of_m(W1[:, group] ** 2 / d[group] ** 2, keep1[:, group], n, m)
            w = W1[:, i]
            q = torch.where(keep1[:, i], w, torch.zeros_like(w))
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = keep1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W, keep
