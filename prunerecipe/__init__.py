"""prunerecipe: declarative, validated pruning recipes for PyTorch.

    >>> from prunerecipe import load_recipe, apply_recipe
    >>> from prunerecipe.zoo import LeNet
    >>> report = apply_recipe(LeNet(), load_recipe("recipes/lenet-global-l1.yaml"))  # doctest: +SKIP
"""

from __future__ import annotations

from ._version import __version__
from .apply import apply_recipe, finalize, pruned_parameters
from .errors import ApplyError, CheckpointError, Problem, RecipeError
from .methods import MethodSpec, get_method, method_names, pruning_method, register_method, unregister_method
from .plan import Plan, PlannedStep, PlannedTarget, plan_recipe
from .recipe import Recipe, Schedule, Selector, Step, load_recipe, parse_recipe, recipe_from_dict, recipe_schema
from .report import Report
from .selectors import Target

__all__ = [
    "__version__",
    "ApplyError",
    "CheckpointError",
    "MethodSpec",
    "Plan",
    "PlannedStep",
    "PlannedTarget",
    "Problem",
    "Recipe",
    "RecipeError",
    "Report",
    "Schedule",
    "Selector",
    "Step",
    "Target",
    "apply_recipe",
    "finalize",
    "get_method",
    "load_recipe",
    "method_names",
    "parse_recipe",
    "plan_recipe",
    "pruned_parameters",
    "pruning_method",
    "recipe_from_dict",
    "recipe_schema",
    "register_method",
    "unregister_method",
]
