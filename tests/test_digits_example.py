"""examples/digits/compare.py, shortened: every variant runs and reaches its sparsity."""

from __future__ import annotations

import importlib.util

import pytest

from .conftest import ROOT

pytest.importorskip("sklearn")


@pytest.mark.slow
def test_digits_comparison_quick_run():
    spec = importlib.util.spec_from_file_location("digits_compare", ROOT / "examples/digits/compare.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--quick"])
    dense_acc, dense_sparsity = results["dense"]
    assert dense_acc > 0.85 and dense_sparsity == 0.0
    for name in ("one-shot 90% + fine-tune", "one-shot 90%, no fine-tune", "gradual cubic 90% (prunerecipe)"):
        acc, sparsity = results[name]
        assert sparsity == pytest.approx(0.9, abs=0.002), name
        assert 0.1 < acc <= 1.0, name
    # gradual pruning with the same budget beats cutting 90% at the end without fine-tuning
    assert results["gradual cubic 90% (prunerecipe)"][0] > results["one-shot 90%, no fine-tune"][0]
