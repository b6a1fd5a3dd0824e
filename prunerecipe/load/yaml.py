"""Safe YAML reading that remembers where every key and value came from.

Only plain data is accepted: mappings with string keys, sequences, strings, numbers,
booleans and null. Any other tag (``!!python/object``, ``!!binary``, custom tags) is an
error, and nothing is ever constructed from it. Alias expansion is bounded, so a
"billion laughs" document is refused quickly instead of eating memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import KeyPath, Problem, RecipeError

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
_MERGE = "tag:yaml.org,2002:merge"


@dataclass
class Document:
    """Plain data plus the 1-based (line, col) of each value and of each mapping key."""

    source: str
    data: Any
    value_marks: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)
    key_marks: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    text: str | None = field(default=None, repr=False)  # the YAML as read, kept for records of the run

    def mark(self, path: KeyPath, *, key: bool = False) -> tuple[int | None, int | None]:
        """Position of ``path``'s key (``key=True``) or value; falls back to the nearest parent."""
        if key and path in self.key_marks:
            return self.key_marks[path]
        while path:
            if path in self.value_marks:
                return self.value_marks[path]
            path = path[:-1]
        return self.value_marks.get((), (None, None))

    def problem(self, path: KeyPath, message: str, *, key: bool = False, code: str = "invalid") -> Problem:
        """A :class:`Problem` at ``path``'s key (``key=True``) or value."""
        line, col = self.mark(path, key=key)
        return Problem(self.source, line, col, path, message, code)


class _TooBig(Exception):
    def __init__(self, message: str, node: yaml.Node) -> None:
        super().__init__(message)
        self.node = node


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema scalars: ``5e-1`` is a number, ``010``
    is ten, only ``true``/``false`` are booleans (``yes``, ``on`` stay strings), no
    sexagesimal ``1:30`` and no implicit dates."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag.rsplit(":", 1)[-1] not in ("bool", "int", "float", "timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


class _Constructor(yaml.constructor.SafeConstructor):
    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        value = str(self.construct_scalar(node))
        if value.startswith(("0o", "0x")):
            return int(value, 0)
        return int(value, 10)  # YAML 1.2: a leading zero is still decimal


_Constructor.add_constructor("tag:yaml.org,2002:int", _Constructor.construct_yaml_int)


def _tag(tag: str) -> str:
    return "!!" + tag[len("tag:yaml.org,2002:") :] if tag.startswith("tag:yaml.org,2002:") else tag


def _reader_error(exc: yaml.reader.ReaderError, text: str, source: str) -> RecipeError:
    line = text.count("\n", 0, exc.position) + 1
    col = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
    char = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "?")
    return RecipeError(Problem(source, line, col, (), f"invalid YAML: character U+{char:04X} is not allowed in YAML", "yaml"))


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def parse_yaml(text: str | bytes, source: str) -> Document:
    """Parse one YAML document into plain data with positions; raise :class:`RecipeError`."""
    if isinstance(text, bytes):
        raw = text
        if len(raw) > MAX_BYTES:
            raise RecipeError(Problem(source, None, None, (), f"file is larger than {MAX_BYTES} bytes, the limit for recipes", "yaml"))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
            raise RecipeError(Problem(source, line, col, (), f"not UTF-8 text (byte {exc.start} cannot be decoded)", "yaml")) from None
    if len(text) > MAX_BYTES:
        raise RecipeError(Problem(source, None, None, (), f"file is {len(text)} characters; recipes are limited to {MAX_BYTES}", "yaml"))

    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow, found up front
        raise _reader_error(exc, text, source) from None
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = ": ".join(str(m) for m in (exc.context, exc.problem) if m) or "invalid YAML"
        at: tuple[int | None, int | None] = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
        raise RecipeError(Problem(source, at[0], at[1], (), f"invalid YAML: {message}", "yaml")) from None
    except yaml.reader.ReaderError as exc:
        raise _reader_error(exc, text, source) from None
    except yaml.YAMLError as exc:
        raise RecipeError(Problem(source, None, None, (), f"invalid YAML: {exc}", "yaml")) from None
    except RecursionError:
        raise RecipeError(Problem(source, None, None, (), f"invalid YAML: nesting is too deep (limit {MAX_DEPTH})", "yaml")) from None
    finally:
        loader.dispose()
    if node is None:
        raise RecipeError(Problem(source, 1, 1, (), "the file is empty; a recipe is a mapping with 'version' and 'steps'", "yaml"))

    doc = Document(source, None, text=text)
    builder = _Builder(doc, _Constructor())
    try:
        doc.data = builder.build(node, (), 0)
    except _TooBig as exc:
        line, col = _mark(exc.node)
        raise RecipeError(Problem(source, line, col, (), str(exc), "yaml")) from None
    # Node-level problems (a bad tag, a duplicate key) do not stop validation of the rest
    # of the file: the caller reports them together with everything else.
    doc.problems = builder.problems
    return doc


def parse_value(text: str) -> Any:
    """One plain YAML value (as ``--set NAME=VALUE`` takes it); raises :class:`RecipeError`."""
    doc = parse_yaml(text, "<value>") if text.strip() else Document("<value>", "")
    if doc.problems:
        raise RecipeError.collect(doc.problems)
    return doc.data


class _Builder:
    def __init__(self, doc: Document, constructor: yaml.constructor.SafeConstructor) -> None:
        self.doc = doc
        self.constructor = constructor
        self.count = 0
        self.problems: list[Problem] = []

    def _problem(self, node: yaml.Node, path: KeyPath, message: str) -> None:
        line, col = _mark(node)
        self.problems.append(Problem(self.doc.source, line, col, path, message, "yaml"))

    def _count(self, node: yaml.Node) -> None:
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooBig(f"document expands to more than {MAX_NODES} nodes (aliases and merge keys included); refusing it", node)

    def _scalar(self, node: yaml.ScalarNode, path: KeyPath) -> Any:
        if node.tag == _TIMESTAMP:
            return node.value  # keep dates as the text the user wrote
        if node.tag not in _SCALAR_TAGS:
            self._problem(node, path, f"YAML tag {_tag(node.tag)} is not allowed; recipes hold plain data only")
            return None
        try:
            value = self.constructor.construct_object(node, deep=True)
        except Exception:  # an explicit tag on a value that does not fit it: !!int abc
            self._problem(node, path, f"{node.value!r} is not a valid {_tag(node.tag)}")
            return None
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
                self._problem(node, path, "string holds an invalid Unicode code point (a lone surrogate escape)")
                return None
        return value

    def build(self, node: yaml.Node, path: KeyPath, depth: int) -> Any:
        self._count(node)
        if depth > MAX_DEPTH:
            raise _TooBig(f"document is nested more than {MAX_DEPTH} levels deep; refusing it", node)
        self.doc.value_marks[path] = _mark(node)

        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path)

        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ:
                self._problem(node, path, f"YAML tag {_tag(node.tag)} is not allowed; recipes hold plain data only")
                return None
            return [self.build(item, path + (i,), depth + 1) for i, item in enumerate(node.value)]

        if isinstance(node, yaml.MappingNode):
            if node.tag != _MAP:
                self._problem(node, path, f"YAML tag {_tag(node.tag)} is not allowed; recipes hold plain data only")
                return None
            return self._mapping(node, path, depth)

        self._problem(node, path, "unsupported YAML node")  # pragma: no cover - composer yields only the three kinds
        return None

    def _mapping(self, node: yaml.MappingNode, path: KeyPath, depth: int) -> dict[str, Any]:
        # Merge keys (<<: *defaults) are expanded here, counted like any other node and without
        # changing the (possibly aliased) node: explicit keys win, earlier merge sources win.
        merged: dict[str, Any] = {}
        own: list[tuple[yaml.Node, yaml.Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for src in reversed(sources):
                    if not isinstance(src, yaml.MappingNode):
                        self._problem(src, path, "a merge key (<<) takes a mapping or a list of mappings")
                        continue
                    merged.update(self.build(src, path, depth + 1) or {})
            else:
                own.append((key_node, value_node))
        self.doc.value_marks[path] = _mark(node)
        out: dict[str, Any] = dict(merged)
        seen: set[str] = set()
        for key_node, value_node in own:
            self._count(key_node)
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in _SCALAR_TAGS:
                self._problem(key_node, path, "mapping keys must be plain strings")
                continue
            key = self._scalar(key_node, path)
            if key is None and key_node.tag != "tag:yaml.org,2002:null":
                continue  # already reported
            if not isinstance(key, str):
                self._problem(
                    key_node,
                    path,
                    f"mapping key {key_node.value!r} reads as {type(key).__name__} {key!r}; keys must be strings (quote it)",
                )
                continue
            child = path + (key,)
            if key in seen:
                first = self.doc.key_marks.get(child)
                where = f" (first at line {first[0]})" if first else ""
                self._problem(key_node, child, f"duplicate key {key!r}{where}")
                continue
            seen.add(key)
            self.doc.key_marks[child] = _mark(key_node)
            out[key] = self.build(value_node, child, depth + 1)
        return out
