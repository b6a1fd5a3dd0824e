"""torch's amount arithmetic, and the ``sparsity`` targets built on it, in one place.

torch's ``_compute_nparams_toprune``: an int amount is a count, a float a fraction of
the entries (or slices) still unpruned, rounded half to even. An absolute ``sparsity`` is
turned into such a count: ``round(sparsity * size) - already masked``.
"""

from __future__ import annotations

import numbers


def is_count(amount: int | float) -> bool:
    """An int amount is a count (torch checks ``numbers.Integral``; plain int first, it is ~10x faster)."""
    return isinstance(amount, int) or (not isinstance(amount, float) and isinstance(amount, numbers.Integral))


def nparams_to_prune(amount: int | float, size: int) -> int:
    """How many of ``size`` units torch prunes for ``amount`` (no validation).

    Example:
        >>> nparams_to_prune(0.5, 5), nparams_to_prune(3, 5)
        (2, 3)
    """
    if is_count(amount):
        return int(amount)
    return round(amount * size)


def checked_nparams(amount: int | float, size: int) -> int:
    """:func:`nparams_to_prune` with torch's own check: a count may not exceed ``size``.

    Raises:
        ValueError: with torch's message, for a count larger than ``size``.
    """
    if is_count(amount) and amount > size:
        raise ValueError(f"amount={amount} should be smaller than the number of parameters to prune={size}")
    return nparams_to_prune(amount, size)


def sparsity_count(sparsity: float, size: int, done: int) -> int:
    """Units still to prune so that ``sparsity`` of ``size`` is masked, ``done`` already being
    masked; zero or negative means the target is reached already (a no-op)."""
    return round(sparsity * size) - done


def normalize_dim(dim: int, ndim: int) -> int:
    """A possibly negative ``dim`` as an index into ``ndim`` dimensions."""
    return dim + ndim if dim < 0 else dim
