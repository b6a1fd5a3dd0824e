"""Pruning during training: :class:`Pruner` drives a recipe's schedules from any training loop."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from ..apply import apply_recipe
from ..distributed import agreed, gather_bytes, resolve_group
from ..errors import RecipeError
from ..load import load_recipe
from ..plan import plan_recipe
from ..report import Report
from ..schedule import Event, step_events
from ..select import Target
from ..spec import Recipe
from ..torchprune import ModelSnapshot, finalize, original, owned_mask, refresh

STATE_VERSION = 1


class EventResult(NamedTuple):
    """A pruning event that ran: which step, when, what it aimed for, and the sparsity report."""

    event: Event
    label: str
    report: Report


class Pruner:
    """Apply a recipe during training, shaped like a torch LR scheduler.

    Unscheduled steps run when the Pruner is created. Call ``step(epoch=e)`` when epoch
    ``e`` has ended and/or ``step(step=s)`` after optimizer step ``s``: every event of a
    schedule in that unit with time <= the value and not yet run is applied, in time then
    file order. Replaying an event that already ran does nothing; ``state_dict()`` /
    ``load_state_dict()`` (or ``Pruner(..., state=...)``) resume a run exactly.

    With ``lottery_ticket: true`` the surviving weights of every targeted parameter are
    reset after each event to the values they had when the Pruner was created (with
    ``resample=True``: to fresh values from each module's ``reset_parameters()``, drawn
    anew at every event, as Lightning's ``ModelPruning(resample_parameters=True)``). With
    ``finalize: true`` pruning is made permanent after the last event of all schedules.

    In a ``torch.distributed`` job (or with ``process_group``) every rank makes a Pruner and
    steps it at the same times; each event then runs on all ranks together, as
    :func:`~prunerecipe.apply.apply_recipe` does (global steps rank the union of the ranks'
    targets; replicas are checked and prune alike).

    >>> pruner = Pruner(model, "recipes/digits-gradual.yaml")  # doctest: +SKIP
    >>> for epoch in range(10):  # doctest: +SKIP
    ...     train_one_epoch(model)
    ...     pruner.step(epoch=epoch)
    """

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe | str | os.PathLike[str],
        *,
        state: Mapping[str, Any] | None = None,
        process_group: Any = None,
        resample: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Pruner needs an nn.Module, got {type(model).__name__}")
        self.model = model
        self.recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        if resample and not self.recipe.lottery_ticket:
            raise ValueError(
                f"resample=True changes the lottery-ticket rewind, and {self.recipe.source} does not ask for one: set 'lottery_ticket: true'"
            )
        self.resample = resample
        if self.recipe.compacts:  # new parameter shapes would leave the optimizer and the loop behind
            raise RecipeError(
                self.recipe.problem(
                    ("finalize",),
                    "finalize: compact changes parameter shapes, which a training loop cannot follow: use finalize: true, "
                    "then prunerecipe.compact(model, inputs) after training",
                    code="unsupported",
                )
            )
        self.process_group = group = resolve_group(process_group)
        # validates every step, scheduled or not, now (on every rank alike)
        self.plan = plan_recipe(model, self.recipe) if group is None else agreed(group, lambda: plan_recipe(model, self.recipe, spread=True))
        self.events: list[Event] = sorted((e for step in self.recipe.steps for e in step_events(step)), key=lambda e: (e.time, e.step))
        # Events of each unit in the order they run; `_next[unit]` counts those done (a prefix),
        # so a step() with nothing due costs O(1) however long the schedule.
        self._by_unit: dict[str, list[Event]] = {"epoch": [], "step": []}
        for e in self.events:
            self._by_unit[e.unit].append(e)
        self._next = {"epoch": 0, "step": 0}
        self._stepped = False
        self.finalized = False
        self._unscheduled_done = False
        self._creation_snapshot: ModelSnapshot | None = None
        self._creation_state: list | None = None
        self._initial: dict[str, torch.Tensor] | None = None
        if state is not None:
            self._adopt(state)
            return
        if self.recipe.lottery_ticket:
            self._initial = {t.qualname: t.original.detach().clone() for t in self.plan.targets}
        unscheduled = [s for s in self.recipe.steps if s.schedule is None]
        if unscheduled:
            self._creation_snapshot = ModelSnapshot([t.module for t in self.plan.targets])
            apply_recipe(model, dataclasses.replace(self.recipe, steps=tuple(unscheduled), finalize=False), process_group=group)
        self._unscheduled_done = True
        if not self.events and self.recipe.finalize:
            finalize(model)
            self.finalized = True
        if self._creation_snapshot is not None:  # the model as this constructor leaves it, finalize included
            self._creation_state = [self._creation_snapshot.structure(), self._written()]

    # --- driving ------------------------------------------------------------------------

    def step(self, epoch: int | None = None, step: int | None = None) -> list[EventResult]:
        """Apply every due event of the schedules in the given unit(s); returns what ran."""
        if epoch is None and step is None:
            raise TypeError("Pruner.step() needs epoch= and/or step=")
        self._stepped = True
        self._creation_snapshot = None
        ran = []
        for unit, value in (("epoch", epoch), ("step", step)):
            if value is None:
                continue
            events = self._by_unit[unit]
            while not self.finalized and self._next[unit] < len(events) and events[self._next[unit]].time <= value:
                ran.append(self._run(events[self._next[unit]]))
                self._next[unit] += 1
        if ran and self.recipe.finalize and not self.pending() and not self.finalized:
            finalize(self.model)
            self.finalized = True
        return ran

    def has_pending(self, unit: str) -> bool:
        """Whether events of ``unit`` ("epoch" or "step") remain: O(1), cheap to ask every batch."""
        return not self.finalized and self._next[unit] < len(self._by_unit[unit])

    def _run(self, event: Event) -> EventResult:
        step = self.recipe.steps[event.step]
        if event.sparsity is not None:
            once = dataclasses.replace(step, schedule=None, sparsity=event.sparsity, amount=None)
        else:
            once = dataclasses.replace(step, schedule=None)
        report = apply_recipe(self.model, dataclasses.replace(self.recipe, steps=(once,), finalize=False), process_group=self.process_group)
        if self._initial is not None:
            self._reset_to_initial()
        label = f"{step.label} at {event.unit} {event.time}"
        return EventResult(event, label, report)

    @torch.no_grad()
    def _reset_to_initial(self) -> None:
        """Lottery ticket: surviving weights go back to their values at creation, or to fresh
        ones with ``resample`` (masks stay)."""
        assert self._initial is not None
        fresh = self._resampled() if self.resample else {}
        for t in self.plan.targets:
            saved = fresh.get(t.qualname, self._initial.get(t.qualname))
            if saved is None:
                continue
            t.original.copy_(saved)
            refresh(t.module, t.param)

    def _resampled(self) -> dict[str, torch.Tensor]:
        """New initial values: a copy of each targeted module, unpruned, through its own
        ``reset_parameters()`` (modules without one keep their saved values). Across ranks
        every process draws from the same seed, so replicas stay equal."""
        seed = None
        if self.process_group is not None:
            mine = int(torch.randint(0, 2**62, (1,)).item()).to_bytes(8, "little")
            seed = int.from_bytes(gather_bytes(self.process_group, mine)[0], "little")  # rank 0's
        out: dict[str, torch.Tensor] = {}
        modules: dict[int, tuple[nn.Module, list[Target]]] = {}
        for t in self.plan.targets:
            modules.setdefault(id(t.module), (t.module, []))[1].append(t)
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            for module, targets in modules.values():
                if not callable(getattr(module, "reset_parameters", None)):
                    continue
                scratch = copy.deepcopy(module)
                finalize(scratch)  # plain parameters again, so reset_parameters writes them
                scratch.reset_parameters()  # type: ignore[operator]
                for t in targets:
                    out[t.qualname] = getattr(scratch, t.param).detach()
        return out

    def finalize(self) -> list[str]:
        """Make the pruning permanent now (``prune.remove`` on every pruned parameter)."""
        self.finalized = True
        return finalize(self.model)

    # --- introspection ------------------------------------------------------------------

    def timeline(self) -> list[tuple[Event, str]]:
        """Every scheduled event with its step label, in the order they run."""
        return [(e, self.recipe.steps[e.step].label) for e in self.events]

    def pending(self) -> list[Event]:
        """Events not run yet, in the order they will run."""
        return sorted((e for unit, events in self._by_unit.items() for e in events[self._next[unit] :]), key=lambda e: (e.time, e.step))

    def _done(self) -> list[tuple[int, int]]:
        return sorted((e.step, e.time) for unit, events in self._by_unit.items() for e in events[: self._next[unit]])

    @property
    def targets(self) -> list[Target]:
        return self.plan.targets

    # --- state --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a restarted run needs (besides the model's own state, masks included)."""
        return {
            "version": STATE_VERSION,
            "recipe": self.recipe.name,
            "schedule_digest": self._digest(),
            "done": [list(d) for d in self._done()],
            "unscheduled_done": self._unscheduled_done,
            "finalized": self.finalized,
            "lottery_initial": dict(self._initial) if self._initial is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state``, before the first ``step()``.

        If the model's pruned modules are exactly as this Pruner's creation left them (the
        model's own checkpoint was loaded before the Pruner was made, or will be loaded
        after), the unscheduled steps the constructor just re-ran are undone, since the
        saved run already applied them. If the model changed since (its checkpoint was
        loaded in between), it is taken as restored and left alone.
        """
        if self._stepped:
            raise RuntimeError("load_state_dict() must come before the first step(); or pass state= to Pruner()")
        adopted = self._validated(state)  # check everything before changing anything
        created = self._creation_state
        untouched = created is not None and self._creation_snapshot is not None and self._creation_snapshot.structure() == created[0]
        if untouched and created is not None and self._rewritten(created[1]):
            untouched = False  # a checkpoint was copied into the very tensors the constructor pruned
        if self._creation_snapshot is not None and adopted["unscheduled_done"] and untouched:
            self._creation_snapshot.restore()
        self._creation_snapshot = None
        self._adopt(state)

    def _written(self) -> list[tuple[int, float, float]]:
        """Per pruned tensor of the targets (``*_orig``, ``*_mask``, or the plain parameter): its
        version counter and two float64 sums. A checkpoint loaded into the same tensors moves both;
        a DDP wrap's broadcast or a train-mode BatchNorm moves counters or other tensors only."""
        out = []
        for t in self.plan.targets:
            for tensor in (original(t.module, t.param), owned_mask(t.module, t.param)):
                if tensor is not None and tensor.device.type != "meta":
                    flat = tensor.detach().reshape(-1)
                    total = float(flat.sum(dtype=torch.float64))
                    norm = float(torch.linalg.vector_norm(flat, dtype=torch.float64)) if flat.is_floating_point() else total
                    out.append((tensor._version, total, norm))
        return out

    def _rewritten(self, before: list[tuple[int, float, float]]) -> bool:
        """Whether a tensor :meth:`_written` listed was written since with other values."""
        now = self._written()
        return len(now) != len(before) or any(a[0] != b[0] and a[1:] != b[1:] for a, b in zip(now, before))

    def _digest(self, seeds: bool = True) -> str:
        """What a saved state depends on: every step's selection, method and schedule, and the
        seed of each random step (``seeds=False``: the digest states saved before seeds counted
        carry, still accepted)."""
        import hashlib
        import json

        from ..rng import is_random

        random = {ps.step.index for ps in self.plan.steps if is_random(ps.method.cls)} if seeds else set()

        parts = [
            [
                s.index,
                s.name,
                s.method,
                s.select.describe(),
                list(s.params),
                s.scope,
                s.amount,
                s.sparsity,
                dict(s.args),
                None if s.schedule is None else dataclasses.astuple(s.schedule),
            ]
            + ([self.recipe.step_seed(s)] if s.index in random and self.recipe.step_seed(s) is not None else [])
            for s in self.recipe.steps
        ]
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()[:16]

    def _validated(self, state: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise RecipeError(f"not a prunerecipe Pruner state (version {STATE_VERSION}): {type(state).__name__}")
        if state.get("schedule_digest") not in (None, self._digest(), self._digest(seeds=False)):
            raise RecipeError(
                "the saved Pruner state was made with a different recipe (its steps, selections, schedules or seeds differ); "
                "resume with the recipe the run started with"
            )
        try:
            done = {(int(d[0]), int(d[1])) for d in state.get("done", [])}
        except (TypeError, ValueError, IndexError):
            raise RecipeError("the saved Pruner state's 'done' list is malformed") from None
        unknown = done - {(e.step, e.time) for e in self.events}
        if unknown:
            raise RecipeError(f"the saved Pruner state has events this recipe does not: {sorted(unknown)}; was it saved with another recipe?")
        nexts = {}
        for unit, events in self._by_unit.items():
            n = sum(1 for e in events if (e.step, e.time) in done)
            if any((e.step, e.time) not in done for e in events[:n]):
                raise RecipeError(f"the saved Pruner state skips {unit} events that come before ones it ran; it cannot be resumed")
            nexts[unit] = n
        initial = state.get("lottery_initial")
        if self.recipe.lottery_ticket and not initial:
            raise RecipeError("the recipe asks for lottery_ticket, but the saved Pruner state has no initial weights")
        if initial and not self.recipe.lottery_ticket:
            raise RecipeError(
                "the saved Pruner state rewinds weights to their initial values (lottery_ticket: true), but this recipe has "
                "lottery_ticket: false; resume with the recipe the run started with"
            )
        return {"next": nexts, "unscheduled_done": bool(state.get("unscheduled_done", True))}

    def _adopt(self, state: Mapping[str, Any]) -> None:
        adopted = self._validated(state)
        self._next = adopted["next"]
        self._unscheduled_done = adopted["unscheduled_done"]
        self.finalized = bool(state.get("finalized", False))
        initial = state.get("lottery_initial")
        self._initial = {k: v.detach().clone() for k, v in initial.items()} if initial else None
