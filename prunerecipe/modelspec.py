"""Specs that name Python objects: ``pkg.module:attr`` or ``path/to/file.py:attr``.

A model spec gives an ``nn.Module`` (:func:`load_model`); a calibration spec gives the
function that yields calibration data (:func:`load_object` with its own wording and error).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

from torch import nn

from .errors import ModelSpecError, RecipeError
from .text import suggest


def _split(spec: str, what: str, error: type[RecipeError]) -> tuple[str, str]:
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr or not all(p.isidentifier() for p in attr.split(".")):
        raise error(f"{what} {spec!r} is not 'pkg.module:attr' or 'path/to/file.py:attr'")
    return where, attr


def _import_file(path: str, spec: str, what: str, error: type[RecipeError]) -> Any:
    if not os.path.isfile(path):
        raise error(f"{what} {spec!r}: no such file {path!r}")
    prefix = "_prunerecipe_" + what.split()[0] + "_"
    name = prefix + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise error(f"{what} {spec!r}: cannot import {path!r} as Python")
    module = importlib.util.module_from_spec(module_spec)
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)  # so the file can import its neighbours
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(name, None)
        raise error(f"{what} {spec!r}: importing {path!r} raised {type(exc).__name__}: {exc}") from exc
    finally:
        if sys.path and sys.path[0] == folder:
            sys.path.pop(0)
    return module


def _import_module(name: str, spec: str, what: str, error: type[RecipeError]) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise error(f"{what} {spec!r}: cannot import module {name!r} ({exc})") from exc
    except (Exception, SystemExit) as exc:
        raise error(f"{what} {spec!r}: importing {name!r} raised {type(exc).__name__}: {exc}") from exc


def load_object(spec: str, what: str = "model spec", error: type[RecipeError] = ModelSpecError) -> Any:
    """The object a spec names, imported as Python's own import would (running the module's code).

    Args:
        spec: ``pkg.module:attr`` or ``path/to/file.py:attr`` (the file's folder is importable
            while it loads); ``attr`` may be dotted.
        what: how messages name the spec (``"model spec"``, ``"calibration spec"``).
        error: the :class:`~prunerecipe.errors.RecipeError` subclass raised.

    Returns:
        The attribute.

    Raises:
        RecipeError: (``error``) the spec is malformed, does not import, or lacks the attribute.

    Example:
        >>> load_object("prunerecipe.zoo:LeNet").__name__
        'LeNet'
    """
    where, attr = _split(spec, what, error)
    module = _import_file(where, spec, what, error) if where.endswith(".py") else _import_module(where, spec, what, error)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            hint = suggest(part, [n for n in dir(obj) if not n.startswith("_")])
            raise error(f"{what} {spec!r}: {where!r} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    return obj


def load_model(spec: str) -> nn.Module:
    """Build the model a spec names: an ``nn.Module`` subclass or a no-argument factory is called.

    Importing the module or file a spec names runs its code, as Python's own import does.

    Args:
        spec: ``pkg.module:attr`` or ``path/to/file.py:attr`` (the file's folder is importable
            while it loads).

    Returns:
        The model.

    Raises:
        ModelSpecError: the spec is malformed, does not import, or gives no ``nn.Module``.

    Example:
        >>> load_model("prunerecipe.zoo:LeNet")  # doctest: +ELLIPSIS
        LeNet(...)
    """
    obj = load_object(spec)
    _, attr = _split(spec, "model spec", ModelSpecError)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ModelSpecError(f"model spec {spec!r}: {attr!r} is a {type(obj).__name__}, not an nn.Module or a factory")
    try:
        model = obj()
    except (Exception, SystemExit) as exc:
        raise ModelSpecError(f"model spec {spec!r}: calling {attr}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model spec {spec!r}: {attr}() returned a {type(model).__name__}, not an nn.Module")
    return model
