"""Dependency groups: which channels of which layers must go together.

A group is read from torch-pruning's graph by removing every output channel of one layer
(its root) and collecting what that drags along: other layers' output channels (a residual
add ties them), BatchNorm channels, and the consumers' input slices, each with the group
channel every index belongs to (a flatten maps one channel to many inputs of a Linear).

Members prunerecipe masks and compacts exactly: convolutions (not grouped, not transposed),
``nn.Linear``, transformers' ``Conv1D`` (producers and consumers), and BatchNorm (its
channels follow the producer). Anything else in a group (LayerNorm, RMSNorm, embeddings,
grouped or depthwise convolutions, bare parameters) is unsupported: removing channels
there is not exact, or not a per-channel operation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .graph import Graph, conv1d_type

PRODUCER = "out"  # the layer's output channels are the group's channels
CONSUMER = "in"  # the layer reads the group's channels (an input slice of its weight)
NORM = "norm"  # per-channel parameters that follow the producer (BatchNorm)


@dataclass(frozen=True)
class Member:
    """One layer's part in a group: ``positions`` along ``dim`` of its weight, and the group
    channel of each (both 1-D long tensors of the same length)."""

    name: str
    module: nn.Module = field(repr=False, compare=False)
    role: str
    dim: int
    positions: torch.Tensor = field(repr=False, compare=False)
    channels: torch.Tensor = field(repr=False, compare=False)
    selected: bool = True

    @property
    def masked(self) -> bool:
        """Whether a group step masks this member: producers and norms always, consumers
        only when the step selects them (an unselected classifier is never masked)."""
        return self.role != CONSUMER or self.selected

    @property
    def params(self) -> tuple[str, ...]:
        """The parameters whose channels the group touches (a consumer's bias has none)."""
        names = ["weight"] if getattr(self.module, "weight", None) is not None else []
        if self.role != CONSUMER and getattr(self.module, "bias", None) is not None:
            names.append("bias")
        return tuple(names)

    def param_dim(self, param: str) -> int:
        return self.dim if param == "weight" else 0

    def describe(self) -> str:
        role = {PRODUCER: "out", CONSUMER: "in", NORM: "norm"}[self.role]
        return f"{self.name} ({type(self.module).__name__}, {role}{'' if self.masked else ', not selected: unmasked'})"


@dataclass(frozen=True)
class ChannelGroup:
    """Coupled channels: ``channels`` of them, shared by every member."""

    root: str
    channels: int
    members: tuple[Member, ...]

    @property
    def producers(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.role == PRODUCER)

    def member_names(self) -> list[str]:
        return [m.name for m in self.members]

    def describe(self) -> str:
        """``conv1, bn1, layer1.0.conv2 (out) ...``: every member with its role."""
        return ", ".join(m.describe() for m in self.members)

    def to_dict(self) -> dict[str, object]:
        return {
            "root": self.root,
            "channels": self.channels,
            "members": [
                {"name": m.name, "type": type(m.module).__name__, "role": m.role, "masked": m.masked, "params": list(m.params)} for m in self.members
            ],
        }


def layer_role(module: object) -> str | None:
    """``"layer"`` for a layer that can produce and consume channels, ``"norm"`` for
    BatchNorm, None for anything else (unsupported)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return "layer" if module.groups == 1 and not module.transposed else None
    if isinstance(module, nn.Linear):
        return "layer"
    conv1d = conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return "layer"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return NORM if module.affine else None  # without a scale and shift there is nothing to zero a channel with
    return None


def channel_dims(module: nn.Module) -> tuple[int, int]:
    """(output dim, input dim) of a layer's weight: (0, 1), or (1, 0) for ``Conv1D``."""
    conv1d = conv1d_type()
    return (1, 0) if conv1d is not None and isinstance(module, conv1d) else (0, 1)


HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_head", "n_heads", "head_dim")


def attention_owner(model: nn.Module, name: str) -> tuple[str, str] | None:
    """The attention block ``name`` lies in, as (name, class), or None.

    Heads tie a projection's channels through reshapes that torch-pruning cannot map
    exactly, so group steps refuse layers inside attention: found by class (a class whose
    name contains ``Attention``, or ``nn.MultiheadAttention``), or by a head count the
    module keeps (``num_heads``, ``num_attention_heads``, ``n_head``, ``n_heads``,
    ``head_dim``), as self-written attention modules do, unless the module holds an attention
    module of its own (a transformer layer keeping its attention's head count).
    """
    parts = name.split(".") if name else []
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        try:
            owner = model.get_submodule(prefix)
        except AttributeError:
            continue
        if _is_attention_class(owner):
            return prefix, type(owner).__name__
        # a head count on a block that holds an attention module with projections of its own
        # is that module's (a transformer layer's MLP beside it is not attention); a helper
        # without parameters (ScaledDotProductAttention) does not take it over
        counts_heads = any(isinstance(getattr(owner, a, None), int) and not isinstance(getattr(owner, a), bool) for a in HEAD_ATTRIBUTES)
        if counts_heads and not any(_is_attention_class(m) and any(True for _ in m.parameters()) for m in owner.modules() if m is not owner):
            return prefix, type(owner).__name__
    return None


def _is_attention_class(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or any("Attention" in c.__name__ for c in type(module).__mro__ if c is not nn.Module)


@dataclass
class Found:
    """Groups read from graphs: the usable ones, the skipped ones (why), unsupported members."""

    groups: list[ChannelGroup] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)


@dataclass
class Read:
    """One root's group as a graph shows it: the group, whether it reaches the traced
    module's ``"output"`` or an ``"input"`` (else None), producers not ``chosen``, and
    members that cannot be masked per channel."""

    group: ChannelGroup
    boundary: str | None
    outsiders: list[str]
    unsupported: list[str]


def read_group(graph: Graph, name: str, root: nn.Module, chosen: set[int]) -> Read:
    """The group of ``root``'s output channels in ``graph``."""
    dg, tp = graph.dg, graph.tp
    pruner = dg.get_pruner_of_module(root)
    count = int(pruner.get_out_channels(root))
    group = dg.get_pruning_group(root, pruner.prune_out_channels, list(range(count)))
    members: dict[tuple[int, str], tuple[nn.Module, str, int, list[int], list[int]]] = {}
    boundary = None
    unsupported: list[tuple[int, str]] = []  # (model order, text)
    placeholders = tuple(
        getattr(tp.ops, n)
        for n in ("_ElementWiseOp", "_ReshapeOp", "_ConcatOp", "_SplitOp", "_SliceOp", "_ExpandOp", "_UnbindOp")
        if hasattr(tp.ops, n)
    )
    splits = tuple(getattr(tp.ops, n) for n in ("_SplitOp", "_UnbindOp") if hasattr(tp.ops, n))
    for item in group:
        node = item.dep.target
        module = node.module
        # a layer reading the channels (in-channel pruning) does not pass them on
        passes_on = layer_role(module) != "layer" or dg.is_out_channel_pruning_fn(item.dep.handler)
        if passes_on and (graph.is_output(node.grad_fn) or isinstance(module, tp.ops._OutputOp)):
            boundary = "output"
        elif graph.is_input(node.grad_fn):
            boundary = "input"
        if isinstance(module, splits):
            # torch-pruning 1.6 maps the parts of a split/chunk in reverse order (checked against
            # slicing): the consumers would get the wrong channels, so such a group is refused
            unsupported.append((-1, f"torch.split/chunk of these channels ({type(module).__name__.strip('_')}; its parts are not mapped reliably)"))
            continue
        if isinstance(module, (*placeholders, tp.ops._OutputOp)):
            continue
        member_name = graph.names.get(id(module), getattr(node, "name", "?"))
        kind = layer_role(module)
        if kind is None:
            plain = isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.affine
            what = "a parameter used outside a layer" if isinstance(module, nn.Parameter) else type(module).__name__
            unsupported.append(
                (
                    graph.order.get(id(module), len(graph.order)),
                    f"{member_name} ({what}{', affine=False: no scale or shift to zero' if plain else ''})",
                )
            )
            continue
        out_dim, in_dim = channel_dims(module)
        if kind == NORM:
            role, dim = NORM, 0
        elif dg.is_out_channel_pruning_fn(item.dep.handler):
            role, dim = PRODUCER, out_dim
        else:
            role, dim = CONSUMER, in_dim
        key = (id(module), role)
        positions, channels = [int(i) for i in item.idxs], [int(i) for i in item.root_idxs]
        if key in members:
            members[key][3].extend(positions)
            members[key][4].extend(channels)
        else:
            members[key] = (module, role, dim, positions, channels)
    built = []
    for module, role, dim, positions, channels in members.values():
        built.append(
            Member(
                graph.names.get(id(module), "?"),
                module,
                role,
                dim,
                torch.tensor(positions, dtype=torch.long),
                torch.tensor(channels, dtype=torch.long),
                id(module) in chosen,
            )
        )
    built.sort(key=lambda m: (graph.order.get(id(m.module), 0), m.role))
    result = ChannelGroup(name, count, tuple(built))
    return Read(result, boundary, [m.name for m in result.producers if not m.selected], [text for _, text in sorted(dict.fromkeys(unsupported))])


__all__ = ["CONSUMER", "NORM", "PRODUCER", "ChannelGroup", "Found", "Member", "Read", "attention_owner", "read_group"]
