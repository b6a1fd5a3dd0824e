"""prunerecipe: declarative, validated pruning recipes for PyTorch.

    >>> from prunerecipe import apply_recipe, load_recipe
    >>> from prunerecipe.zoo import LeNet
    >>> report = apply_recipe(LeNet(), load_recipe("recipes/lenet-global-l1.yaml"))  # doctest: +SKIP

Names are imported on first use, so ``prunerecipe --help`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_EXPORTS = {
    "apply_recipe": "apply",
    "apply_recipe_streaming": "stream",
    "ApplyError": "errors",
    "CalibrationError": "errors",
    "CheckpointError": "errors",
    "MethodError": "errors",
    "ModelSpecError": "errors",
    "Problem": "errors",
    "RecipeError": "errors",
    "load_pruned_state_dict": "checkpoint",
    "read_state_dict": "checkpoint",
    "save_state_dict": "checkpoint",
    "write_output": "checkpoint",
    "load_recipe": "load",
    "parse_recipe": "load",
    "recipe_from_dict": "load",
    "recipe_schema": "load",
    "MethodSpec": "methods",
    "get_importance": "methods",
    "get_method": "methods",
    "importance_names": "methods",
    "method_names": "methods",
    "pruning_method": "methods",
    "register_importance": "methods",
    "register_method": "methods",
    "unregister_importance": "methods",
    "unregister_method": "methods",
    "load_model": "modelspec",
    "RecipeWarning": "errors",
    "preview": "preview",
    "Plan": "plan",
    "PlannedStep": "plan",
    "PlannedTarget": "plan",
    "plan_recipe": "plan",
    "Report": "report",
    "Event": "schedule",
    "Target": "select",
    "Recipe": "spec",
    "Schedule": "spec",
    "Selector": "spec",
    "Step": "spec",
    "Compaction": "structured",
    "compact": "structured",
    "finalize": "torchprune",
    "pruned_parameters": "torchprune",
    "EventResult": "training",
    "Pruner": "training",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'prunerecipe' has no attribute {name!r}")


def __dir__() -> list[str]:
    helpers = {"Any", "TYPE_CHECKING", "annotations", "importlib"}  # this module's own imports, not the API
    return sorted((set(globals()) - helpers) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .apply import apply_recipe
    from .checkpoint import load_pruned_state_dict, read_state_dict, save_state_dict, write_output
    from .errors import ApplyError, CalibrationError, CheckpointError, MethodError, ModelSpecError, Problem, RecipeError, RecipeWarning
    from .load import load_recipe, parse_recipe, recipe_from_dict, recipe_schema
    from .methods import (
        MethodSpec,
        get_importance,
        get_method,
        importance_names,
        method_names,
        pruning_method,
        register_importance,
        register_method,
        unregister_importance,
        unregister_method,
    )
    from .modelspec import load_model
    from .plan import Plan, PlannedStep, PlannedTarget, plan_recipe
    from .preview import preview
    from .report import Report
    from .schedule import Event
    from .select import Target
    from .spec import Recipe, Schedule, Selector, Step
    from .stream import apply_recipe_streaming
    from .structured import Compaction, compact
    from .torchprune import finalize, pruned_parameters
    from .training import EventResult, Pruner
