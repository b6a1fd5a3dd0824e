"""Recipe files -> validated, typed :class:`Recipe` values.

One loader, a straight line: path -> safe YAML (with positions) -> ``${var}`` substitution
-> JSON Schema -> semantic checks -> frozen dataclasses. Every problem of a file is
collected and raised together as one :class:`~prunerecipe.errors.RecipeError`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Iterator, Mapping

import jsonschema

from .errors import KeyPath, Problem, RecipeError, format_path
from .methods import MethodError, MethodSpec, get_method, suggest
from .safeyaml import MAX_BYTES, Document, parse_yaml
from .selectors import SelectorError, check_name_pattern, resolve_type

#: A schedule with more events than this is almost certainly a mistake (and would be slow to list).
MAX_EVENTS = 1_000_000

_PLACEHOLDER = re.compile(r"\$(\$?)\{([^}]*)\}")
_WHOLE_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# --- typed recipe ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Selector:
    """Which modules a step selects. ``None`` means "no constraint"."""

    types: tuple[str, ...] | None = None
    names: tuple[str, ...] | None = None
    exclude_types: tuple[str, ...] = ()
    exclude_names: tuple[str, ...] = ()

    def describe(self) -> str:
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

    unit: str = "epoch"
    start: int = 0
    end: int = 0
    every: int = 1
    curve: str = "cubic"
    initial_sparsity: float = 0.0


@dataclass(frozen=True)
class Step:
    """One step of a recipe; ``index`` is its position in ``steps``."""

    index: int
    select: Selector
    method: str
    params: tuple[str, ...] = ("weight",)
    name: str | None = None
    amount: int | float | None = None
    sparsity: float | None = None
    scope: str = "local"
    args: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None
    schedule: Schedule | None = None

    @property
    def path(self) -> KeyPath:
        return ("steps", self.index)

    @property
    def label(self) -> str:
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
class Recipe:
    """A validated recipe. ``source`` and the positions it was read from travel with it."""

    version: int
    steps: tuple[Step, ...]
    name: str | None = None
    description: str | None = None
    model: str | None = None
    vars: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None
    finalize: bool = False
    lottery_ticket: bool = False
    source: str = field(default="<recipe>", compare=False)
    document: Document | None = field(default=None, compare=False, repr=False)

    def problem(self, path: KeyPath, message: str) -> Problem:
        """A :class:`Problem` located at ``path`` of this recipe's file, when known."""
        if self.document is not None:
            return self.document.problem(path, message)
        return Problem(self.source, None, None, path, message)

    def step_seed(self, step: Step) -> int | None:
        return step.seed if step.seed is not None else self.seed

    def method(self, step: Step) -> MethodSpec:
        return get_method(step.method)


# --- public loaders -------------------------------------------------------------------------


def load_recipe(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Read, substitute, validate and type a recipe file.

    ``overrides`` replace (or supply) ``vars`` values, as the CLI's ``--set`` does.
    Raises :class:`RecipeError` listing every problem as ``file:line:col: key.path: message``.

    >>> recipe = load_recipe("recipes/lenet-global-l1.yaml")  # doctest: +SKIP
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)  # never more: /dev/zero is a "file" too
    except FileNotFoundError:
        raise RecipeError(Problem(source, None, None, (), "no such recipe file")) from None
    except IsADirectoryError:
        raise RecipeError(Problem(source, None, None, (), "is a directory, not a recipe file")) from None
    except OSError as exc:
        raise RecipeError(Problem(source, None, None, (), f"cannot read: {exc.strerror or exc}")) from None
    return _build(parse_yaml(raw, source), overrides)


def parse_recipe(text: str, source: str = "<string>", overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Like :func:`load_recipe`, from YAML text; ``source`` names it in error messages."""
    return _build(parse_yaml(text, source), overrides)


def recipe_from_dict(
    data: Mapping[str, Any], source: str = "<dict>", overrides: Mapping[str, Any] | None = None
) -> Recipe:
    """Like :func:`load_recipe`, from already-parsed data (errors carry key paths, no positions)."""
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


# --- pipeline -------------------------------------------------------------------------------


def _build(doc: Document, overrides: Mapping[str, Any] | None) -> Recipe:
    problems: list[Problem] = list(doc.problems)
    data = _substitute_vars(doc, dict(overrides or {}), problems)
    doc.data = data
    if not isinstance(data, dict):
        raise RecipeError(doc.problem((), f"a recipe is a mapping with 'version' and 'steps', not {_kind(data)}"))
    # A value whose placeholder failed is reported once, as the placeholder problem.
    unresolved = {p.path for p in problems}
    problems.extend(p for p in schema_problems(doc) if p.path not in unresolved)
    problems.extend(_semantic_problems(doc))
    problems.extend(_construction_problems(doc, problems))
    if problems:
        raise RecipeError.collect(_dedupe(problems))
    return _typed(doc)


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[str] = set()
    out = []
    for p in problems:
        if str(p) not in seen:
            seen.add(str(p))
            out.append(p)
    return out


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", type(None): "null"}.get(type(value), type(value).__name__)


def _walk_strings(value: Any, path: KeyPath) -> Iterator[tuple[KeyPath, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _walk_strings(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk_strings(v, path + (i,))


def _set_at(data: Any, path: KeyPath, value: Any) -> Any:
    if not path:
        return value
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    parent[path[-1]] = value
    return data


def _substitute_vars(doc: Document, overrides: dict[str, Any], problems: list[Problem]) -> Any:
    data = doc.data
    if not isinstance(data, dict):
        return data
    declared = data.get("vars")
    values: dict[str, Any] = dict(declared) if isinstance(declared, dict) else {}
    values.update(overrides)
    used: set[str] = set()

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
                problems.append(doc.problem(path, f"${{{name}}} is a {type(value).__name__}; only a whole-string placeholder can take one"))
                return m.group(0)
            return _scalar_text(value)

        _set_at(data, path, _PLACEHOLDER.sub(replace, text))

    for name in overrides:
        if name not in used and not (isinstance(declared, dict) and name in declared):
            known = sorted(declared) if isinstance(declared, dict) else []
            problems.append(
                doc.problem(
                    ("vars",),
                    f"override {name!r} matches no var of this recipe{suggest(name, known)}"
                    + (f"; its vars: {', '.join(known)}" if known else "; it declares no vars"),
                )
            )
    return data


def _check_var(doc: Document, path: KeyPath, name: str, values: Mapping[str, Any], problems: list[Problem]) -> bool:
    if not _IDENT.fullmatch(name):
        problems.append(doc.problem(path, f"bad placeholder ${{{name}}}: a var name is letters, digits and '_'"))
        return False
    if name not in values:
        problems.append(
            doc.problem(path, f"undefined var ${{{name}}}{suggest(name, sorted(values))}; define it under 'vars' or pass --set {name}=VALUE")
        )
        return False
    return True


def _scalar_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@functools.lru_cache(maxsize=1)
def recipe_schema() -> dict[str, Any]:
    """The recipe JSON Schema (draft 2020-12), as shipped inside the package."""
    text = resources.files("prunerecipe.schemas").joinpath("recipe.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def _is_integer(checker: Any, instance: Any) -> bool:
    # JSON Schema counts 1.0 as an integer; YAML keeps 1 and 1.0 apart, and so do we
    # (an int amount is a count, a float a fraction).
    return isinstance(instance, int) and not isinstance(instance, bool)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer),
)


@functools.lru_cache(maxsize=1)
def _validator() -> Any:
    return _Validator(recipe_schema())


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def schema_problems(doc: Document, schema: Mapping[str, Any] | None = None, base: KeyPath = ()) -> list[Problem]:
    """Validate ``doc.data`` at ``base`` against ``schema`` (the recipe schema by default)."""
    validator = _validator() if schema is None else _Validator(schema)
    instance = doc.data
    for part in base:
        instance = instance[part]
    problems = []
    for err in validator.iter_errors(instance):
        path = base + tuple(err.absolute_path)
        kind = err.validator
        if kind == "additionalProperties" and isinstance(err.instance, dict):
            allowed = sorted(err.schema.get("properties", {}))
            for key in sorted(set(err.instance) - set(allowed)):
                hint = suggest(key, allowed) or f"; allowed here: {', '.join(allowed)}"
                problems.append(doc.problem(path + (key,), f"unknown key {key!r}{hint}", key=True))
        elif kind == "required" and isinstance(err.instance, dict):
            for key in err.validator_value:
                if key not in err.instance:
                    problems.append(doc.problem(path, f"missing required key {key!r}"))
        elif kind == "const" and path == ("version",):
            problems.append(doc.problem(path, f"unsupported recipe version {_short(err.instance)}; this prunerecipe reads version 1"))
        elif kind == "anyOf" and err.context and "x-message" not in err.schema:
            problems.append(doc.problem(path, _any_of_message(err)))
        elif kind == "propertyNames":
            problems.append(doc.problem(path, f"{_short(err.instance)} is not a valid name (letters, digits and '_')"))
        elif kind == "minItems" and err.validator_value == 1:
            problems.append(doc.problem(path, "must not be empty"))
        elif kind == "minProperties":
            problems.append(doc.problem(path, "must not be empty"))
        elif "x-message" in err.schema:
            problems.append(doc.problem(path, f"{_short(err.instance)}: {err.schema['x-message']}"))
        elif kind == "pattern" and path[-1:] == ("model",):
            problems.append(doc.problem(path, f"{_short(err.instance)} is not a model spec; write 'pkg.module:attr' or 'path/to/file.py:attr'"))
        elif kind == "pattern":
            problems.append(doc.problem(path, f"{_short(err.instance)} is not a valid name (letters, digits and '_')"))
        else:
            message = err.message
            if len(message) > 200:
                message = f"{_short(err.instance)} is invalid here ({kind})"
            problems.append(doc.problem(path, message))
    return problems


_PLACEHOLDER_PATTERN = r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$"


def _any_of_message(err: Any) -> str:
    """The useful part of an anyOf failure: the branch whose type fit, else the types wanted.

    (Every scalar field may also hold a ``${var}`` placeholder; that branch never explains
    a failure, since placeholders are substituted before validation.)
    """
    branches = [c for c in err.context if c.schema.get("pattern") != _PLACEHOLDER_PATTERN]
    shaped = [c for c in branches if c.validator != "type"]
    if shaped:
        first = shaped[0]
        if first.validator == "pattern":
            return f"{_short(first.instance)} is not a valid name (letters, digits and '_')"
        if "x-message" in first.schema:
            return f"{_short(first.instance)}: {first.schema['x-message']}"
        return first.message
    wanted = []
    for c in branches:
        for t in c.validator_value if isinstance(c.validator_value, list) else [c.validator_value]:
            if t not in wanted:
                wanted.append(t)
    return f"{_short(err.instance)} is not of type " + " or ".join(repr(t) for t in wanted)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _semantic_problems(doc: Document) -> list[Problem]:
    data = doc.data
    problems: list[Problem] = []
    if isinstance(data.get("version"), float):
        problems.append(doc.problem(("version",), f"{data['version']!r} is not of type 'integer'"))
    steps = data.get("steps")
    if not isinstance(steps, list):
        return problems
    seen_names: dict[str, int] = {}
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            continue
        path: KeyPath = ("steps", i)
        name = step.get("name")
        if isinstance(name, str):
            if name in seen_names:
                problems.append(doc.problem(path + ("name",), f"step name {name!r} is already used by steps[{seen_names[name]}]"))
            seen_names.setdefault(name, i)
        problems.extend(_step_problems(doc, path, step))
    return problems


def _step_problems(doc: Document, path: KeyPath, step: dict[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    amount, sparsity = step.get("amount"), step.get("sparsity")
    for key, value in (("amount", amount), ("sparsity", sparsity)):
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(doc.problem(path + (key,), f"{value} is not a finite number"))
    if isinstance(amount, float) and math.isfinite(amount) and amount > 1:
        problems.append(doc.problem(path + ("amount",), f"{amount} is greater than the maximum of 1"))
    if "amount" in step and "sparsity" in step:
        problems.append(doc.problem(path + ("sparsity",), "give either 'amount' or 'sparsity', not both", key=True))

    select = step.get("select")
    if isinstance(select, dict):
        for group, prefix in ((select, path + ("select",)), (select.get("exclude"), path + ("select", "exclude"))):
            if not isinstance(group, dict):
                continue
            for j, entry in enumerate(group.get("types") or []) if isinstance(group.get("types"), list) else ():
                if isinstance(entry, str) and "." in entry:
                    try:
                        resolve_type(entry)
                    except SelectorError as exc:
                        problems.append(doc.problem(prefix + ("types", j), str(exc)))
            for j, entry in enumerate(group.get("names") or []) if isinstance(group.get("names"), list) else ():
                if isinstance(entry, str):
                    try:
                        check_name_pattern(entry)
                    except SelectorError as exc:
                        problems.append(doc.problem(prefix + ("names", j), str(exc)))

    schedule = step.get("schedule")
    if isinstance(schedule, dict):
        start, end = schedule.get("start", 0), schedule.get("end")
        every = schedule.get("every", 1)
        if isinstance(start, int) and isinstance(end, int) and end < start:
            problems.append(doc.problem(path + ("schedule", "end"), f"end ({end}) is before start ({start})"))
        elif isinstance(start, int) and isinstance(end, int) and isinstance(every, int) and every >= 1:
            events = (end - start) // every + 1
            if events > MAX_EVENTS:
                problems.append(
                    doc.problem(path + ("schedule",), f"this schedule has {events} pruning events; the limit is {MAX_EVENTS} (raise 'every')")
                )
        init = schedule.get("initial_sparsity")
        if _is_number(init) and _is_number(sparsity) and init > sparsity:
            problems.append(
                doc.problem(path + ("schedule", "initial_sparsity"), f"initial_sparsity ({init}) is above the final sparsity ({sparsity})")
            )
        if "initial_sparsity" in schedule and "sparsity" not in step:
            problems.append(doc.problem(path + ("schedule", "initial_sparsity"), "initial_sparsity needs a 'sparsity' target on the step", key=True))

    method_name = step.get("method")
    if not isinstance(method_name, str) or not method_name:
        return problems
    try:
        spec = get_method(method_name)
    except MethodError as exc:
        problems.append(doc.problem(path + ("method",), str(exc)))
        return problems
    problems.extend(method_problems(doc, path, step, spec))
    return problems


def method_problems(doc: Document, path: KeyPath, step: Mapping[str, Any], spec: MethodSpec) -> list[Problem]:
    """Check a step's amount/sparsity/scope/args against the method it names."""
    problems: list[Problem] = []
    name = spec.name
    has_amount = "amount" in step or "sparsity" in step
    if spec.takes_amount and not has_amount:
        problems.append(doc.problem(path, f"method {name!r} needs 'amount' or 'sparsity'"))
    if not spec.takes_amount and has_amount:
        key = "amount" if "amount" in step else "sparsity"
        problems.append(doc.problem(path + (key,), f"method {name!r} takes no amount; remove {key!r}", key=True))
    if step.get("scope") == "global" and spec.pruning_type != "unstructured":
        problems.append(
            doc.problem(path + ("scope",), f"scope 'global' needs an unstructured method; {name!r} is {spec.pruning_type}")
        )

    args = step.get("args", {})
    if not isinstance(args, dict):
        return problems
    args_path = path + ("args",)
    accepted = spec.arguments
    for key in args:
        if key == "amount":
            problems.append(doc.problem(args_path + (key,), "'amount' goes on the step itself (as 'amount' or 'sparsity'), not under args", key=True))
        elif key not in accepted and not spec.accepts_any_args:
            problems.append(
                doc.problem(
                    args_path + (key,),
                    f"unknown argument {key!r} for method {name!r}{suggest(key, list(accepted))}; it accepts: {spec.describe_arguments()}",
                    key=True,
                )
            )
    for key, param in accepted.items():
        if param.default is param.empty and key not in args:
            problems.append(
                doc.problem(args_path if "args" in step else path, f"method {name!r} needs argument {key!r}; it accepts: {spec.describe_arguments()}")
            )
    accepts = f" (method {name!r} accepts: {spec.describe_arguments()})"
    if spec.args_schema is not None:
        found = schema_problems(doc, spec.args_schema, args_path) if "args" in step else _args_schema_defaults(doc, spec, args_path)
        problems.extend(dataclasses.replace(p, message=p.message + accepts) for p in found)
    else:  # no schema: the method's own type annotations, where they are simple
        hints = _argument_hints(spec)
        for key, value in args.items():
            hint = hints.get(key)
            if hint is not None and not _fits(value, hint):
                problems.append(doc.problem(args_path + (key,), f"{_short(value)} is not {_describe_type(hint)}{accepts}"))
    return problems


def _argument_hints(spec: MethodSpec) -> dict[str, Any]:
    """Type hints of a method's keyword arguments (from ``__init__``, or a function-form method's function)."""
    import typing

    target = getattr(spec.cls, "compute_mask_function", None) or spec.cls.__init__
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: no type check, as without any
        return {}


def _fits(value: Any, hint: Any) -> bool:
    """Whether a plain YAML value fits a simple annotation; anything not simple fits."""
    import types
    import typing

    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple, dict):
        return isinstance(value, list if origin in (list, tuple) else dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _describe_type(hint: Any) -> str:
    import typing

    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if hint in names:
        return names[hint]
    shown = str(hint).replace("typing.", "") if typing.get_origin(hint) is not None else getattr(hint, "__name__", str(hint))
    return f"of type {shown}"


def _construction_problems(doc: Document, found: list[Problem]) -> list[Problem]:
    """Let each otherwise-valid step's method validate its own arguments by constructing it once."""
    problems = []
    for i, step in enumerate(doc.data.get("steps") or []):
        path: KeyPath = ("steps", i)
        if any(p.path[:2] == path for p in found) or not isinstance(step, dict):
            continue
        spec = get_method(step["method"])
        kwargs = dict(step.get("args", {}))
        if spec.takes_amount:
            kwargs["amount"] = step.get("amount", 0.0)
        try:
            spec.cls(**kwargs)
        except Exception as exc:  # the method's own validation, whatever it raises
            where = path + ("args",) if "args" in step else path + ("method",)
            problems.append(doc.problem(where, f"method {spec.name!r} rejected its arguments: {type(exc).__name__}: {exc}"))
    return problems


def _args_schema_defaults(doc: Document, spec: MethodSpec, args_path: KeyPath) -> list[Problem]:
    """Validate an absent ``args`` as ``{}`` so that required arguments in the schema are enforced."""
    tmp = Document(doc.source, {}, doc.value_marks, doc.key_marks)
    found = schema_problems(tmp, spec.args_schema)
    return [doc.problem(args_path[:-1], p.message) for p in found]


# --- typed construction ---------------------------------------------------------------------


def _tuple(value: Any) -> tuple[str, ...] | None:
    return tuple(value) if value is not None else None


def _typed(doc: Document) -> Recipe:
    data = doc.data
    steps = []
    for i, raw in enumerate(data["steps"]):
        select = raw["select"]
        exclude = select.get("exclude", {})
        schedule = None
        if "schedule" in raw:
            s = raw["schedule"]
            start = s.get("start", 0)
            schedule = Schedule(
                unit=s.get("unit", "epoch"),
                start=start,
                end=s.get("end", start),
                every=s.get("every", 1),
                curve=s.get("curve", "cubic"),
                initial_sparsity=float(s.get("initial_sparsity", 0.0)),
            )
        steps.append(
            Step(
                index=i,
                name=raw.get("name"),
                select=Selector(
                    types=_tuple(select.get("types")),
                    names=_tuple(select.get("names")),
                    exclude_types=tuple(exclude.get("types", ())),
                    exclude_names=tuple(exclude.get("names", ())),
                ),
                params=tuple(raw.get("params", ("weight",))),
                method=raw["method"],
                amount=raw.get("amount"),
                sparsity=float(raw["sparsity"]) if "sparsity" in raw else None,
                scope=raw.get("scope", "local"),
                args=dict(raw.get("args", {})),
                seed=raw.get("seed"),
                schedule=schedule,
            )
        )
    return Recipe(
        version=data["version"],
        steps=tuple(steps),
        name=data.get("name"),
        description=data.get("description"),
        model=data.get("model"),
        vars=dict(data.get("vars", {})),
        seed=data.get("seed"),
        finalize=bool(data.get("finalize", False)),
        lottery_ticket=bool(data.get("lottery_ticket", False)),
        source=doc.source,
        document=doc,
    )
