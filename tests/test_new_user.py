"""The rough edges a new user hit (issue 18): inspect, safe validate, paths, messages,
stdin and machine-readable errors, report figures, pictures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from prunerecipe.cli import cli

from .conftest import ROOT

RECIPE = str(ROOT / "recipes" / "lenet-global-l1.yaml")


def run(*args: str, stdin: str | None = None):
    return CliRunner().invoke(cli, list(args), input=stdin)


def test_inspect_lists_modules_types_parameters_ties_and_selections(tmp_path):
    done = run("inspect", "--model", "prunerecipe.zoo:LeNet", "--select", "{types: [Linear], names: ['conv*']}")
    assert done.exit_code == 0, done.output
    assert "fc1     Linear  torch.nn.modules.linear.Linear  weight 120x400, bias 120" in done.output
    assert "types alone match 3 module(s), names alone 2, both together none" in done.output
    (tmp_path / "tied.py").write_text(
        "import torch\nclass Tied(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.embed = torch.nn.Embedding(10, 4)\n        self.out = torch.nn.Linear(4, 10, bias=False)\n        self.out.weight = self.embed.weight\n"
    )
    done = run("inspect", "--model", f"{tmp_path / 'tied.py'}:Tied", "--json")
    modules = {m["name"]: m for m in json.loads(done.output)["modules"]}
    assert modules["out"]["params"][0]["tied_with"] == ["embed.weight"]
    done = run("inspect", str(ROOT / "recipes" / "lenet-layerwise-l1.yaml"))
    assert "steps[1] (linears): 3 target(s): fc1.weight, fc2.weight, fc3.weight" in done.output


def test_validate_imports_nothing_a_recipe_names(tmp_path):
    marker = tmp_path / "imported"
    (tmp_path / "spy.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\nclass Layer:\n    pass\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\nmodel: spy:Layer\nsteps:\n  - {select: {types: [spy.Layer, torch.nn.Linear]}, method: l1_unstructured, amount: 0.5}\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "prunerecipe", "validate", str(recipe)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    bad = run("validate", "-", stdin="version: 1\nsteps:\n  - {select: {types: ['torch..nn']}, method: l1_unstructured, amount: 0.5}\n")
    assert "'torch..nn' is not a class name or a dotted import path" in bad.output
    # plan does import it, and says so when it cannot
    (tmp_path / "m.py").write_text("from prunerecipe.zoo import LeNet\n")
    done = subprocess.run(
        [sys.executable, "-m", "prunerecipe", "plan", str(recipe), "--model", "m:LeNet"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0 and marker.exists(), done.stderr


def test_numbers_that_are_nan_are_refused_anywhere():
    done = run("validate", "-", stdin="version: 1\nsteps:\n  - {select: {}, method: ln_structured, amount: 0.5, args: {n: .nan, dim: 0}}\n")
    assert done.exit_code == 1 and "<stdin>:3:64: steps[0].args.n: NaN is not a number prunerecipe can use here" in done.output
    ok = run("validate", "-", stdin="version: 1\nsteps:\n  - {select: {}, method: ln_structured, amount: 0.5, args: {n: .inf, dim: 0}}\n")
    assert ok.exit_code == 0, ok.output


def test_paths_in_a_recipe_resolve_against_its_folder_and_model_against_the_current_one(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mymodel.py").write_text("from prunerecipe.zoo import LeNet as Net\n")
    (tmp_path / "sub" / "r.yaml").write_text(
        "version: 1\nmodel: mymodel.py:Net\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert run("plan", str(tmp_path / "sub" / "r.yaml")).exit_code == 0
    monkeypatch.chdir(tmp_path / "sub")
    done = run("plan", "r.yaml", "--model", "mymodel:Net")  # the current folder is importable
    assert done.exit_code == 0, done.output


def test_messages_new_users_met():
    done = run("validate", "-", stdin='version: "1"\nsteps:\n  - {select: {}, method: identity}\n')
    assert "version is the number 1, not the string '1': remove the quotes" in done.output
    long_glob = "x" * 40_000
    done = run(
        "plan",
        "-",
        "--model",
        "prunerecipe.zoo:LeNet",
        stdin=f"version: 1\nsteps:\n  - {{name: '{'s' * 5000}', select: {{names: ['{long_glob}']}}, method: identity}}\n",
    )
    assert done.exit_code == 1 and len(done.output) < 1200, len(done.output)
    done = run("apply", RECIPE, "-o", "/nonexistent/x.pt", "--set", "x=1")
    assert "override 'x' matches no var" in done.output
    help_text = run("report", "--help").output
    assert "the recipe's model:" not in help_text
    assert "lenet.pt " not in run("--help").output


def test_an_int_override_of_a_float_var_warns_that_an_int_is_a_count(tmp_path):
    out = tmp_path / "o.pt"
    done = CliRunner().invoke(cli, ["apply", str(ROOT / "recipes" / "lenet-layerwise-l1.yaml"), "--set", "linear_amount=1", "-o", str(out)])
    assert done.exit_code == 0
    assert "warning:" in done.stderr and "an int amount is a count of entries, not a fraction: write 1.0 for a fraction" in done.stderr
    # 3.0 would be refused (a fraction is at most 1): the advice is only given where it fits
    done = CliRunner().invoke(cli, ["plan", str(ROOT / "recipes" / "lenet-layerwise-l1.yaml"), "--set", "conv_amount=3"])
    assert done.exit_code == 0
    assert "not a fraction (a fraction is a float from 0.0 to 1.0)" in done.stderr and "3.0" not in done.stderr


def test_plan_says_what_its_figures_leave_out_unseeded_draws_and_scheduled_steps(tmp_path):
    from prunerecipe import save_state_dict
    from prunerecipe.zoo import LeNet

    weights = tmp_path / "w.pt"
    save_state_dict(LeNet().state_dict(), str(weights))
    recipe = tmp_path / "r.yaml"
    step = "  - {select: {names: [fc1]}, method: random_unstructured, amount: 0.5%s}\n"
    recipe.write_text("version: 1\nmodel: prunerecipe.zoo:LeNet\nsteps:\n" + step % "")
    text = run("plan", str(recipe), "--weights", str(weights)).output
    assert "note: steps[0] is random without a seed: apply draws other numbers than this plan did" in text
    recipe.write_text("version: 1\nmodel: prunerecipe.zoo:LeNet\nsteps:\n" + step % ", seed: 1")
    assert "random without a seed" not in run("plan", str(recipe), "--weights", str(weights)).output
    text = run("plan", str(ROOT / "recipes" / "digits-gradual.yaml")).output
    assert "-> 0.00% (computed from the weights; before the scheduled steps, which run during training)" in text


def test_json_errors_from_validate_plan_and_apply(tmp_path):
    bad = "version: 1\nsteps:\n  - {select: {names: [nope]}, method: l1_unstructured, amount: 0.5}\n"
    for args in (
        ["validate", "--json", "-"],
        ["plan", "--json", "-", "--model", "prunerecipe.zoo:LeNet"],
        ["apply", "--json", "-", "--model", "prunerecipe.zoo:LeNet", "-o", str(tmp_path / "o.pt")],
    ):
        done = run(*args, stdin=bad if args[0] != "validate" else bad.replace("l1_unstructured", "l1_unstructure"))
        assert done.exit_code == 1, done.output
        (error,) = json.loads(done.output)  # a JSON list of {file, line, col, path, code, message}
        assert set(error) == {"file", "line", "col", "path", "code", "message"} and error["file"] == "<stdin>" and error["line"] == 3


def test_report_counts_prunable_weights_and_lists_biases_and_norms_apart(tmp_path):
    import torch

    from prunerecipe.zoo import LeNet

    model = LeNet()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "bias") and m.bias is not None:
                m.bias.zero_()  # zero-initialized biases are not sparsity
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    done = run("report", "--weights", str(tmp_path / "dense.pt"))
    assert "global: 59838 weights in 5 tensor(s), sparsity 0.00%" in done.output
    assert "not counted: 5 one-dimensional tensor(s) (biases, norm parameters): 236 entries, 236 zeros" in done.output


@pytest.mark.parametrize("suffix", ["png", "svg"])
def test_plots_of_report_and_plan(tmp_path, suffix):
    pytest.importorskip("matplotlib")
    out = tmp_path / "o.pt"
    assert run("apply", RECIPE, "-o", str(out)).exit_code == 0
    for args, picture in (
        (["report", "--weights", str(out), "--plot"], tmp_path / f"report.{suffix}"),
        (["plan", str(ROOT / "recipes" / "lenet-layerwise-l1.yaml"), "--weights", str(out), "--plot"], tmp_path / f"plan.{suffix}"),
    ):
        done = run(*args, str(picture))
        assert done.exit_code == 0 and f"wrote {picture}" in done.output, done.output
        data = picture.read_bytes()
        assert 5_000 < len(data) < 2_000_000
        assert data.startswith(b"\x89PNG\r\n\x1a\n") if suffix == "png" else b"<svg" in data[:2000]
    done = run("report", "--weights", str(out), "--plot", str(tmp_path / "x.gif"))
    assert done.exit_code == 2 and ".png or .svg" in done.output
    # an existing picture is replaced with --force only, and checked before any work
    picture = tmp_path / f"plan.{suffix}"
    picture.write_bytes(b"mine")
    for command in (["report", "--weights", str(out)], ["plan", RECIPE]):
        done = run(*command, "--plot", str(picture))
        assert done.exit_code != 0 and "already exists; refusing to overwrite it (use --force)" in done.output, done.output
        assert picture.read_bytes() == b"mine"
    done = run("plan", RECIPE, "--plot", str(picture), "--force")
    assert done.exit_code == 0 and picture.read_bytes() != b"mine", done.output


def test_a_plot_of_hundreds_of_layers_stays_readable(tmp_path):
    pytest.importorskip("matplotlib")
    from prunerecipe.plots import sparsity_chart

    rows = [(f"blocks.{i // 4}.layer{i % 4}.weight", (i % 17) / 17) for i in range(240)]
    sparsity_chart(str(tmp_path / "tall.png"), rows, before=[0.0] * 240, title="240 layers")
    from matplotlib.image import imread

    height, width = imread(str(tmp_path / "tall.png")).shape[:2]
    assert width == 1000 and height >= 240 * 20  # about 20 pixels per layer: labels do not overlap


def test_plan_plot_bars_follow_the_model_and_json_leaves_projected_counts_unknown(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import prunerecipe.plots

    seen: list[list[str]] = []
    monkeypatch.setattr(prunerecipe.plots, "sparsity_chart", lambda path, rows, **kw: seen.append([name for name, _ in rows]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\nmodel: prunerecipe.zoo:LeNet\nsteps:\n"
        "  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.3, scope: global}\n"
        "  - {select: {types: [Conv2d, Linear]}, method: l1_unstructured, sparsity: 0.5}\n"
    )
    done = run("plan", str(recipe), "--plot", str(tmp_path / "p.png"))
    assert done.exit_code == 0, done.output
    assert seen == [["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight"]]  # not step order
    # what the text shows as "?" (a sparsity step after a global one, on the meta device: it
    # depends on the cut) is null in the JSON, not a projection presented as a count
    import torch

    from prunerecipe import load_recipe, plan_recipe
    from prunerecipe.zoo import LeNet

    with torch.device("meta"):
        model = LeNet()
    plan = plan_recipe(model, load_recipe(recipe))
    rows = [line.split() for line in str(plan).splitlines() if line.strip().startswith("fc")][3:]
    assert [r[5] for r in rows] == ["?", "?", "?"], str(plan)
    second = plan.to_dict()["steps"][1]["targets"]
    assert [t["to_prune"] for t in second if t["name"].startswith("fc")] == [None, None, None]


def test_plan_refuses_nan_weights_as_apply_does(tmp_path):
    import torch

    from prunerecipe.zoo import LeNet

    sd = LeNet().state_dict()
    sd["fc1.weight"][0, :5] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    recipe = str(ROOT / "recipes" / "lenet-global-l1.yaml")
    for command in (["plan", recipe], ["apply", recipe, "-o", str(tmp_path / "o.pt")]):
        done = run(*command, "--weights", str(tmp_path / "nan.pt"))
        assert done.exit_code == 1 and "fc1.weight has 5 NaN" in done.output, done.output
    assert not (tmp_path / "o.pt").exists()


def test_plan_of_a_training_only_recipe_says_apply_refuses_it():
    done = run("plan", str(ROOT / "recipes" / "digits-gradual.yaml"))
    assert done.exit_code == 0 and "every step has a schedule" in done.output and "apply refuses it" in done.output
    assert run("apply", str(ROOT / "recipes" / "digits-gradual.yaml"), "-o", "/nonexistent/x.pt").exit_code != 0


def test_a_recipe_s_own_model_key_is_located_when_it_fails(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nmodel: mymodel.py:broken\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n")
    done = run("plan", str(recipe), "--json")
    assert done.exit_code == 1
    (problem,) = json.loads(done.output)
    assert (problem["file"], problem["line"], problem["col"], problem["path"], problem["code"]) == (str(recipe), 2, 8, "model", "model")
    assert f"{recipe}:2:8: model: " in run("plan", str(recipe)).output


def test_long_values_are_shown_cut_in_messages_but_paths_whole(tmp_path):
    from prunerecipe import RecipeError, parse_recipe

    for text in (
        "version: 1\nsteps:\n  - {select: {types: [Linear]}, method: %s, amount: 0.5}\n" % ("x" * 3000),
        "version: 1\n%s: 1\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n" % ("k" * 1000),
        "version: 1\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: '${%s}'}\n" % ("v" * 2000),
    ):
        with pytest.raises(RecipeError) as info:
            parse_recipe(text)
        assert all(len(str(p)) < 600 for p in info.value.problems), str(info.value)[:200]
    deep = tmp_path.joinpath(*["d" * 60] * 4) / "missing.pt"
    done = run("report", "--weights", str(deep))
    assert done.exit_code != 0 and str(deep) in done.output


def test_report_on_a_safetensors_file_lists_numbered_tensors_in_number_order(tmp_path):
    # safetensors keeps its keys sorted as strings (1, 10, 11, 2, ...); masked pairs stay one row
    from safetensors.torch import save_file
    from torch import nn

    from prunerecipe import apply_recipe, parse_recipe

    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)])
    apply_recipe(model, parse_recipe("version: 1\nsteps:\n  - {select: {names: ['1', '10']}, method: l1_unstructured, amount: 0.5}\n"))
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    data = json.loads(run("report", "--weights", str(path), "--json").output)
    names = [t["name"] for t in data["tensors"]]
    assert names == [f"{i}.{p}" for i in range(12) for p in ("bias", "weight")]
    assert [t["masked"] for t in data["tensors"] if t["name"] in ("1.weight", "2.weight", "10.weight")] == [True, False, True]
