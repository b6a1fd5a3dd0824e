"""The Lightning callback with a real Trainer on CPU: pruning, logging, checkpoint and resume."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune

pl = pytest.importorskip("lightning.pytorch")

from prunerecipe import parse_recipe  # noqa: E402
from prunerecipe.lightning import RecipePruning  # noqa: E402
from prunerecipe.zoo import DigitsNet  # noqa: E402

RECIPE = """
version: 1
name: lightning-test
steps:
  - name: first-conv
    select: {names: [net.conv1]}
    method: l1_unstructured
    amount: 0.25
  - name: gradual
    select: {types: [Linear]}
    method: l1_unstructured
    sparsity: 0.75
    scope: global
    schedule: {start: 0, end: 3, curve: cubic}
"""


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = DigitsNet()

    def training_step(self, batch, _):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 10, (96,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=False)


class Capture(pl.loggers.logger.Logger):
    def __init__(self):
        super().__init__()
        self.metrics: list[dict] = []

    @property
    def name(self):
        return "capture"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, *args, **kwargs):
        pass


def trainer(tmp_path, epochs, callbacks, logger=False):
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        deterministic=True,
    )


def test_callback_prunes_on_schedule_and_logs_sparsity(tmp_path):
    module = Module()
    logger = Capture()
    callback = RecipePruning(parse_recipe(RECIPE), finalize_on_fit_end=False)
    trainer(tmp_path, 4, [callback], logger).fit(module, loader())
    net = module.net
    assert float((net.conv1.weight_mask == 0).float().mean()) == pytest.approx(0.25, abs=0.01)
    total = sum(m.weight.numel() for m in (net.fc1, net.fc2))
    zeros = sum(int((m.weight_mask == 0).sum()) for m in (net.fc1, net.fc2))
    assert zeros == round(0.75 * total)
    logged = [m for m in logger.metrics if "sparsity/global" in m]
    assert logged and logged[-1]["sparsity/net.fc1.weight"] > 0.5
    globals_ = [float(m["sparsity/global"]) for m in logged]
    assert all(b >= a - 1e-6 for a, b in itertools.pairwise(globals_))  # sparsity only grows
    assert globals_[-1] > globals_[0]
    assert callback.pruner is not None and not callback.pruner.pending()


def test_resume_from_a_lightning_checkpoint_continues_exactly(tmp_path):
    straight = Module()
    trainer(tmp_path / "a", 4, [RecipePruning(parse_recipe(RECIPE), finalize_on_fit_end=False)]).fit(straight, loader())

    first = Module()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path / "b", 2, [RecipePruning(parse_recipe(RECIPE), finalize_on_fit_end=False), checkpoint]).fit(first, loader())
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    # the checkpoint's state_dict is plain, masked weights: it loads into a fresh, unpruned module
    plain = Module()
    plain.load_state_dict(saved["state_dict"])
    assert torch.equal(plain.net.fc1.weight, first.net.fc1.weight)

    resumed = Module()
    callback = RecipePruning(parse_recipe(RECIPE), finalize_on_fit_end=False)
    trainer(tmp_path / "c", 4, [callback]).fit(resumed, loader(), ckpt_path=last)
    for name in ("conv1", "fc1", "fc2"):
        a, b = getattr(straight.net, name), getattr(resumed.net, name)
        assert torch.equal(a.weight_mask, b.weight_mask), name
        assert torch.allclose(a.weight, b.weight, atol=1e-6), name
    assert prune.is_pruned(resumed.net.conv1)


class WithValidation(Module):
    def validation_step(self, batch, _):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("val_loss", loss)
        return loss


def test_validate_best_checkpoint_after_fit_and_copy_after_resume(tmp_path):
    import copy

    module = WithValidation()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_last=True)
    t = trainer(tmp_path, 4, [RecipePruning(parse_recipe(RECIPE), finalize_on_fit_end=False), checkpoint])
    t.fit(module, loader(), loader())
    results = t.validate(module, loader(), ckpt_path="best")  # the live module is still pruned
    assert results and "val_loss" in results[0]
    best = torch.load(checkpoint.best_model_path, weights_only=False)["state_dict"]
    assert torch.equal(module.net.fc1.weight, best["net.fc1.weight"])

    resumed = WithValidation()
    t2 = trainer(tmp_path / "r", 5, [RecipePruning(parse_recipe(RECIPE), finalize_on_fit_end=False)])
    t2.fit(resumed, loader(), loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    resumed.net(torch.zeros(1, 1, 8, 8))
    copy.deepcopy(resumed)  # restored masks are copyable too


class GettingWorse(WithValidation):
    def validation_step(self, batch, _):
        self.net(batch[0])
        self.log("val_loss", float(self.current_epoch))  # the first epoch's checkpoint stays the best


def test_validate_a_best_checkpoint_saved_before_the_layers_got_their_masks(tmp_path):
    # the best checkpoint predates fc1's first mask: the live module must still take it
    recipe = parse_recipe(RECIPE.replace("schedule: {start: 0,", "schedule: {start: 1,"))
    module = GettingWorse()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=1)
    t = trainer(tmp_path, 3, [RecipePruning(recipe, finalize_on_fit_end=False), checkpoint])
    t.fit(module, loader(), loader())
    assert checkpoint.best_model_path.endswith("epoch=0-step=3.ckpt") and prune.is_pruned(module.net.fc1)
    best = torch.load(checkpoint.best_model_path, weights_only=False)["state_dict"]
    assert bool((best["net.fc1.weight"] != 0).all())  # saved before fc1 was pruned
    results = t.validate(module, loader(), ckpt_path="best")
    assert results and torch.equal(module.net.fc1.weight, best["net.fc1.weight"])


def test_a_callback_checkpoint_is_read_by_report_and_apply(tmp_path):
    from click.testing import CliRunner

    from prunerecipe.cli import cli

    module = Module()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, 2, [RecipePruning(parse_recipe(RECIPE), finalize_on_fit_end=False), checkpoint]).fit(module, loader())
    last = str(tmp_path / "ckpt" / "last.ckpt")
    runner = CliRunner()
    done = runner.invoke(cli, ["report", "--weights", last, "--json"])
    assert done.exit_code == 0, done.output
    import json

    rows = {t["name"]: t for t in json.loads(done.output)["tensors"]}
    assert rows["net.conv1.weight"]["masked"] and rows["net.conv1.weight"]["zeros"] == int((module.net.conv1.weight_mask == 0).sum())
    # into a plain DigitsNet: the Lightning module's 'net.' prefix is removed, with a note, and the masks come back
    recipe = tmp_path / "more.yaml"
    recipe.write_text("version: 1\nsteps:\n  - {select: {names: [conv1]}, method: l1_unstructured, amount: 0.5}\n")
    out = tmp_path / "more.pt"
    done = runner.invoke(cli, ["apply", str(recipe), "--model", "prunerecipe.zoo:DigitsNet", "--weights", last, "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert "removed the key prefix 'net.'" in done.stderr
    state = torch.load(out, weights_only=True)
    before = int((module.net.conv1.weight_mask == 0).sum())
    assert int((state["conv1.weight_mask"] == 0).sum()) == before + round(0.5 * (module.net.conv1.weight.numel() - before))
    # nothing fits without the prefix, and the error says which prefix the keys have
    (tmp_path / "other.py").write_text("import torch\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(4, 4))\n")
    done = runner.invoke(cli, ["apply", str(recipe), "--model", f"{tmp_path / 'other.py'}:build", "--weights", last, "-o", str(tmp_path / "x.pt")])
    assert done.exit_code == 1 and "every key starts with 'net.'" in done.output and "see --strip-prefix" in done.output


@pytest.mark.slow
def test_ddp_and_ddp_spawn_give_every_rank_the_single_process_masks(tmp_path):
    """RecipePruning under Trainer(strategy=ddp_spawn / ddp, accelerator=cpu, devices=2), with a
    global step on a schedule and unseeded random steps on ranks whose generators differ: every
    rank ends with the masks of a one-process run (the weights stay equal: the learning rate is 0)."""
    import subprocess
    import sys

    from .conftest import ROOT

    script = ROOT / "tests" / "lightning_ddp.py"
    runs = {
        mode: subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), mode], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path
        )
        for mode in ("single", "ddp_spawn", "ddp")
    }
    for mode, run in runs.items():
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, (mode, err[-3000:])
    single = torch.load(tmp_path / "single-0.pt", weights_only=True)
    assert set(single) == {f"net.{n}_mask" for n in ("conv1.weight", "conv1.bias", "conv2.weight", "fc1.weight", "fc2.weight")}
    for mode in ("ddp_spawn", "ddp"):
        for rank in (0, 1):
            got = torch.load(tmp_path / f"{mode}-{rank}.pt", weights_only=True)
            assert set(got) == set(single), (mode, rank)
            for name, mask in single.items():
                assert torch.equal(got[name], mask), (mode, rank, name)


class Validated(Module):
    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))


def test_finalize_on_fit_end_makes_pruning_permanent_by_default_as_model_pruning_does(tmp_path):
    module = Module()
    trainer(tmp_path, 4, [RecipePruning(parse_recipe(RECIPE))]).fit(module, loader())
    net = module.net
    for layer in (net.conv1, net.fc1, net.fc2):  # plain parameters, no hooks: what prune.remove leaves
        assert isinstance(layer.weight, torch.nn.Parameter) and not hasattr(layer, "weight_mask") and not layer._forward_pre_hooks
    kept = Module()  # the same run with the option off: equal effective weights, masks kept
    trainer(tmp_path / "kept", 4, [RecipePruning(parse_recipe(RECIPE), finalize_on_fit_end=False)]).fit(kept, loader())
    for a, b in ((net.conv1, kept.net.conv1), (net.fc1, kept.net.fc1), (net.fc2, kept.net.fc2)):
        assert torch.equal(a.weight, b.weight_orig * b.weight_mask)  # `b.weight` is stale after the last optimizer step


def test_on_validation_end_prunes_after_validation_not_during_the_sanity_check(tmp_path):
    events = []

    class Spy(RecipePruning):
        def _epoch_events(self, trainer, pl_module):
            events.append((trainer.current_epoch, trainer.sanity_checking, trainer.state.stage.value))
            super()._epoch_events(trainer, pl_module)

    module = Validated()
    callback = Spy(parse_recipe(RECIPE), on="validation_end", finalize_on_fit_end=False)
    t = trainer(tmp_path, 4, [callback])
    t.fit(module, loader(), loader())
    assert [e[0] for e in events] == [0, 1, 2, 3] and not any(e[1] for e in events)
    assert all(stage == "validate" for _, _, stage in events)  # from the validation hook, not train epoch end
    baseline = Module()
    trainer(tmp_path / "b", 4, [RecipePruning(parse_recipe(RECIPE), finalize_on_fit_end=False)]).fit(baseline, loader())
    zeros = sum(int((m.weight_mask == 0).sum()) for m in (module.net.fc1, module.net.fc2))
    assert zeros == sum(int((m.weight_mask == 0).sum()) for m in (baseline.net.fc1, baseline.net.fc2))
    with pytest.raises(ValueError, match="validation_end"):
        RecipePruning(parse_recipe(RECIPE), on="val_end")


def test_verbose_logs_model_pruning_style_lines(tmp_path, caplog):
    import logging

    module = Module()
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, 4, [RecipePruning(parse_recipe(RECIPE), verbose=2)]).fit(module, loader())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Applied")]
    total = module.net.fc1.weight.numel() + module.net.fc2.weight.numel()
    events = [line for line in lines if line.startswith("Applied L1Unstructured (step 'gradual'): pruned ")]
    assert len(events) == 4  # epochs 0..3
    assert events[0].startswith(f"Applied L1Unstructured (step 'gradual'): pruned 0/{total} (0.00%) -> ")
    final = round(0.75 * total)
    assert events[-1].endswith(f"-> {final}/{total} ({final / total:.2%})")
    assert any(line.startswith("Applied L1Unstructured to net.fc1.weight: pruned ") for line in lines)  # verbose=2: per parameter
    with pytest.raises(ValueError, match="verbose"):
        RecipePruning(parse_recipe(RECIPE), verbose=3)


def test_verbose_logs_the_steps_that_run_at_fit_start(tmp_path, caplog):
    """Steps without a schedule run as the Pruner is created (fit start): one line for them."""
    import logging

    recipe = parse_recipe(
        "version: 1\nsteps:\n"
        "  - {name: once, select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n"
        "  - {name: again, select: {names: [net.fc1]}, method: random_unstructured, amount: 0.5, seed: 0}\n"
        "  - {name: later, select: {types: [Linear]}, method: l1_unstructured, amount: 0.2, schedule: {start: 0, end: 0}}\n"
    )
    module = Module()
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, 1, [RecipePruning(recipe, verbose=2, finalize_on_fit_end=False)]).fit(module, loader())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Applied")]
    fc1, fc2 = module.net.fc1.weight.numel(), module.net.fc2.weight.numel()
    # fc1: half, then half of the rest (3/4); fc2: half
    at_start = round(0.5 * fc1) + round(0.5 * round(0.5 * fc1)) + round(0.5 * fc2)
    total = fc1 + fc2
    assert lines[0] == (
        f"Applied L1Unstructured, RandomUnstructured (unscheduled steps 'once', 'again', at fit start): "
        f"pruned 0/{total} (0.00%) -> {at_start}/{total} ({at_start / total:.2%})"
    )
    assert lines[1].startswith("Applied L1Unstructured, RandomUnstructured to net.fc1.weight: pruned 0/")
    assert lines[3].startswith(f"Applied L1Unstructured (step 'later'): pruned {at_start}/{total} ")


def test_verbose_counts_masked_entries_as_model_pruning_does_not_zero_weights(tmp_path, caplog):
    import logging

    from lightning.pytorch.callbacks import ModelPruning

    recipe = parse_recipe(
        "version: 1\nsteps:\n  - {select: {types: [Linear]}, params: [bias], method: l1_unstructured, amount: 0.25, schedule: {start: 0, end: 0}}\n"
    )
    lines = {}
    for name, callback in (
        ("ours", RecipePruning(recipe, verbose=1, finalize_on_fit_end=False)),
        ("theirs", ModelPruning("l1_unstructured", amount=0.25, parameter_names=["bias"], verbose=1, make_pruning_permanent=False)),
    ):
        module = Module()
        with torch.no_grad():  # zeros of the weights themselves: not pruned, not masked
            module.net.fc1.bias[:6] = 0
        caplog.clear()
        with caplog.at_level(logging.INFO):
            trainer(tmp_path / name, 1, [callback]).fit(module, loader())
        lines[name] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Applied")]
    ours, theirs = lines["ours"][0], lines["theirs"][0]
    # ModelPruning (here over every module's bias) starts from 0 despite the 6 zero biases; so do we
    assert theirs.split(" Pruned: ")[1].startswith("0/"), theirs
    assert ours.endswith(": pruned 0/74 (0.00%) -> 18/74 (24.32%)"), ours  # 25% of each Linear bias: 16 + 2


LOTTERY = RECIPE.replace("name: lightning-test", "name: lightning-test\nlottery_ticket: true")


def test_resample_rewinds_to_fresh_values_from_reset_parameters(tmp_path):
    from prunerecipe import Pruner

    with pytest.raises(ValueError, match="lottery_ticket"):
        RecipePruning(parse_recipe(RECIPE), resample=True)

    def run(resample, seed):
        module = Module()
        initial = module.net.fc1.weight.detach().clone()
        torch.manual_seed(seed)
        callback = RecipePruning(parse_recipe(LOTTERY), resample=resample, finalize_on_fit_end=False)
        trainer(tmp_path / f"{resample}{seed}", 4, [callback]).fit(module, loader())
        return module.net.fc1, initial

    fc1, initial = run(False, 0)
    kept = fc1.weight_mask.bool()
    assert torch.equal(fc1.weight_orig[kept], initial[kept])  # the plain rewind: initial values
    fc1, initial = run(True, 0)
    kept = fc1.weight_mask.bool()
    assert not torch.equal(fc1.weight_orig[kept], initial[kept])
    # the fresh values are what reset_parameters draws: Linear's kaiming-uniform bound
    bound = 1 / fc1.in_features**0.5
    assert float(fc1.weight_orig.abs().max()) <= bound + 1e-6 and torch.equal(fc1.weight, fc1.weight_orig * fc1.weight_mask)
    # the Pruner itself takes the option, and refuses it without a lottery ticket
    with pytest.raises(ValueError, match="lottery_ticket"):
        Pruner(DigitsNet(), parse_recipe(RECIPE.replace("net.", "")), resample=True)


def test_a_fit_that_ends_before_the_schedule_says_so(tmp_path):
    module = Module()
    with pytest.warns(
        UserWarning, match=r"fitting ended with 2 pruning event\(s\) of the recipe not run \(the next: steps\[1\] \(gradual\) at epoch 2\)"
    ):
        trainer(tmp_path, 2, [RecipePruning(parse_recipe(RECIPE))]).fit(module, loader())
    total = module.net.fc1.weight.numel() + module.net.fc2.weight.numel()
    zeros = int((module.net.fc1.weight == 0).sum() + (module.net.fc2.weight == 0).sum())
    assert zeros < 0.75 * total  # as it stands: the schedule's last events never ran
