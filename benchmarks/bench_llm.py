"""One-shot LLM pruning: SparseGPT (or Wanda) block by block on a Llama-style model built from a
config (random weights, nothing downloaded): time per block and peak memory against the bound.

    python benchmarks/bench_llm.py                  # ~374M parameters (24 layers, width 1024), SparseGPT 50%
    python benchmarks/bench_llm.py --recipe recipes/sparsegpt-2-4.yaml
    python benchmarks/bench_llm.py --quick          # a small config: a smoke test

The run happens in a fresh subprocess: the model is built, the resident-set high-water mark is
reset (/proc/self/clear_refs), ``apply_recipe`` runs with calibration samples of byte tokens
from Python's own sources (examples/calibration.py), and the peak (VmHWM) is read afterwards.

The bound: the model as it leaves the run (its weights, and what torch's re-parametrization adds
for every pruned tensor: the mask and the masked weight) plus two blocks' worth of activations
and Hessians, where one block's worth is the hidden states of every calibration sample (what a
block reads and writes), one batch's activations inside the block, and the Hessians
(``in x in``, float32) of that block's pruned layers. Times come from the runner's
per-block progress lines; the CPU is shared, so they are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZES = {
    # name: (layers, hidden, intermediate, heads, vocab)
    "quick": (2, 64, 176, 4, 512),
    "350m": (24, 1024, 2816, 16, 32000),
}


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(args: argparse.Namespace) -> None:
    import dataclasses

    import torch
    import transformers

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from calibration import stdlib_text

    from prunerecipe import apply_recipe, load_recipe
    from prunerecipe.spec import Calibration

    layers, hidden, inter, heads, vocab = SIZES[args.size]
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=max(args.seq, 128),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    started = time.perf_counter()
    model = transformers.LlamaForCausalLM(config).eval()
    build_s = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    recipe = load_recipe(os.path.join(ROOT, args.recipe))
    recipe = dataclasses.replace(recipe, calibration=Calibration(samples=args.samples, batch_size=args.batch))
    data = stdlib_text(model, samples=args.samples, seq_len=args.seq)

    states = hidden * args.samples * args.seq * 4  # the hidden states of every sample, float32
    # a block's forward on one batch: q, k, v, o and the rotary terms (6 x hidden), the attention
    # probabilities (heads x seq), gate, up, their activation and product (4 x intermediate), per token
    internals = args.batch * args.seq * (6 * hidden + heads * args.seq + 4 * inter) * 4
    hessians = 4 * (6 * hidden * hidden + inter * inter)  # q, k, v, o, gate, up: hidden^2; down: intermediate^2
    block_state = states + internals + hessians
    pruned_numel = layers * (4 * hidden * hidden + 3 * hidden * inter)
    reparam = 2 * pruned_numel * 4  # torch's re-parametrization of every pruned weight: the mask and the masked weight

    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM: the peak from here on
    baseline = _status("VmRSS")
    times: list[tuple[str, float]] = []

    def progress(line: str) -> None:
        found = re.match(r"\s+block \d+/\d+ (\S+): \d+ tensor\(s\), ([0-9.]+) s", line)
        if found:
            times.append((found.group(1), float(found.group(2))))

    started = time.perf_counter()
    report = apply_recipe(model, recipe, calibration=data, progress=progress)
    total_s = time.perf_counter() - started
    peak = _status("VmHWM")
    result = {
        "size": args.size,
        "recipe": args.recipe,
        "params": params,
        "model_bytes": model_bytes,
        "reparam_bytes": reparam,
        "block_state_bytes": block_state,
        "block_parts": {"hidden states": states, "one batch through the block": internals, "Hessians": hessians},
        "baseline_rss": baseline,
        "peak_rss": peak,
        "after_rss": _status("VmRSS"),
        "build_s": build_s,
        "total_s": total_s,
        "blocks": times,
        "sparsity": report.global_after,
        "rewritten": sum(len(s.rewritten) for s in report.steps),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


def mb(n: float) -> str:
    return f"{n / 2**20:.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small config (a smoke test)")
    parser.add_argument("--recipe", default="recipes/sparsegpt-50.yaml", help="a recipe of recipes/ (default: SparseGPT 50%%)")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples (default 32)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sample (default 128)")
    parser.add_argument("--batch", type=int, default=8, help="samples per forward pass (default 8)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    size = "quick" if args.quick else "350m"
    command = [sys.executable, __file__, "--child", "--size", size, "--recipe", args.recipe]
    command += ["--samples", str(args.samples), "--seq", str(args.seq), "--batch", str(args.batch)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        sys.exit(f"the run failed:\n{done.stderr}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    seconds = [s for _, s in r["blocks"]]
    over = r["peak_rss"] - r["baseline_rss"]
    bound_over = r["reparam_bytes"] + 2 * r["block_state_bytes"]
    print(f"Llama-style model from a config, {size}: {r['params'] / 1e6:.0f}M parameters, {mb(r['model_bytes'])} fp32; recipe {r['recipe']}")
    print(
        f"calibration: {args.samples} samples x {args.seq} tokens, batches of {args.batch}; torch threads {r['threads']}; {platform.machine()}, {os.cpu_count()} CPUs"
    )
    print()
    print("| block | seconds |")
    print("|---|---|")
    for name, s in r["blocks"]:
        print(f"| {name} | {s:.2f} |")
    print()
    print(
        f"per block: median {statistics.median(seconds):.2f} s, min {min(seconds):.2f} s, max {max(seconds):.2f} s; apply_recipe in all {r['total_s']:.1f} s"
    )
    print(f"sparsity of the targets after: {r['sparsity']:.2%}; tensors rewritten: {r['rewritten']}")
    print()
    parts = ", ".join(f"{k} {mb(v)}" for k, v in r["block_parts"].items())
    print(f"model resident before the run: {mb(r['baseline_rss'])} (weights {mb(r['model_bytes'])})")
    print(f"resident after the run:        {mb(r['after_rss'])}, {mb(r['after_rss'] - r['baseline_rss'])} over the model")
    print(f"peak during the run:           {mb(r['peak_rss'])}, {mb(over)} over the model")
    print(f"one block's state:             {mb(r['block_state_bytes'])} ({parts})")
    print(
        f"bound:                         {mb(r['baseline_rss'] + bound_over)} = the model + torch's re-parametrization of "
        f"the pruned weights {mb(r['reparam_bytes'])} (masks and masked weights) + 2 x one block's state"
    )
    verdict = "met" if over <= bound_over else "NOT MET"
    print(f"- {verdict}: peak over the model {mb(over)} <= re-parametrization + 2 blocks' state {mb(bound_over)}")


if __name__ == "__main__":
    main()
