"""Outputs and checkpoints as a careful user would try them (found in review): --force never
deletes what it should not, write failures are named, tied names must agree, --strip-prefix
without its dot, code-carrying pickles of every format named as such, JSON errors as a list."""

from __future__ import annotations

import builtins
import json
import os
import pickle

import pytest
import torch
from click.testing import CliRunner

from prunerecipe.cli import cli

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

RECIPE = "version: 1\nsteps:\n  - {select: {types: [Conv1D]}, method: l1_unstructured, amount: 0.5, scope: global}\n"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    path = tmp_path_factory.mktemp("gpt2") / "model"
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return path


def test_force_never_deletes_a_folder_holding_an_input(tmp_path, folder, recipe):
    import shutil

    project = tmp_path / "proj"
    shutil.copytree(folder, project / "model")
    (project / "notes.txt").write_text("mine")
    done = run("apply", recipe, "--model", project / "model", "-o", project, "--force")
    assert done.exit_code == 1 and "an input of this run" in done.output
    assert (project / "notes.txt").read_text() == "mine" and (project / "model" / "config.json").exists()


def test_force_replaces_model_folders_only(tmp_path, folder, recipe):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    done = run("apply", recipe, "--model", folder, "-o", other, "--force")
    assert done.exit_code == 1 and "not a model folder (it holds notes.txt)" in done.output
    assert (other / "notes.txt").read_text() == "mine"
    out = tmp_path / "out"
    assert run("apply", recipe, "--model", folder, "-o", out).exit_code == 0
    assert run("apply", recipe, "--model", folder, "-o", out, "--force").exit_code == 0  # a model folder it wrote
    (tmp_path / "empty").mkdir()
    assert run("apply", recipe, "--model", folder, "-o", tmp_path / "empty", "--force").exit_code == 0


def test_force_onto_a_symlinked_folder_leaves_no_temp_entry(tmp_path, folder, recipe):
    target = tmp_path / "target"
    assert run("apply", recipe, "--model", folder, "-o", target).exit_code == 0
    (tmp_path / "link").symlink_to(target)
    done = run("apply", recipe, "--model", folder, "-o", tmp_path / "link", "--force")
    assert done.exit_code == 0, done.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prunerecipe-")]
    assert (target / "config.json").exists()  # what the link pointed to is left alone


def test_write_failures_of_every_writer_name_the_output(tmp_path, folder, recipe, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    done = run("apply", recipe, "--model", folder, "-o", tmp_path / "hf", "--json")
    assert done.exit_code == 1
    (problem,) = json.loads(done.output)
    assert problem["file"] == str(tmp_path / "hf") and problem["message"] == "cannot write it: No space left on device"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prunerecipe-")]

    def torch_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 304896 vs 304784")

    monkeypatch.setattr(torch, "save", torch_full)
    done = run("apply", recipe, "--model", folder, "--format", "torch", "-o", tmp_path / "t.pt")
    assert done.exit_code == 1 and "t.pt: cannot write it: RuntimeError: [enforce fail" in done.output
    assert not (tmp_path / "t.pt").exists()


def test_tied_names_holding_different_values_are_refused(tmp_path, folder, recipe):
    import shutil

    from safetensors.torch import load_file, save_file

    untied = tmp_path / "untied"
    shutil.copytree(folder, untied)
    state = load_file(untied / "model.safetensors")
    state["lm_head.weight"] = torch.zeros_like(state["transformer.wte.weight"])
    save_file(state, untied / "model.safetensors", metadata={"format": "pt"})
    done = run("apply", recipe, "--model", untied, "-o", tmp_path / "o")
    assert done.exit_code == 1
    assert "transformer.wte.weight and lm_head.weight are one tensor in the model (tied)" in done.output
    assert not (tmp_path / "o").exists()


def test_strip_prefix_without_its_dot(tmp_path):
    from prunerecipe.zoo import LeNet

    torch.manual_seed(0)
    state = {"net." + k: v for k, v in LeNet().state_dict().items()}
    torch.save(state, tmp_path / "w.pt")
    for extra in ([], ["--model", "prunerecipe.zoo:LeNet"]):
        done = run("report", "--weights", tmp_path / "w.pt", "--strip-prefix", "net", "--json", *extra)
        assert done.exit_code == 0, done.output
        names = [row["name"] for row in json.loads(done.output)["tensors"]]
        assert "conv1.weight" in names and not any(n.startswith("net") or n.startswith(".") for n in names)


class _System:
    def __reduce__(self):
        return (os.system, ("echo never",))


class _Exec:
    def __reduce__(self):
        return (builtins.exec, ("print('never')",))


def test_pickles_that_reference_code_are_named_so_in_every_format(tmp_path):
    torch.save({"x": _System(), "w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with open(tmp_path / "raw.pt", "wb") as fh:
        pickle.dump({"x": _Exec()}, fh, protocol=4)
    for name, code in (("legacy.pt", "system"), ("raw.pt", "builtins.exec")):
        done = run("report", "--weights", tmp_path / name)
        assert done.exit_code == 1 and "refused to load: the file references code" in done.output and code in done.output


def test_plan_says_when_weights_hold_zeros_no_mask_covers(tmp_path):
    from prunerecipe.zoo import LeNet

    torch.manual_seed(0)
    model = LeNet()
    with torch.no_grad():
        model.fc1.weight[:10] = 0
    torch.save(model.state_dict(), tmp_path / "d.pt")
    (tmp_path / "r.yaml").write_text("version: 1\nsteps:\n  - {select: {names: [fc1]}, method: l1_unstructured, amount: 0.2}\n")
    done = run("plan", tmp_path / "r.yaml", "--model", "prunerecipe.zoo:LeNet", "--weights", tmp_path / "d.pt")
    assert done.exit_code == 0 and "the weights already hold 4000 zero entries that no mask covers" in done.output
    done = run("plan", tmp_path / "r.yaml", "--model", "prunerecipe.zoo:LeNet", "--weights", tmp_path / "d.pt", "--json")
    assert json.loads(done.output)["unmasked_zeros"] == 4000


def test_usage_mistakes_are_reported_first(tmp_path, folder, recipe):
    done = run("apply", recipe, "--model", tmp_path / "missing", "-o", tmp_path / "out")
    assert done.exit_code == 1 and "is not 'pkg.module:attr'" in done.output
    done = run("apply", recipe, "--model", folder, "--format", "dense", "-o", tmp_path / "d.safetensors", "--max-shard-size", "1MB")
    assert done.exit_code == 2 and "--max-shard-size sets the shard size of --format hf" in done.output


def test_a_tensor_in_two_shards_is_refused_in_memory_and_streaming(tmp_path):
    from safetensors.torch import save_file

    from prunerecipe import read_state_dict
    from prunerecipe.errors import CheckpointError

    a, b = torch.ones(4), torch.zeros(4)
    save_file({"x": a, "y": a.clone()}, tmp_path / "s1.safetensors")
    save_file({"x": b}, tmp_path / "s2.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "s2.safetensors", "y": "s1.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"tensors stored in two shards: x \(s1.safetensors, s2.safetensors\)"):
        read_state_dict(str(index))
    from prunerecipe.stream.format import Source

    with pytest.raises(CheckpointError, match="tensors stored in two shards"):
        Source(str(index))


def test_sparse_tensors_in_a_checkpoint_are_named(tmp_path):
    from prunerecipe import read_state_dict
    from prunerecipe.errors import CheckpointError

    torch.save({"w": torch.eye(3).to_sparse()}, tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match=r"not dense .*w \(sparse_coo\)"):
        read_state_dict(str(tmp_path / "s.pt"))


def test_raw_tensor_bytes_after_a_legacy_pickle_are_not_taken_for_code(tmp_path):
    import numpy as np

    from prunerecipe import read_state_dict
    from prunerecipe.errors import CheckpointError

    torch.save({"w": torch.full((99,), 10, dtype=torch.uint8), "meta": np.arange(3)}, tmp_path / "l.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(str(tmp_path / "l.pt"))
    assert "references code" not in str(err.value)
    assert "holds numpy data (numpy" in str(err.value) and "torch.from_numpy" in str(err.value)


def test_write_output_gives_a_folder_from_pretrained_loads_as_the_masked_model(tmp_path):
    from prunerecipe import apply_recipe, parse_recipe, write_output

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    apply_recipe(model, parse_recipe(RECIPE))
    line = write_output(model, str(tmp_path / "out"), fmt="hf")
    assert "from_pretrained" in line
    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values())
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits)
