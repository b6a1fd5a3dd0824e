"""``sparsegpt``: the method a recipe names for SparseGPT (Frantar & Alistarh 2023).

The class carries the step's arguments and sits in the pruning history like any other
method; the algorithm itself (it needs each layer's Hessian from calibration inputs, and
rewrites the weights as well as the mask) runs in :mod:`prunerecipe.calibrate`, block by block.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.utils.prune as prune

from .semi_structured import NM_ARGS_SCHEMA, check_n_m


class SparseGPT(prune.BasePruningMethod):
    """SparseGPT: OBS-style mask selection with weight reconstruction, over column blocks.

    Either an ``amount``/``sparsity`` (unstructured, chosen per block of columns) or an N:M
    pattern (``n`` and ``m``), never both.

    Args:
        amount: torch's amount (fraction or count of the unpruned entries); ``None`` with N:M.
        block_size: columns selected and updated together (a multiple of ``m`` with N:M).
        damp: added to the Hessian's diagonal, as a fraction of its mean diagonal.
        n: entries kept in every ``m`` consecutive ones along the input dimension.
        m: the N:M group size.

    Example:
        >>> SparseGPT(amount=0.5).block_size, SparseGPT(n=2, m=4).nm_pattern({"n": 2, "m": 4})
        (128, (2, 4))
    """

    PRUNING_TYPE = "unstructured"
    #: the arguments that, when given, make the sparsity and take the place of amount/sparsity
    AMOUNT_UNLESS = ("n", "m")
    args_schema: Mapping[str, Any] = {
        "type": "object",
        "properties": {
            "block_size": {"type": "integer", "minimum": 1},
            "damp": {"type": "number", "minimum": 0},
            **NM_ARGS_SCHEMA,
        },
        "dependentRequired": {"n": ["m"], "m": ["n"]},
    }

    def __init__(
        self, amount: int | float | None = None, block_size: int = 128, damp: float = 0.01, n: int | None = None, m: int | None = None
    ) -> None:
        if (n is None) != (m is None):
            raise ValueError("give both n and m for an N:M pattern, or neither")
        if n is not None:
            check_n_m(n, m)
            assert m is not None
            if amount is not None:
                raise ValueError("an N:M pattern sets the sparsity itself: give no amount with n and m")
            if isinstance(block_size, int) and block_size % m:
                raise ValueError(f"block_size {block_size} must be a multiple of m={m} (groups may not straddle blocks)")
        elif amount is None:
            raise ValueError("sparsegpt needs an amount (or sparsity), or an N:M pattern")
        elif not isinstance(amount, numbers.Real) or isinstance(amount, bool) or amount < 0 or (isinstance(amount, float) and amount > 1):
            raise ValueError(f"amount must be a count >= 0 or a fraction in [0, 1], got {amount!r}")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if not isinstance(damp, numbers.Real) or isinstance(damp, bool) or not 0 <= damp < math.inf:
            raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
        self.amount = amount
        self.block_size = block_size
        self.damp = float(damp)
        self.n = n
        self.m = m

    @classmethod
    def nm_pattern(cls, args: Mapping[str, Any]) -> tuple[int, int] | None:
        """The ``(n, m)`` a step's ``args`` ask for, or ``None`` for unstructured SparseGPT."""
        if "n" in args and "m" in args:
            return int(args["n"]), int(args["m"])
        return None

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "sparsegpt chooses its mask from calibration inputs and rewrites the weights with it; "
            "run it through prunerecipe.apply_recipe(model, recipe, calibration=...) rather than on a tensor alone"
        )
