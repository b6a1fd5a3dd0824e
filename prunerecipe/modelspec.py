"""Model specs -> an ``nn.Module``: ``pkg.module:attr``, ``path/to/file.py:attr``, or a Hugging
Face model folder (one holding ``config.json``).

A calibration spec (``apply --calibration``) names the function that yields calibration data
the same way (:func:`load_object` with its own wording and error).

Importing what a spec names runs its code, as Python's own import does: only name modules
and files you trust (``validate`` never imports them; ``plan`` and ``apply`` do). A folder's
model is built by transformers from its config; no code from the folder is run.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from typing import Any

from torch import nn

from .checkpoint import build_model, is_hf_folder, load_pruned_state_dict, read_state_dict, weights_file
from .errors import ModelSpecError, RecipeError, Terminated
from .text import clip, suggest

SPEC_FORMS = "'pkg.module:attr', 'path/to/file.py:attr' or a Hugging Face model folder"


def resolve(spec: str, base: str | None = None) -> str:
    """A spec's path part made absolute against ``base`` (a recipe's folder), when it names a
    file or a folder; ``pkg.module:attr`` specs are returned as they are."""
    where, sep, attr = spec.rpartition(":")
    if sep and not (os.path.isdir(spec) or os.path.isdir(os.path.join(base or "", spec))):
        if where.endswith(".py") and base is not None and not os.path.isabs(where):
            return os.path.join(base, where) + ":" + attr
        return spec
    return spec if os.path.isabs(spec) or base is None else os.path.join(base, spec)


def is_folder_spec(spec: str, base: str | None = None) -> bool:
    """Whether ``spec`` names a Hugging Face model folder."""
    return is_hf_folder(resolve(spec, base))


def check_spec(spec: str, base: str | None = None) -> None:
    """Refuse a model spec of no known form (before anything else is checked or loaded).

    Raises:
        ModelSpecError: neither a Hugging Face model folder nor ``pkg.module:attr`` /
            ``path/to/file.py:attr``.
    """
    if not is_folder_spec(spec, base):
        _split(spec)


def _split(spec: str, what: str = "model spec", error: type[RecipeError] = ModelSpecError) -> tuple[str, str]:
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr or not all(p.isidentifier() for p in attr.split(".")):
        if error is not ModelSpecError:
            raise error(f"{what} {clip(spec)!r} is not 'pkg.module:attr' or 'path/to/file.py:attr'")
        if os.path.isdir(spec):
            raise ModelSpecError(f"model spec {clip(spec)!r} is a folder without config.json, not a Hugging Face model folder")
        raise ModelSpecError(f"model spec {clip(spec)!r} is not {SPEC_FORMS}")
    return where, attr


@contextlib.contextmanager
def _importable(folder: str) -> Iterator[None]:
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def _import_file(path: str, spec: str, what: str, error: type[RecipeError]) -> Any:
    if not os.path.isfile(path):
        raise error(f"{what} {clip(spec)!r}: no such file {clip(path)!r}")
    name = "_prunerecipe_" + what.split()[0] + "_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise error(f"{what} {clip(spec)!r}: cannot import {clip(path)!r} as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        with _importable(os.path.dirname(os.path.abspath(path))):  # so the file can import its neighbours
            module_spec.loader.exec_module(module)
    except Terminated:
        raise
    except (Exception, SystemExit) as exc:
        sys.modules.pop(name, None)
        raise error(f"{what} {clip(spec)!r}: importing {clip(path)!r} raised {type(exc).__name__}: {clip(str(exc), 200)}") from exc
    return module


def _import_module(name: str, spec: str, base: str | None, what: str, error: type[RecipeError]) -> Any:
    try:
        # like `python -m`: the current folder (or the recipe's) is importable
        with _importable(os.path.abspath(base or os.getcwd())):
            return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise error(f"{what} {clip(spec)!r}: cannot import module {clip(name)!r} ({exc})") from exc
    except Terminated:
        raise
    except (Exception, SystemExit) as exc:
        raise error(f"{what} {clip(spec)!r}: importing {clip(name)!r} raised {type(exc).__name__}: {clip(str(exc), 200)}") from exc


def load_object(spec: str, base: str | None = None, *, what: str = "model spec", error: type[RecipeError] = ModelSpecError) -> Any:
    """The object a spec names, imported as Python's own import would (running the module's code), not called.

    Args:
        spec: ``pkg.module:attr`` or ``path/to/file.py:attr``; ``attr`` may be dotted.
        base: the folder a relative file path resolves against, and that is importable for
            ``pkg.module`` (the current folder when None).
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
    spec = resolve(spec, base)
    where, attr = _split(spec, what, error)
    module = _import_file(where, spec, what, error) if where.endswith(".py") else _import_module(where, spec, base, what, error)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            hint = suggest(part, [n for n in dir(obj) if not n.startswith("_")])
            raise error(f"{what} {clip(spec)!r}: {clip(where)!r} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    return obj


def load_model(spec: str, *, base: str | None = None, weights: bool = True, meta: bool = False) -> nn.Module:
    """Build the model a spec names.

    An ``nn.Module`` subclass or a no-argument factory is called. A Hugging Face model folder
    is built by transformers from its ``config.json`` and, with ``weights``, loaded from the
    folder's ``model.safetensors``, sharded safetensors or ``pytorch_model.bin`` (read with
    ``weights_only=True``); weights the model ties (``lm_head.weight``) may be absent.

    Args:
        spec: ``pkg.module:attr``, ``path/to/file.py:attr`` or a model folder.
        base: the folder relative paths resolve against (a recipe's own folder); the
            current folder when None. ``pkg.module`` imports find modules there too.
        weights: load a folder's weights (ignored for Python specs, which build their own).
        meta: build a folder's model on the ``meta`` device (shapes only: for ``plan``).

    Returns:
        The model.

    Raises:
        ModelSpecError: the spec is malformed, does not import, or gives no ``nn.Module``.
        CheckpointError: a folder's config or weights cannot be read or do not fit.

    Example:
        >>> load_model("prunerecipe.zoo:LeNet")  # doctest: +ELLIPSIS
        LeNet(...)
    """
    path = resolve(spec, base)
    if is_hf_folder(path):
        model = build_model(path, meta=meta)
        if weights and not meta:
            found = weights_file(path)
            if found is None:
                raise ModelSpecError(f"model folder {clip(spec)!r} has no weights (model.safetensors, its shard index, or pytorch_model.bin)")
            load_pruned_state_dict(model, read_state_dict(found))
        return model
    obj = load_object(spec, base)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ModelSpecError(f"model spec {clip(spec)!r}: {spec.rpartition(':')[2]!r} is a {type(obj).__name__}, not an nn.Module or a factory")
    try:
        model = obj()
    except Terminated:
        raise
    except (Exception, SystemExit) as exc:
        raise ModelSpecError(
            f"model spec {clip(spec)!r}: calling {spec.rpartition(':')[2]}() raised {type(exc).__name__}: {clip(str(exc), 200)}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model spec {clip(spec)!r}: {spec.rpartition(':')[2]}() returned a {type(model).__name__}, not an nn.Module")
    return model
