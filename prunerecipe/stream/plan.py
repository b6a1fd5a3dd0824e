"""What a streaming run will do, decided from the model's shapes and the checkpoint's header
before any weight is read: the tensors written and where each is read, which global cuts need
a pass of their own, which tensors are pruned together, what random steps draw, and the memory
bound. Anything a stream cannot do exactly as the in-memory run does is refused here, naming the
step.

A tensor is pruned on its own: read, its steps run in order (torch's own methods, through the
same code as :func:`~prunerecipe.apply.apply_recipe`), written. Three things reach beyond one
tensor, and each is settled ahead:

- a ``scope: global`` L1 step over more than :data:`RESIDENT_UP_TO` entries needs its group's
  exact cut before any member is written: passes read the group first, a histogram of 16 bits
  of ``|w|``'s key per pass (:class:`~prunerecipe.magnitude.DigitCut`: one pass for 16-bit
  floats, two for float32), its memory bounded by the histograms; members the step sees as
  stored are read straight from the map, others have their earlier steps run again; ties at
  the cut go earliest first, as in memory;
- a smaller global group is pruned whole, in memory, so that torch's ``topk`` breaks its ties as
  in the in-memory run (``global_unstructured`` itself runs on it);
- a random step draws from the global generator in the plan's order: the number each target
  draws is known from the plan, so the generator state before each target is found ahead by
  skipping draws (:mod:`prunerecipe.rng`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.utils.prune as prune
from torch import nn

from ..checkpoint.hf import tied_aliases
from ..checkpoint.hfnames import checkpoint_names
from ..checkpoint.read import SAFETENSORS_SUFFIX, suffix_of
from ..checkpoint.restore import check_fit, fit_prefix
from ..errors import CheckpointError, Problem, RecipeError, problem
from ..magnitude import EXACT_TIES_UP_TO, supported
from ..plan import Plan, PlannedStep, plan_recipe
from ..rng import is_random
from ..spec import Recipe
from ..text import shown_path
from .format import DTYPES, Source, nbytes
from .refusals import random_draws, unstreamable

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


def stream_plan(
    model: nn.Module,
    recipe: Recipe,
    weights: str | None,
    *,
    fmt: str = "dense",
    out: str | None = None,
    strip_prefix: str | None = None,
) -> StreamPlan:
    """Plan a streaming run of ``recipe`` over the checkpoint ``weights`` for ``model`` (built on
    the ``meta`` device: shapes and dtypes are all it needs), reading no weight.

    Args:
        model: the model the checkpoint belongs to (on ``meta``, or real: only shapes are used).
        recipe: the recipe.
        weights: a safetensors file, shard index or model folder (None: plan from the model's
            shapes alone, as ``plan --stream`` does without ``--weights``).
        fmt: the output format, ``dense`` or ``hf``.
        out: the output path (its suffix is checked for ``dense``).
        strip_prefix: as for :func:`~prunerecipe.checkpoint.fit_prefix`.

    Returns:
        The :class:`StreamPlan`.

    Raises:
        RecipeError: every step a stream cannot run, located at the step; a checkpoint that does
            not fit the model, carries masks, or is not safetensors; an output it cannot write.
    """
    if fmt not in ("dense", "hf"):
        raise CheckpointError(
            problem(
                f"--format {fmt} cannot be streamed: it keeps *_orig/*_mask for every pruned tensor; use --format dense or hf",
                source="--format",
                code="stream",
            )
        )
    if fmt == "dense" and out is not None and suffix_of(out) != SAFETENSORS_SUFFIX:
        raise CheckpointError(
            problem(
                f"--stream writes safetensors: use a .safetensors output (not {suffix_of(out) or 'no suffix'}), or --format hf",
                source=out,
                code="stream",
            )
        )
    if fmt == "hf" and not hasattr(getattr(model, "config", None), "to_json_file"):
        raise CheckpointError(
            problem(
                f"--format hf needs a Hugging Face model (one with a transformers config); {type(model).__name__} has none",
                source=out or "",
                code="output",
            )
        )
    plan = plan_recipe(model, recipe)
    steps = tuple(ps for ps in plan.steps if not ps.scheduled)
    problems = unstreamable(recipe, plan)

    state = model.state_dict(keep_vars=True)
    aliases = tied_aliases(model, list(state))
    source = Source(weights) if weights is not None else None
    note = None
    keys: dict[str, str | None] = {name: None for name in state}
    stored: dict[str, torch.dtype] = {name: t.dtype for name, t in state.items()}
    stored_as, joined = checkpoint_names(model, [n for n in state if n not in aliases])
    if source is not None:
        shapes = source.shapes()
        fitted, removed = fit_prefix(shapes, model, strip_prefix, convert=False)
        if any(n not in fitted for n in joined):
            raise CheckpointError(_joined(joined, weights or ""))
        if removed and not strip_prefix:
            note = f"removed the key prefix {removed!r}, which every key had and the model has not"
        fit = check_fit(model, fitted)
        if fit.restored:
            raise CheckpointError(
                problem(
                    f"carries pruning masks (*_orig/*_mask, e.g. {fit.restored[0]}); --stream reads dense checkpoints: "
                    "apply it in memory, or write it with --format dense first",
                    source=weights or "",
                    code="stream",
                )
            )
        by_id = {id(v): k for k, v in shapes.items()}
        for name in state:
            value = fit.state_dict[name]
            keys[name] = by_id[id(value)]
            stored[name] = value.dtype
    if joined and fmt == "hf":
        raise CheckpointError(_joined(joined, out or ""))
    entries = {name: Entry(name, t.dtype, tuple(t.shape), keys[name], stored[name]) for name, t in state.items() if name not in aliases}
    unknown = [f"{e.name} ({e.dtype})" for e in entries.values() if e.dtype not in DTYPES]
    if unknown:
        problems.append(problem(f"safetensors cannot store {', '.join(unknown[:4])}", source=out or "", code="stream"))

    # every target tensor, by the entry it is written as (a module registered under two names is one tensor)
    entry_of = {id(t): name for name, t in state.items() if name not in aliases}
    members: dict[str, Member] = {}
    for position, ps in enumerate(steps):
        for index, pt in enumerate(ps.targets):
            t = pt.target
            name = entry_of[id(t.original)]
            old = members.get(name)
            touches = (old.steps if old else ()) + ((position, index),)
            members[name] = Member(name, t.module_name, t.param, t.module_type, touches)

    order = {name: i for i, name in enumerate(entries)}
    parent = {name: name for name in members}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    cuts: list[Cut] = []
    counts: dict[tuple[int, str | None], int] = {}
    step_names: list[tuple[str, ...]] = []
    for position, ps in enumerate(steps):
        names = [entry_of[id(pt.target.original)] for pt in ps.targets]
        step_names.append(tuple(names))
        cls = ps.method.cls
        size = sum(math.prod(entries[n].shape) for n in names)
        if ps.step.scope == "global" and names:
            if cls is prune.Identity:
                pass  # masks of ones, tensor by tensor: nothing ties the group's tensors together
            elif size <= RESIDENT_UP_TO:
                for n in names[1:]:
                    parent[root(n)] = root(names[0])
            elif cls is prune.L1Unstructured:
                dtypes = {entries[n].dtype for n in names}
                if len(dtypes) != 1 or not supported(torch.empty(0, dtype=next(iter(dtypes)))):
                    problems.append(
                        recipe.problem(
                            ps.step.path,
                            f"a streamed global step over more than {RESIDENT_UP_TO} entries needs all its targets in one dtype, "
                            f"float16, bfloat16, float32 or float64; they are {', '.join(sorted(str(d).replace('torch.', '') for d in dtypes))}",
                            code="stream",
                        )
                    )
                    continue
                raw = all(members[n].steps[0][0] == position and entries[n].stored_dtype == entries[n].dtype for n in names)
                cuts.append(Cut(position, tuple(names), next(iter(dtypes)), raw))
            else:
                problems.append(
                    recipe.problem(
                        ps.step.path,
                        f"{ps.method.name} with scope: global over {size} entries cannot be streamed exactly: torch draws and ranks the "
                        f"whole group at once (a stream can hold groups of up to {RESIDENT_UP_TO} entries); apply it in memory",
                        code="stream",
                    )
                )
        if is_random(cls) and names:
            problems.extend(random_draws(recipe, ps, position, names, counts))
    units: dict[str, list[str]] = {}
    for n in members:
        units.setdefault(root(n), []).append(n)
    if problems:
        raise RecipeError.collect(problems)
    return StreamPlan(
        plan,
        model,
        steps,
        entries,
        aliases,
        members,
        [tuple(sorted(u, key=order.__getitem__)) for u in units.values()],
        cuts,
        tuple(step_names),
        counts,
        source,
        weights,
        fmt,
        note,
        {n: c for n, c in stored_as.items() if c != n and fmt == "hf"},
    )


def _joined(names: list[str], where: str) -> Problem:
    """The refusal of tensors a checkpoint does not store one by one (a MoE layer's experts)."""
    return problem(
        f"--stream reads and writes one tensor at a time, but a checkpoint of this model does not store {names[0]}"
        f"{f' (and {len(names) - 1} more)' if len(names) > 1 else ''} as a tensor of its own: transformers joins or splits "
        "such tensors on loading (a MoE layer's experts, say); apply it in memory (without --stream)",
        source=where,
        code="stream",
    )


__all__ = ["Cut", "Entry", "Member", "StreamPlan", "stream_plan"]
