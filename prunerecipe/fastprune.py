"""Magnitude pruning without ``topk``: an exact streaming select over the float bits of ``|w|``.

For non-negative floats the IEEE-754 bit pattern, read as an integer, orders the same way
as the value. So the k-th smallest ``|w|`` is found digit by digit with 16-bit histograms
(``bincount``): one pass for fp16/bf16, two for fp32, four for fp64, summed over any
number of tensors without concatenating them. The masks equal torch's
(``L1Unstructured``/``global_unstructured``) wherever ``|w|`` has no ties at the
threshold; with ties, exactly the requested count is pruned, the earliest entries first.

The re-parametrization is torch's own: :func:`attach` mirrors
``BasePruningMethod.apply`` step for step (hook order, ``PruningContainer`` chaining,
``*_orig``/``*_mask`` registration), with genuine torch method instances in the history.
"""

from __future__ import annotations

import numbers
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.utils.prune as prune
from torch import nn

_KEY_DTYPES = {
    torch.float16: (torch.int16, 16),
    torch.bfloat16: (torch.int16, 16),
    torch.float32: (torch.int32, 32),
    torch.float64: (torch.int64, 64),
}
_DIGIT = 16
_BINS = 1 << _DIGIT


def supported(t: torch.Tensor) -> bool:
    """Whether the fast path handles this tensor (real floating point, not on ``meta``)."""
    return t.dtype in _KEY_DTYPES and t.device.type != "meta"


def _keys(t: torch.Tensor) -> torch.Tensor:
    """Monotone integer keys of ``|t|`` in logical (row-major) order, flattened."""
    key_dtype, _ = _KEY_DTYPES[t.dtype]
    return t.detach().abs().reshape(-1).view(key_dtype)


@dataclass
class Piece:
    """One tensor taking part in a select: its importance and which entries may be pruned."""

    importance: torch.Tensor
    eligible: torch.Tensor | None  # bool, flattened; None means every entry

    @property
    def numel(self) -> int:
        return self.importance.numel()

    def eligible_count(self) -> int:
        return self.numel if self.eligible is None else int(torch.count_nonzero(self.eligible).item())


@dataclass(frozen=True)
class Threshold:
    """Prune eligible entries with key < ``key``, plus ``ties[i]`` entries with key == ``key`` in piece i."""

    key: int
    ties: tuple[int, ...]
    empty: bool = False


def select_smallest(pieces: Sequence[Piece], k: int) -> Threshold:
    """Find the cut that prunes exactly the ``k`` smallest-magnitude eligible entries of all pieces."""
    if k <= 0 or not pieces:
        return Threshold(0, tuple(0 for _ in pieces), empty=True)
    dtype = pieces[0].importance.dtype
    _, bits = _KEY_DTYPES[dtype]
    prefix = 0
    remaining = k
    for shift in range(bits - _DIGIT, -1, -_DIGIT):
        hist = None
        for piece in pieces:
            keys = _keys(piece.importance)
            cand = piece.eligible
            if shift + _DIGIT < bits:
                same = (keys >> (shift + _DIGIT)) == prefix
                cand = same if cand is None else cand & same
            # int32 digits: room for the sentinel bin _BINS that collects ineligible entries
            digits = keys.to(torch.int32) if bits == _DIGIT else ((keys >> shift) & (_BINS - 1)).to(torch.int32)
            if cand is not None:
                digits = torch.where(cand, digits, _BINS)
            h = torch.bincount(digits, minlength=_BINS + 1)[:_BINS]
            hist = h if hist is None else hist + h
        assert hist is not None
        cum = torch.cumsum(hist, 0)
        digit = int(torch.searchsorted(cum, torch.tensor(remaining, device=cum.device, dtype=cum.dtype)).item())
        below = int(cum[digit - 1].item()) if digit > 0 else 0
        remaining -= below
        prefix = (prefix << _DIGIT) | digit
    # `prefix` is the full key of the k-th smallest; `remaining` entries equal to it are pruned.
    ties = []
    for piece in pieces:
        if remaining <= 0:
            ties.append(0)
            continue
        eq = _keys(piece.importance) == prefix
        if piece.eligible is not None:
            eq &= piece.eligible
        n = int(torch.count_nonzero(eq).item())
        take = min(n, remaining)
        ties.append(take)
        remaining -= take
    return Threshold(prefix, tuple(ties))


def prune_flags(piece: Piece, threshold: Threshold, index: int) -> torch.Tensor:
    """Flattened bool tensor: which entries of ``piece`` the threshold prunes."""
    if threshold.empty:
        return torch.zeros(piece.numel, dtype=torch.bool, device=piece.importance.device)
    keys = _keys(piece.importance)
    flags = keys < threshold.key
    quota = threshold.ties[index]
    if quota:
        eq = keys == threshold.key
        if piece.eligible is not None:
            eq &= piece.eligible
        positions = torch.nonzero(eq).view(-1)[:quota]
        flags[positions] = True
    if piece.eligible is not None:
        flags &= piece.eligible
    return flags


def nparams(amount: int | float, size: int) -> int:
    """torch's ``_compute_nparams_toprune``, with its validation."""
    k = int(amount) if isinstance(amount, numbers.Integral) else round(amount * size)
    if isinstance(amount, numbers.Integral) and k > size:
        raise ValueError(f"amount={amount} should be smaller than the number of parameters to prune={size}")
    return k


def importance_and_default(module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What torch ranks (``getattr(module, name)``) and the existing mask, if the parameter is pruned."""
    return getattr(module, name), module._buffers.get(name + "_mask")


def piece_for(module: nn.Module, name: str) -> Piece:
    importance, default = importance_and_default(module, name)
    eligible = None if default is None else (default == 1).reshape(-1)
    return Piece(importance, eligible)


def new_mask(piece: Piece, default: torch.Tensor | None, flags: torch.Tensor) -> torch.Tensor:
    """The mask torch registers: the old one (or ones), in the parameter's dtype, pruned entries zeroed."""
    t = piece.importance
    if default is None:
        mask = torch.ones(t.shape, dtype=t.dtype, device=t.device)
    else:
        mask = default.detach().to(dtype=t.dtype).clone(memory_format=torch.contiguous_format)
    mask.view(-1).masked_fill_(flags, 0)
    return mask


def attach(module: nn.Module, name: str, method: prune.BasePruningMethod, mask: torch.Tensor) -> prune.BasePruningMethod:
    """Install ``method`` with a precomputed ``mask`` exactly as ``BasePruningMethod.apply`` would."""
    old = None
    found = []
    for key, hook in module._forward_pre_hooks.items():
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == name:
            old = hook
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
        module.register_parameter(name + "_orig", orig)
        del module._parameters[name]
    module.register_buffer(name + "_mask", mask)
    setattr(module, name, hook.apply_mask(module))
    module.register_forward_pre_hook(hook)
    return hook


def l1_local(module: nn.Module, name: str, amount: int | float) -> None:
    """``prune.l1_unstructured(module, name, amount)``, same result, without ``topk``."""
    piece = piece_for(module, name)
    default = module._buffers.get(name + "_mask")
    k = nparams(amount, piece.eligible_count())
    threshold = select_smallest([piece], k)
    mask = new_mask(piece, default, prune_flags(piece, threshold, 0))
    method = prune.L1Unstructured(amount)
    attach(module, name, method, mask)


def l1_global(params: Sequence[tuple[nn.Module, str]], amount: int | float) -> None:
    """``prune.global_unstructured(params, L1Unstructured, amount=amount)``: same masks and
    ``CustomFromMask`` histories, without concatenating the parameters."""
    pieces = [piece_for(m, n) for m, n in params]
    k = nparams(amount, sum(p.eligible_count() for p in pieces))
    threshold = select_smallest(pieces, k)
    masks = []
    for i, ((module, name), piece) in enumerate(zip(params, pieces)):
        masks.append(new_mask(piece, module._buffers.get(name + "_mask"), prune_flags(piece, threshold, i)))
    for (module, name), mask in zip(params, masks):
        attach(module, name, prune.CustomFromMask(mask), mask)


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, so an in-place pass is never left half done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[tuple] = []
    previous = signal.getsignal(signal.SIGINT)

    def hold(signum, frame):  # type: ignore[no-untyped-def]
        received.append((signum, frame))

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(*received[0])
