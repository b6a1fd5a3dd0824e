"""Group masks: a group's channels ranked over all its members, the same channels masked in each.

Each channel's weight entries are gathered from every member (a producer's output slice, a
BatchNorm's scale, a consumer's input slice; zero-padded where members give a channel
different counts, which leaves Ln norms as they are) into one row per channel. The step's
own method (torch's ``LnStructured``, ``RandomStructured``, or a structured plugin) then
computes the mask of that matrix along dim 0: ties and random draws are torch's own.
Channels already masked in every producer are left out of the ranking and count as pruned,
as torch's ``PruningContainer`` does for slices.

The masks go on through ``torch.nn.utils.prune.custom_from_mask``, one per parameter and
step: state_dict keys, hooks and ``PruningContainer`` history are torch's own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.utils.prune as prune
from torch import nn

from ..amounts import checked_nparams, sparsity_count
from ..methods import MethodSpec
from ..torchprune import original, owned_mask
from .groups import ChannelGroup, Member

Key = tuple[int, str]


def channel_rows(member: Member, tensor: torch.Tensor, channels: int, dim: int) -> torch.Tensor:
    """``tensor``'s entries by group channel: ``[channels, n]``, zero-padded."""
    moved = tensor.movedim(dim, 0).reshape(tensor.shape[dim], -1)
    picked = moved[member.positions.to(tensor.device)]
    order = torch.argsort(member.channels, stable=True)
    sorted_channels = member.channels[order]
    counts = torch.bincount(sorted_channels, minlength=channels)
    width = int(counts.max()) if counts.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(sorted_channels.numel()) - starts[sorted_channels]
    rows = picked.new_zeros((channels, width, picked.shape[1]))
    rows[sorted_channels.to(tensor.device), rank.to(tensor.device)] = picked[order.to(tensor.device)]
    return rows.reshape(channels, -1)


def effective(module: nn.Module, param: str) -> torch.Tensor:
    """What the model computes with: ``orig * mask`` when pruned, else the parameter."""
    value = original(module, param).detach()
    mask = owned_mask(module, param)
    return value if mask is None else value * mask


def group_matrix(group: ChannelGroup) -> torch.Tensor:
    """Every member's effective weight, one row per channel (float32 or wider)."""
    parts = []
    for m in group.members:
        if "weight" not in m.params:
            continue
        value = effective(m.module, "weight")
        dtype = torch.promote_types(value.dtype, torch.float32)
        parts.append(channel_rows(m, value.to(dtype), group.channels, m.param_dim("weight")))
    dtype = parts[0].dtype if parts else torch.float32
    for p in parts[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    return torch.cat([p.to(dtype) for p in parts], dim=1) if parts else torch.zeros(group.channels, 0)


def dead_channels(group: ChannelGroup, masks: Mapping[Key, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Per producer, which channels its weight mask zeroes entirely (none without a mask).

    ``masks`` (keyed by ``(id(module), "weight")``) stands in for the modules' own masks,
    e.g. after they were folded.
    """
    out = []
    for m in group.producers:
        mask = masks.get((id(m.module), "weight")) if masks is not None else owned_mask(m.module, "weight")
        if mask is None:
            out.append(torch.zeros(group.channels, dtype=torch.bool))
        else:
            out.append(~channel_rows(m, mask.detach().ne(0), group.channels, m.param_dim("weight")).any(dim=1).cpu())
    return out


def pruned_channels(group: ChannelGroup) -> torch.Tensor:
    """Channels every producer of the group masks entirely (bool, one per channel)."""
    dead = dead_channels(group)
    result = torch.ones(group.channels, dtype=torch.bool)
    for d in dead:
        result &= d
    return result if dead else torch.zeros(group.channels, dtype=torch.bool)


def rank(
    group: ChannelGroup, spec: MethodSpec, args: Mapping[str, Any], amount: int | float | None, sparsity: float | None
) -> tuple[torch.Tensor, int, int]:
    """The channels to keep after this step (bool), how many were pruned before, how many it prunes.

    Raises:
        ValueError: an int amount larger than the unpruned channels (torch's message).
    """
    done_mask = pruned_channels(group)
    alive = (~done_mask).nonzero().flatten()
    done = group.channels - alive.numel()
    keep = ~done_mask
    if sparsity is not None:
        k = max(sparsity_count(sparsity, group.channels, done), 0)
    elif amount is not None:
        k = checked_nparams(amount, alive.numel())
    else:
        k = -1  # a method without an amount decides for itself
    if k == 0 or alive.numel() == 0:
        return keep, done, 0
    kwargs = dict(args)
    if "dim" in spec.arguments:
        kwargs["dim"] = 0
    if spec.takes_amount:
        kwargs["amount"] = k
    method = spec.cls(**kwargs)
    matrix = group_matrix(group)
    rows = matrix[alive.to(matrix.device)]
    sub = method.compute_mask(rows, default_mask=torch.ones_like(rows))
    keep = keep.clone()
    keep[alive] = sub.reshape(alive.numel(), -1).ne(0).any(dim=1).cpu()
    return keep, done, int(done_mask.numel() - done - int(keep.sum()))


def member_masks(selections: Sequence[tuple[ChannelGroup, torch.Tensor]]) -> dict[Key, tuple[nn.Module, str, torch.Tensor]]:
    """The mask each masked member's parameters get from the groups' kept channels (one per
    parameter; a layer in two groups, as producer and as consumer, gets the product)."""
    out: dict[Key, tuple[nn.Module, str, torch.Tensor]] = {}
    for group, keep in selections:
        for m in group.members:
            if not m.masked:
                continue
            for param in m.params:
                tensor = original(m.module, param)
                dim = m.param_dim(param)
                local = torch.ones(tensor.shape[dim], dtype=tensor.dtype, device=tensor.device)
                local[m.positions.to(tensor.device)] = keep.to(device=tensor.device, dtype=tensor.dtype)[m.channels.to(tensor.device)]
                shape = [1] * tensor.dim()
                shape[dim] = -1
                mask = local.view(shape).expand_as(tensor)
                key = (id(m.module), param)
                if key in out:
                    mask = out[key][2] * mask
                out[key] = (m.module, param, mask.contiguous())
    return out


def apply_masks(masks: Mapping[Key, tuple[nn.Module, str, torch.Tensor]], order: Sequence[tuple[nn.Module, str]]) -> None:
    """``prune.custom_from_mask`` on each parameter, in ``order`` (the plan's target order)."""
    for module, param in order:
        entry = masks.get((id(module), param))
        if entry is not None:
            prune.custom_from_mask(module, param, entry[2])
