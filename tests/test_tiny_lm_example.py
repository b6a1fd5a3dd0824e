"""examples/tiny-lm/train.py runs end to end in its quick mode (the full run wrote RESULTS.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import ROOT

pytest.importorskip("transformers")


@pytest.mark.slow
def test_quick_run_trains_prunes_every_way_and_writes_the_table(tmp_path):
    done = subprocess.run(
        [sys.executable, "examples/tiny-lm/train.py", "--quick", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "RESULTS.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split("|")[1].strip() + " " + r.split("|")[2].strip() for r in rows] == [
        "dense 0%",
        "magnitude 50%",
        "Wanda 50%",
        "SparseGPT 50%",
        "magnitude 2:4",
        "Wanda 2:4",
        "SparseGPT 2:4",
    ]
    assert all(r.split("|")[6].strip() == ("0.00%" if i == 0 else "50.00%") for i, r in enumerate(rows))  # what each pruned


def test_the_committed_results_are_the_full_run():
    table = (ROOT / "examples/tiny-lm/RESULTS.md").read_text()
    assert "--quick" not in table and "600 steps" in table and "| SparseGPT | 2:4 |" in table
