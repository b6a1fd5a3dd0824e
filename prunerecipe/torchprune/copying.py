"""Pruned modules that ``copy.deepcopy``, ``pickle`` and ``torch.save(model)`` take at any time."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from .naming import pruning_hooks


class PrunedGetState:
    """``__getstate__`` for one pruned module, installed on the instance.

    ``copy.deepcopy``, ``pickle`` and ``torch.save(model)`` then store the computed
    ``weight`` (``orig * mask``, a non-leaf tensor after a forward pass) detached, so they
    work at any time (plain ``torch.nn.utils.prune`` modules cannot be deep-copied after a
    forward: pytorch#37322, the reason EMA/SWA code trips on them). Nothing else changes:
    training and autograd are untouched, and the next forward recomputes ``weight``.

    It holds its module weakly: a strong reference back would make every pruned module a
    reference cycle, so ``del model`` would free the weights only when the cycle collector
    next runs. A copy or an unpickled module gets one of its own.
    """

    def __init__(self, module: nn.Module) -> None:
        self._module = weakref.ref(module)

    @property
    def module(self) -> nn.Module | None:
        """The module this is installed on (None once it is gone)."""
        return self._module()

    def __call__(self) -> dict[str, Any]:
        module = self._module()
        if module is None:  # a shallow copy (copy.copy) of a pruned module that is gone shares this hook
            raise RuntimeError(
                "cannot copy or pickle this module: it is a shallow copy (copy.copy) of a pruned module that no longer "
                "exists, and shares its state; copy pruned modules with copy.deepcopy instead"
            )
        state = module.__dict__.copy()
        for hook in pruning_hooks(module):
            value = state.get(hook._tensor_name)
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                state[hook._tensor_name] = value.detach()
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> PrunedGetState:
        module = self._module()
        if module is None:  # pragma: no cover - a copy is made from a live module
            return self
        copied: nn.Module = memo.get(id(module), module)  # the copy of the module being copied
        return PrunedGetState(copied)

    def __reduce__(self) -> tuple[Any, ...]:
        return (PrunedGetState, (self._module(),))  # pickled by reference to its module


def make_copyable(module: nn.Module) -> None:
    """Let a pruned module be deep-copied and pickled at any time (see :class:`PrunedGetState`)."""
    current = module.__dict__.get("__getstate__")
    if not (isinstance(current, PrunedGetState) and current.module is module):
        module.__dict__["__getstate__"] = PrunedGetState(module)
