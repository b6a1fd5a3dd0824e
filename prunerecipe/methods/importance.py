"""Importance: what ranks the entries a method prunes (a step's ``importance:``).

An importance is a function of a weight, given with its input dimension at dim 1 (GPT-2's
``Conv1D`` weights are transposed for it), returning scores of the same shape; higher means
more important. One that also takes ``stats`` is *calibrated*: it receives the
:class:`InputStats` calibration data produced at the layer's input, and only runs where such
data is collected (``nn.Linear`` and ``Conv1D`` weights inside the blocks). Importances register
like methods: built-ins, :func:`register_importance` in-process, and plugins in the
``prunerecipe.importances`` entry-point group, listed without importing them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch

from ..errors import MethodError
from ..text import suggest
from .registry import BUILTIN, IN_PROCESS, discover, dist_label

ENTRY_POINT_GROUP = "prunerecipe.importances"


@dataclass(frozen=True)
class InputStats:
    """What calibration data produced at one layer's input: the number of token positions seen
    and, per input feature ``j``, the sum of ``x_j ** 2`` over all of them (float64)."""

    tokens: int
    sq_sum: torch.Tensor

    @property
    def norms(self) -> torch.Tensor:
        """``||X_j||_2`` per input feature ``j``, over every calibration token (Wanda's norm)."""
        return self.sq_sum.sqrt()


def _promoted(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().to(torch.promote_types(weight.dtype, torch.float32))


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """``|W|``: what torch's methods rank by when given no importance scores."""
    return _promoted(weight)


def wanda(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """Wanda (Sun et al. 2023): ``|W_ij| * ||X_j||_2``, compared within each output row."""
    w = _promoted(weight)
    return w * stats.norms.to(w.dtype).reshape((1, -1) + (1,) * (w.dim() - 2))


wanda.per_row = True  # type: ignore[attr-defined]

_BUILTINS: dict[str, Callable[..., torch.Tensor]] = {"magnitude": magnitude, "wanda": wanda}


@dataclass(frozen=True)
class ImportanceSpec:
    """A resolved importance: its function, where it comes from and how it compares."""

    name: str
    fn: Callable[..., torch.Tensor]
    origin: str
    per_row: bool = False

    @property
    def calibrated(self) -> bool:
        """Whether the function takes ``stats`` (calibration statistics of the layer's input)."""
        return "stats" in inspect.signature(self.fn).parameters

    @property
    def is_magnitude(self) -> bool:
        """The built-in default: methods then rank the tensor itself, exactly as torch does."""
        return self.name == "magnitude" and self.origin == BUILTIN

    def describe(self) -> str:
        return ("calibrated" if self.calibrated else "weights only") + (", compared within each output row" if self.per_row else "")


def _check_function(fn: Any, what: str) -> Callable[..., torch.Tensor]:
    if not callable(fn):
        raise MethodError(f"{what} is {fn!r}, not a function of a weight tensor")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as exc:
        raise MethodError(f"{what} has no inspectable signature: {exc}") from exc
    if not params or set(params) - {next(iter(params)), "stats"}:
        raise MethodError(f"{what} must take (weight) or (weight, stats), not ({', '.join(params)})")
    return fn


_IN_PROCESS: dict[str, ImportanceSpec] = {}


def register_importance(name: str, fn: Callable[..., torch.Tensor], *, per_row: bool = False, replace: bool = False) -> ImportanceSpec:
    """Make ``fn`` usable as ``importance: <name>`` in recipes of this process.

    Args:
        name: the importance name recipes use (an identifier).
        fn: ``fn(weight)`` or, for a calibrated importance, ``fn(weight, stats)``: scores of
            ``weight``'s shape (input dimension at dim 1), higher meaning more important;
            ``stats`` is an :class:`InputStats`.
        per_row: unstructured steps compare the scores within each output row (as Wanda
            does) instead of across the whole tensor.
        replace: allow taking a name that is already registered.

    Returns:
        The :class:`ImportanceSpec` now registered.

    Raises:
        MethodError: a bad name or function, or a name already taken (without ``replace``).

    Example:
        >>> spec = register_importance("squared", lambda weight: weight**2)
        >>> spec.calibrated
        False
        >>> unregister_importance("squared")
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise MethodError(f"importance name {name!r} must be an identifier such as 'my_score'")
    _check_function(fn, f"importance {name!r}")
    if not replace and (name in _BUILTINS or name in _IN_PROCESS or name in entry_points()):
        raise MethodError(f"importance {name!r} is already registered ({describe_origin(name)}); pass replace=True to override it")
    spec = ImportanceSpec(name, fn, IN_PROCESS, bool(per_row))
    _IN_PROCESS[name] = spec
    get_importance.cache_clear()
    return spec


def unregister_importance(name: str) -> None:
    """Remove an in-process registration (built-ins and plugins cannot be removed).

    Args:
        name: a name given to :func:`register_importance`; an unknown name is ignored.

    Returns:
        None.

    Example:
        >>> unregister_importance("never_registered")
    """
    _IN_PROCESS.pop(name, None)
    get_importance.cache_clear()


@functools.lru_cache(maxsize=1)
def entry_points() -> dict[str, tuple[metadata.EntryPoint, ...]]:
    """Plugin entry points by importance name, discovered without importing anything."""
    return discover(ENTRY_POINT_GROUP)


def importance_names() -> list[str]:
    """Every importance name a recipe may use (plugins are listed, not imported).

    Args:
        (none)

    Returns:
        The sorted names: built-ins, in-process registrations and plugins.

    Example:
        >>> importance_names()[:2]
        ['magnitude', 'wanda']
    """
    return sorted(set(_BUILTINS) | set(_IN_PROCESS) | set(entry_points()), key=lambda n: (n not in _BUILTINS, n))


def describe_origin(name: str) -> str:
    if name in _IN_PROCESS:
        return IN_PROCESS
    if name in _BUILTINS:
        return BUILTIN
    return ", ".join(dist_label(ep) for ep in entry_points().get(name, ())) or "unknown"


@functools.cache
def get_importance(name: str) -> ImportanceSpec:
    """Resolve an importance name: in-process, built-in, or a plugin (imported now).

    A plugin's function says it compares within rows with an attribute ``per_row = True``.

    Args:
        name: the name a recipe uses.

    Returns:
        Its :class:`ImportanceSpec` (cached).

    Raises:
        MethodError: unknown (with a "did you mean"), registered twice, or a plugin that fails to import.

    Example:
        >>> get_importance("wanda").describe()
        'calibrated, compared within each output row'
    """
    if name in _IN_PROCESS:
        return _IN_PROCESS[name]
    eps = entry_points().get(name, ())
    if name in _BUILTINS and eps:
        raise MethodError(f"importance {name!r} is built in, but {', '.join(dist_label(ep) for ep in eps)} also register it; rename the plugin's")
    if name in _BUILTINS:
        fn = _BUILTINS[name]
        return ImportanceSpec(name, fn, BUILTIN, bool(getattr(fn, "per_row", False)))
    if len(eps) > 1:
        raise MethodError(
            f"importance {name!r} is registered by more than one distribution: " + "; ".join(f"{dist_label(ep)} ({ep.value})" for ep in eps)
        )
    if eps:
        ep = eps[0]
        what = f"importance {name!r} (entry point '{ep.name} = {ep.value}' from {dist_label(ep)})"
        try:
            obj = ep.load()
        except (Exception, SystemExit) as exc:  # a broken plugin must be reported, whatever it raises
            raise MethodError(f"{what} failed to import: {type(exc).__name__}: {exc}") from exc
        fn = _check_function(obj, what)
        return ImportanceSpec(name, fn, dist_label(ep), bool(getattr(fn, "per_row", False)))
    names = importance_names()
    raise MethodError(f"unknown importance {name!r}{suggest(name, names)}; available: {', '.join(names)}")


def refresh() -> None:
    """Forget discovered entry points and resolved importances."""
    entry_points.cache_clear()
    get_importance.cache_clear()


@contextmanager
def isolated() -> Iterator[None]:
    """Run a block with its own in-process importance registrations, dropped afterwards."""
    before = dict(_IN_PROCESS)
    try:
        yield
    finally:
        _IN_PROCESS.clear()
        _IN_PROCESS.update(before)
        refresh()
