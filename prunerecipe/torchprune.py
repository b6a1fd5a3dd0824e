"""The one module that touches ``torch.nn.utils.prune``'s internals and its naming.

torch prunes ``module.<name>`` by moving the parameter to ``<name>_orig``, registering a
``<name>_mask`` buffer, recomputing ``<name> = orig * mask`` in a forward pre-hook (a
``BasePruningMethod``, or a ``PruningContainer`` of them), and undoing the re-parametrization
in ``prune.remove``. Everything else in prunerecipe goes through the helpers here: attach a
precomputed mask, restore a saved one, snapshot and roll back, count zeros, list what is pruned.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.utils.prune as prune
from torch import nn

ORIG = "_orig"
MASK = "_mask"

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_pre_hooks_always_called",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
_STATE_DICTS = ("_parameters", "_buffers") + _HOOK_DICTS


# --- names -------------------------------------------------------------------------------


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
    module.register_buffer(name + MASK, mask)
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


# --- atomicity and copying -----------------------------------------------------------------


class _Journaled:
    """Saved parameter data kept in a file of a snapshot's journal (see :meth:`ModelSnapshot.journal`)."""

    def __init__(self, path: str, device: torch.device) -> None:
        self.path = path
        self.device = device

    def load(self) -> torch.Tensor:
        return torch.load(self.path, weights_only=True).to(self.device)


class ModelSnapshot:
    """Everything ``torch.nn.utils.prune`` changes on a set of modules, restorable in place.

    Saves references, not copies: parameters, buffers, hooks and pruning containers are
    put back as the same objects, so identity, ``state_dict`` and hooks are as before.
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self._saved: list[tuple[nn.Module, dict[str, Any], dict[str, Any], list[tuple[nn.Parameter, torch.Tensor | _Journaled]]]] = []
        self._containers: list[tuple[prune.PruningContainer, tuple[Any, ...]]] = []
        seen: set[int] = set()
        for module in modules:
            if id(module) in seen:
                continue
            seen.add(id(module))
            inner = {k: dict(getattr(module, k)) for k in _STATE_DICTS if hasattr(module, k)}
            attrs = {k: v for k, v in module.__dict__.items() if k not in inner}
            data: list[tuple[nn.Parameter, torch.Tensor | _Journaled]] = [(p, p.data) for p in module._parameters.values() if p is not None]
            self._saved.append((module, inner, attrs, data))
            for hook in module._forward_pre_hooks.values():
                if isinstance(hook, prune.PruningContainer):
                    self._containers.append((hook, hook._pruning_methods))
        self._nonpersistent = {id(m): set(m._non_persistent_buffers_set) for m, *_ in self._saved}
        self._folder: tempfile.TemporaryDirectory[str] | None = None

    def journal(self, param: torch.Tensor) -> None:
        """Keep the saved data of ``param`` in a temporary file rather than in memory, once the
        parameter holds new data: methods that rewrite weights (SparseGPT) then stay atomic
        without a second copy of every weight they rewrote. :meth:`restore` reads it back;
        :meth:`close` (or the end of the snapshot) removes the files."""
        for _, _, _, data in self._saved:
            for i, (p, tensor) in enumerate(data):
                if p is param and isinstance(tensor, torch.Tensor) and p.data is not tensor:
                    if self._folder is None:
                        self._folder = tempfile.TemporaryDirectory(prefix="prunerecipe-journal-")
                    path = os.path.join(self._folder.name, f"{len(os.listdir(self._folder.name))}.pt")
                    torch.save(tensor.detach().cpu(), path)
                    data[i] = (p, _Journaled(path, tensor.device))
                    return

    def close(self) -> None:
        """Remove the journal's temporary files (the snapshot can no longer restore them)."""
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def restore(self) -> None:
        """Put every saved module back exactly as it was."""
        for container, methods in self._containers:
            container._pruning_methods = methods
        for module, inner, attrs, data in self._saved:
            for key, saved in inner.items():
                live = getattr(module, key)
                live.clear()
                live.update(saved)
            for key in [k for k in module.__dict__ if k not in inner and k not in attrs]:
                del module.__dict__[key]
            module.__dict__.update(attrs)
            module._non_persistent_buffers_set.clear()
            module._non_persistent_buffers_set.update(self._nonpersistent[id(module)])
            for param, tensor in data:
                if isinstance(tensor, _Journaled):
                    param.data = tensor.load()
                elif param.data is not tensor:
                    param.data = tensor
        self.close()

    def structure(self) -> list[tuple[Any, ...]]:
        """Identity of what pruning changes on the saved modules, now (to tell whether anyone touched them)."""
        out = []
        for module, *_ in self._saved:
            out.append(
                (
                    tuple((k, id(v)) for k, v in module._parameters.items()),
                    tuple((k, id(v)) for k, v in module._buffers.items()),
                    tuple((k, id(v), len(v) if isinstance(v, prune.PruningContainer) else -1) for k, v in module._forward_pre_hooks.items()),
                )
            )
        return out


class PrunedGetState:
    """``__getstate__`` for one pruned module, installed on the instance.

    ``copy.deepcopy``, ``pickle`` and ``torch.save(model)`` then store the computed
    ``weight`` (``orig * mask``, a non-leaf tensor after a forward pass) detached, so they
    work at any time (plain ``torch.nn.utils.prune`` modules cannot be deep-copied after a
    forward: pytorch#37322, the reason EMA/SWA code trips on them). Nothing else changes:
    training and autograd are untouched, and the next forward recomputes ``weight``.

    It holds its module weakly: a strong reference back would make every pruned module a
    reference cycle, so ``del model`` would free the weights only when the cycle collector
    next runs. A copy or an unpickled module gets one of its own.
    """

    def __init__(self, module: nn.Module) -> None:
        self._module = weakref.ref(module)

    @property
    def module(self) -> nn.Module | None:
        """The module this is installed on (None once it is gone)."""
        return self._module()

    def __call__(self) -> dict[str, Any]:
        module = self._module()
        if module is None:  # a shallow copy (copy.copy) of a pruned module that is gone shares this hook
            raise RuntimeError(
                "cannot copy or pickle this module: it is a shallow copy (copy.copy) of a pruned module that no longer "
                "exists, and shares its state; copy pruned modules with copy.deepcopy instead"
            )
        state = module.__dict__.copy()
        for hook in pruning_hooks(module):
            value = state.get(hook._tensor_name)
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                state[hook._tensor_name] = value.detach()
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> PrunedGetState:
        module = self._module()
        if module is None:  # pragma: no cover - a copy is made from a live module
            return self
        copied: nn.Module = memo.get(id(module), module)  # the copy of the module being copied
        return PrunedGetState(copied)

    def __reduce__(self) -> tuple[Any, ...]:
        return (PrunedGetState, (self._module(),))  # pickled by reference to its module


def make_copyable(module: nn.Module) -> None:
    """Let a pruned module be deep-copied and pickled at any time (see :class:`PrunedGetState`)."""
    current = module.__dict__.get("__getstate__")
    if not (isinstance(current, PrunedGetState) and current.module is module):
        module.__dict__["__getstate__"] = PrunedGetState(module)


# --- counting ------------------------------------------------------------------------------

_CHUNK = 1 << 18  # float32 sums of 0/1 values are exact far beyond this (below 2**24)


@torch.no_grad()
def zero_entries(tensor: torch.Tensor, mask: torch.Tensor | None = None, scratch: dict[Any, Any] | None = None) -> int:
    """Entries of ``tensor`` that are zero, or masked out by ``mask`` (0 for ``meta`` tensors).

    Counts with float sums over chunks (exact, and far faster than ``count_nonzero`` or
    summing bools on CPU) in two small buffers, reused through ``scratch`` across calls.
    """
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return 0
    flat = tensor.detach().reshape(-1)
    flat_mask = mask.detach().reshape(-1) if mask is not None else None
    scratch = {} if scratch is None else scratch
    key = str(flat.device)
    if key not in scratch:
        scratch[key] = (torch.empty(_CHUNK, dtype=torch.float32, device=flat.device), torch.empty(_CHUNK, dtype=torch.float32, device=flat.device))
    hits_all, other_all = scratch[key]
    total = 0
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK]
        n = part.numel()
        hits = hits_all[:n]
        torch.eq(part, 0, out=hits)
        if flat_mask is not None:
            other = other_all[:n]
            torch.eq(flat_mask[start : start + n], 0, out=other)
            torch.maximum(hits, other, out=hits)
        total += int(hits.sum().item())
    return total


def count_zeros(module: nn.Module, name: str, scratch: dict[Any, Any] | None = None) -> int:
    """Zero entries of ``module.<name>`` as the model computes with it (``orig * mask`` when pruned)."""
    mask = owned_mask(module, name)
    return zero_entries(original(module, name), mask, scratch)


def kept_entries(mask: torch.Tensor) -> int:
    """How many entries of a 0/1 mask are 1: float sums over slices small enough to be exact."""
    flat = mask.detach().reshape(-1)
    step = 1 << 24
    acc = torch.float32 if flat.dtype in (torch.float16, torch.bfloat16) else None
    return sum(int(flat[a : a + step].sum(dtype=acc).item()) for a in range(0, flat.numel(), step))


def masked_slices(mask: torch.Tensor | None, dim: int) -> int:
    """Slices of ``mask`` along ``dim`` that are entirely 0 (what torch's container skips)."""
    if mask is None or mask.device.type == "meta":
        return 0
    other = [d for d in range(mask.dim()) if d != dim]
    alive = mask.sum(dim=other) != 0 if other else mask != 0
    return int(mask.shape[dim] - torch.count_nonzero(alive).item())
