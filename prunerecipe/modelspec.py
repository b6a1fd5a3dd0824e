"""Model specs: ``pkg.module:attr`` or ``path/to/file.py:attr`` -> an ``nn.Module``."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

from torch import nn

from .errors import ModelSpecError
from .text import suggest


def _split(spec: str) -> tuple[str, str]:
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr or not all(p.isidentifier() for p in attr.split(".")):
        raise ModelSpecError(f"model spec {spec!r} is not 'pkg.module:attr' or 'path/to/file.py:attr'")
    return where, attr


def _import_file(path: str, spec: str) -> Any:
    if not os.path.isfile(path):
        raise ModelSpecError(f"model spec {spec!r}: no such file {path!r}")
    name = "_prunerecipe_model_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ModelSpecError(f"model spec {spec!r}: cannot import {path!r} as Python")
    module = importlib.util.module_from_spec(module_spec)
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)  # so the file can import its neighbours
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(name, None)
        raise ModelSpecError(f"model spec {spec!r}: importing {path!r} raised {type(exc).__name__}: {exc}") from exc
    finally:
        if sys.path and sys.path[0] == folder:
            sys.path.pop(0)
    return module


def _import_module(name: str, spec: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise ModelSpecError(f"model spec {spec!r}: cannot import module {name!r} ({exc})") from exc
    except (Exception, SystemExit) as exc:
        raise ModelSpecError(f"model spec {spec!r}: importing {name!r} raised {type(exc).__name__}: {exc}") from exc


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
    where, attr = _split(spec)
    module = _import_file(where, spec) if where.endswith(".py") else _import_module(where, spec)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            hint = suggest(part, [n for n in dir(obj) if not n.startswith("_")])
            raise ModelSpecError(f"model spec {spec!r}: {where!r} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
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
