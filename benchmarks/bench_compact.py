"""What compaction buys: a ResNet-18 dense, masked, finalized and compacted, side by side.

The model is prunerecipe's zoo ResNet-18 (torchvision's architecture) with seeded random
weights and BatchNorm statistics drawn to look trained (a masked channel then emits its
BatchNorm shift, which compaction must get rid of exactly). The pruning is
``recipes/resnet18-group-compact.yaml``'s: half of each dependency group's channels,
ranked by L2 norm over the group.

- dense: the model as built;
- masked: after the group step (torch's re-parametrization: ``weight = orig * mask`` in a
  forward pre-hook);
- finalized: the masks folded (``prune.remove``): same shapes, zeros inside;
- compacted: ``prunerecipe.compact``: the masked channels physically removed;
- half width, built: the same architecture built at half width from the start (other,
  random weights): the fastest a model of the compacted one's shapes runs here, so the gap
  between it and the compacted row is what compaction itself leaves on the table.

Latency is the median of ``--repeats`` timed forward passes per model (no grad, eval mode),
the models taking turns so that a busy moment of the machine hits all of them alike. The
speed-up over the masked model is the median of the per-round ratios (each round times every
model back to back, so a slower or faster spell of the shared machine cancels out of each
ratio instead of landing on one model's median more than the other's); each
model is timed in both memory layouts, PyTorch's default (contiguous) and ``channels_last``
(the layout PyTorch recommends for CNN inference on the CPU), every model alike.

    python benchmarks/bench_compact.py              # batch 8, 224x224, 2 threads, 21 runs each
    python benchmarks/bench_compact.py --quick      # a narrow ResNet on small images: a smoke test

The script ends with the targets of issue 15, each marked met or not.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch
from torch import nn

from prunerecipe import apply_recipe, compact, finalize, parse_recipe, save_state_dict
from prunerecipe.structured.cost import count_macs, count_params
from prunerecipe.zoo import ResNet

RECIPE = """
version: 1
inputs: [{shape: [1, 3, %d, %d]}]
steps:
  - name: channels
    select: {types: [Conv2d]}
    method: ln_structured
    amount: 0.5
    scope: group
    args: {n: 2}
"""


def build(width: int) -> nn.Module:
    torch.manual_seed(0)
    model = ResNet(width=width)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.5)
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def disk_bytes(model: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.pt")
        save_state_dict(model.state_dict(), path)
        return os.path.getsize(path)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="image side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--width", type=int, default=64, help="channels of the first stage (64: ResNet-18)")
    parser.add_argument("--quick", action="store_true", help="width 8, 64x64 images, batch 2, 3 runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.size, args.batch, args.repeats = 8, 64, 2, 3
    torch.set_num_threads(args.threads)

    dense = build(args.width)
    masked = copy.deepcopy(dense)
    apply_recipe(masked, parse_recipe(RECIPE % (args.size, args.size)))
    finalized = copy.deepcopy(masked)
    finalize(finalized)
    compacted = copy.deepcopy(masked)
    started = time.perf_counter()
    result = compact(compacted, torch.randn(1, 3, args.size, args.size))
    compact_seconds = time.perf_counter() - started
    # the same architecture built at half width: how fast the compacted model could be at most
    half = build(args.width // 2)
    models = {"dense": dense, "masked": masked, "finalized": finalized, "compacted": compacted, "half width, built": half}

    images = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    one = images[:1]
    last = {name: copy.deepcopy(model).to(memory_format=torch.channels_last) for name, model in models.items()}
    images_last = images.contiguous(memory_format=torch.channels_last)
    runs = [(name, model, images, "") for name, model in models.items()] + [(name, model, images_last, "cl") for name, model in last.items()]
    times: dict[str, list[float]] = {name + cl: [] for name, _, _, cl in runs}
    outputs = {}
    with torch.no_grad():
        for name, model, x, cl in runs:  # warm-up, and the outputs compared below
            outputs[name + cl] = model(x)
            model(x)
        for _ in range(args.repeats):
            for name, model, x, cl in runs:
                start = time.perf_counter()
                model(x)
                times[name + cl].append(time.perf_counter() - start)

    median = {name: statistics.median(t) for name, t in times.items()}
    # speed-up over the masked model in the same layout: the median of the per-round ratios
    speed = {name + cl: statistics.median(m / t for m, t in zip(times["masked" + cl], times[name + cl])) for name, _, _, cl in runs}
    reference = outputs["masked"]
    print(f"ResNet (width {args.width}) on {args.batch}x3x{args.size}x{args.size}, {args.threads} threads, median of {args.repeats} runs")
    print(f"machine: {machine()}")
    print(f"compaction took {compact_seconds:.2f} s (tracing, folding, removal, output check)")
    print()
    print(
        "| model | latency | vs masked | latency, channels_last | vs masked | parameters | MACs / image | size on disk | max output diff vs masked |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    stats = {}
    for name, model in models.items():
        params = count_params(model)
        macs = count_macs(model, (one,))
        size = disk_bytes(model)
        diff = float((outputs[name] - reference).abs().max())
        stats[name] = (params, macs, diff)
        shown_diff = "-" if name in ("dense", "half width, built") else "0 (reference)" if name == "masked" else f"{diff:.2e}"
        print(
            f"| {name} | {median[name] * 1e3:.1f} ms | {speed[name]:.2f}x | "
            f"{median[name + 'cl'] * 1e3:.1f} ms | {speed[name + 'cl']:.2f}x | {params / 1e6:.2f}M | "
            f"{macs / 1e9:.3f}G | {size / 2**20:.1f} MiB | {shown_diff} |"
        )
    print()
    print(str(result).splitlines()[0])

    speedup, speedup_last = speed["compacted"], speed["compactedcl"]
    diff_last = float((outputs["compactedcl"] - outputs["maskedcl"]).abs().max())
    share = stats["compacted"][0] / stats["masked"][0]
    diff = stats["compacted"][2]
    print()
    print("targets (issue 15):")
    for ok, text in (
        (speedup >= 3.0, f"compacted {speedup:.2f}x faster than masked >= 3x (default layout)"),
        (speedup_last >= 3.0, f"compacted {speedup_last:.2f}x faster than masked >= 3x (channels_last, both models)"),
        (share <= 0.30, f"compacted has {100 * share:.1f}% of the masked model's parameters <= 30%"),
        (max(diff, diff_last) <= 1e-5, f"compacted outputs within {max(diff, diff_last):.2e} of the masked model's <= 1e-5 (both layouts)"),
    ):
        print(f"- {'met' if ok else 'NOT MET'}: {text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
