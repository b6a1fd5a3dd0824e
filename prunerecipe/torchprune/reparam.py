"""Re-parametrizing as ``torch.nn.utils.prune`` does: attach a precomputed mask (chaining into a
``PruningContainer``), restore a saved one, recompute ``orig * mask``, and ``prune.remove``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.utils.prune as prune
from torch import nn

from .copying import PrunedGetState, make_copyable
from .naming import MASK, ORIG, original, owned_mask, pruning_hooks


def refresh(module: nn.Module, name: str | None = None) -> None:
    """Recompute ``module.<name> = orig * mask`` now (all pruned parameters when ``name`` is None),
    as the next forward pre-hook would: after ``orig`` or the mask was written in place."""
    for hook in pruning_hooks(module):
        if name is None or hook._tensor_name == name:
            setattr(module, hook._tensor_name, hook.apply_mask(module))


def match_mask_dtype(module: nn.Module, name: str) -> None:
    """Give ``name``'s mask its weight's dtype (0 and 1 are exact in every float type). Torch's
    container gives a chained mask the dtype of what it ranked: float32 scores of a bf16 weight."""
    mask = owned_mask(module, name)
    dtype = original(module, name).dtype
    if mask is not None and mask.dtype != dtype:
        module._buffers[name + MASK] = mask.to(dtype)
        refresh(module, name)


def attach(module: nn.Module, name: str, method: prune.BasePruningMethod, mask: torch.Tensor) -> prune.BasePruningMethod:
    """Install ``method`` with a precomputed ``mask`` exactly as ``BasePruningMethod.apply`` would:
    the same hook order, ``PruningContainer`` chaining and ``*_orig``/``*_mask`` registration.

    Returns:
        The hook now on the module (``method`` itself, or the container holding it).
    """
    old = None
    found = []
    for key, existing in module._forward_pre_hooks.items():
        if isinstance(existing, prune.BasePruningMethod) and existing._tensor_name == name:
            old = existing
            found.append(key)
    if len(found) > 1:
        raise AssertionError(f"Avoid adding multiple pruning hooks to the same tensor {name} of module {module}. Use a PruningContainer.")
    for key in found:
        del module._forward_pre_hooks[key]
    method._tensor_name = name
    hook: prune.BasePruningMethod = method
    if isinstance(old, prune.PruningContainer):
        old.add_pruning_method(method)
        hook = old
    elif old is not None:
        container = prune.PruningContainer(old)
        container.add_pruning_method(method)
        hook = container
    if not isinstance(hook, prune.PruningContainer):
        orig = module._parameters[name]
        module.register_parameter(name + ORIG, orig)
        del module._parameters[name]
    module.register_buffer(name + MASK, mask.contiguous())  # torch's masks are contiguous (a permuted one would spread its layout)
    setattr(module, name, hook.apply_mask(module))
    module.register_forward_pre_hook(hook)
    return hook


def attach_rewritten(
    module: nn.Module, name: str, method: prune.BasePruningMethod, mask: torch.Tensor, values: torch.Tensor
) -> prune.BasePruningMethod:
    """:func:`attach` ``method`` with ``mask``, and make ``values`` the unmasked tensor
    (``<name>_orig``): for methods that rewrite weights as well as choosing a mask (SparseGPT).

    The parameter keeps its identity; its ``.data`` becomes ``values`` (taken over, not copied,
    when it is contiguous and of the parameter's dtype and device), never written in place, so
    that a :class:`ModelSnapshot` taken before puts the old values back.

    Returns:
        The hook now on the module (``method`` itself, or the container holding it).
    """
    param = original(module, name)
    if values.shape != param.shape:
        raise ValueError(f"rewritten values have shape {tuple(values.shape)}, the parameter {tuple(param.shape)}")
    hook = attach(module, name, method, mask)
    param.data = values.detach().to(dtype=param.dtype, device=param.device).contiguous()
    refresh(module, name)
    return hook


@torch.no_grad()
def effective(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<name>`` as the model computes with it now (``orig * mask`` when pruned), detached."""
    tensor = original(module, name).detach()
    mask = owned_mask(module, name)
    return tensor if mask is None else tensor * mask


def move_to_end(module: nn.Module, name: str) -> None:
    """Move parameter ``name`` to the end of the module's parameters, as ``prune.remove`` leaves it."""
    module._parameters[name] = module._parameters.pop(name)


def restore_mask(module: nn.Module, name: str, mask: torch.Tensor) -> None:
    """Re-parametrize ``module.<name>`` with a saved ``mask`` (a ``CustomFromMask`` hook), as
    when a pruned checkpoint is loaded, so that pruning can go on from there."""
    target = original(module, name)
    prune.custom_from_mask(module, name, mask.to(device=target.device))
    make_copyable(module)


def pruned_parameters(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Every parameter carrying a pruning hook.

    Args:
        model: the model to look through.

    Returns:
        ``(qualified name, module, param)`` per pruned parameter, modules in ``named_modules()``
        order, parameters in the order their ``*_orig`` entries were registered.

    Example:
        >>> from prunerecipe.zoo import LeNet
        >>> model = LeNet()
        >>> _ = prune.random_unstructured(model.fc1, "weight", amount=0.5)
        >>> [name for name, _, _ in pruned_parameters(model)]
        ['fc1.weight']
    """
    out = []
    for mod_name, module in model.named_modules():
        hooked = {h._tensor_name for h in pruning_hooks(module)}
        for key in module._parameters:
            name = key[: -len(ORIG)]
            if key.endswith(ORIG) and name in hooked:
                out.append((f"{mod_name}.{name}" if mod_name else name, module, name))
    return out


def finalize(model: nn.Module) -> list[str]:
    """Make all pruning permanent, in place: ``prune.remove`` on every pruned parameter.

    Parameters are removed in the order their ``*_orig`` entries were registered, which is
    the order a hand-written loop over the pruned names would use (weight before bias, say).

    Args:
        model: the model; modules without pruning are left alone.

    Returns:
        The qualified names that were finalized.

    Example:
        >>> from prunerecipe.zoo import LeNet
        >>> model = LeNet()
        >>> _ = prune.l1_unstructured(model.conv1, "weight", amount=0.5)
        >>> finalize(model)
        ['conv1.weight']
    """
    done = []
    for name, module, param in pruned_parameters(model):
        prune.remove(module, param)
        done.append(name)
    for module in model.modules():  # nothing pruned is left: no special copying needed
        if isinstance(module.__dict__.get("__getstate__"), PrunedGetState) and not pruning_hooks(module):
            del module.__dict__["__getstate__"]
    return done


def apply_any_layout(method: type[prune.BasePruningMethod], module: nn.Module, name: str, **kwargs: Any) -> None:
    """``method.apply(module, name, **kwargs)``; for torch's own unstructured methods on a
    tensor that is not contiguous (channels_last, transposed), ranked from a contiguous copy
    (entries in their logical order): torch flattens with ``view(-1)``, which fails there."""
    tensor = getattr(module, name)
    if method.__module__ == prune.__name__ and getattr(method, "PRUNING_TYPE", None) == "unstructured" and not tensor.is_contiguous():
        prune.BasePruningMethod.apply.__func__(method, module, name, importance_scores=tensor.contiguous(), **kwargs)  # type: ignore[attr-defined]
        return
    method.apply(module, name, **kwargs)


def global_unstructured(
    parameters: list[tuple[nn.Module, str]],
    pruning_method: type[prune.BasePruningMethod],
    importance_scores: dict[Any, torch.Tensor] | None = None,
    **kwargs: Any,
) -> None:
    """``prune.global_unstructured``, for tensors of any memory layout: torch's own flattens with
    ``view(-1)``, which fails for a channels_last or transposed weight. Where every tensor is
    contiguous this is torch's function itself; otherwise the same steps on contiguous copies
    (entries in their logical order), the masks installed with ``custom_from_mask`` as there."""
    scores = importance_scores or {}
    tensors = [scores.get((m, n), getattr(m, n)) for m, n in parameters]
    if all(t.is_contiguous() for t in tensors) and all(getattr(m, n).is_contiguous() for m, n in parameters):
        prune.global_unstructured(parameters, pruning_method=pruning_method, importance_scores=importance_scores, **kwargs)
        return
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    default = torch.cat([_mask_or_ones(m, n).reshape(-1) for m, n in parameters])
    container = prune.PruningContainer()
    container._tensor_name = "temp"
    method = pruning_method(**kwargs)
    method._tensor_name = "temp"
    kind = getattr(method, "PRUNING_TYPE", None)
    if kind != "unstructured":
        raise TypeError(f'Only "unstructured" PRUNING_TYPE supported for the `pruning_method`. Found method {pruning_method} of type {kind}')
    container.add_pruning_method(method)
    final = container.compute_mask(flat, default)
    start = 0
    for module, name in parameters:
        param = getattr(module, name)
        prune.custom_from_mask(module, name, mask=final[start : start + param.numel()].view(param.shape))
        mask = module._buffers[name + MASK]
        assert mask is not None
        module._buffers[name + MASK] = mask.contiguous()  # not the weight's layout: as attach() registers
        refresh(module, name)
        start += param.numel()


def _mask_or_ones(module: nn.Module, name: str) -> torch.Tensor:
    mask = getattr(module, name + MASK, None)
    return mask if isinstance(mask, torch.Tensor) else torch.ones_like(getattr(module, name), memory_format=torch.contiguous_format)
