"""Recipe files -> validated, typed :class:`~prunerecipe.spec.Recipe` values.

One loader, a straight line: text -> safe YAML with positions (:mod:`.yaml`) -> ``${var}``
substitution (:mod:`.vars`) -> JSON Schema (:mod:`.schema`) -> cross-key and method checks
(:mod:`.checks`) -> frozen dataclasses (:func:`prunerecipe.spec.from_data`). Every problem
of a file is collected and raised together as one :class:`~prunerecipe.errors.RecipeError`.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from ..errors import KeyPath, Problem, RecipeError
from ..spec import Recipe, from_data
from .checks import construction_problems, semantic_problems
from .schema import recipe_schema, schema_problems
from .vars import substitute
from .yaml import MAX_BYTES, Document, parse_value, parse_yaml

__all__ = ["Document", "load_recipe", "parse_recipe", "parse_value", "recipe_from_dict", "recipe_schema"]


def load_recipe(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Read, substitute, validate and type a recipe file.

    Args:
        path: the recipe file; ``"-"`` reads standard input (messages then say ``<stdin>``).
        overrides: values that replace (or supply) ``vars``, as the CLI's ``--set`` does.

    Returns:
        The frozen :class:`~prunerecipe.spec.Recipe`, carrying its source for later messages.

    Raises:
        RecipeError: listing every problem as ``file:line:col: key.path: message``.

    Example:
        >>> recipe = load_recipe("recipes/lenet-global-l1.yaml")  # doctest: +SKIP
        >>> recipe.steps[0].scope  # doctest: +SKIP
        'global'
    """
    source = os.fspath(path)
    if source == "-":  # the recipe on standard input
        return _build(parse_yaml(sys.stdin.buffer.read(MAX_BYTES + 1), "<stdin>"), overrides)
    try:
        with open(source, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)  # never more: /dev/zero is a "file" too
    except FileNotFoundError:
        raise RecipeError(Problem(source, None, None, (), "no such recipe file", "file")) from None
    except IsADirectoryError:
        raise RecipeError(Problem(source, None, None, (), "is a directory, not a recipe file", "file")) from None
    except OSError as exc:
        raise RecipeError(Problem(source, None, None, (), f"cannot read: {exc.strerror or exc}", "file")) from None
    return _build(parse_yaml(raw, source), overrides)


def parse_recipe(text: str, source: str = "<string>", overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Like :func:`load_recipe`, from YAML text.

    Args:
        text: the recipe's YAML.
        source: how error messages name it.
        overrides: values that replace (or supply) ``vars``.

    Returns:
        The frozen :class:`~prunerecipe.spec.Recipe`.

    Raises:
        RecipeError: listing every problem, located by line and column.

    Example:
        >>> parse_recipe("version: 1\\nsteps: [{select: {}, method: identity}]").steps[0].method
        'identity'
    """
    return _build(parse_yaml(text, source), overrides)


def recipe_from_dict(data: Mapping[str, Any], source: str = "<dict>", overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Like :func:`load_recipe`, from already-parsed data (errors carry key paths, no positions).

    Args:
        data: the recipe as plain data (dicts with string keys, lists, str, int, float, bool, None).
        source: how error messages name it.
        overrides: values that replace (or supply) ``vars``.

    Returns:
        The frozen :class:`~prunerecipe.spec.Recipe`.

    Raises:
        RecipeError: listing every problem, by key path.

    Example:
        >>> recipe_from_dict({"version": 1, "steps": [{"select": {}, "method": "identity"}]}).version
        1
    """
    problems = list(_plain_data_problems(data, (), source))
    if problems:
        raise RecipeError.collect(problems)
    return _build(Document(source, copy.deepcopy(dict(data)) if isinstance(data, Mapping) else data), overrides)


def _plain_data_problems(value: Any, path: KeyPath, source: str) -> Iterator[Problem]:
    """What a YAML file could hold: dicts with string keys, lists, str, int, float, bool, None."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                yield Problem(source, None, None, path, f"mapping key {key!r} is a {type(key).__name__}; keys must be strings")
            else:
                yield from _plain_data_problems(item, path + (key,), source)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _plain_data_problems(item, path + (i,), source)
    elif not isinstance(value, (str, int, float, bool, type(None))):
        yield Problem(source, None, None, path, f"{type(value).__name__} is not plain data (use str, int, float, bool, None, list, dict)")


def _build(doc: Document, overrides: Mapping[str, Any] | None) -> Recipe:
    problems: list[Problem] = list(doc.problems)
    data = substitute(doc, dict(overrides or {}), problems)
    doc.data = data
    if not isinstance(data, dict):
        raise RecipeError(doc.problem((), f"a recipe is a mapping with 'version' and 'steps', not {_kind(data)}"))
    # A value whose placeholder failed is reported once, as the placeholder problem.
    unresolved = {p.path for p in problems}
    problems.extend(p for p in schema_problems(doc) if p.path not in unresolved)
    problems.extend(semantic_problems(doc))
    problems.extend(construction_problems(doc, problems))
    if problems:
        raise RecipeError.collect(problems)
    return from_data(Recipe, data, source=doc.source, document=doc)


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", type(None): "null"}.get(type(value), type(value).__name__)
