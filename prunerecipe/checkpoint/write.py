"""Writing pruned models: ``torch`` (``*_orig``/``*_mask``, resumable), ``dense`` (masks folded,
a plain state_dict) and ``hf`` (a folder ``from_pretrained`` loads), each atomically."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..errors import CheckpointError, problem
from ..structured.hfconfig import mismatches
from ..structured.record import RECORD_KEY
from ..torchprune import MASK, ORIG, fold_state_dict, pruned_keys
from . import hf
from .files import atomic_file, atomic_folder
from .read import SAFETENSORS_SUFFIX, TIED_METADATA, TORCH_SUFFIXES, suffix_of

FORMATS = ("torch", "dense", "hf")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5000000000 (``GiB`` for powers of two), as Hugging Face reads ``max_shard_size``."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise CheckpointError(problem(f"{text!r} is not a size; write e.g. 5GB, 500MB or 2GiB", source="--max-shard-size", code="usage"))
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def output_suffix(path: str, fmt: str) -> None:
    """Refuse a file suffix the format cannot write (a folder for ``hf``)."""
    suffix = suffix_of(path)
    if fmt == "hf":
        if suffix in TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,):
            raise CheckpointError(
                problem(f"--format hf writes a folder; {os.path.basename(path)!r} looks like a file name", source=path, code="output")
            )
    elif suffix not in TORCH_SUFFIXES[:3] + (SAFETENSORS_SUFFIX,):
        raise CheckpointError(
            problem(
                f"unsupported output type {suffix or '(no suffix)'!r}; use .pt, .pth, .bin or .safetensors (or --format hf for a folder)",
                source=path,
                code="output",
            )
        )


def _stored_once(state: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in state.items() if k not in aliases}


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    aliases: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a state_dict atomically: a temp file beside ``path``, then a rename.

    Tensors that are the same object under several names (tied weights) are stored once:
    ``torch.save`` shares their storage; a ``.safetensors`` file keeps the first name and lists
    the others in its metadata, and :func:`~prunerecipe.checkpoint.read_state_dict` gives them back.

    Args:
        state_dict: what to write (tensors are detached).
        path: ``.pt``/``.pth``/``.bin`` (``torch.save``) or ``.safetensors``.
        force: replace an existing file (its mode is kept); without it an existing file is an error.
        aliases: ``{alias: stored name}`` of tied names, when known (else found by identity).
        metadata: extra string metadata for a ``.safetensors`` file.

    Returns:
        None.

    Raises:
        CheckpointError: the file exists (without ``force``), the folder is missing, or the
            suffix is unknown. A failed write leaves no partial file.

    Example:
        >>> save_state_dict(model.state_dict(), "pruned.pt", force=True)  # doctest: +SKIP
    """
    path = os.fspath(path)
    output_suffix(path, "torch")
    if aliases is None:
        first: dict[tuple[Any, ...], str] = {}
        aliases = {}
        for key, value in state_dict.items():
            ident = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride()) if value.numel() else (key,)
            if ident in first:
                aliases[key] = first[ident]
            else:
                first[ident] = key
    with atomic_file(path, force=force) as tmp:
        if suffix_of(path) == SAFETENSORS_SUFFIX:
            try:
                from safetensors.torch import save_file
            except ImportError:
                raise CheckpointError(
                    problem("writing .safetensors needs the 'safetensors' package: pip install 'prunerecipe[hf]'", source=path, code="output")
                ) from None
            meta = dict(metadata or {})
            if aliases:
                meta[TIED_METADATA] = json.dumps(dict(aliases))
            save_file({k: v.contiguous() for k, v in _stored_once(state_dict, aliases).items()}, tmp, metadata=meta or None)
        else:
            with open(tmp, "wb") as fh:
                torch.save({k: v.detach() for k, v in state_dict.items()}, fh)


def summary(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, fmt: str, recipe_text: str | None, recipe_source: str | None, targets: list[str] | None
) -> dict[str, Any]:
    """What an output says about itself: versions, the recipe, per-tensor and global sparsity.
    The global figure counts the recipe's targets (each once), or every floating-point weight."""
    rows = [(name, shape, zeros) for name, shape, zeros, _ in state_dict_sparsity(state)]
    return summary_of(rows, fmt=fmt, recipe_text=recipe_text, recipe_source=recipe_source, targets=targets)


def summary_of(
    rows: list[tuple[str, tuple[int, ...], int]], *, fmt: str, recipe_text: str | None, recipe_source: str | None, targets: list[str] | None
) -> dict[str, Any]:
    """:func:`summary` from ``(name, shape, zero entries)`` per floating-point tensor (tied
    tensors once), however they were counted (in memory, or tensor by tensor while streaming)."""
    table = {name: (shape, zeros) for name, shape, zeros in rows}
    tensors = {name: {"shape": list(shape), "zeros": zeros, "sparsity": zeros / max(1, _numel(shape))} for name, (shape, zeros) in table.items()}
    counted = [n for n in (targets or table) if n in table]
    numel = sum(_numel(table[n][0]) for n in counted)
    zeros = sum(table[n][1] for n in counted)
    return {
        "prunerecipe": __version__,
        "torch": torch.__version__,
        "format": fmt,
        "recipe_source": recipe_source,
        "recipe": recipe_text,
        "global": {
            "over": "recipe targets" if targets else "all floating-point tensors",
            "numel": numel,
            "zeros": zeros,
            "sparsity": zeros / numel if numel else 0.0,
        },
        "tensors": tensors,
    }


def dense_metadata(info: Mapping[str, Any], aliases: Mapping[str, str]) -> dict[str, str]:
    """A ``dense`` safetensors file's ``__metadata__``: the summary without its per-tensor table,
    and the tied names stored once."""
    meta = {"prunerecipe": json.dumps({k: v for k, v in info.items() if k != "tensors"}, separators=(",", ":"))}
    if aliases:
        meta[TIED_METADATA] = json.dumps(dict(aliases))
    return meta


def wrote_line(path: str, fmt: str, model: nn.Module, sparsity: float, files: int = 1) -> str:
    """The last line of ``apply``: what was written and how to load it (``dense`` and ``hf``)."""
    if fmt == "dense":
        how = (
            f"model.load_state_dict(torch.load({path!r}, weights_only=True))"
            if suffix_of(path) != SAFETENSORS_SUFFIX
            else f"model.load_state_dict(prunerecipe.read_state_dict({path!r}))"
        )
        if RECORD_KEY in dict(model.named_buffers()):
            how = f"prunerecipe.load_pruned_state_dict(model, prunerecipe.read_state_dict({path!r})) (it shrinks a freshly built model by the compaction record)"
            return f"wrote {path}: compacted dense state_dict ({_size(path)}); load with {how}"
        return f"wrote {path}: dense state_dict, masks folded in ({_size(path)}, {sparsity:.2%} of the pruned weights are 0); load with {how}"
    auto = _auto_class(model)
    return f"wrote {path}/: Hugging Face folder, {files} safetensors file(s) ({_size(path)}); load with transformers.{auto}.from_pretrained({path!r})"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_output(
    model: nn.Module,
    path: str,
    *,
    fmt: str,
    force: bool = False,
    source: str | None = None,
    recipe_text: str | None = None,
    recipe_source: str | None = None,
    targets: list[str] | None = None,
    max_shard_size: str | int = "5GB",
) -> str:
    """Write a pruned model in one of :data:`FORMATS` and say, in one line, how to load it.

    Args:
        model: the model, pruned (masks kept or finalized).
        path: a file (``torch``, ``dense``) or a folder (``hf``).
        fmt: ``torch`` (``*_orig``/``*_mask``, resumable with ``load_pruned_state_dict``),
            ``dense`` (masks folded in: a plain state_dict, pruned entries exactly 0) or ``hf``
            (a Hugging Face folder: config, safetensors shards, ``prunerecipe.json``).
        force: replace an existing output.
        source: the input Hugging Face folder (its tokenizer and generation files are copied).
        recipe_text, recipe_source: the recipe, recorded in what is written.
        targets: the names the recipe pruned (the global sparsity counts these).
        max_shard_size: the largest ``hf`` shard (``"5GB"``, ``"500MB"``, or bytes).

    Returns:
        One line: what was written and how to load it.

    Raises:
        CheckpointError: a bad format, location or size; nothing is written then.

    Example:
        >>> write_output(model, "gpt2-pruned", fmt="hf", source="gpt2-folder")  # doctest: +SKIP
        "wrote gpt2-pruned/: Hugging Face folder, ...; load with transformers.AutoModelForCausalLM.from_pretrained('gpt2-pruned')"
    """
    if fmt not in FORMATS:
        raise CheckpointError(problem(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}", source="--format", code="usage"))
    output_suffix(path, fmt)
    config = getattr(model, "config", None)
    if fmt == "hf" and (config is None or not hasattr(config, "to_json_file")):  # before any folder exists
        raise CheckpointError(
            problem(
                f"format hf needs a Hugging Face model (one with a transformers config); {type(model).__name__} has none", source=path, code="output"
            )
        )
    state = model.state_dict(keep_vars=True)
    aliases = hf.tied_aliases(model, list(state))
    plain = {k: v.detach() for k, v in state.items()}
    compacted = RECORD_KEY in plain
    if fmt == "hf" and compacted:
        differ = mismatches(model)
        if differ:
            raise CheckpointError(
                problem(
                    f"--format hf: the compacted model's layers no longer match what its config describes ({', '.join(differ[:3])}"
                    f"{', ...' if len(differ) > 3 else ''}), so from_pretrained could not load it; write --format dense or torch "
                    "(both keep the compaction record: prunerecipe.load_pruned_state_dict(model, prunerecipe.read_state_dict(path)) loads them)",
                    source=path,
                    code="output",
                )
            )
        del plain[RECORD_KEY]  # the config describes the shapes: from_pretrained needs nothing else
    if fmt == "torch":
        save_state_dict(plain, path, force=force, aliases=aliases)
        load = f"prunerecipe.load_pruned_state_dict(model, prunerecipe.read_state_dict({path!r}))"
        if any(k.endswith(ORIG) for k in plain):
            return f"wrote {path}: pruned state_dict with *_orig/*_mask ({_size(path)}); resume with {load}"
        if compacted:
            return f"wrote {path}: compacted state_dict with its compaction record ({_size(path)}); load into a freshly built model with {load}"
        return f"wrote {path}: state_dict, masks folded in ({_size(path)}); load with model.load_state_dict(torch.load({path!r}, weights_only=True))"
    dense = fold_state_dict(plain)
    info = summary(
        model, {k: v for k, v in dense.items() if k not in aliases}, fmt=fmt, recipe_text=recipe_text, recipe_source=recipe_source, targets=targets
    )
    if fmt == "dense":
        save_state_dict(dense, path, force=force, aliases=aliases, metadata=dense_metadata(info, {}))  # it adds the tied names itself
        return wrote_line(path, fmt, model, info["global"]["sparsity"])
    with atomic_folder(path, force=force) as tmp:
        files = hf.write_folder(
            tmp, model, {k: v for k, v in dense.items() if k not in aliases}, source=source, summary=info, max_shard_bytes=parse_size(max_shard_size)
        )
    return wrote_line(path, fmt, model, info["global"]["sparsity"], len(files))


def _auto_class(model: nn.Module) -> str:
    """The loader to name: an Auto class for the usual heads, else the model's own class."""
    name = type(model).__name__
    for suffix, auto in (
        ("ForCausalLM", "AutoModelForCausalLM"),
        ("LMHeadModel", "AutoModelForCausalLM"),
        ("ForMaskedLM", "AutoModelForMaskedLM"),
        ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ):
        if name.endswith(suffix):
            return auto
    return name  # e.g. ViTForImageClassification, T5ForConditionalGeneration: AutoModel would drop the head


def _size(path: str) -> str:
    total = os.path.getsize(path) if os.path.isfile(path) else sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if total >= scale:
            return f"{total / scale:.1f} {unit}"
    return f"{total} bytes"


def state_dict_sparsity(state_dict: Mapping[str, torch.Tensor], names: list[str] | None = None) -> list[tuple[str, tuple[int, ...], int, bool]]:
    """``(name, shape, zero entries, masked?)`` per floating-point tensor, ``X_orig * X_mask`` folded into ``X``.

    A tensor stored under several names (tied weights) is listed once, under its first name.
    ``names`` restricts (and orders) the rows, e.g. to a model's parameter names.
    """
    masked = set(pruned_keys(state_dict))
    rows: dict[str, tuple[str, tuple[int, ...], int, bool]] = {}
    seen: set[tuple[Any, ...]] = set()
    for key, value in state_dict.items():
        if key.endswith(MASK) and key[: -len(MASK)] in masked:
            continue
        name, is_masked = (key[: -len(ORIG)], True) if key.endswith(ORIG) and key[: -len(ORIG)] in masked else (key, False)
        if not value.is_floating_point() and not is_masked:
            continue
        ident = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if value.numel() and ident in seen:
            continue
        seen.add(ident)
        if is_masked:
            alive = torch.count_nonzero(torch.logical_and(value != 0, state_dict[name + MASK] != 0)).item()
        else:
            alive = torch.count_nonzero(value).item()
        rows[name] = (name, tuple(value.shape), int(value.numel() - alive), is_masked)
    if names is not None:
        return [rows[n] for n in names if n in rows]
    return list(rows.values())
