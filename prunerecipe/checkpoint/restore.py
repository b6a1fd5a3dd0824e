"""Loading a checkpoint into a model: masks restored as torch's re-parametrization, ties and
key prefixes understood, everything checked before anything changes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from ..errors import CheckpointError
from ..structured.record import RECORD_KEY, shrunk_to_fit, without_prefix
from ..text import listing
from ..torchprune import (
    MASK,
    ORIG,
    ModelSnapshot,
    has_param,
    is_pruned,
    make_copyable,
    pruned_keys,
    pruning_hooks,
    refresh,
    restore_mask,
    unpruned_name,
)
from .hfnames import fitting, to_model_names


def _base(key: str) -> str:
    return key[: -len(MASK)] if key.endswith(MASK) else unpruned_name(key)


def _fits(keys: list[str], model_keys: set[str]) -> int:
    return sum(1 for k in keys if _base(k) in model_keys)


def common_prefix(keys: list[str]) -> str:
    """The longest dotted prefix (``"model."``) every key starts with, or ``""``."""
    if not keys:
        return ""
    parts = keys[0].split(".")[:-1]
    for key in keys[1:]:
        other = key.split(".")[:-1]
        n = 0
        while n < min(len(parts), len(other)) and parts[n] == other[n]:
            n += 1
        parts = parts[:n]
    return ".".join(parts) + "." if parts else ""


def fit_prefix(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module, strip: str | None = None, *, convert: bool = True
) -> tuple[dict[str, torch.Tensor], str | None]:
    """Remove a key prefix the model does not have: ``strip`` when given, else the common
    prefix of all keys when not every key fits as it is and all fit without it. Then, for a Hugging
    Face model, turn the names its checkpoints store into its own names, as ``from_pretrained``
    does (:mod:`.hfnames`: GPT-NeoX's ``embed_out``, ViT's attention, MoE experts; with
    ``convert=False``, tensors that transformers merges on loading keep their names).

    Returns:
        The state_dict (keys renamed) and the prefix removed (None when none was).

    Raises:
        CheckpointError: ``strip`` is given but no key starts with it.
    """
    keys = list(state_dict)
    if strip and not strip.endswith(".") and any(k.startswith(strip + ".") for k in keys):
        strip += "."  # "net" means the module prefix "net.", not keys that happen to start with those letters
    if strip and not any(k.startswith(strip) for k in keys):
        raise CheckpointError(
            f"no key of the checkpoint starts with {strip!r} (--strip-prefix); its keys start with {common_prefix(keys) or '(no common prefix)'!r}"
        )
    model_keys = {_base(k) for k in model.state_dict()}
    if strip:
        return to_model_names(model, _stripped(state_dict, strip), model_keys, convert=convert), strip
    # a compaction record fits wherever the model has a module (a fresh model has none yet)
    model_keys |= {f"{name}.{RECORD_KEY}" if name else RECORD_KEY for name, _ in model.named_modules()}

    def fits(keys: list[str]) -> int:  # as they are, or as transformers' stored names of the model's
        return len(fitting(model, keys, model_keys))

    named = [k for k in keys if k != RECORD_KEY]  # a wrapper's own record: at its root, names inside prefixed
    prefix = common_prefix(named)
    if named and prefix and fits(named) < len(named):
        stripped = [k[len(prefix) :] for k in named]
        while prefix and fits(stripped) < len(stripped):  # the whole common prefix may be too much
            prefix = ".".join(prefix.split(".")[:-2]) + "." if prefix.count(".") > 1 else ""
            stripped = [k[len(prefix) :] for k in named]
        if prefix and fits(stripped) == len(stripped):
            return to_model_names(model, _stripped(state_dict, prefix), model_keys, convert=convert), prefix
    return to_model_names(model, state_dict, model_keys, convert=convert), None


def _stripped(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        if key == RECORD_KEY and prefix + RECORD_KEY not in state_dict:
            out[key] = without_prefix(value, prefix)
        else:
            out[key[len(prefix) :] if key.startswith(prefix) else key] = value
    return out


def _prefix_hint(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str:
    keys, model_keys = list(state_dict), {_base(k) for k in expected}
    if keys and _fits(keys, model_keys) == 0:
        prefix = common_prefix(keys)
        model_prefix = common_prefix(list(model_keys))
        if not prefix:  # nothing to strip: most likely the checkpoint of another model
            return " (no key of the checkpoint names a parameter of the model: is it the checkpoint of another model?)"
        theirs = f"the model's keys start with {model_prefix!r}" if model_prefix else "the model's keys have no common prefix"
        return f" (every key starts with {prefix!r}, {theirs}; see --strip-prefix)"
    return ""


def tie_groups(model: nn.Module) -> list[list[str]]:
    """The model's state_dict names, grouped by the tensor they name (a tied pair is one group)."""
    by_tensor: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(value), []).append(key)
    return list(by_tensor.values())


def tied_aliases(
    model: nn.Module, expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], groups: list[list[str]] | None = None
) -> dict[str, str]:
    """Keys the checkpoint lacks whose tensor the model shares with a key it has: ``{missing: present}``
    (``groups``: :func:`tie_groups` of the model, when already made)."""
    out = {}
    for names in tie_groups(model) if groups is None else groups:
        present = [n for n in names if n in state_dict]
        if present:
            for name in names:
                if name not in state_dict and name in expected:
                    out[name] = present[0]
    return out


def _tie_conflicts(groups: list[list[str]], state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Names the model ties (one tensor) that the checkpoint gives different values: loading
    would keep whichever came last, silently (``from_pretrained`` keeps the first)."""
    out = []
    for names in groups:
        present = [n for n in names if n in state_dict and state_dict[n].device.type != "meta"]
        first = state_dict[present[0]] if present else None
        for other in present[1:]:
            value = state_dict[other]
            assert first is not None
            if value.shape != first.shape or value.dtype != first.dtype or not torch.equal(value, first):
                out.append(f"{present[0]} and {other} are one tensor in the model (tied), but the checkpoint holds different values for them")
    return out


class Fit(NamedTuple):
    """How a checkpoint fits a model: what :func:`check_fit` found, for loading it."""

    state_dict: dict[str, torch.Tensor]  # keys as the model names them; tied names added
    expected: dict[str, torch.Tensor]  # the model's state_dict, pruned names as *_orig/*_mask
    restored: list[str]  # qualified names the checkpoint carries masks for
    to_prune: dict[tuple[int, str], tuple[nn.Module, str, str]]  # (module, param, name) to re-parametrize
    names_of: dict[int, list[str]]  # every name each module is registered under
    modules: dict[str, nn.Module]


def check_fit(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strip_prefix: str | None = None) -> Fit:
    """Check that a checkpoint fits ``model`` without changing anything: keys (after the
    prefix is fitted; tied names the model shares are accepted), shapes, and that masks hold
    only 0 and 1. Values on the ``meta`` device are checked by shape only.

    Raises:
        CheckpointError: listing missing, unexpected and mis-shaped keys, or masks that are not 0/1.
    """
    state_dict, _ = fit_prefix(state_dict, model, strip_prefix)
    # Every name a module is registered under: state_dict() lists a shared module under each.
    names_of: dict[int, list[str]] = {}
    modules: dict[str, nn.Module] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        modules[mod_name] = module
        names_of.setdefault(id(module), []).append(mod_name)

    restored = pruned_keys(state_dict)
    to_prune: dict[tuple[int, str], tuple[nn.Module, str, str]] = {}
    problems: list[str] = []
    strays = []
    for qual in restored:
        mod_name, _, pname = qual.rpartition(".")
        module = modules.get(mod_name)
        if module is None or not has_param(module, pname):
            strays.append(qual)
            continue
        if not is_pruned(module, pname):
            to_prune.setdefault((id(module), pname), (module, pname, qual))

    if strays:
        problems.append(listing("pruned parameters (*_orig/*_mask) the model does not have", strays))
    expected = dict(model.state_dict())
    for module, pname, _ in to_prune.values():
        for prefix in names_of[id(module)]:
            qual = f"{prefix}.{pname}" if prefix else pname
            tensor = expected.pop(qual)
            expected[qual + ORIG] = tensor
            expected[qual + MASK] = tensor
    state_dict = dict(state_dict)
    groups = tie_groups(model)
    problems += _tie_conflicts(groups, state_dict)
    for alias, source in tied_aliases(model, expected, state_dict, groups).items():
        state_dict[alias] = state_dict[source]  # the model's own tie: the same tensor under both names
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    soft = [
        k
        for k in state_dict
        if k.endswith(MASK)
        and k[: -len(MASK)] in restored
        and state_dict[k].device.type != "meta"
        and not bool(((state_dict[k] == 0) | (state_dict[k] == 1)).all())
    ]
    if soft:
        problems.append(listing("masks must hold only 0 and 1 (tampered or not a pruning mask)", soft))
    if missing:
        problems.append(listing("missing from the checkpoint", missing))
    if unexpected:
        problems.append(listing("not in the model", unexpected))
    if shapes:
        problems.append(listing("shape mismatch", shapes))
    if problems:
        raise CheckpointError("checkpoint does not fit the model: " + "; ".join(problems) + _prefix_hint(state_dict, expected))
    return Fit(state_dict, expected, restored, to_prune, names_of, modules)


def load_pruned_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strip_prefix: str | None = None) -> list[str]:
    """Load a checkpoint into ``model`` in place, restoring pruning where it carries ``*_orig``/``*_mask``.

    Each pruned parameter gets torch's re-parametrization back (a ``CustomFromMask``
    hook holding the saved mask), so pruning can go on: a recipe applied next chains
    onto it. When no key fits the model but all do once one common prefix is removed
    (``module.`` from DataParallel/DDP, ``model.``/``net.`` from Lightning), it is removed.
    A key the checkpoint lacks is accepted when the model ties that tensor to one the
    checkpoint has (as Hugging Face leaves ``lm_head.weight`` out). A Hugging Face model's
    checkpoint names are turned into its own as ``from_pretrained`` turns them (GPT-NeoX's
    ``embed_out`` is ``lm_head``; a MoE layer's experts are stacked). Keys, shapes and values
    are checked and converted before anything changes; on any mismatch the model is left
    as it was.

    Args:
        model: the model to load into, in place.
        state_dict: a plain or pruned (``*_orig``/``*_mask``) state_dict.
        strip_prefix: a prefix to remove from every key (instead of finding one).

    Returns:
        The qualified names whose pruning was restored.

    Raises:
        CheckpointError: listing missing, unexpected and mis-shaped keys, or masks that are not 0/1.

    Example:
        >>> load_pruned_state_dict(LeNet(), read_state_dict("pruned.pt"))  # doctest: +SKIP
        ['conv1.weight', 'conv1.bias']
    """
    state_dict, _ = fit_prefix(state_dict, model, strip_prefix)  # the compaction record's key too
    with shrunk_to_fit(model, state_dict) as fitted:  # a compacted checkpoint shrinks the fresh model first; undone if loading fails
        return _load_pruned(model, fitted, None)


def _load_pruned(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strip_prefix: str | None) -> list[str]:
    fit = check_fit(model, state_dict, strip_prefix=strip_prefix)
    state_dict, expected, names_of, modules = fit.state_dict, fit.expected, fit.names_of, fit.modules
    # Convert every value to what it will land in before touching the model, so that the
    # in-place copies below cannot fail halfway (meta tensors, impossible dtypes...).
    ready: dict[str, torch.Tensor] = {}
    bad = []
    for key, value in state_dict.items():
        target = expected[key]
        try:
            if value.device.type == "meta":
                raise ValueError("it is a meta tensor (no data)")
            ready[key] = value.to(
                device=target.device if target.device.type != "meta" else "cpu", dtype=target.dtype if not key.endswith(MASK) else value.dtype
            )
        except Exception as exc:
            bad.append(f"{key}: {exc}")
    if bad:
        raise CheckpointError("checkpoint does not fit the model: " + listing("unusable values", bad))

    snapshot = ModelSnapshot(list({id(m): m for m in modules.values()}.values()))
    try:
        for module, pname, _ in fit.to_prune.values():
            mask = next(ready[f"{p}.{pname}{MASK}" if p else f"{pname}{MASK}"] for p in names_of[id(module)])
            restore_mask(module, pname, mask)
        with torch.no_grad():
            model.load_state_dict(ready, strict=True)
        for module in modules.values():  # refresh `weight` = orig * mask from the loaded values
            refresh(module)
            if pruning_hooks(module):
                make_copyable(module)
    except Exception as exc:
        snapshot.restore()
        raise CheckpointError(f"checkpoint does not fit the model: {type(exc).__name__}: {exc}") from exc
    return fit.restored
