"""The recipe's data types: frozen dataclasses, one per level of a recipe file.

Each field that a recipe file can set names its key in ``metadata["key"]`` (a dotted path
for nested keys, such as ``exclude.types`` under ``select``); :func:`from_data` builds the
typed value from validated data by those keys, and a test checks them against the JSON
Schema, so a key cannot exist in one and not the other.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, get_type_hints

from .errors import KeyPath, Problem, format_path


def key(name: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field read from the recipe key ``name`` (dotted for nested keys)."""
    if default is dataclasses.MISSING and "default_factory" not in kw:
        return field(metadata={"key": name}, **kw)
    return field(default=default, metadata={"key": name}, **kw)


@dataclass(frozen=True)
class Selector:
    """Which modules a step selects. ``None`` means "no constraint"."""

    types: tuple[str, ...] | None = key("types", None)
    names: tuple[str, ...] | None = key("names", None)
    exclude_types: tuple[str, ...] = key("exclude.types", ())
    exclude_names: tuple[str, ...] = key("exclude.names", ())

    def describe(self) -> str:
        """The selector in YAML flow style, as a recipe would write it."""

        def flow(items: tuple[str, ...]) -> str:
            return "[" + ", ".join(items) + "]"

        parts = []
        if self.types is not None:
            parts.append(f"types: {flow(self.types)}")
        if self.names is not None:
            parts.append(f"names: {flow(self.names)}")
        excl = []
        if self.exclude_types:
            excl.append(f"types: {flow(self.exclude_types)}")
        if self.exclude_names:
            excl.append(f"names: {flow(self.exclude_names)}")
        if excl:
            parts.append("exclude: {" + ", ".join(excl) + "}")
        return "{" + ", ".join(parts) + "}"


@dataclass(frozen=True)
class Schedule:
    """Training-time schedule of a step (run by a training-loop driver, not by ``apply_recipe``)."""

    unit: str = key("unit", "epoch")
    start: int = key("start", 0)
    end: int = key("end", None)  # None: the same as start (see __post_init__)
    every: int = key("every", 1)
    curve: str = key("curve", "cubic")
    initial_sparsity: float = key("initial_sparsity", 0.0)

    def __post_init__(self) -> None:
        if self.end is None:
            object.__setattr__(self, "end", self.start)
        object.__setattr__(self, "initial_sparsity", float(self.initial_sparsity))


@dataclass(frozen=True)
class Step:
    """One step of a recipe; ``index`` is its position in ``steps``."""

    index: int
    select: Selector = key("select")
    method: str = key("method")
    params: tuple[str, ...] = key("params", ("weight",))
    name: str | None = key("name", None)
    amount: int | float | None = key("amount", None)
    sparsity: float | None = key("sparsity", None)
    scope: str = key("scope", "local")
    args: Mapping[str, Any] = key("args", default_factory=dict)
    seed: int | None = key("seed", None)
    schedule: Schedule | None = key("schedule", None)
    importance: str | None = key("importance", None)

    def __post_init__(self) -> None:
        if self.sparsity is not None:
            object.__setattr__(self, "sparsity", float(self.sparsity))

    @property
    def path(self) -> KeyPath:
        return ("steps", self.index)

    @property
    def label(self) -> str:
        """``steps[1] (name)``: how reports and messages name the step."""
        base = format_path(self.path)
        return f"{base} ({self.name})" if self.name else base

    @property
    def how_much(self) -> str:
        if self.sparsity is not None:
            return f"sparsity={self.sparsity:g}"
        if self.amount is not None:
            return f"amount={self.amount:g}" if isinstance(self.amount, float) else f"amount={self.amount}"
        return "-"


@dataclass(frozen=True)
class InputSpec:
    """One example input for tracing: a shape (batch first) and a dtype name."""

    shape: tuple[int, ...] = key("shape")
    dtype: str = key("dtype", "float32")


@dataclass(frozen=True)
class Calibration:
    """How much calibration data the steps that need it draw."""

    samples: int = key("samples", 128)
    batch_size: int = key("batch_size", 8)


@dataclass(frozen=True)
class Sequential:
    """The blocks calibration-based steps process one at a time (a names pattern)."""

    blocks: str = key("blocks")


class Locator(Protocol):
    """Something that knows where a key path of a recipe sits in its file."""

    source: str

    def problem(self, path: KeyPath, message: str, *, key: bool = False, code: str = "invalid") -> Problem: ...


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. ``source`` and the positions it was read from travel with it."""

    version: int = key("version")
    steps: tuple[Step, ...] = key("steps")
    name: str | None = key("name", None)
    description: str | None = key("description", None)
    model: str | None = key("model", None)
    vars: Mapping[str, Any] = key("vars", default_factory=dict)
    seed: int | None = key("seed", None)
    finalize: bool | str = key("finalize", False)  # True, False or "compact"
    lottery_ticket: bool = key("lottery_ticket", False)
    inputs: tuple[InputSpec, ...] | None = key("inputs", None)
    calibration: Calibration | None = key("calibration", None)
    sequential: Sequential | None = key("sequential", None)
    source: str = field(default="<recipe>", compare=False)
    document: Locator | None = field(default=None, compare=False, repr=False)

    def problem(self, path: KeyPath, message: str, code: str = "invalid") -> Problem:
        """A :class:`Problem` located at ``path`` of this recipe's file, when known."""
        if self.document is not None:
            return self.document.problem(path, message, code=code)
        return Problem(self.source, None, None, path, message, code)

    @property
    def compacts(self) -> bool:
        """``finalize: compact``: channels masked across their whole group are removed."""
        return self.finalize == "compact"

    def step_seed(self, step: Step) -> int | None:
        return step.seed if step.seed is not None else self.seed


T = TypeVar("T")


def recipe_keys(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """The fields of a recipe dataclass that a file sets, by their (dotted) key."""
    return {f.metadata["key"]: f for f in dataclasses.fields(cls) if "key" in f.metadata}


def from_data(cls: type[T], data: Mapping[str, Any], **extra: Any) -> T:
    """Build ``cls`` from validated recipe data by each field's key; absent keys take defaults.

    Lists become tuples, mappings are copied, nested levels (``select``, ``schedule``, each
    of ``steps``) become their own dataclasses.
    """
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = dict(extra)
    for name, f in recipe_keys(cls).items():
        value: Any = data
        for part in name.split("."):
            value = value.get(part, dataclasses.MISSING) if isinstance(value, Mapping) else dataclasses.MISSING
        if value is not dataclasses.MISSING:
            kwargs[f.name] = _convert(hints[f.name], value)
    return cls(**kwargs)


def _convert(hint: Any, value: Any) -> Any:
    candidates = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in candidates:
        if isinstance(option, type) and dataclasses.is_dataclass(option) and isinstance(value, Mapping):
            return from_data(option, value)
    for option in candidates:
        if typing.get_origin(option) is tuple and typing.get_args(option)[:1] == (Step,):
            return tuple(from_data(Step, item, index=i) for i, item in enumerate(value))
        if typing.get_origin(option) is tuple and typing.get_args(option)[:1] == (InputSpec,):
            return tuple(from_data(InputSpec, item) for item in value)
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value
