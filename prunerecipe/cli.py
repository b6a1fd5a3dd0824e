"""The ``prunerecipe`` command line. Thin: parse options, call the library, print.

Exit codes: 0 success, 1 bad input (recipe, model, checkpoint, files), 2 usage errors.
"""

from __future__ import annotations

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
      --weights lenet.pt --finalize -o lenet-pruned.safetensors
  prunerecipe report --weights lenet-pruned.pt
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
        except Exception as exc:
            _fail(exc)

    return wrapper


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


def _progress() -> Callable[[str], None] | None:
    if not sys.stderr.isatty():
        return None
    return lambda line: click.echo(line, err=True)


def _model_for(recipe: Any, model_spec: str | None, weights: str | None) -> Any:
    from .checkpoint import load_pruned_state_dict, read_state_dict, strip_data_parallel_prefix
    from .modelspec import load_model

    spec = model_spec or (recipe.model if recipe is not None else None)
    if not spec:
        raise click.UsageError("no model: pass --model SPEC or set 'model:' in the recipe")
    model = load_model(spec)
    if weights:
        state = read_state_dict(weights)
        state, stripped = strip_data_parallel_prefix(state, model)
        if stripped:
            click.echo(f"note: {weights}: dropped the 'module.' prefix (a DataParallel/DDP checkpoint)", err=True)
        load_pruned_state_dict(model, state)
    return model


def _calibration_for(spec: str | None, recipe: Any, model: Any) -> Any:
    """The samples a calibration spec's function returns (checked by apply_recipe)."""
    if not spec:
        return None
    from .calibrate import call_calibration, load_calibration
    from .spec import Calibration

    settings = recipe.calibration or Calibration()
    return call_calibration(load_calibration(spec), model=model, samples=settings.samples, spec=spec)


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
    "--model", "model_spec", metavar="SPEC", help="Model: 'pkg.module:attr' or 'file.py:attr' (default: the recipe's 'model:')."
)
weights_option = click.option(
    "--weights",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="State dict to load first (.pt/.pth/.bin/.safetensors); pruned checkpoints keep their masks.",
)
set_option = click.option("--set", "sets", metavar="NAME=VALUE", multiple=True, help="Override a recipe var (VALUE is parsed as YAML). Repeatable.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


@cli.command(context_settings=CONTEXT)
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@model_option
@weights_option
@click.option(
    "-o",
    "--output",
    required=True,
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Where to write the pruned state_dict (.pt/.pth/.bin/.safetensors).",
)
@set_option
@click.option("--finalize", is_flag=True, help="Fold masks into the weights (prune.remove) after the last step.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
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
    sets: tuple[str, ...],
    finalize: bool,
    force: bool,
    calibration_spec: str | None,
    as_json: bool,
) -> None:
    """Apply RECIPE to a model and write the pruned state_dict.

    \b
    prunerecipe apply recipes/lenet-global-l1.yaml -o pruned.pt
    prunerecipe apply my.yaml --model mypkg.models:build --weights dense.pt -o pruned.pt
    prunerecipe apply recipes/wanda-50.yaml --calibration examples/calibration.py:stdlib_text -o pruned.pt
    """
    import dataclasses

    from .apply import apply_recipe
    from .checkpoint import _check_suffix, save_state_dict
    from .errors import CheckpointError
    from .load import load_recipe

    overrides = _parse_sets(sets)
    _check_suffix(output)
    if not force:
        if os.path.exists(output):
            raise CheckpointError(f"{output}: already exists; refusing to overwrite it (use --force)")
        if weights and os.path.abspath(output) == os.path.abspath(weights):
            raise CheckpointError(f"{output}: is the input checkpoint; refusing to overwrite it (use --force)")
    recipe = load_recipe(recipe_path, overrides)
    if finalize:
        recipe = dataclasses.replace(recipe, finalize=True)
    model = _model_for(recipe, model_spec, weights)
    calibration = _calibration_for(calibration_spec, recipe, model)
    report = apply_recipe(model, recipe, progress=_progress(), calibration=calibration)
    save_state_dict(model.state_dict(), output, force=force)
    if as_json:
        click.echo(json.dumps({**report.to_dict(), "output": output}, indent=2))
    else:
        click.echo(str(report))
        click.echo(f"wrote {output}")


@cli.command(context_settings=CONTEXT)
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@model_option
@weights_option
@set_option
@json_option
@_guard
def plan(recipe_path: str, model_spec: str | None, weights: str | None, sets: tuple[str, ...], as_json: bool) -> None:
    """Dry run: show every target each step resolves to and how much it prunes. Writes nothing."""
    from .load import load_recipe
    from .plan import plan_recipe

    recipe = load_recipe(recipe_path, _parse_sets(sets))
    model = _model_for(recipe, model_spec, weights)
    result = plan_recipe(model, recipe)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else str(result))


@cli.command(context_settings=CONTEXT)
@click.argument("recipe_paths", metavar="RECIPE...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@set_option
@_guard
def validate(recipe_paths: tuple[str, ...], sets: tuple[str, ...]) -> None:
    """Check recipe files without a model; print every problem as file:line:col: path: message."""
    from .errors import RecipeError
    from .load import load_recipe

    overrides = _parse_sets(sets)
    failed = 0
    for path in recipe_paths:
        try:
            load_recipe(path, overrides)
        except RecipeError as exc:
            failed += 1
            click.echo(str(exc), err=True)
        else:
            click.echo(f"{path}: ok")
    if failed:
        raise Fail(f"{failed} of {len(recipe_paths)} recipe(s) invalid")


@cli.command(context_settings=CONTEXT)
@model_option
@click.option("--weights", required=True, metavar="FILE", type=click.Path(dir_okay=False), help="The checkpoint to inspect.")
@json_option
@_guard
def report(model_spec: str | None, weights: str, as_json: bool) -> None:
    """Per-layer and global sparsity of a checkpoint, pruned (masks) or finalized.

    Without --model every floating-point tensor is listed; with it, only the model's parameters.
    """
    from .checkpoint import read_state_dict, state_dict_sparsity, strip_data_parallel_prefix
    from .text import format_table, pct

    state = read_state_dict(weights)
    names = None
    types: dict[str, str] = {}
    if model_spec:
        model = _model_for(None, model_spec, weights)
        state, _ = strip_data_parallel_prefix(state, model)
        modules = dict(model.named_modules())
        names = [n[: -len("_orig")] if n.endswith("_orig") else n for n, _ in model.named_parameters()]
        types = {n: type(modules[n.rpartition(".")[0]]).__name__ for n in names}
    rows = state_dict_sparsity(state, names)
    total = sum(math.prod(shape) for _, shape, _, _ in rows)
    zeros = sum(z for _, _, z, _ in rows)
    masked = sum(1 for *_, m in rows if m)
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
                        }
                        for n, s, z, m in rows
                    ],
                    "global": {"numel": total, "zeros": zeros, "sparsity": zeros / total if total else 0.0},
                },
                indent=2,
            )
        )
        return
    header = ["tensor"] + (["type"] if types else []) + ["shape", "entries", "sparsity", "masked"]
    table = [
        [n]
        + ([types.get(n, "")] if types else [])
        + ["x".join(map(str, s)) or "scalar", str(math.prod(s)), pct(z / math.prod(s) if math.prod(s) else 0.0), "yes" if m else ""]
        for n, s, z, m in rows
    ]
    for line in format_table(header, table):
        click.echo(line)
    state_kind = f"pruned: {masked} tensor(s) carry masks" if masked else "no masks (dense or finalized)"
    click.echo(f"global: {total} entries, sparsity {pct(zeros / total if total else 0.0)}; {state_kind}")


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
    cli.main(args=argv, prog_name="prunerecipe")
