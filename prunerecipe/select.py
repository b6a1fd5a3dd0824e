"""Selectors: which (module, parameter) pairs of a model a step prunes.

A module is selected when ``types`` is absent or one entry matches its class, ``names``
is absent or one entry matches its qualified name, and no entry under ``exclude``
matches (either a type or a name: exclusion is an "any of" test).
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import json
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import nn

from .errors import ReparametrizedError, SelectorError
from .spec import Selector
from .text import clip, short, suggest
from .torchprune import foreign_reparam, has_param, is_pruned, original, own_parameters, owned_mask, unpruned_name


@functools.cache
def resolve_type(path: str) -> type:
    """Import a dotted class path such as ``torch.nn.Conv2d`` or ``transformers.pytorch_utils.Conv1D``."""
    parts = path.split(".")
    if not all(p.isidentifier() for p in parts):
        raise SelectorError(f"{path!r} is not a class name or a dotted import path")
    last_error: BaseException | None = None
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: object = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                last_error = exc
                continue
            raise SelectorError(f"cannot import {path!r}: importing {module_name!r} failed: {exc}") from None
        except Exception as exc:  # the imported module itself is broken
            raise SelectorError(f"cannot import {path!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}") from None
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise SelectorError(f"cannot import {path!r}: module {module_name!r} has no attribute {'.'.join(parts[cut:])!r}") from None
        if not isinstance(obj, type):
            raise SelectorError(f"{path!r} is {type(obj).__name__}, not a class")
        return obj
    raise SelectorError(f"cannot import {path!r}: {last_error}")


@functools.cache
def check_name_pattern(entry: str) -> Callable[[str], bool]:
    """Compile a ``names`` entry: a case-sensitive glob (``*`` spans dots) or ``re:<regex>`` (full match)."""
    if entry.startswith("re:"):
        try:
            regex = re.compile(entry[3:])
        except re.error as exc:
            raise SelectorError(f"invalid regular expression {entry[3:]!r}: {exc}") from None
    else:
        regex = re.compile(fnmatch.translate(entry))
    return lambda name: regex.fullmatch(name) is not None


@functools.cache
def _mro_names(cls: type) -> frozenset[str]:
    return frozenset(c.__name__ for c in cls.__mro__)


def _type_matches(entry: str, cls: Any) -> bool:
    if "." in entry:
        return resolve_type(entry) in cls.__mro__
    return entry in _mro_names(cls)


@functools.cache
def _types_match(entries: tuple[str, ...], cls: Any) -> bool:
    """Whether any entry matches ``cls`` (cached: a model has few classes and many modules)."""
    return any(_type_matches(e, cls) for e in entries)


@functools.cache
def _names_matcher(entries: tuple[str, ...]) -> Callable[[str], bool]:
    """One test for a whole ``names`` list: the globs as a single alternation (they have no
    groups or flags), each ``re:`` regex compiled and matched on its own."""
    globs = [fnmatch.translate(e) for e in entries if not e.startswith("re:")]
    combined = re.compile("|".join(f"(?:{g})" for g in globs)) if globs else None
    regexes = [check_name_pattern(e) for e in entries if e.startswith("re:")]

    def matches(name: str) -> bool:
        if combined is not None and combined.fullmatch(name) is not None:
            return True
        return any(r(name) for r in regexes)

    return matches


def selects(selector: Selector, name: str, module: nn.Module) -> bool:
    """Whether ``selector`` selects ``module``, registered under the qualified ``name``."""
    cls: Any = type(module)
    if selector.types is not None and not _types_match(selector.types, cls):
        return False
    if selector.names is not None and not _names_matcher(selector.names)(name):
        return False
    if selector.exclude_types and _types_match(selector.exclude_types, cls):
        return False
    return not (selector.exclude_names and _names_matcher(selector.exclude_names)(name))


class Target(NamedTuple):
    """One parameter to prune: the module's qualified name, the parameter name, and the module.

    (A named tuple rather than a dataclass: plans of big models hold hundreds of thousands.)
    """

    module_name: str
    param: str
    module: nn.Module

    def __repr__(self) -> str:
        return f"Target({self.qualname!r}, {self.module_type})"

    @property
    def qualname(self) -> str:
        return f"{self.module_name}.{self.param}" if self.module_name else self.param

    @property
    def module_type(self) -> str:
        return type(self.module).__name__

    @property
    def is_pruned(self) -> bool:
        return is_pruned(self.module, self.param)

    @property
    def original(self) -> torch.Tensor:
        """The unmasked tensor: ``<param>_orig`` when pruned, else the parameter itself."""
        return original(self.module, self.param)

    @property
    def mask(self) -> torch.Tensor | None:
        return owned_mask(self.module, self.param)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.original.shape)


def resolve_targets(modules: Sequence[tuple[str, nn.Module]], selector: Selector, params: Sequence[str], allow_empty: bool = False) -> list[Target]:
    """Targets in ``named_modules()`` order, then ``params`` order; raises on zero targets
    unless ``allow_empty``."""
    matched = _select(modules, selector)
    targets = []
    for n, m in matched:
        for p in params:
            how = foreign_reparam(m, p)
            if how is not None:  # torch's prune would fail on it (KeyError) or leave it be: say so
                qualname, shown = (f"{n}.{p}", json.dumps(n)) if n else (p, '""')
                raise ReparametrizedError(
                    f"{qualname} ({type(m).__name__}) is computed by {how}, which torch.nn.utils.prune cannot re-parametrize: "
                    f"remove it first (or fold it into a plain parameter), or leave the module out (exclude: {{names: [{shown}]}})"
                )
            if has_param(m, p):
                targets.append(Target(n, p, m))
    if not targets and not allow_empty:
        raise SelectorError(_explain_empty(modules, matched, selector, params))
    return targets


def _select(modules: Sequence[tuple[str, nn.Module]], selector: Selector) -> list[tuple[str, nn.Module]]:
    """``selects`` over many modules: class tests once per class, one regex per name test."""
    by_class: dict[type, bool] = {}
    names = _names_matcher(selector.names) if selector.names is not None else None
    excluded = _names_matcher(selector.exclude_names) if selector.exclude_names else None
    out = []
    seen: set[int] = set()  # a module registered under several names is selected once, by its first matching name
    for n, m in modules:
        if id(m) in seen:
            continue
        cls: Any = type(m)
        ok = by_class.get(cls)
        if ok is None:
            ok = by_class[cls] = (selector.types is None or _types_match(selector.types, cls)) and not (
                selector.exclude_types and _types_match(selector.exclude_types, cls)
            )
        if not ok or (names is not None and not names(n)) or (excluded is not None and excluded(n)):
            continue
        seen.add(id(m))
        out.append((n, m))
    return out


class NameIndex:
    """A model's module names by shape (numbers collapsed) and its classes: what
    :func:`unused_entries` compares entries with, built once per plan."""

    def __init__(self, modules: Sequence[tuple[str, nn.Module]]) -> None:
        self.modules = modules
        self.shapes: dict[str, list[str]] = {}  # "model.layers.#.mlp" -> the real names of that shape
        for n, _ in modules:
            if n:
                self.shapes.setdefault(_collapsed(n), []).append(n)
        self.classes = {type(m) for _, m in modules}
        self.type_names = sorted({c.__name__ for cls in self.classes for c in cls.__mro__ if c not in (nn.Module, object)})


def unused_entries(index: NameIndex, selector: Selector, params: Sequence[str], targets: Sequence[Target]) -> list[tuple[str, str]]:
    """Entries of a selector's lists that take no part although the selector as a whole selects
    something, and that are a typo away (one or two edits) from something the model has that
    no other entry of the list covers (``Linaer``, ``fc_3``, ``bais``): ``(key, message)`` per
    entry, the key naming the list. Anything further off stays silent: a recipe written for
    several model families names modules one family lacks (``model.layers.*`` and
    ``transformer.h.*``). Module names are compared with their numbers collapsed, so a model of
    thousands of layers has a few dozen shapes of name to compare with."""
    out: list[tuple[str, str]] = []
    modules, shapes, classes, type_names = index.modules, index.shapes, index.classes, index.type_names

    def type_typo(entry: str, others: Sequence[str]) -> str | None:
        if "." in entry or any(_type_matches(entry, cast(Any, cls)) for cls in classes):
            return None  # a dotted type was imported as written: a class this model lacks, not a typo
        near = _near(entry.rsplit(".", 1)[-1], type_names)
        return near if near is not None and not any(_type_matches(o, cast(Any, c)) for o in others for c in classes if c.__name__ == near) else None

    def name_typo(entry: str, others: Sequence[str]) -> str | None:
        test = check_name_pattern(entry)
        if any(test(names[0]) for names in shapes.values()):
            return None
        if entry.startswith("re:") or any(ch in "?[" for ch in entry):
            if any(test(n) for n, _ in modules if n):
                return None
        elif any(ch.isdigit() for ch in entry):  # particular numbers: only names of a shape the entry fits can match
            fits = check_name_pattern(_collapsed(entry))
            if any(test(n) for key, names in shapes.items() if fits(key) for n in names):
                return None
        key = _near(_collapsed(entry.replace("*", "0").replace("?", "0")), list(shapes))
        if key is None:
            return None
        names = shapes[key]  # the name of that shape nearest the entry itself (fc_3 -> fc3, not fc1)
        real = (_near(entry, names) if len(names) <= 64 else None) or names[0]
        return real if not any(check_name_pattern(o)(real) for o in others) else None

    for key, entries, typo, what, rest, alone_ok in (
        ("types", selector.types or (), type_typo, "no module is a", "the other types select", False),
        ("names", selector.names or (), name_typo, "no module name matches", "the other names select", False),
        ("exclude", selector.exclude_types, type_typo, "exclude types: no module is a", "it excludes nothing", True),
        ("exclude", selector.exclude_names, name_typo, "exclude names: no module name matches", "it excludes nothing", True),
    ):
        if not alone_ok and len(entries) < 2:
            continue  # a lone entry that matches nothing leaves nothing selected: an error says so
        for entry in entries:
            near = typo(entry, [o for o in entries if o != entry])
            if near is not None:
                out.append((key, f"{what} {short(entry)} (did you mean {near!r}?); {rest}"))
    if len(params) > 1:
        had = {t.param for t in targets}
        have = sorted({unpruned_name(p) for m in {id(t.module): t.module for t in targets}.values() for p, _ in own_parameters(m)})
        for p in params:
            near = _near(p, [h for h in have if h not in params]) if p not in had else None
            if near is not None:
                out.append(("params", f"no selected module has a parameter {short(p)} (did you mean {near!r}?); the other params are pruned"))
    return out


_DIGITS = re.compile(r"\d+")


def _collapsed(name: str) -> str:
    return _DIGITS.sub("#", name)


def _near(word: str, candidates: Sequence[str]) -> str | None:
    """The candidate one or two edits (insert, delete, replace, swap neighbours) from ``word``,
    or None; among several, the closest, then the first."""
    best: tuple[int, str] | None = None
    for c in candidates:
        if abs(len(c) - len(word)) > 2 or c == word:
            continue
        d = _edits(word, c)
        if d <= 2 and (best is None or d < best[0]):
            best = (d, c)
    return None if best is None else best[1]


def _edits(a: str, b: str) -> int:
    """Optimal-string-alignment distance between ``a`` and ``b`` (short strings)."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[len(b)]


def _explain_empty(
    modules: Sequence[tuple[str, nn.Module]],
    matched: Sequence[tuple[str, nn.Module]],
    selector: Selector,
    params: Sequence[str],
) -> str:
    wanted = ", ".join(short(p) for p in params)
    head = f"selector {clip(selector.describe(), 160)} resolves to no parameter"
    if matched:
        shown = ", ".join(n or "(root)" for n, _ in matched[:8]) + (", ..." if len(matched) > 8 else "")
        have = sorted({unpruned_name(p) for _, m in matched for p, _ in own_parameters(m)})
        return (
            f"{head}: it matched {len(matched)} module(s) ({shown}) but none has parameter {wanted}; their parameters: {', '.join(have) or '(none)'}"
        )
    hints = []
    all_types = sorted({c.__name__ for _, m in modules for c in type(m).__mro__ if c not in (nn.Module, object)})
    for entry in selector.types or ():
        if not any(_type_matches(entry, type(m)) for _, m in modules):
            hints.append(f"no module is a {short(entry)}" + suggest(entry.rsplit(".", 1)[-1], all_types))
    names = [n for n, _ in modules if n]
    for entry in selector.names or ():
        if not any(check_name_pattern(entry)(n) for n in names):
            hints.append(f"no module name matches {short(entry)}" + suggest(entry, names))
    if not hints and selector.types is not None and selector.names is not None:
        by_type = sum(1 for _, m in modules if _types_match(selector.types, cast(Any, type(m))))
        by_name = sum(1 for n, _ in modules if _names_matcher(selector.names)(n))
        hints.append(f"types alone match {by_type} module(s), names alone {by_name}, both together none")
    elif not hints and (selector.exclude_names or selector.exclude_types):
        hints.append("every match was excluded")
    detail = "; ".join(hints)
    return f"{head}: it matched 0 of {len(modules)} modules" + (f" ({detail})" if detail else "")


def param_owners(model: nn.Module) -> dict[int, list[str]]:
    """Qualified names of every owner of each parameter object, keyed by ``id(param)``.

    Owners are distinct (module, name) pairs, so a module registered twice counts once.
    """
    owners: dict[int, list[str]] = {}
    seen: set[tuple[int, str]] = set()
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in own_parameters(module):
            if (id(module), p_name) in seen:
                continue
            seen.add((id(module), p_name))
            shown = unpruned_name(p_name)
            owners.setdefault(id(p), []).append(f"{mod_name}.{shown}" if mod_name else shown)
    return owners
