"""Checks on what a plugin method did, where torch trusts it: the mask it computed and the
weights it was handed. torch installs any mask ``compute_mask`` returns (a mask that
broadcasts, NaN, 2.0) and lets a method write into the tensor it ranks; prunerecipe could not
read such masks back, and a rollback (which restores tensors by reference) would keep such
writes. Built-in methods are not checked: they cost nothing here."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..torchprune import owned_mask
from .catalog import BUILTIN
from .registry import MethodSpec


@contextmanager
def guarded(spec: MethodSpec, targets: Sequence[Any]) -> Iterator[None]:
    """Run a step's method on ``targets`` (:class:`~prunerecipe.select.Target`), then check what a plugin method left.

    Raises:
        ValueError: the method changed a target's values in place (they are put back first),
            or left a mask of another shape or device, or with values other than 0 and 1.
    """
    if spec.origin == BUILTIN:
        yield
        return
    saved = [(t, t.original, t.original._version, t.original.detach().clone()) for t in targets]
    yield
    what = f"method {spec.name!r} ({spec.origin})"
    for t, tensor, version, values in saved:
        if tensor._version != version and not torch.equal(tensor.detach(), values):
            with torch.no_grad():
                tensor.copy_(values)
            raise ValueError(
                f"{what} changed the values of {t.qualname} in place; a pruning method computes a mask from them and leaves them as they are"
            )
    for t, tensor, _, _ in saved:
        mask = owned_mask(t.module, t.param)
        if mask is None:
            continue
        problem = None
        if tuple(mask.shape) != tuple(tensor.shape):
            problem = f"has shape {tuple(mask.shape)}, not the tensor's {tuple(tensor.shape)}"
        elif mask.device != tensor.device:
            problem = f"is on {mask.device}, not on the tensor's {tensor.device}"
        else:
            odd = mask[(mask != 0) & (mask != 1)]
            if odd.numel():
                problem = f"holds {odd.numel()} value(s) other than 0 and 1 (such as {odd.reshape(-1)[0].item()})"
        if problem is not None:
            raise ValueError(f"{what} computed a mask for {t.qualname} that {problem}")
