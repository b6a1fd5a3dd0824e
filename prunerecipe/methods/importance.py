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
from .catalog import BUILTIN, IN_PROCESS, Catalog

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


def _loaded(name: str, obj: Any, origin: str, what: str) -> ImportanceSpec:
    fn = _check_function(obj, what)
    return ImportanceSpec(name, fn, origin, bool(getattr(fn, "per_row", False)))


CATALOG: Catalog[ImportanceSpec] = Catalog(
    "importance",
    ENTRY_POINT_GROUP,
    {name: functools.partial(_loaded, name, fn, BUILTIN, name) for name, fn in _BUILTINS.items()},
    _loaded,
    example="my_score",
    builtins_first=True,
)


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
    CATALOG.check_name(name, replace)
    _check_function(fn, f"importance {name!r}")
    spec = ImportanceSpec(name, fn, IN_PROCESS, bool(per_row))
    CATALOG.add(name, spec)
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
    CATALOG.remove(name)


def entry_points() -> dict[str, tuple[metadata.EntryPoint, ...]]:
    """Plugin entry points by importance name, discovered without importing anything."""
    return CATALOG.entry_points()


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
    return CATALOG.names()


def describe_origin(name: str) -> str:
    """Where an importance name comes from: built-in, in-process, or the distributions registering it."""
    return CATALOG.origin(name)


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
    return CATALOG.get(name)


def refresh() -> None:
    """Forget discovered entry points and resolved importances."""
    CATALOG.refresh()


@contextmanager
def isolated() -> Iterator[None]:
    """Run a block with its own in-process importance registrations, dropped afterwards."""
    with CATALOG.isolated():
        yield
