from __future__ import annotations

import os
import sys

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


@pytest.mark.parametrize("shard", [".", "", "..", "model.safetensors.index.json", "other.index.json", "notes.txt"])
def test_an_index_naming_no_weights_file_of_its_folder_is_refused_never_followed(tmp_path, shard):
    # '.' and the index itself recursed without end; '..' read the parent folder's weights
    import json

    from safetensors.torch import save_file

    save_file({"v": torch.full((2,), 7.0)}, tmp_path / "model.safetensors")  # outside the index's folder
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, folder / "a.safetensors")
    (folder / "other.index.json").write_text(json.dumps({"weight_map": {"w": "a.safetensors"}}))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "a.safetensors", "v": shard}}))
    with pytest.raises(CheckpointError, match=f"{index}: shard {shard!r} is not a (file name in this folder|weights file)"):
        read_state_dict(index)


def test_tampered_tied_metadata_is_a_checkpoint_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "t.safetensors"
    save_file({"w": torch.ones(2)}, path, metadata={"prunerecipe.tied": '{"alias": ["w"]}'})
    with pytest.raises(CheckpointError, match="its 'prunerecipe.tied' metadata is not valid"):
        read_state_dict(path)


def test_a_pickled_model_or_a_torch_function_is_named_as_what_torch_refused(tmp_path):
    import pickle

    whole = tmp_path / "whole.pt"
    torch.save(nn.Sequential(nn.Linear(2, 2)), whole)  # protocol 2: builtins spelled __builtin__
    with pytest.raises(CheckpointError) as info:
        read_state_dict(whole)
    assert "references code (torch.nn.modules.container.Sequential)" in str(info.value)
    assert "a pickled object, not a state_dict: save model.state_dict() instead" in str(info.value)

    class Hub:
        def __reduce__(self):
            return (torch.hub.load, ("x/y", "z"))

    hub = tmp_path / "hub.pt"
    hub.write_bytes(pickle.dumps({"w": Hub()}))
    with pytest.raises(CheckpointError, match=r"references code \(torch\.hub\.load\).*Nothing in it was run"):
        read_state_dict(hub)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_device_named_as_weights_is_refused_before_reading(tmp_path):
    link = tmp_path / "x.pt"
    link.symlink_to("/dev/zero")  # read whole, it would never end
    with pytest.raises(CheckpointError, match="is not a regular file"):
        read_state_dict(link)


@pytest.mark.skipif(sys.platform != "linux", reason="non-UTF-8 file names are a Linux thing")
def test_safetensors_under_a_path_that_is_not_utf8_are_read(tmp_path):
    from safetensors.torch import save_file

    folder = os.path.join(os.fsencode(tmp_path), b"w\xff")
    try:
        os.mkdir(folder)
    except OSError:
        pytest.skip("this file system refuses such names")
    path = os.fsdecode(os.path.join(folder, b"w.safetensors"))
    save_file({"w": torch.arange(4.0)}, os.path.join(os.fsdecode(tmp_path), "plain.safetensors"))
    os.replace(os.path.join(os.fsdecode(tmp_path), "plain.safetensors"), path)
    assert torch.equal(read_state_dict(path)["w"], torch.arange(4.0))
