"""The built wheel is pure Python and ships the package, its py.typed marker and the JSON Schema."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from .conftest import ROOT


@pytest.mark.slow
def test_wheel_contains_the_schema_and_the_console_script(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("prunerecipe-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name  # pure Python: no compiler, one wheel for every platform
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "prunerecipe/schemas/recipe.schema.json" in names
        assert "prunerecipe/py.typed" in names
        for sub in sorted(p.parent.name for p in (ROOT / "prunerecipe").glob("*/__init__.py")):
            assert f"prunerecipe/{sub}/__init__.py" in names, sub
        assert not [n for n in names if n.endswith((".so", ".pyd", ".c"))]
        assert zf.read("prunerecipe/schemas/recipe.schema.json") == (ROOT / "schemas/recipe.schema.json").read_bytes()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "prunerecipe = prunerecipe.cli:main" in zf.read(entry_points).decode()
    # a non-editable install of that wheel finds its schema through importlib.resources
    target = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    code = "import prunerecipe; print(prunerecipe.__file__); print(prunerecipe.recipe_schema()['title'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert str(target) in out.stdout and "prunerecipe recipe, version 1" in out.stdout
