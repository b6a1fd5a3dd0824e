"""Pruning a checkpoint bigger than memory: read, pruned and written one tensor at a time
(``prunerecipe apply --stream``), with the in-memory run's result, bit for bit.

:func:`apply_recipe_streaming` plans the run from the model's shapes (:mod:`.plan`: built on
the ``meta`` device) and the checkpoint's header, then runs it (:mod:`.run` makes each tensor,
:mod:`.output` writes them) over ``safetensors.safe_open``'s memory map, writing safetensors
tensor by tensor (:mod:`.format`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from ..checkpoint import check_output
from ..errors import CheckpointError, problem
from ..load import load_recipe
from ..modelspec import is_folder_spec, load_model, resolve
from ..report import Report
from ..spec import Recipe
from .output import execute
from .plan import stream_plan
from .planned import StreamPlan
from .run import Progress


def meta_model(spec: str | nn.Module, base: str | None = None) -> tuple[nn.Module, str | None]:
    """The model a spec names, built on the ``meta`` device (shapes and dtypes, no memory), and
    the Hugging Face folder it came from (or None). A module passed in is returned as it is."""
    if isinstance(spec, nn.Module):
        return spec, None
    if is_folder_spec(spec, base):
        folder = resolve(spec, base)
        return load_model(folder, weights=False, meta=True), folder
    with torch.device("meta"):
        return load_model(spec, base=base, weights=False), None


def apply_recipe_streaming(
    model: str | nn.Module,
    recipe: Recipe | str | os.PathLike[str],
    weights: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    force: bool = False,
    max_shard_size: str | int = "5GB",
    strip_prefix: str | None = None,
    base: str | None = None,
    folder: str | None = None,
    plan: StreamPlan | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> Report:
    """Prune a safetensors checkpoint tensor by tensor, never holding more than a few tensors.

    The output equals ``apply --format dense`` (or ``hf``) run in memory on the same checkpoint,
    tensor for tensor and bit for bit, dtypes kept. Supported: unscheduled ``l1_unstructured``,
    ``random_unstructured`` (local and global), ``ln_structured``, ``random_structured`` and
    ``identity`` steps, in chains. A global L1 step over more than 2**20 entries costs a pass
    over its group first (more when earlier steps touch it, see :mod:`prunerecipe.stream.plan`).
    Peak memory beyond the interpreter and torch stays below 4 x the largest tensor + 256 MB.

    Args:
        model: a model spec (``pkg.mod:attr``, ``file.py:attr`` or a Hugging Face folder: built on
            the ``meta`` device) or a model (on ``meta``: only shapes and dtypes are used).
        recipe: a :class:`~prunerecipe.spec.Recipe` or the path of a recipe file.
        weights: a ``.safetensors`` file, a shard index or a model folder (None: the model
            folder's own weights).
        out: a ``.safetensors`` file (``dense``) or a folder (``hf``); written atomically.
        fmt: ``dense`` or ``hf`` (default: ``hf`` for a model folder, else ``dense``).
        force: replace an existing output.
        max_shard_size: the largest ``hf`` shard (``"5GB"``, ``"500MB"`` or bytes).
        strip_prefix: remove this prefix from every checkpoint key (else found as in memory).
        base: the folder relative paths in ``model`` resolve against.
        folder: the Hugging Face folder a model passed in came from (its weights are the default
            ``weights``; an ``hf`` output gets its tokenizer and generation files).
        plan: a plan made earlier by :func:`~prunerecipe.stream.plan.stream_plan` for these
            arguments (e.g. to show its notes first).
        progress: called with a :class:`~prunerecipe.stream.run.Progress` after each tensor.

    Returns:
        The :class:`~prunerecipe.report.Report` (per-target sparsity before and after).

    Raises:
        RecipeError: a step that cannot be streamed, named (at plan time, before anything is
            read); a checkpoint that does not fit the model, is not safetensors or carries
            masks; an output that cannot be written. Nothing is written then, and a failure
            during the run leaves no partial output.

    Example:
        >>> report = apply_recipe_streaming("./llama-folder", "global-50.yaml", None, "pruned.safetensors")  # doctest: +SKIP
        >>> round(report.global_after, 2)  # doctest: +SKIP
        0.5
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    built, found = meta_model(model, base)
    folder = folder or found
    fmt = fmt or ("hf" if folder else "dense")
    source = os.fspath(weights) if weights is not None else folder
    if source is None:
        raise CheckpointError(problem("no weights: pass the checkpoint to stream (or a model folder that holds its weights)", code="stream"))
    out = os.fspath(out)
    sp = plan if plan is not None else stream_plan(built, recipe, source, fmt=fmt, out=out, strip_prefix=strip_prefix)
    check_output(out, force=force, folder=fmt == "hf", inputs=tuple(p for p in (source, folder, recipe.source) if p))
    report, _ = execute(sp, recipe, out, force=force, max_shard_size=max_shard_size, source_folder=folder, progress=progress)
    return report


__all__ = ["Progress", "StreamPlan", "apply_recipe_streaming", "meta_model", "stream_plan"]
