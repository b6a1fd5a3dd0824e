"""A Lightning callback that prunes by a recipe while training (``pip install 'prunerecipe[lightning]'``).

    from lightning.pytorch import Trainer
    from prunerecipe.lightning import RecipePruning

    trainer = Trainer(max_epochs=10, callbacks=[RecipePruning("recipes/digits-gradual.yaml")])
    trainer.fit(model, data)

Unscheduled steps run when fitting starts, scheduled ones at the end of each epoch
(``unit: epoch``, with the epoch just finished) or after each optimizer step
(``unit: step``, with ``trainer.global_step``). Per-parameter and global sparsity are
logged as ``sparsity/<name>`` and ``sparsity/global`` after every pruning event.

Checkpoints stay loadable anywhere: their ``state_dict`` holds plain, already-masked
weights, while the masks and the Pruner's progress travel in this callback's state. On
resume the masks are put back after the optimizers exist, exactly as in the original run,
so training continues as if never interrupted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..load import load_recipe
from ..spec import Recipe
from ..torchprune import MASK, ORIG, count_zeros, fold_state_dict, pruned_parameters, pruning_hooks, restore_mask
from .pruner import Pruner

try:  # the unified package first, then the standalone one
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[assignment,no-redef,unused-ignore]
    except ImportError as exc:
        raise ImportError("prunerecipe.lightning needs Lightning: pip install 'prunerecipe[lightning]'") from exc


class RecipePruning(Callback):
    """Drive a :class:`~prunerecipe.Pruner` from a recipe inside a Lightning ``Trainer``."""

    def __init__(self, recipe: Recipe | str | os.PathLike[str], *, overrides: Mapping[str, Any] | None = None, log_sparsity: bool = True) -> None:
        super().__init__()
        self.recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
        self.log_sparsity = log_sparsity
        self.pruner: Pruner | None = None
        self._restored: dict[str, Any] | None = None

    # --- fitting ------------------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.pruner is not None:
            return
        if self._restored:
            for name, mask in self._restored.get("masks", {}).items():
                module_name, _, param = name.rpartition(".")
                restore_mask(pl_module.get_submodule(module_name), param, mask)
            self.pruner = Pruner(pl_module, self.recipe, state=self._restored["pruner"])
        else:
            self.pruner = Pruner(pl_module, self.recipe)
            self._log(trainer, pl_module, from_hook=False)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.pruner is not None and self.pruner.step(epoch=trainer.current_epoch):
            self._log(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.pruner is not None and self.pruner.has_pending("step") and self.pruner.step(step=trainer.global_step):
            self._log(trainer, pl_module, on_step=True)

    def _log(self, trainer: Any, pl_module: Any, *, from_hook: bool = True, on_step: bool = False) -> None:
        if not self.log_sparsity or self.pruner is None:
            return
        metrics = self.sparsity()
        if from_hook:
            pl_module.log_dict(metrics, on_step=on_step, on_epoch=not on_step, logger=True)
        elif trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def sparsity(self) -> dict[str, float]:
        """``{"sparsity/<parameter>": fraction of zeros, ..., "sparsity/global": ...}`` over the recipe's targets."""
        assert self.pruner is not None
        out: dict[str, float] = {}
        zeros = total = 0
        scratch: dict = {}
        for t in self.pruner.targets:
            z = count_zeros(t.module, t.param, scratch)
            n = t.original.numel()
            out[f"sparsity/{t.qualname}"] = z / n if n else 0.0
            zeros, total = zeros + z, total + n
        out["sparsity/global"] = zeros / total if total else 0.0
        return out

    # --- checkpoints --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.pruner is None:
            return dict(self._restored or {})
        masks = {name: module.get_buffer(param + MASK).detach().clone() for name, module, param in pruned_parameters(self.pruner.model)}
        return {"pruner": self.pruner.state_dict(), "masks": masks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Store plain masked weights under the usual keys, so the checkpoint loads into a fresh module.

        The live, still-pruned module learns to accept such a checkpoint too (for
        ``trainer.validate/test(ckpt_path="best")`` after fitting): see :class:`AcceptFolded`.
        """
        for _, module, _ in pruned_parameters(pl_module):
            if not module.__dict__.get("_prunerecipe_accepts_folded"):
                module._register_load_state_dict_pre_hook(AcceptFolded(), with_module=True)
                module.__dict__["_prunerecipe_accepts_folded"] = True
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            checkpoint["state_dict"] = fold_state_dict(state)


class AcceptFolded:
    """``load_state_dict`` pre-hook on a pruned module: a plain ``X`` entry (as this callback's
    checkpoints hold) loads as ``X_orig = X`` and ``X_mask = (X != 0)``, which gives exactly
    the checkpoint's effective weights."""

    def __call__(self, module: Any, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for hook in pruning_hooks(module):
            key = prefix + hook._tensor_name
            if key in state_dict and key + ORIG not in state_dict:
                value = state_dict.pop(key)
                state_dict[key + ORIG] = value
                state_dict[key + MASK] = (value != 0).to(module.get_buffer(hook._tensor_name + MASK).dtype)


__all__ = ["AcceptFolded", "RecipePruning"]
