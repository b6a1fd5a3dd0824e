"""What the schema cannot say: cross-key rules, selectors that cannot compile, methods and
their arguments. Every check returns located problems; none stops the others."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from ..errors import KeyPath, MethodError, Problem, SelectorError
from ..methods import MethodSpec, get_importance, get_method
from ..methods.binding import accepts, argument_findings, construction_problem
from ..select import check_name_pattern
from ..text import short
from .schema import schema_problems
from .yaml import Document

_SPEC = re.compile(r"[^:]+:[A-Za-z_][A-Za-z0-9_.]*")

#: A schedule with more events than this is almost certainly a mistake (and would be slow to list).
MAX_EVENTS = 1_000_000


def semantic_problems(doc: Document) -> list[Problem]:
    """Rules across keys of a recipe that already passed the schema where it could."""
    data = doc.data
    problems: list[Problem] = []
    if isinstance(data.get("version"), float):
        problems.append(doc.problem(("version",), f"{data['version']!r} is not of type 'integer'", code="version"))
    problems.extend(_nan_problems(doc, {k: v for k, v in data.items() if k != "vars"}, ()))
    model = data.get("model")
    if isinstance(model, str) and ":" in model and not _SPEC.fullmatch(model):
        problems.append(
            doc.problem(("model",), f"{short(model)} is not a model spec; write 'pkg.module:attr', 'path/to/file.py:attr' or a model folder")
        )
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
        problems.extend(_amount_problems(doc, path, step))
        problems.extend(_selector_problems(doc, path, step.get("select")))
        problems.extend(_schedule_problems(doc, path, step))
        problems.extend(_method_problems(doc, path, step))
        problems.extend(_importance_problems(doc, path, step))
    return problems


def _nan_problems(doc: Document, value: Any, path: KeyPath) -> list[Problem]:
    """NaN is never a usable number (infinities are caught where they are not: amount,
    sparsity; a method's ``args`` may take them, as ``ln_structured``'s ``n: .inf`` does)."""
    if isinstance(value, float) and math.isnan(value):
        return [doc.problem(path, "NaN is not a number prunerecipe can use here", code="invalid")]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _nan_problems(doc, v, path + (k,))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _nan_problems(doc, v, path + (i,))]
    return []


def _importance_problems(doc: Document, path: KeyPath, step: dict[str, Any]) -> list[Problem]:
    """An importance name that resolves to nothing (checked again at plan time, with the rest
    of what importance, method and calibration need of each other)."""
    name = step.get("importance")
    if not isinstance(name, str) or not name.isidentifier():
        return []
    try:
        get_importance(name)
    except MethodError as exc:
        return [doc.problem(path + ("importance",), str(exc), code="importance")]
    return []


def _amount_problems(doc: Document, path: KeyPath, step: dict[str, Any]) -> list[Problem]:
    problems = []
    amount = step.get("amount")
    for which in ("amount", "sparsity"):
        value = step.get(which)
        if isinstance(value, float) and math.isinf(value):
            problems.append(doc.problem(path + (which,), f"{value} is not a finite number", code="amount"))
    if isinstance(amount, float) and math.isfinite(amount) and amount > 1:
        problems.append(doc.problem(path + ("amount",), f"{amount} is greater than the maximum of 1", code="amount"))
    if "amount" in step and "sparsity" in step:
        problems.append(doc.problem(path + ("sparsity",), "give either 'amount' or 'sparsity', not both", key=True, code="amount"))
    return problems


def _selector_problems(doc: Document, path: KeyPath, select: Any) -> list[Problem]:
    problems: list[Problem] = []
    if not isinstance(select, dict):
        return problems
    for group, prefix in ((select, path + ("select",)), (select.get("exclude"), path + ("select", "exclude"))):
        if not isinstance(group, dict):
            continue
        types, names = group.get("types"), group.get("names")
        for j, entry in enumerate(types if isinstance(types, list) else []):
            if isinstance(entry, str) and not all(part.isidentifier() for part in entry.split(".")):
                # the form only: importing a dotted type would run code; plan resolves it
                problems.append(doc.problem(prefix + ("types", j), f"{short(entry)} is not a class name or a dotted import path", code="select"))
        for j, entry in enumerate(names if isinstance(names, list) else []):
            if isinstance(entry, str):
                try:
                    check_name_pattern(entry)
                except SelectorError as exc:
                    problems.append(doc.problem(prefix + ("names", j), str(exc), code="select"))
    return problems


def _schedule_problems(doc: Document, path: KeyPath, step: dict[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    schedule = step.get("schedule")
    if not isinstance(schedule, dict):
        return problems
    here = path + ("schedule",)
    start, end = schedule.get("start", 0), schedule.get("end")
    every = schedule.get("every", 1)
    if isinstance(start, int) and isinstance(end, int) and end < start:
        problems.append(doc.problem(here + ("end",), f"end ({end}) is before start ({start})", code="schedule"))
    elif isinstance(start, int) and isinstance(end, int) and isinstance(every, int) and every >= 1:
        events = (end - start) // every + 1
        if events > MAX_EVENTS:
            problems.append(
                doc.problem(here, f"this schedule has {events} pruning events; the limit is {MAX_EVENTS} (raise 'every')", code="schedule")
            )
    init, sparsity = schedule.get("initial_sparsity"), step.get("sparsity")
    if isinstance(init, (int, float)) and isinstance(sparsity, (int, float)) and _is_number(init) and _is_number(sparsity) and init > sparsity:
        problems.append(
            doc.problem(here + ("initial_sparsity",), f"initial_sparsity ({init}) is above the final sparsity ({sparsity})", code="schedule")
        )
    if "initial_sparsity" in schedule and "sparsity" not in step:
        problems.append(
            doc.problem(here + ("initial_sparsity",), "initial_sparsity needs a 'sparsity' target on the step", key=True, code="schedule")
        )
    return problems


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _method_problems(doc: Document, path: KeyPath, step: dict[str, Any]) -> list[Problem]:
    method_name = step.get("method")
    if not isinstance(method_name, str) or not method_name:
        return []
    try:
        spec = get_method(method_name)
    except MethodError as exc:
        return [doc.problem(path + ("method",), str(exc), code="method")]
    return method_problems(doc, path, step, spec)


def method_problems(doc: Document, path: KeyPath, step: Mapping[str, Any], spec: MethodSpec) -> list[Problem]:
    """Check a step's amount/sparsity/scope/args against the method it names."""
    problems = [doc.problem(path + where, message, key=at_key, code="method-args") for where, message, at_key in argument_findings(spec, step)]
    if spec.args_schema is not None and isinstance(step.get("args", {}), Mapping):
        args_path = path + ("args",)
        if "args" in step:
            found = schema_problems(doc, spec.args_schema, args_path)
        else:  # validate an absent ``args`` as ``{}``, so that required arguments in the schema are enforced
            empty = Document(doc.source, {}, doc.value_marks, doc.key_marks)
            found = [doc.problem(path, p.message) for p in schema_problems(empty, spec.args_schema)]
        problems.extend(dataclasses.replace(p, message=p.message + accepts(spec), code="method-args") for p in found)
    return problems


def construction_problems(doc: Document, found: list[Problem]) -> list[Problem]:
    """Let each otherwise-valid step's method validate its own arguments by constructing it once."""
    problems = []
    for i, step in enumerate(doc.data.get("steps") or []):
        path: KeyPath = ("steps", i)
        if any(p.path is not None and p.path[:2] == path for p in found) or not isinstance(step, dict):
            continue
        message = construction_problem(get_method(step["method"]), step)
        if message is not None:
            where = path + ("args",) if "args" in step else path + ("method",)
            problems.append(doc.problem(where, message, code="method-args"))
    return problems
