"""A streaming run's tensors: the passes :mod:`.plan` decided, one tensor at a time
(:mod:`.output` writes what this makes).

Each tensor is read from the memory map (a view: page cache, not the process's memory), its
steps run through the same code as the in-memory run, on a module holding that tensor alone
(torch's re-parametrization and ``PruningContainer`` chains included), and ``orig * mask`` is
written. A tensor whose only step is an L1 cut (local, or a global cut found in a pass before)
skips the re-parametrization: its cut is folded into a copy in a reused buffer, exactly as the
in-memory one-shot fold does. Writing goes on in a thread while the next tensor is pruned.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.utils.prune as prune
from torch import nn

from ..amounts import checked_nparams, sparsity_count
from ..apply import run_step
from ..errors import ApplyError, RecipeError
from ..magnitude import EXACT_TIES_UP_TO, DigitCut, Piece, Threshold, apply_global_cut, fold_into, piece_for, select, supported
from ..magnitude.masks import zeros_after
from ..magnitude.workers import trim_heap
from ..oneshot import finite_zeros
from ..plan import PlannedStep
from ..report import Report, StepOutcome, TargetSparsity
from ..rng import is_random, skip
from ..select import Target
from ..spec import Recipe
from ..torchprune import zero_entries
from .format import Buffers, Pipe
from .planned import Cut, StreamPlan


class Progress(NamedTuple):
    """Where a streaming run is: called after each tensor of each pass."""

    label: str  # what the pass does
    number: int  # this pass, from 1
    passes: int
    tensors: int  # done in this pass
    tensors_total: int
    bytes: int  # read (cut passes) or written (the last pass) in this pass
    bytes_total: int


class Run:
    """One streaming run over a :class:`~.plan.StreamPlan`.

    Args:
        sp: the plan (with its checkpoint open).
        recipe: the recipe it was made from.
        progress: called with a :class:`Progress` after each tensor.
    """

    def __init__(self, sp: StreamPlan, recipe: Recipe, progress: Callable[[Progress], None] | None = None) -> None:
        if sp.source is None:
            raise ValueError("a streaming run needs a checkpoint")
        self.sp = sp
        self.source = sp.source
        self.recipe = recipe
        self.plain = dataclasses.replace(recipe, seed=None)  # the run sets the generator itself, per tensor
        self.progress = progress
        self.cuts: dict[int, Threshold | None] = {}  # step position -> its group's cut (None: a no-op)
        self.notes: dict[int, str] = {}
        self.noops: dict[int, set[str]] = {}  # per step: the targets a sparsity left as they were
        self.states: dict[tuple[int, str | None], torch.Tensor] = {}
        self.zeros_before: dict[str, int] = {}
        self.zeros_after: dict[str, int] = {}
        self.rows: list[tuple[str, tuple[int, ...], int]] = []
        self._ready: dict[str, torch.Tensor] = {}
        self.pipe = Pipe()
        self._buffers = Buffers(self.pipe)
        self.passes_done = 0
        self._final_state = torch.get_rng_state()

    # --- the generator ------------------------------------------------------------------

    def replay(self) -> None:
        """The generator state before each random draw of the plan, found by skipping draws;
        the caller's state is put back (the end state is set by :meth:`finish_rng`)."""
        start = torch.get_rng_state()
        try:
            for position, ps in enumerate(self.sp.steps):
                seed = self.recipe.step_seed(ps.step)
                if seed is not None:
                    torch.manual_seed(seed)
                if not is_random(ps.method.cls):
                    continue
                keys: list[str | None] = [None] if ps.step.scope == "global" else list(self.sp.names[position])
                for key in keys:
                    self.states[(position, key)] = torch.get_rng_state()
                    skip(self.sp.draws.get((position, key), 0))
            self._final_state = torch.get_rng_state()
        finally:
            torch.set_rng_state(start)

    def finish_rng(self) -> None:
        """Leave the generator where the in-memory run leaves it."""
        torch.set_rng_state(self._final_state)

    # --- tensors ------------------------------------------------------------------------

    def raw(self, name: str) -> torch.Tensor:
        """The stored tensor in the model's dtype (a view of the map when they agree)."""
        entry = self.sp.entries[name]
        assert entry.key is not None
        t = self.source.tensor(entry.key)
        return t if t.dtype == entry.dtype else t.to(entry.dtype)

    def _fail(self, ps: PlannedStep, on: str, exc: Exception) -> ApplyError:
        what = f"step {ps.step.name!r} ({ps.method.name})" if ps.step.name else ps.method.name
        return ApplyError(self.recipe.problem(ps.step.path, f"{what} failed on {on}: {type(exc).__name__}: {exc}; nothing was written", code="apply"))

    def _checked(self, name: str, target: Target) -> None:
        """NaN or inf refused as in memory; the zeros before counted (once per tensor)."""
        if name in self.zeros_before:
            return
        first = self.sp.steps[self.sp.members[name].steps[0][0]]
        zeros = finite_zeros(self.recipe, [(first, target)])
        self.zeros_before[name] = zeros.get((id(target.module), target.param), 0)

    def pruned(self, unit: tuple[str, ...], limit: int | None = None) -> dict[str, Target]:
        """The unit's tensors on one-parameter modules (named as in the model), with every step
        before position ``limit`` (all when None) run as the in-memory run runs it."""
        sp = self.sp
        modules: dict[str, nn.Module] = {}
        targets: dict[str, Target] = {}
        for name in unit:
            m = sp.members[name]
            holder = modules.setdefault(m.module_name, nn.Module())
            holder.register_parameter(m.param, nn.Parameter(self.raw(name), requires_grad=False))
            targets[name] = Target(m.module_name, m.param, holder)
            self._checked(name, targets[name])
        positions = sorted({p for name in unit for p, _ in sp.members[name].steps if limit is None or p < limit})
        for p in positions:
            ps = sp.steps[p]
            mine = [(i, n) for i, n in enumerate(sp.names[p]) if n in targets]
            plain = dataclasses.replace(ps, step=dataclasses.replace(ps.step, seed=None))
            try:
                if p in self.cuts:  # a big global group: its cut is known
                    cut = self.cuts[p]
                    for i, n in mine:
                        if cut is not None:
                            apply_global_cut([(targets[n].module, targets[n].param)], cut.part(i, 1))
                elif ps.step.scope == "global":  # a small group, whole in this unit
                    self._set_rng(p, None)
                    done = run_step(self.plain, dataclasses.replace(plain, targets=tuple(ps.targets[i]._replace(target=targets[n]) for i, n in mine)))
                    if done.note:
                        self.notes[p] = done.note
                else:
                    for i, n in mine:
                        self._set_rng(p, n)
                        done = run_step(self.plain, dataclasses.replace(plain, targets=(ps.targets[i]._replace(target=targets[n]),)))
                        if done.note and done.note.startswith("no-op"):  # told once for the step, as in memory
                            self.noops.setdefault(p, set()).add(sp.members[n].qualname)
            except RecipeError:
                raise
            except Exception as exc:
                raise self._fail(ps, ", ".join(sp.members[n].qualname for _, n in mine), exc) from exc
        return targets

    def _set_rng(self, position: int, key: str | None) -> None:
        state = self.states.get((position, key))
        if state is not None:
            torch.set_rng_state(state)

    # --- the cut passes -----------------------------------------------------------------

    def find_cuts(self) -> None:
        """Every big global group's exact cut, in step order (a later one sees the earlier cuts)."""
        for cut in self.sp.cuts:
            self.cuts[cut.position] = self._cut(cut)

    def _k(self, ps: PlannedStep, numel: int, eligible: int) -> int | None:
        """Entries the step prunes out of the group's ``eligible`` (None: a no-op), as in memory."""
        step = ps.step
        if step.sparsity is not None:
            k = sparsity_count(step.sparsity, numel, numel - eligible)
            return k if k > 0 else None
        assert step.amount is not None
        try:
            return checked_nparams(step.amount, eligible)
        except ValueError as exc:
            raise self._fail(ps, f"the global group of {len(self.sp.names[self.sp.steps.index(ps)])} tensors", exc) from exc

    def _cut(self, cut: Cut) -> Threshold | None:
        """The exact cut of a big global group, from histograms of 16 bits of |w| per pass: memory
        bounded by the histograms, whatever the group's size (``select`` keeps a share of the
        group as candidates). Members seen as stored are read straight from the map."""
        ps = self.sp.steps[cut.position]
        numel = sum(math.prod(self.sp.entries[n].shape) for n in cut.members)
        size = sum(self.sp.entries[n].read_bytes for n in cut.members)
        label = f"exact cut of {ps.step.label}"
        found: list[int | None] = [None]

        def k_of(eligible: int) -> int:
            k = self._k(ps, numel, eligible)
            found[0] = k
            return 0 if k is None else k

        digits = DigitCut(cut.dtype, len(cut.members), k_of)
        while not digits.done:
            self.passes_done += 1
            done = 0
            for i, n in enumerate(cut.members):
                if cut.raw:
                    digits.add(i, Piece(self.raw(n)))
                    if i % 32 == 31:  # each tensor's histograms leave heap behind: back to the system now and then
                        trim_heap()
                else:
                    t = self.pruned(self.sp.unit_of(n), cut.position)[n]
                    digits.add(i, piece_for(t.module, t.param))
                    del t
                    trim_heap()  # what the steps freed goes back to the system, tensor by tensor
                done += self.sp.entries[n].read_bytes
                self.report_progress(label, i + 1, len(cut.members), done, size)
            digits.end_pass()
        if cut.raw:
            if digits.nonfinite:  # refused as in memory, naming the tensors
                for n in cut.members:
                    self._checked(n, self._alone(n))
            for n, z in zip(cut.members, digits.zeros):
                self.zeros_before.setdefault(n, z)
        if found[0] is None:
            self.notes[cut.position] = f"no-op: already at or above sparsity {ps.step.sparsity:g}"
            return None
        return digits.threshold()

    def _alone(self, name: str) -> Target:
        m = self.sp.members[name]
        holder = nn.Module()
        holder.register_parameter(m.param, nn.Parameter(self.raw(name), requires_grad=False))
        return Target(m.module_name, m.param, holder)

    def report_progress(self, label: str, tensors: int, total: int, done: int, size: int) -> None:
        if self.progress is not None:
            self.progress(Progress(label, self.passes_done, self.sp.passes, tensors, total, done, size))

    # --- the write pass -----------------------------------------------------------------

    def final(self, name: str) -> torch.Tensor:
        """The tensor as the in-memory dense output holds it (``orig * mask``, or as stored)."""
        sp = self.sp
        if name not in sp.members:
            stored = self.raw(name)
            self._count(name, stored)
            return stored
        if name in self._ready:
            return self._ready.pop(name)
        folded = self._fold(name)
        if folded is not None:
            return folded
        self.pipe.wait()  # nothing in flight while a tensor is re-parametrized: its memory is the bound's
        self._buffers.release()  # nor the fold buffers, which would otherwise add 2 tensors' worth to it
        unit = sp.unit_of(name)
        targets = self.pruned(unit)
        for n in unit:
            t = targets[n]
            value = getattr(t.module, t.param).detach()
            self.zeros_after[n] = self._count(n, value)
            self._ready[n] = value
        del targets, t
        trim_heap()
        return self._ready.pop(name)

    def _fold(self, name: str) -> torch.Tensor | None:
        """A tensor whose only step is an L1 cut, folded in place in a reused buffer; None when
        it needs the regular path (more steps, or ties in a small tensor: torch breaks them)."""
        sp = self.sp
        member = sp.members[name]
        entry = sp.entries[name]
        if len(member.steps) != 1 or sp.unit_of(name) != (name,):
            return None
        position, index = member.steps[0]
        ps = sp.steps[position]
        if ps.method.cls is not prune.L1Unstructured or not supported(torch.empty(0, dtype=entry.dtype)):
            return None
        raw = self.raw(name)
        if ps.step.scope == "global":
            if position not in self.cuts:
                return None
            threshold = self.cuts[position]
            if threshold is None:  # the group's no-op
                self.zeros_after[name] = self._count(name, raw)
                return raw
        else:
            numel = raw.numel()
            if ps.step.sparsity is not None:
                k = sparsity_count(ps.step.sparsity, numel, 0)
                if k <= 0:  # as the in-memory run, which skips the target
                    self._checked(name, self._alone(name))
                    self.zeros_after[name] = self._count(name, raw)
                    return raw
            else:
                assert ps.step.amount is not None
                try:
                    k = checked_nparams(ps.step.amount, numel)
                except ValueError as exc:
                    raise self._fail(ps, member.qualname, exc) from exc
            out = self._buffers.take(entry.dtype, entry.shape)  # the other buffer may still be being written
            (threshold,) = select([([Piece(raw)], k)], count_zeros=True, arena=[out])  # its scratch lives in the buffer until the fold
            if threshold.quotas is not None and numel <= EXACT_TIES_UP_TO:
                return None  # ties in a small tensor: torch's own topk picks them, on the regular path
            if not threshold.finite:
                self._checked(name, self._alone(name))
            if threshold.zeros is not None and threshold.zeros[0] is not None:
                self.zeros_before.setdefault(name, threshold.zeros[0])
            index = 0
        if name not in self.zeros_before:
            self._checked(name, self._alone(name))
        if ps.step.scope == "global":
            out = self._buffers.take(entry.dtype, entry.shape)  # the other buffer may still be being written
        piece = Piece(raw)
        fold_into(piece, threshold, index, out)
        known = zeros_after(piece, threshold, index)
        self.zeros_after[name] = self._count(name, out, known)
        return out

    def _count(self, name: str, t: torch.Tensor, known: int | None = None) -> int:
        """Zero entries of a tensor written (``known`` when the cut tells), kept for the summary."""
        zeros = known if known is not None else zero_entries(t) if t.is_floating_point() else 0
        if t.is_floating_point():
            self.rows.append((name, tuple(t.shape), zeros))
        return zeros

    def sorted_rows(self) -> list[tuple[str, tuple[int, ...], int]]:
        """The zero counts of every floating-point tensor written, in the model's order."""
        order = {n: i for i, n in enumerate(self.sp.entries)}
        return sorted(self.rows, key=lambda r: order[r[0]])

    def report(self) -> Report:
        """Per-target sparsity before and after, as ``apply_recipe`` reports it."""
        sp = self.sp
        rows = []
        for name, m in sp.members.items():
            entry = sp.entries[name]
            rows.append(TargetSparsity(m.qualname, m.module_type, entry.shape, self.zeros_before.get(name, 0), self.zeros_after.get(name, 0)))
        order = {m.qualname: i for i, m in enumerate(first_seen(sp))}
        rows.sort(key=lambda r: order[r.name])
        outcomes = tuple(
            StepOutcome(ps.step.label, ps.method.name, tuple(pt.target.qualname for pt in ps.targets), self._note(p, ps))
            for p, ps in enumerate(sp.steps)
        )
        return Report(tuple(rows), outcomes, bool(self.recipe.finalize), self.recipe.source, ())

    def _note(self, position: int, ps: PlannedStep) -> str | None:
        """A step's note in the words of the in-memory run."""
        if position in self.notes:
            return self.notes[position]
        noops = self.noops.get(position)
        if noops:
            names = [pt.target.qualname for pt in ps.targets if pt.target.qualname in noops]
            return f"no-op on {', '.join(names)}: already at or above sparsity {ps.step.sparsity:g}"
        return None


def first_seen(sp: StreamPlan) -> list[Any]:
    """Every target once, in the order the steps first name them (the report's order)."""
    seen: dict[str, Any] = {}
    for names in sp.names:
        for n in names:
            seen.setdefault(n, sp.members[n])
    return list(seen.values())
