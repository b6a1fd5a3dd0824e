"""``${name}`` placeholders: substituted from ``vars`` and overrides before validation.

A string that is exactly ``${name}`` takes the value with its type (``0.2`` stays a
number); inside a longer string the value is interpolated as text. ``$${x}`` is a literal
``${x}``. Placeholders inside ``vars`` itself are left alone (vars do not reference each other).
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from ..errors import KeyPath, Problem, RecipeWarning
from ..text import short, suggest
from .yaml import Document

PLACEHOLDER_PATTERN = r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$"
_PLACEHOLDER = re.compile(r"\$(\$?)\{([^}]*)\}")
_WHOLE_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def substitute(doc: Document, overrides: Mapping[str, Any], problems: list[Problem]) -> Any:
    """Replace every placeholder in ``doc.data`` (in place, outside ``vars``); append problems.

    ``overrides`` win over declared vars; an override that no placeholder uses and no var
    declares is a problem (a typo would otherwise be silently ignored).
    """
    data = doc.data
    if not isinstance(data, dict):
        return data
    declared = data.get("vars")
    values: dict[str, Any] = dict(declared) if isinstance(declared, dict) else {}
    values.update(overrides)
    used: set[str] = set()
    for name, value in declared.items() if isinstance(declared, dict) else ():
        for path, text in _walk_strings(value, ("vars", name)):
            if _PLACEHOLDER.search(text) and not all(m.group(1) for m in _PLACEHOLDER.finditer(text)) and name not in overrides:
                problems.append(doc.problem(path, f"{short(text)}: a var cannot refer to another var; give it a value", code="var"))

    for path, text in list(_walk_strings({k: v for k, v in data.items() if k != "vars"}, ())):
        whole = _WHOLE_PLACEHOLDER.fullmatch(text)
        if whole:
            name = whole.group(1)
            used.add(name)
            if _check_var(doc, path, name, values, problems):
                _set_at(data, path, copy.deepcopy(values[name]))
            continue
        if "${" not in text:
            continue

        def replace(m: re.Match[str], path: KeyPath = path) -> str:
            if m.group(1):  # "$${x}" is the escape for a literal "${x}"
                return "${" + m.group(2) + "}"
            name = m.group(2)
            used.add(name)
            if not _check_var(doc, path, name, values, problems):
                return m.group(0)
            value = values[name]
            if isinstance(value, (dict, list)):
                problems.append(
                    doc.problem(path, f"${{{name}}} is a {type(value).__name__}; only a whole-string placeholder can take one", code="var")
                )
                return m.group(0)
            return _scalar_text(value)

        _set_at(data, path, _PLACEHOLDER.sub(replace, text))

    for name, value in overrides.items():
        old = declared.get(name) if isinstance(declared, dict) else None
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            where = doc.problem(("vars", name), "")
            warnings.warn(
                RecipeWarning(
                    f"{str(where).rstrip(': ')}: the override {name}={value} is an int where the recipe's var is a float ({old}); "
                    "an int amount is a count of entries, not a fraction"
                    + (f": write {value}.0 for a fraction" if value in (0, 1) else " (a fraction is a float from 0.0 to 1.0)")
                ),
                stacklevel=2,
            )
    for name in overrides:
        if name not in used and not (isinstance(declared, dict) and name in declared):
            known = sorted(declared) if isinstance(declared, dict) else []
            problems.append(
                doc.problem(
                    ("vars",),
                    f"override {short(name)} matches no var of this recipe{suggest(name, known)}"
                    + (f"; its vars: {', '.join(known)}" if known else "; it declares no vars"),
                    code="var",
                )
            )
    return data


def _walk_strings(value: Any, path: KeyPath) -> Iterator[tuple[KeyPath, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _walk_strings(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk_strings(v, path + (i,))


def _set_at(data: Any, path: KeyPath, value: Any) -> None:
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    parent[path[-1]] = value


def _check_var(doc: Document, path: KeyPath, name: str, values: Mapping[str, Any], problems: list[Problem]) -> bool:
    if not _IDENT.fullmatch(name):
        problems.append(doc.problem(path, f"bad placeholder ${{{name}}}: a var name is letters, digits and '_'", code="var"))
        return False
    if name not in values:
        problems.append(
            doc.problem(
                path,
                f"undefined var ${{{name}}}{suggest(name, sorted(values))}; define it under 'vars' or pass --set {name}=VALUE",
                code="var",
            )
        )
        return False
    value = values[name]
    if any(not m.group(1) for _, text in _walk_strings(value, ()) for m in _PLACEHOLDER.finditer(text)):
        problems.append(
            doc.problem(
                path,
                f"${{{name}}} stands for {short(value)}, itself a placeholder: a var (or a --set value) cannot refer to another var; give it a value",
                code="var",
            )
        )
        return False
    return True


def _scalar_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
