"""Train a small byte-level GPT-2 on the standard library's sources, prune it one-shot with the
recipes in recipes/ (and two baselines), and write RESULTS.md: held-out perplexity and time.

    python examples/tiny-lm/train.py            # trains once (a few minutes on 2 CPUs), then prunes
    python examples/tiny-lm/train.py --quick --out /tmp/tiny-lm   # a smoke run (seconds)

The text ships with Python itself (examples/calibration.py): every 20th standard-library file
is held out for the perplexity; training and calibration windows come from the others. The
trained weights are kept in OUT/build/dense.pt (with dense.json), so a second run only prunes
and measures.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))

from calibration import stdlib_bytes, stdlib_text

from prunerecipe import apply_recipe, load_recipe, parse_recipe
from prunerecipe.spec import Calibration

SELECT = '{types: [Conv1D], names: ["transformer.h.*"]}'
INLINE = {
    "magnitude-50": f"version: 1\nsteps:\n  - {{select: {SELECT}, method: l1_unstructured, sparsity: 0.5}}\n",
    "wanda-2-4": f"version: 1\nsteps:\n  - {{select: {SELECT}, method: semi_structured, importance: wanda, args: {{n: 2, m: 4}}}}\n",
}
# (label, pattern, recipe: a file in recipes/ or an inline one above)
VARIANTS = [
    ("magnitude", "50%", "magnitude-50"),
    ("Wanda", "50%", "recipes/wanda-50.yaml"),
    ("SparseGPT", "50%", "recipes/sparsegpt-50.yaml"),
    ("magnitude", "2:4", "recipes/nm-2-4-magnitude.yaml"),
    ("Wanda", "2:4", "wanda-2-4"),
    ("SparseGPT", "2:4", "recipes/sparsegpt-2-4.yaml"),
]


def build(quick: bool) -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(
        n_layer=2 if quick else 4,
        n_embd=32 if quick else 128,
        n_head=4,
        n_positions=128,
        vocab_size=256,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def windows(data: torch.Tensor, seq: int) -> torch.Tensor:
    n = (data.numel() - 1) // seq
    return data[: n * seq + 1]


def train(model: transformers.GPT2LMHeadModel, data: torch.Tensor, steps: int, batch: int, seq: int) -> list[tuple[int, float]]:
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    model.train()
    log = []
    started = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + seq] for s in starts.tolist()])
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.append((step, loss.item()))
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - started:.0f} s", flush=True)
    model.eval()
    return log


@torch.no_grad()
def perplexity(model: torch.nn.Module, data: torch.Tensor, seq: int, batch: int = 32) -> float:
    """exp(mean next-byte loss) over non-overlapping windows of the held-out text."""
    model.eval()
    n = (data.numel() - 1) // seq
    x = data[: n * seq].reshape(n, seq)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        chunk = x[i : i + batch]
        loss = model(chunk, labels=chunk).loss  # mean over chunk.numel() - rows predictions
        predicted = chunk.shape[0] * (seq - 1)
        total += float(loss) * predicted
        count += predicted
    return math.exp(total / count)


def recipe_for(name: str):
    if name in INLINE:
        return parse_recipe(INLINE[name], name)
    return load_recipe(ROOT / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, a few steps: a smoke run")
    parser.add_argument("--out", type=Path, default=HERE, help="where dense.pt and RESULTS.md go (default: this folder)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 600, quick: 20)")
    args = parser.parse_args()
    quick = args.quick
    steps = args.steps if args.steps is not None else (20 if quick else 600)
    seq, batch = (64, 8) if quick else (128, 16)
    samples = 16 if quick else 128
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)

    train_data = torch.frombuffer(bytearray(stdlib_bytes("train", limit=200_000 if quick else 6_000_000)), dtype=torch.uint8).long()
    heldout = windows(torch.frombuffer(bytearray(stdlib_bytes("heldout", limit=8_000 if quick else 262_144)), dtype=torch.uint8).long(), seq)
    model = build(quick)
    params = sum(p.numel() for p in model.parameters())
    checkpoint = args.out / "build" / "dense.pt"
    meta = checkpoint.with_suffix(".json")
    if checkpoint.exists() and meta.exists() and not quick:
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
        trained = json.loads(meta.read_text())
        print(f"loaded {checkpoint} (trained for {trained['steps']} steps)")
    else:
        started = time.perf_counter()
        log = train(model, train_data, steps, batch, seq)
        trained = {"steps": steps, "seconds": time.perf_counter() - started, "log": log}
        if not quick:
            checkpoint.parent.mkdir(exist_ok=True)
            torch.save(model.state_dict(), checkpoint)
            meta.write_text(json.dumps(trained))
    steps = trained["steps"]
    train_log = trained["log"]
    model.eval()

    rows = [("dense", "0%", perplexity(model, heldout, seq), None, 0.0)]
    print(f"dense: perplexity {rows[0][2]:.3f}", flush=True)
    for label, pattern, name in VARIANTS:
        recipe = recipe_for(name)
        recipe = dataclasses.replace(recipe, calibration=Calibration(samples=samples, batch_size=8))
        pruned = copy.deepcopy(model)
        calibration = stdlib_text(pruned, samples=samples, seq_len=seq)
        started = time.perf_counter()
        report = apply_recipe(pruned, recipe, calibration=calibration)
        seconds = time.perf_counter() - started
        ppl = perplexity(pruned, heldout, seq)
        rows.append((label, pattern, ppl, seconds, report.global_after))
        print(f"{label} {pattern}: perplexity {ppl:.3f}, {seconds:.2f} s, sparsity {report.global_after:.2%}", flush=True)

    lines = [
        "# Tiny LM: one-shot pruning quality (issue 17)",
        "",
        f"A byte-level GPT-2 (transformers `GPT2LMHeadModel` from a config: {model.config.n_layer} layers, width "
        f"{model.config.n_embd}, {params / 1e6:.2f}M parameters) trained from scratch for {steps} steps (batch {batch} x {seq} bytes)"
        + f" in {trained['seconds']:.0f} s"
        + " on the standard library's Python sources (every 20th file held out).",
        f"Perplexity is per byte, on {heldout.numel() - 1} held-out bytes in windows of {seq}. Pruned: every `Conv1D` in "
        "the transformer blocks (attention and MLP projections); embeddings and the tied head stay dense. Calibration: "
        f"{samples} windows of {seq} bytes from the training files. Time is `apply_recipe` alone, on a shared 2-core CPU (noisy).",
        "",
        "| method | sparsity | perplexity | vs dense | time (s) | masked (targets) |",
        "|---|---|---|---|---|---|",
    ]
    dense_ppl = rows[0][2]
    for label, pattern, ppl, seconds, masked in rows:
        lines.append(
            f"| {label} | {pattern} | {ppl:.3f} | {ppl / dense_ppl - 1:+.1%} | {'-' if seconds is None else f'{seconds:.2f}'} | {masked:.2%} |"
        )
    for pattern in ("50%", "2:4"):
        by = {label: ppl for label, p, ppl, _, _ in rows if p == pattern}
        holds = by["SparseGPT"] <= by["Wanda"] <= by["magnitude"]
        lines.append("")
        lines.append(
            f"At {pattern}: SparseGPT {by['SparseGPT']:.3f}, Wanda {by['Wanda']:.3f}, magnitude {by['magnitude']:.3f}: "
            + (
                "the expected order SparseGPT <= Wanda <= magnitude holds."
                if holds
                else "the expected order SparseGPT <= Wanda <= magnitude does NOT hold here."
            )
        )
    lines += [
        "",
        f"Command: `python examples/tiny-lm/train.py{' --quick' if quick else ''}`; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs. Training loss (nats per byte) "
        + ", ".join(f"step {step}: {loss:.2f}" for step, loss in train_log)
        + ".",
        "",
    ]
    target = args.out / "RESULTS.md"
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text("\n".join(lines))
    os.replace(temporary, target)  # never a half-written file
    print(f"wrote {args.out / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
