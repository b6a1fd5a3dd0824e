"""Which dimension of a parameter runs along its layer's inputs, and the ``(out, in)`` view.

N:M groups, Wanda's per-input-feature norms and SparseGPT's columns all run along the input
dimension. It is dim 1 for ``nn.Linear`` and ``ConvNd`` weights (``(out, in, ...)``) and dim 0
for transposed convolutions and Hugging Face's GPT-2 ``Conv1D``, which stores its weight
as ``(in, out)``. The "canonical" view puts the input dimension at dim 1.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.conv import _ConvTransposeNd


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``Conv1D`` (GPT-2's transposed Linear), known by
    its class and module names so that transformers is not imported for the test."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(module).__mro__)


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a ``Conv1D``: a matrix product over the last dimension of the input,
    the layers calibration statistics are collected for."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def input_dim(module: nn.Module, name: str, ndim: int) -> int:
    """The dimension of ``module.<name>`` (with ``ndim`` dims) that runs along the layer's inputs.

    Example:
        >>> input_dim(nn.Linear(3, 2), "weight", 2), input_dim(nn.Linear(3, 2), "bias", 1)
        (1, 0)
    """
    if ndim <= 1:
        return 0
    if name == "weight" and (is_conv1d(module) or isinstance(module, _ConvTransposeNd)):
        return 0
    return 1


def input_dim_known(module: nn.Module, ndim: int) -> bool:
    """Whether :func:`input_dim` knows the layout: a matrix or vector, or a convolution's
    kernel. A tensor of more dimensions on another module (a MoE layer's stacked experts,
    ``(experts, out, in)`` used as ``F.linear(x, W[e])``) has its input dimension anywhere."""
    return ndim <= 2 or isinstance(module, nn.modules.conv._ConvNd)


def to_canonical(t: torch.Tensor, dim: int) -> torch.Tensor:
    """A view of ``t`` with its input dimension ``dim`` moved to dim 1 (1-D tensors unchanged)."""
    return t if t.dim() <= 1 or dim == 1 else t.movedim(dim, 1)


def from_canonical(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of :func:`to_canonical`."""
    return t if t.dim() <= 1 or dim == 1 else t.movedim(1, dim)
