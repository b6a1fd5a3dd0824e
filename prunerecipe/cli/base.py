"""What every command shares: the group, its options, error handling, loading recipes and models."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

from .._version import __version__

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
    from ..errors import RecipeError

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
            from ..errors import RecipeError

            if kwargs.get("as_json") and not _debug():  # a JSON list of problems, whatever failed
                unlocated = {"file": None, "line": None, "col": None, "path": None, "code": "error", "message": f"{type(exc).__name__}: {exc}"}
                click.echo(json.dumps(exc.to_list() if isinstance(exc, RecipeError) else [unlocated], indent=2))
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
    from ..errors import RecipeError
    from ..load import parse_value

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

    from ..errors import RecipeWarning
    from ..load import load_recipe

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RecipeWarning)
        recipe = load_recipe(path, overrides)
    for w in caught:
        if issubclass(w.category, RecipeWarning):
            click.echo(f"warning: {w.message}", err=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return recipe


def _plot_target(path: str, force: bool) -> None:
    """Check a --plot file before any work: a suffix matplotlib writes, a place to write it,
    and no file there unless ``force`` (an existing picture is not replaced silently)."""
    from ..checkpoint import check_output

    if os.path.splitext(path)[1].lower() not in (".png", ".svg"):
        raise click.BadParameter(f"{path!r}: the picture is .png or .svg", param_hint="'--plot'")
    check_output(path, force=force)


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
    import dataclasses

    from ..checkpoint import fit_prefix, load_pruned_state_dict, read_state_dict
    from ..errors import CheckpointError, ModelSpecError
    from ..modelspec import is_folder_spec, load_model, resolve

    spec, base = _model_spec(recipe, model_spec)
    try:
        folder = resolve(spec, base) if is_folder_spec(spec, base) else None
        model = load_model(spec, base=base, weights=not weights, meta=meta_ok and folder is not None and not weights)
    except ModelSpecError as exc:
        if model_spec or recipe is None:
            raise
        # the recipe's own model: key: located there
        raise ModelSpecError([recipe.problem(("model",), p.message, code=p.code) for p in exc.problems]) from None
    if weights:
        state = read_state_dict(weights)
        state, removed = fit_prefix(state, model, strip_prefix)
        if removed and not strip_prefix:
            click.echo(f"note: {weights}: removed the key prefix {removed!r}, which every key had and the model has not", err=True)
        try:
            load_pruned_state_dict(model, state)
        except CheckpointError as exc:  # name the checkpoint the message is about
            raise CheckpointError([p if p.source else dataclasses.replace(p, source=weights) for p in exc.problems]) from None
    return model, folder


def _calibration_fn(spec: str | None) -> Callable[[Any, Any], Any] | None:
    """The calibration function a spec names, imported now; called with (recipe, model) it returns
    the samples (checked by apply_recipe)."""
    if not spec:
        return None
    from ..calibrate.data import LazySamples, load_calibration
    from ..spec import Calibration

    fn = load_calibration(spec)
    name = spec

    def samples(recipe: Any, model: Any) -> Any:
        settings = recipe.calibration or Calibration()
        return LazySamples(fn, model=model, samples=settings.samples, spec=name)

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
    _recipe_warnings_as_lines()


def _recipe_warnings_as_lines() -> None:
    """Warnings about a recipe (an entry that selects nothing, say) print as ``warning: ...``
    lines on stderr, as the loader's do, rather than with a source line of prunerecipe."""
    import warnings

    from ..errors import RecipeWarning

    shown = warnings.showwarning
    if getattr(shown, "_prunerecipe", False):
        return

    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: str | None = None) -> None:
        if issubclass(category, RecipeWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            shown(message, category, filename, lineno, file, line)

    show._prunerecipe = True  # type: ignore[attr-defined]
    warnings.showwarning = show


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
