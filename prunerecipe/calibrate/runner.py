"""Layer-by-layer processing: calibration-based steps run block by block.

The inputs of the first block are captured once (the model runs until it calls that block,
then stops). For each block holding targets: forward pre-hooks collect its layers' input
statistics over every batch, its targets are pruned (steps in file order), and the pruned
block runs again to give the next block its inputs. Only one block's statistics exist at a
time, and the hidden states are replaced batch by batch. The model runs in eval mode without
gradients; its train/eval modes are put back afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..blocks import Blocks
from ..errors import CalibrationError
from ..layout import input_dim
from ..magnitude.workers import trim_heap
from ..plan import PlannedStep
from ..report import StepOutcome
from ..select import Target
from ..torchprune import refresh
from .data import Batch, batch_to
from .scored import importance_scores, prune_scored, prune_sparsegpt
from .stats import StatsCollector


class _Stop(Exception):
    """Raised by the capture hook: the rest of the model need not run."""


@dataclass
class BlockInputs:
    """One batch's arguments to a block; ``args[0]`` (or ``kwargs["hidden_states"]``) are the
    hidden states that blocks pass on."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def hidden(self) -> torch.Tensor:
        value = _hidden_of(self.args, self.kwargs)
        assert isinstance(value, torch.Tensor)
        return value

    def with_hidden(self, hidden: torch.Tensor) -> BlockInputs:
        if self.args:
            return BlockInputs((hidden,) + self.args[1:], self.kwargs)
        return BlockInputs(self.args, {**self.kwargs, "hidden_states": hidden})


@dataclass
class Current:
    """What is running, for error messages: the step and tensor, or the calibration batch."""

    step: PlannedStep | None = None
    target: Target | None = None
    where: str = ""


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _call_kwargs(model: nn.Module) -> dict[str, Any]:
    """Hugging Face models run without a KV cache: replayed blocks must not append to one."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def _is_cache(value: Any) -> bool:
    """A key/value cache (transformers' ``Cache`` classes): a block replayed with it would append
    to it and attend to stale keys."""
    return any(c.__name__ == "Cache" or c.__name__.endswith("Cache") for c in type(value).__mro__)


def _without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A block's keyword arguments with no cache (also when the model was wrapped, so that
    ``use_cache=False`` could not be passed to it)."""
    out = {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}
    if out.get("use_cache"):
        out["use_cache"] = False
    return out


def _hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[0] if args else kwargs.get("hidden_states")


def check_order(model: nn.Module, blocks: Blocks, batch: Batch, current: Current) -> None:
    """Run one batch through the whole model and check that it calls the blocks once each, in
    their order, each on the previous one's output: each block is replayed on the previous
    one's outputs, which is the model's own computation only then."""
    if blocks.whole_model:
        return
    order: list[int] = []
    last: list[Any] = [None]  # the previous block's output, while the next one is awaited
    unchained: list[int] = []
    first_rest: list[dict[str, Any]] = []  # the first block's other arguments
    differing: list[tuple[int, str]] = []

    def before(i: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        order.append(i)
        if i > 0 and not unchained and not _same(last[0], _hidden_of(args, kwargs)):
            unchained.append(i)
        last[0] = None
        rest = {f"argument {n + 2}": a for n, a in enumerate(args[1:])} if args else {}
        rest.update((k, v) for k, v in kwargs.items() if args or k != "hidden_states")
        if i == 0:
            first_rest.append(rest)
        elif first_rest and not differing:
            name = next((k for k in sorted(set(rest) | set(first_rest[0])) if not _alike(rest.get(k), first_rest[0].get(k))), None)
            if name is not None:
                differing.append((i, name))

    def after(output: Any) -> None:
        last[0] = output[0] if isinstance(output, (tuple, list)) and output else output

    handles = []
    for i, m in enumerate(blocks.modules):
        handles.append(m.register_forward_pre_hook(lambda _m, a, k, i=i: before(i, a, k), with_kwargs=True))
        handles.append(m.register_forward_hook(lambda _m, _a, out: after(out)))
    current.where = "calibration batch 0"
    try:
        _call(model, batch_to(batch, model_device(model)), _call_kwargs(model))
    finally:
        for h in handles:
            h.remove()
    current.where = ""
    if order != list(range(len(blocks.modules))):
        seen = ", ".join(blocks.names[i] for i in order[:8]) + (", ..." if len(order) > 8 else "")
        raise CalibrationError(
            f"the model calls its blocks in another order than {blocks.describe()}, or not once each ({seen or 'never'}): "
            "calibration-based steps replay each block on the "
            "previous one's outputs, which needs each block called once, in order; name them with sequential.blocks"
        )
    if differing:
        i, name = differing[0]
        raise CalibrationError(
            f"block {blocks.names[i]} is called with another {name!r} than block {blocks.names[0]}: calibration-based steps "
            "replay every block with the first block's other arguments (attention mask, position embeddings), which is the "
            "model's own computation only when every block gets the same; this model gives its blocks their own (attention "
            "windows per layer, or a position bias passed on from block to block), so its blocks cannot be replayed"
        )
    if unchained:
        i = unchained[0]
        raise CalibrationError(
            f"block {blocks.names[i]} is not called on the output of block {blocks.names[i - 1]} (the model changes it in between): "
            "calibration-based steps replay each block on the previous one's output; name blocks that follow one another "
            "directly in sequential.blocks (whole transformer layers, say, not their MLPs alone)"
        )


def _alike(a: Any, b: Any, depth: int = 0) -> bool:
    """Whether two blocks' call arguments are the same: equal tensors, equal containers of
    them, the same object or equal plain values."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        return a.device == b.device and bool(torch.equal(a, b))
    if depth > 8:
        return False
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_alike(x, y, depth + 1) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_alike(a[k], b[k], depth + 1) for k in a)
    if isinstance(a, (int, float, str, bool, type(None))) and isinstance(b, (int, float, str, bool, type(None))):
        return bool(a == b)
    return False  # two different objects of another kind (a cache per layer, say): not known to be alike


def _same(output: Any, hidden: Any) -> bool:
    if output is hidden:
        return True
    if not isinstance(output, torch.Tensor) or not isinstance(hidden, torch.Tensor) or output.shape != hidden.shape:
        return False
    return bool(torch.equal(output.to(hidden.dtype), hidden))


#: Config keys that bound a model's sequence length where positions are learned (GPT-2, BERT, OPT, ...).
_POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "max_source_positions")


def _call(model: nn.Module, batch: Batch, extra: dict[str, Any]) -> None:
    """The model on one calibration batch; a failure on samples longer than the model's
    config allows says so (rotary models run past that number, so it is not checked before)."""
    try:
        if isinstance(batch, dict):
            model(**batch, **extra)
        else:
            model(batch, **extra)
    except _Stop:
        raise
    except Exception as exc:
        ids = batch.get("input_ids") if isinstance(batch, dict) else batch
        config = getattr(model, "config", None)
        length = ids.shape[-1] if isinstance(ids, torch.Tensor) and ids.dim() else None
        limits = [(k, v) for k in _POSITION_KEYS if isinstance(v := getattr(config, k, None), int) and not isinstance(v, bool)]
        if length is not None and limits and length > limits[0][1]:
            key, limit = limits[0]
            raise CalibrationError(
                f"{type(exc).__name__}: {exc}; the samples have {length} tokens and the model's config allows {limit} positions "
                f"({key}): give shorter calibration samples (seq_len <= {limit})"
            ) from exc
        raise


def capture(model: nn.Module, blocks: Blocks, batches: Sequence[Batch], current: Current) -> list[BlockInputs]:
    """The arguments the first block is called with, per batch (the model stops right there)."""
    first = blocks.modules[0]
    device = model_device(model)
    extra = _call_kwargs(model)
    captured: list[BlockInputs] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(BlockInputs(args, _without_cache(kwargs)))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, batch in enumerate(batches):
            current.where = f"calibration batch {i}"
            try:
                _call(model, batch_to(batch, device), extra)
            except _Stop:
                pass
            else:
                raise CalibrationError(f"the model ran calibration batch {i} without calling its first block {blocks.names[0] or '(root)'}")
    finally:
        handle.remove()
    current.where = ""
    if not blocks.whole_model:
        inputs = captured[0]
        value = _hidden_of(inputs.args, inputs.kwargs)
        if not isinstance(value, torch.Tensor):
            raise CalibrationError(
                f"block {blocks.names[0]} is called without a tensor as its first argument (or hidden_states=): "
                "blocks must take the hidden states first, as transformer layers do"
            )
    return captured


def run_calibrated(
    model: nn.Module,
    blocks: Blocks,
    steps: Sequence[PlannedStep],
    batches: Sequence[Batch],
    current: Current,
    progress: Callable[[str], None] | None = None,
    journal: Callable[[torch.Tensor], None] | None = None,
) -> list[StepOutcome]:
    """Run calibration-based ``steps`` (consecutive in the recipe) block by block, in place.

    ``journal`` is called with each parameter whose data was rewritten (SparseGPT), once its old
    data is only needed to undo the run (:meth:`~prunerecipe.torchprune.ModelSnapshot.journal`).

    Returns:
        One :class:`~prunerecipe.report.StepOutcome` per step, naming the tensors it rewrote.

    Raises:
        CalibrationError: the model failed on the calibration data, or produced NaN/inf.
        Exception: whatever a method or importance raised (the caller restores the model).
    """
    work: list[list[tuple[PlannedStep, Target]]] = [[] for _ in blocks.names]
    for ps in steps:
        for pt in ps.targets:
            index = blocks.index_of(pt.target.module_name)
            assert index is not None  # the plan checked
            work[index].append((ps, pt.target))
    last = max(i for i, jobs in enumerate(work) if jobs)
    rewritten: dict[int, list[str]] = {id(ps): [] for ps in steps}
    noops: dict[int, list[str]] = {id(ps): [] for ps in steps}
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            check_order(model, blocks, batches[0], current)
            inputs = capture(model, blocks, batches, current)
        for b in range(last + 1):
            started = time.perf_counter()
            block = blocks.modules[b]
            if work[b]:
                _prune_block(block, blocks.names[b], work[b], inputs, current, rewritten, noops, journal)
            if b < last:
                with torch.no_grad():
                    inputs = _forward(block, blocks.names[b], inputs, current, replace=True)
            for _, t in work[b]:  # as hand-written prune calls leave them: computed with autograd on
                refresh(t.module, t.param)
            trim_heap()  # the block's statistics and temporaries go back to the system, not to a later peak
            if progress is not None:
                progress(
                    f"  block {b + 1}/{last + 1} {blocks.names[b] or '(model)'}: {len(work[b])} tensor(s), {time.perf_counter() - started:.2f} s"
                )
    finally:
        for module, mode in modes:
            module.training = mode
    outcomes = []
    for ps in steps:
        names = tuple(pt.target.qualname for pt in ps.targets)
        note = f"no-op on {', '.join(noops[id(ps)])}: already at or above sparsity {ps.step.sparsity:g}" if noops[id(ps)] else None
        outcomes.append(StepOutcome(ps.step.label, ps.method.name, names, note, tuple(rewritten[id(ps)])))
    return outcomes


def _prune_block(
    block: nn.Module,
    name: str,
    jobs: list[tuple[PlannedStep, Target]],
    inputs: list[BlockInputs],
    current: Current,
    rewritten: dict[int, list[str]],
    noops: dict[int, list[str]],
    journal: Callable[[torch.Tensor], None] | None,
) -> None:
    device = model_device(block)
    layers = []
    for ps, t in jobs:
        weight = t.original
        in_features = weight.shape[input_dim(t.module, t.param, weight.dim())]
        layers.append((t.module, in_features, ps.importance is not None and ps.importance.calibrated, ps.method.calibrated))
    collector = StatsCollector(layers, device)
    with torch.no_grad(), collector:
        _forward(block, name, inputs, current, replace=False, collector=collector)
    for _, t in jobs:
        stats = collector.of(t.module)
        if stats.nonfinite():
            raise CalibrationError(f"the inputs of {t.qualname} on the calibration data hold NaN or inf (their statistics overflowed)")
        if stats.tokens == 0:  # scores of 0 would prune arbitrary entries (SparseGPT: all of them)
            raise CalibrationError(
                f"{t.qualname} saw no calibration input: block {name or '(model)'} never called {t.module_name} on this data "
                "(an expert no token was routed to, a branch not taken); exclude it from the step, or give data that reaches it"
            )
    last_use = {id(t.module): i for i, (_, t) in enumerate(jobs)}
    for i, (ps, t) in enumerate(jobs):
        current.step, current.target = ps, t
        stats = collector.of(t.module)
        amount = ps.live_amount([t]) if ps.method.needs_amount(ps.step.args) else None
        if ps.step.sparsity is not None and amount is not None and amount <= 0:
            noops[id(ps)].append(t.qualname)
            continue
        if ps.method.calibrated:
            prune_sparsegpt(ps, t, stats.hessian(), amount)
            rewritten[id(ps)].append(t.qualname)
            if journal is not None:
                journal(t.original)
        else:
            assert ps.importance is not None
            scores = importance_scores(ps.importance, t, stats.input_stats() if ps.importance.calibrated else None)
            prune_scored(ps, t, scores, amount)
        if last_use[id(t.module)] == i:  # no later step of this block needs it: free it now
            stats.release()
        trim_heap()  # one tensor's temporaries back to the system before the next tensor's
    current.step, current.target = None, None
    for stats in collector.stats.values():
        stats.release()


def _forward(
    block: nn.Module, name: str, inputs: list[BlockInputs], current: Current, *, replace: bool, collector: StatsCollector | None = None
) -> list[BlockInputs]:
    """Run ``block`` on every batch's inputs; with ``replace``, each batch's hidden states become
    the block's output (one batch at a time, so only one extra batch of activations exists)."""
    for i, inp in enumerate(inputs):
        current.where = f"calibration batch {i} in block {name or '(model)'}"
        if collector is not None:
            collector.new_batch()
        out = block(*inp.args, **inp.kwargs)
        if not replace:
            continue
        hidden = out[0] if isinstance(out, (tuple, list)) and out else out
        if not isinstance(hidden, torch.Tensor):
            raise CalibrationError(
                f"block {name} returned {type(hidden).__name__}: the blocks of sequential.blocks must return the hidden states "
                "(a tensor, or a tuple holding it first) that the next one takes"
            )
        if not bool(torch.isfinite(hidden).all()):
            raise CalibrationError(f"block {name} produced NaN or inf on calibration batch {i}")
        inputs[i] = inp.with_hidden(hidden)
    current.where = ""
    return inputs
