"""A Lightning run with prunerecipe's callback, as a script (``python tests/lightning_ddp.py OUT
MODE``): MODE is ``single`` (one process), ``ddp_spawn`` or ``ddp`` (two CPU processes; ``ddp``
starts the second by running this script again). Each rank saves its masks to ``OUT``. The
learning rate is 0, so the weights stay those of the start and every run must give the same
masks. Each rank's generator differs before fitting and before each epoch, except rank 0's,
which is what a single process has: unseeded random steps must still agree."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from prunerecipe import parse_recipe
from prunerecipe.lightning import RecipePruning
from prunerecipe.zoo import DigitsNet

RECIPE = """
version: 1
steps:
  - {name: drawn, select: {names: [net.conv2]}, method: random_structured, amount: 0.25, args: {dim: 0}}
  - {name: seeded, select: {names: [net.conv1]}, method: random_unstructured, amount: 0.3, seed: 3}
  - name: gradual
    select: {types: [Linear]}
    method: l1_unstructured
    sparsity: 0.75
    scope: global
    schedule: {start: 0, end: 2}
  - name: random-later
    select: {names: [net.conv1]}
    params: [bias]
    method: random_unstructured
    amount: 0.5
    schedule: {start: 1}
"""


class Module(pl.LightningModule):
    def __init__(self, out: str, mode: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = DigitsNet()
        self.out, self.mode = out, mode

    def setup(self, stage: str) -> None:
        torch.manual_seed(123 if self.global_rank == 0 else 456 + self.global_rank)

    def on_train_epoch_start(self) -> None:
        torch.manual_seed(1000 * self.current_epoch + (0 if self.global_rank == 0 else 7 + self.global_rank))

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def on_train_end(self) -> None:
        masks = {k: v.clone() for k, v in self.state_dict().items() if k.endswith("_mask")}
        torch.save(masks, Path(self.out) / f"{self.mode}-{self.global_rank}.pt")


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def main(out: str, mode: str) -> None:
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1 if mode == "single" else 2,
        strategy="auto" if mode == "single" else mode,
        callbacks=[RecipePruning(parse_recipe(RECIPE), finalize_on_fit_end=False)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(Module(out, mode), loader())


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
