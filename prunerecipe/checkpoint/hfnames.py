"""Checkpoint names and a Hugging Face model's own names.

Since transformers 5, the names a checkpoint stores may differ from the model's parameter
names: ``from_pretrained`` renames some on loading (GPT-NeoX's ``embed_out`` becomes
``lm_head``; ViT's ``encoder.layer.N.attention.attention.query`` becomes
``layers.N.attention.q_proj``) and converts others (Mixtral's per-expert ``w1``/``w3``
matrices are stacked into one ``experts.gate_up_proj``), and ``save_pretrained`` undoes both.
prunerecipe builds such a model from its config and loads the folder's tensors itself, so it
applies the same transforms, taken from transformers (``conversion_mapping``): on reading,
checkpoint names become model names; a ``--format hf`` folder is written back in checkpoint
names, as ``save_pretrained`` would write it. Other models, and transformers releases without
these transforms, pass through unchanged.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, problem
from ..text import clip
from ..torchprune import MASK, ORIG


def _transforms(model: nn.Module, *, saving: bool) -> tuple[list[Any], list[Any]] | None:
    """transformers' renamings and converters for ``model`` (reversed for ``saving``), or None
    when it has none (not a transformers model, or a transformers without them)."""
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, getattr(transformers, "PreTrainedModel", ())):
        return None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming
    except ImportError:  # transformers 4: checkpoints are stored under the model's own names
        return None
    try:
        if saving:  # as save_pretrained reverts them (revert_weight_conversion)
            transforms = getattr(model, "_weight_conversions", None)
            if transforms is None:
                mapping = get_model_conversion_mapping(model, add_legacy=False)  # type: ignore[arg-type]
                transforms = [t for t in mapping if not isinstance(t, PrefixChange)]
            transforms = [t.reverse_transform() for t in transforms[::-1]]
        else:
            transforms = get_model_conversion_mapping(model)  # type: ignore[arg-type]
    except Exception:  # a mapping transformers cannot build for this model: names stay as they are
        return None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return (renamings, converters) if renamings or converters else None


def _suffixed(key: str) -> tuple[str, str]:
    """``(name, suffix)``: a pruned entry's ``*_orig``/``*_mask`` suffix split off."""
    for suffix in (ORIG, MASK):
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return key, ""


def _name_plan(
    model: nn.Module, keys: Iterable[str], wanted: dict[str, Any], found: tuple[list[Any], list[Any]]
) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """How each of ``keys`` fits the model: ``({key: model name}`` for a renamed key (a pruned
    entry keeps its suffix), ``{key: (first target, converter pattern)})`` for one a converter
    takes. Keys that are model names already, or that nothing turns into one, are in neither."""
    from transformers.core_model_loading import rename_source_key

    renamings, converters = found
    prefix = getattr(model, "base_model_prefix", None) or None
    renamed: dict[str, str] = {}
    converted: dict[str, tuple[str, str]] = {}
    for key in keys:
        base, suffix = _suffixed(key)
        if base in wanted:
            continue
        name, pattern = rename_source_key(base, renamings, [] if suffix else converters, prefix, wanted)
        if name not in wanted:
            continue
        if pattern is None:
            renamed[key] = name + suffix
        else:
            converted[key] = (name, pattern)
    return renamed, converted


def fitting(model: nn.Module, keys: Iterable[str], expected: Iterable[str]) -> set[str]:
    """Those of ``keys`` that name a tensor of ``model``, as they are or once transformers'
    loading transforms turn them into its names (names only: nothing is converted)."""
    keys = list(keys)
    wanted = dict.fromkeys(expected, True)
    fit = {k for k in keys if _suffixed(k)[0] in wanted}
    found = _transforms(model, saving=False)
    if found is not None:
        renamed, converted = _name_plan(model, keys, wanted, found)
        fit |= set(renamed) | set(converted)
    return fit


def to_model_names(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], expected: Iterable[str], *, convert: bool = True
) -> dict[str, torch.Tensor]:
    """``state_dict`` with checkpoint names turned into ``model``'s names, as ``from_pretrained``
    turns them.

    A key that is already one of ``expected`` stays; so does one that no transform turns into
    an expected name, and one whose model name the checkpoint holds already (the fit check
    reports them). Tensors a converter merges (a MoE layer's experts) are merged; a pruned
    entry (``*_orig``/``*_mask``) is renamed as its parameter is.

    Args:
        model: the model the checkpoint is for.
        state_dict: the checkpoint.
        expected: the model's state_dict keys (without ``*_orig``/``*_mask`` suffixes).
        convert: merge tensors a converter names; when False, their keys stay (a stream reads
            tensors one by one and refuses them).

    Returns:
        The state_dict under the model's names, in the checkpoint's order.

    Raises:
        CheckpointError: transformers fails to convert tensors it names.
    """
    found = _transforms(model, saving=False)
    if found is None:
        return dict(state_dict)
    from transformers.core_model_loading import dot_natural_key

    wanted = dict.fromkeys(expected, True)
    by_pattern = {p: c for c in found[1] for p in c.source_patterns}
    keys = sorted(state_dict, key=dot_natural_key)  # (a converter stacks experts in this order)
    renamed, converted = _name_plan(model, keys, wanted, found)
    taken = set(state_dict)
    named: dict[str, str] = {}
    for key, name in renamed.items():
        if name not in taken:  # never two tensors under one name: the fit check names the other
            named[key] = name
            taken.add(name)
    merged: dict[str, Any] = {}  # first target name -> its converter, collecting tensors
    sources: dict[str, list[str]] = {}
    if convert:
        for key, (first, pattern) in converted.items():
            merged.setdefault(first, copy.deepcopy(by_pattern[pattern])).add_tensor(first, key, pattern, state_dict[key])
            sources.setdefault(first, []).append(key)
    realized: dict[str, dict[str, torch.Tensor]] = {}
    merged_from: dict[str, str] = {}  # source key -> the first target name it goes into
    for first, converter in merged.items():
        values = _converted(model, first, converter, f"convert the checkpoint's tensors into {first}", "load")
        if any(name in taken for name in values):  # the checkpoint has the merged tensor too: not guessed
            continue
        taken |= set(values)
        realized[first] = values
        merged_from.update(dict.fromkeys(sources[first], first))
    return _in_order(state_dict, named, merged_from, realized)


def to_checkpoint_names(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` under the names ``save_pretrained`` would store (the reverse of
    :func:`to_model_names`), in the state_dict's order; tensors a converter split on loading are
    joined again."""
    found = _transforms(model, saving=True)
    if found is None:
        return dict(state_dict)
    from transformers.core_model_loading import apply_converters, apply_renamings, dot_natural_key

    renamings, converters = found
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    named: dict[str, str] = {}
    merged: dict[str, Any] = {}
    merged_from: dict[str, str] = {}
    for key in sorted(state_dict, key=dot_natural_key):
        renamed, pattern = apply_converters(key, converters)
        if pattern is None:
            named[key] = apply_renamings(key, renamings)
        else:
            merged.setdefault(renamed, copy.deepcopy(by_pattern[pattern])).add_tensor(renamed, key, pattern, state_dict[key])
            merged_from[key] = renamed
    realized: dict[str, dict[str, torch.Tensor]] = {}
    for first, converter in merged.items():
        values = _converted(model, first, converter, f"split {first} into the tensors a checkpoint stores", "output")
        realized[first] = {apply_renamings(name, renamings): value.contiguous() for name, value in values.items()}
    return _in_order(state_dict, named, merged_from, realized)


def _converted(model: nn.Module, first: str, converter: Any, what: str, code: str) -> dict[str, torch.Tensor]:
    """``converter``'s tensors by name (transformers' own ``convert``); its failure a located error."""
    try:
        values = converter.convert(first, model=model, config=getattr(model, "config", None))
    except Exception as exc:
        raise CheckpointError(problem(f"transformers could not {what} ({type(exc).__name__}: {clip(str(exc), 160)})", code=code)) from exc
    return {name: value[0] if isinstance(value, list) else value for name, value in values.items()}


def _in_order(
    state_dict: Mapping[str, torch.Tensor], named: Mapping[str, str], merged_from: Mapping[str, str], realized: dict[str, dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The state_dict in its own order: each key under its new name, and converted tensors
    where the first of their sources stood."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in merged_from:
            out.update(realized.pop(merged_from[key], {}))
        else:
            out[named.get(key, key)] = value
    return out


def checkpoint_names(model: nn.Module, names: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """The name ``save_pretrained`` stores each of ``names`` (model state_dict keys) under,
    without touching a tensor: ``({model name: checkpoint name}, names a converter joins with
    others)`` (the latter cannot be written one by one)."""
    found = _transforms(model, saving=True)
    names = list(names)
    if found is None:
        return {n: n for n in names}, []
    from transformers.core_model_loading import apply_converters, apply_renamings

    renamings, converters = found
    out: dict[str, str] = {}
    joined: list[str] = []
    for name in names:
        _, pattern = apply_converters(name, converters)
        if pattern is None:
            out[name] = apply_renamings(name, renamings)
        else:
            joined.append(name)
            out[name] = name
    return out, joined


__all__ = ["checkpoint_names", "fitting", "to_checkpoint_names", "to_model_names"]
