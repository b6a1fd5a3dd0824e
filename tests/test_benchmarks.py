"""The benchmark script runs end to end on a small model (its numbers live in benchmarks/RESULTS.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_bench_prune_prints_quiet_and_busy_tables_and_its_targets():
    out = run("benchmarks/bench_prune.py", "--quick", "--repeats", "1", "--cases", "global", "--busy", "1")
    rows = [line for line in out.splitlines() if line.startswith("| quick")]
    assert len(rows) == 1  # the script asserts equal sparsity for torch and ours before printing a row
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert len(cells) == 12 and cells[4].endswith("x") and cells[5].endswith("MB") and cells[10].endswith("x")
    targets = out.split("targets (issue 13):")[1].strip().splitlines()
    assert any("busy 1" in t for t in targets) and all(t.startswith(("- met:", "- NOT MET:")) for t in targets)


@pytest.mark.slow
def test_bench_stream_prints_its_table_and_targets():
    out = run("benchmarks/bench_stream.py", "--gb", "0.02", "--hidden", "256", "--repeats", "1")
    rows = dict(line.strip("|").split("|")[:2] for line in out.splitlines() if line.startswith("| ") and "measure" not in line)
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert rows["bit-identical to in memory"].startswith("yes (")
    assert "MiB (max of runs) vs bound" in rows["peak anonymous memory, stream"] and rows["stream / floor"].endswith(")")
    assert any(line.startswith("- met: peak under the bound") for line in out.splitlines())


@pytest.mark.slow
def test_bench_compact_prints_its_models_and_targets():
    pytest.importorskip("torch_pruning")
    out = run("benchmarks/bench_compact.py", "--quick")
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
        for line in out.splitlines()
        if line.startswith("| ") and "ms |" in line
    }
    assert list(rows) == ["dense", "masked", "finalized", "compacted", "half width, built"]
    assert rows["half width, built"][5] == rows["compacted"][5]  # the same shapes: the same parameter count
    assert rows["masked"][2] == rows["masked"][4] == "1.00x" and rows["masked"][8] == "0 (reference)"  # both layouts
    assert float(rows["compacted"][5].rstrip("M")) < float(rows["masked"][5].rstrip("M"))
    assert float(rows["compacted"][8]) <= 1e-5  # the compacted model gives the masked model's outputs
    targets = out.split("targets (issue 15):")[1].strip().splitlines()
    assert len(targets) == 4 and all(t.startswith(("- met:", "- NOT MET:")) for t in targets)


@pytest.mark.slow
def test_bench_llm_prints_per_block_times_and_the_memory_bound():
    pytest.importorskip("transformers")
    out = run("benchmarks/bench_llm.py", "--quick", "--samples", "8")
    assert "| model.layers.0 |" in out and "| model.layers.1 |" in out
    assert "sparsity of the targets after: 50.00%; tensors rewritten: 14" in out
    assert out.strip().splitlines()[-1].startswith(("- met: peak over the model", "- NOT MET: peak over the model"))
