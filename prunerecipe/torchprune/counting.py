"""Counting zero and kept entries, exactly and without big temporaries."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .naming import original, owned_mask

_CHUNK = 1 << 18  # float32 sums of 0/1 values are exact far beyond this (below 2**24)


@torch.no_grad()
def zero_entries(tensor: torch.Tensor, mask: torch.Tensor | None = None, scratch: dict[Any, Any] | None = None) -> int:
    """Entries of ``tensor`` that are zero, or masked out by ``mask`` (0 for ``meta`` tensors).

    Counts with float sums over chunks (exact, and far faster than ``count_nonzero`` or
    summing bools on CPU) in two small buffers, reused through ``scratch`` across calls.
    """
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return 0
    flat = tensor.detach().reshape(-1)
    flat_mask = mask.detach().reshape(-1) if mask is not None else None
    scratch = {} if scratch is None else scratch
    key = str(flat.device)
    if key not in scratch:
        scratch[key] = (torch.empty(_CHUNK, dtype=torch.float32, device=flat.device), torch.empty(_CHUNK, dtype=torch.float32, device=flat.device))
    hits_all, other_all = scratch[key]
    total = 0
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK]
        n = part.numel()
        hits = hits_all[:n]
        torch.eq(part, 0, out=hits)
        if flat_mask is not None:
            other = other_all[:n]
            torch.eq(flat_mask[start : start + n], 0, out=other)
            torch.maximum(hits, other, out=hits)
        total += int(hits.sum().item())
    return total


def count_zeros(module: nn.Module, name: str, scratch: dict[Any, Any] | None = None) -> int:
    """Zero entries of ``module.<name>`` as the model computes with it (``orig * mask`` when pruned)."""
    mask = owned_mask(module, name)
    return zero_entries(original(module, name), mask, scratch)


def kept_entries(mask: torch.Tensor) -> int:
    """How many entries of a 0/1 mask are 1: float sums over slices small enough to be exact."""
    flat = mask.detach().reshape(-1)
    step = 1 << 24
    acc = torch.float32 if flat.dtype in (torch.float16, torch.bfloat16) else None
    return sum(int(flat[a : a + step].sum(dtype=acc).item()) for a in range(0, flat.numel(), step))


def masked_slices(mask: torch.Tensor | None, dim: int) -> int:
    """Slices of ``mask`` along ``dim`` that are entirely 0 (what torch's container skips)."""
    if mask is None or mask.device.type == "meta":
        return 0
    other = [d for d in range(mask.dim()) if d != dim]
    alive = mask.sum(dim=other) != 0 if other else mask != 0
    return int(mask.shape[dim] - torch.count_nonzero(alive).item())
