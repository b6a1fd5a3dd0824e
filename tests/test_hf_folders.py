"""Hugging Face model folders in, loadable outputs out: GPT-2 (tied lm_head, Conv1D), Llama and
BERT saved with save_pretrained (one file and sharded) go through plan, apply and back through
plain from_pretrained, with no missing or unexpected keys and the pruned model's outputs."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402

from prunerecipe import apply_recipe, load_pruned_state_dict, parse_recipe, read_state_dict  # noqa: E402
from prunerecipe.checkpoint import state_dict_sparsity  # noqa: E402
from prunerecipe.cli import cli  # noqa: E402
from prunerecipe.modelspec import load_model  # noqa: E402

pytestmark = pytest.mark.slow

VOCAB = 96


def gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def llama():
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg)


def bert():
    cfg = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=32
    )
    return transformers.BertForMaskedLM(cfg)


# the Linear-like layers of each family, and the recipe step that prunes them
MODELS = {
    "gpt2": (gpt2, "{select: {types: [Conv1D]}, method: l1_unstructured, amount: 0.5, scope: global}"),
    "llama": (llama, '{select: {types: [Linear], names: ["model.layers.*"]}, method: l1_unstructured, amount: 0.5}'),
    "bert": (bert, '{select: {types: [Linear], names: ["bert.encoder.*"]}, method: l1_unstructured, amount: 0.6, scope: global}'),
}


@pytest.fixture(
    scope="module", params=[(name, shard) for name in MODELS for shard in (None, "20KB")], ids=lambda p: f"{p[0]}-{'sharded' if p[1] else 'one-file'}"
)
def saved(request, tmp_path_factory):
    name, shard = request.param
    torch.manual_seed(0)
    model = MODELS[name][0]().eval()
    folder = tmp_path_factory.mktemp(name) / "model"
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 32}')  # copied along to the output
    recipe = folder.parent / "recipe.yaml"
    recipe.write_text(f"version: 1\nmodel: model\nsteps:\n  - {MODELS[name][1]}\n")  # relative to the recipe's folder
    return name, folder, recipe


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def test_a_folder_round_trips_through_apply_and_from_pretrained(saved, tmp_path):
    name, folder, recipe = saved
    runner = CliRunner()
    plan = runner.invoke(cli, ["plan", str(recipe)])
    assert plan.exit_code == 0, plan.output
    out = tmp_path / "pruned"
    done = runner.invoke(cli, ["apply", str(recipe), "-o", str(out), "--max-shard-size", "30KB"])
    assert done.exit_code == 0, done.output
    assert f"wrote {out}/: Hugging Face folder" in done.output and "from_pretrained" in done.output

    # the same run in memory, for the outputs to compare with
    expected = load_model(str(folder))
    report = apply_recipe(expected, parse_recipe(recipe.read_text().replace("model: model\n", "")))
    loaded, info = type(expected).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        a = expected.eval()(ids()).logits
        b = loaded.eval()(ids()).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for row in report.targets:  # sparsity as the recipe said, in the weights from_pretrained loaded
        assert int((loaded.get_parameter(row.name) == 0).sum()) == row.zeros_after, row.name

    files = sorted(os.listdir(out))
    assert "config.json" in files and "prunerecipe.json" in files and "tokenizer_config.json" in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    summary = json.loads((out / "prunerecipe.json").read_text())
    assert summary["recipe"] == recipe.read_text() and summary["torch"] == torch.__version__
    assert abs(summary["global"]["sparsity"] - report.global_after) < 1e-9
    assert "sparsity_config" not in json.loads((out / "config.json").read_text())
    stored = []
    for shard in shards:
        with safe_open(str(out / shard), "pt") as fh:
            assert json.loads(fh.metadata()["prunerecipe"])["global"] == summary["global"]
            stored += list(fh.keys())
    if name == "gpt2":  # tied to wte: stored once, as save_pretrained does
        assert "lm_head.weight" not in stored and "transformer.wte.weight" in stored
    mode = stat.S_IMODE(os.stat(out / shards[0]).st_mode)
    assert mode == 0o666 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_dense_and_torch_outputs_of_a_folder_model_load_into_fresh_models(saved, tmp_path):
    name, _, recipe = saved
    runner = CliRunner()
    for fmt, out in (("dense", tmp_path / "d.pt"), ("dense", tmp_path / "d.safetensors"), ("torch", tmp_path / "t.pt")):
        done = runner.invoke(cli, ["apply", str(recipe), "--format", fmt, "-o", str(out)])
        assert done.exit_code == 0, done.output
        fresh = MODELS[name][0]()
        if fmt == "dense" and out.suffix == ".pt":
            fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)  # plain torch, strict
        elif fmt == "dense":
            fresh.load_state_dict(read_state_dict(out), strict=True)  # tied names come back from the metadata
        else:
            assert load_pruned_state_dict(fresh, read_state_dict(out))  # masks restored
    rows = state_dict_sparsity(read_state_dict(tmp_path / "d.safetensors"))
    assert len(rows) == len({r[0] for r in rows})
    if name == "gpt2":  # a tied tensor is counted once
        names = [r[0] for r in rows]
        assert "transformer.wte.weight" in names and "lm_head.weight" not in names


def test_report_reads_folders_shard_indexes_and_counts_ties_once(saved):
    name, folder, _ = saved
    runner = CliRunner()
    target = folder / "model.safetensors.index.json" if (folder / "model.safetensors.index.json").exists() else folder / "model.safetensors"
    for weights in (folder, target):
        done = runner.invoke(cli, ["report", "--weights", str(weights), "--json"])
        assert done.exit_code == 0, done.output
        names = [t["name"] for t in json.loads(done.output)["tensors"]]
        assert len(names) == len(set(names))
        if name == "gpt2":
            assert "lm_head.weight" not in names and "transformer.wte.weight" in names


def test_plan_builds_a_folder_model_on_the_meta_device(saved):
    _, folder, recipe = saved
    done = CliRunner().invoke(cli, ["plan", str(recipe), "--json"])
    assert done.exit_code == 0, done.output
    assert load_model(str(folder), weights=False, meta=True).get_input_embeddings().weight.device.type == "meta"


def test_a_missing_key_that_is_not_a_tie_is_still_an_error(tmp_path):
    model = gpt2()
    model.save_pretrained(tmp_path / "m")
    state = read_state_dict(tmp_path / "m")
    del state["transformer.h.0.mlp.c_fc.weight"]
    with pytest.raises(Exception, match=r"missing from the checkpoint: transformer\.h\.0\.mlp\.c_fc\.weight"):
        load_pruned_state_dict(gpt2(), state)


def test_folders_that_cannot_be_used_give_clear_errors(tmp_path):
    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 10}')
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nsteps:\n  - {select: {types: [Conv1D]}, method: l1_unstructured, amount: 0.5}\n")
    done = runner.invoke(cli, ["apply", str(recipe), "--model", str(tmp_path / "empty"), "-o", str(tmp_path / "o")])
    assert done.exit_code == 1 and "has no weights" in done.output and "Traceback" not in done.output
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    done = runner.invoke(cli, ["plan", str(recipe), "--model", str(tmp_path / "bad")])
    assert done.exit_code == 1 and "config.json cannot be read" in done.output
    linear = tmp_path / "linear.yaml"
    linear.write_text("version: 1\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n")
    done = runner.invoke(cli, ["apply", str(linear), "--model", "prunerecipe.zoo:LeNet", "--format", "hf", "-o", str(tmp_path / "o2")])
    assert done.exit_code == 1 and "needs a Hugging Face model" in done.output and not (tmp_path / "o2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prunerecipe-")]
