"""Models pruned by a recipe behave like models: copy, pickle, save/load, .to(), modes, round trips."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.utils.prune as prune

from prunerecipe import apply_recipe, load_pruned_state_dict, parse_recipe
from prunerecipe.zoo import LeNet

from .conftest import make_lenet

RECIPE = parse_recipe("""
version: 1
seed: 0
steps:
  - {select: {types: [Conv2d]}, params: [weight, bias], method: random_unstructured, amount: 0.3}
  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5, scope: global}
  - {select: {names: [fc1]}, method: ln_structured, amount: 0.25, args: {n: 2, dim: 0}}
""")

X = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def pruned_and_trained() -> torch.nn.Module:
    model = make_lenet()
    apply_recipe(model, RECIPE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(X).sum()  # a forward leaves non-leaf `weight` tensors behind in plain torch
    loss.backward()
    opt.step()
    model(X)
    return model


def same_masks(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.equal(x, y), name


def test_plain_torch_cannot_deepcopy_after_a_forward():
    model = LeNet()
    prune.l1_unstructured(model.fc1, "weight", amount=0.5)
    model(X)
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(model)


def test_deepcopy_after_forward_and_backward_keeps_masks_and_hooks():
    model = pruned_and_trained()
    clone = copy.deepcopy(model)
    same_masks(model, clone)
    assert torch.equal(clone(X), model(X))
    # the copy is independent and still pruned: training it keeps masked entries at zero
    opt = torch.optim.SGD(clone.parameters(), lr=0.5)
    clone(X).sum().backward()
    opt.step()
    assert torch.all(clone(X) == clone(X))
    assert torch.all(clone.fc1.weight[clone.fc1.weight_mask == 0] == 0)
    assert not torch.equal(clone.fc1.weight_orig, model.fc1.weight_orig)


def test_pickle_and_torch_save_whole_model():
    model = pruned_and_trained()
    same_masks(model, pickle.loads(pickle.dumps(model)))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)  # a whole pickled model: the test's own trusted file
    same_masks(model, loaded)
    assert torch.equal(loaded(X), model(X))


def test_a_pruned_model_is_freed_when_dropped_without_the_cycle_collector():
    """No reference cycle through the copy hook: ``del model`` frees the weights at once (with a
    cycle they would wait for the collector, GBs of them for a large model). Copies and
    unpickled models get hooks of their own, which copy their own state."""
    import gc
    import weakref

    model = pruned_and_trained()
    clone = copy.deepcopy(model)
    loaded = pickle.loads(pickle.dumps(model))
    for other in (clone, loaded):
        hook = other.fc1.__dict__["__getstate__"]
        assert hook.module is other.fc1
        state = hook()
        assert state["_parameters"]["weight_orig"] is other.fc1.weight_orig
        assert torch.equal(state["weight"], other.fc1.weight)
    gc.disable()
    try:
        refs = [weakref.ref(m.fc1) for m in (model, clone, loaded)]
        del model, clone, loaded, hook, other, state
        assert [r() for r in refs] == [None, None, None]
    finally:
        gc.enable()


def test_a_shallow_copy_outliving_its_pruned_original_says_so():
    import gc

    model = pruned_and_trained()
    alias = copy.copy(model.fc1)  # shares the original's state (and its copy hook)
    assert torch.equal(copy.deepcopy(alias).weight_orig, model.fc1.weight_orig)
    del model
    gc.collect()
    with pytest.raises(RuntimeError, match=r"shallow copy \(copy.copy\) of a pruned module that no longer exists"):
        copy.deepcopy(alias)


def test_to_dtype_and_device_train_eval_and_state_dict_round_trip():
    model = pruned_and_trained()
    model.eval()
    assert not model.training and all(not m.training for m in model.modules())
    model.train()
    doubled = copy.deepcopy(model).to(torch.float64)
    assert doubled.fc1.weight_orig.dtype == torch.float64 and doubled.fc1.weight_mask.dtype == torch.float64
    assert torch.allclose(doubled(X.double()).float(), model(X), atol=1e-5)
    fresh = LeNet()
    load_pruned_state_dict(fresh, model.state_dict())
    same_masks(model, fresh)
    assert torch.equal(fresh(X), model(X))
    copy.deepcopy(fresh)  # restored models are copyable too
    again = make_lenet()
    apply_recipe(again, RECIPE)
    again.load_state_dict(model.state_dict())  # torch's own loader into the same pruned layout
    same_masks(model, again)


def test_ema_style_averaging_works_on_a_pruned_model():
    model = pruned_and_trained()
    ema = torch.optim.swa_utils.AveragedModel(model)  # deep-copies the model
    ema.update_parameters(model)
    same_masks(model, ema.module)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_non_finite_weights_are_refused_naming_the_parameter(dtype):
    from prunerecipe import ApplyError

    model = make_lenet().to(dtype)
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
        model.fc2.weight[1, 1] = float("inf")
    before = {k: (id(v), v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    recipe = parse_recipe("version: 1\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n", "nan.yaml")
    with pytest.raises(ApplyError) as err:
        apply_recipe(model, recipe)
    assert str(err.value) == (
        "nan.yaml:3:5: steps[0]: fc2.weight has 1 NaN and 1 infinite entries; refusing to prune a diverged model "
        "(fix or re-initialize those weights first); nothing was changed"
    )
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and not any(prune.is_pruned(m) for m in model.modules())
    for key, (ident, value) in before.items():
        assert id(after[key]) == ident and torch.allclose(after[key], value, equal_nan=True), key


def test_large_finite_half_weights_are_not_mistaken_for_inf():
    model = make_lenet().half()
    with torch.no_grad():
        model.fc1.weight.fill_(60000.0)  # the fp16 sum overflows; every entry is finite
    apply_recipe(model, parse_recipe("version: 1\nsteps:\n  - {select: {names: [fc1]}, method: l1_unstructured, amount: 0.5}\n"))
    assert int((model.fc1.weight_mask == 0).sum()) == 24000


def test_plan_on_meta_device_allocates_nothing_and_runs_fast():
    import time

    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
    )
    start = time.perf_counter()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    assert params > 69e9 and all(p.is_meta for p in model.parameters())
    recipe = parse_recipe("""
version: 1
steps:
  - select: {types: [Linear], names: ["model.layers.*"], exclude: {names: ["*.self_attn.o_proj"]}}
    method: l1_unstructured
    sparsity: 0.5
  - select: {names: ["re:model\\\\.layers\\\\.[0-9]+\\\\.mlp\\\\.down_proj"]}
    method: ln_structured
    amount: 0.25
    args: {n: 2, dim: 1}
""")
    from prunerecipe import plan_recipe

    plan = plan_recipe(model, recipe)
    assert len(plan.steps[0].targets) == 80 * 6 and len(plan.steps[1].targets) == 80
    assert plan.steps[1].targets[0].to_prune == 7168
    assert "model.layers.0.mlp.down_proj.weight" in str(plan)
    assert time.perf_counter() - start < 60


def test_gradients_are_exactly_torchs_even_through_module_weight_after_forward():
    # a loss term that reads `module.weight` after the forward (an L1 penalty, say) must
    # still reach weight_orig, as with hand-written prune calls
    ours, theirs = make_lenet(), make_lenet()
    apply_recipe(ours, parse_recipe("version: 1\nsteps:\n  - {select: {names: [fc1]}, method: l1_unstructured, amount: 0.5}\n"))
    prune.l1_unstructured(theirs.fc1, "weight", amount=0.5)
    for m in (ours, theirs):
        (m(X).pow(2).sum() + 10 * m.fc1.weight.abs().sum()).backward()
    assert torch.equal(ours.fc1.weight_orig.grad, theirs.fc1.weight_orig.grad)
    copy.deepcopy(ours)  # and the model still copies right after
