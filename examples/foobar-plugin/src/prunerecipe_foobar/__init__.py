"""Example prunerecipe plugin: the seed's FooBar method, as a class and in function form."""

from __future__ import annotations

import torch
import torch.nn.utils.prune as prune

from prunerecipe import pruning_method

__all__ = ["FooBarPruningMethod", "every_nth"]


class FooBarPruningMethod(prune.BasePruningMethod):
    """Prune every other entry in a tensor (the seed walkthrough's custom method)."""

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        mask = default_mask.clone()
        mask.view(-1)[::2] = 0
        return mask


@pruning_method(
    "unstructured",
    args_schema={
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 2},
            "offset": {"type": "integer", "minimum": 0},
        },
    },
)
def every_nth(t: torch.Tensor, default_mask: torch.Tensor, n: int = 2, offset: int = 0) -> torch.Tensor:
    """Prune every ``n``-th entry of the flattened tensor, starting at ``offset``."""
    mask = default_mask.clone(memory_format=torch.contiguous_format)
    mask.view(-1)[offset::n] = 0
    return mask
