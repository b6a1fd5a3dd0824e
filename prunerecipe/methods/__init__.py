"""Pruning methods and importances: the registries (built-ins, in-process, entry-point
plugins), argument binding, the ``@pruning_method`` decorator, and the built-in N:M and
SparseGPT methods.

A method is a :class:`torch.nn.utils.prune.BasePruningMethod` subclass; recipes name it.
An importance is a function that scores a weight's entries; a step's ``importance:`` names it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from . import importance as _importance
from . import registry as _registry
from .decorator import pruning_method
from .importance import (
    ImportanceSpec,
    InputStats,
    get_importance,
    importance_names,
    register_importance,
    unregister_importance,
)
from .registry import (
    BUILTIN,
    ENTRY_POINT_GROUP,
    IN_PROCESS,
    PRUNING_TYPES,
    MethodSpec,
    describe_origin,
    entry_points,
    get_method,
    method_names,
    register_method,
    unregister_method,
)
from .semi_structured import SemiStructured
from .sparsegpt import SparseGPT


def refresh() -> None:
    """Forget discovered entry points and resolved methods and importances (after installing a
    plugin at run time)."""
    _registry.refresh()
    _importance.refresh()


@contextmanager
def isolated() -> Iterator[None]:
    """Run a block with its own in-process method and importance registrations, dropped
    afterwards (for tests).

    Example:
        >>> import torch.nn.utils.prune as prune
        >>> with isolated():
        ...     _ = register_method("tmp_method", prune.Identity)
        >>> "tmp_method" in method_names()
        False
    """
    with _registry.isolated(), _importance.isolated():
        yield


__all__ = [
    "BUILTIN",
    "ENTRY_POINT_GROUP",
    "IN_PROCESS",
    "PRUNING_TYPES",
    "ImportanceSpec",
    "InputStats",
    "MethodSpec",
    "SemiStructured",
    "SparseGPT",
    "describe_origin",
    "entry_points",
    "get_importance",
    "get_method",
    "importance_names",
    "isolated",
    "method_names",
    "pruning_method",
    "refresh",
    "register_importance",
    "register_method",
    "unregister_importance",
    "unregister_method",
]
