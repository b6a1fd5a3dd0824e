"""What a streaming run will do, decided from the model's shapes and the checkpoint's header
before any weight is read: the tensors written and where each is read, which global cuts need
a pass of their own, which tensors are pruned together, what random steps draw, and the memory
bound. Anything a stream cannot do exactly as the in-memory run does is refused here, naming the
step.

A tensor is pruned on its own: read, its steps run in order (torch's own methods, through the
same code as :func:`~prunerecipe.apply.apply_recipe`), written. Three things reach beyond one
tensor, and each is settled ahead:

- a ``scope: global`` L1 step over more than :data:`RESIDENT_UP_TO` entries needs its group's
  exact cut before any member is written: passes read the group first, a histogram of 16 bits
  of ``|w|``'s key per pass (:class:`~prunerecipe.magnitude.DigitCut`: one pass for 16-bit
  floats, two for float32), its memory bounded by the histograms; members the step sees as
  stored are read straight from the map, others have their earlier steps run again; ties at
  the cut go earliest first, as in memory;
- a smaller global group is pruned whole, in memory, so that torch's ``topk`` breaks its ties as
  in the in-memory run (``global_unstructured`` itself runs on it);
- a random step draws from the global generator in the plan's order: the number each target
  draws is known from the plan, so the generator state before each target is found ahead by
  skipping draws (:mod:`prunerecipe.rng`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.utils.prune as prune
from torch import nn

from ..checkpoint.hf import tied_aliases
from ..checkpoint.hfnames import checkpoint_names
from ..checkpoint.read import SAFETENSORS_SUFFIX, suffix_of
from ..checkpoint.restore import check_fit, fit_prefix
from ..errors import CheckpointError, Problem, RecipeError, problem
from ..magnitude import supported
from ..plan import plan_recipe
from ..rng import is_random
from ..spec import Recipe
from .format import DTYPES, Source
from .planned import RESIDENT_UP_TO, Cut, Entry, Member, StreamPlan
from .refusals import random_draws, unstreamable


def stream_plan(
    model: nn.Module,
    recipe: Recipe,
    weights: str | None,
    *,
    fmt: str = "dense",
    out: str | None = None,
    strip_prefix: str | None = None,
) -> StreamPlan:
    """Plan a streaming run of ``recipe`` over the checkpoint ``weights`` for ``model`` (built on
    the ``meta`` device: shapes and dtypes are all it needs), reading no weight.

    Args:
        model: the model the checkpoint belongs to (on ``meta``, or real: only shapes are used).
        recipe: the recipe.
        weights: a safetensors file, shard index or model folder (None: plan from the model's
            shapes alone, as ``plan --stream`` does without ``--weights``).
        fmt: the output format, ``dense`` or ``hf``.
        out: the output path (its suffix is checked for ``dense``).
        strip_prefix: as for :func:`~prunerecipe.checkpoint.fit_prefix`.

    Returns:
        The :class:`StreamPlan`.

    Raises:
        RecipeError: every step a stream cannot run, located at the step; a checkpoint that does
            not fit the model, carries masks, or is not safetensors; an output it cannot write.
    """
    if fmt not in ("dense", "hf"):
        raise CheckpointError(
            problem(
                f"--format {fmt} cannot be streamed: it keeps *_orig/*_mask for every pruned tensor; use --format dense or hf",
                source="--format",
                code="stream",
            )
        )
    if fmt == "dense" and out is not None and suffix_of(out) != SAFETENSORS_SUFFIX:
        raise CheckpointError(
            problem(
                f"--stream writes safetensors: use a .safetensors output (not {suffix_of(out) or 'no suffix'}), or --format hf",
                source=out,
                code="stream",
            )
        )
    if fmt == "hf" and not hasattr(getattr(model, "config", None), "to_json_file"):
        raise CheckpointError(
            problem(
                f"--format hf needs a Hugging Face model (one with a transformers config); {type(model).__name__} has none",
                source=out or "",
                code="output",
            )
        )
    plan = plan_recipe(model, recipe)
    steps = tuple(ps for ps in plan.steps if not ps.scheduled)
    problems = unstreamable(recipe, plan)

    state = model.state_dict(keep_vars=True)
    aliases = tied_aliases(model, list(state))
    source = Source(weights) if weights is not None else None
    note = None
    keys: dict[str, str | None] = {name: None for name in state}
    stored: dict[str, torch.dtype] = {name: t.dtype for name, t in state.items()}
    stored_as, joined = checkpoint_names(model, [n for n in state if n not in aliases])
    if source is not None:
        shapes = source.shapes()
        fitted, removed = fit_prefix(shapes, model, strip_prefix, convert=False)
        if any(n not in fitted for n in joined):
            raise CheckpointError(_joined(joined, weights or ""))
        if removed and not strip_prefix:
            note = f"removed the key prefix {removed!r}, which every key had and the model has not"
        fit = check_fit(model, fitted)
        if fit.restored:
            raise CheckpointError(
                problem(
                    f"carries pruning masks (*_orig/*_mask, e.g. {fit.restored[0]}); --stream reads dense checkpoints: "
                    "apply it in memory, or write it with --format dense first",
                    source=weights or "",
                    code="stream",
                )
            )
        by_id = {id(v): k for k, v in shapes.items()}
        for name in state:
            value = fit.state_dict[name]
            keys[name] = by_id[id(value)]
            stored[name] = value.dtype
    if joined and fmt == "hf":
        raise CheckpointError(_joined(joined, out or ""))
    entries = {name: Entry(name, t.dtype, tuple(t.shape), keys[name], stored[name]) for name, t in state.items() if name not in aliases}
    unknown = [f"{e.name} ({e.dtype})" for e in entries.values() if e.dtype not in DTYPES]
    if unknown:
        problems.append(problem(f"safetensors cannot store {', '.join(unknown[:4])}", source=out or "", code="stream"))

    # every target tensor, by the entry it is written as (a module registered under two names is one tensor)
    entry_of = {id(t): name for name, t in state.items() if name not in aliases}
    members: dict[str, Member] = {}
    for position, ps in enumerate(steps):
        for index, pt in enumerate(ps.targets):
            t = pt.target
            name = entry_of[id(t.original)]
            old = members.get(name)
            touches = (old.steps if old else ()) + ((position, index),)
            members[name] = Member(name, t.module_name, t.param, t.module_type, touches)

    order = {name: i for i, name in enumerate(entries)}
    parent = {name: name for name in members}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    cuts: list[Cut] = []
    counts: dict[tuple[int, str | None], int] = {}
    step_names: list[tuple[str, ...]] = []
    for position, ps in enumerate(steps):
        names = [entry_of[id(pt.target.original)] for pt in ps.targets]
        step_names.append(tuple(names))
        cls = ps.method.cls
        size = sum(math.prod(entries[n].shape) for n in names)
        if ps.step.scope == "global" and names:
            if cls is prune.Identity:
                pass  # masks of ones, tensor by tensor: nothing ties the group's tensors together
            elif size <= RESIDENT_UP_TO:
                for n in names[1:]:
                    parent[root(n)] = root(names[0])
            elif cls is prune.L1Unstructured:
                dtypes = {entries[n].dtype for n in names}
                if len(dtypes) != 1 or not supported(torch.empty(0, dtype=next(iter(dtypes)))):
                    problems.append(
                        recipe.problem(
                            ps.step.path,
                            f"a streamed global step over more than {RESIDENT_UP_TO} entries needs all its targets in one dtype, "
                            f"float16, bfloat16, float32 or float64; they are {', '.join(sorted(str(d).replace('torch.', '') for d in dtypes))}",
                            code="stream",
                        )
                    )
                    continue
                raw = all(members[n].steps[0][0] == position and entries[n].stored_dtype == entries[n].dtype for n in names)
                cuts.append(Cut(position, tuple(names), next(iter(dtypes)), raw))
            else:
                problems.append(
                    recipe.problem(
                        ps.step.path,
                        f"{ps.method.name} with scope: global over {size} entries cannot be streamed exactly: torch draws and ranks the "
                        f"whole group at once (a stream can hold groups of up to {RESIDENT_UP_TO} entries); apply it in memory",
                        code="stream",
                    )
                )
        if is_random(cls) and names:
            problems.extend(random_draws(recipe, ps, position, names, counts))
    units: dict[str, list[str]] = {}
    for n in members:
        units.setdefault(root(n), []).append(n)
    if problems:
        raise RecipeError.collect(problems)
    return StreamPlan(
        plan,
        model,
        steps,
        entries,
        aliases,
        members,
        [tuple(sorted(u, key=order.__getitem__)) for u in units.values()],
        cuts,
        tuple(step_names),
        counts,
        source,
        weights,
        fmt,
        note,
        {n: c for n, c in stored_as.items() if c != n and fmt == "hf"},
    )


def _joined(names: list[str], where: str) -> Problem:
    """The refusal of tensors a checkpoint does not store one by one (a MoE layer's experts)."""
    return problem(
        f"--stream reads and writes one tensor at a time, but a checkpoint of this model does not store {names[0]}"
        f"{f' (and {len(names) - 1} more)' if len(names) > 1 else ''} as a tensor of its own: transformers joins or splits "
        "such tensors on loading (a MoE layer's experts, say); apply it in memory (without --stream)",
        source=where,
        code="stream",
    )


__all__ = ["Cut", "Entry", "Member", "StreamPlan", "stream_plan"]
