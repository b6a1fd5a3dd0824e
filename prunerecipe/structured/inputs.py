"""Example inputs for tracing and output checks, and the one tensor a forward pass is judged by.

Inputs come from the recipe's ``inputs`` (shape and dtype per forward argument) or, for a
Hugging Face model, default to a small ``input_ids`` batch. Values are drawn from a private
generator, so tracing never moves the global RNG (a seeded recipe stays reproducible).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..spec import InputSpec

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}

#: the default example input of a Hugging Face model: one sequence of this many token ids
HF_TOKENS = 16

_SEED = 20240615  # any fixed value: the same inputs for the plan, the apply and the check


def is_hugging_face(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (found by class name: importing
    transformers only to ask would cost seconds)."""
    return any(cls.__name__ == "PreTrainedModel" for cls in type(model).__mro__) and hasattr(model, "config")


def _vocab_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "vocab_size", None)
    return int(size) if isinstance(size, int) and size > 0 else None


def _device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def describe(specs: Sequence[InputSpec]) -> str:
    """``[1x3x224x224 float32]``: how messages show example inputs."""
    return "[" + ", ".join("x".join(map(str, s.shape)) + f" {s.dtype}" for s in specs) + "]"


def default_specs(model: nn.Module) -> tuple[InputSpec, ...] | None:
    """The inputs used when a recipe gives none: ``input_ids`` for a Hugging Face model, else None."""
    if is_hugging_face(model):
        return (InputSpec((1, HF_TOKENS), "int64"),)
    return None


def make_inputs(model: nn.Module, specs: Sequence[InputSpec]) -> tuple[torch.Tensor, ...]:
    """Tensors for ``specs`` on the model's device: floats from a standard normal, integers in
    ``[0, vocab_size)`` (the model's config, else ``[0, 2)``), from a fixed private seed."""
    generator = torch.Generator().manual_seed(_SEED)
    device = _device(model)
    high = _vocab_size(model) or 2
    out = []
    for spec in specs:
        dtype = DTYPES[spec.dtype]
        shape = tuple(spec.shape)
        if dtype.is_floating_point:
            tensor = torch.randn(shape, generator=generator).to(dtype)
        elif dtype is torch.bool:
            tensor = torch.randint(0, 2, shape, generator=generator).bool()
        else:
            tensor = torch.randint(0, high, shape, generator=generator, dtype=dtype)
        out.append(tensor.to(device))
    return tuple(out)


def first_tensor(output: Any) -> torch.Tensor | None:
    """The first tensor of an output (see :func:`output_tensors`), or None."""
    found = output_tensors(output)
    return found[0] if found else None


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors an output is judged by: ``.logits`` of a Hugging Face output (its caches and
    hidden states follow from the same layers), else every tensor in it: the tensor itself, or
    those in mappings, tuples and lists, in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return [logits]
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    return [t for value in values for t in output_tensors(value)]


def forward(model: nn.Module, inputs: Sequence[torch.Tensor], kwargs: Mapping[str, Any] | None = None) -> list[torch.Tensor]:
    """``model(*inputs, **kwargs)`` reduced to the tensors it is judged by (:func:`output_tensors`).

    Raises:
        TypeError: the output holds no tensor.
    """
    output = model(*inputs, **(kwargs or {}))
    tensors = output_tensors(output)
    if not tensors:
        raise TypeError(f"the model's output ({type(output).__name__}) holds no tensor to trace or compare")
    return tensors
