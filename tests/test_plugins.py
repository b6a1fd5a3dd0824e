"""Methods from the `prunerecipe.methods` entry-point group: real distributions written to disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest
import torch
from click.testing import CliRunner

from prunerecipe import RecipeError, apply_recipe, get_method, method_names, parse_recipe
from prunerecipe import methods as registry
from prunerecipe.cli import cli

from .conftest import ROOT, make_lenet

IMPORT_LOG = "PRUNERECIPE_TEST_IMPORTS"


@pytest.fixture
def install(tmp_path, monkeypatch):
    """Write a distribution (modules + dist-info with entry points) into a sys.path folder."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    log = tmp_path / "imports.log"
    monkeypatch.setenv(IMPORT_LOG, str(log))
    added: list[str] = []

    def make(dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
        for name, code in modules.items():
            header = f"import os\nopen(os.environ[{IMPORT_LOG!r}], 'a').write({name!r} + '\\n')\n"
            (site / f"{name}.py").write_text(header + textwrap.dedent(code))
            added.append(name)
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[prunerecipe.methods]\n{lines}\n")
        registry.refresh()

    make.imported = lambda: log.read_text().split() if log.exists() else []  # type: ignore[attr-defined]
    yield make
    for name in added:
        sys.modules.pop(name, None)
    registry.refresh()


GOOD = """
import torch.nn.utils.prune as prune

class EveryOther(prune.BasePruningMethod):
    PRUNING_TYPE = "unstructured"
    args_schema = {"type": "object", "properties": {"start": {"type": "integer", "minimum": 0}}}

    def __init__(self, start=0):
        self.start = start

    def compute_mask(self, t, default_mask):
        mask = default_mask.clone()
        mask.view(-1)[self.start::2] = 0
        return mask
"""

USES_GOOD = "version: 1\nsteps:\n  - select: {names: [fc3]}\n    params: [bias]\n    method: every_other\n    args: {start: 1}\n"


def test_plugins_are_listed_without_importing_and_loaded_when_named(install):
    install("good-plugin", "1.2.0", {"every_other": "good_plugin_mod:EveryOther"}, {"good_plugin_mod": GOOD})
    assert "every_other" in method_names()
    assert install.imported() == []
    recipe = parse_recipe("version: 1\nsteps:\n  - {select: {}, method: identity}\n")
    apply_recipe(make_lenet(), recipe)
    assert install.imported() == []  # a recipe that does not name it never imports it
    model = make_lenet()
    apply_recipe(model, parse_recipe(USES_GOOD))
    assert install.imported() == ["good_plugin_mod"]
    assert model.fc3.bias_mask.tolist() == [1.0, 0.0] * 5
    spec = get_method("every_other")
    assert spec.origin == "good-plugin 1.2.0" and spec.args_schema is not None


def test_plugin_args_schema_errors_have_line_and_column(install):
    install("good-plugin", "1.2.0", {"every_other": "good_plugin_mod:EveryOther"}, {"good_plugin_mod": GOOD})
    with pytest.raises(RecipeError) as err:
        parse_recipe(USES_GOOD.replace("start: 1", "start: -2"), "plug.yaml")
    assert str(err.value) == "plug.yaml:6:19: steps[0].args.start: -2 is less than the minimum of 0 (method 'every_other' accepts: start=0)"


def test_a_broken_plugin_is_reported_and_breaks_nothing_else(install):
    install("good-plugin", "1.2.0", {"every_other": "good_plugin_mod:EveryOther"}, {"good_plugin_mod": GOOD})
    install("broken-plugin", "0.3.1", {"broken": "broken_plugin_mod:Method"}, {"broken_plugin_mod": "import not_installed_dependency_xyz\n"})
    install("wrong-plugin", "2.0", {"wrong": "wrong_plugin_mod:thing"}, {"wrong_plugin_mod": "def thing(): pass\n"})

    # unrelated recipes and the healthy plugin still work
    apply_recipe(make_lenet(), parse_recipe(USES_GOOD))
    assert "broken_plugin_mod" not in install.imported()

    with pytest.raises(RecipeError) as err:
        parse_recipe("version: 1\nsteps:\n  - {select: {}, method: broken}\n", "b.yaml")
    assert str(err.value) == (
        "b.yaml:3:26: steps[0].method: method 'broken' (entry point 'broken = broken_plugin_mod:Method' from broken-plugin 0.3.1) "
        "failed to import: ModuleNotFoundError: No module named 'not_installed_dependency_xyz'"
    )
    with pytest.raises(
        RecipeError, match=r"method 'wrong' \(entry point 'wrong = wrong_plugin_mod:thing' from wrong-plugin 2.0\) is <function thing"
    ):
        parse_recipe("version: 1\nsteps:\n  - {select: {}, method: wrong}\n")

    result = CliRunner().invoke(cli, ["methods"])
    assert result.exit_code == 0
    assert "every_other" in result.stdout and "BROKEN" in result.stdout
    assert "failed to import: ModuleNotFoundError" in result.stderr and "not a torch.nn.utils.prune.BasePruningMethod subclass" in result.stderr
    rows = {r["name"]: r for r in json.loads(CliRunner().invoke(cli, ["methods", "--json"]).stdout)}
    assert rows["every_other"]["error"] is None and rows["broken"]["origin"] == "broken-plugin 0.3.1" and rows["broken"]["error"]


def test_two_distributions_with_one_name_is_an_error_naming_both(install):
    install("first-plugin", "1.0", {"dup": "good_plugin_mod:EveryOther"}, {"good_plugin_mod": GOOD})
    install("second-plugin", "2.5", {"dup": "other_plugin_mod:EveryOther"}, {"other_plugin_mod": GOOD})
    with pytest.raises(RecipeError) as err:
        parse_recipe("version: 1\nsteps:\n  - {select: {}, method: dup}\n")
    text = str(err.value)
    assert "method 'dup' is registered by more than one distribution" in text
    assert "first-plugin 1.0 (good_plugin_mod:EveryOther)" in text and "second-plugin 2.5 (other_plugin_mod:EveryOther)" in text
    # a plugin shadowing a built-in is the same kind of conflict
    install("shadow-plugin", "0.1", {"l1_unstructured": "good_plugin_mod:EveryOther"}, {})
    with pytest.raises(RecipeError, match="method 'l1_unstructured' is built in, but shadow-plugin 0.1 also register"):
        parse_recipe("version: 1\nsteps:\n  - {select: {}, method: l1_unstructured, amount: 0.1}\n")


def test_function_form_through_an_entry_point(install):
    code = """
    from prunerecipe import pruning_method

    @pruning_method("unstructured", args_schema={"type": "object", "properties": {"keep": {"type": "number"}}})
    def keep_large(t, default_mask, keep=0.1):
        return default_mask * (t.abs() >= keep).to(default_mask.dtype)
    """
    install("fn-plugin", "0.0.1", {"keep_large": "fn_plugin_mod:keep_large"}, {"fn_plugin_mod": code})
    model = make_lenet()
    apply_recipe(model, parse_recipe("version: 1\nsteps:\n  - {select: {names: [fc1]}, method: keep_large, args: {keep: 0.02}}\n"))
    assert torch.equal(model.fc1.weight_mask, (model.fc1.weight_orig.abs() >= 0.02).float())
    with pytest.raises(RecipeError, match=r"steps\[0\].args.keep: 'big' is not of type 'number'"):
        parse_recipe("version: 1\nsteps:\n  - {select: {names: [fc1]}, method: keep_large, args: {keep: big}}\n")


def test_register_method_will_not_silently_shadow_a_plugin(install):
    install("good-plugin", "1.2.0", {"every_other": "good_plugin_mod:EveryOther"}, {"good_plugin_mod": GOOD})
    import torch.nn.utils.prune as prune

    with pytest.raises(RecipeError, match="already registered \\(good-plugin 1.2.0\\)"):
        registry.register_method("every_other", prune.L1Unstructured)


# --- the real example plugin, installed by .ci/run ---------------------------------------------


def _example_installed() -> bool:
    try:
        metadata.distribution("prunerecipe-foobar")
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture
def example_plugin():
    if not _example_installed():
        if os.environ.get("CI"):
            pytest.fail("CI must install examples/foobar-plugin (see .ci/run)")
        pytest.skip("examples/foobar-plugin is not installed: pip install ./examples/foobar-plugin")


def test_example_plugin_through_the_cli(example_plugin, tmp_path):
    exe = shutil.which("prunerecipe")
    assert exe
    listing = subprocess.run([exe, "methods"], capture_output=True, text=True)
    assert listing.returncode == 0
    assert any(line.startswith("foobar ") and "prunerecipe-foobar 0.1.0" in line for line in listing.stdout.splitlines())
    out = tmp_path / "foobar.pt"
    done = subprocess.run([exe, "apply", str(ROOT / "recipes/foobar.yaml"), "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    state = torch.load(out, weights_only=True)
    assert state["fc3.bias_mask"].tolist() == [0.0, 1.0] * 5
    expected = torch.ones(84 * 120)
    expected[1::3] = 0
    assert torch.equal(state["fc2.weight_mask"].view(-1), expected)


def test_example_plugin_matches_the_seed_by_hand(example_plugin):
    from prunerecipe_foobar import FooBarPruningMethod

    ours, theirs = make_lenet(), make_lenet()
    apply_recipe(ours, parse_recipe("version: 1\nsteps:\n  - {select: {names: [fc3]}, params: [bias], method: foobar}\n"))
    FooBarPruningMethod.apply(theirs.fc3, "bias")
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert torch.equal(ours.fc3.bias_mask, theirs.fc3.bias_mask)


def test_a_plugin_that_exits_on_import_is_reported(install):
    install("exit-plugin", "0.1", {"exits": "exit_plugin_mod:X"}, {"exit_plugin_mod": "raise SystemExit(9)\n"})
    with pytest.raises(RecipeError, match=r"method 'exits' .* failed to import: SystemExit: 9"):
        parse_recipe("version: 1\nsteps:\n  - {select: {}, method: exits}\n")
    result = CliRunner().invoke(cli, ["methods"])
    assert result.exit_code == 0 and "BROKEN" in result.stdout


class _Twos(torch.nn.utils.prune.BasePruningMethod):
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        return default_mask * 2.0  # not a mask: torch installs it anyway


class _NaNs(torch.nn.utils.prune.BasePruningMethod):
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        mask = default_mask.clone()
        mask.view(-1)[0] = float("nan")
        return mask


class _Broadcasts(torch.nn.utils.prune.BasePruningMethod):
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        return torch.ones(t.shape[-1])  # broadcasts against the weight: torch's apply accepts it


class _Scales(torch.nn.utils.prune.BasePruningMethod):
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        t.detach().mul_(10)  # writes into the weights it ranks
        return default_mask


@pytest.mark.parametrize(
    ("cls", "scope", "message"),
    [
        (_Twos, "local", "computed a mask for fc1.weight that holds 48000 value(s) other than 0 and 1 (such as 2.0)"),
        (_NaNs, "local", "computed a mask for fc1.weight that holds 1 value(s) other than 0 and 1 (such as nan)"),
        (_Broadcasts, "local", "computed a mask for fc1.weight that has shape (400,), not the tensor's (120, 400)"),
        (_Scales, "local", "changed the values of fc1.weight in place; a pruning method computes a mask from them"),
        (_Twos, "global", "computed a mask for fc1.weight that holds 48000 value(s) other than 0 and 1 (such as 2.0)"),
    ],
    ids=["twos", "nan", "broadcast", "in-place", "twos-global"],
)
def test_a_plugin_mask_or_write_torch_would_accept_is_refused_and_the_model_restored(cls, scope, message):
    # torch installs such masks (and keeps such writes); prunerecipe could not read the masks back,
    # and its rollback restores tensors by reference: checked after each plugin method runs
    from prunerecipe import ApplyError, register_method, unregister_method

    register_method("misbehaving", cls)
    try:
        model = make_lenet()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        recipe = parse_recipe(
            "version: 1\nsteps:\n"
            "  - {select: {names: [conv1]}, method: l1_unstructured, amount: 0.5}\n"
            f"  - {{select: {{names: [fc1, fc2]}}, method: misbehaving, scope: {scope}}}\n",
            "r.yaml",
        )
        with pytest.raises(ApplyError) as err:
            apply_recipe(model, recipe)
        assert f"method 'misbehaving' (in-process) {message}" in str(err.value)
        assert str(err.value).endswith("the model was left unchanged")
        after = model.state_dict()
        assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    finally:
        unregister_method("misbehaving")
