"""Edges of one-shot LM pruning found by trying it as users would: wrapped models, mixed steps,
half-precision scores, sample shapes, unreached layers, outputs fed back in."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from prunerecipe import apply_recipe, parse_recipe
from prunerecipe.errors import CalibrationError

pytest.importorskip("transformers")

from prunerecipe.zoo import tiny_llama


def _ids(n=8, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (length,), generator=g) for _ in range(n)]


def _masks(model):
    return {k: v for k, v in model.named_buffers() if k.endswith("_mask")}


class Wrap(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):  # takes no use_cache: the KV cache stays on inside
        return self.lm(input_ids).logits


@pytest.mark.parametrize("how", ["method: l1_unstructured, sparsity: 0.5, importance: wanda", "method: sparsegpt, sparsity: 0.5"])
def test_a_wrapped_model_gets_the_masks_of_the_bare_one(how):
    recipe = "version: 1\nsteps:\n  - {select: {types: [Linear], names: ['%s.layers.*']}, %s}\n"
    bare, wrapped = tiny_llama(), Wrap(tiny_llama())
    apply_recipe(bare, parse_recipe(recipe % ("model", how)), calibration=_ids())
    apply_recipe(wrapped, parse_recipe(recipe % ("lm.model", how)), calibration=_ids())
    mine, theirs = _masks(bare), {k.removeprefix("lm."): v for k, v in _masks(wrapped).items()}
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_the_report_counts_a_calibrated_step_after_a_fast_one():
    model = tiny_llama()
    recipe = parse_recipe(
        "version: 1\nsteps:\n"
        "  - {select: {types: [Linear], names: ['model.layers.*']}, method: l1_unstructured, amount: 0.2}\n"
        "  - {select: {types: [Linear], names: ['model.layers.*']}, method: sparsegpt, sparsity: 0.5}\n"
    )
    report = apply_recipe(model, recipe, calibration=_ids())
    masks = _masks(model)
    real = sum(int((m == 0).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert report.global_after == pytest.approx(real) and real == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_rank_wanda_scores_as_the_formula_does(dtype):
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(256, 128)).to(dtype)
    scale = torch.logspace(-2, 2, 256)
    data = [(torch.randn(8, 256) * scale).to(dtype) for _ in range(16)]
    recipe = parse_recipe(
        "version: 1\ncalibration: {samples: 16, batch_size: 4}\n"
        "steps:\n  - {select: {types: [Linear]}, method: semi_structured, args: {n: 2, m: 4}, importance: wanda}\n"
    )
    apply_recipe(layer, recipe, calibration=data)
    x = torch.cat([d.double().reshape(-1, 256) for d in data])
    score = layer[0].weight_orig.double().abs() * x.norm(dim=0)  # Wanda: |W| * ||X_j||, in float64
    groups = score.view(128, 64, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, dim=2).indices, True).view(128, 256)
    assert torch.equal(layer[0].weight_mask.bool(), keep)
    assert layer[0].weight_mask.dtype == dtype  # the mask in the weight's dtype, as torch's own masks are


@pytest.mark.parametrize(
    "samples, says",
    [
        ([torch.randint(0, 512, (1, 16))] * 4, "(no batch dimension"),
        ([torch.randint(0, 512, (16, 3))] * 4, "shape (16, 3)"),
        ([torch.rand(16)] * 4, "token ids are integers"),
        ([torch.randint(0, 200, (16,), dtype=torch.uint8)] * 4, "is uint8; token ids are int64 (or int32)"),
        ([torch.full((16,), 512)] * 4, "holds the token id 512; the model's vocabulary has ids 0 to 511"),
        ([torch.full((16,), -3)] * 4, "holds the token id -3; the model's vocabulary has ids 0 to 511"),
        ([{"input_ids": torch.randint(0, 512, (16,)), "attention_mask": torch.ones(8, dtype=torch.long)}] * 4, "must have one length"),
        ([{"attention_mask": torch.ones(16, dtype=torch.long)}] * 4, "has no 'input_ids'"),
    ],
)
def test_samples_a_language_model_cannot_take_are_refused_before_anything_runs(samples, says):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = parse_recipe("version: 1\nsteps:\n  - {select: {types: [Linear], names: ['model.layers.*']}, method: sparsegpt, sparsity: 0.5}\n")
    with pytest.raises(CalibrationError, match=says.replace("(", r"\(").replace(")", r"\)")):
        apply_recipe(model, recipe, calibration=samples)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix, self.expert = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):  # the expert gets no token on this data
        return self.mix(x)


class Routed(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("how", ["method: sparsegpt, sparsity: 0.5", "method: l1_unstructured, sparsity: 0.5, importance: wanda"])
def test_a_layer_no_calibration_input_reaches_is_an_error_not_a_guess(how):
    model = Routed()
    recipe = parse_recipe(f"version: 1\nsequential: {{blocks: 'blocks.*'}}\nsteps:\n  - {{select: {{types: [Linear]}}, {how}}}\n")
    with pytest.raises(CalibrationError, match=r"blocks\.0\.expert\.weight saw no calibration input"):
        apply_recipe(model, recipe, calibration=[torch.randn(4, 8) for _ in range(4)])
    assert not _masks(model)


def test_a_calibration_function_returning_none_says_so(tmp_path):
    from click.testing import CliRunner

    from prunerecipe.cli import cli

    (tmp_path / "cal.py").write_text("def none():\n    return None\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\nmodel: prunerecipe.zoo:tiny_llama\nsteps:\n  - {select: {types: [Linear], names: ['model.layers.*']}, method: sparsegpt, sparsity: 0.5}\n"
    )
    done = CliRunner().invoke(cli, ["apply", str(recipe), "--calibration", f"{tmp_path / 'cal.py'}:none", "-o", str(tmp_path / "o.pt")])
    assert done.exit_code == 1 and "returned None" in done.output and not (tmp_path / "o.pt").exists()


def test_an_hf_output_of_a_model_built_in_code_is_read_back_with_its_head(tmp_path):
    from click.testing import CliRunner

    from prunerecipe.cli import cli

    runner = CliRunner()
    first = runner.invoke(
        cli, ["apply", "recipes/nm-2-4-magnitude.yaml", "--model", "prunerecipe.zoo:tiny_llama", "--format", "hf", "-o", str(tmp_path / "f")]
    )
    assert first.exit_code == 0, first.output
    assert '"LlamaForCausalLM"' in (tmp_path / "f" / "config.json").read_text()
    again = runner.invoke(cli, ["plan", "recipes/nm-2-4-magnitude.yaml", "--model", str(tmp_path / "f")])
    assert again.exit_code == 0 and "LlamaForCausalLM" in again.output


def test_ln_structured_without_dim_uses_its_default_as_planned():
    torch.manual_seed(0)
    ours, theirs = nn.Sequential(nn.Linear(8, 6)), nn.Sequential(nn.Linear(8, 6))
    theirs.load_state_dict(ours.state_dict())
    apply_recipe(ours, parse_recipe("version: 1\nsteps:\n  - {select: {types: [Linear]}, method: ln_structured, amount: 0.5, args: {n: 2}}\n"))
    prune.ln_structured(theirs[0], "weight", amount=0.5, n=2, dim=-1)
    assert torch.equal(ours[0].weight_mask, theirs[0].weight_mask)


class Backwards(nn.Module):
    """Blocks registered 0, 1, 2 but called 2, 1, 0."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        for block in reversed(self.blocks):
            x = block(x)
        return x


def test_blocks_called_out_of_order_are_an_error_not_wrong_statistics():
    model = Backwards()
    recipe = parse_recipe("version: 1\nsequential: {blocks: 'blocks.*'}\nsteps:\n  - {select: {types: [Linear]}, method: sparsegpt, sparsity: 0.5}\n")
    with pytest.raises(CalibrationError, match=r"calls its blocks in another order .*blocks\.2, blocks\.1, blocks\.0"):
        apply_recipe(model, recipe, calibration=[torch.randn(4, 8) for _ in range(4)])
    assert not _masks(model)


# --- found in review: blocks that do not feed each other, a block called more than once,
# blocks that change the width, keyword inputs, importances that write into their argument


def _gpt2(layers=3):
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=4, vocab_size=128, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize(
    ("blocks", "names", "says"),
    [
        ("transformer.h.*.mlp", "transformer.h.*.mlp.*", "transformer.h.1.mlp is not called on the output of block transformer.h.0.mlp"),
        ("transformer.h.[02]", "transformer.h.[02].*", "transformer.h.2 is not called on the output of block transformer.h.0"),
    ],
)
def test_blocks_that_do_not_feed_each_other_are_an_error_not_wrong_statistics(blocks, names, says):
    model = _gpt2()
    recipe = parse_recipe(
        f"version: 1\nsequential: {{blocks: '{blocks}'}}\nsteps:\n  - {{select: {{types: [Conv1D], names: ['{names}']}}, method: sparsegpt, sparsity: 0.5}}\n"
    )
    with pytest.raises(CalibrationError, match=says):
        apply_recipe(model, recipe, calibration=[torch.randint(0, 128, (16,)) for _ in range(4)])
    assert not _masks(model)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    def forward(self, x):
        for _ in range(3):
            x = self.block(x)
        return x


def test_a_block_the_model_calls_more_than_once_is_an_error():
    recipe = parse_recipe("version: 1\nsequential: {blocks: block}\nsteps:\n  - {select: {types: [Linear]}, method: sparsegpt, sparsity: 0.5}\n")
    model = Shared()
    with pytest.raises(CalibrationError, match=r"not once each \(block, block, block\)"):
        apply_recipe(model, recipe, calibration=[torch.randn(8) for _ in range(4)])
    assert not _masks(model)


class Widths(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(32, 48), nn.ReLU()), nn.Sequential(nn.Linear(48, 32), nn.ReLU())])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_blocks_may_change_the_width_and_match_a_whole_model_run():
    recipe = "version: 1\n%ssteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, sparsity: 0.5, importance: wanda}\n"
    data = [torch.randn(32, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    torch.manual_seed(0)
    by_block, whole = Widths(), Widths()
    whole.load_state_dict(by_block.state_dict())
    apply_recipe(by_block, parse_recipe(recipe % "sequential: {blocks: 'layers.*'}\n"), calibration=data)
    # by hand: Wanda's score |W| * ||x_j|| with each layer's inputs from the dense model, each row pruned by half
    # (the first layer is pruned before the second sees its inputs: take those from the pruned first block)
    xs = torch.stack(data)
    first = whole.layers[0][0]
    norms = xs.norm(dim=0)
    score = first.weight.detach().abs() * norms
    keep = score.argsort(dim=1, stable=True)[:, score.shape[1] // 2 :]
    mask = torch.zeros_like(score).scatter_(1, keep, 1.0)
    assert torch.equal(by_block.layers[0][0].weight_mask, mask)
    hidden = torch.relu(torch.nn.functional.linear(xs, first.weight.detach() * mask, first.bias.detach()))
    second = whole.layers[1][0]
    score = second.weight.detach().abs() * hidden.norm(dim=0)
    keep = score.argsort(dim=1, stable=True)[:, score.shape[1] // 2 :]
    assert torch.equal(by_block.layers[1][0].weight_mask, torch.zeros_like(score).scatter_(1, keep, 1.0))


class Keyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, x):
        return self.proj(input=x)


def test_a_layer_called_with_a_keyword_input_gets_its_statistics():
    model = Keyword()
    recipe = parse_recipe("version: 1\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, sparsity: 0.5, importance: wanda}\n")
    report = apply_recipe(model, recipe, calibration=[torch.randn(8) for _ in range(4)])
    assert report.global_after == pytest.approx(0.5)


def test_a_plugin_importance_writing_into_its_argument_does_not_change_the_model():
    from prunerecipe import register_importance

    def careless(weight):
        weight.mul_(2)
        return weight.abs()

    register_importance("careless_test", careless, replace=True)
    model = nn.Sequential(nn.Linear(4, 2))
    before = model[0].weight.detach().clone()
    recipe = parse_recipe("version: 1\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, sparsity: 0.5, importance: careless_test}\n")
    apply_recipe(model, recipe)
    assert torch.equal(model[0].weight_orig, before)


def test_the_report_says_how_many_samples_ran_and_when_the_data_ran_out():
    model = tiny_llama()
    recipe = parse_recipe(
        "version: 1\ncalibration: {samples: 16, batch_size: 4}\nsteps:\n"
        "  - {select: {types: [Linear], names: ['model.layers.*']}, method: sparsegpt, sparsity: 0.5}\n"
    )
    report = apply_recipe(model, recipe, calibration=_ids(n=5))
    assert report.calibration == (5, 16) and report.to_dict()["calibration"] == {"samples": 5, "asked": 16}
    assert "calibration: 5 sample(s), of the 16 asked for: the data ran out" in str(report)


def test_the_cli_does_not_call_the_calibration_function_when_no_step_needs_data(tmp_path):
    from click.testing import CliRunner

    from prunerecipe.cli import cli

    (tmp_path / "cal.py").write_text("def data():\n    raise OSError('should not be called')\n")
    (tmp_path / "r.yaml").write_text("version: 1\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n")
    out = tmp_path / "out.pt"
    args = ["apply", str(tmp_path / "r.yaml"), "--model", "prunerecipe.zoo:LeNet", "--calibration", f"{tmp_path / 'cal.py'}:data", "-o", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    (tmp_path / "w.yaml").write_text(
        "version: 1\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, sparsity: 0.5, importance: wanda}\n"
    )
    args[1], args[-1] = str(tmp_path / "w.yaml"), str(tmp_path / "out2.pt")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "w.yaml" in result.output and "calibration" in result.output and "should not be called" in result.output


def test_complex_samples_and_an_infinite_damp_are_refused():
    from prunerecipe.errors import RecipeError

    with pytest.raises(CalibrationError, match="complex64; samples are real"):
        apply_recipe(
            Keyword(),
            parse_recipe("version: 1\nsteps:\n  - {select: {types: [Linear]}, method: sparsegpt, sparsity: 0.5}\n"),
            calibration=[torch.randn(8, dtype=torch.complex64)] * 2,
        )
    with pytest.raises(RecipeError, match="damp must be a finite number"):
        parse_recipe("version: 1\nsteps:\n  - {select: {types: [Linear]}, method: sparsegpt, sparsity: 0.5, args: {damp: .inf}}\n")


def test_the_cli_names_a_calibration_function_that_returns_one_dict(tmp_path):
    from click.testing import CliRunner

    from prunerecipe.cli import cli

    (tmp_path / "cal.py").write_text("import torch\ndef data():\n    return {'input': torch.randn(4, 8)}\n")
    (tmp_path / "w.yaml").write_text(
        "version: 1\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, sparsity: 0.5, importance: wanda}\n"
    )
    args = [
        "apply",
        str(tmp_path / "w.yaml"),
        "--model",
        "prunerecipe.zoo:LeNet",
        "--calibration",
        f"{tmp_path / 'cal.py'}:data",
        "-o",
        str(tmp_path / "o.pt"),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "calibration data is one dict; give an iterable of samples" in result.output


@pytest.mark.parametrize("arch", ["gemma2-sliding", "t5-encoder"])
def test_blocks_given_their_own_arguments_are_refused_not_replayed_wrongly(arch):
    # Gemma2 alternates sliding-window and full attention (a mask per layer); T5 passes block 0's
    # position bias on to the next blocks: replaying every block with the first one's arguments
    # gave silently wrong statistics (4 of 14 Wanda masks differed)
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "gemma2-sliding":
        config = transformers.Gemma2Config(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, sliding_window=4,
        )  # fmt: skip
        model = transformers.Gemma2ForCausalLM(config).eval()
    else:
        config = transformers.T5Config(vocab_size=128, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8)
        model = transformers.T5EncoderModel(config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = parse_recipe(
        "version: 1\ncalibration: {samples: 8, batch_size: 4}\nsteps:\n"
        "  - {select: {types: [Linear], names: ['*.layers.*', '*.block.*']}, method: l1_unstructured, importance: wanda, sparsity: 0.5}\n"
    )
    with pytest.raises(CalibrationError, match=r"is called with another '.+' than block .+: calibration-based steps replay"):
        apply_recipe(model, recipe, calibration=[torch.randint(3, 128, (16,)) for _ in range(8)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing changed


def test_an_encoder_decoder_sample_may_have_a_decoder_sequence_of_its_own_length():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=128, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4,
    )  # fmt: skip
    model = transformers.BartForConditionalGeneration(config).eval()
    recipe = parse_recipe(
        "version: 1\ncalibration: {samples: 4, batch_size: 2}\nsequential: {blocks: 'model.encoder.layers.*'}\nsteps:\n"
        "  - {select: {types: [Linear], names: ['model.encoder.layers.*']}, method: l1_unstructured, importance: wanda, sparsity: 0.5}\n"
    )
    g = torch.Generator().manual_seed(1)
    samples = [
        {"input_ids": torch.randint(3, 128, (16,), generator=g), "decoder_input_ids": torch.randint(3, 128, (8,), generator=g)} for _ in range(4)
    ]
    apply_recipe(model, recipe, calibration=samples)
    assert abs(float((model.model.encoder.layers[0].fc1.weight == 0).float().mean()) - 0.5) < 1e-6
    bad = [dict(s, decoder_attention_mask=torch.ones(16, dtype=torch.long)) for s in samples]  # its own length is 8
    with pytest.raises(CalibrationError, match=r"\['decoder_attention_mask'\] has shape \(16,\), its decoder_input_ids \(8,\)"):
        apply_recipe(transformers.BartForConditionalGeneration(config).eval(), recipe, calibration=bad)
