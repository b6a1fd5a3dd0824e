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

import ctypes
import numbers
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.utils.prune as prune
from torch import nn

try:  # the optional C kernels (setup.py builds them when a compiler is at hand)
    from . import _native as _native_module
except ImportError:  # pragma: no cover - depends on how the package was built
    _native_module = None

#: The fused float32 CPU kernels (prunerecipe/_native.c), or None: not built, or turned off
#: with ``PRUNERECIPE_NATIVE=0``. Results are the same either way; only speed differs.
NATIVE: Any = None if os.environ.get("PRUNERECIPE_NATIVE", "1") == "0" else _native_module

# float dtype -> (integer view dtype, bits, mask that clears the sign bit)
_KEY_DTYPES = {
    torch.float16: (torch.int16, 16, 0x7FFF),
    torch.bfloat16: (torch.int16, 16, 0x7FFF),
    torch.float32: (torch.int32, 32, 0x7FFFFFFF),
    torch.float64: (torch.int64, 64, 0x7FFFFFFFFFFFFFFF),
}
_DIGIT = 16
_BINS = 1 << _DIGIT
_CHUNK = 1 << 18  # entries per pass: scratch memory stays small whatever the layer size
#: Up to this many entries (a tensor, or a global group), a tie at the cut is broken by
#: torch's own topk, so masks equal hand-written code even then (zero-initialized biases
#: are all ties). Beyond it, ties go to the earliest entries: same count, maybe other entries.
EXACT_TIES_UP_TO = 1 << 20


#: Selects over at least this many entries hand their freed scratch back to the system
#: afterwards (see :func:`release_free_memory`).
RELEASE_AFTER = 1 << 20
_libc_trim: Any = None  # None: not looked up yet; False: unavailable; else the C function


def release_free_memory() -> None:
    """Return the C heap's free pages to the system (glibc's ``malloc_trim``), so small
    scratch tensors freed by a select do not stay resident under the masks built next.
    Peak memory then stays at what torch's own re-parametrization holds. A no-op elsewhere."""
    global _libc_trim
    if _libc_trim is None:
        _libc_trim = False
        if sys.platform.startswith("linux"):
            try:  # the process's own symbols: no library search, no subprocess
                trim = ctypes.CDLL(None).malloc_trim
                trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
                _libc_trim = trim
            except (OSError, AttributeError):  # musl and friends have no malloc_trim
                pass
    if _libc_trim:
        _libc_trim(0)


def supported(t: torch.Tensor) -> bool:
    """Whether the fast path handles this tensor (real floating point, not on ``meta``)."""
    return t.dtype in _KEY_DTYPES and t.device.type != "meta"


@dataclass
class Piece:
    """One tensor taking part in a select: what is ranked, and which entries may be pruned."""

    importance: torch.Tensor
    eligible: torch.Tensor | None = None  # bool, same shape; None means every entry
    _flat: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return self.importance.numel()

    def eligible_count(self) -> int:
        return self.numel if self.eligible is None else int(torch.count_nonzero(self.eligible).item())

    def raw(self) -> torch.Tensor:
        """The tensor as flat integers (sign bit included), in logical order; a view when contiguous."""
        if self._flat is None:
            t = self.importance.detach()
            self._flat = (t.view(-1) if t.is_contiguous() else t.reshape(-1)).view(_KEY_DTYPES[t.dtype][0])
        return self._flat

    def flat_eligible(self) -> torch.Tensor | None:
        return None if self.eligible is None else self.eligible.reshape(-1)


@dataclass(frozen=True)
class Threshold:
    """Prune eligible entries whose key is below ``key``; with ``quotas``, also that many
    entries whose key equals ``key``, per piece, in order. ``splits``, when the C kernels
    found them, says where each piece's quota ends (a position at or after the last tie it
    takes and before the first it leaves; -1 for none): a fold then prunes ``<= key`` up to
    there and ``< key`` after it, in parallel. Not part of equality: it is where, not what."""

    key: int
    quotas: tuple[int, ...] | None = None
    nothing: bool = False
    splits: tuple[int, ...] | None = field(default=None, compare=False)


@dataclass(frozen=True, eq=False)
class Pending:
    """A group's cut that the C kernels narrowed to one small bin of keys without keeping
    candidates (so no fresh memory for them): ``below`` entries of the group have keys under
    ``lo``, ``count`` lie in ``[lo, hi]``, and the k-th smallest is among those.
    :func:`fold_all` finds it in the same pass that masks the weights, and prunes exactly what
    the :class:`Threshold` would (ties earliest first). Only a fold takes it; compared by
    identity: every piece of the group shares the one object."""

    k: int
    lo: int
    hi: int
    below: int
    count: int
    pieces: tuple[Piece, ...]

    def exact(self, pool: Pool | None = None) -> Threshold:
        """The exact cut, the slow way (when the kernels cannot do the fold)."""
        return _select_torch(list(self.pieces), self.k, pool)


Pool = dict  # name, dtype, device -> a reusable flat buffer: lets consecutive calls share scratch
Segment = tuple  # (piece index, start, stop)
_ARENA = "arena"  # pool key: (bytes tensor, [next free offset]) that scratch buffers are carved from


def lend(pool: Pool, storage: torch.Tensor) -> None:
    """Let ``pool`` carve its scratch from ``storage``, a tensor allocated for later use and not
    yet written (a mask about to be built, say): the select then needs no memory of its own.
    The caller clears the pool before it writes ``storage``."""
    if storage.is_contiguous() and storage.numel() > 0:
        pool[_ARENA] = (storage.view(-1).view(torch.uint8), [0])


def _buffer(pool: Pool | None, name: str, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat scratch tensor of ``size`` entries, reused through ``pool`` when one is given."""
    key = (name, dtype, str(device))
    buf = pool.get(key) if pool is not None else None
    if buf is None or buf.numel() < size:
        buf = None
        arena = pool.get(_ARENA) if pool is not None else None
        if arena is not None and arena[0].device == torch.device(device) and size <= _CHUNK:
            room, used = arena
            itemsize = torch.empty((), dtype=dtype).element_size()
            start = -(-used[0] // 64) * 64  # cache-line aligned, so every view is aligned for its dtype
            for entries in (_CHUNK, size):  # room for the largest request (no caller asks for more), else this one
                stop = start + entries * itemsize
                if stop <= room.numel():
                    buf = room[start:stop].view(dtype)
                    used[0] = stop
                    break
        if buf is None:
            buf = torch.empty(max(size, 1), dtype=dtype, device=device)
        if pool is not None:
            pool[key] = buf
    return buf[:size]


def _groups(pieces: Sequence[Piece], chunk: int = _CHUNK) -> list[list[Segment]]:
    """Cut the pieces into segments of at most ``chunk`` entries, packing small ones together."""
    groups: list[list[Segment]] = []
    current: list[Segment] = []
    used = 0
    for i, piece in enumerate(pieces):
        n, start = piece.numel, 0
        while start < n:
            take = min(n - start, chunk - used)
            current.append((i, start, start + take))
            used += take
            start += take
            if used == chunk:
                groups.append(current)
                current, used = [], 0
    if current:
        groups.append(current)
    return groups


def _load(pieces: Sequence[Piece], group: list[Segment], pool: Pool | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw integer keys (sign bit included) and eligibility of a group, flat and in order.

    A single segment is a view; several are copied side by side into scratch.
    """
    if len(group) == 1:
        i, a, b = group[0]
        el = pieces[i].flat_eligible()
        return pieces[i].raw()[a:b], (el[a:b] if el is not None else None)
    total = sum(b - a for _, a, b in group)
    first = pieces[group[0][0]].raw()
    raw = _buffer(pool, "raw", total, first.dtype, first.device)
    any_eligible = any(pieces[i].eligible is not None for i, _, _ in group)
    eligible = _buffer(pool, "eligible", total, torch.bool, first.device) if any_eligible else None
    off = 0
    for i, a, b in group:
        raw[off : off + b - a].copy_(pieces[i].raw()[a:b])
        if eligible is not None:
            el = pieces[i].flat_eligible()
            eligible[off : off + b - a].copy_(el[a:b]) if el is not None else eligible[off : off + b - a].fill_(True)
        off += b - a
    return raw, eligible


def _histogram(
    raw: torch.Tensor,
    eligible: torch.Tensor | None,
    shift: int,
    bits: int,
    prefix: int,
    pool: Pool | None,
    hist: torch.Tensor,
    found: list | None = None,
) -> None:
    """Add to ``hist`` the counts of the 16-bit digit of ``|w|``'s key at ``shift``, among
    eligible entries whose higher digits equal ``prefix``. ``raw`` is the integer view of
    ``w`` (sign bit included). Accumulating in place keeps the heap from fragmenting."""
    n = raw.numel()
    digits = _buffer(pool, "digits", n, torch.int32, raw.device)
    top = bits - _DIGIT  # shift of the first (most significant) digit
    if raw.dtype == torch.int64:  # fp64: four rounds; rare enough to keep simple
        keys = raw & _KEY_DTYPES[torch.float64][2]
        if shift == top:
            digits.copy_(keys >> shift)
            candidates = eligible
        else:
            lo = prefix << (shift + _DIGIT)
            candidates = (keys >= lo) & (keys < lo + (1 << (shift + _DIGIT)))
            if eligible is not None:
                candidates &= eligible
            digits.copy_((keys >> shift) & (_BINS - 1))
    else:
        # The first digit of the key: the top 16 bits of w with the sign bit cleared.
        if raw.dtype == torch.int16:
            torch.bitwise_and(raw, 0x7FFF, out=digits)
        else:
            torch.bitwise_right_shift(raw, top, out=digits)
            digits.bitwise_and_(0x7FFF)
        if shift == top:
            candidates = eligible
        else:  # fp32, second round: entries whose first digit is `prefix`, and they are few
            chosen = _buffer(pool, "chosen", n, torch.bool, raw.device)
            torch.eq(digits, prefix, out=chosen)
            if eligible is not None:
                chosen.logical_and_(eligible)
            spare = _buffer(pool, "index", n, torch.int64, raw.device)
            index = torch.nonzero(chosen, out=spare.view(-1, 1)[:0]).view(-1)
            low = torch.bitwise_and(raw[index], _BINS - 1).to(torch.int64)
            hist.index_add_(0, low, torch.ones_like(low))
            if found is not None:  # kept, compactly, to count ties per tensor without another pass
                if index.numel() > _CHUNK // 16:  # many equal leading digits (exact zeros, say): recount later
                    found.append(None)
                else:
                    found.append((low.to(torch.int32), index.to(torch.int32)))
            return
    if candidates is not None:
        drop = _buffer(pool, "drop", n, torch.bool, raw.device)
        torch.logical_not(candidates, out=drop)
        digits.masked_fill_(drop, _BINS)
    hist.add_(torch.bincount(digits, minlength=_BINS + 1)[:_BINS])


def native_ready() -> bool:
    """Whether the C kernels may run now: built and on, and subnormals not flushed to zero
    (``torch.set_flush_denormal(True)`` acts on the calling thread only, so torch's own pool
    threads may or may not flush: no kernel could match it bit for bit, and the torch path
    is used). Costs a tiny torch op: ask once per batch of tensors, not per tensor."""
    return NATIVE is not None and not flushes_subnormals()


def native_takes(t: torch.Tensor) -> bool:
    """Whether the C kernels handle this tensor: float32, on the CPU, contiguous."""
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()


def native_ok(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the C kernels may run now on all of these tensors."""
    return native_ready() and all(native_takes(t) for t in tensors)


# The smallest positive subnormal float32, made from its bits (a float literal would itself be
# flushed to zero when the module is imported with flush-to-zero on).
_SUBNORMAL = torch.tensor([1], dtype=torch.int32).view(torch.float32)


def flushes_subnormals() -> bool:
    """Whether ``torch.set_flush_denormal(True)`` is in effect on this thread."""
    return not bool(_SUBNORMAL.ne(0).item())


def _args(tensors: Sequence[torch.Tensor]) -> tuple[list[int], list[int]]:
    return [t.data_ptr() for t in tensors], [t.numel() for t in tensors]


def native_scan(tensors: Sequence[torch.Tensor]) -> tuple[list[int], list[int]]:
    """Zero and non-finite entries of each tensor, in one read pass (``native_ok`` tensors only)."""
    ptrs, sizes = _args(tensors)
    zeros, nonfinite = NATIVE.scan(ptrs, sizes, torch.get_num_threads(), 1)
    return zeros, nonfinite


def select_counting(pieces: Sequence[Piece], k: int, pool: Pool | None = None) -> tuple[Threshold, list[int] | None, list[int] | None]:
    """:func:`select_smallest`, and, when the C kernels did the select, each piece's zero and
    non-finite entries, counted in the same pass (else None, None)."""
    return select_many([(pieces, k)], pool)[0]


def select_many(
    groups: Sequence[tuple[Sequence[Piece], int]], pool: Pool | None = None, defer_above: int | None = None
) -> list[tuple[Threshold | Pending, list[int] | None, list[int] | None]]:
    """:func:`select_counting` for several independent groups of pieces (a global cut: one
    group; per-tensor cuts: a group per tensor). The groups the C kernels take are all done in
    one call: one sample and one read pass for all of them, instead of one per group. A group
    whose sample's bracket missed, or that the kernels do not take, gets the torch path.

    With ``defer_above``, a group of more entries than that may come back :class:`Pending`
    (for :func:`fold_all` only): the select then keeps no candidates for it."""
    out: list = [None] * len(groups)
    native = []
    if native_ready():
        for j, (pieces, k) in enumerate(groups):
            tensors = [p.importance.detach() for p in pieces]
            if tensors and 0 < k <= sum(t.numel() for t in tensors) and all(p.eligible is None and native_takes(t) for p, t in zip(pieces, tensors)):
                native.append((j, tensors))
    if native:
        ptrs: list[int] = []
        sizes: list[int] = []
        ends: list[int] = []
        for _, tensors in native:
            more_ptrs, more_sizes = _args(tensors)
            ptrs += more_ptrs
            sizes += more_sizes
            ends.append(len(ptrs))
        ks = [groups[j][1] for j, _ in native]
        try:
            defer = -1 if defer_above is None else defer_above
            keys, belows, ties, zeros, nonfinite, splits = NATIVE.select_groups(ptrs, sizes, ends, ks, torch.get_num_threads(), 1, -1, -1, -1, defer)
        except MemoryError:  # no room for the kernels' scratch: the torch path needs less
            keys = None
        if keys is not None:
            first = 0
            for (j, _), end, key, below in zip(native, ends, keys, belows):
                part = slice(first, end)
                first = end
                if key is None:  # the sample's bracket missed: exact, slower
                    out[j] = (_select_torch(groups[j][0], groups[j][1], pool), zeros[part], nonfinite[part])
                    continue
                if isinstance(key, tuple):  # narrowed to a bin: the fold finishes it
                    lo, hi, count = key
                    out[j] = (Pending(groups[j][1], lo, hi, below, count, tuple(groups[j][0])), zeros[part], nonfinite[part])
                    continue
                remaining = groups[j][1] - below
                if remaining == sum(ties[part]):  # every entry equal to the k-th is pruned: a plain cut
                    out[j] = (Threshold(key + 1), zeros[part], nonfinite[part])
                else:
                    out[j] = (_split_ties(key, remaining, ties[part], tuple(splits[part])), zeros[part], nonfinite[part])
    for j, (pieces, k) in enumerate(groups):
        if out[j] is None:
            out[j] = (_select_torch(pieces, k, pool), None, None)
    return out


def select_smallest(pieces: Sequence[Piece], k: int, pool: Pool | None = None) -> Threshold:
    """The cut that prunes exactly the ``k`` smallest-magnitude eligible entries of all pieces.

    Always the torch path: it can work inside a mask it is about to write (``lend``), so
    runs that keep masks peak at torch's own re-parametrization. The C kernels' select needs
    a few MB of scratch of its own, which measurably lifted that peak (705.3 vs 704.3 MB at
    92M weights); it serves the one-shot fold (:func:`select_counting`), whose budget is far
    larger and whose time it sets."""
    return _select_torch(pieces, k, pool)


def _select_torch(pieces: Sequence[Piece], k: int, pool: Pool | None = None) -> Threshold:
    """:func:`select_smallest` in PyTorch ops: 16-bit radix digits counted with ``bincount``."""
    if k <= 0 or not pieces:
        return Threshold(0, nothing=True)
    if pool is None:
        pool = {}
    dtype = pieces[0].importance.dtype
    _, bits, clear_sign = _KEY_DTYPES[dtype]
    groups = _groups(pieces)
    prefix = 0
    remaining = k
    tied = 0
    found: list = []
    device = pieces[0].importance.device
    hist = torch.zeros(_BINS, dtype=torch.int64, device=device)
    for shift in range(bits - _DIGIT, -1, -_DIGIT):
        hist.zero_()
        for group in groups:
            raw, eligible = _load(pieces, group, pool)
            _histogram(raw, eligible, shift, bits, prefix, pool, hist, found if shift == 0 else None)
        cum = torch.cumsum(hist, 0)
        digit = int(torch.searchsorted(cum, torch.tensor([remaining], device=cum.device, dtype=cum.dtype)).item())
        below = int(cum[digit - 1].item()) if digit > 0 else 0
        remaining -= below
        tied = int(hist[digit].item())
        prefix = (prefix << _DIGIT) | digit
    if remaining == tied:  # every entry equal to the k-th is pruned: a plain cut
        return Threshold(prefix + 1)
    # Ties at the threshold: prune the first `remaining` of them, in order.
    per_piece = [0] * len(pieces)
    if len(found) == len(groups) and all(f is not None for f in found):  # fp32: candidates were kept
        digit = prefix & (_BINS - 1)
        for group, (low, index) in zip(groups, found):
            at = low == digit
            if len(group) == 1:
                per_piece[group[0][0]] += int(at.sum().item())
                continue
            at = index[at]
            off = 0
            for i, a, b in group:
                per_piece[i] += int(((at >= off) & (at < off + b - a)).sum().item())
                off += b - a
    else:
        for group in groups:
            raw, eligible = _load(pieces, group, pool)
            eq = torch.bitwise_and(raw, clear_sign) == prefix
            if eligible is not None:
                eq &= eligible
            off = 0
            for i, a, b in group:
                per_piece[i] += int(torch.count_nonzero(eq[off : off + b - a]).item())
                off += b - a
    return _split_ties(prefix, remaining, per_piece)


def _split_ties(key: int, remaining: int, ties: Sequence[int], splits: tuple[int, ...] | None = None) -> Threshold:
    """The cut at ``key`` that also prunes ``remaining`` of the entries equal to it: earliest
    first, piece by piece (``ties`` counts them per piece)."""
    quotas = []
    for count in ties:
        take = min(count, remaining)
        quotas.append(take)
        remaining -= take
    return Threshold(key, tuple(quotas), splits=splits)


def _write_keep(piece: Piece, threshold: Threshold, index: int, out: torch.Tensor, pool: Pool | None) -> None:
    """Write 1 (kept) / 0 (pruned) for every entry of ``piece`` into the flat ``out``, chunk by chunk."""
    if threshold.nothing:
        out.fill_(1)
        return
    raw = piece.raw()
    eligible = piece.flat_eligible()
    clear_sign = _KEY_DTYPES[piece.importance.dtype][2]
    quota = threshold.quotas[index] if threshold.quotas is not None else 0
    # A float ``out`` as wide as the keys holds each chunk's keys until they become flags: no
    # key buffer of our own (torch compares element by element, so writing over its input is safe).
    in_place = out.dtype.is_floating_point and out.element_size() == raw.element_size() and out.is_contiguous()
    keys_all = None if in_place else _buffer(pool, "keys", min(raw.numel(), _CHUNK), raw.dtype, raw.device)
    for a in range(0, raw.numel(), _CHUNK):
        b = min(a + _CHUNK, raw.numel())
        part = out[a:b]
        keys = part.view(raw.dtype) if keys_all is None else keys_all[: b - a]
        torch.bitwise_and(raw[a:b], clear_sign, out=keys)
        ties = None
        if quota:
            ties = keys == threshold.key
            if eligible is not None:
                ties &= eligible[a:b]
        if threshold.key > clear_sign:  # above every key (the k-th was the top NaN pattern): all pruned;
            part.zero_()  # compared as is, the key would not fit the integer dtype and wrap
        else:
            torch.ge(keys, threshold.key, out=part)
        if ties is not None:
            at = torch.nonzero(ties).view(-1)[:quota]
            part[at] = 0
            quota -= at.numel()
        if eligible is not None:
            part.masked_fill_(eligible[a:b].logical_not(), 1)


def keep_flags(piece: Piece, threshold: Threshold, index: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """Shaped like the piece: 1 where the entry survives this cut, 0 where it is pruned."""
    out = torch.empty(piece.importance.shape, dtype=dtype, device=piece.importance.device)
    _write_keep(piece, threshold, index, out.view(-1), None)
    return out


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


def new_mask(
    piece: Piece, default: torch.Tensor | None, threshold: Threshold, index: int, pool: Pool | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The mask torch registers: the old one (or ones) in the parameter's dtype, newly pruned entries zeroed.
    Written into ``out`` (contiguous, the parameter's shape and dtype) when given."""
    t = piece.importance
    mask = torch.empty_like(t, memory_format=torch.contiguous_format) if out is None else out  # as torch's masks are
    flat = mask.view(-1)
    _write_keep(piece, threshold, index, flat, pool)
    if default is not None:  # entries it could not prune keep their old mask value (keep = 1 there)
        flat.mul_(default.detach().reshape(-1).to(dtype=t.dtype))
    return mask


def attach(module: nn.Module, name: str, method: prune.BasePruningMethod, mask: torch.Tensor) -> prune.BasePruningMethod:
    """Install ``method`` with a precomputed ``mask`` exactly as ``BasePruningMethod.apply`` would."""
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
        module.register_parameter(name + "_orig", orig)
        del module._parameters[name]
    module.register_buffer(name + "_mask", mask)
    setattr(module, name, hook.apply_mask(module))
    module.register_forward_pre_hook(hook)
    return hook


def kept_entries(mask: torch.Tensor) -> int:
    """How many entries of a 0/1 mask are 1: float sums over slices small enough to be exact."""
    flat = mask.detach().reshape(-1)
    step = 1 << 24
    acc = torch.float32 if flat.dtype in (torch.float16, torch.bfloat16) else None
    return sum(int(flat[a : a + step].sum(dtype=acc).item()) for a in range(0, flat.numel(), step))


# float dtype -> the key of its smallest normal number: keys below it are zero or subnormal
_SMALLEST_NORMAL_KEY = {torch.float16: 0x0400, torch.bfloat16: 0x0080, torch.float32: 0x00800000, torch.float64: 0x0010000000000000}


def _zeros_after(piece: Piece, default: torch.Tensor | None, threshold: Threshold, mask: torch.Tensor) -> int | None:
    """Zero entries of ``orig * mask`` after a first cut, without a pass over the weights: every
    surviving entry has ``|w|`` at or above a cut that is a normal number, so it is not zero
    (a cut among subnormals is left to a real count: with ``torch.set_flush_denormal(True)``
    subnormals compare equal to zero)."""
    if default is not None or threshold.nothing or threshold.key < _SMALLEST_NORMAL_KEY[piece.importance.dtype]:
        return None
    return piece.numel - kept_entries(mask)


def _blank_mask(t: torch.Tensor) -> torch.Tensor:
    """A mask to be written: contiguous, as torch's are, and not yet touched (so not yet resident)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _select_into(pieces: Sequence[Piece], k: int, masks: list[torch.Tensor]) -> tuple[Threshold, bool]:
    """The cut for ``k`` entries, found inside ``masks`` before they are written: the select
    borrows a mask's memory as scratch, so peak memory is the masks and the masked weights, as
    for torch's own re-parametrization, and nothing more. Also says whether the selection was
    large enough (and on the host) to hand freed heap back afterwards."""
    scratch: Pool = {}
    lend(scratch, max(masks, key=lambda m: m.numel() * m.element_size()))
    threshold = select_smallest(pieces, k, scratch)
    scratch.clear()
    large = sum(p.numel for p in pieces) >= RELEASE_AFTER and masks[0].device.type == "cpu"  # the C heap is the host's
    if large:
        release_free_memory()
    return threshold, large


def _write_masks(
    params: Sequence[tuple[nn.Module, str]],
    pieces: Sequence[Piece],
    defaults: Sequence[torch.Tensor | None],
    threshold: Threshold,
    masks: list[torch.Tensor],
    large: bool,
    zeros: dict | None,
) -> None:
    """Write every mask; record the zeros after, where they are known without counting."""
    for i, ((module, name), piece, default, mask) in enumerate(zip(params, pieces, defaults, masks)):
        new_mask(piece, default, threshold, i, None, out=mask)
        if zeros is not None:
            after = _zeros_after(piece, default, threshold, mask)
            if after is not None:
                zeros[(id(module), name)] = after
    if threshold.quotas is not None and large:
        release_free_memory()  # splitting ties allocates a little per chunk


def l1_local(module: nn.Module, name: str, amount: int | float, zeros: dict | None = None) -> None:
    """``prune.l1_unstructured(module, name, amount)``: same result, without ``topk``.
    ``zeros`` gets ``(id(module), name) -> zero entries after`` when that is known for free."""
    piece = piece_for(module, name)
    mask = _blank_mask(piece.importance)
    threshold, large = _select_into([piece], nparams(amount, piece.eligible_count()), [mask])
    if threshold.quotas is not None and piece.numel <= EXACT_TIES_UP_TO:
        del mask
        prune.L1Unstructured.apply(module, name, amount=amount)  # ties: let torch pick, as by hand
        return
    _write_masks([(module, name)], [piece], [module._buffers.get(name + "_mask")], threshold, [mask], large, zeros)
    attach(module, name, prune.L1Unstructured(amount), mask)


def l1_global(params: Sequence[tuple[nn.Module, str]], amount: int | float, zeros: dict | None = None) -> None:
    """``prune.global_unstructured(params, L1Unstructured, amount=amount)``: same masks and
    ``CustomFromMask`` histories, without concatenating the parameters. ``zeros`` as for
    :func:`l1_local`."""
    pieces = [piece_for(m, n) for m, n in params]
    masks = [_blank_mask(p.importance) for p in pieces]
    threshold, large = _select_into(pieces, nparams(amount, sum(p.eligible_count() for p in pieces)), masks)
    if threshold.quotas is not None and sum(p.numel for p in pieces) <= EXACT_TIES_UP_TO:
        del masks
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)  # ties: torch picks
        return
    defaults = [m._buffers.get(n + "_mask") for m, n in params]
    _write_masks(params, pieces, defaults, threshold, masks, large, zeros)
    for (module, name), mask, default in zip(params, masks, defaults):
        if default is not None:
            # torch multiplies the old mask in twice (once building the global mask, once more in
            # CustomFromMask): a no-op for 0/1 masks, the square for any other value
            mask = mask * default.detach().to(dtype=mask.dtype)
        attach(module, name, prune.CustomFromMask(mask), mask)


def fold_in_place(module: nn.Module, name: str, piece: Piece, threshold: Threshold, index: int, pool: Pool) -> None:
    """The data side of ``prune`` then ``prune.remove``, without the re-parametrization in
    between: ``weight *= mask`` in place (the same arithmetic, so -0.0 and NaN come out as
    torch makes them). :func:`fold_all` also moves the parameters as ``remove`` does."""
    param = module._parameters[name]
    assert param is not None
    splits_ties = threshold.quotas is not None and threshold.quotas[index] > 0
    with torch.no_grad():
        if param.is_contiguous() and not splits_ties:
            flat = param.view(-1)
            mask = _buffer(pool, "mask", min(flat.numel(), _CHUNK), param.dtype, param.device)
            plain = Threshold(threshold.key, None, threshold.nothing)
            for a in range(0, flat.numel(), _CHUNK):
                b = min(a + _CHUNK, flat.numel())
                _write_keep(Piece(flat[a:b]), plain, 0, mask[: b - a], pool)
                flat[a:b].mul_(mask[: b - a])
        else:  # ties to split across chunks, or unusual strides: one whole-tensor mask
            param.mul_(keep_flags(piece, threshold, index, param.dtype))


Fold = tuple  # (module, name, piece, threshold, index in the threshold's pieces)


def fold_all(folds: Sequence[Fold], pool: Pool) -> dict[tuple[int, str], int]:
    """:func:`fold_in_place` for each fold, in order. The float32 CPU tensors go through the C
    kernels in threaded passes, which also count their zeros after: returned, keyed by
    ``(id(module), name)``. A :class:`Pending` cut is finished in its fold's own pass."""
    ready = native_ready()
    native: list[Fold] = []
    pending: dict[int, list[Fold]] = {}  # id(cut) -> the folds of its group
    rest: list[Fold] = []
    for fold in folds:
        cut = fold[3]
        if isinstance(cut, Pending) and ready and all(native_takes(p.importance) for p in cut.pieces):
            pending.setdefault(id(cut), []).append(fold)
        elif ready and not isinstance(cut, Pending) and native_takes(fold[0]._parameters[fold[1]]):
            native.append(fold)
        else:
            rest.append(fold)
    done: list[Fold] = []  # the pending folds, group after group, each in its pieces' order
    ends: list[int] = []
    for group in pending.values():
        group.sort(key=lambda fold: fold[4])
        if [fold[4] for fold in group] != list(range(len(group[0][3].pieces))):
            raise ValueError("a pending cut's folds must cover each of its pieces once")
        done += group
        ends.append(len(done))
    zeros: dict[tuple[int, str], int] = {}
    threads = torch.get_num_threads()
    if done:
        bins = [group[0][3] for group in pending.values()]
        params = [module._parameters[name] for module, name, *_ in done]
        ptrs, sizes = _args(params)
        try:
            after, _ = NATIVE.fold_pending(
                ptrs, sizes, ends, [b.k for b in bins], [b.lo for b in bins], [b.hi for b in bins], [b.below for b in bins], [b.count for b in bins], threads, 1
            )
        except MemoryError:  # raised before anything is written: the exact cuts, the slow way
            rest += done
        else:
            _record(done, params, after, zeros)
    if native:
        params = [module._parameters[name] for module, name, *_ in native]
        cuts = [0 if th.nothing else th.key for *_, th, _ in native]
        quotas = [th.quotas[i] if th.quotas is not None else 0 for *_, th, i in native]
        splits = [th.splits[i] if th.splits is not None else -1 for *_, th, i in native]
        ptrs, sizes = _args(params)
        try:
            after = NATIVE.fold(ptrs, sizes, cuts, quotas, splits, threads, 1)
        except MemoryError:  # raised before anything is written
            rest += native
        else:
            _record(native, params, after, zeros)
    exact: dict[int, Threshold] = {}
    for module, name, piece, cut, index in rest:
        if isinstance(cut, Pending):  # the kernels cannot finish it here: the exact cut, the slow way
            cut = exact.setdefault(id(cut), cut.exact(pool))
        fold_in_place(module, name, piece, cut, index, pool)
    for module, name, *_ in folds:  # prune.remove moves each parameter to the end, in call order
        module._parameters[name] = module._parameters.pop(name)
    return zeros


def _record(folds: Sequence[Fold], params: Sequence[torch.Tensor], after: Sequence[int], zeros: dict[tuple[int, str], int]) -> None:
    for (module, name, *_), param, count in zip(folds, params, after):
        torch.autograd.graph.increment_version(param)  # written in place, as param.mul_ would count it
        zeros[(id(module), name)] = count


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
