"""Statistics of the inputs of a block's Linear/Conv1D layers, collected with forward pre-hooks.

Per layer, what its steps need: the sum of squares of every input feature over all tokens
(Wanda's norms, float64) and ``X^T X`` (SparseGPT's Hessian, up to a factor, float32). Layers fed
the same tensor in one forward (q, k and v projections; gate and up) share the work: each
product is computed once per batch and added to every layer that saw that tensor.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..methods import InputStats


class LayerStats:
    """The running statistics of one layer's input."""

    def __init__(self, in_features: int, norms: bool, hessian: bool, device: torch.device) -> None:
        self.in_features = in_features
        self.tokens = 0
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device) if norms else None
        self.hessian_sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None
        self._averaged = False

    def input_stats(self) -> InputStats:
        """The norms' statistics, for importance functions."""
        assert self.sq_sum is not None
        return InputStats(self.tokens, self.sq_sum)

    def hessian(self) -> torch.Tensor:
        """``X^T X / tokens`` (SparseGPT's ``2 X X^T / n`` up to a factor, which it does not see),
        made from the sum in place: collecting is over when it is asked for."""
        assert self.hessian_sum is not None
        if not self._averaged:
            self.hessian_sum.div_(max(self.tokens, 1))
            self._averaged = True
        return self.hessian_sum

    def nonfinite(self) -> bool:
        return any(t is not None and not bool(torch.isfinite(t).all()) for t in (self.sq_sum, self.hessian_sum))

    def release(self) -> None:
        self.sq_sum = None
        self.hessian_sum = None


class StatsCollector:
    """Forward pre-hooks on ``layers`` filling a :class:`LayerStats` each, while in a ``with``.

    ``new_batch()`` must be called before each forward: the products shared between layers are
    kept for one batch only.
    """

    def __init__(self, layers: Iterable[tuple[nn.Module, int, bool, bool]], device: torch.device) -> None:
        self.stats: dict[int, LayerStats] = {}
        self._modules: list[nn.Module] = []
        for module, in_features, norms, hessian in layers:
            key = id(module)
            if key in self.stats:  # two steps on one layer: the union of what they need
                old = self.stats[key]
                norms = norms or old.sq_sum is not None
                hessian = hessian or old.hessian_sum is not None
            else:
                self._modules.append(module)
            self.stats[key] = LayerStats(in_features, norms, hessian, device)
        self._handles: list[Any] = []
        self._seen: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}

    def __enter__(self) -> StatsCollector:
        for module in self._modules:
            self._handles.append(module.register_forward_pre_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()

    def new_batch(self) -> None:
        self._seen.clear()

    def of(self, module: nn.Module) -> LayerStats:
        return self.stats[id(module)]

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        st = self.stats[id(module)]
        x = args[0] if args else next(iter(kwargs.values()), None)  # nn.Linear(input=x), Conv1D(x=x)
        if not isinstance(x, torch.Tensor) or x.shape[-1] != st.in_features:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(module).__name__} got an input of shape {shape}; expected a last dimension of {st.in_features}")
        seen = self._seen.get(id(x))
        if seen is None or seen[0] is not x:
            seen = (x, {})
            self._seen[id(x)] = seen  # keeps x alive for the batch, so its id is not reused
        products = seen[1]
        rows = x.detach().reshape(-1, st.in_features)
        if st.sq_sum is not None:
            if "sq" not in products:
                flat = rows.float()
                products["sq"] = (flat * flat).sum(0).double()  # float32 within a batch, float64 across batches
            st.sq_sum += products["sq"]
        if st.hessian_sum is not None:
            if "xtx" not in products:
                flat = rows.float()
                products["xtx"] = flat.t() @ flat
            st.hessian_sum += products["xtx"]
        st.tokens += rows.shape[0]
