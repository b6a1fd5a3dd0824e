"""Exact selections by score, one rule each, shared by ``semi_structured``, per-row importances
and SparseGPT.

Every selection prunes exactly the count it is asked for. Ties are broken by position: among
equal scores the earliest entry (in row-major order of the rows given) is pruned first, through
stable sorts. Entries already pruned (``keep`` False) stay pruned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def split_count(k: int, sizes: Sequence[int]) -> list[int]:
    """Split ``k`` units over parts of ``sizes`` in proportion to their sizes (largest remainder;
    on equal remainders the earlier part gets the unit). No part gets more than its size.

    Example:
        >>> split_count(5, [4, 4, 2])
        [2, 2, 1]
    """
    total = sum(sizes)
    if not 0 <= k <= total:
        raise ValueError(f"cannot split {k} units over parts of {total} in all")
    if total == 0:
        return [0 for _ in sizes]
    base = [k * s // total for s in sizes]
    rest = [k * s % total for s in sizes]
    extra = k - sum(base)
    for i in sorted(range(len(sizes)), key=lambda i: -rest[i])[:extra]:  # sorted() is stable: earlier first on ties
        base[i] += 1
    return base


def prune_smallest_in_rows(scores: torch.Tensor, keep: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Prune ``counts[i]`` more entries of each row ``i`` of 2-D ``scores``: its smallest among the
    entries still kept (earliest first on ties). Returns the new keep mask (bool).

    Example:
        >>> keep = torch.ones(1, 4, dtype=torch.bool)
        >>> prune_smallest_in_rows(torch.tensor([[3.0, 1.0, 1.0, 2.0]]), keep, [2]).tolist()
        [[True, False, False, True]]
    """
    keys = torch.where(keep, scores, torch.full_like(scores, float("inf")))
    order = keys.sort(dim=1, stable=True).indices
    wanted = torch.as_tensor(list(counts), dtype=torch.long, device=scores.device).unsqueeze(1)
    chosen = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0) < wanted
    pruned = torch.zeros_like(keep).scatter_(1, order, chosen)
    return keep & ~pruned


def prune_smallest(scores: torch.Tensor, keep: torch.Tensor, k: int) -> torch.Tensor:
    """Prune the ``k`` smallest kept entries of ``scores`` (any shape, row-major order on ties);
    returns the new keep mask (bool, ``scores``' shape)."""
    flat = prune_smallest_in_rows(scores.reshape(1, -1), keep.reshape(1, -1), [k])
    return flat.reshape(keep.shape)


def prune_n_of_m(scores: torch.Tensor, keep: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M: in every ``m`` consecutive entries along the last dimension of 2-D ``scores``, keep at
    most ``n``: the ``m - n`` smallest are pruned, entries already pruned counting first.

    Example:
        >>> keep = torch.ones(1, 4, dtype=torch.bool)
        >>> prune_n_of_m(torch.tensor([[0.5, -2.0, 0.1, 3.0]]).abs(), keep, 2, 4).tolist()
        [[False, True, False, True]]
    """
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} entries along the input dimension are not a multiple of m={m}")
    groups = scores.reshape(rows, cols // m, m)
    kept = keep.reshape(rows, cols // m, m)
    keys = torch.where(kept, groups, torch.full_like(groups, float("-inf")))
    order = keys.sort(dim=2, stable=True).indices
    chosen = (torch.arange(m, device=scores.device) < m - n).expand_as(order)
    pruned = torch.zeros_like(kept).scatter_(2, order, chosen)
    return (kept & ~pruned).reshape(rows, cols)
