"""Reading state_dicts from every kind of checkpoint people have, without running any code:
``.pt``/``.pth``/``.bin`` and Lightning ``.ckpt`` (``torch.load(weights_only=True)``),
``.safetensors``, sharded ``*.safetensors.index.json``, and Hugging Face model folders."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..errors import CheckpointError, problem
from ..text import clip, listing
from ..torchprune import MASK, ORIG

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
#: ``__metadata__`` key of a safetensors file: tied names stored once, as ``{alias: stored name}``
TIED_METADATA = "prunerecipe.tied"
#: files of a Hugging Face model folder that hold weights, in the order they are looked for
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _fail(path: str, message: str) -> CheckpointError:
    return CheckpointError(problem(message, source=path, code="checkpoint"))


def suffix_of(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def is_hf_folder(path: str) -> bool:
    """Whether ``path`` is a folder holding a Hugging Face ``config.json``."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def weights_file(folder: str) -> str | None:
    """The file of ``folder`` that holds its weights (or the shard index), if any."""
    for name in HF_WEIGHTS:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a state_dict from any checkpoint prunerecipe reads, without running code from it.

    ``.pt``/``.pth``/``.bin`` and Lightning ``.ckpt`` files are read with
    ``torch.load(weights_only=True)`` only; a ``{"state_dict": ...}`` wrapper is unwrapped, and
    masks that prunerecipe's Lightning callback kept in a ``.ckpt`` come back as
    ``*_orig``/``*_mask`` entries. ``.safetensors`` files, shard indexes
    (``*.safetensors.index.json``) and Hugging Face model folders are read too. Tensors that a
    safetensors file stores once for several tied names are listed under every name.

    Args:
        path: a checkpoint file, a shard index, or a model folder.

    Returns:
        ``{name: tensor}`` on the CPU.

    Raises:
        CheckpointError: missing, truncated, tampered or code-carrying files, or no state_dict inside.

    Example:
        >>> state = read_state_dict("lenet-pruned.pt")  # doctest: +SKIP
    """
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise _fail(path, "no such file or folder")
    if os.path.isdir(path):
        found = weights_file(path)
        if found is None:
            what = "a Hugging Face model folder" if is_hf_folder(path) else "a folder"
            raise _fail(path, f"is {what} without weights (none of {', '.join(HF_WEIGHTS)})")
        return read_state_dict(found)
    if path.endswith(".index.json"):
        return _read_sharded(path)
    return _read_file(path)


def _read_file(path: str) -> dict[str, torch.Tensor]:
    """One weights file (a shard index's shards too: never a folder or another index)."""
    if not os.path.lexists(path):
        raise _fail(path, "no such file")
    if os.path.isdir(path):
        raise _fail(path, "is a folder, not a weights file")
    if not os.path.isfile(path):  # a device (/dev/zero would be read without end) or a pipe
        raise _fail(path, "is not a regular file (a device, a pipe or a dangling link?)")
    suffix = suffix_of(path)
    if suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path)
    if suffix in TORCH_SUFFIXES:
        return _as_state_dict(_torch_load(path), path)
    raise _fail(
        path, f"unsupported checkpoint type {suffix or '(no suffix)'!r}; use .pt, .pth, .bin, .ckpt, .safetensors, a shard index or a model folder"
    )


def _torch_load(path: str) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on pickle protocols: we report what matters
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        code = _code_reference(path)
        if code is not None and _numpy_data(code):
            raise _fail(
                path,
                f"holds numpy data ({clip(code, 60)}), which torch.load(weights_only=True) does not read: "
                "save torch tensors instead (torch.from_numpy). Nothing in it was run.",
            ) from exc
        if code is not None:
            module, _, name = code.rpartition(".")
            whole = (
                " (a pickled object, not a state_dict: save model.state_dict() instead)"
                if module.startswith("torch.nn.") or module.startswith("lightning") or name[:1].isupper()
                else ""
            )
            raise _fail(
                path,
                f"refused to load: the file references code ({clip(code, 60)}), not only tensors and plain containers{whole}. Nothing in it was run.",
            ) from exc
        lines = [line.strip() for line in str(exc).splitlines() if line.strip() and "Weights only load failed" not in line]
        detail = next((line for line in lines if "Unsupported" in line or "GLOBAL" in line), lines[0] if lines else "")
        raise _fail(path, f"not a readable torch checkpoint, perhaps truncated or corrupted ({clip(detail, 120)})") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError, TypeError, AttributeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise _fail(path, f"not a readable torch checkpoint, perhaps truncated or corrupted ({type(exc).__name__}: {clip(first, 120)})") from exc


#: of ``builtins``, only data types: ``exec``, ``eval``, ``getattr``, ``__import__`` are code
_SAFE_BUILTINS = {"set", "frozenset", "bytearray", "bytes", "slice", "complex", "int", "float", "str", "tuple", "list", "dict", "bool", "range"}


def _numpy_data(name: str) -> bool:
    """Whether a pickle global is one of numpy's array, scalar or dtype constructors (data,
    which torch's weights-only loader still does not read)."""
    module, _, attr = name.rpartition(".")
    if module == "numpy.dtypes":
        return True
    return module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray") and attr in ("_reconstruct", "scalar", "ndarray", "dtype")


@functools.lru_cache(maxsize=1)
def _data_globals() -> frozenset[str]:
    """``module.name`` of the globals ``torch.load(weights_only=True)`` accepts (torch's own
    allowlist, and what ``torch.serialization.add_safe_globals`` added): tensors, storages,
    dtypes, plain containers. Anything else a pickle names is why torch refused it."""
    names = {"collections.OrderedDict", "collections.Counter", "_codecs.encode"}
    try:
        from torch import _weights_only_unpickler

        names.update(_weights_only_unpickler._get_allowed_globals())
    except (ImportError, AttributeError):  # a torch without the private table: every torch.* counts as data
        names.add("torch.*")
    for g in getattr(torch.serialization, "get_safe_globals", list)():
        obj = g[0] if isinstance(g, tuple) else g
        names.add(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', ''))}")
    return frozenset(names)


#: pickles at the start of torch's legacy format: magic number, protocol, system info, the
#: data, the storage keys (raw storage bytes follow)
_LEGACY_PICKLES = 5


def _code_reference(path: str) -> str | None:
    """The first global a pickle refers to outside torch's and Python's data types, found by
    reading its opcodes (``pickletools``: nothing is constructed or run); None if there is none.
    Every pickle of the file is read: torch's legacy format holds several, one after another."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                data = zf.read(name) if name else b""
        else:
            with open(path, "rb") as fh:
                data = fh.read(64 << 20)
        stream = io.BytesIO(data)
        for _ in range(_LEGACY_PICKLES):  # then raw tensor bytes, which are not opcodes
            start = stream.tell()
            if start >= len(data):
                break
            found = _first_code(stream)
            if found is not None:
                return found
            if stream.tell() == start:
                break
    except Exception:  # not a pickle we can read (or past the last one): the caller reports it as unreadable
        return None
    return None


def _first_code(stream: io.BytesIO) -> str | None:
    """Read one pickle's opcodes from ``stream`` (up to its STOP); the first code it names."""
    strings: list[str] = []
    for op, arg, _ in pickletools.genops(stream):
        if isinstance(arg, str):
            strings.append(arg)
        if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
            module, _, name = arg.partition(" ")
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            module, name = strings[-2], strings[-1]
        else:
            continue
        if module in ("builtins", "__builtin__"):  # pickle protocol 2 spells it __builtin__
            if name not in _SAFE_BUILTINS:
                return f"builtins.{name}"
            continue
        full, known = f"{module}.{name}", _data_globals()
        if full not in known and not ("torch.*" in known and module.split(".")[0] == "torch"):
            return full
    return None


@contextlib.contextmanager
def utf8_path(path: str) -> Iterator[str]:
    """``path`` as safetensors can open it. Its Rust code takes only UTF-8 paths, and a Linux
    path may be any bytes: such a file is opened here and named by its ``/proc/self/fd`` entry
    (UTF-8) while the caller opens it (an open memory map outlives the descriptor)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        fd = os.open(path, os.O_RDONLY)
        try:
            proc = f"/proc/self/fd/{fd}"
            yield proc if os.path.exists(proc) else path
        finally:
            os.close(fd)
    else:
        yield path


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise _fail(path, "reading .safetensors needs the 'safetensors' package: pip install 'prunerecipe[hf]'") from None
    try:
        out: dict[str, torch.Tensor] = {}
        with utf8_path(path) as openable, safe_open(openable, "pt", device="cpu") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[key] = fh.get_tensor(key).clone()  # a copy: not a view over the file's memory map
            meta = fh.metadata() or {}
    except Exception as exc:
        raise _fail(path, f"not a readable safetensors file ({type(exc).__name__}: {clip(str(exc), 120)})") from exc
    tied = meta.get(TIED_METADATA)
    if tied:
        try:
            for alias, stored in json.loads(tied).items():
                if not isinstance(stored, str):
                    raise ValueError(alias)
                if stored in out and alias not in out:
                    out[alias] = out[stored]
        except (ValueError, AttributeError, TypeError):
            raise _fail(path, f"its {TIED_METADATA!r} metadata is not valid") from None
    return out


def read_index(path: str) -> tuple[dict[str, str], list[str]]:
    """A shard index's ``weight_map`` (tensor name -> shard file) and its shard files (sorted),
    each checked to be a plain file name in the index's own folder."""
    try:
        with open(path, encoding="utf-8") as fh:
            index = json.load(fh)
        weight_map = index["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _fail(path, f"not a readable shard index ({type(exc).__name__}: {clip(str(exc), 100)})") from exc
    for shard in shards:
        plain = isinstance(shard, str) and os.path.basename(shard) == shard and shard not in ("", ".", "..")
        if not plain:
            raise _fail(path, f"shard {clip(str(shard), 60)!r} is not a file name in this folder")
        if suffix_of(shard) not in (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES) or shard.endswith(".index.json"):
            raise _fail(path, f"shard {clip(shard, 60)!r} is not a weights file (.safetensors, .bin, .pt, .pth, .ckpt)")
    return {str(k): v for k, v in weight_map.items()}, shards


def _read_sharded(path: str) -> dict[str, torch.Tensor]:
    weight_map, shards = read_index(path)
    folder = os.path.dirname(os.path.abspath(path))
    out: dict[str, torch.Tensor] = {}
    seen: dict[str, str] = {}
    twice = []
    for shard in shards:
        part = _read_file(os.path.join(folder, shard))
        twice += [f"{k} ({seen[k]}, {shard})" for k in part if k in seen]
        seen.update(dict.fromkeys(part, shard))
        out.update(part)
    if twice:  # loaders disagree on which copy wins (transformers takes another one than the index names)
        raise _fail(path, listing("tensors stored in two shards", twice))
    missing = [k for k in weight_map if k not in out]
    if missing:
        raise _fail(path, listing("the index names tensors its shards lack", missing))
    return out


def _as_state_dict(data: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(data, Mapping) and not _all_tensors(data):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = data.get(key)
            if isinstance(inner, Mapping) and _all_tensors(inner):
                return _check_values(_with_callback_masks(dict(inner), data), path)
    if isinstance(data, Mapping) and _all_tensors(data):
        return _check_values(dict(data), path)
    raise _fail(path, f"holds a {type(data).__name__}, not a state_dict (a mapping of names to tensors)")


def _all_tensors(data: Mapping[Any, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items())


def _callback_masks(checkpoint: Mapping[str, Any]) -> Iterator[Mapping[str, torch.Tensor]]:
    """Masks that prunerecipe's Lightning callback keeps in a checkpoint's callback states."""
    callbacks = checkpoint.get("callbacks")
    if not isinstance(callbacks, Mapping):
        return
    for state in callbacks.values():
        if isinstance(state, Mapping) and "pruner" in state and isinstance(state.get("masks"), Mapping) and _all_tensors(state["masks"]):
            yield state["masks"]


def _with_callback_masks(state: dict[str, torch.Tensor], checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A Lightning state_dict holds plain masked weights; where the callback kept a parameter's
    mask, list it as ``X_orig``/``X_mask`` so the pruning comes back with the weights."""
    for masks in _callback_masks(checkpoint):
        for name, mask in masks.items():
            if name in state and name + ORIG not in state and tuple(mask.shape) == tuple(state[name].shape):
                state[name + ORIG] = state.pop(name)
                state[name + MASK] = mask
    return state


def _check_values(state: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    empty = [k for k, v in state.items() if v.device.type == "meta"]
    if empty:
        raise _fail(path, listing("tensors without data (meta device)", empty))
    sparse = [f"{k} ({str(v.layout).replace('torch.', '')})" for k, v in state.items() if v.layout != torch.strided]
    if sparse:
        raise _fail(path, listing("tensors that are not dense (prunerecipe reads dense weights; .to_dense() them)", sparse))
    return state
