"""What torch's random pruning methods draw from the global generator, and how to move the
generator past such draws without making them.

Random steps are reproduced where their tensors are pruned in another order (a streamed
checkpoint, tensor by tensor) or in another process (layer-split ranks): knowing how many
numbers each target draws, the generator state before any target is found by skipping the
draws of the targets before it. On the CPU generator every entry of ``rand`` draws one 32-bit
number (two for float64), in order, however the tensor is cut, so skipping ``n`` draws is
``torch.rand(n)`` in pieces.
"""

from __future__ import annotations

import torch
import torch.nn.utils.prune as prune

from .amounts import nparams_to_prune

#: torch's own random methods (subclasses may draw otherwise: they are not counted)
RANDOM_METHODS = (prune.RandomUnstructured, prune.RandomStructured)
_CHUNK = 1 << 22


def is_random(cls: type) -> bool:
    """Whether ``cls`` is one of torch's random pruning methods."""
    return cls in RANDOM_METHODS


def draws(cls: type, amount: int | float, units: int, dtype: torch.dtype) -> int:
    """32-bit draws that ``cls.compute_mask`` takes from the CPU generator.

    Args:
        cls: the pruning method class.
        amount: the torch amount of the call (a count, or a fraction of ``units``).
        units: what the method ranks: the eligible entries (``RandomUnstructured``: all of the
            tensor the first time, then those whose mask is 1), or the slices along ``dim`` not
            yet masked whole (``RandomStructured``).
        dtype: the tensor's dtype (``RandomUnstructured`` draws in it).

    Returns:
        The number of draws; 0 when the method draws nothing (it prunes nothing, or is not random).

    Example:
        >>> draws(prune.RandomUnstructured, 0.5, 10, torch.float32), draws(prune.RandomUnstructured, 0.5, 10, torch.float64)
        (10, 20)
    """
    if cls is prune.RandomUnstructured:
        if nparams_to_prune(amount, units) == 0:  # torch skips rand when nothing is pruned
            return 0
        return units * (2 if dtype == torch.float64 else 1)
    if cls is prune.RandomStructured:
        return units if nparams_to_prune(amount, units) else 0  # torch.rand(channels): float32
    return 0


def skip(count: int) -> None:
    """Move the global CPU generator past ``count`` 32-bit draws (in bounded pieces)."""
    if count <= 0:
        return
    buf = torch.empty(min(count, _CHUNK), dtype=torch.float32)
    while count > 0:
        n = min(count, _CHUNK)
        torch.rand(n, out=buf[:n])
        count -= n
