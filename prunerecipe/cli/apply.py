"""``prunerecipe apply``: in memory or streamed."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from .base import (
    CONTEXT,
    Fail,
    _calibration_fn,
    _guard,
    _load,
    _model_for,
    _model_spec,
    _parse_sets,
    _progress,
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
@click.option(
    "-o", "--output", required=True, metavar="PATH", help="Where to write: a file (.pt/.pth/.bin/.safetensors), or a folder with --format hf."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["torch", "dense", "hf"]),
    help="torch: *_orig/*_mask, resumable; dense: masks folded into plain weights; hf: a Hugging Face folder. "
    "Default: hf for a model from a Hugging Face folder, else torch.",
)
@click.option("--max-shard-size", default="5GB", show_default=True, metavar="SIZE", help="Largest safetensors shard of --format hf (e.g. 500MB).")
@click.option(
    "--stream",
    is_flag=True,
    help="Read, prune and write one tensor at a time (safetensors in; --format dense or hf out; default dense, hf for a model folder): "
    "for checkpoints bigger than memory. The model is built on the meta device; the output equals the in-memory run's, bit for bit.",
)
@set_option
@click.option("--finalize", is_flag=True, help="Fold masks into the weights (prune.remove) after the last step.")
@click.option("--compact", is_flag=True, help="As 'finalize: compact': also remove channels masked across their whole dependency group.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists (keeping its permissions).")
@prefix_option
@click.option(
    "--calibration",
    "calibration_spec",
    metavar="SPEC",
    help="Calibration data for steps that need it (wanda, sparsegpt): 'pkg.module:fn' or 'file.py:fn' returning samples.",
)
@json_option
@_guard
def apply(
    recipe_path: str,
    model_spec: str | None,
    weights: str | None,
    output: str,
    fmt: str | None,
    max_shard_size: str,
    stream: bool,
    sets: tuple[str, ...],
    finalize: bool,
    compact: bool,
    force: bool,
    strip_prefix: str | None,
    calibration_spec: str | None,
    as_json: bool,
) -> None:
    """Apply RECIPE to a model and write the result.

    \b
    prunerecipe apply recipes/lenet-global-l1.yaml -o pruned.pt
    prunerecipe apply my.yaml --model mypkg.models:build --weights dense.pt --format dense -o pruned.safetensors
    prunerecipe apply my.yaml --model ./gpt2-folder -o ./gpt2-pruned        (a Hugging Face folder in, one out)
    prunerecipe apply my.yaml --model ./llama-70b --stream -o ./llama-pruned  (tensor by tensor, bigger than memory)
    prunerecipe apply recipes/wanda-50.yaml --calibration examples/calibration.py:stdlib_text -o pruned.pt
    """
    import dataclasses

    from ..apply import apply_recipe
    from ..checkpoint import check_output, parse_size, write_output
    from ..checkpoint.write import output_suffix
    from ..modelspec import check_spec, is_folder_spec, resolve

    overrides = _parse_sets(sets)
    recipe = _load(recipe_path, overrides)
    if compact or (finalize and not recipe.finalize):  # --finalize never undoes a recipe's 'finalize: compact'
        recipe = dataclasses.replace(recipe, finalize="compact" if compact else True)
    if stream:
        if calibration_spec:
            raise click.UsageError("--calibration runs the model on data: it needs the model in memory; leave out --stream")
        _apply_streaming(recipe, recipe_path, model_spec, weights, output, fmt, max_shard_size, force, strip_prefix, as_json)
        return
    # Everything about the output is checked before the model is built or pruned.
    spec, base = _model_spec(recipe, model_spec)
    check_spec(spec, base)
    from_folder = is_folder_spec(spec, base)
    fmt = fmt or ("hf" if from_folder else "torch")
    if fmt != "hf" and click.get_current_context().get_parameter_source("max_shard_size") is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--max-shard-size sets the shard size of --format hf; this run writes one file")
    output_suffix(output, fmt)
    parse_size(max_shard_size)
    inputs = tuple(p for p in (weights, resolve(spec, base) if from_folder else None, recipe_path) if p)
    check_output(output, force=force, folder=fmt == "hf", inputs=inputs)

    calibrate = _calibration_fn(calibration_spec)  # imported before the model is built: a wrong spec costs nothing
    model, folder = _model_for(recipe, model_spec, weights, strip_prefix)
    if fmt == "hf" and not hasattr(getattr(model, "config", None), "to_json_file"):
        raise Fail(
            f"{output}: --format hf needs a Hugging Face model (one with a transformers config); {type(model).__name__} has none. Use --format dense or torch"
        )
    calibration = calibrate(recipe, model) if calibrate is not None else None
    report = apply_recipe(model, recipe, progress=_progress(), calibration=calibration)
    text = getattr(recipe.document, "text", None)
    line = write_output(
        model,
        output,
        fmt=fmt,
        force=force,
        source=folder,
        recipe_text=text,
        recipe_source=recipe.source,
        targets=[t.name for t in report.targets],
        max_shard_size=max_shard_size,
    )
    _applied(report, output, fmt, line, as_json)


def _applied(report: Any, output: str, fmt: str, line: str, as_json: bool, **extra: Any) -> None:
    """What ``apply`` prints: the report and the line saying what was written (or both as JSON)."""
    if as_json:
        click.echo(json.dumps({**report.to_dict(), "output": output, "format": fmt, **extra, "wrote": line}, indent=2))
    else:
        click.echo(str(report))
        click.echo(line)


def _apply_streaming(
    recipe: Any,
    recipe_path: str,
    model_spec: str | None,
    weights: str | None,
    output: str,
    fmt: str | None,
    max_shard_size: str,
    force: bool,
    strip_prefix: str | None,
    as_json: bool,
) -> None:
    """``apply --stream``: plan on the meta device (every refusal before anything is read), then
    prune tensor by tensor."""
    from ..checkpoint import check_output, parse_size
    from ..checkpoint.write import wrote_line
    from ..stream import apply_recipe_streaming, meta_model, stream_plan

    spec, base = _model_spec(recipe, model_spec)
    model, folder = meta_model(spec, base)
    fmt = fmt or ("hf" if folder else "dense")
    source = weights or folder
    if source is None:
        raise click.UsageError("--stream needs --weights (a .safetensors file, a shard index or a model folder), or a model folder as --model")
    parse_size(max_shard_size)
    sp = stream_plan(model, recipe, source, fmt=fmt, out=output, strip_prefix=strip_prefix)
    check_output(output, force=force, folder=fmt == "hf", inputs=tuple(p for p in (source, folder, recipe_path) if p))
    if sp.note:
        click.echo(f"note: {source}: {sp.note}", err=True)
    report = apply_recipe_streaming(
        model, recipe, source, output, fmt=fmt, force=force, max_shard_size=max_shard_size, folder=folder, plan=sp, progress=_stream_progress()
    )
    files = 1 if fmt == "dense" else sum(1 for f in os.listdir(output) if f.endswith(".safetensors"))
    _applied(report, output, fmt, wrote_line(output, fmt, model, report.global_after, files), as_json, stream=True)


def _stream_progress() -> Callable[[Any], None] | None:
    """Tensors and bytes done, rate and ETA of each pass, on one line of stderr (a terminal only)."""
    if not sys.stderr.isatty():
        return None
    import time

    started: dict[int, tuple[float, int]] = {}  # per pass: when and at how many bytes it was first seen
    shown = [0.0]

    def show(p: Any) -> None:
        now = time.monotonic()
        t0, b0 = started.setdefault(p.number, (now, p.bytes))
        last = p.tensors == p.tensors_total
        if not last and now - shown[0] < 0.2:
            return
        shown[0] = now
        rate = (p.bytes - b0) / (now - t0) if now > t0 else 0.0  # from the first report on: its bytes took time before it
        eta = f", ETA {(p.bytes_total - p.bytes) / rate:.0f} s" if rate and not last else ""
        speed = f", {rate / 1e6:.0f} MB/s" if rate else ""
        line = f"pass {p.number}/{p.passes} {p.label}: {p.tensors}/{p.tensors_total} tensors, {p.bytes / 1e9:.2f}/{p.bytes_total / 1e9:.2f} GB{speed}{eta}"
        click.echo("\r" + line.ljust(100), err=True, nl=last)

    return show
