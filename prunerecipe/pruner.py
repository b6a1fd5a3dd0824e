"""Pruning during training: :class:`Pruner` drives a recipe's schedules from any training loop."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, NamedTuple

import torch
import torch.nn.utils.prune as prune
from torch import nn

from .apply import ModelSnapshot, apply_recipe, finalize
from .errors import RecipeError
from .plan import plan_recipe
from .recipe import Recipe, load_recipe
from .report import Report
from .schedule import Event, step_events
from .selectors import Target

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
    reset after each event to the values they had when the Pruner was created. With
    ``finalize: true`` pruning is made permanent after the last event of all schedules.

    >>> pruner = Pruner(model, "recipes/digits-gradual.yaml")  # doctest: +SKIP
    >>> for epoch in range(10):  # doctest: +SKIP
    ...     train_one_epoch(model)
    ...     pruner.step(epoch=epoch)
    """

    def __init__(self, model: nn.Module, recipe: Recipe | str | os.PathLike[str], *, state: Mapping[str, Any] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Pruner needs an nn.Module, got {type(model).__name__}")
        self.model = model
        self.recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        self.plan = plan_recipe(model, self.recipe)  # validates every step, scheduled or not, now
        self.events: list[Event] = sorted(
            (e for step in self.recipe.steps for e in step_events(step)), key=lambda e: (e.time, e.step)
        )
        self._done: set[tuple[int, int]] = set()
        self._stepped = False
        self.finalized = False
        self._unscheduled_done = False
        self._creation_snapshot: ModelSnapshot | None = None
        self._initial: dict[str, torch.Tensor] | None = None
        if state is not None:
            self._adopt(state)
            return
        if self.recipe.lottery_ticket:
            self._initial = {t.qualname: t.original.detach().clone() for t in self.plan.targets}
        unscheduled = [s for s in self.recipe.steps if s.schedule is None]
        if unscheduled:
            self._creation_snapshot = ModelSnapshot([t.module for t in self.plan.targets])
            apply_recipe(model, dataclasses.replace(self.recipe, steps=tuple(unscheduled), finalize=False))
        self._unscheduled_done = True
        if not self.events and self.recipe.finalize:
            finalize(model)
            self.finalized = True

    # --- driving ------------------------------------------------------------------------

    def step(self, epoch: int | None = None, step: int | None = None) -> list[EventResult]:
        """Apply every due event of the schedules in the given unit(s); returns what ran."""
        if epoch is None and step is None:
            raise TypeError("Pruner.step() needs epoch= and/or step=")
        self._stepped = True
        self._creation_snapshot = None
        now = {"epoch": epoch, "step": step}
        ran = []
        for event in self.events:
            value = now[event.unit]
            if value is None or event.time > value or (event.step, event.time) in self._done or self.finalized:
                continue
            ran.append(self._run(event))
        if ran and self.recipe.finalize and len(self._done) == len(self.events) and not self.finalized:
            finalize(self.model)
            self.finalized = True
        return ran

    def _run(self, event: Event) -> EventResult:
        step = self.recipe.steps[event.step]
        if event.sparsity is not None:
            once = dataclasses.replace(step, schedule=None, sparsity=event.sparsity, amount=None)
        else:
            once = dataclasses.replace(step, schedule=None)
        report = apply_recipe(self.model, dataclasses.replace(self.recipe, steps=(once,), finalize=False))
        self._done.add((event.step, event.time))
        if self._initial is not None:
            self._reset_to_initial()
        label = f"{step.label} at {event.unit} {event.time}"
        return EventResult(event, label, report)

    @torch.no_grad()
    def _reset_to_initial(self) -> None:
        """Lottery ticket: surviving weights go back to their values at creation (masks stay)."""
        assert self._initial is not None
        for t in self.plan.targets:
            saved = self._initial.get(t.qualname)
            if saved is None:
                continue
            t.original.copy_(saved)
            for hook in t.module._forward_pre_hooks.values():
                if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == t.param:
                    setattr(t.module, t.param, hook.apply_mask(t.module))

    def finalize(self) -> list[str]:
        """Make the pruning permanent now (``prune.remove`` on every pruned parameter)."""
        self.finalized = True
        return finalize(self.model)

    # --- introspection ------------------------------------------------------------------

    def timeline(self) -> list[tuple[Event, str]]:
        """Every scheduled event with its step label, in the order they run."""
        return [(e, self.recipe.steps[e.step].label) for e in self.events]

    def pending(self) -> list[Event]:
        return [e for e in self.events if (e.step, e.time) not in self._done]

    @property
    def targets(self) -> list[Target]:
        return self.plan.targets

    # --- state --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a restarted run needs (besides the model's own state, masks included)."""
        return {
            "version": STATE_VERSION,
            "recipe": self.recipe.name,
            "done": sorted([list(d) for d in self._done]),
            "unscheduled_done": self._unscheduled_done,
            "finalized": self.finalized,
            "lottery_initial": dict(self._initial) if self._initial is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state``. Before the first ``step()`` this also undoes the unscheduled
        steps run at creation, since the restored model already carries them."""
        if self._stepped:
            raise RuntimeError("load_state_dict() must come before the first step(); or pass state= to Pruner()")
        if self._creation_snapshot is not None and state.get("unscheduled_done"):
            self._creation_snapshot.restore()
            self._creation_snapshot = None
        self._adopt(state)

    def _adopt(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise RecipeError(f"not a prunerecipe Pruner state (version {STATE_VERSION}): {type(state).__name__}")
        known = {(e.step, e.time) for e in self.events}
        done = {tuple(d) for d in state.get("done", [])}
        unknown = done - known
        if unknown:
            raise RecipeError(
                f"the saved Pruner state has events this recipe does not: {sorted(unknown)}; was it saved with another recipe?"
            )
        self._done = done  # type: ignore[assignment]
        self._unscheduled_done = bool(state.get("unscheduled_done", True))
        self.finalized = bool(state.get("finalized", False))
        initial = state.get("lottery_initial")
        self._initial = {k: v.detach().clone() for k, v in initial.items()} if initial else None
        if self.recipe.lottery_ticket and self._initial is None:
            raise RecipeError("the recipe asks for lottery_ticket, but the saved Pruner state has no initial weights")
