"""The compaction record: which channels of which layers a compaction removed.

A compacted model carries it as a persistent ``uint8`` buffer of UTF-8 JSON on its root
module, ``__prunerecipe_compaction__``, so every state_dict of it (``.pt`` or
``.safetensors``) carries it too, without pickled code. Loading such a state_dict into a
freshly built model (:func:`shrunk_to_fit`, called by ``load_pruned_state_dict``) first
removes the same channels from the fresh model, then loads.

The JSON::

    {"format": "prunerecipe-compaction", "version": 1,
     "modules": {"layer1.0.conv1": {"type": "Conv2d", "out": {"size": 64, "removed": [0, 5, ...]},
                                    "in": {"size": 64, "removed": [...]}}, ...},
     "config": {"intermediate_size": 128}}

Sizes and indices are those of the model as first built, before any compaction.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..text import listing
from ..torchprune import ModelSnapshot
from .graph import layer_pruner

RECORD_KEY = "__prunerecipe_compaction__"
FORMAT = "prunerecipe-compaction"
VERSION = 1
DIMS = ("out", "in")

Record = dict[str, Any]


def encode(record: Record) -> torch.Tensor:
    """The record as a ``uint8`` tensor of compact, key-sorted UTF-8 JSON."""
    data = json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return torch.tensor(list(data), dtype=torch.uint8)


def decode(tensor: torch.Tensor, where: str = "checkpoint") -> Record:
    """Read a record back, checking its shape.

    Raises:
        CheckpointError: not a prunerecipe compaction record of a known version.
    """
    try:
        if tensor.dtype != torch.uint8 or tensor.dim() != 1:
            raise ValueError(f"a {tensor.dtype} tensor of shape {tuple(tensor.shape)}, not 1-D uint8")
        record = json.loads(bytes(tensor.tolist()).decode("utf-8"))
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ValueError("not a prunerecipe compaction record")
        if record.get("version") != VERSION:
            raise ValueError(f"record version {record.get('version')!r}; this prunerecipe reads version {VERSION}")
        modules = record.get("modules")
        if not isinstance(modules, dict):
            raise ValueError("'modules' is not a mapping")
        for name, entry in modules.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
                raise ValueError(f"entry {name!r} is malformed")
            for dim in DIMS:
                part = entry.get(dim)
                if part is None:
                    continue
                size, removed = (part.get("size"), part.get("removed")) if isinstance(part, dict) else (None, None)
                if not _index(size) or not isinstance(removed, list) or not all(_index(i) and 0 <= i < size for i in removed):
                    raise ValueError(f"entry {name!r}.{dim} is malformed")
        if not isinstance(record.get("config", {}), dict):
            raise ValueError("'config' is not a mapping")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where}: {RECORD_KEY} is unreadable: {exc}") from None
    except RecursionError:
        raise CheckpointError(f"{where}: {RECORD_KEY} is unreadable: nested too deeply") from None
    return record


def _index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def current(model: nn.Module) -> Record | None:
    """The record ``model`` carries, or None when it was never compacted: its root's, with
    the records of submodules compacted on their own folded in (names prefixed)."""
    tensor = model._buffers.get(RECORD_KEY)
    root = None if tensor is None else decode(tensor, "model")
    nested = [
        (name, decode(sub._buffers[RECORD_KEY], f"model ({name})"))
        for name, sub in model.named_modules()
        if sub is not model and RECORD_KEY in sub._buffers
    ]
    try:
        return combined(root, nested)
    except ValueError as exc:
        raise CheckpointError(f"model: {RECORD_KEY} records disagree: {exc}") from None


def combined(root: Record | None, nested: list[tuple[str, Record]]) -> Record | None:
    """One record of a root's and its submodules' (``(qualified name, record)``), each layer's
    removals composed in the order they were made (a later record counts from the channels an
    earlier one left).

    Raises:
        ValueError: two records of one layer that do not follow each other.
    """
    if not nested:
        return root
    modules: dict[str, Any] = {k: {**v} for k, v in (root or {}).get("modules", {}).items()}
    config: dict[str, Any] = dict((root or {}).get("config", {}))
    for prefix, part in nested:
        for name, entry in part["modules"].items():
            full = f"{prefix}.{name}"
            mine = modules.setdefault(full, {"type": entry["type"]})
            for dim in DIMS:
                if entry.get(dim) is not None:
                    mine[dim] = entry[dim] if mine.get(dim) is None else _compose(mine[dim], entry[dim], f"{full}.{dim}")
        config = {**part.get("config", {}), **config}
    out: Record = {"format": FORMAT, "version": VERSION, "modules": modules}
    if config:
        out["config"] = config
    return out


def _compose(a: dict[str, Any], b: dict[str, Any], where: str) -> dict[str, Any]:
    """Two removals from one layer dimension as one, whichever was made first."""
    for first, then in ((a, b), (b, a)):
        kept = [i for i in range(first["size"]) if i not in set(first["removed"])]
        if len(kept) == then["size"]:
            return {"size": first["size"], "removed": sorted(set(first["removed"]) | {kept[i] for i in then["removed"]})}
    raise ValueError(f"{where}: {a['size']} channels less {len(a['removed'])}, and {b['size']} less {len(b['removed'])}")


def attach(model: nn.Module, record: Record) -> None:
    """Register (or replace) the record buffer on ``model``'s root module; records of submodules,
    folded into it (:func:`current`), are dropped, so that a state_dict carries one record."""
    for sub in model.modules():
        if sub is not model and RECORD_KEY in sub._buffers:
            del sub._buffers[RECORD_KEY]
    model.register_buffer(RECORD_KEY, encode(record), persistent=True)


def merged(previous: Record | None, removals: Mapping[str, tuple[str, Mapping[str, tuple[int, list[int]]]]], config: Mapping[str, Any]) -> Record:
    """A record of ``previous`` plus this compaction's ``removals`` (``{module: (type, {dim:
    (size now, removed indices now)})}``), indices mapped back to the model as first built."""
    modules: dict[str, Any] = {k: {**v} for k, v in (previous or {}).get("modules", {}).items()}
    for name, (type_name, dims) in removals.items():
        entry = modules.setdefault(name, {"type": type_name})
        for dim, (size, removed) in dims.items():
            if not removed:
                continue
            part = entry.get(dim)
            if part is None:
                entry[dim] = {"size": size, "removed": sorted(removed)}
                continue
            kept = [i for i in range(part["size"]) if i not in set(part["removed"])]
            if len(kept) != size:
                raise ValueError(f"{name}.{dim}: the record says {len(kept)} channels are left, the model has {size}")
            entry[dim] = {"size": part["size"], "removed": sorted(set(part["removed"]) | {kept[i] for i in removed})}
    out: Record = {"format": FORMAT, "version": VERSION, "modules": modules}
    config_changes = {**(previous or {}).get("config", {}), **config}
    if config_changes:
        out["config"] = config_changes
    return out


def leave_out_of_save_pretrained(model: nn.Module) -> None:
    """For a Hugging Face model whose config describes its compacted shapes: ``save_pretrained``
    leaves the record out (``from_pretrained`` builds the right shapes from the config, and
    would report the record as an unexpected key). A new set is assigned, so that a snapshot
    taken before puts the old one back."""
    vars(model)["_keys_to_ignore_on_save"] = set(getattr(model, "_keys_to_ignore_on_save", None) or ()) | {RECORD_KEY}


def _find(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    for key in (RECORD_KEY, "module." + RECORD_KEY):  # DataParallel/DDP checkpoints carry the prefix
        if key in state_dict:
            return key
    return None


def _records(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[tuple[nn.Module, str]]:
    """``(submodule, key)`` for every compaction record below the root's: a compacted
    submodule (``net.__prunerecipe_compaction__``) carries its own."""
    out = []
    for key in state_dict:
        if key.endswith("." + RECORD_KEY):
            prefix = key[: -len(RECORD_KEY) - 1]
            for candidate in (prefix, prefix.removeprefix("module.")):
                try:
                    sub = model.get_submodule(candidate)
                except AttributeError:
                    continue
                if sub is not model:
                    out.append((sub, key))
                break
    return out


@contextlib.contextmanager
def shrunk_to_fit(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Iterator[Mapping[str, torch.Tensor]]:
    """Shrink ``model`` to the compaction ``state_dict`` records, for the duration of a load.

    A state_dict without a record is passed through and nothing changes. With one, every
    recorded layer of the freshly built ``model`` loses the recorded channels (a model
    already compacted this way is left as it is), its Hugging Face config takes the recorded
    sizes, and it carries the record from then on. If the ``with`` body raises, all of it is
    undone.

    Raises:
        CheckpointError: the record does not fit the model (missing layers, other types or
            sizes, a model compacted differently); nothing was changed.
    """
    key = _find(state_dict)
    if key is None:
        nested = _records(model, state_dict)
        if not nested:
            yield state_dict
            return
        with contextlib.ExitStack() as stack:  # each compacted submodule shrinks by its own record
            for sub, sub_key in nested:
                stack.enter_context(shrunk_to_fit(sub, {RECORD_KEY: state_dict[sub_key]}))
            yield state_dict
        return
    record = decode(state_dict[key])
    nested = _records(model, state_dict)
    if nested:  # written before records were folded into the root's: fold them now
        try:
            record = combined(record, [(_module_name(model, sub), decode(state_dict[k], k)) for sub, k in nested]) or record
        except ValueError as exc:
            raise CheckpointError(f"checkpoint: its {RECORD_KEY} records disagree: {exc}") from None
        state_dict = {k: v for k, v in state_dict.items() if k not in {k for _, k in nested}}
        state_dict[key] = encode(record)
    mine = model._buffers.get(RECORD_KEY)
    if mine is not None:
        if decode(mine, "model") != record:
            raise CheckpointError(f"checkpoint does not fit the model: the model was compacted differently ({RECORD_KEY} differs)")
        yield state_dict
        return
    todo = _plan(model, record)
    config = getattr(model, "config", None)
    saved_config = {k: getattr(config, k) for k in record.get("config", {}) if config is not None and hasattr(config, k)}
    snapshot = ModelSnapshot([model] + [module for module, _, _ in todo])
    try:
        remove_channels(todo)
        if config is not None and record.get("config"):
            for k, v in record["config"].items():
                setattr(config, k, v)
            leave_out_of_save_pretrained(model)
        attach(model, record)
        yield state_dict
    except BaseException:
        snapshot.restore()
        for k, v in saved_config.items():
            setattr(config, k, v)
        raise


def without_prefix(tensor: torch.Tensor, prefix: str) -> torch.Tensor:
    """A root record whose module names lose ``prefix`` (``"model."``): the record of a wrapper
    (a LightningModule holding the network as ``self.model``) for the network alone. Names
    outside the prefix are kept (and then named as not fitting)."""
    record = decode(tensor)
    modules = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in record["modules"].items()}
    return encode({**record, "modules": modules})


def _module_name(model: nn.Module, sub: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is sub)


def remove_channels(todo: list[tuple[nn.Module, str, list[int]]]) -> None:
    """Remove channels from layers, in place: ``(module, "out" | "in", indices)`` each, with
    torch-pruning's layer pruners (new parameters and buffers are assigned, none is written
    in place, so a :class:`~prunerecipe.torchprune.ModelSnapshot` taken before undoes it)."""
    for module, dim, removed in todo:
        if removed:
            pruner = layer_pruner(module)
            frozen = {name for name, p in module.named_parameters(recurse=False) if not p.requires_grad}
            (pruner.prune_out_channels if dim == "out" else pruner.prune_in_channels)(module, sorted(removed))
            for name, p in module.named_parameters(recurse=False):  # its new parameters are trainable: keep frozen ones frozen
                if name in frozen:
                    p.requires_grad_(False)


def _plan(model: nn.Module, record: Record) -> list[tuple[nn.Module, str, list[int]]]:
    """What to remove from which layer, checked against the model before anything changes."""
    problems = []
    todo = []
    for name, entry in record["modules"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: no such module")
            continue
        if type(module).__name__ != entry["type"]:
            problems.append(f"{name}: the record says {entry['type']}, the model has {type(module).__name__}")
            continue
        pruner = layer_pruner(module)
        if pruner is None:
            problems.append(f"{name}: a {type(module).__name__} cannot be shrunk")
            continue
        for dim in DIMS:
            part = entry.get(dim)
            if part is None:
                continue
            now = int(pruner.get_out_channels(module) if dim == "out" else pruner.get_in_channels(module))
            if now == part["size"]:
                todo.append((module, dim, list(part["removed"])))
            elif now != part["size"] - len(part["removed"]):
                problems.append(f"{name}: {now} {dim}put channels, the record says {part['size']} before compaction")
    if problems:
        raise CheckpointError("checkpoint does not fit the model: " + listing("its compaction record names", problems))
    return todo
