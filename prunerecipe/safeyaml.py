"""Safe YAML reading that remembers where every key and value came from.

Only plain data is accepted: mappings with string keys, sequences, strings, numbers,
booleans and null. Any other tag (``!!python/object``, ``!!binary``, custom tags) is an
error, and nothing is ever constructed from it. Alias expansion is bounded, so a
"billion laughs" document is refused quickly instead of eating memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import KeyPath, Problem, RecipeError

#: Recipes are small; these limits refuse hostile documents early and are documented in the README.
MAX_BYTES = 1_000_000
MAX_NODES = 100_000
MAX_DEPTH = 50

_SCALAR_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
}
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"


@dataclass
class Document:
    """Plain data plus the 1-based (line, col) of each value and of each mapping key."""

    source: str
    data: Any
    value_marks: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)
    key_marks: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)

    def mark(self, path: KeyPath, *, key: bool = False) -> tuple[int | None, int | None]:
        """Position of ``path``'s key (``key=True``) or value; falls back to the nearest parent."""
        if key and path in self.key_marks:
            return self.key_marks[path]
        while path:
            if path in self.value_marks:
                return self.value_marks[path]
            path = path[:-1]
        return self.value_marks.get((), (None, None))

    def problem(self, path: KeyPath, message: str, *, key: bool = False) -> Problem:
        line, col = self.mark(path, key=key)
        return Problem(self.source, line, col, path, message)


class _TooBig(Exception):
    pass


def _tag(tag: str) -> str:
    return "!!" + tag[len("tag:yaml.org,2002:"):] if tag.startswith("tag:yaml.org,2002:") else tag


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def parse_yaml(text: str | bytes, source: str) -> Document:
    """Parse one YAML document into plain data with positions; raise :class:`RecipeError`."""
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise RecipeError(Problem(source, None, None, (), f"file is {len(text)} bytes; recipes are limited to {MAX_BYTES}"))
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecipeError(Problem(source, None, None, (), f"not UTF-8 text (byte {exc.start} cannot be decoded)")) from None
    if len(text) > MAX_BYTES:
        raise RecipeError(Problem(source, None, None, (), f"file is {len(text)} characters; recipes are limited to {MAX_BYTES}"))

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = ": ".join(str(m) for m in (exc.context, exc.problem) if m) or "invalid YAML"
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
        raise RecipeError(Problem(source, line, col, (), f"invalid YAML: {message}")) from None
    except yaml.YAMLError as exc:
        raise RecipeError(Problem(source, None, None, (), f"invalid YAML: {exc}")) from None
    except RecursionError:
        raise RecipeError(Problem(source, None, None, (), f"invalid YAML: nesting is too deep (limit {MAX_DEPTH})")) from None
    finally:
        loader.dispose()
    if node is None:
        raise RecipeError(Problem(source, 1, 1, (), "the file is empty; a recipe is a mapping with 'version' and 'steps'"))

    doc = Document(source, None)
    builder = _Builder(doc, yaml.constructor.SafeConstructor())
    try:
        doc.data = builder.build(node, (), 0)
    except _TooBig as exc:
        raise RecipeError(Problem(source, None, None, (), str(exc))) from None
    if builder.problems:
        raise RecipeError.collect(builder.problems)
    return doc


class _Builder:
    def __init__(self, doc: Document, constructor: yaml.constructor.SafeConstructor) -> None:
        self.doc = doc
        self.constructor = constructor
        self.count = 0
        self.problems: list[Problem] = []

    def _problem(self, node: yaml.Node, path: KeyPath, message: str) -> None:
        line, col = _mark(node)
        self.problems.append(Problem(self.doc.source, line, col, path, message))

    def build(self, node: yaml.Node, path: KeyPath, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooBig(f"document expands to more than {MAX_NODES} nodes (aliases included); refusing it")
        if depth > MAX_DEPTH:
            raise _TooBig(f"document is nested more than {MAX_DEPTH} levels deep; refusing it")
        self.doc.value_marks[path] = _mark(node)

        if isinstance(node, yaml.ScalarNode):
            if node.tag == _TIMESTAMP:
                return node.value  # keep dates as the text the user wrote
            if node.tag not in _SCALAR_TAGS:
                self._problem(node, path, f"YAML tag {_tag(node.tag)} is not allowed; recipes hold plain data only")
                return None
            return self.constructor.construct_object(node, deep=True)

        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ:
                self._problem(node, path, f"YAML tag {_tag(node.tag)} is not allowed; recipes hold plain data only")
                return None
            return [self.build(item, path + (i,), depth + 1) for i, item in enumerate(node.value)]

        if isinstance(node, yaml.MappingNode):
            if node.tag != _MAP:
                self._problem(node, path, f"YAML tag {_tag(node.tag)} is not allowed; recipes hold plain data only")
                return None
            own = {id(k) for k, _ in node.value}
            try:
                self.constructor.flatten_mapping(node)  # YAML merge keys (<<: *defaults)
            except yaml.MarkedYAMLError as exc:
                self._problem(node, path, f"invalid merge key: {exc.problem}")
                return None
            out: dict[str, Any] = {}
            merged: set[str] = set()  # keys that came in through "<<" may be overridden
            for key_node, value_node in node.value:
                self.count += 1
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in _SCALAR_TAGS:
                    self._problem(key_node, path, "mapping keys must be plain strings")
                    continue
                key = self.constructor.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    self._problem(
                        key_node, path,
                        f"mapping key {key_node.value!r} reads as {type(key).__name__} {key!r}; keys must be strings (quote it)",
                    )
                    continue
                child = path + (key,)
                if key in merged:
                    merged.discard(key)
                    del out[key]
                if key in out:
                    first = self.doc.key_marks.get(child)
                    where = f" (first at line {first[0]})" if first else ""
                    self._problem(key_node, child, f"duplicate key {key!r}{where}")
                    continue
                if id(key_node) not in own:
                    merged.add(key)
                self.doc.key_marks[child] = _mark(key_node)
                out[key] = self.build(value_node, child, depth + 1)
            return out

        self._problem(node, path, "unsupported YAML node")  # pragma: no cover - composer yields only the three kinds
        return None
