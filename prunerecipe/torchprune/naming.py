"""torch's naming for a pruned parameter (``<name>_orig``, ``<name>_mask``), and its hooks:
what is pruned, where the unmasked tensor and the mask are, plain state_dicts from pruned ones."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.utils.prune as prune
from torch import nn

ORIG = "_orig"
MASK = "_mask"


def unpruned_name(key: str) -> str:
    """``"weight_orig"`` -> ``"weight"``; other names unchanged."""
    return key[: -len(ORIG)] if key.endswith(ORIG) else key


def is_pruned(module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` is re-parametrized by torch's pruning (``<name>_orig`` exists)."""
    return module._parameters.get(name + ORIG) is not None


def has_param(module: nn.Module, name: str) -> bool:
    """Whether ``module`` has the parameter ``name``, plain or already pruned."""
    own = module._parameters
    return own.get(name) is not None or own.get(name + ORIG) is not None


def foreign_reparam(module: nn.Module, name: str) -> str | None:
    """What computes ``module.<name>`` when something other than torch's pruning does (a
    ``torch.nn.utils.parametrize`` parametrization, the old ``weight_norm``/``spectral_norm``
    hooks), else None: torch's pruning cannot re-parametrize such a tensor."""
    found = getattr(module, "parametrizations", None)
    if isinstance(found, nn.ModuleDict) and name in found:
        kinds = ", ".join(dict.fromkeys(type(p).__name__.lstrip("_") for p in found[name].children()))
        return f"a torch.nn.utils.parametrize parametrization ({kinds})"
    for hook in module._forward_pre_hooks.values():
        if getattr(hook, "name", None) == name and type(hook).__name__ in ("WeightNorm", "SpectralNorm"):
            return f"torch.nn.utils.{'weight_norm' if type(hook).__name__ == 'WeightNorm' else 'spectral_norm'}"
    return None


def own_parameters(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the module's own registered parameters (``*_orig`` included), in
    registration order, every name listed even when one object sits under two names."""
    return [(k, v) for k, v in module._parameters.items() if v is not None]


def original(module: nn.Module, name: str) -> torch.Tensor:
    """The unmasked tensor: ``<name>_orig`` when pruned, else the parameter itself."""
    params = module._parameters
    tensor = params.get(name + ORIG)
    if tensor is None:
        tensor = params[name]
    assert tensor is not None
    return tensor


def owned_mask(module: nn.Module, name: str) -> torch.Tensor | None:
    """The ``<name>_mask`` buffer of a pruned parameter, else None."""
    return module._buffers.get(name + MASK) if is_pruned(module, name) else None


def pruned_keys(state_dict: Mapping[str, Any]) -> list[str]:
    """Qualified names that carry pruning state in a state_dict (``X_orig`` and ``X_mask`` both present)."""
    return [k[: -len(ORIG)] for k in state_dict if k.endswith(ORIG) and k[: -len(ORIG)] + MASK in state_dict]


def fold_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain state_dict: every ``X_orig``/``X_mask`` pair replaced by ``X = X_orig * X_mask``
    (what ``prune.remove`` leaves), in the position of ``X_orig``; other entries as they are."""
    pruned = set(pruned_keys(state_dict))
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        base = key[: -len(MASK)] if key.endswith(MASK) else None
        if base is not None and base in pruned:
            continue
        if key.endswith(ORIG) and key[: -len(ORIG)] in pruned:
            base = key[: -len(ORIG)]
            out[base] = value * state_dict[base + MASK].to(value.dtype)
        else:
            out[key] = value
    return out


# --- hooks -------------------------------------------------------------------------------


def pruning_hooks(module: nn.Module) -> list[prune.BasePruningMethod]:
    """The pruning forward pre-hooks of ``module`` (one per pruned parameter)."""
    return [h for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]


def hook_for(module: nn.Module, name: str) -> prune.BasePruningMethod | None:
    """The pruning hook (method or container) of ``module.<name>``, if pruned."""
    for hook in pruning_hooks(module):
        if hook._tensor_name == name:
            return hook
    return None
