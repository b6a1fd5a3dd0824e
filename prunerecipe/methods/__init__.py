"""Pruning methods: the registry (built-ins, in-process, entry-point plugins), argument
binding, and the ``@pruning_method`` decorator.

A method is a :class:`torch.nn.utils.prune.BasePruningMethod` subclass; recipes name it.
"""

from __future__ import annotations

from .decorator import pruning_method
from .registry import (
    BUILTIN,
    ENTRY_POINT_GROUP,
    IN_PROCESS,
    PRUNING_TYPES,
    MethodSpec,
    describe_origin,
    entry_points,
    get_method,
    isolated,
    method_names,
    refresh,
    register_method,
    unregister_method,
)

__all__ = [
    "BUILTIN",
    "ENTRY_POINT_GROUP",
    "IN_PROCESS",
    "PRUNING_TYPES",
    "MethodSpec",
    "describe_origin",
    "entry_points",
    "get_method",
    "isolated",
    "method_names",
    "pruning_method",
    "refresh",
    "register_method",
    "unregister_method",
]
