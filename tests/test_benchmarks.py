"""The benchmark scripts run end to end on a small model (their numbers live in benchmarks/RESULTS.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_bench_prune_prints_its_table_with_the_same_sparsity_on_both_sides():
    out = run("benchmarks/bench_prune.py", "--quick", "--repeats", "1", "--cases", "global,global_finalize", "--no-plan")
    rows = [line for line in out.splitlines() if line.startswith("| quick")]
    assert len(rows) == 2  # the script asserts equal sparsity for torch and ours before printing a row
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 12 and cells[4].endswith("x") and cells[6].endswith("MB") and cells[11].endswith("s)")
    assert "out of place" in out


@pytest.mark.slow
def test_op_costs_prices_every_op_against_the_floor():
    out = run("benchmarks/op_costs.py", "--layers", "2", "--chunk", "65536")
    lines = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| op")]
    assert lines[0].startswith("| floor") and len(lines) == 10
