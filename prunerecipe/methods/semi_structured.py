"""``semi_structured``: N:M sparsity, at most ``n`` nonzeros in every ``m`` consecutive entries
along the layer's input dimension (2:4 is the pattern GPUs run faster)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.utils.prune as prune

from .ranking import prune_n_of_m

NM_ARGS_SCHEMA: dict[str, Any] = {
    "n": {"type": "integer", "minimum": 1, "description": "entries kept in every group"},
    "m": {"type": "integer", "minimum": 2, "description": "entries per group, consecutive along the input dimension"},
}


def check_n_m(n: Any, m: Any) -> None:
    """Refuse an N:M pattern that is not two integers with ``1 <= n < m``."""
    for name, value in (("n", n), ("m", m)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    if not 1 <= n < m:
        raise ValueError(f"an N:M pattern needs 1 <= n < m, got n={n}, m={m}")


def nm_problem(size: int, m: int) -> str | None:
    """Why a tensor with ``size`` entries along its input dimension cannot take groups of ``m``."""
    if size % m:
        return f"has {size} entries along its input dimension, not a multiple of m={m}"
    return None


class SemiStructured(prune.BasePruningMethod):
    """Keep at most ``n`` of every ``m`` consecutive entries along ``dim``, pruning the smallest
    (by ``|t|``, or by the importance scores given as ``t``); entries already pruned count as
    pruned, ties go to the earliest entry.

    ``PRUNING_TYPE`` is torch's ``"global"``: a ``PruningContainer`` hands it the whole tensor
    and mask (an ``"unstructured"`` method would see only the unpruned entries, flattened, and
    the groups would be lost).

    Args:
        n: entries kept per group (``1 <= n < m``).
        m: group size.
        dim: the dimension groups run along; ``None`` is the input dimension (1 for
            ``(out, in, ...)`` tensors, 0 for 1-D ones). Recipes fill it per tensor
            (0 for GPT-2's ``Conv1D``).

    Example:
        >>> SemiStructured(n=2, m=4).compute_mask(torch.tensor([[1.0, -4.0, 3.0, 2.0]]), torch.ones(1, 4)).tolist()
        [[0.0, 1.0, 1.0, 0.0]]
    """

    PRUNING_TYPE = "global"
    USES_IMPORTANCE = True
    INPUT_DIM_ARG = "dim"
    args_schema: Mapping[str, Any] = {"type": "object", "properties": {**NM_ARGS_SCHEMA, "dim": {"type": "integer"}}}

    def __init__(self, n: int = 2, m: int = 4, dim: int | None = None) -> None:
        check_n_m(n, m)
        if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool)):
            raise TypeError(f"dim must be an integer, got {dim!r}")
        self.n = n
        self.m = m
        self.dim = dim

    @classmethod
    def nm_pattern(cls, args: Mapping[str, Any]) -> tuple[int, int] | None:
        """The ``(n, m)`` a step's ``args`` ask for."""
        return int(args.get("n", 2)), int(args.get("m", 4))

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0:
            raise ValueError("N:M sparsity needs a tensor with at least one dimension, not a scalar")
        dim = self.dim if self.dim is not None else (1 if t.dim() >= 2 else 0)
        if not -t.dim() <= dim < t.dim():
            raise IndexError(f"dim {dim} is out of range for a tensor of shape {tuple(t.shape)}")
        problem = nm_problem(t.shape[dim], self.m)
        if problem:
            raise ValueError(f"a tensor of shape {tuple(t.shape)} {problem} (dim {dim})")
        scores = t.detach().abs().movedim(dim, -1)
        shape = scores.shape
        keep = (default_mask != 0).movedim(dim, -1).reshape(-1, shape[-1])
        new = prune_n_of_m(scores.reshape(-1, shape[-1]), keep, self.n, self.m)
        # contiguous, as torch's own masks are (movedim leaves a permuted view; a conv's weight
        # times it would then take that layout too)
        return new.reshape(shape).movedim(-1, dim).to(dtype=default_mask.dtype, memory_format=torch.contiguous_format)
