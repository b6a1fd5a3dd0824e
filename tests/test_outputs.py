"""Outputs as users expect: permissions from the umask (kept on --force), the location checked
before any work, long names, formats by suffix, and a closed pipe ending quietly."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from prunerecipe import read_state_dict
from prunerecipe.cli import cli
from prunerecipe.zoo import LeNet

from .conftest import ROOT

RECIPE = str(ROOT / "recipes" / "lenet-global-l1.yaml")


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_outputs_get_the_mode_open_would_give_and_force_keeps_a_replaced_files_mode(tmp_path, umask_022):
    runner = CliRunner()
    for name in ("a.pt", "a.safetensors"):
        out = tmp_path / name
        assert runner.invoke(cli, ["apply", RECIPE, "-o", str(out)]).exit_code == 0
        assert mode(out) == 0o644
        os.chmod(out, 0o640)
        assert runner.invoke(cli, ["apply", RECIPE, "-o", str(out), "--force", "--format", "dense"]).exit_code == 0
        assert mode(out) == 0o640
    os.umask(0o027)
    out = tmp_path / "b.pt"
    assert runner.invoke(cli, ["apply", RECIPE, "-o", str(out)]).exit_code == 0
    assert mode(out) == 0o640
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_output_location_is_checked_before_the_model_is_built(tmp_path):
    marker = tmp_path / "built"
    (tmp_path / "model.py").write_text(
        f"import pathlib\nfrom prunerecipe.zoo import LeNet\ndef build():\n    pathlib.Path({str(marker)!r}).write_text('x')\n    return LeNet()\n"
    )
    spec = f"{tmp_path / 'model.py'}:build"
    runner = CliRunner()
    cases = [
        (str(tmp_path / "missing_dir" / "o.pt"), "does not exist"),
        (str(tmp_path / "o.txt"), "unsupported output type '.txt'"),
        (str(tmp_path / "folder.pt"), "already exists as a folder"),
        (RECIPE, "unsupported output type '.yaml'"),
    ]
    (tmp_path / "folder.pt").mkdir()
    if os.path.isdir("/proc"):
        cases.append(("/proc/o.pt", "/proc/o.pt"))
    for out, message in cases:
        done = runner.invoke(cli, ["apply", RECIPE, "--model", spec, "-o", out])
        assert done.exit_code == 1 and message in done.output and ".prunerecipe-" not in done.output, (out, done.output)
        assert not marker.exists(), out
    weights = tmp_path / "w.pt"
    torch.save(LeNet().state_dict(), weights)
    done = runner.invoke(cli, ["apply", RECIPE, "--model", spec, "--weights", str(weights), "-o", str(weights)])
    assert done.exit_code == 1 and "already exists" in done.output and not marker.exists()


def test_a_long_file_name_that_torch_save_accepts_is_accepted(tmp_path):
    name = "x" * 245 + ".pt"  # 248 characters: the temp name beside it must stay shorter
    torch.save({}, tmp_path / name)  # the file system takes it
    (tmp_path / name).unlink()
    done = CliRunner().invoke(cli, ["apply", RECIPE, "-o", str(tmp_path / name)])
    assert done.exit_code == 0, done.output
    assert "conv1.weight_mask" in read_state_dict(tmp_path / name)
    too_long = "y" * 300 + ".pt"
    done = CliRunner().invoke(cli, ["apply", RECIPE, "-o", str(tmp_path / too_long)])
    assert done.exit_code == 1 and "the file name is" in done.output


def test_formats_say_how_to_load_what_they_wrote(tmp_path):
    runner = CliRunner()
    done = runner.invoke(cli, ["apply", RECIPE, "-o", str(tmp_path / "t.pt")])
    assert "load_pruned_state_dict" in done.output.splitlines()[-1]
    done = runner.invoke(cli, ["apply", RECIPE, "--format", "dense", "-o", str(tmp_path / "d.pt")])
    last = done.output.splitlines()[-1]
    assert "dense state_dict" in last and f"torch.load({str(tmp_path / 'd.pt')!r}, weights_only=True)" in last  # the path, ready to paste
    done = runner.invoke(cli, ["apply", RECIPE, "--format", "dense", "-o", str(tmp_path / "d.safetensors")])
    assert f"read_state_dict({str(tmp_path / 'd.safetensors')!r})" in done.output.splitlines()[-1]
    fresh = LeNet()
    fresh.load_state_dict(torch.load(tmp_path / "d.pt", weights_only=True), strict=True)
    assert abs(sum(int((p == 0).sum()) for n, p in fresh.named_parameters() if n.endswith("weight")) / 59838 - 0.2) < 1e-4
    assert os.path.getsize(tmp_path / "d.pt") < os.path.getsize(tmp_path / "t.pt")


def test_a_closed_stdout_pipe_ends_quietly_with_exit_0(tmp_path):
    out = tmp_path / "p.pt"
    assert CliRunner().invoke(cli, ["apply", RECIPE, "-o", str(out)]).exit_code == 0
    code = (
        f"import subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-m', 'prunerecipe', 'report', '--weights', {str(out)!r}], stdout=subprocess.PIPE, stderr=subprocess.PIPE)\n"
        f"p.stdout.readline(); p.stdout.close()\n"
        f"err = p.stderr.read(); rc = p.wait()\n"
        f"print(rc); print(err.decode())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    rc, _, err = done.stdout.partition("\n")
    assert rc.strip() == "0" and "Error" not in err and "error" not in err, done.stdout
