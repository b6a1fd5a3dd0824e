"""The recipe JSON Schema and the messages its failures turn into."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

import jsonschema

from ..errors import KeyPath, Problem
from ..text import short, suggest
from .vars import PLACEHOLDER_PATTERN
from .yaml import Document


@functools.lru_cache(maxsize=1)
def recipe_schema() -> dict[str, Any]:
    """The recipe JSON Schema (draft 2020-12), as shipped inside the package.

    Args:
        (none)

    Returns:
        The schema as a fresh-looking dict (cached: do not modify it).

    Example:
        >>> recipe_schema()["title"]
        'prunerecipe recipe, version 1'
    """
    text = resources.files("prunerecipe.schemas").joinpath("recipe.schema.json").read_text(encoding="utf-8")
    return json.loads(text)  # type: ignore[no-any-return,unused-ignore]


def _is_integer(checker: Any, instance: Any) -> bool:
    # JSON Schema counts 1.0 as an integer; YAML keeps 1 and 1.0 apart, and so do we
    # (an int amount is a count, a float a fraction).
    return isinstance(instance, int) and not isinstance(instance, bool)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer),
)


@functools.lru_cache(maxsize=1)
def _recipe_validator() -> Any:
    return _Validator(recipe_schema())


def schema_problems(doc: Document, schema: Mapping[str, Any] | None = None, base: KeyPath = ()) -> list[Problem]:
    """Validate ``doc.data`` at ``base`` against ``schema`` (the recipe schema by default).

    Every failure becomes a located :class:`Problem` in plain words (unknown keys with a
    "did you mean", missing keys by name, type mismatches without JSON Schema jargon).
    """
    validator = _recipe_validator() if schema is None else _Validator(schema)
    instance = doc.data
    for part in base:
        instance = instance[part]
    problems = []
    for err in validator.iter_errors(instance):
        path = base + tuple(err.absolute_path)
        problems.extend(_explain(doc, path, err))
    return problems


def _explain(doc: Document, path: KeyPath, err: Any) -> list[Problem]:
    kind = err.validator
    if kind == "additionalProperties" and isinstance(err.instance, dict):
        allowed = sorted(err.schema.get("properties", {}))
        out = []
        for key in sorted(set(err.instance) - set(allowed)):
            hint = suggest(key, allowed) or f"; allowed here: {', '.join(allowed)}"
            out.append(doc.problem(path + (key,), f"unknown key {short(key)}{hint}", key=True, code="unknown-key"))
        return out
    if kind == "required" and isinstance(err.instance, dict):
        return [doc.problem(path, f"missing required key {key!r}", code="missing-key") for key in err.validator_value if key not in err.instance]
    if kind == "const" and path == ("version",):
        if isinstance(err.instance, str) and err.instance.strip() in ("1", "1.0"):
            return [doc.problem(path, f"version is the number 1, not the string {short(err.instance)}: remove the quotes", code="version")]
        if isinstance(err.instance, (int, float)) and not isinstance(err.instance, bool):
            return [doc.problem(path, f"unsupported recipe version {short(err.instance)}; this prunerecipe reads version 1", code="version")]
        return [doc.problem(path, f"{short(err.instance)} is not a recipe version; write version: 1", code="version")]
    if kind == "anyOf" and err.context and "x-message" not in err.schema:
        return [doc.problem(path, _any_of_message(err))]
    if kind == "propertyNames":
        return [doc.problem(path, f"{short(err.instance)} is not a valid name (letters, digits and '_')")]
    if (kind == "minItems" and err.validator_value == 1) or kind == "minProperties":
        return [doc.problem(path, "must not be empty")]
    if kind == "enum" and isinstance(err.instance, str):
        return [doc.problem(path, str(err.message) + suggest(err.instance, [str(c) for c in err.validator_value]))]
    if "x-message" in err.schema:
        hint = suggest(err.instance, [str(c) for c in _choices(err.schema)]) if isinstance(err.instance, str) else ""
        return [doc.problem(path, f"{short(err.instance)}: {err.schema['x-message']}{hint}")]
    if kind == "pattern" and path[-1:] == ("model",):
        return [doc.problem(path, f"{short(err.instance)} is not a model spec; write 'pkg.module:attr' or 'path/to/file.py:attr'")]
    if kind == "pattern":
        return [doc.problem(path, f"{short(err.instance)} is not a valid name (letters, digits and '_')")]
    message = err.message
    if len(message) > 200:
        message = f"{short(err.instance)} is invalid here ({kind})"
    return [doc.problem(path, message)]


def _choices(schema: Any) -> list[Any]:
    """The string values a schema (or its anyOf branches) allows, for a "did you mean"."""
    found = list(schema.get("enum", [])) + ([schema["const"]] if "const" in schema else [])
    for branch in schema.get("anyOf", []) + schema.get("oneOf", []):
        found += _choices(branch)
    return [c for c in found if isinstance(c, str)]


def _any_of_message(err: Any) -> str:
    """The useful part of an anyOf failure: the branch whose type fit, else the types wanted.

    (Every scalar field may also hold a ``${var}`` placeholder; that branch never explains
    a failure, since placeholders are substituted before validation.)
    """
    branches = [c for c in err.context if c.schema.get("pattern") != PLACEHOLDER_PATTERN]
    shaped = [c for c in branches if c.validator != "type"]
    if shaped:
        first = shaped[0]
        if first.validator == "pattern":
            return f"{short(first.instance)} is not a valid name (letters, digits and '_')"
        if "x-message" in first.schema:
            return f"{short(first.instance)}: {first.schema['x-message']}"
        if first.validator == "enum" and isinstance(first.instance, str):  # a misspelt choice: say which was meant
            return str(first.message) + suggest(first.instance, [str(c) for c in first.validator_value])
        return str(first.message)
    wanted: list[str] = []
    for c in branches:
        for t in c.validator_value if isinstance(c.validator_value, list) else [c.validator_value]:
            if t not in wanted:
                wanted.append(t)
    return f"{short(err.instance)} is not of type " + " or ".join(repr(t) for t in wanted)
