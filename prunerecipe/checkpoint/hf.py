"""Hugging Face model folders: building the model a folder's ``config.json`` describes, and
writing a folder that plain ``from_pretrained`` loads (``pip install 'prunerecipe[hf]'``)."""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, problem
from ..text import clip
from .hfnames import to_checkpoint_names
from .read import HF_WEIGHTS, is_hf_folder

#: files of an input folder that a written folder does not copy (it writes its own)
_NOT_COPIED = ("config.json", "prunerecipe.json")


def _fail(path: str, message: str, code: str = "model") -> CheckpointError:
    return CheckpointError(problem(message, source=path, code=code))


def _transformers(path: str) -> Any:
    try:
        import transformers
    except ImportError:
        raise _fail(path, "is a Hugging Face model folder; reading it needs transformers: pip install 'prunerecipe[hf]'") from None
    return transformers


def build_model(folder: str, *, meta: bool = False) -> nn.Module:
    """The model a folder's ``config.json`` describes, with freshly initialized weights.

    The class is the one ``architectures`` names (looked up in ``transformers`` only; no code
    from the folder is ever run), else the ``AutoModel`` that fits the config.

    Args:
        folder: a folder holding ``config.json``.
        meta: build on the ``meta`` device (shapes only: enough for ``plan``).

    Returns:
        The model, in eval mode.

    Raises:
        CheckpointError: transformers is missing, or the config cannot be read or built.
    """
    transformers = _transformers(folder)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:
        raise _fail(folder, f"config.json cannot be read by transformers ({type(exc).__name__}: {clip(str(exc), 160)})") from exc
    names = list(getattr(config, "architectures", None) or [])
    cls = next((getattr(transformers, n) for n in names if isinstance(getattr(transformers, n, None), type)), None)
    if cls is None or not issubclass(cls, transformers.PreTrainedModel):
        cls = transformers.AutoModel
    try:
        if meta:
            with torch.device("meta"):
                model = cls.from_config(config) if cls is transformers.AutoModel else cls._from_config(config)
        else:
            model = cls.from_config(config) if cls is transformers.AutoModel else cls._from_config(config)
    except Exception as exc:
        raise _fail(
            folder,
            f"transformers cannot build {'/'.join(names) or type(config).__name__} from config.json ({type(exc).__name__}: {clip(str(exc), 160)})",
        ) from exc
    model.eval()
    return model


def tied_aliases(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Among ``names`` (state_dict keys), those that are ties of another: ``{alias: source}``.

    A Hugging Face model's own declaration (``all_tied_weights_keys``) decides where it has one;
    otherwise two names of one tensor object are a tie, the first name in order its source.
    """
    declared = getattr(model, "all_tied_weights_keys", None)
    keep_vars = model.state_dict(keep_vars=True)
    out: dict[str, str] = {}
    if isinstance(declared, Mapping):
        for alias, source in declared.items():
            if alias in names and source in names and keep_vars.get(alias) is keep_vars.get(source):
                out[str(alias)] = str(source)
    first: dict[int, str] = {}
    for name in names:
        value = keep_vars.get(name)
        if value is None or name in out:
            continue
        if id(value) in first and first[id(value)] != name:
            out[name] = first[id(value)]
        else:
            first.setdefault(id(value), name)
    return out


def shard(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Names in order, in shards of at most ``max_bytes`` (a bigger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_files(count: int) -> list[str]:
    """The file names of ``count`` safetensors shards, as ``save_pretrained`` names them."""
    return ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def shard_metadata(summary: Mapping[str, Any]) -> dict[str, str]:
    """Each shard's ``__metadata__``: safetensors' format tag and the whole summary."""
    return {"format": "pt", "prunerecipe": json.dumps(summary, separators=(",", ":"))}


def write_folder_files(folder: str, model: nn.Module, source: str | None) -> None:
    """What a written folder holds besides the weights: ``config.json`` from ``model.config``,
    the generation config, and the input folder's other files (tokenizer and the like)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_file"):
        raise _fail(folder, "--format hf needs a Hugging Face model (one with a transformers config)", code="output")
    if source and is_hf_folder(source):
        for name in sorted(os.listdir(source)):
            path = os.path.join(source, name)
            weights = name in HF_WEIGHTS or name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json"))
            if os.path.isfile(path) and name not in _NOT_COPIED and not weights:
                shutil.copyfile(path, os.path.join(folder, name))
    written = copy.copy(config)  # the user's model keeps its config as it was
    # as save_pretrained does: the class that built the model, so loaders (ours, from_pretrained
    # through the Auto classes) rebuild the same head rather than the bare base model
    written.architectures = [type(model).__name__]
    written.to_json_file(os.path.join(folder, "config.json"))
    generation = getattr(model, "generation_config", None)
    if (
        generation is not None
        and not os.path.exists(os.path.join(folder, "generation_config.json"))
        and getattr(model, "can_generate", lambda: False)()
    ):
        generation.to_json_file(os.path.join(folder, "generation_config.json"))


def write_index(folder: str, files: list[str], parts: list[list[str]], total_size: int) -> None:
    """``model.safetensors.index.json`` for a sharded folder (nothing for one file)."""
    if len(parts) <= 1:
        return
    index = {"metadata": {"total_size": total_size}, "weight_map": {key: name for name, part in zip(files, parts) for key in part}}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
        json.dump(index, fh, indent=2)


def write_summary(folder: str, summary: Mapping[str, Any]) -> None:
    """``prunerecipe.json``: what the folder says about itself."""
    with open(os.path.join(folder, "prunerecipe.json"), "w", encoding="utf-8") as fh:
        fh.write(json.dumps(summary, indent=2) + "\n")


def write_folder(
    folder: str,
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    source: str | None,
    summary: Mapping[str, Any],
    max_shard_bytes: int,
) -> list[str]:
    """Fill ``folder`` (a fresh temp folder) as ``save_pretrained`` would, plus our summary:
    ``config.json`` from ``model.config``, the input folder's other files (generation config,
    tokenizer), safetensors shards with an index when sharded, and ``prunerecipe.json``.

    Args:
        folder: the (empty) folder to fill.
        model: the pruned model (its ``config`` is written).
        state: the dense state_dict to store, tied aliases already left out; stored under the
            names ``save_pretrained`` would give them (:func:`.hfnames.to_checkpoint_names`).
        source: the input model folder, whose other files are copied.
        summary: what ``prunerecipe.json`` holds (also in each shard's ``__metadata__``).
        max_shard_bytes: the largest shard.

    Returns:
        The weight files written.
    """
    from safetensors.torch import save_file

    write_folder_files(folder, model, source)
    tensors = {k: v.detach().contiguous().cpu() for k, v in to_checkpoint_names(model, state).items()}
    parts = shard({k: v.numel() * v.element_size() for k, v in tensors.items()}, max_shard_bytes)
    files = shard_files(len(parts))
    for name, part in zip(files, parts):
        save_file({k: tensors[k] for k in part}, os.path.join(folder, name), metadata=shard_metadata(summary))
    write_index(folder, files, parts, sum(t.numel() * t.element_size() for t in tensors.values()))
    write_summary(folder, summary)
    return files
