"""What ``plan_recipe`` needs for ``scope: group`` steps and ``finalize: compact``: the
groups of a step's selected layers, their channel counts, and located problems.

Nothing here changes the model: tracing runs one forward pass (train/eval modes put back).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..amounts import is_count, nparams_to_prune, sparsity_count
from ..errors import KeyPath, RecipeError
from ..methods import MethodSpec
from ..select import Target
from ..spec import InputSpec, Recipe, Step
from ..text import format_table, listing
from .graph import TimeLimitExceeded
from .groups import NORM, PRODUCER, ChannelGroup, Found, attention_owner, layer_role
from .inputs import default_specs, describe, make_inputs
from .masks import pruned_channels
from .scopes import discover


class GroupProblem(Exception):
    """A located problem found while planning a group step or a compaction."""

    def __init__(self, path: KeyPath, message: str, code: str = "structured") -> None:
        super().__init__(message)
        self.path = path
        self.message = message
        self.code = code


@dataclass(frozen=True)
class PlannedGroup:
    """A group of a step: its channels, how many are pruned already and how many the step prunes."""

    group: ChannelGroup
    done: int
    to_prune: int | None

    def to_dict(self) -> dict[str, object]:
        return {**self.group.to_dict(), "pruned_before": self.done, "to_prune": self.to_prune}


@dataclass
class GroupTarget:
    """A parameter a group step masks, with the group that counts its channels."""

    target: Target
    group: PlannedGroup
    kept_fraction: float  # of its unmasked entries, over every group it is in


@dataclass
class GroupStepPlan:
    groups: tuple[PlannedGroup, ...]
    skipped: tuple[str, ...]
    targets: list[GroupTarget] = field(default_factory=list)


def example_specs(model: nn.Module, recipe: Recipe) -> tuple[InputSpec, ...] | None:
    """The recipe's ``inputs``, else a Hugging Face model's default, else None."""
    return recipe.inputs if recipe.inputs else default_specs(model)


def check_step(model: nn.Module, step: Step, spec: MethodSpec, targets: Sequence[Target]) -> None:
    """Refuse what a group step cannot do before tracing: other parameters than ``weight``,
    a ``dim`` other than 0, layers inside attention blocks, unsupported layer types.

    Raises:
        GroupProblem: located at the step's key.
    """
    if tuple(step.params) != ("weight",):
        raise GroupProblem(
            step.path + ("params",),
            "scope: group masks the weights and biases of every layer in a group itself (Linear, Conv, norm layers; weights a module "
            "holds as bare parameters, such as a MoE layer's stacked experts, cannot be pruned by group); remove 'params'",
            "method-args",
        )
    dim = step.args.get("dim", 0)
    if dim != 0:
        raise GroupProblem(
            step.path + ("args", "dim"),
            f"scope: group ranks output channels (dim 0 of the group's channel matrix); remove dim={dim!r}",
            "method-args",
        )
    inside = []
    owners: list[str] = []
    unsupported = []
    for t in targets:
        owner = attention_owner(model, t.module_name)
        if owner is not None:
            inside.append(f"{t.module_name} (in {owner[0]}, {owner[1]})")
            pattern = re.sub(r"\.\d+(?=\.|$)", ".*", owner[0]) + ".*"  # layers.3.attn -> layers.*.attn.*
            if pattern not in owners:
                owners.append(pattern)
        elif layer_role(t.module) is None:
            unsupported.append(f"{t.module_name or '(root)'} ({t.module_type})")
    if inside:
        raise GroupProblem(
            step.path + ("select",),
            listing(
                "attention heads cannot be pruned by channel groups (a projection's channels are tied across heads by reshapes "
                "that cannot be mapped exactly); exclude these layers: exclude: {names: [" + ", ".join(repr(p) for p in owners[:4]) + "]}",
                inside,
            ),
            "unsupported",
        )
    if unsupported:
        raise GroupProblem(
            step.path + ("select",),
            listing("scope: group prunes convolutions (not grouped), Linear and Conv1D layers (with their BatchNorm); unsupported", unsupported),
            "unsupported",
        )


def _discover(model: nn.Module, recipe: Recipe, step: Step, roots: list[tuple[str, nn.Module]], chosen: set[int]) -> Found:
    specs = example_specs(model, recipe)
    if specs is None:
        raise GroupProblem(
            step.path + ("scope",),
            "scope: group traces the model and needs example inputs: add e.g. 'inputs: [{shape: [1, 3, 224, 224], dtype: float32}]' "
            "at the top of the recipe (Hugging Face models default to a batch of input_ids)",
            "inputs",
        )
    try:
        return discover(model, make_inputs(model, specs), roots, chosen)
    except RecipeError as exc:  # torch-pruning is missing
        raise GroupProblem(step.path + ("scope",), "; ".join(p.message for p in exc.problems)) from None
    except TimeLimitExceeded as exc:
        raise GroupProblem(step.path + ("scope",), f"{exc} (raise PRUNERECIPE_TRACE_TIMEOUT, or select fewer layers)", "timeout") from None
    except Exception as exc:
        where: KeyPath = ("inputs",) if recipe.inputs else step.path + ("scope",)
        on_meta = any(p.device.type == "meta" for p in model.parameters()) and "meta" in str(exc).lower()
        hint = " (the model is on the meta device, shapes only, which this model's code cannot run on: plan it with --weights)" if on_meta else ""
        if not recipe.inputs:
            hint += f" (the recipe has no 'inputs:', so {describe(specs)} was used: describe what this model's forward takes with 'inputs:')"
        raise GroupProblem(where, f"tracing the model with inputs {describe(specs)} failed: {type(exc).__name__}: {exc}{hint}") from None


def group_key(group: ChannelGroup) -> tuple[str, ...]:
    """What identifies a group across steps: its producers."""
    return tuple(sorted(m.name for m in group.producers))


def plan_groups(
    model: nn.Module, recipe: Recipe, step: Step, spec: MethodSpec, targets: Sequence[Target], exact: bool, known: dict[tuple[str, ...], int]
) -> GroupStepPlan:
    """The groups of a step's selected layers, and the parameters the step masks.

    ``exact`` says whether the masks now on the model still tell what is pruned (no earlier
    step of the plan touched these layers); ``known`` holds the channels earlier group steps
    of the plan leave pruned, by :func:`group_key`, and is updated. An int amount larger
    than a group is refused only when its count is exact.

    Raises:
        GroupProblem: located problems (missing inputs, unsupported layers, no group left...).
    """
    check_step(model, step, spec, targets)
    roots = [(t.module_name, t.module) for t in targets if layer_role(t.module) == "layer"]
    if not roots:
        raise GroupProblem(
            step.path + ("select",),
            "scope: group prunes the output channels of convolutions, Linear or Conv1D layers; the step selects none",
            "no-targets",
        )
    found = _discover(model, recipe, step, roots, {id(t.module) for t in targets})
    if found.unsupported:
        raise GroupProblem(step.path + ("select",), "; ".join(found.unsupported), "unsupported")
    if not found.groups:
        raise GroupProblem(
            step.path + ("select",), listing("no channel group to prune: every group of the selected layers was skipped", found.skipped), "no-targets"
        )
    planned = []
    for group in found.groups:
        key = group_key(group)
        sure = exact or key in known
        done = known[key] if key in known else int(pruned_channels(group).sum())
        if step.sparsity is not None:
            k: int | None = max(sparsity_count(step.sparsity, group.channels, done), 0)
        elif step.amount is not None:
            left = group.channels - done
            k = nparams_to_prune(step.amount, left)
            if is_count(step.amount) and k > left:
                if sure:
                    raise GroupProblem(
                        step.path + ("amount",),
                        f"amount {step.amount} is more than the {left} unpruned channels of the group of {group.root}",
                        "amount",
                    )
                k = left
        else:
            k = None
        planned.append(PlannedGroup(group, done, k))
        if k is not None:
            known[key] = done + k
        else:
            known.pop(key, None)
    return GroupStepPlan(tuple(planned), tuple(found.skipped), _targets(model, planned))


def _targets(model: nn.Module, planned: Sequence[PlannedGroup]) -> list[GroupTarget]:
    """Masked parameters in ``named_modules()`` order, each with its producing (or first) group."""
    by_key: dict[tuple[int, str], GroupTarget] = {}
    for pg in planned:
        left = pg.group.channels - pg.done
        kept = 1.0 if pg.to_prune is None or left <= 0 else (left - pg.to_prune) / left
        for m in pg.group.members:
            if not m.masked:
                continue
            for param in m.params:
                key = (id(m.module), param)
                entry = by_key.get(key)
                if entry is None:
                    by_key[key] = GroupTarget(Target(m.name, param, m.module), pg, kept)
                else:
                    entry.kept_fraction *= kept
                    if m.role in (PRODUCER, NORM):
                        entry.group = pg
    order = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
    return sorted(by_key.values(), key=lambda gt: (order.get(id(gt.target.module), 0), gt.target.param != "weight"))


def compaction_problems(model: nn.Module, recipe: Recipe) -> list[tuple[KeyPath, str, str]]:
    """What stands in the way of ``finalize: compact`` before anything runs: no example inputs."""
    if not recipe.compacts or example_specs(model, recipe) is not None:
        return []
    return [
        (
            ("finalize",),
            "compaction checks the compacted model's outputs and needs example inputs: add e.g. "
            "'inputs: [{shape: [1, 3, 224, 224], dtype: float32}]' at the top of the recipe",
            "inputs",
        )
    ]


def describe_groups(groups: Sequence[PlannedGroup], skipped: Sequence[str]) -> list[str]:
    """The plan's lines for a group step: one row per group, then the skipped groups."""
    rows = [
        [str(i), pg.group.root, str(pg.group.channels), str(pg.done), "?" if pg.to_prune is None else str(pg.to_prune), pg.group.describe()]
        for i, pg in enumerate(groups, 1)
    ]
    lines = format_table(["group", "root", "channels", "pruned", "prunes", "members"], rows)
    lines.extend(f"skipped: {s}" for s in skipped)
    return lines


def example_tensors(model: nn.Module, recipe: Recipe) -> tuple[torch.Tensor, ...] | None:
    """The example inputs of ``recipe`` for ``model`` as tensors (None when there are none)."""
    specs = example_specs(model, recipe)
    return None if specs is None else make_inputs(model, specs)
