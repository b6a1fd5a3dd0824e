"""One source of truth for the recipe's shape: every key the JSON Schema allows is a field of
the data types (spec.py), and every field a recipe sets is a key of the schema."""

from __future__ import annotations

from typing import Any

import pytest

from prunerecipe import recipe_schema
from prunerecipe.spec import Calibration, InputSpec, Recipe, Schedule, Selector, Sequential, Step, from_data, recipe_keys

from .conftest import ROOT


def schema_keys(node: dict[str, Any], defs: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted keys of an object schema; nested objects without a dataclass of their own (the
    selector's ``exclude``) are flattened into dotted keys."""
    keys = set()
    for name, sub in node.get("properties", {}).items():
        sub = defs[sub["$ref"].split("/")[-1]] if "$ref" in sub else sub
        if sub.get("type") == "object" and "properties" in sub and name == "exclude":
            keys |= schema_keys(sub, defs, prefix + name + ".")
        else:
            keys.add(prefix + name)
    return keys


@pytest.mark.parametrize(
    ("cls", "where"),
    [
        (Recipe, None),
        (Step, "step"),
        (Selector, "selector"),
        (Schedule, "schedule"),
        (InputSpec, "input"),
        (Calibration, "calibration"),
        (Sequential, "sequential"),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_schema_and_data_types_list_the_same_keys(cls, where):
    schema = recipe_schema()
    node = schema if where is None else schema["$defs"][where]
    assert set(recipe_keys(cls)) == schema_keys(node, schema["$defs"])


def test_typed_values_are_built_from_the_keys_alone():
    data = {
        "version": 1,
        "name": "n",
        "seed": 3,
        "finalize": True,
        "steps": [
            {
                "name": "s",
                "select": {"types": ["Linear"], "exclude": {"names": ["fc3"]}},
                "params": ["weight", "bias"],
                "method": "l1_unstructured",
                "sparsity": 0.5,
                "scope": "global",
                "schedule": {"unit": "step", "start": 2, "end": 8},
            }
        ],
    }
    recipe = from_data(Recipe, data)
    (step,) = recipe.steps
    assert recipe.finalize and recipe.seed == 3 and step.index == 0 and step.params == ("weight", "bias")
    assert step.select == Selector(types=("Linear",), exclude_names=("fc3",))
    assert step.schedule == Schedule(unit="step", start=2, end=8)
    assert from_data(Schedule, {"start": 4}).end == 4  # end defaults to start


def test_the_format_docs_list_every_key():
    text = (ROOT / "docs" / "format.md").read_text(encoding="utf-8")
    for cls in (Recipe, Step, Selector, Schedule, InputSpec, Calibration, Sequential):
        for key in recipe_keys(cls):
            assert f"`{key.split('.')[-1]}`" in text, (cls.__name__, key)
