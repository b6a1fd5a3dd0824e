"""Every public function documents itself in the torch style: Args, Returns and an Example;
every public class has a docstring. The examples that can run, run (doctest)."""

from __future__ import annotations

import doctest
import importlib
import inspect

import pytest

import prunerecipe

PUBLIC = [name for name in prunerecipe.__all__ if name != "__version__"]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_names_are_documented(name):
    obj = getattr(prunerecipe, name)
    doc = inspect.getdoc(obj) or ""
    assert doc.strip(), name
    function = getattr(obj, "__wrapped__", obj)
    if inspect.isfunction(function):
        for part in ("Args:", "Returns:", "Example"):
            assert part in doc, f"{name}: no {part}"


@pytest.mark.parametrize(
    "module",
    [
        "prunerecipe.methods.registry",
        "prunerecipe.torchprune.reparam",
        "prunerecipe.load",
        "prunerecipe.amounts",
        "prunerecipe.modelspec",
        "prunerecipe.load.schema",
        "prunerecipe.rng",
        "prunerecipe.structured.compact",
        "prunerecipe.zoo",
        "prunerecipe.layout",
        "prunerecipe.methods",
        "prunerecipe.methods.importance",
        "prunerecipe.methods.ranking",
        "prunerecipe.methods.semi_structured",
        "prunerecipe.methods.sparsegpt",
        "prunerecipe.calibrate.data",
        "prunerecipe.calibrate.sparsegpt",
    ],
)
def test_runnable_examples_pass(module):
    failures, _ = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert failures == 0
