"""Hostile and broken input: the loader and the checkpoint reader never crash, hang or run code.

Each property runs many generated examples (hypothesis); every outcome must be a Recipe, or a
RecipeError whose problems say where (source, and a line where the YAML gave one).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunerecipe import CheckpointError, Recipe, RecipeError, parse_recipe, read_state_dict
from prunerecipe.errors import Problem
from prunerecipe.zoo import LeNet

from .conftest import ROOT

EXAMPLES = [p.read_text() for p in sorted((ROOT / "recipes").glob("*.yaml"))]
FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def outcome(text: str | bytes) -> None:
    """The only acceptable outcomes of loading ``text``."""
    start = time.perf_counter()
    try:
        result = parse_recipe(text if isinstance(text, str) else text.decode("utf-8", "replace"), "fuzz.yaml")
    except RecipeError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert isinstance(problem, Problem) and problem.source == "fuzz.yaml"
            assert str(problem).startswith("fuzz.yaml")
    else:
        assert isinstance(result, Recipe)
    assert time.perf_counter() - start < 2


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20))
documents = st.recursive(
    scalars, lambda children: st.one_of(st.lists(children, max_size=5), st.dictionaries(st.text(max_size=10), children, max_size=5)), max_leaves=30
)


@FUZZ
@given(documents)
def test_arbitrary_yaml_documents(data):
    outcome(yaml.safe_dump(data))


recipe_like = st.fixed_dictionaries(
    {"version": st.sampled_from([1, 2, "1", 1.0, None])},
    optional={
        "steps": st.lists(
            st.dictionaries(
                st.sampled_from(["select", "method", "amount", "sparsity", "scope", "args", "params", "seed", "schedule", "name", "bogus"]),
                documents,
                max_size=6,
            ),
            max_size=3,
        ),
        "vars": st.dictionaries(st.from_regex(r"[a-z]{1,5}", fullmatch=True), scalars, max_size=3),
        "seed": scalars,
        "finalize": scalars,
    },
)


@FUZZ
@given(recipe_like)
def test_recipe_shaped_documents(data):
    outcome(yaml.safe_dump(data))


@FUZZ
@given(st.sampled_from(EXAMPLES), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 20), st.text(max_size=5)), min_size=1, max_size=4))
def test_mutated_valid_recipes(text, edits):
    for pos, cut, insert in edits:
        pos %= len(text) + 1
        text = text[:pos] + insert + text[pos + cut :]
    outcome(text)


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes(data):
    outcome(data)


def test_known_hostile_documents_are_refused_quickly():
    hostile = {
        "python object": "version: 1\nsteps: !!python/object/apply:os.system ['touch /tmp/prunerecipe-pwned']\n",
        "python name": "version: !!python/name:os.system 1\n",
        "deep nesting": "a: " + "[" * 5000 + "]" * 5000,
        "deep mappings": "a: " + "{b: " * 3000 + "1" + "}" * 3000,
        "alias bomb": "\n".join(
            ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 12)]
        ),
        "huge": "version: 1\nname: '" + "x" * 2_000_000 + "'\n",
        "tab indentation": "version: 1\nsteps:\n\t- select: {}\n",
        "nul byte": "version: 1\x00\n",
    }
    for name, text in hostile.items():
        start = time.perf_counter()
        with pytest.raises(RecipeError):
            parse_recipe(text, name)
        assert time.perf_counter() - start < 5, name
    assert not os.path.exists("/tmp/prunerecipe-pwned")


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=10**9), st.binary(min_size=1, max_size=64))
def test_truncated_and_corrupted_checkpoints(tmp_path_factory, cut, noise):
    folder = tmp_path_factory.mktemp("ckpt")
    good = folder / "good.pt"
    torch.save(LeNet().state_dict(), good)
    raw = good.read_bytes()
    for name, data in (("cut.pt", raw[: cut % len(raw)]), ("noisy.pt", raw[: cut % len(raw)] + noise + raw[cut % len(raw) + len(noise) :])):
        path = folder / name
        path.write_bytes(data)
        try:
            state = read_state_dict(path)
        except CheckpointError as exc:
            assert str(exc).startswith(str(path))
        else:  # noise that happens to leave a valid file is fine, as long as it is a state_dict
            assert all(isinstance(v, torch.Tensor) for v in state.values())


def _size(path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # renamed or removed meanwhile
        return 0


def test_killing_apply_while_it_writes_leaves_no_partial_output(tmp_path):
    """SIGKILL the CLI mid-write: the output is either absent or the previous file, intact."""
    (tmp_path / "big.py").write_text(
        "import torch\ndef build():\n    return torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(24)])\n"
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nmodel: big.py:build\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n")
    out = tmp_path / "out.pt"
    previous = b"the previous output"
    exe = [sys.executable, "-m", "prunerecipe", "apply", str(recipe), "-o", str(out), "--force"]
    killed_during_write = False
    for attempt in range(2):
        out.write_bytes(previous)
        proc = subprocess.Popen(exe, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if any(p.name.startswith(".prunerecipe-") and _size(p) > 0 for p in tmp_path.iterdir()):  # the output's temp file, being written
                time.sleep(0.05 * attempt)
                proc.kill()
                killed_during_write = True
                break
            time.sleep(0.005)
        proc.wait()
        assert out.read_bytes() == previous or torch.load(out, weights_only=True)["0.weight_mask"].shape == (2048, 2048)
    assert killed_during_write
    # a clean run afterwards replaces it and leaves nothing behind but the temp files of the killed runs
    assert subprocess.run(exe, cwd=tmp_path, capture_output=True).returncode == 0
    assert "0.weight_orig" in torch.load(out, weights_only=True)
