"""The command line, through click's runner and through the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from prunerecipe.cli import cli
from prunerecipe.zoo import LeNet

from .conftest import ROOT, make_lenet

GLOBAL = str(ROOT / "recipes/lenet-global-l1.yaml")
SEED = str(ROOT / "recipes/lenet-seed-conv1.yaml")


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def half(tmp_path: Path) -> Path:
    path = tmp_path / "half.yaml"
    path.write_text(
        textwrap.dedent("""
        version: 1
        model: prunerecipe.zoo:LeNet
        vars: {amount: 0.5}
        steps:
          - {select: {types: [Linear]}, method: l1_unstructured, amount: "${amount}"}
    """)
    )
    return path


def test_apply_then_report(tmp_path):
    out = tmp_path / "pruned.pt"
    result = run("apply", GLOBAL, "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "global: 59838 entries, sparsity 0.00% -> 20.00%" in result.output
    assert f"wrote {out}" in result.output
    state = torch.load(out, weights_only=True)
    assert "fc1.weight_orig" in state and "fc1.weight_mask" in state

    rep = run("report", "--weights", str(out), "--json")
    assert rep.exit_code == 0, rep.output
    data = json.loads(rep.output)
    assert data["pruned"] is True
    weights = [t for t in data["tensors"] if t["name"].endswith("weight")]
    assert sum(t["zeros"] for t in weights) == round(0.2 * 59838)

    table = run("report", "--model", "prunerecipe.zoo:LeNet", "--weights", str(out))
    assert table.exit_code == 0 and "carry masks" in table.output
    assert next(line for line in table.output.splitlines() if line.startswith("fc1.weight")).split()[1] == "Linear"


def test_apply_twice_through_a_checkpoint_continues_pruning(tmp_path, half):
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    assert run("apply", str(half), "-o", str(first)).exit_code == 0
    result = run("apply", str(half), "--weights", str(first), "-o", str(second), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    fc1 = next(t for t in report["targets"] if t["name"] == "fc1.weight")
    assert fc1["sparsity_before"] == 0.5 and fc1["sparsity_after"] == 0.75

    state = torch.load(second, weights_only=True)
    assert float((state["fc1.weight_mask"] == 0).float().mean()) == 0.75


def test_set_overrides_vars_and_finalize_folds_masks(tmp_path, half):
    out = tmp_path / "final.pt"
    result = run("apply", str(half), "--set", "amount=0.25", "--finalize", "-o", str(out))
    assert result.exit_code == 0, result.output
    state = torch.load(out, weights_only=True)
    assert not any(k.endswith(("_orig", "_mask")) for k in state)
    assert float((state["fc2.weight"] == 0).float().mean()) == pytest.approx(0.25, abs=1e-3)
    rep = run("report", "--weights", str(out))
    assert "no masks (dense or finalized)" in rep.output


def test_plan_writes_nothing_and_shows_targets(tmp_path):
    before = files(tmp_path)
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = run("plan", SEED)
    finally:
        os.chdir(old)
    assert result.exit_code == 0, result.output
    assert files(tmp_path) == before
    assert "conv1.weight  Conv2d  6x1x3x3  6 slices (dim 0)  3" in result.output
    data = json.loads(run("plan", SEED, "--json").output)
    assert [s["targets"][0]["to_prune"] for s in data["steps"]] == [16, 3, 3]


def test_validate_many_files_reports_all_errors(tmp_path):
    bad = ROOT / "tests/cases/load/bad-args.yaml"
    result = CliRunner().invoke(cli, ["validate", GLOBAL, str(bad), str(ROOT / "tests/cases/load/unknown-method.yaml")])
    assert result.exit_code == 1
    assert f"{GLOBAL}: ok" in result.stdout
    assert result.stderr.count("bad-args.yaml:") == 6 and "unknown-method.yaml:4:13" in result.stderr
    assert "2 of 3 recipe(s) invalid" in result.stderr
    assert run("validate", *sorted(str(p) for p in (ROOT / "recipes").glob("*.yaml"))).exit_code == 0


def test_methods_and_schema():
    result = run("methods")
    assert result.exit_code == 0 and "ln_structured" in result.output and "built-in" in result.output
    rows = json.loads(run("methods", "--json").output)
    assert {r["name"]: r["type"] for r in rows}["random_structured"] == "structured"
    schema = json.loads(run("schema").output)
    assert schema["$schema"].endswith("2020-12/schema")


# --- bad input: exit 1, a clear message, nothing written, nothing changed -----------------------


def assert_clean_failure(result, tmp_path, before, *needles):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output
    assert files(tmp_path) == before


def test_invalid_recipe(tmp_path):
    (tmp_path / "in.txt").write_text("x")
    before = files(tmp_path)
    result = CliRunner().invoke(
        cli, ["apply", str(ROOT / "tests/cases/load/amount-above-one.yaml"), "--model", "prunerecipe.zoo:LeNet", "-o", str(tmp_path / "o.pt")]
    )
    assert_clean_failure(result, tmp_path, before, "amount-above-one.yaml:8:13: steps[1].amount: 1.5 is greater than the maximum of 1")


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("no_such_pkg.models:Net", "cannot import module 'no_such_pkg.models'"),
        ("prunerecipe.zoo:LeNett", "has no attribute 'LeNett' (did you mean 'LeNet'?)"),
        ("prunerecipe.zoo:F", "'F' is a module, not an nn.Module or a factory"),
        ("json:dumps", "calling dumps() raised TypeError"),
        ("missing_file.py:build", "no such file 'missing_file.py'"),
        ("not a spec", "is not 'pkg.module:attr'"),
    ],
)
def test_bad_model_specs(tmp_path, spec, needle):
    before = files(tmp_path)
    result = CliRunner().invoke(cli, ["apply", GLOBAL, "--model", spec, "-o", str(tmp_path / "o.pt")])
    assert_clean_failure(result, tmp_path, before, needle)


def test_model_spec_that_is_not_a_module(tmp_path):
    (tmp_path / "notmodel.py").write_text("def build():\n    return 42\nVALUE = 3\n")
    before = files(tmp_path)
    for spec, needle in (
        (f"{tmp_path}/notmodel.py:build", "build() returned a int, not an nn.Module"),
        (f"{tmp_path}/notmodel.py:VALUE", "is a int, not an nn.Module"),
    ):
        result = CliRunner().invoke(cli, ["apply", GLOBAL, "--model", spec, "-o", str(tmp_path / "o.pt")])
        assert_clean_failure(result, tmp_path, before, needle)


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv1.weight": torch.zeros(6, 1, 3, 3), "extra.weight": torch.zeros(2)}, wrong)
    before = files(tmp_path)
    result = CliRunner().invoke(cli, ["apply", GLOBAL, "--weights", str(wrong), "-o", str(tmp_path / "o.pt")])
    assert_clean_failure(
        result, tmp_path, before, "checkpoint does not fit the model", "missing from the checkpoint: conv1.bias", "not in the model: extra.weight"
    )
    shaped = tmp_path / "shape.pt"
    state = LeNet().state_dict()
    state["fc3.weight"] = torch.zeros(3, 3)
    torch.save(state, shaped)
    before = files(tmp_path)
    result = CliRunner().invoke(cli, ["apply", GLOBAL, "--weights", str(shaped), "-o", str(tmp_path / "o.pt")])
    assert_clean_failure(result, tmp_path, before, "shape mismatch: fc3.weight: checkpoint (3, 3) vs model (10, 84)")


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {EVIL_MARKER}",))


EVIL_MARKER = "/tmp/prunerecipe-evil-marker"


def test_hostile_pickle_is_refused_and_nothing_runs(tmp_path):
    if os.path.exists(EVIL_MARKER):
        os.unlink(EVIL_MARKER)
    evil = tmp_path / "evil.pt"
    torch.save({"conv1.weight": Evil()}, evil)
    before = files(tmp_path)
    result = CliRunner().invoke(cli, ["apply", GLOBAL, "--weights", str(evil), "-o", str(tmp_path / "o.pt")])
    assert_clean_failure(result, tmp_path, before, "refused to load", "Nothing in it was run")
    assert not os.path.exists(EVIL_MARKER)
    result = CliRunner().invoke(cli, ["report", "--weights", str(evil)])
    assert result.exit_code == 1 and not os.path.exists(EVIL_MARKER)


def test_truncated_checkpoint(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(LeNet().state_dict(), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    before = files(tmp_path)
    result = CliRunner().invoke(cli, ["report", "--weights", str(cut)])
    assert_clean_failure(result, tmp_path, before, "not a readable torch checkpoint")


def test_missing_files(tmp_path):
    before = files(tmp_path)
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "o.pt")])
    assert_clean_failure(result, tmp_path, before, "nope.yaml: (root): no such recipe file")
    result = CliRunner().invoke(cli, ["apply", GLOBAL, "--weights", str(tmp_path / "w.pt"), "-o", str(tmp_path / "o.pt")])
    assert_clean_failure(result, tmp_path, before, "w.pt: no such file")


def test_existing_output_and_input_are_never_overwritten_without_force(tmp_path, half):
    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    before = files(tmp_path)
    result = CliRunner().invoke(cli, ["apply", str(half), "-o", str(out)])
    assert_clean_failure(result, tmp_path, before, "already exists; refusing to overwrite it (use --force)")

    ckpt = tmp_path / "ckpt.pt"
    assert run("apply", str(half), "-o", str(ckpt)).exit_code == 0
    before = files(tmp_path)
    result = CliRunner().invoke(cli, ["apply", str(half), "--weights", str(ckpt), "-o", str(ckpt)])
    assert_clean_failure(result, tmp_path, before, "already exists")
    assert run("apply", str(half), "--weights", str(ckpt), "-o", str(ckpt), "--force").exit_code == 0
    assert float((torch.load(ckpt, weights_only=True)["fc1.weight_mask"] == 0).float().mean()) == 0.75
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_failed_apply_writes_no_output(tmp_path):
    recipe = tmp_path / "toomuch.yaml"
    recipe.write_text(
        "version: 1\nmodel: prunerecipe.zoo:LeNet\nsteps:\n  - {select: {names: [conv1]}, params: [bias], method: l1_unstructured, amount: 60}\n"
    )
    before = files(tmp_path)
    result = CliRunner().invoke(cli, ["apply", str(recipe), "-o", str(tmp_path / "o.pt")])
    assert_clean_failure(result, tmp_path, before, "toomuch.yaml:4:81: steps[0].amount: amount 60 is more than the 6 unpruned entries of conv1.bias")


def test_usage_errors_exit_2(tmp_path):
    assert CliRunner().invoke(cli, ["apply", GLOBAL]).exit_code == 2  # no --output
    result = CliRunner().invoke(cli, ["apply", GLOBAL, "-o", str(tmp_path / "o.pt"), "--set", "novalue"])
    assert result.exit_code == 2 and "is not NAME=VALUE" in result.output
    no_model = tmp_path / "nomodel.yaml"
    no_model.write_text("version: 1\nsteps:\n  - {select: {}, method: identity}\n")
    result = CliRunner().invoke(cli, ["plan", str(no_model)])
    assert result.exit_code == 2 and "no model: pass --model SPEC" in result.output
    assert CliRunner().invoke(cli, ["frobnicate"]).exit_code == 2
    assert files(tmp_path) == {"nomodel.yaml": no_model.read_bytes()}


def test_debug_shows_the_traceback():
    result = CliRunner().invoke(cli, ["--debug", "plan", GLOBAL, "--model", "prunerecipe.zoo:Nope"])
    assert result.exit_code == 1 and result.exc_info is not None
    assert "ModelSpecError" in repr(result.exc_info[1])


def test_safetensors_and_data_parallel_checkpoints(tmp_path, half):
    pytest.importorskip("safetensors")
    dense = tmp_path / "dense.safetensors"
    model = make_lenet()
    wrapped = torch.nn.DataParallel(model)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in wrapped.state_dict().items()}, dense)
    out = tmp_path / "pruned.safetensors"
    result = CliRunner().invoke(cli, ["apply", str(half), "--weights", str(dense), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "removed the key prefix 'module.'" in result.stderr
    from safetensors.torch import load_file

    state = load_file(out)
    assert torch.equal(state["fc1.weight_orig"], model.fc1.weight.detach())
    assert float((state["fc1.weight_mask"] == 0).float().mean()) == 0.5


# --- through the installed console script --------------------------------------------------------


def test_console_script_end_to_end(tmp_path):
    exe = shutil.which("prunerecipe")
    assert exe, "the prunerecipe console script is not installed (pip install -e .)"
    out = tmp_path / "p.pt"
    done = subprocess.run([exe, "apply", SEED, "-o", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "conv1.bias" in done.stdout and out.exists()
    again = subprocess.run([sys.executable, "-m", "prunerecipe", "apply", SEED, "-o", str(out)], capture_output=True, text=True)
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr
    version = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert version.stdout.startswith("prunerecipe ")
    bad = subprocess.run([exe, "validate", str(ROOT / "tests/cases/load/yaml-syntax.yaml")], capture_output=True, text=True)
    assert bad.returncode == 1 and "yaml-syntax.yaml:4:5: (root): invalid YAML" in bad.stderr


def test_transformers_model_from_a_file_factory(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "tiny_gpt2.py").write_text(
        textwrap.dedent("""
        import torch
        import transformers

        def build():
            torch.manual_seed(0)
            config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0)
            return transformers.GPT2LMHeadModel(config)
    """)
    )
    recipe = tmp_path / "gpt2.yaml"
    recipe.write_text(
        textwrap.dedent("""
        version: 1
        model: tiny_gpt2.py:build
        steps:
          - select: {types: [transformers.pytorch_utils.Conv1D]}
            method: l1_unstructured
            sparsity: 0.5
            scope: global
    """)
    )
    exe = shutil.which("prunerecipe")
    done = subprocess.run([exe, "apply", "gpt2.yaml", "-o", "out.pt", "--json"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [t["name"] for t in report["targets"]] == [f"transformer.h.0.{m}.weight" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert report["global"]["sparsity_after"] == pytest.approx(0.5, abs=1e-6)


def test_set_values_are_plain_yaml_data(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\nmodel: prunerecipe.zoo:LeNet\nname: ${tag}\nvars: {tag: x, a: 0.1}\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: '${a}'}\n"
    )
    assert run("validate", str(recipe), "--set", "tag=2020-01-01").exit_code == 0  # dates stay strings
    result = CliRunner().invoke(cli, ["validate", str(recipe), "--set", "a=!!int x"])
    assert result.exit_code == 2 and "value of 'a': 'x' is not a valid !!int" in result.output
    result = CliRunner().invoke(cli, ["validate", str(recipe), "--set", "a=!!python/name:os.system"])
    assert result.exit_code == 2 and "not allowed" in result.output


def test_a_model_file_that_exits_is_an_error_not_an_exit(tmp_path):
    (tmp_path / "quits.py").write_text("import sys\nsys.exit(7)\n")
    before = files(tmp_path)
    result = CliRunner().invoke(cli, ["plan", GLOBAL, "--model", f"{tmp_path}/quits.py:build"])
    assert_clean_failure(result, tmp_path, before, "importing", "raised SystemExit: 7")


@pytest.mark.parametrize("where", ["import", "factory"])
def test_sigterm_while_the_model_spec_runs_exits_143_and_does_not_blame_the_model(tmp_path, where):
    """The SIGTERM handler's exit is a stop, not an error of the code that happened to run: a
    model module being imported or its factory being called."""
    body = "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(5)\n"
    (tmp_path / "slowmod.py").write_text(
        "import os, signal, time\nfrom torch import nn\n"
        + (body if where == "import" else "")
        + "def build():\n"
        + textwrap.indent(body if where == "factory" else "pass\n", "    ")
        + "    return nn.Sequential(nn.Linear(4, 4))\n"
    )
    (tmp_path / "r.yaml").write_text(
        "version: 1\nmodel: slowmod:build\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n"
    )
    code = "import sys\nfrom prunerecipe.cli import main\nmain(sys.argv[1:])\n"
    done = subprocess.run([sys.executable, "-c", code, "apply", "r.yaml", "-o", "out.pt"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 143, done.stderr
    assert "terminated (SIGTERM)" in done.stderr
    assert "model spec" not in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out.pt").exists()
