"""Atomicity: everything pruning changes on a set of modules, saved by reference and put back in
place when a run fails (weights a method rewrote kept in a temporary journal, not a second copy)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.utils.prune as prune
from torch import nn

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_pre_hooks_always_called",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
_STATE_DICTS = ("_parameters", "_buffers") + _HOOK_DICTS


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
