"""The other commands: plan, validate, report, inspect, methods, importances, schema."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import click

from .base import (
    CONTEXT,
    EXIT_INPUT,
    Fail,
    _guard,
    _load,
    _model_for,
    _model_spec,
    _parse_sets,
    _plot_target,
    cli,
    json_option,
    model_option,
    prefix_option,
    set_option,
    weights_option,
)


@cli.command(context_settings=CONTEXT)
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@model_option
@weights_option
@set_option
@prefix_option
@click.option("--plot", metavar="FILE", help="Also draw per-tensor sparsity before and after as a bar chart (.png or .svg; needs prunerecipe[plot]).")
@click.option("--force", is_flag=True, help="Overwrite the --plot FILE if it exists.")
@click.option(
    "--stream",
    is_flag=True,
    help="Also show what apply --stream would do: its passes over the checkpoint and its memory bound (the model is built on the meta device).",
)
@json_option
@_guard
def plan(
    recipe_path: str,
    model_spec: str | None,
    weights: str | None,
    sets: tuple[str, ...],
    strip_prefix: str | None,
    plot: str | None,
    force: bool,
    stream: bool,
    as_json: bool,
) -> None:
    """Dry run: show every target each step resolves to and how much it prunes. Writes nothing.

    A Hugging Face model folder is planned on the meta device (shapes only) unless --weights is given.
    """
    from ..plan import plan_recipe

    if stream and plot:
        raise click.UsageError("--plot draws the in-memory plan's figures; leave out --stream to draw them")
    if plot:
        _plot_target(plot, force)
    recipe = _load(recipe_path, _parse_sets(sets))
    if stream:
        from ..stream import meta_model, stream_plan

        spec, base = _model_spec(recipe, model_spec)
        model, folder = meta_model(spec, base)
        sp = stream_plan(model, recipe, weights or folder, fmt="hf" if folder else "dense", strip_prefix=strip_prefix)
        if as_json:
            click.echo(json.dumps({**sp.plan.to_dict(), "stream": sp.to_dict()}, indent=2))
        else:
            click.echo(str(sp.plan))
            click.echo("")
            click.echo(str(sp))
        return
    model, _ = _model_for(recipe, model_spec, weights, strip_prefix, meta_ok=True)
    result = plan_recipe(model, recipe)
    if not any(t.original.device.type == "meta" for t in result.targets):
        from ..oneshot import finite_zeros, usable
        from ..preview import preview

        active = [ps for ps in result.steps if not ps.scheduled]
        if active:
            finite_zeros(recipe, usable(recipe, active))  # NaN or inf: refused here as apply refuses them
        result = preview(model, result)  # with real weights: the figures are computed, not projected
    if plot:
        from ..plots import sparsity_chart

        where_in = {id(m): i for i, m in enumerate(model.modules())}
        last = {pt.qualname: pt for ps in result.steps for pt in ps.targets}  # each target's last step
        # bars in model order: by module, then parameter name
        rows = dict(sorted(last.items(), key=lambda kv: (where_in.get(id(kv[1].target.module), -1), kv[1].target.param)))
        firsts: dict[str, Any] = {}
        for ps in result.steps:
            for pt in ps.targets:
                firsts.setdefault(pt.qualname, pt)
        _, after = result.projected_sparsity()
        where = "?" if after is None else f"{after:.2%}"
        sparsity_chart(
            plot,
            [(name, pt.known_after) for name, pt in rows.items()],
            before=[firsts[name].known_before for name in rows],
            title=f"{recipe.source}: targeted entries masked after the recipe: {where}"
            + (" (before its scheduled steps, which run during training)" if any(ps.scheduled for ps in result.steps) else ""),
            measure="masked",
        )
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else str(result))
    if plot and not as_json:
        click.echo(f"wrote {plot}")


@cli.command(context_settings=CONTEXT)
@click.argument("recipe_paths", metavar="RECIPE...", nargs=-1, required=True)
@set_option
@json_option
@_guard
def validate(recipe_paths: tuple[str, ...], sets: tuple[str, ...], as_json: bool) -> None:
    """Check recipe files without a model; print every problem as file:line:col: path: message.

    Nothing a recipe names is imported or run: dotted types are checked for their form only
    (plan resolves them), and the model spec is not touched. '-' reads a recipe from stdin.
    """
    from ..errors import RecipeError

    overrides = _parse_sets(sets)
    failed = 0
    errors: list[dict[str, Any]] = []
    for path in recipe_paths:
        try:
            _load(path, overrides)
        except RecipeError as exc:
            failed += 1
            errors += exc.to_list()
            if not as_json:
                click.echo(str(exc), err=True)
        else:
            if not as_json:
                click.echo(f"{'<stdin>' if path == '-' else path}: ok")
    if as_json:
        click.echo(json.dumps(errors, indent=2))
        if failed:
            raise SystemExit(EXIT_INPUT)
        return
    if failed:
        raise Fail(f"{failed} of {len(recipe_paths)} recipe(s) invalid")


@cli.command(context_settings=CONTEXT)
@click.option(
    "--model",
    "model_spec",
    metavar="SPEC",
    help="Model: 'pkg.module:attr', 'file.py:attr' or a Hugging Face model folder (checks the weights fit it; rows get its module types).",
)
@click.option(
    "--weights",
    required=True,
    metavar="PATH",
    help="The checkpoint to inspect: .pt/.pth/.bin/.ckpt/.safetensors, a shard index or a model folder.",
)
@prefix_option
@click.option("--plot", metavar="FILE", help="Also draw per-tensor sparsity as a bar chart (.png or .svg; needs prunerecipe[plot]).")
@click.option("--force", is_flag=True, help="Overwrite the --plot FILE if it exists.")
@json_option
@_guard
def report(model_spec: str | None, weights: str, strip_prefix: str | None, plot: str | None, force: bool, as_json: bool) -> None:
    """Per-layer and global sparsity of a checkpoint, pruned (masks) or finalized.

    Without --model every floating-point tensor is listed (a model folder is its own model);
    with it, only the model's parameters. A tensor tied to another is counted once.
    """
    from ..checkpoint import fit_prefix, is_hf_folder, read_state_dict, state_dict_sparsity
    from ..checkpoint.read import TORCH_SUFFIXES, suffix_of
    from ..modelspec import load_model
    from ..text import format_table, pct, shape_text

    if plot:
        _plot_target(plot, force)
    state = read_state_dict(weights)
    names = None
    types: dict[str, str] = {}
    if model_spec or is_hf_folder(weights):
        if model_spec:
            model, _ = _model_for(None, model_spec, weights, strip_prefix)
        else:
            model = load_model(weights, weights=False, meta=True)
        state, _ = fit_prefix(state, model, strip_prefix)
        modules = dict(model.named_modules())
        names = [n[: -len("_orig")] if n.endswith("_orig") else n for n, _ in model.named_parameters()]
        if not model_spec:  # a folder is its own model: every tensor it holds is listed, the parameters first
            _check_shapes(weights, model, state)
            known = set(names)
            names += [k for k in (k[: -len("_orig")] if k.endswith("_orig") else k for k in state) if k not in known and not k.endswith("_mask")]
        types = {n: type(modules[n.rpartition(".")[0]]).__name__ for n in names if n.rpartition(".")[0] in modules}
    elif strip_prefix:  # no model to fit: the prefix is removed as given
        import torch.nn as nn

        state, _ = fit_prefix(state, nn.Module(), strip_prefix)
    rows = state_dict_sparsity(state, names)
    if names is None and suffix_of(weights) not in TORCH_SUFFIXES:
        # safetensors files keep their tensors sorted as strings (h.1, h.10, h.2): numbers as numbers read in model order
        rows.sort(key=lambda r: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", r[0])])
    # The global figure counts the weights of the kinds pruning works on (tensors with masks, and
    # matrices and kernels: two or more dimensions); biases and norm parameters are listed, not summed.
    counted = [r for r in rows if r[3] or len(r[1]) >= 2]
    others = [r for r in rows if r not in counted]
    total = sum(math.prod(shape) for _, shape, _, _ in counted)
    zeros = sum(z for _, _, z, _ in counted)
    masked = sum(1 for *_, m in rows if m)
    if plot:
        from ..plots import sparsity_chart

        sparsity_chart(
            plot,
            [(n, z / math.prod(s) if math.prod(s) else 0.0) for n, s, z, m in counted],
            title=f"{weights}: {pct(zeros / total if total else 0.0)} of {total} weights are 0",
        )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "weights": weights,
                    "pruned": masked > 0,
                    "tensors": [
                        {
                            "name": n,
                            "type": types.get(n),
                            "shape": list(s),
                            "numel": math.prod(s),
                            "zeros": z,
                            "sparsity": z / math.prod(s) if math.prod(s) else 0.0,
                            "masked": m,
                            "counted": (n, s, z, m) in counted,
                        }
                        for n, s, z, m in rows
                    ],
                    "global": {
                        "numel": total,
                        "zeros": zeros,
                        "sparsity": zeros / total if total else 0.0,
                        "over": "tensors with masks or two or more dimensions",
                    },
                },
                indent=2,
            )
        )
        return
    header = ["tensor"] + (["type"] if types else []) + ["shape", "entries", "sparsity", "masked"]
    table = [
        [n]
        + ([types.get(n, "")] if types else [])
        + [shape_text(s), str(math.prod(s)), pct(z / math.prod(s) if math.prod(s) else 0.0), "yes" if m else ""]
        for n, s, z, m in rows
    ]
    for line in format_table(header, table):
        click.echo(line)
    state_kind = f"pruned: {masked} tensor(s) carry masks" if masked else "no masks (dense or finalized)"
    click.echo(f"global: {total} weights in {len(counted)} tensor(s), sparsity {pct(zeros / total if total else 0.0)}; {state_kind}")
    if others:
        n_other = sum(math.prod(shape) for _, shape, _, _ in others)
        click.echo(
            f"not counted: {len(others)} one-dimensional tensor(s) (biases, norm parameters): {n_other} entries, {sum(z for _, _, z, _ in others)} zeros"
        )
    if plot:
        click.echo(f"wrote {plot}")


@cli.command(context_settings=CONTEXT)
@click.argument("recipe_path", metavar="[RECIPE]", required=False)
@click.option(
    "--model",
    "model_spec",
    metavar="SPEC",
    help="Model: 'pkg.module:attr', 'file.py:attr' or a Hugging Face model folder (default: the recipe's 'model:').",
)
@click.option("--weights", metavar="PATH", help="Weights to load first (checks they fit); a model folder alone is its own model.")
@click.option("--select", "selector", metavar="YAML", help="A selector to try, e.g. '{types: [Linear], names: [\"fc*\"]}'.")
@click.option("--params", default="weight", show_default=True, metavar="NAMES", help="Comma-separated parameter names for --select.")
@set_option
@prefix_option
@json_option
@_guard
def inspect(
    recipe_path: str | None,
    model_spec: str | None,
    weights: str | None,
    selector: str | None,
    params: str,
    sets: tuple[str, ...],
    strip_prefix: str | None,
    as_json: bool,
) -> None:
    """Show a model's modules (qualified names, types, parameters, ties) and what selectors select.

    \b
    prunerecipe inspect --model prunerecipe.zoo:LeNet
    prunerecipe inspect recipes/lenet-layerwise-l1.yaml          (the recipe's model, and what each step selects)
    prunerecipe inspect --model ./gpt2-folder --select '{types: [Conv1D]}'
    """
    from ..checkpoint import is_hf_folder
    from ..inspection import as_dict, as_text, model_rows, selections
    from ..load import parse_value, recipe_from_dict

    recipe = _load(recipe_path, _parse_sets(sets)) if recipe_path else None
    if model_spec is None and recipe is None and weights and is_hf_folder(weights):
        model_spec, weights = weights, None
    model, _ = _model_for(recipe, model_spec, weights, strip_prefix, meta_ok=True)
    steps = selections(model, recipe) if recipe is not None else []
    if selector:
        try:
            select = parse_value(selector)
        except Exception as exc:
            raise click.BadParameter(str(exc), param_hint="'--select'") from None
        names = [p.strip() for p in params.split(",") if p.strip()]
        trial = recipe_from_dict(
            {"version": 1, "steps": [{"name": "--select", "select": select, "params": names, "method": "identity"}]}, source="--select"
        )
        steps += selections(model, trial)
    rows = model_rows(model)
    click.echo(json.dumps(as_dict(rows, steps), indent=2) if as_json else as_text(rows, steps))


@cli.command(context_settings=CONTEXT)
@json_option
@_guard
def methods(as_json: bool) -> None:
    """List every registered pruning method: origin, pruning type and arguments."""
    from ..errors import RecipeError
    from ..methods import describe_origin, get_method, method_names
    from ..text import format_table

    rows = []
    for name in method_names():
        try:
            spec = get_method(name)
            rows.append(
                {
                    "name": name,
                    "origin": spec.origin,
                    "type": spec.pruning_type,
                    "arguments": spec.describe_arguments(),
                    "class": f"{spec.cls.__module__}.{spec.cls.__qualname__}",
                    "error": None,
                }
            )
        except RecipeError as exc:
            rows.append({"name": name, "origin": describe_origin(name), "type": "?", "arguments": "", "class": "", "error": str(exc)})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = [[r["name"], r["origin"], r["type"], r["arguments"] if not r["error"] else "BROKEN (see below)"] for r in rows]
    for line in format_table(["method", "origin", "type", "arguments"], table):
        click.echo(line)
    for r in rows:
        if r["error"]:
            click.echo(f"broken: {r['error']}", err=True)


@cli.command(context_settings=CONTEXT)
@json_option
@_guard
def importances(as_json: bool) -> None:
    """List every registered importance (what a step's 'importance:' ranks by)."""
    from ..errors import RecipeError
    from ..methods import get_importance, importance_names
    from ..methods.importance import describe_origin
    from ..text import format_table

    rows = []
    for name in importance_names():
        try:
            spec = get_importance(name)
            rows.append({"name": name, "origin": spec.origin, "kind": spec.describe(), "error": None})
        except RecipeError as exc:
            rows.append({"name": name, "origin": describe_origin(name), "kind": "BROKEN (see below)", "error": str(exc)})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for line in format_table(["importance", "origin", "kind"], [[r["name"], r["origin"], r["kind"]] for r in rows]):
        click.echo(line)
    for r in rows:
        if r["error"]:
            click.echo(f"broken: {r['error']}", err=True)


@cli.command(context_settings=CONTEXT)
def schema() -> None:
    """Print the recipe JSON Schema (draft 2020-12), e.g. for editor completion."""
    from ..load import recipe_schema

    click.echo(json.dumps(recipe_schema(), indent=2))


def _check_shapes(weights: str, model: Any, state: dict[str, Any]) -> None:
    """A folder's tensors against the shapes its own config gives them (report reads the folder
    without loading it into the model, so nothing else checks them)."""
    from ..errors import CheckpointError, problem
    from ..text import listing, shape_text

    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    wrong = [
        f"{n} is {shape_text(tuple(v.shape))} where config.json gives {shape_text(shapes[n])}"
        for n, v in state.items()
        if n in shapes and tuple(v.shape) != shapes[n]
    ]
    if wrong:
        raise CheckpointError(problem(listing("the weights do not fit the folder's own config", wrong), source=weights, code="load"))
