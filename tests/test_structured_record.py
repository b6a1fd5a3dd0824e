"""Compacted checkpoints reload into freshly built models: the compaction record, through
load_pruned_state_dict, the CLI's --weights and report --model, and its refusals."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from prunerecipe import CheckpointError, apply_recipe, load_pruned_state_dict, parse_recipe, read_state_dict, save_state_dict
from prunerecipe.cli import cli
from prunerecipe.structured import record

from .test_structured import GROUP, X, resnet

pytest.importorskip("torch_pruning")

COMPACT = GROUP.replace("steps:", "finalize: compact\nsteps:")


def compacted() -> torch.nn.Module:
    model = resnet()
    apply_recipe(model, parse_recipe(COMPACT))
    return model


def out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_compacted_checkpoint_loads_into_a_fresh_model(tmp_path, suffix):
    model = compacted()
    path = tmp_path / f"small{suffix}"
    save_state_dict(model.state_dict(), path)
    fresh = resnet(seed=9)
    assert load_pruned_state_dict(fresh, read_state_dict(path)) == []
    assert fresh.conv1.out_channels == 2 and fresh.fc.in_features == 16
    assert torch.equal(out(fresh), out(model))
    assert record.current(fresh) == record.current(model)  # it carries the record on: saving it again keeps it
    load_pruned_state_dict(fresh, read_state_dict(path))  # and loading into it again needs no shrinking


def test_the_record_is_json_of_removed_channels_per_layer():
    model = compacted()
    data = record.current(model)
    assert data["format"] == "prunerecipe-compaction" and data["version"] == 1
    conv = data["modules"]["layer1.0.conv1"]
    assert conv["type"] == "Conv2d" and conv["out"]["size"] == 4 and len(conv["out"]["removed"]) == 2 and len(conv["in"]["removed"]) == 2
    assert data["modules"]["fc"] == {"type": "Linear", "in": {"size": 32, "removed": data["modules"]["fc"]["in"]["removed"]}}
    raw = model.state_dict()[record.RECORD_KEY]
    assert raw.dtype == torch.uint8 and json.loads(bytes(raw.tolist()).decode()) == data


def test_a_record_that_does_not_fit_is_refused_and_changes_nothing():
    from prunerecipe.zoo import LeNet

    state = compacted().state_dict()
    lenet = LeNet()
    before = {k: v.clone() for k, v in lenet.state_dict().items()}
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint does not fit the model: its compaction record names: bn1: no such module, conv1: 6 output channels, the record says 4 before compaction",
    ):
        load_pruned_state_dict(lenet, state)
    wide = resnet()
    wide.fc = torch.nn.Linear(64, 10)
    with pytest.raises(CheckpointError, match=r"fc: 64 input channels, the record says 32 before compaction"):
        load_pruned_state_dict(wide, state)
    assert all(torch.equal(lenet.state_dict()[k], v) for k, v in before.items())


def test_a_load_that_fails_after_shrinking_puts_the_fresh_model_back():
    state = dict(compacted().state_dict())
    del state["fc.bias"]
    fresh = resnet()
    shapes = {k: v.shape for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match="missing from the checkpoint: fc.bias"):
        load_pruned_state_dict(fresh, state)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == shapes
    assert record.RECORD_KEY not in fresh.state_dict()


def test_a_tampered_record_is_refused():
    state = dict(compacted().state_dict())
    state[record.RECORD_KEY] = torch.tensor(list(b'{"format": "other"}'), dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="__prunerecipe_compaction__ is unreadable: not a prunerecipe compaction record"):
        load_pruned_state_dict(resnet(), state)


def test_a_data_parallel_prefix_is_fine():
    model = compacted()
    state = {"module." + k: v for k, v in model.state_dict().items()}
    fresh = resnet()
    load_pruned_state_dict(fresh, state)
    assert torch.equal(out(fresh), out(model))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "nets.py").write_text(
        textwrap.dedent("""
        from tests.test_structured import resnet

        def build():
            return resnet()
    """)
    )
    (tmp_path / "channels.yaml").write_text(GROUP.replace("version: 1", "version: 1\nmodel: nets.py:build"))
    return tmp_path


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_cli_apply_compact_then_weights_and_report(project, monkeypatch):
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    done = run("apply", "channels.yaml", "--compact", "-o", "small.pt")
    assert done.exit_code == 0, done.output
    assert "compacted: 12 group(s), 90 of 180 channels removed" in done.output
    masked = resnet()
    apply_recipe(masked, parse_recipe(GROUP))
    small = torch.load(project / "small.pt", weights_only=True)
    assert small["conv1.weight"].shape == (2, 3, 7, 7) and record.RECORD_KEY in small

    rep = run("report", "--model", "nets.py:build", "--weights", "small.pt", "--json")
    assert rep.exit_code == 0, rep.output
    rows = {t["name"]: t for t in json.loads(rep.output)["tensors"]}
    assert rows["conv1.weight"]["shape"] == [2, 3, 7, 7] and rows["fc.weight"]["shape"] == [10, 16]

    again = run("plan", "channels.yaml", "--weights", "small.pt")  # a compacted model plans and prunes on
    assert again.exit_code == 0, again.output
    assert "1      conv1           2         0       1" in again.output

    from prunerecipe.checkpoint import load_pruned_state_dict as load

    fresh = resnet()
    load(fresh, small)
    assert torch.allclose(out(fresh), out(masked), atol=1e-5 * float(out(masked).abs().max()), rtol=0)


def test_cli_compaction_failure_is_a_plain_error(project, monkeypatch):
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    (project / "per-layer.yaml").write_text(
        (project / "channels.yaml").read_text().replace("    scope: group\n", "").replace("args: {n: 2}", "args: {n: 2, dim: 0}")
    )
    done = CliRunner().invoke(cli, ["apply", "per-layer.yaml", "--compact", "-o", "small.pt"])
    assert done.exit_code == 1
    assert "finalize: cannot compact: the group of conv1" in done.output and "Traceback" not in done.output
    assert not (project / "small.pt").exists()


@pytest.mark.slow
def test_the_example_recipes_end_to_end_from_the_cli(tmp_path):
    """Done-when of issue 15: both recipes run from the CLI, and what they write reloads into
    freshly built models (ResNet-18 from the zoo; the Llama also through plain
    from_pretrained) with the masked model's outputs."""
    from prunerecipe.modelspec import load_model
    from prunerecipe.zoo import resnet18, tiny_llama

    from .conftest import ROOT

    resnet_recipe = ROOT / "recipes/resnet18-group-compact.yaml"
    torch.manual_seed(0)
    done = run("apply", str(resnet_recipe), "-o", str(tmp_path / "r18.pt"))
    assert done.exit_code == 0, done.output
    torch.manual_seed(0)
    masked = resnet18().eval()
    apply_recipe(masked, parse_recipe(resnet_recipe.read_text().replace("finalize: compact", "finalize: false")))
    fresh = resnet18().eval()
    load_pruned_state_dict(fresh, read_state_dict(tmp_path / "r18.pt"))
    image = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = masked(image), fresh(image)
    assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()), rtol=0)
    assert sum(p.numel() for p in fresh.parameters()) < 0.3 * sum(p.numel() for p in masked.parameters())

    pytest.importorskip("transformers")
    llama_recipe = ROOT / "recipes/llama-mlp-compact.yaml"
    done = run("apply", str(llama_recipe), "-o", str(tmp_path / "llama.safetensors"))
    assert done.exit_code == 0, done.output
    masked = tiny_llama()
    apply_recipe(masked, parse_recipe(llama_recipe.read_text().replace("finalize: compact", "finalize: false")))
    fresh = load_model("prunerecipe.zoo:tiny_llama")
    load_pruned_state_dict(fresh, read_state_dict(tmp_path / "llama.safetensors"))
    fresh.save_pretrained(tmp_path / "hf")
    import transformers
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf/model.safetensors"), "pt") as f:
        assert record.RECORD_KEY not in list(f.keys())

    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = masked(ids).logits, again(ids).logits
    assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()), rtol=0)

    # --format hf: the config describes the new widths, so the folder holds no record and
    # from_pretrained loads it with nothing missing or unexpected
    done = run("apply", str(llama_recipe), "--format", "hf", "-o", str(tmp_path / "llama-hf"))
    assert done.exit_code == 0, done.output
    assert "from_pretrained" in done.output.strip().splitlines()[-1]
    again, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama-hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, want, atol=1e-5 * float(want.abs().max()), rtol=0)

    # one layer compacted, the other not: no config describes that, so hf is refused with the way out
    one_layer = llama_recipe.read_text().replace("model.layers.*.mlp", "model.layers.0.mlp")
    (tmp_path / "one.yaml").write_text(one_layer)
    done = run("apply", str(tmp_path / "one.yaml"), "--format", "hf", "-o", str(tmp_path / "one-hf"))
    assert done.exit_code == 1 and "no longer match what its config describes" in done.output and "--format dense" in done.output
    assert not (tmp_path / "one-hf").exists()
