"""Compaction: channels masked across their whole dependency group, physically removed.

``compact`` folds every mask into its weights (``prune.remove``), finds the groups of the
layers whose masks zero whole output channels, refuses groups whose producers disagree,
makes the removed channels exact zeros (a masked channel still emits its BatchNorm's shift
or its bias), removes them with torch-pruning, and checks the compacted model against the
masked one on the example inputs. Anything that fails puts the model back as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import KeyPath, Problem, RecipeError, StructuredError, problem
from ..spec import Recipe
from ..text import listing
from ..torchprune import ModelSnapshot, finalize, owned_mask, pruned_parameters
from . import record as records
from .cost import count_macs, count_params
from .graph import TimeLimitExceeded, layer_pruner, torch_pruning
from .groups import CONSUMER, NORM, ChannelGroup, Found, channel_dims, layer_role
from .hfconfig import update_config
from .inputs import default_specs, forward, make_inputs
from .masks import dead_channels
from .scopes import discover

#: the compacted model's outputs may differ from the masked model's by this much, relative to
#: the largest absolute output (float sums in another order)
TOLERANCE = 1e-5


@dataclass(frozen=True)
class RemovedGroup:
    """One group a compaction shrank."""

    root: str
    members: tuple[str, ...]
    channels: int
    removed: int


@dataclass(frozen=True)
class Compaction:
    """What :func:`compact` did: the groups it shrank, the cost before and after, the check."""

    groups: tuple[RemovedGroup, ...]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    max_diff: float
    scale: float
    tolerance: float
    config: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def removed_channels(self) -> int:
        return sum(g.removed for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": [{"root": g.root, "members": list(g.members), "channels": g.channels, "removed": g.removed} for g in self.groups],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "max_diff": self.max_diff,
            "output_scale": self.scale,
            "tolerance": self.tolerance,
            "config": dict(self.config),
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        total = sum(g.channels for g in self.groups)
        lines = [
            f"compacted: {len(self.groups)} group(s), {self.removed_channels} of {total} channels removed; "
            f"parameters {self.params_before:,} -> {self.params_after:,} ({_ratio(self.params_after, self.params_before)}), "
            f"MACs {_giga(self.macs_before)} -> {_giga(self.macs_after)} ({_ratio(self.macs_after, self.macs_before)}); "
            f"outputs within {self.max_diff:.3g} of the masked model's (allowed {self.tolerance * self.scale:.3g})"
        ]
        if self.config:
            lines.append("model.config: " + ", ".join(f"{k} = {v}" for k, v in self.config.items()))
        if not self.groups:
            lines.append(
                "note: no channel was masked, so nothing was removed: compaction removes the channels that masks zero across a "
                "dependency group, and a dense or finalized checkpoint carries no masks (prune with masks kept, then compact)"
            )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _ratio(a: int, b: int) -> str:
    return f"{100.0 * a / b:.1f}%" if b else "-"


def _giga(n: int) -> str:
    return f"{n / 1e9:.3g}G" if n >= 1e8 else f"{n / 1e6:.3g}M"


class _Failure(Exception):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def compact(
    model: nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    tolerance: float = TOLERANCE,
    time_limit: float | None = None,
    recipe: Recipe | None = None,
) -> Compaction:
    """Remove, in place, every channel whose weight mask is zero in every producer of its group.

    Masks are folded first (``prune.remove``, as ``finalize`` does); the removed channels'
    BatchNorm scale and shift and their biases are zeroed, so that they are exact zero
    channels, then torch-pruning removes them from every member of their group (consumers'
    input slices too, a classifier's included). The compacted model must give the masked
    model's outputs on ``inputs`` (max abs difference within ``tolerance`` times the largest
    output), and carries a compaction record (a ``__prunerecipe_compaction__`` buffer) so that
    its state_dict loads into a freshly built model. A Hugging Face model's ``config`` is
    updated when one width fits every layer.

    Args:
        model: a pruned model (``torch.nn.utils.prune`` masks), changed in place.
        inputs: example inputs (a tensor or a sequence, one per forward argument); default:
            a batch of ``input_ids`` for a Hugging Face model.
        tolerance: allowed output difference, relative to the largest absolute output.
        time_limit: seconds tracing may take (default ``PRUNERECIPE_TRACE_TIMEOUT``, 300).
        recipe: locates error messages at the recipe's ``finalize`` key.

    Returns:
        A :class:`Compaction`: the groups shrunk, parameters and MACs before and after, the
        output difference.

    Raises:
        StructuredError: no inputs, group masks that disagree, layers that cannot be
            compacted, a failed output check, torch-pruning missing; the model is unchanged.

    Example:
        >>> import torch.nn.utils.prune as prune
        >>> from prunerecipe.zoo import ResNet
        >>> model = ResNet(width=8).eval()
        >>> _ = prune.ln_structured(model.layer1[0].conv1, "weight", amount=0.5, n=2, dim=0)
        >>> _ = prune.custom_from_mask(model.layer1[0].bn1, "weight", model.layer1[0].conv1.weight_mask[:, 0, 0, 0])
        >>> _ = prune.custom_from_mask(model.layer1[0].bn1, "bias", model.layer1[0].conv1.weight_mask[:, 0, 0, 0])
        >>> result = compact(model, torch.randn(1, 3, 64, 64))
        >>> model.layer1[0].conv1.out_channels, result.removed_channels
        (4, 4)
    """
    tensors = _inputs(model, inputs, recipe)
    modes = [(m, m.training) for m in model.modules()]
    snapshot = ModelSnapshot(list(model.modules()))
    config = getattr(model, "config", None)
    saved_config = dict(vars(config)) if config is not None else {}
    try:
        return _compact(model, tensors, tolerance, time_limit)
    except BaseException as exc:
        snapshot.restore()
        if config is not None:
            vars(config).clear()
            vars(config).update(saved_config)
        if isinstance(exc, _Failure):
            raise StructuredError(_problem(recipe, f"{exc.message}; nothing was changed", exc.code)) from None
        if isinstance(exc, TimeLimitExceeded):
            raise StructuredError(_problem(recipe, f"{exc} (raise PRUNERECIPE_TRACE_TIMEOUT); nothing was changed", "timeout")) from None
        if isinstance(exc, RecipeError) or not isinstance(exc, Exception):
            raise
        raise StructuredError(_problem(recipe, f"compaction failed: {type(exc).__name__}: {exc}; nothing was changed", "structured")) from exc
    finally:
        for module, mode in modes:
            module.training = mode


def _problem(recipe: Recipe | None, message: str, code: str) -> Problem:
    path: KeyPath = ("finalize",)
    return recipe.problem(path, message, code) if recipe is not None else problem(message, source="compact", code=code)


def _inputs(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor] | None, recipe: Recipe | None) -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if inputs is not None:
        return tuple(inputs)
    specs = (recipe.inputs if recipe is not None else None) or default_specs(model)
    if specs is None:
        raise StructuredError(
            _problem(recipe, "compaction checks the compacted model's outputs and needs example inputs (compact(model, inputs))", "inputs")
        )
    return make_inputs(model, specs)


def _compact(model: nn.Module, inputs: tuple[torch.Tensor, ...], tolerance: float, time_limit: float | None) -> Compaction:
    torch_pruning()  # fail early, before anything changes
    model.eval()
    with torch.no_grad():
        reference = [t.detach().clone() for t in forward(model, inputs)]
    if all(t.numel() == 0 for t in reference):
        raise _Failure("the model's outputs on the example inputs are empty: the output check would compare nothing", "inputs")
    macs_before = count_macs(model, inputs)
    params_before = count_params(model)
    masks = {(id(m), p): mask.detach().clone() for _, m, p in pruned_parameters(model) if (mask := owned_mask(m, p)) is not None}
    roots = []
    for name, module in model.named_modules():
        mask = masks.get((id(module), "weight"))
        if mask is not None and layer_role(module) == "layer":
            out_dim = channel_dims(module)[0]
            rows = mask.movedim(out_dim, 0).reshape(mask.shape[out_dim], -1)
            if bool((rows == 0).all(dim=1).any()):
                roots.append((name, module))
    finalize(model)
    groups: list[tuple[ChannelGroup, list[int]]] = []
    notes: list[str] = []
    changes: dict[str, int] = {}
    if roots:
        groups, notes = _removable(discover(model, inputs, roots, {id(m) for m in model.modules()}, time_limit), masks)
        removals = _removals(groups)
        _zero(groups)
        records.remove_channels(
            [(model.get_submodule(name), dim, removed) for name, (_, dims) in removals.items() for dim, (_, removed) in dims.items()]
        )
        changes, note = update_config(model, [(g.channels, g.channels - len(c)) for g, c in groups])
        if note:
            notes.append(note)
        elif changes:
            records.leave_out_of_save_pretrained(model)
        records.attach(model, records.merged(records.current(model), removals, changes))
    with torch.no_grad():
        outputs = forward(model, inputs)
    diff, scale, tolerance = _check(outputs, reference, tolerance)
    removed = tuple(RemovedGroup(g.root, tuple(g.member_names()), g.channels, len(c)) for g, c in groups)
    return Compaction(
        removed, params_before, count_params(model), macs_before, count_macs(model, inputs), diff, scale, tolerance, changes, tuple(notes)
    )


def allowed(tolerance: float, dtype: torch.dtype) -> float:
    """The relative tolerance an output of ``dtype`` is checked with: ``tolerance``, or 4 roundings
    of a half-precision type, whose resolution is coarser than the default 1e-5."""
    return max(tolerance, 4 * torch.finfo(dtype).eps) if dtype.is_floating_point and torch.finfo(dtype).eps > 1e-6 else tolerance


def _check(outputs: list[torch.Tensor], reference: list[torch.Tensor], tolerance: float) -> tuple[float, float, float]:
    """The worst output's max abs difference, scale and tolerance; a :class:`_Failure` past it."""
    if len(outputs) != len(reference):
        raise _Failure(f"the compacted model returns {len(outputs)} tensors, the masked model {len(reference)}", "output-check")
    worst = (0.0, 0.0, tolerance)
    for i, (output, ref) in enumerate(zip(outputs, reference)):
        tol = allowed(tolerance, ref.dtype)
        which, verb = (f"output {i + 1} of {len(reference)}", "differs") if len(reference) > 1 else ("outputs", "differ")
        if tuple(output.shape) != tuple(ref.shape):
            raise _Failure(
                f"the compacted model's {which.removesuffix('s')} has shape {tuple(output.shape)}, the masked model's {tuple(ref.shape)}",
                "output-check",
            )
        diff = float((output.double() - ref.double()).abs().max()) if output.numel() else 0.0
        scale = float(ref.double().abs().max()) if ref.numel() else 0.0
        if not diff <= tol * scale:
            raise _Failure(
                f"the compacted model's {which} {verb} from the masked model's by {diff:.3g} (max abs difference; allowed {tol:g} x "
                f"output scale {scale:.3g} = {tol * scale:.3g}). A removed channel must give 0 to every layer that reads it: it does "
                "not when its BatchNorm or bias is left unmasked (scope: group masks those), or when an activation maps 0 to something "
                "else (sigmoid, an added constant) before a layer outside the group reads it",
                "output-check",
            )
        if diff * (worst[1] or 1.0) >= worst[0] * (scale or 1.0):
            worst = (diff, scale, tol)
    return worst


def _removable(found: Found, masks: dict[tuple[int, str], torch.Tensor]) -> tuple[list[tuple[ChannelGroup, list[int]]], list[str]]:
    """The groups to shrink and their channels. Groups that hold layers that cannot be
    compacted, whose producers disagree, or that would lose every channel are refused, all
    of them named (the code is the first finding's)."""
    failures = [(text, "unsupported") for text in found.unsupported]
    out = []
    for group in found.groups:
        dead = dead_channels(group, masks)
        every = torch.stack(dead).all(dim=0)
        some = torch.stack(dead).any(dim=0)
        if bool((some & ~every).any()):
            shown = [f"{p.name} masks {_channels(d)}" for p, d in zip(group.producers, dead)]
            failures.append(
                (
                    f"the group of {group.root} ({listing('members', group.member_names())}) has masks that disagree: "
                    + "; ".join(shown)
                    + ". A channel can be removed only when every producer of its group masks it: prune with scope: group, "
                    "which masks the same channels in each",
                    "inconsistent-masks",
                )
            )
        elif bool(every.all()):
            failures.append(
                (
                    f"the group of {group.root} has all its {group.channels} channels masked: removing them all would cut the model in two",
                    "structured",
                )
            )
        elif bool(every.any()):
            out.append((group, every.nonzero().flatten().tolist()))
    if failures:
        raise _Failure("cannot compact: " + " | ".join(text for text, _ in failures), failures[0][1])
    return out, [f"kept (cannot be removed): {s}" for s in found.skipped]


def _channels(dead: torch.Tensor) -> str:
    idx = dead.nonzero().flatten().tolist()
    if not idx:
        return "no channel"
    shown = ", ".join(map(str, idx[:6])) + (", ..." if len(idx) > 6 else "")
    return f"{len(idx)} channel(s) ({shown})"


@torch.no_grad()
def _zero(groups: list[tuple[ChannelGroup, list[int]]]) -> None:
    """Make removed channels exact zeros: BatchNorm scale and shift, producers' biases.

    New tensors are assigned (``.data``), never written in place, so a snapshot taken
    before can put the old values back."""
    for group, channels in groups:
        gone = torch.zeros(group.channels, dtype=torch.bool)
        gone[channels] = True
        for m in group.members:
            if m.role == CONSUMER:
                continue
            for param in m.params if m.role == NORM else ("bias",) if "bias" in m.params else ():
                p = getattr(m.module, param)
                hit = m.positions[gone[m.channels]]
                value = p.data.clone()
                value[hit.to(value.device)] = 0
                p.data = value


def _removals(groups: list[tuple[ChannelGroup, list[int]]]) -> dict[str, tuple[str, dict[str, tuple[int, list[int]]]]]:
    """Per module: ``(type, {"out"|"in": (size now, removed indices now)})``."""
    out: dict[str, tuple[str, dict[str, tuple[int, list[int]]]]] = {}
    for group, channels in groups:
        gone = torch.zeros(group.channels, dtype=torch.bool)
        gone[channels] = True
        for m in group.members:
            pruner = layer_pruner(m.module)
            dim = "in" if m.role == CONSUMER else "out"
            size = int(pruner.get_in_channels(m.module) if dim == "in" else pruner.get_out_channels(m.module))
            hit = m.positions[gone[m.channels]].tolist()
            entry = out.setdefault(m.name, (type(m.module).__name__, {}))
            before = entry[1].get(dim, (size, []))
            entry[1][dim] = (size, sorted(set(before[1]) | set(hit)))
    return out


__all__ = ["TOLERANCE", "Compaction", "RemovedGroup", "compact"]
