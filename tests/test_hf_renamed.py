"""Checkpoints whose names are not the model's own: since transformers 5, ``from_pretrained``
renames some tensors on loading (GPT-NeoX's ``embed_out`` is ``lm_head``, ViT's attention is
``q_proj``/``k_proj``...) and merges others (Mixtral's per-expert matrices), and
``save_pretrained`` undoes it. Folders saved so go through plan, apply (in memory and
streamed), report and ``load_pruned_state_dict``, and come out in the names
``save_pretrained`` writes, loading back with plain ``from_pretrained`` to the pruned model."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("transformers.conversion_mapping", reason="transformers without checkpoint conversions stores the model's own names")

from safetensors import safe_open  # noqa: E402

from prunerecipe import apply_recipe, load_pruned_state_dict, parse_recipe, read_state_dict  # noqa: E402
from prunerecipe.cli import cli  # noqa: E402
from prunerecipe.modelspec import load_model  # noqa: E402

pytestmark = pytest.mark.slow

STEP = "{select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}"


def neox():
    cfg = transformers.GPTNeoXConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=32
    )
    return transformers.GPTNeoXForCausalLM(cfg), {"input_ids": torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))}


def vit():
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=8)
    return transformers.ViTForImageClassification(cfg), {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}


def mixtral():
    cfg = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=32,
    )
    return transformers.MixtralForCausalLM(cfg), {"input_ids": torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))}


MODELS = {"neox": neox, "vit": vit, "mixtral": mixtral}


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request, tmp_path_factory):
    torch.manual_seed(0)
    model, inputs = MODELS[request.param]()
    folder = tmp_path_factory.mktemp(request.param) / "model"
    model.eval().save_pretrained(folder)
    recipe = folder.parent / "recipe.yaml"
    recipe.write_text(f"version: 1\nsteps:\n  - {STEP}\n")
    return request.param, folder, recipe, inputs


def stored_keys(folder) -> set[str]:
    keys: set[str] = set()
    for name in folder.iterdir():
        if name.suffix == ".safetensors":
            with safe_open(str(name), "pt") as fh:
                keys |= set(fh.keys())
    return keys


def outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits


def test_the_folder_differs_from_the_model_in_names(saved):
    """The premise: plain load_state_dict of this folder would fail."""
    name, folder, _, _ = saved
    model, _ = MODELS[name]()
    assert stored_keys(folder) - set(model.state_dict())


def test_a_folder_loads_as_from_pretrained_loads_it(saved):
    _name, folder, _, inputs = saved
    ours = load_model(str(folder))
    theirs = type(ours).from_pretrained(folder)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    torch.testing.assert_close(outputs(ours, inputs), outputs(theirs, inputs), rtol=0, atol=0)
    # the library path: a freshly built model and the folder's state_dict
    fresh = type(ours)(ours.config)
    load_pruned_state_dict(fresh, read_state_dict(str(folder)))
    torch.testing.assert_close(outputs(fresh, inputs), outputs(theirs, inputs), rtol=0, atol=0)


def test_apply_writes_the_names_save_pretrained_writes(saved, tmp_path):
    _name, folder, recipe, inputs = saved
    out = tmp_path / "pruned"
    done = CliRunner().invoke(cli, ["apply", str(recipe), "--model", str(folder), "-o", str(out), "--format", "hf"])
    assert done.exit_code == 0, done.output
    assert stored_keys(out) == stored_keys(folder)

    expected = load_model(str(folder))
    report = apply_recipe(expected, parse_recipe(recipe.read_text()))
    assert report.targets
    loaded, info = type(expected).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    torch.testing.assert_close(outputs(loaded, inputs), outputs(expected, inputs), rtol=0, atol=1e-6)
    for row in report.targets:
        assert int((loaded.get_parameter(row.name) == 0).sum()) == row.zeros_after, row.name


def test_dense_output_keeps_the_model_names_for_load_state_dict(saved, tmp_path):
    name, folder, recipe, _inputs = saved
    out = tmp_path / "pruned.safetensors"
    done = CliRunner().invoke(cli, ["apply", str(recipe), "--model", str(folder), "-o", str(out), "--format", "dense"])
    assert done.exit_code == 0, done.output
    fresh, _ = MODELS[name]()
    fresh.load_state_dict(read_state_dict(str(out)))  # strict: every name is the model's


def test_a_wrapper_prefix_and_renamed_keys_together(saved):
    """A Lightning checkpoint of a Hugging Face model: ``model.`` before checkpoint names."""
    name, folder, _, inputs = saved
    state = {f"model.{k}": v for k, v in read_state_dict(str(folder)).items()}
    fresh, _ = MODELS[name]()
    load_pruned_state_dict(fresh, state)
    theirs = type(fresh).from_pretrained(folder)
    torch.testing.assert_close(outputs(fresh, inputs), outputs(theirs, inputs), rtol=0, atol=0)


def test_report_of_a_folder_lists_the_model_names(saved):
    name, folder, _, _ = saved
    done = CliRunner().invoke(cli, ["report", "--weights", str(folder), "--json"])
    assert done.exit_code == 0, done.output
    listed = {t["name"] for t in json.loads(done.output)["tensors"]}
    model, _ = MODELS[name]()
    params = {n for n, _ in model.named_parameters()}
    assert params <= listed, sorted(params - listed)


def test_streaming_renames_and_refuses_what_it_cannot_join(saved, tmp_path):
    name, folder, recipe, _ = saved
    runner = CliRunner()
    out = tmp_path / "streamed"
    args = ["apply", str(recipe), "--model", str(folder), "-o", str(out), "--format", "hf", "--stream", "--max-shard-size", "20KB"]
    done = runner.invoke(cli, args)
    if name == "mixtral":  # its experts are one tensor in the model, several in a checkpoint
        assert done.exit_code != 0 and not out.exists()
        assert "experts" in done.output and "apply it in memory (without --stream)" in done.output
        assert "Traceback" not in done.output
        plan = runner.invoke(cli, ["plan", str(recipe), "--model", str(folder), "--stream"])
        assert plan.exit_code != 0 and "joins or splits" in plan.output
        return
    assert done.exit_code == 0, done.output
    assert stored_keys(out) == stored_keys(folder)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == stored_keys(folder)
    memory = tmp_path / "memory"
    assert runner.invoke(cli, ["apply", str(recipe), "--model", str(folder), "-o", str(memory), "--format", "hf"]).exit_code == 0
    a, b = read_state_dict(str(out)), read_state_dict(str(memory))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_report_of_a_folder_lists_every_tensor_it_holds(saved, tmp_path):
    """A folder is its own model: a tensor the model has no parameter for is listed too, not dropped."""
    from safetensors.torch import save_file

    _, folder, _, _ = saved
    state = {k: v.contiguous() for k, v in read_state_dict(str(folder)).items()}
    state["extra.scale"] = torch.zeros(3)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "config.json").write_text((folder / "config.json").read_text())
    save_file(state, str(copy / "model.safetensors"), metadata={"format": "pt"})
    done = CliRunner().invoke(cli, ["report", "--weights", str(copy), "--json"])
    assert done.exit_code == 0, done.output
    listed = {t["name"]: t for t in json.loads(done.output)["tensors"]}
    assert "extra.scale" in listed and listed["extra.scale"]["type"] is None


def test_a_stored_name_and_its_renamed_twin_are_not_merged_silently(tmp_path):
    """``embed_out.weight`` and ``lm_head.weight`` both in one GPT-NeoX checkpoint: which one is
    the model's is not guessed; the extra one is reported."""
    model, _ = neox()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["embed_out.weight"] = state["lm_head.weight"].clone()
    from prunerecipe.errors import CheckpointError

    fresh, _ = neox()
    with pytest.raises(CheckpointError, match=r"not in the model: embed_out\.weight"):
        load_pruned_state_dict(fresh, state)


@pytest.mark.parametrize("prefix", ["module.", "net.", "model."])
def test_any_wrapper_prefix_before_stored_names(saved, prefix):
    """DDP's ``module.``, a LightningModule's ``net.``: found and removed whatever the stored
    names are (renamed ones, or per-expert tensors that transformers merges)."""
    name, folder, _, inputs = saved
    state = {prefix + k: v for k, v in read_state_dict(str(folder)).items()}
    fresh, _ = MODELS[name]()
    load_pruned_state_dict(fresh, state)
    theirs = type(fresh).from_pretrained(folder)
    torch.testing.assert_close(outputs(fresh, inputs), outputs(theirs, inputs), rtol=0, atol=0)


def test_a_llava_checkpoint_under_a_prefix_some_of_whose_keys_look_like_model_names():
    """``model.`` + Llava's stored names: ``model.vision_tower.*`` happens to be a model name
    already, so the prefix is there although not every key lacks a fit."""
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=16, patch_size=8
    )
    text = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48
    )
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=63))
    from prunerecipe.checkpoint.hfnames import to_checkpoint_names

    stored = to_checkpoint_names(model, model.state_dict())
    assert set(stored) != set(model.state_dict())
    fresh = transformers.LlavaForConditionalGeneration(model.config)
    load_pruned_state_dict(fresh, {"model." + k: v for k, v in stored.items()})
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_a_moe_checkpoint_holding_experts_twice_is_refused():
    """Per-expert tensors and the merged one in one checkpoint: which is meant is not guessed."""
    from prunerecipe.checkpoint.hfnames import to_checkpoint_names
    from prunerecipe.errors import CheckpointError

    model, _ = mixtral()
    state = to_checkpoint_names(model, model.state_dict())
    merged = "model.layers.0.mlp.experts.gate_up_proj"
    state[merged] = torch.zeros_like(model.state_dict()[merged])
    fresh, _ = mixtral()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"not in the model: model\.layers\.0\.block_sparse_moe\.experts\.0\.w1\.weight"):
        load_pruned_state_dict(fresh, state)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())  # nothing changed


def test_pruned_entries_under_stored_names_are_renamed_with_their_parameter():
    """``embed_out.weight_orig``/``_mask`` (a pruned checkpoint written where that was the model's
    name) come back as ``lm_head``'s pruning."""
    model, _ = neox()
    state = {("embed_out.weight" if k == "lm_head.weight" else k): v.clone() for k, v in model.state_dict().items()}
    weight = state.pop("embed_out.weight")
    mask = (torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    state["embed_out.weight_orig"], state["embed_out.weight_mask"] = weight, mask
    fresh, _ = neox()
    assert load_pruned_state_dict(fresh, state) == ["lm_head.weight"]
    assert torch.equal(fresh.lm_head.weight_mask, mask) and torch.equal(fresh.lm_head.weight, weight * mask)


def test_report_of_a_folder_checks_its_tensors_against_its_config(tmp_path):
    """A Mixtral folder missing an expert: report says so rather than list a 3-expert tensor."""
    from safetensors.torch import save_file

    from prunerecipe.checkpoint.hfnames import to_checkpoint_names

    model, _ = mixtral()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in to_checkpoint_names(model, model.state_dict()).items() if ".experts.3." not in k}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    done = CliRunner().invoke(cli, ["report", "--weights", str(folder)])
    assert done.exit_code != 0 and "Traceback" not in done.output
    assert "the weights do not fit the folder's own config: model.layers.0.mlp.experts.gate_up_proj is 3x96x32" in done.output


def test_a_converter_failing_on_write_is_a_clear_error_and_writes_nothing(tmp_path, monkeypatch):
    from transformers.core_model_loading import WeightConverter

    from prunerecipe.checkpoint import write_output
    from prunerecipe.errors import CheckpointError

    def broken(self, *args, **kwargs):
        raise RuntimeError("split failed")

    model, _ = mixtral()
    monkeypatch.setattr(WeightConverter, "convert", broken)
    with pytest.raises(CheckpointError, match=r"transformers could not split .*experts.* \(RuntimeError: split failed\)"):
        write_output(model, str(tmp_path / "out"), fmt="hf")
    assert list(tmp_path.iterdir()) == []
