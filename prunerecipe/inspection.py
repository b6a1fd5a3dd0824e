"""What a model offers a recipe: its modules with qualified names and types, their parameters
with shapes and ties, and what each step of a recipe selects (``prunerecipe inspect``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import SelectorError
from .select import param_owners, resolve_targets
from .spec import Recipe
from .text import format_table, shape_text
from .torchprune import own_parameters, unpruned_name


@dataclass(frozen=True)
class ParamRow:
    """One parameter of a module: its name (``weight``, not ``weight_orig``), shape, dtype, and
    the other owners of the same tensor (tied weights)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    pruned: bool
    tied_with: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModuleRow:
    """One module: qualified name, class name (what ``types:`` matches), dotted class path."""

    name: str
    type: str
    type_path: str
    params: tuple[ParamRow, ...]


@dataclass(frozen=True)
class StepSelection:
    """What one step selects: its targets (``module.param``), or why it selects nothing."""

    label: str
    targets: tuple[str, ...]
    error: str | None = None


def model_rows(model: nn.Module) -> list[ModuleRow]:
    """Every module of ``model`` in ``named_modules()`` order, each once (under its first name).

    Args:
        model: the model (real or on the ``meta`` device).

    Returns:
        One :class:`ModuleRow` per module, with its own parameters.
    """
    owners = param_owners(model)
    rows = []
    for name, module in model.named_modules():
        cls = type(module)
        params = []
        for key, tensor in own_parameters(module):
            base = unpruned_name(key)
            qual = f"{name}.{base}" if name else base
            tied = tuple(o for o in owners.get(id(tensor), []) if o != qual)
            params.append(ParamRow(base, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), base != key, tied))
        rows.append(ModuleRow(name, cls.__name__, f"{cls.__module__}.{cls.__qualname__}", tuple(params)))
    return rows


def selections(model: nn.Module, recipe: Recipe) -> list[StepSelection]:
    """What each step of ``recipe`` selects in ``model`` (nothing is planned or changed).

    Args:
        model: the model.
        recipe: the recipe whose steps' selectors and ``params`` are resolved.

    Returns:
        One :class:`StepSelection` per step; a step that selects nothing carries the reason.
    """
    modules = list(model.named_modules(remove_duplicate=False))
    out = []
    for step in recipe.steps:
        try:
            targets = resolve_targets(modules, step.select, step.params)
        except SelectorError as exc:
            out.append(StepSelection(step.label, (), str(exc)))
            continue
        out.append(StepSelection(step.label, tuple(t.qualname for t in targets)))
    return out


def as_text(rows: list[ModuleRow], steps: list[StepSelection] | None = None) -> str:
    """The module tree as a table, then each step's selection."""
    table = []
    for row in rows:
        params = ", ".join(
            f"{p.name} {shape_text(p.shape)}" + (" (pruned)" if p.pruned else "") + (f" [tied: {', '.join(p.tied_with)}]" if p.tied_with else "")
            for p in row.params
        )
        table.append([row.name or "(root)", row.type, row.type_path, params or "-"])
    lines = format_table(["module", "type", "class", "parameters"], table)
    for step in steps or []:
        lines.append("")
        if step.error:
            lines.append(f"{step.label}: selects nothing: {step.error}")
        else:
            shown = ", ".join(step.targets[:12]) + (f", ... ({len(step.targets) - 12} more)" if len(step.targets) > 12 else "")
            lines.append(f"{step.label}: {len(step.targets)} target(s): {shown}")
    return "\n".join(lines)


def as_dict(rows: list[ModuleRow], steps: list[StepSelection] | None = None) -> dict[str, Any]:
    """The same as plain data (``--json``)."""
    return {
        "modules": [
            {
                "name": r.name,
                "type": r.type,
                "type_path": r.type_path,
                "params": [
                    {"name": p.name, "shape": list(p.shape), "dtype": p.dtype, "pruned": p.pruned, "tied_with": list(p.tied_with)} for p in r.params
                ],
            }
            for r in rows
        ],
        "steps": [{"step": s.label, "targets": list(s.targets), "error": s.error} for s in steps or []],
    }
