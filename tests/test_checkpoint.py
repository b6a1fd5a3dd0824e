from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from prunerecipe import CheckpointError, apply_recipe, load_pruned_state_dict, parse_recipe, read_state_dict, save_state_dict
from prunerecipe.zoo import LeNet

from .conftest import assert_same_pruning, make_lenet, pruning_history
from .test_apply import assert_same_fingerprint, fingerprint


def test_pruned_checkpoint_restores_masks_and_pruning_continues(tmp_path):
    model = make_lenet()
    apply_recipe(model, parse_recipe("version: 1\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n"))
    save_state_dict(model.state_dict(), tmp_path / "p.pt")
    fresh = LeNet()
    restored = load_pruned_state_dict(fresh, read_state_dict(tmp_path / "p.pt"))
    assert restored == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert list(fresh.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    assert torch.equal(fresh.fc1.weight, model.fc1.weight)  # the computed weight is refreshed
    assert pruning_history(fresh.fc1, "weight") == [prune.CustomFromMask]
    apply_recipe(fresh, parse_recipe("version: 1\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n"))
    assert float((fresh.fc1.weight_mask == 0).float().mean()) == 0.75


def test_failed_load_leaves_the_model_untouched(tmp_path):
    model = LeNet()
    before = fingerprint(model)
    # fc3 comes last: every earlier tensor would already have been copied in by load_state_dict
    meta = {k: v.to("meta") if k.startswith("fc3") else v * 0 + 7 for k, v in LeNet().state_dict().items()}
    with pytest.raises(CheckpointError, match="unusable values: fc3.weight: it is a meta tensor"):
        load_pruned_state_dict(model, meta)
    assert_same_fingerprint(fingerprint(model), before)
    torch.save(meta, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="tensors without data"):
        read_state_dict(tmp_path / "meta.pt")


class SharedModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a
        self.c = nn.Linear(4, 4)


def test_a_module_registered_twice_reloads_its_own_pruned_checkpoint():
    torch.manual_seed(0)
    model = SharedModule()
    apply_recipe(model, parse_recipe("version: 1\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n"))
    state = model.state_dict()
    assert "b.weight_orig" in state and "a.weight_orig" in state
    fresh = SharedModule()
    assert load_pruned_state_dict(fresh, state) == ["a.weight", "b.weight", "c.weight"]
    assert torch.equal(fresh.a.weight_mask, model.a.weight_mask) and fresh.a is fresh.b
    assert pruning_history(fresh.a, "weight") == [prune.CustomFromMask]


def test_data_parallel_prefix_and_lightning_wrapper(tmp_path):
    model = make_lenet()
    wrapped = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": wrapped, "epoch": 3}, tmp_path / "lightning.pt")
    fresh = LeNet()
    load_pruned_state_dict(fresh, read_state_dict(tmp_path / "lightning.pt"))
    assert torch.equal(fresh.fc1.weight, model.fc1.weight)


def test_save_never_overwrites_without_force_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "x.pt"
    save_state_dict(LeNet().state_dict(), path)
    first = path.read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        save_state_dict(LeNet().state_dict(), path)
    assert path.read_bytes() == first
    save_state_dict(LeNet().state_dict(), path, force=True)
    assert path.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]
    with pytest.raises(CheckpointError, match="unsupported output type '.txt'"):
        save_state_dict({}, tmp_path / "x.txt")


def test_weight_orig_as_a_param_name_is_refused_on_a_pruned_model():
    from prunerecipe import RecipeError, plan_recipe

    model = make_lenet()
    prune.l1_unstructured(model.fc1, "weight", amount=0.5)
    with pytest.raises(
        RecipeError,
        match=r"steps\[0\].params: fc1.weight_orig is the saved original of the pruned parameter fc1.weight; name the parameter itself \('weight'\)",
    ):
        plan_recipe(
            model, parse_recipe("version: 1\nsteps:\n  - {select: {names: [fc1]}, params: [weight_orig], method: l1_unstructured, amount: 0.5}\n")
        )


def test_equivalence_survives_a_checkpoint_round_trip(tmp_path):
    ours, theirs = make_lenet(), make_lenet()
    recipe = parse_recipe("version: 1\nsteps:\n  - {select: {names: [conv1]}, method: ln_structured, amount: 2, args: {n: 1, dim: 0}}\n")
    apply_recipe(ours, recipe)
    prune.ln_structured(theirs.conv1, "weight", amount=2, n=1, dim=0)
    assert_same_pruning(ours, theirs)


def test_tampered_masks_and_garbage_files_are_refused_clearly(tmp_path):
    model = make_lenet()
    apply_recipe(model, parse_recipe("version: 1\nsteps:\n  - {select: {names: [fc1]}, method: l1_unstructured, amount: 0.5}\n"))
    state = model.state_dict()
    state["fc1.weight_mask"] = torch.full_like(state["fc1.weight_mask"], 0.5)
    fresh = LeNet()
    before = fingerprint(fresh)
    with pytest.raises(CheckpointError, match="masks must hold only 0 and 1 .*: fc1.weight_mask"):
        load_pruned_state_dict(fresh, state)
    assert_same_fingerprint(fingerprint(fresh), before)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        read_state_dict(garbage)


def test_apply_on_a_meta_model_says_so():
    from prunerecipe import ApplyError

    with torch.device("meta"):
        model = LeNet()
    with pytest.raises(ApplyError, match="fc1.weight is on the meta device"):
        apply_recipe(model, parse_recipe("version: 1\nsteps:\n  - {select: {names: [fc1]}, method: l1_unstructured, amount: 0.5}\n"))


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("zipped", [True, False])
def test_code_carrying_pickles_of_every_protocol_are_refused_not_called_corrupted(tmp_path, protocol, zipped):
    import io
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    if zipped:
        torch.save({"w": Evil()}, path, pickle_protocol=protocol)
    else:
        buf = io.BytesIO()
        pickle.dump({"w": Evil()}, buf, protocol=protocol)
        path.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match=r"refused to load: the file references code \((posix|nt)\.system\).*Nothing in it was run"):
        read_state_dict(path)


def test_an_explicit_key_prefix_is_removed_and_a_wrong_one_is_named(tmp_path):
    from prunerecipe.checkpoint import fit_prefix

    model = LeNet()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    fitted, removed = fit_prefix(state, model, "model.")
    assert removed == "model." and set(fitted) == set(model.state_dict())
    assert load_pruned_state_dict(LeNet(), state, strip_prefix="model.") == []
    with pytest.raises(CheckpointError, match=r"no key of the checkpoint starts with 'net\.'.*start with 'model\.'"):
        fit_prefix(state, model, "net.")
