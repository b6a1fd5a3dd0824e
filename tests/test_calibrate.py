"""Calibration data (loading, checking: bad input is a clear error and changes nothing), block
discovery, and layer-by-layer pruning of Hugging Face models (GPT-2, Llama, BERT) end to end:
finalize, checkpoints, the CLI."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from prunerecipe import (
    CalibrationError,
    RecipeError,
    apply_recipe,
    finalize,
    load_pruned_state_dict,
    parse_recipe,
    plan_recipe,
    read_state_dict,
    torchprune,
)
from prunerecipe.blocks import find_blocks
from prunerecipe.calibrate import call_calibration, load_calibration
from prunerecipe.cli import cli
from prunerecipe.spec import Sequential

from .conftest import ROOT

transformers = pytest.importorskip("transformers")


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=40,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


def bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    return transformers.BertForMaskedLM(config)


WANDA = """
version: 1
calibration: {samples: 8, batch_size: 4}
steps:
  - select: {types: [Linear, Conv1D], names: ["transformer.h.*", "model.layers.*", "bert.encoder.layer.*"]}
    method: l1_unstructured
    importance: wanda
    sparsity: 0.5
"""


def ids(n=8, length=10):
    return torch.randint(0, 40, (n, length), generator=torch.Generator().manual_seed(1))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()]


def assert_unchanged(model, before):
    state, hooks = before
    now = model.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], v) for k, v in state.items())
    assert [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()] == hooks


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "calibration: calibration data is empty: it yielded no sample"),
        (3, "calibration: calibration data is 3 (a int), not an iterable of samples (tensors or dicts of tensors)"),
        ({"input_ids": torch.zeros(4, dtype=torch.long)}, "calibration: calibration data is one dict; give an iterable of samples"),
        (["def f(): pass"], "calibration: calibration sample 0 is a str; each sample is a tensor or a dict of tensors"),
        ([torch.tensor(3)], "calibration: calibration sample 0 is a 0-dimensional tensor"),
        ([torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long)], "calibration sample 1 is (5,) int64, sample 0 (4,) int64"),
        ([{"input_ids": torch.zeros(4, dtype=torch.long)}, {"ids": torch.zeros(4, dtype=torch.long)}], "calibration sample 1 has the keys ['ids']"),
        ([torch.tensor([1.0, float("nan"), float("inf")])], "calibration sample 0 has 1 NaN and 1 infinite values"),
        ((1 / 0 for _ in range(3)), "calibration: reading calibration sample 0 raised ZeroDivisionError: division by zero"),
        ([torch.full((6,), 99)], "calibration: calibration sample 0 holds the token id 99; the model's vocabulary has ids 0 to 39"),
        (
            [torch.zeros(20, dtype=torch.long)],
            "calibration batch 0: IndexError: index out of range in self; the samples have 20 tokens and the model's config allows "
            "16 positions (n_positions): give shorter calibration samples (seq_len <= 16); the model was left unchanged",
        ),
    ],
    ids=["empty", "int", "one-dict", "str", "0-d", "shapes", "keys", "nan", "raises", "out-of-vocab", "too-long"],
)
def test_bad_calibration_data_is_a_clear_error_and_changes_nothing(data, message):
    model = gpt2()
    before = snapshot(model)
    with pytest.raises(CalibrationError) as info:
        apply_recipe(model, parse_recipe(WANDA, "w.yaml"), calibration=data)
    assert message in str(info.value)
    assert str(info.value).startswith("w.yaml:3:14: calibration: ")
    assert info.value.problems[0].code == "calibration"
    assert_unchanged(model, before)


def test_no_calibration_data_for_a_step_that_needs_it_is_an_error_before_anything_changes():
    model = gpt2()
    before = snapshot(model)
    with pytest.raises(RecipeError) as info:
        apply_recipe(model, parse_recipe(WANDA, "w.yaml"))
    assert str(info.value) == (
        "w.yaml:5:5: steps[0]: this step needs calibration data (importance 'wanda'): pass --calibration SPEC to prunerecipe apply, "
        "or calibration= to apply_recipe; nothing was changed"
    )
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_failure_while_pruning_a_later_block_restores_every_block(method, monkeypatch):
    journals = []  # SparseGPT's replaced weights wait on disk, not in memory, until the run ends
    real = tempfile.TemporaryDirectory

    def recording(*args, **kwargs):
        journals.append(real(*args, **kwargs))
        return journals[-1]

    monkeypatch.setattr(torchprune.snapshot.tempfile, "TemporaryDirectory", recording)
    model = gpt2()
    model.transformer.h[1].mlp.register_forward_pre_hook(lambda module, args: (args[0] * float("inf"),))  # the second block overflows
    before = snapshot(model)
    recipe = WANDA if method == "wanda" else WANDA.replace("l1_unstructured\n    importance: wanda", "sparsegpt")
    with pytest.raises(CalibrationError, match="the inputs of transformer.h.1.mlp.c_fc.weight on the calibration data hold NaN or inf"):
        apply_recipe(model, parse_recipe(recipe), calibration=ids())
    assert_unchanged(model, before)
    assert not hasattr(model.transformer.h[0].mlp.c_fc, "weight_mask")  # the first block, pruned by then, is back too
    assert len(journals) == (1 if method == "sparsegpt" else 0)
    assert not any(os.path.exists(j.name) for j in journals)  # read back and removed


def test_calibration_specs_and_functions(tmp_path):
    path = tmp_path / "calib.py"
    path.write_text("import torch\ndef data(model, samples):\n    return [torch.zeros(4, dtype=torch.long)] * samples\nvalue = 3\n")
    fn = load_calibration(f"{path}:data")
    assert len(call_calibration(fn, model=nn.Linear(1, 1), samples=5)) == 5
    with pytest.raises(CalibrationError, match=r"calibration spec '.*:value': is a int, not a function returning calibration samples"):
        load_calibration(f"{path}:value")
    with pytest.raises(CalibrationError, match="has no attribute 'dta' \\(did you mean 'data'\\?\\)"):
        load_calibration(f"{path}:dta")
    with pytest.raises(CalibrationError, match="needs argument\\(s\\) tokenizer; it may take none, or model= and samples= only"):
        call_calibration(lambda tokenizer: [], model=nn.Linear(1, 1), samples=1)
    with pytest.raises(CalibrationError, match="raised RuntimeError: boom"):
        call_calibration(lambda: (_ for _ in ()).throw(RuntimeError("boom")), model=nn.Linear(1, 1), samples=1)


def test_blocks_are_found_for_hugging_face_models_and_named_for_others():
    assert find_blocks(gpt2(), None).names == ("transformer.h.0", "transformer.h.1")
    assert find_blocks(llama(), None).names == ("model.layers.0", "model.layers.1")
    assert find_blocks(bert(), None).names == ("bert.encoder.layer.0", "bert.encoder.layer.1")
    assert find_blocks(nn.Sequential(nn.Linear(2, 2)), None).whole_model
    assert find_blocks(llama(), Sequential("model.layers.*")).names == ("model.layers.0", "model.layers.1")
    with pytest.raises(RecipeError, match="blocks 'model.layer.*' match no module"):
        find_blocks(llama(), Sequential("model.layer.*"))


def test_targets_outside_the_blocks_are_refused_at_plan_time():
    recipe = parse_recipe(
        "version: 1\nsteps:\n  - {select: {names: [lm_head]}, method: sparsegpt, sparsity: 0.5}\n",
        "s.yaml",
    )
    with pytest.raises(RecipeError) as info:
        plan_recipe(llama(), recipe)
    assert "steps[0].select: lm_head.weight is outside every block (2 block(s) model.layers.0 .. model.layers.1 (LlamaDecoderLayer" in str(info.value)


@pytest.mark.parametrize("build", [gpt2, llama, bert], ids=["gpt2", "llama", "bert"])
@pytest.mark.parametrize(
    "method",
    [
        "method: sparsegpt\n    sparsity: 0.5\n    args: {block_size: 8}",
        "method: sparsegpt\n    args: {n: 2, m: 4, block_size: 8}",
        "method: semi_structured\n    importance: wanda",
    ],
    ids=["sparsegpt", "sparsegpt-2-4", "wanda-2-4"],
)
def test_hugging_face_models_end_to_end(build, method, tmp_path):
    model = build()
    model.train()
    recipe = parse_recipe(WANDA.replace("method: l1_unstructured\n    importance: wanda\n    sparsity: 0.5", method))
    plan = plan_recipe(model, recipe)
    assert "calibration: 8 samples in batches of 4, through 2 block(s)" in str(plan)
    report = apply_recipe(model, recipe, plan=plan, calibration=ids())
    assert model.training and all(m.training for m in model.modules())  # modes put back
    rewrites = "sparsegpt" in method
    assert math.isclose(report.global_after, 0.5) and len(report.steps[0].rewritten) == (len(plan.steps[0].targets) if rewrites else 0)
    model.eval()
    x = ids(2)
    with torch.no_grad():
        out = model(x).logits
    assert torch.isfinite(out).all()
    from prunerecipe import save_state_dict

    save_state_dict(model.state_dict(), tmp_path / "pruned.safetensors")
    fresh = build(seed=5).eval()
    load_pruned_state_dict(fresh, read_state_dict(tmp_path / "pruned.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, out)
    finalize(model)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, out, atol=1e-6)


def test_a_recipe_mixing_steps_runs_them_in_file_order():
    model = llama()
    recipe = parse_recipe("""
version: 1
calibration: {samples: 8, batch_size: 4}
steps:
  - {select: {names: ["model.layers.*.mlp.*"]}, method: semi_structured}
  - {select: {names: ["model.layers.*.mlp.*"]}, method: sparsegpt, amount: 0.5, args: {block_size: 8}}
  - {select: {names: ["model.layers.*.self_attn.*"]}, method: l1_unstructured, importance: wanda, sparsity: 0.3}
""")
    report = apply_recipe(model, recipe, calibration=ids())
    mlp = model.model.layers[0].mlp.up_proj
    assert [type(m).__name__ for m in mlp._forward_pre_hooks[next(iter(mlp._forward_pre_hooks))]] == ["SemiStructured", "SparseGPT"]
    assert math.isclose(report["model.layers.0.mlp.up_proj.weight"].after, 0.75)
    assert math.isclose(report["model.layers.1.self_attn.q_proj.weight"].after, 0.3, abs_tol=1e-3)


def test_the_cli_takes_a_calibration_function_from_a_file(tmp_path):
    out = tmp_path / "wanda.pt"
    runner = CliRunner()
    missing = runner.invoke(cli, ["apply", str(ROOT / "recipes/wanda-50.yaml"), "-o", str(out)])
    assert missing.exit_code == 1 and "needs calibration data (importance 'wanda')" in missing.output and not out.exists()
    done = runner.invoke(
        cli,
        [
            "apply",
            str(ROOT / "recipes/wanda-50.yaml"),
            "--calibration",
            f"{ROOT / 'examples/calibration.py'}:stdlib_text",
            "--set",
            "samples=16",
            "-o",
            str(out),
        ],
    )
    assert done.exit_code == 0, done.output
    assert "global: 196608 entries, sparsity 0.00% -> 50.00%" in done.output and out.exists()
    bad = runner.invoke(cli, ["apply", str(ROOT / "recipes/wanda-50.yaml"), "--calibration", "examples/nope.py:fn", "-o", str(tmp_path / "x.pt")])
    assert bad.exit_code == 1 and "calibration spec 'examples/nope.py:fn': no such file 'examples/nope.py'" in bad.output
