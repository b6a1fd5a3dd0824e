"""The names of one kind a recipe may use (pruning methods, importances), from three sources,
looked up one way: built-ins, in-process registrations, and plugins in an entry-point group
(listed without importing them, imported when a recipe first names them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from typing import Any, Generic, TypeVar

from ..errors import MethodError, Terminated
from ..text import suggest

BUILTIN = "built-in"
IN_PROCESS = "in-process"

Spec = TypeVar("Spec")


def discover(group: str) -> dict[str, tuple[metadata.EntryPoint, ...]]:
    """The entry points of ``group`` by name, without importing anything; one distribution
    installed twice (say, editable and not) counts once."""
    found: dict[str, list[metadata.EntryPoint]] = {}
    for ep in metadata.entry_points(group=group):
        found.setdefault(ep.name, [])
        if not any((ep.value, dist_label(ep)) == (seen.value, dist_label(seen)) for seen in found[ep.name]):
            found[ep.name].append(ep)
    return {name: tuple(eps) for name, eps in found.items()}


def dist_label(ep: metadata.EntryPoint) -> str:
    """``"name version"`` of the distribution an entry point comes from."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "an unknown distribution"
    return f"{dist.metadata['Name']} {dist.version}"


class Catalog(Generic[Spec]):
    """One kind of name (``kind``: ``"method"``, ``"importance"``) and where each comes from.

    Args:
        kind: what a name names, in messages.
        group: the entry-point group plugins register in.
        builtins: name -> a function making its spec.
        load: ``load(name, obj, origin, what)``: the spec of a plugin's loaded object (raising
            :class:`MethodError`, saying ``what``, when the object is not one of this kind).
        example: a name to show in the message about names that are not identifiers.
        builtins_first: list built-in names before the others.
    """

    def __init__(
        self,
        kind: str,
        group: str,
        builtins: Mapping[str, Callable[[], Spec]],
        load: Callable[[str, Any, str, str], Spec],
        example: str,
        builtins_first: bool = False,
    ) -> None:
        self.kind, self.group, self.example = kind, group, example
        self.builtins = dict(builtins)
        self.load = load
        self.builtins_first = builtins_first
        self.in_process: dict[str, Spec] = {}
        self._entry_points: dict[str, tuple[metadata.EntryPoint, ...]] | None = None
        self._resolved: dict[str, Spec] = {}

    def entry_points(self) -> dict[str, tuple[metadata.EntryPoint, ...]]:
        """Plugin entry points by name, discovered (once) without importing anything."""
        if self._entry_points is None:
            self._entry_points = discover(self.group)
        return self._entry_points

    def names(self) -> list[str]:
        """Every name a recipe may use (plugins listed, not imported), sorted."""
        every = set(self.builtins) | set(self.in_process) | set(self.entry_points())
        return sorted(every, key=lambda n: (self.builtins_first and n not in self.builtins, n))

    def origin(self, name: str) -> str:
        """Where ``name`` comes from: built-in, in-process, or the distributions registering it."""
        if name in self.in_process:
            return IN_PROCESS
        if name in self.builtins:
            return BUILTIN
        return ", ".join(dist_label(ep) for ep in self.entry_points().get(name, ())) or "unknown"

    def check_name(self, name: Any, replace: bool) -> None:
        """Refuse a name that is not an identifier, or (without ``replace``) is taken."""
        if not isinstance(name, str) or not name.isidentifier():
            raise MethodError(f"{self.kind} name {name!r} must be an identifier such as {self.example!r}")
        if not replace and (name in self.builtins or name in self.in_process or name in self.entry_points()):
            raise MethodError(f"{self.kind} {name!r} is already registered ({self.origin(name)}); pass replace=True to override it")

    def add(self, name: str, spec: Spec) -> None:
        self.in_process[name] = spec
        self._resolved.clear()

    def remove(self, name: str) -> None:
        self.in_process.pop(name, None)
        self._resolved.clear()

    def get(self, name: str) -> Spec:
        """Resolve ``name`` (in-process first, then built-in, then a plugin, imported now).

        Raises:
            MethodError: unknown (with a "did you mean"), a plugin clashing with a built-in or
                registered by two distributions, or a plugin that fails to import.
        """
        if name not in self._resolved:
            self._resolved[name] = self._resolve(name)
        return self._resolved[name]

    def _resolve(self, name: str) -> Spec:
        if name in self.in_process:
            return self.in_process[name]
        eps = self.entry_points().get(name, ())
        if name in self.builtins and eps:
            raise MethodError(
                f"{self.kind} {name!r} is built in, but {', '.join(dist_label(ep) for ep in eps)} also {'registers' if len(eps) == 1 else 'register'} it; "
                f"uninstall the conflicting plugin or rename its {self.kind}"
            )
        if name in self.builtins:
            return self.builtins[name]()
        if len(eps) > 1:
            raise MethodError(
                f"{self.kind} {name!r} is registered by more than one distribution: "
                + "; ".join(f"{dist_label(ep)} ({ep.value})" for ep in eps)
                + ". Uninstall one of them."
            )
        if eps:
            ep = eps[0]
            what = f"{self.kind} {name!r} (entry point '{ep.name} = {ep.value}' from {dist_label(ep)})"
            try:
                obj = ep.load()
            except Terminated:
                raise
            except (Exception, SystemExit) as exc:  # a broken plugin must be reported, whatever it raises
                raise MethodError(f"{what} failed to import: {type(exc).__name__}: {exc}") from exc
            return self.load(name, obj, dist_label(ep), what)
        names = self.names()
        raise MethodError(f"unknown {self.kind} {name!r}{suggest(name, names)}; available: {', '.join(names)}")

    def refresh(self) -> None:
        """Forget discovered entry points and resolved names (after installing a plugin at run time)."""
        self._entry_points = None
        self._resolved.clear()

    @contextmanager
    def isolated(self) -> Iterator[None]:
        """Run a block with its own in-process registrations, dropped afterwards."""
        before = dict(self.in_process)
        try:
            yield
        finally:
            self.in_process.clear()
            self.in_process.update(before)
            self.refresh()
