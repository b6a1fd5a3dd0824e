"""A Lightning callback that prunes by a recipe while training (``pip install 'prunerecipe[lightning]'``).

    from lightning.pytorch import Trainer
    from prunerecipe.lightning import RecipePruning

    trainer = Trainer(max_epochs=10, callbacks=[RecipePruning("recipes/digits-gradual.yaml")])
    trainer.fit(model, data)

Unscheduled steps run when fitting starts, scheduled ones at the end of each epoch
(``unit: epoch``, with the epoch just finished; ``on="validation_end"``: at the end of
validation instead) or after each optimizer step (``unit: step``, with
``trainer.global_step``). Per-parameter and global sparsity are logged as
``sparsity/<name>`` and ``sparsity/global`` after every pruning event; ``verbose=1`` also
writes ModelPruning's log line per event (``2``: and one per parameter). When fitting ends,
pruning is made permanent (``finalize_on_fit_end``, as ModelPruning's
``make_pruning_permanent``).

Checkpoints stay loadable anywhere: their ``state_dict`` holds plain, already-masked
weights, while the masks and the Pruner's progress travel in this callback's state. On
resume the masks are put back after the optimizers exist, exactly as in the original run,
so training continues as if never interrupted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from ..load import load_recipe
from ..spec import Recipe
from ..torchprune import MASK, ORIG, count_zeros, fold_state_dict, kept_entries, owned_mask, pruned_parameters, pruning_hooks, restore_mask
from .pruner import EventResult, Pruner

try:  # the unified package first, then the standalone one
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[assignment,no-redef,unused-ignore]
    except ImportError as exc:
        raise ImportError("prunerecipe.lightning needs Lightning: pip install 'prunerecipe[lightning]'") from exc
try:
    from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
except ImportError:  # pragma: no cover - depends on what is installed
    from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn  # type: ignore[no-redef,unused-ignore]

ON = ("train_epoch_end", "validation_end")


class RecipePruning(Callback):
    """Drive a :class:`~prunerecipe.Pruner` from a recipe inside a Lightning ``Trainer``.

    Args:
        recipe: a :class:`~prunerecipe.spec.Recipe` or the path of a recipe file.
        overrides: ``${var}`` values, as ``--set`` gives them.
        log_sparsity: log ``sparsity/<parameter>`` and ``sparsity/global`` after every event.
        finalize_on_fit_end: make pruning permanent (``prune.remove``) when fitting ends, as
            ``ModelPruning(make_pruning_permanent=True)`` does (its default, and this one's).
        resample: with the recipe's ``lottery_ticket: true``, rewind the surviving weights to
            fresh values from each module's ``reset_parameters()`` rather than to their
            initial values (``ModelPruning(resample_parameters=True)``).
        on: when ``unit: epoch`` events run: ``"train_epoch_end"`` (default) or
            ``"validation_end"`` (``ModelPruning(prune_on_train_epoch_end=False)``; not
            during the sanity check).
        verbose: ``1``: log ``Applied L1Unstructured (step 'name'): pruned 0/1088 (0.00%) ->
            326/1088 (29.96%)`` after each event, and one line for the steps without a
            schedule (they run at fit start); ``2``: and a line per parameter
            (``ModelPruning(verbose=...)``). Logged on rank 0 through Lightning's logger.
    """

    def __init__(
        self,
        recipe: Recipe | str | os.PathLike[str],
        *,
        overrides: Mapping[str, Any] | None = None,
        log_sparsity: bool = True,
        finalize_on_fit_end: bool = True,
        resample: bool = False,
        on: Literal["train_epoch_end", "validation_end"] = "train_epoch_end",
        verbose: int = 0,
    ) -> None:
        super().__init__()
        if on not in ON:
            raise ValueError(f"on={on!r}: epoch events run on one of {', '.join(map(repr, ON))}")
        if verbose not in (0, 1, 2):
            raise ValueError(f"verbose={verbose!r}: 0 (quiet), 1 (a line per event) or 2 (and a line per parameter)")
        self.recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
        if resample and not self.recipe.lottery_ticket:
            raise ValueError(
                f"resample=True changes the lottery-ticket rewind, and {self.recipe.source} does not ask for one: set 'lottery_ticket: true'"
            )
        self.log_sparsity = log_sparsity
        self.finalize_on_fit_end = finalize_on_fit_end
        self.resample = resample
        self.on = on
        self.verbose = verbose
        self.pruner: Pruner | None = None
        self._restored: dict[str, Any] | None = None
        self._masked: dict[tuple[int, str], int] = {}  # masked entries per target, as the last log line saw them

    # --- fitting ------------------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.pruner is not None:
            return
        if self._restored:
            for name, mask in self._restored.get("masks", {}).items():
                module_name, _, param = name.rpartition(".")
                restore_mask(pl_module.get_submodule(module_name), param, mask)
            self.pruner = Pruner(pl_module, self.recipe, state=self._restored["pruner"], resample=self.resample)
        else:
            before = _masked_now(pl_module) if self.verbose else {}
            self.pruner = Pruner(pl_module, self.recipe, resample=self.resample)
            self._log(trainer, pl_module, from_hook=False)
            self._say_created(before)
        if self.verbose:
            self._count_masked()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.on == "train_epoch_end":
            self._epoch_events(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.on == "validation_end" and not trainer.sanity_checking:
            self._epoch_events(trainer, pl_module)

    def _epoch_events(self, trainer: Any, pl_module: Any) -> None:
        if self.pruner is None or not self.pruner.has_pending("epoch"):
            return
        ran = self.pruner.step(epoch=trainer.current_epoch)
        if ran:
            self._say(ran)
            self._log(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.pruner is not None and self.pruner.has_pending("step"):
            ran = self.pruner.step(step=trainer.global_step)
            if ran:
                self._say(ran)
                self._log(trainer, pl_module, on_step=True)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        left = self.pruner.pending() if self.pruner is not None and not self.pruner.finalized else []
        if left:
            first = left[0]
            rank_zero_warn(
                f"fitting ended with {len(left)} pruning event(s) of the recipe not run (the next: "
                f"{self.recipe.steps[first.step].label} at {first.unit} {first.time}): the model is less pruned than the "
                "recipe's schedule ends (train until its 'end', or end the schedule sooner)"
                + ("; pruning is made permanent as it stands" if self.finalize_on_fit_end else "")
            )
        if self.finalize_on_fit_end and self.pruner is not None and not self.pruner.finalized:
            self.pruner.finalize()
        _accept_folded(pl_module)  # modules first pruned after the last checkpoint was saved

    def _say(self, ran: list[EventResult]) -> None:
        """ModelPruning's log lines: one per event, and with verbose=2 one per parameter. As
        there, "pruned" counts masked entries (zeros of the weights themselves are not pruned)."""
        if not self.verbose:
            return
        assert self.pruner is not None
        for result in ran:
            step = self.recipe.steps[result.event.step]
            planned = self.pruner.plan.steps[result.event.step]
            method = planned.method.cls.__name__
            rows = []
            for pt in planned.targets:
                t = pt.target
                key = (id(t.module), t.param)
                masked = _masked(t.module, t.param)
                rows.append((t.qualname, self._masked.get(key, 0), masked, t.original.numel()))
                self._masked[key] = masked
            total = sum(n for *_, n in rows)
            before, after = sum(r[1] for r in rows), sum(r[2] for r in rows)
            rank_zero_info(
                f"Applied {method} (step {step.name or step.label!r}): pruned "
                f"{before}/{total} ({before / total if total else 0:.2%}) -> {after}/{total} ({after / total if total else 0:.2%})"
            )
            if self.verbose == 2:
                for name, was, now, n in rows:
                    rank_zero_info(
                        f"Applied {method} to {name}: pruned {was}/{n} ({was / n if n else 0:.2%}) -> {now}/{n} ({now / n if n else 0:.2%})"
                    )

    def _say_created(self, before: dict[tuple[int, str], int]) -> None:
        """The log line of the steps without a schedule, which ran as the Pruner was created
        (at fit start): one line for them together, since they ran as one apply."""
        assert self.pruner is not None
        now = [i for i, step in enumerate(self.recipe.steps) if step.schedule is None]
        if not self.verbose or not now:
            return
        targets = {(id(pt.target.module), pt.target.param): pt.target for i in now for pt in self.pruner.plan.steps[i].targets}
        rows = [(t.qualname, before.get(key, 0), _masked(t.module, t.param), t.original.numel()) for key, t in targets.items()]
        total = sum(n for *_, n in rows)
        was, after = sum(r[1] for r in rows), sum(r[2] for r in rows)
        names = ", ".join(repr(self.recipe.steps[i].name or self.recipe.steps[i].label) for i in now)
        methods = ", ".join(dict.fromkeys(self.pruner.plan.steps[i].method.cls.__name__ for i in now))
        rank_zero_info(
            f"Applied {methods} (unscheduled step{'s' if len(now) > 1 else ''} {names}, at fit start): pruned "
            f"{was}/{total} ({was / total if total else 0:.2%}) -> {after}/{total} ({after / total if total else 0:.2%})"
        )
        if self.verbose == 2:
            for name, old, new, n in rows:
                rank_zero_info(f"Applied {methods} to {name}: pruned {old}/{n} ({old / n if n else 0:.2%}) -> {new}/{n} ({new / n if n else 0:.2%})")

    def _count_masked(self) -> None:
        """Masked entries of every target now: the "before" of the next event's log line."""
        assert self.pruner is not None
        self._masked = {(id(t.module), t.param): _masked(t.module, t.param) for t in self.pruner.plan.targets}

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
        _accept_folded(pl_module)
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


def _accept_folded(model: Any) -> None:
    """Every pruned module of ``model`` accepts this callback's plain checkpoints (see
    :class:`AcceptFolded`): also those saved before the module got its first mask, which
    ``trainer.validate/test(ckpt_path="best")`` may load after fitting."""
    for _, module, _ in pruned_parameters(model):
        if not module.__dict__.get("_prunerecipe_accepts_folded"):
            module._register_load_state_dict_pre_hook(AcceptFolded(), with_module=True)
            module.__dict__["_prunerecipe_accepts_folded"] = True


def _masked_now(model: Any) -> dict[tuple[int, str], int]:
    """Masked entries of every parameter of ``model`` that has a mask, by (module id, name)."""
    return {(id(m), name): _masked(m, name) for _, m, name in pruned_parameters(model)}


def _masked(module: Any, name: str) -> int:
    """Masked entries of ``module.<name>`` (0 when it has no mask), as ModelPruning counts them."""
    mask = owned_mask(module, name)
    return 0 if mask is None else mask.numel() - kept_entries(mask)
