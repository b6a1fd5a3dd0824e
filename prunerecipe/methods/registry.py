"""The method registry: built-ins, in-process registrations and entry-point plugins.

A method is a :class:`torch.nn.utils.prune.BasePruningMethod` subclass. Every name is
looked up the same way (:func:`get_method`); plugins in the ``prunerecipe.methods``
entry-point group are listed without importing them and loaded only when a recipe
names them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch.nn.utils.prune as prune

from ..errors import MethodError
from .catalog import BUILTIN, IN_PROCESS, Catalog, discover, dist_label  # noqa: F401 - BUILTIN, discover, dist_label: re-exported
from .semi_structured import SemiStructured
from .sparsegpt import SparseGPT

ENTRY_POINT_GROUP = "prunerecipe.methods"
PRUNING_TYPES = ("unstructured", "structured", "global")

_N_SCHEMA = {
    "anyOf": [{"type": "number"}, {"enum": ["fro", "nuc"]}],
    "x-message": "n must be a number (write infinity as .inf or -.inf) or one of 'fro', 'nuc'",
}
_DIM_SCHEMA = {"type": "integer"}

_BUILTINS: dict[str, tuple[type[prune.BasePruningMethod], dict | None]] = {
    "identity": (prune.Identity, None),
    "random_unstructured": (prune.RandomUnstructured, None),
    "l1_unstructured": (prune.L1Unstructured, None),
    "random_structured": (
        prune.RandomStructured,
        {"type": "object", "properties": {"dim": _DIM_SCHEMA}},
    ),
    "ln_structured": (
        prune.LnStructured,
        {"type": "object", "properties": {"n": _N_SCHEMA, "dim": _DIM_SCHEMA}},
    ),
    "semi_structured": (SemiStructured, dict(SemiStructured.args_schema)),
    "sparsegpt": (SparseGPT, dict(SparseGPT.args_schema)),
}

#: torch's own methods that rank entries (or slices) by the tensor they are given, so that
#: importance scores passed in its place change what they prune
_TORCH_RANKED = (prune.L1Unstructured, prune.LnStructured)


@dataclass(frozen=True)
class MethodSpec:
    """A resolved method: its class and what the recipe may pass to it."""

    name: str
    cls: type[prune.BasePruningMethod]
    origin: str
    args_schema: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def pruning_type(self) -> str:
        return str(getattr(self.cls, "PRUNING_TYPE", "?"))

    @functools.cached_property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.cls)

    @property
    def takes_amount(self) -> bool:
        return "amount" in self.signature.parameters

    @property
    def accepts_any_args(self) -> bool:
        return any(p.kind is p.VAR_KEYWORD for p in self.signature.parameters.values())

    @property
    def arguments(self) -> dict[str, inspect.Parameter]:
        """Keyword arguments a recipe passes through ``args`` (``amount`` excluded)."""
        return {n: p for n, p in self.signature.parameters.items() if n != "amount" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    @property
    def uses_importance(self) -> bool:
        """Whether the method ranks by importance scores (``importance:`` other than magnitude).

        torch's ``l1_unstructured`` and ``ln_structured`` do (they rank the tensor they are
        given); any other class says so with a class attribute ``USES_IMPORTANCE = True``,
        and then receives the scores as ``t`` in ``compute_mask``, as torch's
        ``importance_scores`` hand them over.
        """
        return self.cls in _TORCH_RANKED or bool(getattr(self.cls, "USES_IMPORTANCE", False))

    @property
    def calibrated(self) -> bool:
        """Whether the method needs calibration data itself (SparseGPT)."""
        return issubclass(self.cls, SparseGPT)

    def nm_pattern(self, args: Mapping[str, Any]) -> tuple[int, int] | None:
        """The N:M pattern a step's ``args`` ask of this method, if it prunes by one."""
        pattern = getattr(self.cls, "nm_pattern", None)
        return pattern(args) if callable(pattern) else None

    def needs_amount(self, args: Mapping[str, Any]) -> bool:
        """Whether a step with these ``args`` must give ``amount``/``sparsity``: methods that take
        one do, unless an argument named in the class's ``AMOUNT_UNLESS`` sets the sparsity."""
        unless = getattr(self.cls, "AMOUNT_UNLESS", ())
        return self.takes_amount and not any(a in args for a in unless)

    @property
    def input_dim_arg(self) -> str | None:
        """An argument filled, when a step leaves it out, with each tensor's input dimension."""
        return getattr(self.cls, "INPUT_DIM_ARG", None)

    def describe_arguments(self) -> str:
        parts = []
        if self.takes_amount:
            parts.append("amount|sparsity")
        for n, p in self.arguments.items():
            parts.append(n if p.default is p.empty else f"{n}={p.default!r}")
        if self.accepts_any_args:
            parts.append("**kwargs")
        return ", ".join(parts) or "(none)"


def _check_method_class(obj: Any, what: str) -> type[prune.BasePruningMethod]:
    if not (isinstance(obj, type) and issubclass(obj, prune.BasePruningMethod)):
        raise MethodError(f"{what} is {obj!r}, not a torch.nn.utils.prune.BasePruningMethod subclass")
    if getattr(obj, "PRUNING_TYPE", None) not in PRUNING_TYPES:
        raise MethodError(f"{what} has PRUNING_TYPE {getattr(obj, 'PRUNING_TYPE', None)!r}; expected one of {', '.join(PRUNING_TYPES)}")
    if inspect.isabstract(obj):
        raise MethodError(f"{what} ({obj.__name__}) is abstract: it must implement compute_mask")
    return obj


# --- the registry -------------------------------------------------------------------------


def _check_args_schema(schema: Any, what: str) -> Mapping[str, Any] | None:
    """``schema`` if it is a valid JSON Schema (or None); a bad one would otherwise fail inside
    jsonschema when the first recipe naming the method is checked, with no location."""
    if schema is None:
        return None
    if not isinstance(schema, Mapping):
        raise MethodError(f"{what} has an args_schema that is a {type(schema).__name__}, not a JSON Schema (a mapping)")
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise MethodError(f"{what} has an invalid args_schema{f' at {where}' if where else ''}: {exc.message}") from None
    return schema


def _loaded(name: str, obj: Any, origin: str, what: str) -> MethodSpec:
    cls = _check_method_class(obj, what)
    return MethodSpec(name, cls, origin, _check_args_schema(getattr(cls, "args_schema", None), what))


CATALOG: Catalog[MethodSpec] = Catalog(
    "method",
    ENTRY_POINT_GROUP,
    {name: functools.partial(MethodSpec, name, cls, BUILTIN, schema) for name, (cls, schema) in _BUILTINS.items()},
    _loaded,
    example="my_method",
)


def register_method(
    name: str,
    cls: type[prune.BasePruningMethod],
    *,
    args_schema: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> MethodSpec:
    """Make ``cls`` usable as ``method: <name>`` in recipes of this process.

    Args:
        name: the method name recipes use (an identifier).
        cls: a :class:`torch.nn.utils.prune.BasePruningMethod` subclass with a ``PRUNING_TYPE``.
        args_schema: a JSON Schema for the step's ``args``; defaults to ``cls.args_schema``.
        replace: allow taking a name that is already registered.

    Returns:
        The :class:`MethodSpec` now registered.

    Raises:
        MethodError: a bad name or class, or a name already taken (without ``replace``).

    Example:
        >>> spec = register_method("keep_all", prune.Identity)
        >>> spec.origin
        'in-process'
        >>> unregister_method("keep_all")
    """
    CATALOG.check_name(name, replace)
    _check_method_class(cls, f"method {name!r}")
    schema = _check_args_schema(args_schema if args_schema is not None else getattr(cls, "args_schema", None), f"method {name!r}")
    spec = MethodSpec(name, cls, IN_PROCESS, schema)
    CATALOG.add(name, spec)
    return spec


def unregister_method(name: str) -> None:
    """Remove an in-process registration (built-ins and plugins cannot be removed).

    Args:
        name: a name given to :func:`register_method`; an unknown name is ignored.

    Returns:
        None.

    Example:
        >>> unregister_method("never_registered")
    """
    CATALOG.remove(name)


def entry_points() -> dict[str, tuple[metadata.EntryPoint, ...]]:
    """Plugin entry points by method name, discovered without importing anything."""
    return CATALOG.entry_points()


def method_names() -> list[str]:
    """Every name a recipe may use (plugins are listed, not imported).

    Args:
        (none)

    Returns:
        The sorted method names: built-ins, in-process registrations and plugins.

    Example:
        >>> "l1_unstructured" in method_names()
        True
    """
    return CATALOG.names()


def describe_origin(name: str) -> str:
    """Where a method name comes from: built-in, in-process, or the distributions registering it."""
    return CATALOG.origin(name)


def get_method(name: str) -> MethodSpec:
    """Resolve a method name: an in-process registration, a built-in, or a plugin (imported now).

    Args:
        name: the name a recipe uses.

    Returns:
        Its :class:`MethodSpec` (cached).

    Raises:
        MethodError: unknown (with a "did you mean"), registered twice, or a plugin that fails to import.

    Example:
        >>> get_method("ln_structured").describe_arguments()
        'amount|sparsity, n, dim=-1'
    """
    return CATALOG.get(name)


def refresh() -> None:
    """Forget discovered entry points and resolved methods (after installing a plugin at run time)."""
    CATALOG.refresh()


@contextmanager
def isolated() -> Iterator[None]:
    """Run a block with its own in-process registrations, dropped afterwards (for tests).

    Example:
        >>> with isolated():
        ...     _ = register_method("tmp_method", prune.Identity)
        >>> "tmp_method" in method_names()
        False
    """
    with CATALOG.isolated():
        yield
