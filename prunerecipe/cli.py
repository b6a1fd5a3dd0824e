"""The ``prunerecipe`` command line. Thin: parse options, call the library, print.

Exit codes: 0 success, 1 bad input (recipe, model, checkpoint, files), 2 usage errors.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

from ._version import __version__

EXIT_OK = 0
EXIT_INPUT = 1
EXIT_USAGE = 2

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

EXAMPLES = """
\b
Examples:
  prunerecipe validate recipes/*.yaml
  prunerecipe plan recipes/lenet-global-l1.yaml
  prunerecipe apply recipes/lenet-global-l1.yaml -o lenet-pruned.pt
  prunerecipe apply recipes/lenet-layerwise-l1.yaml --set linear_amount=0.6 \\
      --weights lenet-pruned.pt --finalize --format dense -o lenet-final.safetensors
  prunerecipe report --weights lenet-pruned.pt --model prunerecipe.zoo:LeNet
"""


class Fail(click.ClickException):
    """Bad input: message on stderr, exit code 1."""

    exit_code = EXIT_INPUT

    def show(self, file: Any = None) -> None:
        click.echo(self.format_message(), err=True)


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx else None
    return bool(root and root.obj and root.obj.get("debug")) or os.environ.get("PRUNERECIPE_DEBUG") == "1"


def _fail(exc: BaseException) -> NoReturn:
    """Turn a library error into exit code 1 (a traceback only with --debug)."""
    if _debug():
        raise exc
    from .errors import RecipeError

    if isinstance(exc, RecipeError):
        raise Fail(str(exc)) from None
    raise Fail(f"error: {type(exc).__name__}: {exc}") from None


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Library errors become clean messages; unexpected ones too, unless --debug."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            raise
        except BrokenPipeError:
            _closed_stdout()
        except Exception as exc:
            from .errors import RecipeError

            if kwargs.get("as_json") and isinstance(exc, RecipeError) and not _debug():
                click.echo(json.dumps({"errors": exc.to_list()}, indent=2))
                raise SystemExit(EXIT_INPUT) from None
            _fail(exc)

    return wrapper


def _closed_stdout() -> NoReturn:
    """The reader of our output went away (``| head``): stop quietly with exit 0, as Unix
    tools do; stdout goes to /dev/null so the interpreter's final flush cannot fail again."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    raise SystemExit(EXIT_OK)


def _parse_sets(values: tuple[str, ...]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs; VALUE is read as plain YAML data, exactly as in a recipe file."""
    from .errors import RecipeError
    from .load import parse_value

    out: dict[str, Any] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="'--set'")
        try:
            out[name.strip()] = parse_value(raw)
        except RecipeError as exc:
            message = "; ".join(p.message if hasattr(p, "message") else str(p) for p in exc.problems)
            raise click.BadParameter(f"value of {name.strip()!r}: {message}", param_hint="'--set'") from None
    return out


def _load(path: str, overrides: dict[str, Any]) -> Any:
    """Load a recipe; its warnings go to stderr as ``warning: ...`` lines."""
    import warnings

    from .errors import RecipeWarning
    from .load import load_recipe

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RecipeWarning)
        recipe = load_recipe(path, overrides)
    for w in caught:
        if issubclass(w.category, RecipeWarning):
            click.echo(f"warning: {w.message}", err=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return recipe


def _plot_target(path: str) -> None:
    """Check a --plot file before any work: a suffix matplotlib writes, a place to write it."""
    from .checkpoint import check_output

    if os.path.splitext(path)[1].lower() not in (".png", ".svg"):
        raise click.BadParameter(f"{path!r}: the picture is .png or .svg", param_hint="'--plot'")
    check_output(path, force=True)


def _progress() -> Callable[[str], None] | None:
    if not sys.stderr.isatty():
        return None
    return lambda line: click.echo(line, err=True)


def _model_spec(recipe: Any, model_spec: str | None) -> tuple[str, str | None]:
    """The model spec and the folder its relative paths resolve against: ``--model`` against
    the current folder, a recipe's ``model:`` against the recipe file's own folder."""
    if model_spec:
        return model_spec, None
    if recipe is not None and recipe.model:
        source = recipe.source
        return recipe.model, os.path.dirname(os.path.abspath(source)) if os.path.exists(source) else None
    raise click.UsageError("no model: pass --model SPEC or set 'model:' in the recipe")


def _model_for(
    recipe: Any, model_spec: str | None, weights: str | None, strip_prefix: str | None = None, meta_ok: bool = False
) -> tuple[Any, str | None]:
    """The model, its weights loaded; and the Hugging Face folder it came from (or None)."""
    from .checkpoint import fit_prefix, load_pruned_state_dict, read_state_dict
    from .modelspec import is_folder_spec, load_model, resolve

    spec, base = _model_spec(recipe, model_spec)
    folder = resolve(spec, base) if is_folder_spec(spec, base) else None
    model = load_model(spec, base=base, weights=not weights, meta=meta_ok and folder is not None and not weights)
    if weights:
        state = read_state_dict(weights)
        state, removed = fit_prefix(state, model, strip_prefix)
        if removed and not strip_prefix:
            click.echo(f"note: {weights}: removed the key prefix {removed!r}, which every key had and the model has not", err=True)
        load_pruned_state_dict(model, state)
    return model, folder


def _calibration_fn(spec: str | None) -> Callable[[Any, Any], Any] | None:
    """The calibration function a spec names, imported now; called with (recipe, model) it returns
    the samples (checked by apply_recipe)."""
    if not spec:
        return None
    from .calibrate import call_calibration, load_calibration
    from .spec import Calibration

    fn = load_calibration(spec)

    def samples(recipe: Any, model: Any) -> Any:
        settings = recipe.calibration or Calibration()
        return call_calibration(fn, model=model, samples=settings.samples, spec=spec)

    return samples


@click.group(context_settings=CONTEXT, epilog=EXAMPLES)
@click.version_option(__version__, "-V", "--version", prog_name="prunerecipe", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Declarative pruning recipes for PyTorch models.

    A recipe (YAML) says which modules to prune, with which torch.nn.utils.prune
    method, how much, in which order. The result equals the hand-written torch code.
    """
    ctx.obj = {"debug": debug}


model_option = click.option(
    "--model",
    "model_spec",
    metavar="SPEC",
    help="Model: 'pkg.module:attr', 'file.py:attr' or a Hugging Face model folder (default: the recipe's 'model:').",
)
weights_option = click.option(
    "--weights",
    metavar="PATH",
    help="Weights to load first: .pt/.pth/.bin/.ckpt/.safetensors, a shard index or a model folder; pruned checkpoints keep their masks.",
)
prefix_option = click.option(
    "--strip-prefix", metavar="PREFIX", help="Remove PREFIX from every checkpoint key (found by itself when no key fits otherwise)."
)
set_option = click.option("--set", "sets", metavar="NAME=VALUE", multiple=True, help="Override a recipe var (VALUE is parsed as YAML). Repeatable.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


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

    from .apply import apply_recipe
    from .checkpoint import check_output, parse_size, write_output
    from .checkpoint.write import output_suffix
    from .modelspec import is_folder_spec, resolve

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
    from_folder = is_folder_spec(spec, base)
    fmt = fmt or ("hf" if from_folder else "torch")
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
    from .checkpoint import check_output, parse_size
    from .checkpoint.write import wrote_line
    from .stream import apply_recipe_streaming, meta_model, stream_plan

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

    started: dict[int, float] = {}
    shown = [0.0]

    def show(p: Any) -> None:
        now = time.monotonic()
        t0 = started.setdefault(p.number, now)
        last = p.tensors == p.tensors_total
        if not last and now - shown[0] < 0.2:
            return
        shown[0] = now
        rate = p.bytes / (now - t0) if now > t0 else 0.0
        eta = f", ETA {(p.bytes_total - p.bytes) / rate:.0f} s" if rate and not last else ""
        line = f"pass {p.number}/{p.passes} {p.label}: {p.tensors}/{p.tensors_total} tensors, {p.bytes / 1e9:.2f}/{p.bytes_total / 1e9:.2f} GB, {rate / 1e6:.0f} MB/s{eta}"
        click.echo("\r" + line.ljust(100), err=True, nl=last)

    return show


@cli.command(context_settings=CONTEXT)
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@model_option
@weights_option
@set_option
@prefix_option
@click.option("--plot", metavar="FILE", help="Also draw per-tensor sparsity before and after as a bar chart (.png or .svg; needs prunerecipe[plot]).")
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
    stream: bool,
    as_json: bool,
) -> None:
    """Dry run: show every target each step resolves to and how much it prunes. Writes nothing.

    A Hugging Face model folder is planned on the meta device (shapes only) unless --weights is given.
    """
    from .plan import plan_recipe

    if stream and plot:
        raise click.UsageError("--plot draws the in-memory plan's figures; leave out --stream to draw them")
    recipe = _load(recipe_path, _parse_sets(sets))
    if stream:
        from .stream import meta_model, stream_plan

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
        from .preview import preview

        result = preview(model, result)  # with real weights: the figures are computed, not projected
    if plot:
        from .plots import sparsity_chart

        rows = {pt.qualname: pt for ps in result.steps for pt in ps.targets}  # each target's last step
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
            title=f"{recipe.source}: targeted entries masked after the recipe: {where}",
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
    from .errors import RecipeError

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
        click.echo(json.dumps({"errors": errors}, indent=2))
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
@json_option
@_guard
def report(model_spec: str | None, weights: str, strip_prefix: str | None, plot: str | None, as_json: bool) -> None:
    """Per-layer and global sparsity of a checkpoint, pruned (masks) or finalized.

    Without --model every floating-point tensor is listed (a model folder is its own model);
    with it, only the model's parameters. A tensor tied to another is counted once.
    """
    from .checkpoint import fit_prefix, is_hf_folder, read_state_dict, state_dict_sparsity
    from .modelspec import load_model
    from .text import format_table, pct, shape_text

    if plot:
        _plot_target(plot)
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
        types = {n: type(modules[n.rpartition(".")[0]]).__name__ for n in names}
    rows = state_dict_sparsity(state, names)
    # The global figure counts the weights of the kinds pruning works on (tensors with masks, and
    # matrices and kernels: two or more dimensions); biases and norm parameters are listed, not summed.
    counted = [r for r in rows if r[3] or len(r[1]) >= 2]
    others = [r for r in rows if r not in counted]
    total = sum(math.prod(shape) for _, shape, _, _ in counted)
    zeros = sum(z for _, _, z, _ in counted)
    masked = sum(1 for *_, m in rows if m)
    if plot:
        from .plots import sparsity_chart

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
    from .checkpoint import is_hf_folder
    from .inspection import as_dict, as_text, model_rows, selections
    from .load import parse_value, recipe_from_dict

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
    from .errors import RecipeError
    from .methods import describe_origin, get_method, method_names
    from .text import format_table

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
    from .errors import RecipeError
    from .methods import get_importance, importance_names
    from .methods.importance import describe_origin
    from .text import format_table

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
    from .load import recipe_schema

    click.echo(json.dumps(recipe_schema(), indent=2))


def main(argv: list[str] | None = None) -> None:
    """The ``prunerecipe`` command."""
    try:
        cli.main(args=argv, prog_name="prunerecipe")
    except BrokenPipeError:
        _closed_stdout()
