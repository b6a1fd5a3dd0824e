"""Calibration data from text that ships with Python itself: the standard library's sources
(their code, comments and docstrings), read as bytes. Nothing is downloaded.

    prunerecipe apply recipes/wanda-50.yaml --calibration examples/calibration.py:stdlib_text -o pruned.pt

``stdlib_text`` returns token-id samples of shape ``(seq_len,)``: the bytes themselves for
byte-level models (vocabulary of 256 or more), bytes modulo the vocabulary size otherwise
(models built from a config with a small vocabulary, whose weights are random anyway).
The files are split into a training and a held-out part by name (every 20th file is held
out), so an evaluation can stay clear of the calibration data.
"""

from __future__ import annotations

import functools
import pathlib
import random
import sysconfig

import torch

SKIP = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__"}


@functools.lru_cache(maxsize=4)
def stdlib_files(split: str = "train") -> tuple[pathlib.Path, ...]:
    """The standard library's ``.py`` files (tests and bundled packages left out), sorted by
    path; ``split`` is ``"train"`` (19 of every 20) or ``"heldout"`` (the 20th)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP & set(p.relative_to(root).parts))
    if split not in ("train", "heldout"):
        raise ValueError(f"split is 'train' or 'heldout', not {split!r}")
    return tuple(p for i, p in enumerate(files) if (i % 20 == 19) == (split == "heldout"))


@functools.lru_cache(maxsize=4)
def stdlib_bytes(split: str = "train", limit: int | None = None) -> bytes:
    """The files of ``split`` concatenated (at most ``limit`` bytes)."""
    out = bytearray()
    for path in stdlib_files(split):
        out += path.read_bytes() + b"\n"
        if limit is not None and len(out) >= limit:
            return bytes(out[:limit])
    return bytes(out)


def stdlib_text(model=None, samples: int = 128, seq_len: int = 128, seed: int = 0) -> list[torch.Tensor]:
    """``samples`` windows of ``seq_len`` byte tokens from the training split, at random
    (seeded) offsets; ids fit the model's vocabulary when it has a Hugging Face config."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", 256) or 256
    data = torch.frombuffer(bytearray(stdlib_bytes("train", limit=4_000_000)), dtype=torch.uint8).long()
    if vocab < 256:
        data = data % vocab
    rng = random.Random(seed)
    starts = [rng.randrange(0, data.numel() - seq_len) for _ in range(samples)]
    return [data[s : s + seq_len].clone() for s in starts]
