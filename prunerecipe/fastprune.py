"""Magnitude pruning without ``topk``: an exact streaming select over the float bits of ``|w|``.

For non-negative floats the IEEE-754 bit pattern, read as an integer, orders the same way
as the value. So the k-th smallest ``|w|`` is found digit by digit with 16-bit histograms
(``bincount``): one pass for fp16/bf16, two for fp32, four for fp64, summed over any
number of tensors without concatenating them. Work happens in scratch buffers sized to
the largest tensor (small tensors are batched into them), so memory stays bounded and
the allocator is not churned.

The masks equal torch's (``L1Unstructured``, ``global_unstructured``) wherever ``|w|``
has no ties at the threshold; with ties, exactly the requested count is pruned, earliest
entries (in ``parameters_to_vector`` order) first. NaN ranks above every number, as in
``torch.topk``.

The re-parametrization is torch's own: :func:`attach` mirrors ``BasePruningMethod.apply``
step for step (hook order, ``PruningContainer`` chaining, ``*_orig``/``*_mask``
registration), with genuine torch method instances in the history.
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

# float dtype -> (integer view dtype, bits, mask that clears the sign bit)
_KEY_DTYPES = {
    torch.float16: (torch.int16, 16, 0x7FFF),
    torch.bfloat16: (torch.int16, 16, 0x7FFF),
    torch.float32: (torch.int32, 32, 0x7FFFFFFF),
    torch.float64: (torch.int64, 64, 0x7FFFFFFFFFFFFFFF),
}
_DIGIT = 16
_BINS = 1 << _DIGIT
_MIN_BATCH = 1 << 20  # small tensors are batched into scratch buffers at least this long


def supported(t: torch.Tensor) -> bool:
    """Whether the fast path handles this tensor (real floating point, not on ``meta``)."""
    return t.dtype in _KEY_DTYPES and t.device.type != "meta"


@dataclass
class Piece:
    """One tensor taking part in a select: what is ranked, and which entries may be pruned."""

    importance: torch.Tensor
    eligible: torch.Tensor | None = None  # bool, same shape; None means every entry

    @property
    def numel(self) -> int:
        return self.importance.numel()

    def eligible_count(self) -> int:
        return self.numel if self.eligible is None else int(torch.count_nonzero(self.eligible).item())


@dataclass(frozen=True)
class Threshold:
    """Prune eligible entries whose key is below ``key``; with ``quotas``, also that many
    entries whose key equals ``key``, per piece, in order."""

    key: int
    quotas: tuple[int, ...] | None = None
    nothing: bool = False


class _Scratch:
    """Reusable buffers for keys, digits and flags of up to ``size`` entries."""

    def __init__(self, size: int, key_dtype: torch.dtype, device: torch.device) -> None:
        self.size = size
        self.keys = torch.empty(size, dtype=key_dtype, device=device)
        self.digits = torch.empty(size, dtype=torch.int32, device=device)
        self.flags = torch.empty(size, dtype=torch.bool, device=device)
        self.flags2 = torch.empty(size, dtype=torch.bool, device=device)


Pool = dict  # (key dtype, device) -> _Scratch: lets consecutive selects share buffers


def _scratch(pool: Pool | None, size: int, key_dtype: torch.dtype, device: torch.device) -> _Scratch:
    key = (key_dtype, str(device))
    found = pool.get(key) if pool is not None else None
    if found is None or found.size < size:
        found = _Scratch(size, key_dtype, device)
        if pool is not None:
            pool[key] = found
    return found


def _batches(pieces: Sequence[Piece]) -> tuple[int, list[list[int]]]:
    """Group consecutive pieces so each group fits one scratch buffer."""
    total = sum(p.numel for p in pieces)
    cap = max([min(total, _MIN_BATCH)] + [p.numel for p in pieces])
    groups: list[list[int]] = []
    used = cap
    for i, p in enumerate(pieces):
        if used + p.numel > cap:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += p.numel
    return cap, groups


def _load(pieces: Sequence[Piece], group: list[int], scratch: _Scratch) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Keys (and eligibility) of a group, flattened in logical order into the scratch buffers."""
    key_dtype, _, clear_sign = _KEY_DTYPES[pieces[group[0]].importance.dtype]
    off = 0
    any_eligible = any(pieces[i].eligible is not None for i in group)
    for i in group:
        t = pieces[i].importance.detach()
        n = t.numel()
        torch.bitwise_and(t.view(key_dtype), clear_sign, out=scratch.keys[off : off + n].view(t.shape))
        if any_eligible:
            el = pieces[i].eligible
            if el is None:
                scratch.flags2[off : off + n].fill_(True)
            else:
                scratch.flags2[off : off + n].view(el.shape).copy_(el)
        off += n
    return scratch.keys[:off], (scratch.flags2[:off] if any_eligible else None), off


def _digits(keys: torch.Tensor, shift: int, first: bool, out: torch.Tensor) -> None:
    """The 16-bit digit of each key at ``shift``, into the int32 ``out``."""
    if keys.dtype == torch.int32:  # fp32: two rounds, shift 16 then 0
        if first:
            torch.bitwise_right_shift(keys, shift, out=out)
        else:
            torch.bitwise_and(keys, _BINS - 1, out=out)
    elif keys.dtype == torch.int16:  # fp16/bf16: one round, the key is the digit
        out.copy_(keys)
    else:  # fp64: four rounds
        value = keys >> shift if shift else keys
        out.copy_(value if first else value & (_BINS - 1))


def _histogram(keys: torch.Tensor, eligible: torch.Tensor | None, shift: int, bits: int, prefix: int, scratch: _Scratch) -> torch.Tensor:
    """Counts of the 16-bit digit at ``shift`` among eligible keys whose higher digits equal ``prefix``."""
    n = keys.numel()
    digits = scratch.digits[:n]
    first = shift + _DIGIT >= bits
    _digits(keys, shift, first, digits)
    if first and eligible is None:
        return torch.bincount(digits, minlength=_BINS)[:_BINS]
    drop = scratch.flags[:n]
    if not first:
        lo = prefix << (shift + _DIGIT)
        hi = (prefix + 1) << (shift + _DIGIT)
        torch.lt(keys, lo, out=drop)
        drop.logical_or_(keys >= hi)
        if eligible is not None:
            drop.logical_or_(eligible.logical_not())
    else:
        assert eligible is not None
        torch.logical_not(eligible, out=drop)
    digits.masked_fill_(drop, _BINS)
    return torch.bincount(digits, minlength=_BINS + 1)[:_BINS]


def select_smallest(pieces: Sequence[Piece], k: int, pool: Pool | None = None) -> Threshold:
    """The cut that prunes exactly the ``k`` smallest-magnitude eligible entries of all pieces."""
    if k <= 0 or not pieces:
        return Threshold(0, nothing=True)
    dtype = pieces[0].importance.dtype
    key_dtype, bits, _ = _KEY_DTYPES[dtype]
    cap, groups = _batches(pieces)
    scratch = _scratch(pool, cap, key_dtype, pieces[0].importance.device)
    prefix = 0
    remaining = k
    tied = 0
    for shift in range(bits - _DIGIT, -1, -_DIGIT):
        hist = None
        for group in groups:
            keys, eligible, _ = _load(pieces, group, scratch)
            h = _histogram(keys, eligible, shift, bits, prefix, scratch)
            hist = h if hist is None else hist + h
        assert hist is not None
        cum = torch.cumsum(hist, 0)
        digit = int(torch.searchsorted(cum, torch.tensor([remaining], device=cum.device, dtype=cum.dtype)).item())
        below = int(cum[digit - 1].item()) if digit > 0 else 0
        remaining -= below
        tied = int(hist[digit].item())
        prefix = (prefix << _DIGIT) | digit
    if remaining == tied:  # every entry equal to the k-th is pruned: a plain cut
        return Threshold(prefix + 1)
    # Ties at the threshold: prune the first `remaining` of them, in order.
    quotas = []
    for group in groups:
        keys, eligible, _ = _load(pieces, group, scratch)
        off = 0
        for i in group:
            n = pieces[i].numel
            eq = keys[off : off + n] == prefix
            if eligible is not None:
                eq &= eligible[off : off + n]
            count = int(torch.count_nonzero(eq).item())
            take = min(count, remaining)
            quotas.append(take)
            remaining -= take
            off += n
    return Threshold(prefix, tuple(quotas))


def keep_flags(piece: Piece, threshold: Threshold, index: int) -> torch.Tensor:
    """Bool tensor shaped like the piece: True where the entry survives this cut."""
    t = piece.importance.detach()
    if threshold.nothing:
        return torch.ones(t.shape, dtype=torch.bool, device=t.device)
    key_dtype, _, clear_sign = _KEY_DTYPES[t.dtype]
    keys = torch.bitwise_and(t.view(key_dtype), clear_sign).reshape(-1)
    keep = keys >= threshold.key
    if threshold.quotas is not None and threshold.quotas[index]:
        eq = keys == threshold.key
        if piece.eligible is not None:
            eq &= piece.eligible.reshape(-1)
        keep[torch.nonzero(eq).view(-1)[: threshold.quotas[index]]] = False
    if piece.eligible is not None:
        keep |= ~piece.eligible.reshape(-1)
    return keep.view(t.shape)


def nparams(amount: int | float, size: int) -> int:
    """torch's ``_compute_nparams_toprune``, with its validation."""
    if isinstance(amount, numbers.Integral):
        if amount > size:
            raise ValueError(f"amount={amount} should be smaller than the number of parameters to prune={size}")
        return int(amount)
    return round(amount * size)


def piece_for(module: nn.Module, name: str) -> Piece:
    """What torch ranks for ``module.<name>`` (``getattr(module, name)``), and what it may prune."""
    default = module._buffers.get(name + "_mask")
    return Piece(getattr(module, name), None if default is None else default == 1)


def new_mask(piece: Piece, default: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """The mask torch registers: the old one (or ones) in the parameter's dtype, newly pruned entries zeroed."""
    t = piece.importance
    if default is None:
        return keep.to(dtype=t.dtype, memory_format=torch.contiguous_format)
    mask = default.detach().to(dtype=t.dtype).clone(memory_format=torch.contiguous_format)
    mask.masked_fill_(keep.logical_not(), 0)
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


def l1_local(module: nn.Module, name: str, amount: int | float, pool: Pool | None = None) -> None:
    """``prune.l1_unstructured(module, name, amount)``: same result, without ``topk``."""
    piece = piece_for(module, name)
    default = module._buffers.get(name + "_mask")
    threshold = select_smallest([piece], nparams(amount, piece.eligible_count()), pool)
    mask = new_mask(piece, default, keep_flags(piece, threshold, 0))
    attach(module, name, prune.L1Unstructured(amount), mask)


def l1_global(params: Sequence[tuple[nn.Module, str]], amount: int | float) -> None:
    """``prune.global_unstructured(params, L1Unstructured, amount=amount)``: same masks and
    ``CustomFromMask`` histories, without concatenating the parameters."""
    pieces = [piece_for(m, n) for m, n in params]
    threshold = select_smallest(pieces, nparams(amount, sum(p.eligible_count() for p in pieces)))
    masks = [
        new_mask(piece, module._buffers.get(name + "_mask"), keep_flags(piece, threshold, i))
        for i, ((module, name), piece) in enumerate(zip(params, pieces))
    ]
    for (module, name), mask in zip(params, masks):
        attach(module, name, prune.CustomFromMask(mask), mask)


def fold_in_place(module: nn.Module, name: str, keep: torch.Tensor) -> None:
    """What ``prune`` then ``prune.remove`` leave, without the re-parametrization in between:
    ``weight *= mask`` in place (same arithmetic: -0.0 and NaN as torch makes them), and
    the parameter moved to the end of ``_parameters`` as ``remove`` re-registers it."""
    param = module._parameters[name]
    assert param is not None
    with torch.no_grad():
        param.mul_(keep)
    module._parameters[name] = module._parameters.pop(name)


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
