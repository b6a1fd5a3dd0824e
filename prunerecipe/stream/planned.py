"""What a streaming plan is made of: the output's tensors (:class:`Entry`), the pruned ones
(:class:`Member`), the global cuts found in passes of their own (:class:`Cut`), and the
:class:`StreamPlan` itself (what ``prunerecipe plan --stream`` prints, the memory bound).
:func:`~prunerecipe.stream.plan.stream_plan` makes one."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.utils.prune as prune
from torch import nn

from ..magnitude import EXACT_TIES_UP_TO
from ..plan import Plan, PlannedStep
from ..text import shown_path
from .format import Source, nbytes

#: torch's methods a stream runs (exactly these classes: a subclass may need the whole model)
#: a global group of at most this many entries is pruned whole, in memory (torch breaks its ties)
RESIDENT_UP_TO = EXACT_TIES_UP_TO
#: the memory bound: this many times the largest tensor, plus SLACK (256 MiB)
TIMES_LARGEST = 4
SLACK = 256 * 2**20
#: bytes per entry torch's random_unstructured takes while it draws and ranks a tensor (rand_like,
#: then topk's values and int64 indices and its workspace): measured 31 (fp32) and 25 (bf16)
RANDOM_BYTES_PER_ENTRY = 32


@dataclass(frozen=True)
class Entry:
    """A tensor of the output: its name, what is written (the model's dtype, as the in-memory run
    loads it) and where it is read (the checkpoint's key, or None when planning without one)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    key: str | None
    stored_dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)

    @property
    def read_bytes(self) -> int:
        return nbytes(self.stored_dtype, self.shape)


@dataclass(frozen=True)
class Member:
    """A target tensor as the steps see it: the entry it is written as, its module and
    parameter names, and ``(step position, index in that step's targets)`` for each step."""

    entry: str
    module_name: str
    param: str
    module_type: str
    steps: tuple[tuple[int, int], ...]

    @property
    def qualname(self) -> str:
        return f"{self.module_name}.{self.param}" if self.module_name else self.param


@dataclass(frozen=True)
class Cut:
    """A global L1 step whose group is cut in passes of its own before it is written."""

    position: int  # in StreamPlan.steps
    members: tuple[str, ...]  # entries, in the step's target order
    dtype: torch.dtype
    raw: bool  # every member is seen as stored (no earlier step, no dtype change): read straight from the map

    def passes(self) -> int:
        bits = {torch.float16: 15, torch.bfloat16: 15, torch.float32: 31, torch.float64: 63}[self.dtype]
        return (bits - 1) // 16 + 1


@dataclass
class StreamPlan:
    """A streaming run, planned: ``str()`` is what ``prunerecipe plan --stream`` prints."""

    plan: Plan
    model: nn.Module
    steps: tuple[PlannedStep, ...]  # the unscheduled steps, in order
    entries: dict[str, Entry]  # every output tensor, in state_dict order
    aliases: dict[str, str]  # tied names left out of the output: {alias: stored name}
    members: dict[str, Member]  # by entry name
    units: list[tuple[str, ...]]  # tensors pruned together (a small global group), each in entry order
    cuts: list[Cut]
    names: tuple[tuple[str, ...], ...]  # per step: the entry of each of its targets, in the step's order
    draws: dict[tuple[int, str | None], int] = field(default_factory=dict)  # (step position, entry or None for a group) -> draws
    source: Source | None = None
    weights: str | None = None
    fmt: str = "dense"
    note: str | None = None  # e.g. a key prefix removed
    stored: dict[str, str] = field(default_factory=dict)  # entry -> the name an hf folder stores it under, where it differs

    @property
    def largest(self) -> Entry:
        return max(self.entries.values(), key=lambda e: max(e.nbytes, e.read_bytes))

    @property
    def drawn(self) -> int:
        """Entries of the largest tensor (or small global group) torch's random_unstructured ranks whole."""
        out = 0
        for position, ps in enumerate(self.steps):
            if ps.method.cls is prune.RandomUnstructured:
                sizes = [math.prod(self.entries[n].shape) for n in self.names[position]]
                out = max(out, sum(sizes) if ps.step.scope == "global" else max(sizes, default=0))
        return out

    @property
    def largest_unit(self) -> tuple[tuple[str, ...], int]:
        """The biggest group of tensors pruned whole in memory (small global groups, merged where
        they overlap), and its bytes."""
        best: tuple[tuple[str, ...], int] = ((), 0)
        for unit in self.units:
            size = sum(max(self.entries[n].nbytes, self.entries[n].read_bytes) for n in unit)
            if len(unit) > 1 and size > best[1]:
                best = (unit, size)
        return best

    @property
    def bound(self) -> int:
        """Bytes of process memory (beyond the interpreter and torch) the run stays under: 4 x the
        largest tensor + 256 MiB; or more where torch's random_unstructured ranks a bigger tensor,
        or small global groups (overlapping ones merged) are pruned whole and outweigh it."""
        e = self.largest
        held = max(max(e.nbytes, e.read_bytes), self.largest_unit[1])
        return max(TIMES_LARGEST * held, RANDOM_BYTES_PER_ENTRY * self.drawn) + SLACK

    @property
    def passes(self) -> int:
        return sum(c.passes() for c in self.cuts) + 1

    def unit_of(self, name: str) -> tuple[str, ...]:
        for unit in self.units:
            if name in unit:
                return unit
        return (name,)

    def describe(self) -> list[str]:
        """The streaming section of ``plan --stream``: passes, tensors and the memory bound."""
        total = sum(e.nbytes for e in self.entries.values())
        read = sum(e.read_bytes for e in self.entries.values())
        lines = [
            f"streaming: {shown_path(self.weights) if self.weights else '(the checkpoint given at apply)'} -> --format {self.fmt}, one tensor at a time"
        ]
        n = 1
        for cut in self.cuts:
            ps = self.steps[cut.position]
            size = sum(self.entries[m].read_bytes for m in cut.members)
            entries = sum(math.prod(self.entries[m].shape) for m in cut.members)
            how = "a histogram of 16 bits of |w| per pass" + (", as stored" if cut.raw else ", earlier steps rerun")
            which = f"pass {n}" if cut.passes() == 1 else f"passes {n}-{n + cut.passes() - 1}"
            lines.append(
                f"  {which} of {self.passes}: read {len(cut.members)} tensors ({_bytes(size)} each pass) for the exact cut of {ps.step.label} "
                f"(global group of {entries} entries; {how})"
            )
            n += cut.passes()
        pruned = len(self.members)
        lines.append(
            f"  pass {n} of {self.passes}: read {len(self.entries)} tensors ({_bytes(read)}), prune {pruned}, write {len(self.entries)} ({_bytes(total)})"
        )
        together = [u for u in self.units if len(u) > 1]
        if together:
            lines.append(f"  {len(together)} small global group(s) pruned whole in memory (ties broken by torch, as in memory)")
        if self.draws:
            lines.append(f"  random steps: {sum(self.draws.values())} draws replayed to start each tensor where the in-memory run starts it")
        e = self.largest
        size = max(e.nbytes, e.read_bytes)
        unit, unit_size = self.largest_unit
        if RANDOM_BYTES_PER_ENTRY * self.drawn > TIMES_LARGEST * max(size, unit_size):
            lines.append(
                f"  memory bound: {RANDOM_BYTES_PER_ENTRY} bytes x {self.drawn} entries (torch's random_unstructured ranks them whole, "
                f"as in memory) + {_bytes(SLACK)} = {_bytes(self.bound)} beyond the interpreter and torch (the file's page cache not counted)"
            )
        elif unit_size > size:
            lines.append(
                f"  memory bound: {TIMES_LARGEST} x {_bytes(unit_size)} (the largest group pruned whole in memory: {len(unit)} tensors, "
                f"{unit[0]} .. {unit[-1]}; overlapping global steps merge their groups) + {_bytes(SLACK)} = "
                f"{_bytes(self.bound)} beyond the interpreter and torch (the file's page cache not counted)"
            )
        else:
            lines.append(
                f"  memory bound: {TIMES_LARGEST} x {_bytes(size)} (largest tensor: {e.name}) + {_bytes(SLACK)} = "
                f"{_bytes(self.bound)} beyond the interpreter and torch (the file's page cache not counted)"
            )
        if self.note:
            lines.append(f"  note: {self.note}")
        return lines

    def __str__(self) -> str:
        return "\n".join(self.describe())

    def to_dict(self) -> dict[str, Any]:
        """What ``plan --stream --json`` prints."""
        e = self.largest
        return {
            "weights": self.weights,
            "format": self.fmt,
            "passes": self.passes,
            "cuts": [
                {"step": self.steps[c.position].step.label, "tensors": len(c.members), "passes": c.passes(), "as_stored": c.raw} for c in self.cuts
            ],
            "tensors": len(self.entries),
            "pruned": len(self.members),
            "bytes_written": sum(x.nbytes for x in self.entries.values()),
            "largest": {"name": e.name, "bytes": max(e.nbytes, e.read_bytes)},
            "memory_bound": self.bound,
            "draws": sum(self.draws.values()),
            "note": self.note,
        }


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
