"""Dense vs one-shot vs gradual pruning to 90% on scikit-learn's digits, side by side.

Same model (prunerecipe.zoo.DigitsNet), data split, seeds and epoch budget for every variant:

- dense:            all epochs without pruning
- one-shot + FT:    dense until epoch E_prune, global L1 90% at once, fine-tune the rest
- one-shot, no FT:  the same cut at the very end, no fine-tuning
- gradual (ours):   recipes/digits-gradual.yaml driven by prunerecipe.Pruner, cubic ramp
- Lightning ModelPruning: global L1 with a per-epoch amount that follows the same cubic
  targets, as closely as its API allows (skipped when Lightning is not installed)

    python examples/digits/compare.py                  # full run, prints a markdown table
    python examples/digits/compare.py --write          # ... and writes examples/digits/RESULTS.md
    python examples/digits/compare.py --quick          # a short run (the test suite uses it)

No download: the digits data set ships inside scikit-learn.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import prunerecipe
from prunerecipe.schedule import target_at
from prunerecipe.zoo import DigitsNet

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent.parent / "recipes" / "digits-gradual.yaml"


def load_digits_tensors(seed: int = 0):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    cut = int(0.8 * len(y))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def train_epoch(model, opt, train, epoch: int, seed: int) -> None:
    x, y = train
    model.train()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    for i in range(0, len(y), 64):
        idx = order[i : i + 64]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


@torch.no_grad()
def accuracy(model, test) -> float:
    model.eval()
    x, y = test
    return float((model(x).argmax(1) == y).float().mean())


def weight_sparsity(model) -> float:
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            w = m.weight
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total


def fresh(seed: int):
    torch.manual_seed(seed)
    model = DigitsNet()
    return model, torch.optim.Adam(model.parameters(), lr=2e-3)


def run_dense(seed, epochs, train, test, **_):
    model, opt = fresh(seed)
    for e in range(epochs):
        train_epoch(model, opt, train, e, seed)
    return model


def one_shot(model, sparsity: float) -> None:
    recipe = prunerecipe.recipe_from_dict(
        {"version": 1, "steps": [{"select": {"types": ["Conv2d", "Linear"]}, "method": "l1_unstructured", "sparsity": sparsity, "scope": "global"}]}
    )
    prunerecipe.apply_recipe(model, recipe)


def run_one_shot(seed, epochs, train, test, prune_at, **_):
    model, opt = fresh(seed)
    for e in range(epochs):
        if e == prune_at:
            one_shot(model, 0.9)
        train_epoch(model, opt, train, e, seed)
    return model


def run_one_shot_no_ft(seed, epochs, train, test, **_):
    model = run_dense(seed, epochs, train, test)
    one_shot(model, 0.9)
    return model


def run_gradual(seed, epochs, train, test, start, end, **_):
    model, opt = fresh(seed)
    recipe = prunerecipe.load_recipe(RECIPE, overrides={"start": start, "end": end})
    pruner = prunerecipe.Pruner(model, recipe)
    for e in range(epochs):
        train_epoch(model, opt, train, e, seed)
        pruner.step(epoch=e)
    return model


def run_lightning(seed, epochs, train, test, start, end, **_):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelPruning

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.net = DigitsNet()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=2e-3)

    schedule = prunerecipe.Schedule(start=start, end=end, curve="cubic")

    def amount(epoch: int) -> float:
        # ModelPruning prunes a fraction of what is left at each epoch: follow the cubic targets.
        if epoch < start or epoch > end:
            return 0.0
        now = target_at(schedule, 0.9, epoch)
        before = target_at(schedule, 0.9, epoch - 1) if epoch > start else 0.0
        return max(0.0, 1.0 - (1.0 - now) / (1.0 - before))

    module = Module()
    params = [(m, "weight") for m in module.net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    callback = ModelPruning("l1_unstructured", parameters_to_prune=params, amount=amount, use_global_unstructured=True, verbose=0)
    x, y = train
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, loader)
    return module.net


VARIANTS = {
    "dense": run_dense,
    "one-shot 90% + fine-tune": run_one_shot,
    "one-shot 90%, no fine-tune": run_one_shot_no_ft,
    "gradual cubic 90% (prunerecipe)": run_gradual,
    "Lightning ModelPruning (cubic amounts)": run_lightning,
}


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run: 8 epochs, 1 seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--write", action="store_true", help="write examples/digits/RESULTS.md")
    args = parser.parse_args(argv)
    epochs, seeds = (8, 1) if args.quick else (args.epochs, args.seeds)
    # The pruning window: the middle of training; one-shot cuts where the gradual ramp ends.
    start, end = epochs // 6, epochs * 7 // 12
    torch.set_num_threads(min(2, torch.get_num_threads()))
    train, test = load_digits_tensors()
    results: dict[str, tuple[float, float]] = {}
    began = time.perf_counter()
    for name, fn in VARIANTS.items():
        accs, sparsities = [], []
        for seed in range(seeds):
            try:
                model = fn(seed, epochs, train, test, prune_at=end, start=start, end=end)
            except ImportError as exc:
                print(f"skipped {name}: {exc}")
                break
            accs.append(accuracy(model, test))
            sparsities.append(weight_sparsity(model))
        if accs:
            results[name] = (statistics.mean(accs), statistics.mean(sparsities))
    elapsed = time.perf_counter() - began

    lines = [
        f"{epochs} epochs, {seeds} seed(s), Adam lr 2e-3, batch 64; pruning window epochs {start}-{end} "
        f"(one-shot with fine-tuning cuts at epoch {end}); test split: 20% of 1797 digits.",
        "",
        "| variant | test accuracy (mean) | weight sparsity |",
        "|---|---|---|",
    ]
    for name, (acc, sp) in results.items():
        lines.append(f"| {name} | {100 * acc:.2f}% | {100 * sp:.1f}% |")
    lines.append("")
    lines.append(f"took {elapsed:.0f} s on {platform.processor() or platform.machine()}, torch {torch.__version__}")
    text = "\n".join(lines)
    print(text)
    if args.write:
        header = (
            "# Digits: dense vs one-shot vs gradual pruning to 90%\n\n"
            "Produced by `python examples/digits/compare.py --write` (a real run; numbers are means over seeds).\n\n"
        )
        (HERE / "RESULTS.md").write_text(header + text + "\n")
    return results


if __name__ == "__main__":
    main()
