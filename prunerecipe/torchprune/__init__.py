"""The one module that touches ``torch.nn.utils.prune``'s internals and its naming.

torch prunes ``module.<name>`` by moving the parameter to ``<name>_orig``, registering a
``<name>_mask`` buffer, recomputing ``<name> = orig * mask`` in a forward pre-hook (a
``BasePruningMethod``, or a ``PruningContainer`` of them), and undoing the re-parametrization
in ``prune.remove``. Everything else in prunerecipe goes through the helpers here: attach a
precomputed mask, restore a saved one, snapshot and roll back, count zeros, list what is pruned.

One concept per module: :mod:`.naming` (``<name>_orig``/``<name>_mask``, hooks, plain
state_dicts), :mod:`.reparam` (attach, restore, remove), :mod:`.snapshot` (roll back),
:mod:`.copying` (deep copies and pickles at any time), :mod:`.counting` (zero entries).
"""

from __future__ import annotations

from .copying import PrunedGetState, make_copyable
from .counting import count_zeros, kept_entries, masked_slices, zero_entries
from .naming import (
    MASK,
    ORIG,
    fold_state_dict,
    foreign_reparam,
    has_param,
    hook_for,
    is_pruned,
    original,
    own_parameters,
    owned_mask,
    pruned_keys,
    pruning_hooks,
    unpruned_name,
)
from .reparam import (
    apply_any_layout,
    attach,
    attach_rewritten,
    effective,
    finalize,
    global_unstructured,
    match_mask_dtype,
    move_to_end,
    pruned_parameters,
    refresh,
    restore_mask,
)
from .snapshot import ModelSnapshot

# Pickles of pruned models (``torch.save(model)``) name this class: keep the path they were
# written with, whichever submodule defines it.
PrunedGetState.__module__ = __name__

__all__ = [
    "MASK",
    "ORIG",
    "ModelSnapshot",
    "PrunedGetState",
    "apply_any_layout",
    "attach",
    "attach_rewritten",
    "count_zeros",
    "effective",
    "finalize",
    "fold_state_dict",
    "foreign_reparam",
    "global_unstructured",
    "has_param",
    "hook_for",
    "is_pruned",
    "kept_entries",
    "make_copyable",
    "masked_slices",
    "match_mask_dtype",
    "move_to_end",
    "original",
    "own_parameters",
    "owned_mask",
    "pruned_keys",
    "pruned_parameters",
    "pruning_hooks",
    "refresh",
    "restore_mask",
    "unpruned_name",
    "zero_entries",
]
