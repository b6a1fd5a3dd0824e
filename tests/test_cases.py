"""Golden error cases: each bad recipe in tests/cases/ with its exact expected messages.

``load/`` cases fail while loading; ``plan/`` cases load fine and fail when planned
against the model their ``model:`` key names. Regenerate an expected file only after
reading the new message: ``python -m tests.test_cases --regen``.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

from prunerecipe import RecipeError, load_recipe, plan_recipe

ROOT = Path(__file__).resolve().parent.parent
CASES = sorted((ROOT / "tests" / "cases").glob("*/*.yaml"))


def _model(spec: str):
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)()


def run_case(path: Path) -> str:
    rel = path.relative_to(ROOT).as_posix()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        recipe = load_recipe(rel)
        if path.parent.name == "plan":
            plan_recipe(_model(recipe.model), recipe)
    except RecipeError as exc:
        return str(exc) + "\n"
    finally:
        os.chdir(cwd)
    return "(no error)\n"


@pytest.fixture(autouse=True)
def _builtins_only(monkeypatch):
    """Golden texts list the available methods: keep installed plugins out of them."""
    from prunerecipe.methods import registry

    monkeypatch.setattr(registry.CATALOG, "entry_points", lambda: {})
    registry.refresh()
    yield
    registry.refresh()


@pytest.mark.parametrize("path", CASES, ids=[f"{p.parent.name}/{p.stem}" for p in CASES])
def test_error_case(path: Path) -> None:
    expected = path.with_suffix(".expected").read_text()
    assert run_case(path) == expected


def test_every_case_has_an_expected_file_and_fails() -> None:
    assert len(CASES) >= 15
    for path in CASES:
        assert path.with_suffix(".expected").exists(), path
        assert "(no error)" not in path.with_suffix(".expected").read_text(), path


if __name__ == "__main__" and "--regen" in sys.argv:
    from prunerecipe.methods import registry

    registry.CATALOG.entry_points = lambda: {}  # type: ignore[method-assign]
    for case in CASES:
        case.with_suffix(".expected").write_text(run_case(case))
        print(case.with_suffix(".expected").read_text(), end="")
