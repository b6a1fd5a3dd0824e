"""scope: group and compaction on Hugging Face models built from configs: MLP hidden units
(Llama gate/up/down, GPT-2 Conv1D, BERT intermediate), configs that plain from_pretrained
loads, and attention refused at plan time."""

from __future__ import annotations

import pytest
import torch

from prunerecipe import RecipeError, apply_recipe, compact, load_pruned_state_dict, parse_recipe, plan_recipe, read_state_dict, save_state_dict
from prunerecipe.zoo import tiny_llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch_pruning")

IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))

MLP = """
version: 1
steps:
  - name: mlp
    select: {names: [%s]}
    method: ln_structured
    amount: 0.5
    scope: group
    args: {n: 2}
"""
LLAMA_MLP = MLP % '"model.layers.*.mlp.gate_proj", "model.layers.*.mlp.up_proj", "model.layers.*.mlp.down_proj"'


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_llama_mlp_groups_default_to_input_ids_and_leave_the_residual_stream_alone():
    plan = plan_recipe(tiny_llama(), parse_recipe(LLAMA_MLP))  # no 'inputs': a batch of input_ids
    (ps,) = plan.steps
    assert [pg.group.member_names() for pg in ps.groups] == [
        [f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj", f"model.layers.{i}.mlp.down_proj"] for i in (0, 1)
    ]
    assert [m.role for m in ps.groups[0].group.members] == ["out", "out", "in"]
    assert ps.skipped_groups == (
        "model.layers.0.mlp.down_proj: its channels are shared with layers the step does not select: "
        "model.layers.0.self_attn.o_proj, model.layers.1.self_attn.o_proj",
    )


def test_llama_mlp_compacts_to_the_masked_outputs_and_reloads_with_plain_from_pretrained(tmp_path):
    model = tiny_llama()
    apply_recipe(model, parse_recipe(LLAMA_MLP))
    masked = logits(model)
    result = compact(model)
    assert result.config == {"intermediate_size": 128} and model.config.intermediate_size == 128
    assert model.model.layers[1].mlp.down_proj.in_features == 128
    assert torch.allclose(logits(model), masked, atol=1e-5 * float(masked.abs().max()), rtol=0)
    model.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.allclose(logits(again), masked, atol=1e-5 * float(masked.abs().max()), rtol=0)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:  # the config says it all: no record in the folder
        assert "__prunerecipe_compaction__" not in list(f.keys())


def test_a_compacted_llama_state_dict_loads_into_a_model_built_from_the_first_config(tmp_path):
    model = tiny_llama()
    apply_recipe(model, parse_recipe(LLAMA_MLP.replace("steps:", "finalize: compact\nsteps:")))
    save_state_dict(model.state_dict(), tmp_path / "llama.safetensors")
    fresh = tiny_llama(seed=1)
    load_pruned_state_dict(fresh, read_state_dict(tmp_path / "llama.safetensors"))
    assert fresh.config.intermediate_size == 128
    assert torch.equal(logits(fresh), logits(model))


def test_layers_compacted_to_different_widths_leave_the_config_and_say_why(tmp_path):
    model = tiny_llama()
    apply_recipe(model, parse_recipe((MLP % '"model.layers.0.mlp.*"').replace("steps:", "finalize: compact\nsteps:")))
    assert model.config.intermediate_size == 256 and model.model.layers[0].mlp.gate_proj.out_features == 128
    report_notes = model.__dict__.get("_keys_to_ignore_on_save") or set()
    assert "__prunerecipe_compaction__" not in report_notes  # the record stays in what save_pretrained writes
    model = tiny_llama()
    apply_recipe(model, parse_recipe(MLP % '"model.layers.0.mlp.*"'))
    result = compact(model)
    (note,) = result.notes
    assert note.startswith("model.config was not updated: with intermediate_size = 128 the config would not describe this model")
    assert "model.layers.1.mlp.gate_proj.weight 256x64 (the config builds 128x64)" in note
    save_state_dict(model.state_dict(), tmp_path / "llama.pt")
    fresh = tiny_llama()
    load_pruned_state_dict(fresh, read_state_dict(tmp_path / "llama.pt"))
    assert torch.equal(logits(fresh), logits(model))


def test_attention_is_refused_at_plan_time():
    recipe = parse_recipe(MLP % '"model.layers.*.self_attn.q_proj"')
    with pytest.raises(RecipeError) as err:
        plan_recipe(tiny_llama(), recipe)
    (problem,) = err.value.problems
    assert problem.code == "unsupported" and problem.path == ("steps", 0, "select")
    assert "attention heads cannot be pruned by channel groups" in problem.message
    assert "model.layers.0.self_attn.q_proj (in model.layers.0.self_attn, LlamaAttention)" in problem.message


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.slow
def test_gpt2_conv1d_mlp_compacts_and_sets_n_inner(tmp_path):
    model = gpt2()
    ids = IDS % 64
    plan = plan_recipe(model, parse_recipe(MLP % '"*.mlp.c_fc", "*.mlp.c_proj"'))
    assert [m.describe() for m in plan.steps[0].groups[0].group.members] == [
        "transformer.h.0.mlp.c_fc (Conv1D, out)",
        "transformer.h.0.mlp.c_proj (Conv1D, in)",
    ]
    assert plan.steps[0].skipped_groups[0].startswith("transformer.h.0.mlp.c_proj: its channels leave transformer.h.0.mlp")
    apply_recipe(model, parse_recipe(MLP % '"*.mlp.c_fc", "*.mlp.c_proj"'), plan=plan)
    masked = logits(model, ids)
    assert torch.equal(model.transformer.h[0].mlp.c_fc.weight_mask.ne(0).any(0), model.transformer.h[0].mlp.c_proj.weight_mask.ne(0).any(1))
    result = compact(model)
    assert result.config == {"n_inner": 64} and model.transformer.h[0].mlp.c_fc.weight.shape == (32, 64)
    assert torch.allclose(logits(model, ids), masked, atol=1e-5 * float(masked.abs().max()), rtol=0)
    model.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.allclose(logits(again, ids), masked, atol=1e-5 * float(masked.abs().max()), rtol=0)


@pytest.mark.slow
def test_bert_intermediate_compacts_and_the_attention_output_is_refused(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=64, max_position_embeddings=32
    )
    model = transformers.BertModel(config).eval()
    with pytest.raises(RecipeError, match=r"encoder.layer.0.attention.output.dense \(in encoder.layer.0.attention, BertAttention\)"):
        plan_recipe(model, parse_recipe(MLP % '"*.intermediate.dense", "*.output.dense"'))
    recipe = parse_recipe(
        (MLP % "'*.intermediate.dense', 're:encoder[.]layer[.][0-9]+[.]output[.]dense'").replace("steps:", "finalize: compact\nsteps:")
    )
    ids = IDS % 64
    masked = parse_recipe(MLP % "'*.intermediate.dense', 're:encoder[.]layer[.][0-9]+[.]output[.]dense'")
    reference = transformers.BertModel(config).eval()
    reference.load_state_dict(model.state_dict())
    apply_recipe(reference, masked)
    report = apply_recipe(model, recipe)
    assert report.compaction is not None and report.compaction.config == {"intermediate_size": 32}
    with torch.no_grad():
        want = reference(ids).last_hidden_state
        assert torch.allclose(model(ids).last_hidden_state, want, atol=1e-5 * float(want.abs().max()), rtol=0)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        got = transformers.AutoModel.from_pretrained(tmp_path)(ids).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()), rtol=0)


@pytest.mark.parametrize("arch", ["distilbert", "bart-encoder"])
def test_other_width_keys_are_updated_so_from_pretrained_loads_the_compacted_folder(tmp_path, arch):
    # DistilBERT keeps its MLP width in hidden_dim; BART has one per stack (encoder_ffn_dim,
    # decoder_ffn_dim): only the encoder's is changed when only its MLPs were compacted
    torch.manual_seed(0)
    if arch == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=128, dim=32, hidden_dim=64, n_layers=2, n_heads=4)
        model, glob, expected = transformers.DistilBertModel(config).eval(), "transformer.layer.*.ffn.*", {"hidden_dim": 32}
    else:
        config = transformers.BartConfig(
            vocab_size=128, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4,
        )  # fmt: skip
        model, glob = transformers.BartModel(config).eval(), "encoder.layers.*.fc?"
        expected = {"encoder_ffn_dim": 32, "decoder_ffn_dim": 64}
    recipe = parse_recipe(
        "version: 1\nfinalize: compact\nsteps:\n"
        f"  - {{select: {{types: [Linear], names: ['{glob}']}}, method: ln_structured, amount: 0.5, scope: group, args: {{n: 2, dim: 0}}}}\n"
    )
    apply_recipe(model, recipe)
    assert {k: getattr(model.config, k) for k in expected} == expected
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).last_hidden_state, again(input_ids=ids).last_hidden_state, atol=1e-6)


def test_a_model_whose_code_cannot_run_on_meta_is_told_to_plan_with_weights():
    config = transformers.BartConfig(
        vocab_size=128, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4,
    )  # fmt: skip
    with torch.device("meta"):
        model = transformers.BartModel(config)
    recipe = parse_recipe(
        "version: 1\nsteps:\n"
        "  - {select: {types: [Linear], names: ['encoder.layers.*.fc?']}, method: ln_structured, amount: 0.5, scope: group, args: {n: 2, dim: 0}}\n"
    )
    with pytest.raises(RecipeError, match="meta device.*plan it with --weights"):
        plan_recipe(model, recipe)


def test_a_refused_group_names_norm_scales_by_their_parameter_in_model_order():
    """An RMSNorm's scale is a bare parameter to torch-pruning (its own placeholder name,
    'UnwrappedParameter_3'): the refusal names it as the model does, in model order."""
    model = tiny_llama()
    recipe = parse_recipe(
        "version: 1\ninputs: [{shape: [1, 16], dtype: int64}]\nfinalize: compact\nsteps:\n"
        "  - {select: {names: ['model.layers.*.mlp.down_proj']}, method: ln_structured, amount: 0.25, args: {n: 2, dim: 0}}\n"
    )
    with pytest.raises(RecipeError) as caught:
        apply_recipe(model, recipe)
    message = str(caught.value)
    assert "UnwrappedParameter" not in message
    norms = [
        f"model.layers.{i}.{n}.weight (a parameter used outside a layer)" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")
    ]
    positions = [message.index(n) for n in [*norms, "model.norm.weight (a parameter used outside a layer)"]]
    assert positions == sorted(positions) and message.index("model.embed_tokens (Embedding)") < positions[0]


def test_a_trace_failure_with_default_inputs_says_so_and_not_meta():
    """A ViT traced with the default batch of token ids: the message points at 'inputs:', and
    does not send the user to --weights (the same failure happens with real weights)."""
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=8)
    recipe = parse_recipe(
        "version: 1\nsteps:\n  - {select: {names: ['vit.layers.*.mlp.fc1', 'vit.layers.*.mlp.fc2']}, method: ln_structured, amount: 0.5, scope: group, args: {n: 2}}\n"
    )
    for device in ("meta", "cpu"):
        with torch.device(device):
            model = transformers.ViTForImageClassification(config)
        with pytest.raises(RecipeError) as caught:
            plan_recipe(model, recipe)
        assert "the recipe has no 'inputs:'" in str(caught.value) and "--weights" not in str(caught.value), device
