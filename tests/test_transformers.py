"""Recipes on Hugging Face transformers models built from configs (random weights, no downloads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as prune

from prunerecipe import RecipeError, apply_recipe, parse_recipe, plan_recipe

from .conftest import assert_same_pruning, pruning_history

transformers = pytest.importorskip("transformers")


def gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


CONV1D_RECIPE = """
version: 1
steps:
  - name: attention-and-mlp
    select: {types: [%s], names: ["transformer.h.*"], exclude: {names: ["*.c_proj"]}}
    method: l1_unstructured
    amount: 0.3
  - name: mlp-out-channels
    select: {names: ["re:transformer\\\\.h\\\\.[0-9]+\\\\.mlp\\\\.c_proj"]}
    method: ln_structured
    amount: 0.25
    args: {n: 2, dim: 1}
"""


@pytest.mark.parametrize("type_entry", ["Conv1D", "transformers.pytorch_utils.Conv1D"])
def test_gpt2_custom_conv1d_layers_selected_by_class(type_entry):
    ours, theirs = gpt2(), gpt2()
    recipe = parse_recipe(CONV1D_RECIPE % type_entry)
    plan = plan_recipe(ours, recipe)
    assert [t.qualname for t in plan.steps[0].targets] == [f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")]
    apply_recipe(ours, recipe, plan=plan)

    conv1d = transformers.pytorch_utils.Conv1D
    for name, module in theirs.named_modules():
        if isinstance(module, conv1d) and name.startswith("transformer.h.") and not name.endswith(".c_proj"):
            prune.l1_unstructured(module, "weight", amount=0.3)
    for i in range(2):
        prune.ln_structured(theirs.transformer.h[i].mlp.c_proj, "weight", amount=0.25, n=2, dim=1)
    assert_same_pruning(ours, theirs)

    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits)
    mask = ours.transformer.h[0].attn.c_attn.weight_mask
    assert int((mask == 0).sum()) == round(0.3 * mask.numel())


def test_gpt2_tied_lm_head_is_refused_naming_both_owners():
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    recipe = parse_recipe("version: 1\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n", "tied.yaml")
    with pytest.raises(
        RecipeError,
        match=r"parameter lm_head.weight is tied: one tensor shared by transformer.wte.weight, lm_head.weight; .*`exclude: \{names: \[lm_head\]\}`",
    ):
        plan_recipe(model, recipe)


def test_bert_global_pruning_over_attention_projections():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=32
    )
    ours = transformers.BertModel(config).eval()
    theirs = transformers.BertModel(config).eval()
    theirs.load_state_dict(ours.state_dict())
    recipe = parse_recipe("""
version: 1
steps:
  - select: {names: ["encoder.layer.*.attention.self.*"], types: [Linear]}
    method: l1_unstructured
    sparsity: 0.6
    scope: global
""")
    report = apply_recipe(ours, recipe)
    params = [(m, "weight") for n, m in theirs.named_modules() if ".attention.self." in n and isinstance(m, torch.nn.Linear)]
    assert len(params) == 6
    total = sum(m.weight.numel() for m, _ in params)
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=round(0.6 * total))
    assert_same_pruning(ours, theirs)
    assert abs(report.global_after - round(0.6 * total) / total) < 1e-9
    assert pruning_history(ours.encoder.layer[0].attention.self.query, "weight") == [prune.CustomFromMask]


def test_zero_initialized_biases_tie_everywhere_and_still_match_torch():
    # found in review: GPT-2's biases start at zero, so every entry ties at the cut
    ours, theirs = gpt2(), gpt2()
    recipe = parse_recipe("version: 1\nsteps:\n  - {select: {types: [Conv1D]}, params: [weight, bias], method: l1_unstructured, amount: 0.3}\n")
    apply_recipe(ours, recipe)
    conv1d = transformers.pytorch_utils.Conv1D
    for _, module in theirs.named_modules():
        if isinstance(module, conv1d):
            prune.l1_unstructured(module, "weight", amount=0.3)
            prune.l1_unstructured(module, "bias", amount=0.3)
    assert_same_pruning(ours, theirs)


def _tiny(kind: str, seed: int = 0):
    """Small random models of several families, built from configs (no downloads)."""
    torch.manual_seed(seed)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        )
        return transformers.LlamaForCausalLM(config).eval()
    if kind == "t5":
        config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
        return transformers.T5ForConditionalGeneration(config).eval()
    if kind == "opt":
        config = transformers.OPTConfig(
            vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32
        )
        return transformers.OPTForCausalLM(config).eval()
    if kind == "vit":
        config = transformers.ViTConfig(
            image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_labels=3
        )
        return transformers.ViTForImageClassification(config).eval()
    if kind == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=64, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64)
        return transformers.DistilBertForSequenceClassification(config).eval()
    raise AssertionError(kind)


FAMILY_RECIPE = """
version: 1
steps:
  - name: every-linear-but-the-head
    select: {types: [torch.nn.Linear], exclude: {names: ["lm_head", "classifier", "pre_classifier", "re:.*(score|head)$"]}}
    method: l1_unstructured
    amount: 0.3
  - name: attention-global
    select: {types: [Linear], names: ["*attn*", "*attention*", "*SelfAttention*"]}
    method: l1_unstructured
    sparsity: 0.6
    scope: global
  - name: mlp-rows
    select: {names: ["re:.*(mlp\\\\.up_proj|fc1|DenseReluDense\\\\.wi|intermediate\\\\.dense|lin1)"]}
    method: ln_structured
    amount: 0.25
    args: {n: 1, dim: 0}
"""


@pytest.mark.parametrize("kind", ["llama", "t5", "opt", "vit", "distilbert"])
def test_model_families_equal_hand_written_torch(kind):
    # Each family's own layer names and classes, three kinds of step chained on the same
    # tensors: the result must be what the same torch calls by hand leave, mask for mask.
    import fnmatch
    import re

    ours, theirs = _tiny(kind), _tiny(kind)
    report = apply_recipe(ours, parse_recipe(FAMILY_RECIPE))
    assert report.global_after > 0.25

    linears = [(n, m) for n, m in theirs.named_modules() if isinstance(m, torch.nn.Linear)]
    heads = re.compile(r".*(score|head)$")
    for name, module in linears:
        if name not in ("lm_head", "classifier", "pre_classifier") and not heads.fullmatch(name):
            prune.l1_unstructured(module, "weight", amount=0.3)
    group = [m for n, m in linears if any(fnmatch.fnmatchcase(n, g) for g in ("*attn*", "*attention*", "*SelfAttention*"))]
    total = sum(m.weight_orig.numel() if hasattr(m, "weight_orig") else m.weight.numel() for m in group)
    done = sum(int((m.weight_mask == 0).sum()) if hasattr(m, "weight_mask") else 0 for m in group)
    prune.global_unstructured([(m, "weight") for m in group], pruning_method=prune.L1Unstructured, amount=round(0.6 * total) - done)
    rows = re.compile(r".*(mlp\.up_proj|fc1|DenseReluDense\.wi|intermediate\.dense|lin1)")
    for name, module in theirs.named_modules():
        if rows.fullmatch(name):
            prune.ln_structured(module, "weight", amount=0.25, n=1, dim=0)
    assert_same_pruning(ours, theirs)
    assert group and len(pruning_history(group[0], "weight")) == 2  # local, then global: one container


@pytest.mark.parametrize("kind", ["t5", "opt"])
def test_tied_embeddings_of_other_families_are_refused_with_every_owner(kind):
    model = _tiny(kind)
    owners = [n for n, p in model.named_parameters(remove_duplicate=False) if p is model.get_input_embeddings().weight]
    assert len(owners) > 1
    with pytest.raises(RecipeError) as err:
        plan_recipe(model, parse_recipe("version: 1\nsteps:\n  - {select: {types: [Embedding]}, method: l1_unstructured, amount: 0.5}\n"))
    for owner in owners:
        assert owner in str(err.value)
