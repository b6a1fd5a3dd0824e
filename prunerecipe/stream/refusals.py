"""What a stream refuses, step by step, before any weight is read: anything it could not do
exactly as the in-memory run does (schedules, plugin methods, importance scores and
calibration data, dependency groups, compaction, random steps whose draws depend on values)."""

from __future__ import annotations

import torch
import torch.nn.utils.prune as prune

from ..errors import Problem
from ..plan import Plan, PlannedStep
from ..rng import draws
from ..spec import Recipe

STREAMABLE = (prune.L1Unstructured, prune.RandomUnstructured, prune.LnStructured, prune.RandomStructured, prune.Identity)


def unstreamable(recipe: Recipe, plan: Plan) -> list[Problem]:
    out = []
    if recipe.compacts:
        out.append(
            recipe.problem(
                ("finalize",),
                "finalize: compact runs the model on example inputs and rebuilds its layers: it needs the model in memory; apply it without --stream",
                code="stream",
            )
        )
    for ps in plan.steps:
        if ps.step.scope == "group":
            out.append(
                recipe.problem(
                    ps.step.path + ("scope",),
                    "scope: group ranks channels across every member of a dependency group, found by tracing the model: apply it without --stream",
                    code="stream",
                )
            )
        elif ps.importance is not None or ps.calibrated:
            what = f"importance {ps.importance.name!r}" if ps.importance is not None else f"method {ps.method.name!r}"
            out.append(
                recipe.problem(
                    ps.step.path + (("importance",) if ps.importance is not None else ("method",)),
                    f"{what} ranks by more than each tensor's own values (scores, calibration data): apply it in memory",
                    code="stream",
                )
            )
        elif ps.scheduled:
            out.append(
                recipe.problem(
                    ps.step.path + ("schedule",),
                    "a step with a schedule runs during training (prunerecipe.Pruner); --stream applies a recipe once",
                    code="stream",
                )
            )
        elif ps.method.cls not in STREAMABLE:
            out.append(
                recipe.problem(
                    ps.step.path + ("method",),
                    f"method {ps.method.name!r} cannot be streamed: only torch's l1_unstructured, random_unstructured, ln_structured, "
                    "random_structured and identity run tensor by tensor (a plugin may need the whole model); apply it in memory",
                    code="stream",
                )
            )
    return out


def random_draws(recipe: Recipe, ps: PlannedStep, position: int, names: list[str], counts: dict[tuple[int, str | None], int]) -> list[Problem]:
    """Record what each target of a random step draws; refuse the step when that depends on values."""
    vague = [pt for pt in ps.targets if not pt.exact_before]
    if vague:
        left = "slices" if ps.method.pruning_type == "structured" else "entries"
        return [
            recipe.problem(
                ps.step.path,
                f"{ps.method.name} draws as many random numbers as {vague[0].target.qualname} has {left} left, which after the "
                "steps before it depends on the weights' values: a stream cannot start it where the in-memory run does; apply it in memory",
                code="stream",
            )
        ]
    cls = ps.method.cls
    if ps.step.scope == "global":
        units = sum(pt.units - pt.pruned_before for pt in ps.targets)
        wide = any(pt.target.original.dtype == torch.float64 for pt in ps.targets)
        counts[(position, None)] = draws(cls, ps.group_to_prune or 0, units, torch.float64 if wide else torch.float32)
        return []
    for pt, name in zip(ps.targets, names):
        counts[(position, name)] = draws(cls, pt.to_prune or 0, pt.units - pt.pruned_before, pt.target.original.dtype)
    return []
