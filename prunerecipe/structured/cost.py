"""What a model costs: parameters, and multiply-accumulates of its conv and linear layers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .graph import conv1d_type
from .inputs import first_tensor, forward


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``, each tensor once (a pruned weight counts its ``*_orig``)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    """Multiply-accumulates of one forward pass on ``inputs``, counted over convolutions,
    ``nn.Linear`` and transformers' ``Conv1D`` (what channel pruning shrinks; attention's
    matrix products and element-wise work are left out)."""
    conv1d = conv1d_type()
    total = [0]

    def hook(module: Any, args: Any, output: Any) -> None:
        out = first_tensor(output)
        if out is None:
            return
        if isinstance(module, nn.modules.conv._ConvNd):
            total[0] += out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        elif isinstance(module, nn.Linear):
            total[0] += out.numel() * module.in_features
        else:
            total[0] += out.numel() * int(module.weight.shape[0])

    kinds: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.Linear) + ((conv1d,) if conv1d is not None else ())
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return total[0]
