"""Binding a step's ``args`` to a method: what it accepts, what types it annotates, whether it
constructs. Findings are returned as ``(key path below the step, message, at_key)``; the
recipe loader turns them into located problems."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any

from ..spec import Step
from ..text import short, suggest
from .importance import ImportanceSpec
from .registry import MethodSpec

Finding = tuple[tuple[str, ...], str, bool]


def argument_findings(spec: MethodSpec, step: Mapping[str, Any]) -> list[Finding]:
    """What is wrong with a step's ``amount``/``sparsity``/``scope``/``args`` for ``spec``.

    Args:
        spec: the resolved method.
        step: the step's data, placeholders already substituted.

    Returns:
        Findings ``(path below the step, message, whether the key itself is meant)``;
        empty when the step fits the method's signature and simple annotations. A method's
        own ``args_schema`` is checked by the caller.
    """
    out: list[Finding] = []
    name = spec.name
    has_amount = "amount" in step or "sparsity" in step
    given = step.get("args", {})
    given = given if isinstance(given, Mapping) else {}
    needs_amount = spec.needs_amount(given)
    if needs_amount and not has_amount:
        out.append(((), f"method {name!r} needs 'amount' or 'sparsity'", False))
    if not needs_amount and has_amount:
        which = "amount" if "amount" in step else "sparsity"
        if spec.takes_amount:  # an argument such as an N:M pattern sets the sparsity instead
            setting = ", ".join(a for a in getattr(spec.cls, "AMOUNT_UNLESS", ()) if a in given)
            out.append(((which,), f"method {name!r} takes no amount with {setting} (the pattern sets the sparsity); remove {which!r}", True))
        else:
            out.append(((which,), f"method {name!r} takes no amount; remove {which!r}", True))
    if step.get("scope") == "global" and spec.pruning_type != "unstructured":
        kind = "a whole-tensor method (PRUNING_TYPE 'global')" if spec.pruning_type == "global" else spec.pruning_type
        out.append((("scope",), f"scope 'global' needs an unstructured method; {name!r} is {kind}", False))
    if step.get("scope") == "group" and spec.pruning_type != "structured":
        out.append((("scope",), f"scope 'group' needs a structured method (channels per dependency group); {name!r} is {spec.pruning_type}", False))

    args = step.get("args", {})
    if not isinstance(args, Mapping):
        return out
    accepted = spec.arguments
    for key in args:
        if key == "amount":
            out.append((("args", key), "'amount' goes on the step itself (as 'amount' or 'sparsity'), not under args", True))
        elif key not in accepted and not spec.accepts_any_args:
            out.append(
                (
                    ("args", key),
                    f"unknown argument {short(key)} for method {name!r}{suggest(key, list(accepted))}; it accepts: {spec.describe_arguments()}",
                    True,
                )
            )
    for key, param in accepted.items():
        if param.default is param.empty and key not in args:
            where = ("args",) if "args" in step else ()
            out.append((where, f"method {name!r} needs argument {key!r}; it accepts: {spec.describe_arguments()}", False))
    if spec.args_schema is None:  # no schema: the method's own type annotations, where they are simple
        hints = argument_hints(spec)
        for key, value in args.items():
            hint = hints.get(key)
            if hint is not None and not fits(value, hint):
                out.append((("args", key), f"{short(value)} is not {describe_type(hint)}{accepts(spec)}", False))
    return out


def accepts(spec: MethodSpec) -> str:
    """``" (method 'x' accepts: ...)"``, appended to argument messages."""
    return f" (method {spec.name!r} accepts: {spec.describe_arguments()})"


def construction_problem(spec: MethodSpec, step: Mapping[str, Any]) -> str | None:
    """Construct the method once with the step's arguments: its own validation's message, or None."""
    kwargs = dict(step.get("args", {}))
    if spec.needs_amount(kwargs):
        kwargs["amount"] = step.get("amount", 0.0)
    try:
        spec.cls(**kwargs)
    except Exception as exc:  # the method's own validation, whatever it raises
        return f"method {spec.name!r} rejected its arguments: {type(exc).__name__}: {exc}"
    return None


def argument_default(spec: MethodSpec, name: str, fallback: Any) -> Any:
    """The default of the method's argument ``name`` (``fallback`` when it has none)."""
    param = spec.arguments.get(name)
    return fallback if param is None or param.default is param.empty else param.default


def argument_hints(spec: MethodSpec) -> dict[str, Any]:
    """Type hints of a method's keyword arguments (from ``__init__``, or a function-form method's function)."""
    target = getattr(spec.cls, "compute_mask_function", None) or spec.cls.__init__
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: no type check, as without any
        return {}


def fits(value: Any, hint: Any) -> bool:
    """Whether a plain YAML value fits a simple annotation; anything not simple fits."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, h) for h in typing.get_args(hint))
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


def describe_type(hint: Any) -> str:
    """An annotation in words: ``int`` -> ``"an integer"``."""
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if hint in names:
        return names[hint]
    shown = str(hint).replace("typing.", "") if typing.get_origin(hint) is not None else getattr(hint, "__name__", str(hint))
    return f"of type {shown}"


def importance_problem(step: Step, spec: MethodSpec, importance: ImportanceSpec | None, calibrated: bool) -> tuple[str, str, str] | None:
    """What keeps a step's importance, method and calibration needs from going together, as
    ``(key, message, code)``; these rules do not depend on the model."""
    if importance is not None and not spec.uses_importance:
        if spec.calibrated:
            return "importance", f"{spec.name} ranks entries by its own saliency (w**2 / [H^-1]_jj); remove 'importance'", "importance"
        return (
            "importance",
            f"method {spec.name!r} does not rank by importance; importance {importance.name!r} works with l1_unstructured, "
            "semi_structured, ln_structured, or a method class declaring USES_IMPORTANCE = True",
            "importance",
        )
    if importance is not None and importance.per_row and step.scope == "global":
        return (
            "scope",
            f"importance {importance.name!r} compares scores within each output row; scope 'global' ranks across tensors (use scope: local)",
            "importance",
        )
    if calibrated and step.schedule is not None:
        return "schedule", "steps that need calibration data run once, in apply_recipe with calibration, not on a schedule", "calibration"
    if calibrated and step.scope != "local":
        return (
            "scope",
            f"steps that need calibration data prune block by block, each tensor on its own: scope {step.scope!r} is not available",
            "calibration",
        )
    return None
