"""``@pruning_method``: a plain ``compute_mask`` function as a registered-ready method class."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch.nn.utils.prune as prune

from .registry import PRUNING_TYPES


def pruning_method(
    pruning_type: str = "unstructured",
    *,
    args_schema: Mapping[str, Any] | None = None,
) -> Callable[[Callable[..., Any]], type[prune.BasePruningMethod]]:
    """Turn ``compute_mask(t, default_mask, **args)`` into a :class:`BasePruningMethod` subclass.

    The function's parameters after ``t`` and ``default_mask`` become the method's keyword
    arguments (``amount`` included, if present). The returned class replaces the function
    under its name, so pruned models that use it still pickle.

    Args:
        pruning_type: ``"unstructured"``, ``"structured"`` (the function must then take a
            ``dim``) or ``"global"``, as torch's ``PRUNING_TYPE``.
        args_schema: optional JSON Schema for the step's ``args``, checked with locations.

    Returns:
        A decorator that returns the new :class:`torch.nn.utils.prune.BasePruningMethod` subclass.

    Raises:
        ValueError: for an unknown ``pruning_type``.
        TypeError: when the function does not take ``(t, default_mask, ...)``.

    Example:
        >>> @pruning_method("unstructured")
        ... def every_other(t, default_mask):
        ...     mask = default_mask.clone()
        ...     mask.view(-1)[::2] = 0
        ...     return mask
        >>> issubclass(every_other, prune.BasePruningMethod)
        True
    """
    if pruning_type not in PRUNING_TYPES:
        raise ValueError(f"pruning_type must be one of {PRUNING_TYPES}, not {pruning_type!r}")

    def decorate(fn: Callable[..., Any]) -> type[prune.BasePruningMethod]:
        params = list(inspect.signature(fn).parameters.values())
        if len(params) < 2 or any(p.kind not in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY) for p in params[:2]):
            raise TypeError(f"{fn.__qualname__} must take (t, default_mask, ...) as its first two parameters")
        init_sig = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind is p.POSITIONAL_OR_KEYWORD else p for p in params[2:]])
        if pruning_type == "structured" and "dim" not in init_sig.parameters:
            raise TypeError(f"structured method {fn.__qualname__} needs a 'dim' parameter")

        def __init__(self: Any, **kwargs: Any) -> None:
            bound = init_sig.bind(**kwargs)
            bound.apply_defaults()
            self._kwargs = dict(bound.arguments)
            for key, value in self._kwargs.items():
                setattr(self, key, value)

        def compute_mask(self: Any, t: Any, default_mask: Any) -> Any:
            return fn(t, default_mask, **self._kwargs)

        __init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *init_sig.parameters.values()]
        )
        namespace = {
            "PRUNING_TYPE": pruning_type,
            "__init__": __init__,
            "compute_mask": compute_mask,
            "__doc__": fn.__doc__,
            "__module__": fn.__module__,
            "__qualname__": fn.__qualname__,
            "args_schema": args_schema,
            "compute_mask_function": staticmethod(fn),
        }
        return type(fn.__name__, (prune.BasePruningMethod,), namespace)

    return decorate
