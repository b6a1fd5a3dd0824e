"""prunerecipe vs torch.nn.utils.prune on large MLP stacks: time and peak memory, side by side.

Every case runs in a fresh subprocess (so peak RSS is honest): the model is built, the
resident-set high-water mark is reset (/proc/self/clear_refs), the operation is timed,
and the peak RSS over the model's own is read from /proc/self/status (VmHWM).

    python benchmarks/bench_prune.py            # 92M and ~350M weights, 3 runs each (medians)
    python benchmarks/bench_prune.py --quick    # a small model, 3 runs: a smoke test
    python benchmarks/bench_prune.py --sizes 92m --repeats 5

Prints a markdown table: case, torch time, ours, speed-up, peak memory over the model
(both), the memory budget, and the floor: one read + in-place write pass over all weights,
timed in fresh processes of its own, and again at the end of each of our runs inside its
process, over the same memory (the last column: the median of those per-run ratios, and
their range). On a VM whose memory speed changes from process to process the last column
is the like-for-like comparison.
The budget for runs that keep masks is torch's re-parametrization itself (``prune.identity``
on every layer: the ones mask, the masked weight and torch's bookkeeping, measured in the
same run; ``--child reparam_bare`` measures the two tensors alone, 0.02 MB less); for
finalized runs, 0.3x the weights.
After the table: the floor pass in place and, for reference, out of place (fresh pages).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time

SIZES = {
    # name: (number of Linear layers, width, hidden); layers alternate width->hidden, hidden->width
    "tiny": (2, 16, 64),
    "quick": (6, 256, 1024),
    "92m": (22, 1024, 4096),
    "350m": (84, 1024, 4096),
}

RECIPES = {
    "local": """
        version: 1
        steps:
          - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}
    """,
    "global": """
        version: 1
        steps:
          - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5, scope: global}
    """,
    "global_finalize": """
        version: 1
        finalize: true
        steps:
          - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5, scope: global}
    """,
    "local_finalize": """
        version: 1
        finalize: true
        steps:
          - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}
    """,
}


# --- child side ------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _build(size: str):
    import torch
    from torch import nn

    layers, width, hidden = SIZES[size]
    torch.manual_seed(0)
    mods = []
    for i in range(layers):
        mods.append(nn.Linear(width, hidden) if i % 2 == 0 else nn.Linear(hidden, width))
    return nn.Sequential(*mods)


def child(case: str, size: str, warm: bool = True) -> dict:
    import torch
    import torch.nn.utils.prune as prune

    import prunerecipe

    if warm:
        # The same case on a tiny model first: code pages of the kernels it uses are then
        # resident, so the peak below measures data, not libtorch being paged in.
        child(case, "tiny", warm=False)
    model = _build(size)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    weights = sum(m.weight.numel() for m in linears)
    recipe = None
    if case.startswith("ours_"):
        recipe = prunerecipe.parse_recipe(textwrap.dedent(RECIPES[case[len("ours_") :]]))
    base_kb = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS

    start = time.perf_counter()
    if case == "floor":
        with torch.no_grad():
            for m in linears:
                m.weight.mul_(1.0001)
    elif case == "floor_copy":  # the same pass out of place, one layer at a time (fresh pages each time)
        with torch.no_grad():
            for m in linears:
                m.weight.data = m.weight * 1.0001
    elif case == "reparam":  # torch's re-parametrization itself, with nothing to compute: ones as the mask
        for m in linears:
            prune.identity(m, "weight")  # weight_orig, weight_mask, weight = orig * mask, the hook
    elif case == "reparam_bare":  # the two tensors alone, without torch's bookkeeping
        kept = []
        for m in linears:
            mask = torch.ones_like(m.weight)
            kept.append((mask, mask * m.weight))
    elif case == "torch_local":
        for m in linears:
            prune.l1_unstructured(m, "weight", amount=0.5)
    elif case == "torch_local_finalize":
        for m in linears:
            prune.l1_unstructured(m, "weight", amount=0.5)
        for m in linears:
            prune.remove(m, "weight")
    elif case == "torch_global":
        prune.global_unstructured([(m, "weight") for m in linears], pruning_method=prune.L1Unstructured, amount=0.5)
    elif case == "torch_global_finalize":
        prune.global_unstructured([(m, "weight") for m in linears], pruning_method=prune.L1Unstructured, amount=0.5)
        for m in linears:
            prune.remove(m, "weight")
    elif recipe is not None:
        prunerecipe.apply_recipe(model, recipe)
    else:
        raise SystemExit(f"unknown case {case}")
    elapsed = time.perf_counter() - start

    peak_kb = _status_kb("VmHWM")
    if not warm:
        return {}
    zeros = 0
    for m in linears:
        zeros += int((m.weight == 0).sum())
    # The floor pass again, in this process, over these weights: the same memory, page sizes
    # and machine state as the case just timed (fresh processes vary by up to ~1.5x).
    here = []
    with torch.no_grad():
        for _ in range(3):
            t0 = time.perf_counter()
            for m in linears:
                m.weight.mul_(1.0001)
            here.append(time.perf_counter() - t0)
    return {
        "case": case,
        "seconds": elapsed,
        "floor_here": statistics.median(here),
        "peak_over_model_mb": max(0, peak_kb - base_kb) / 1024,
        "weights_mb": weights * 4 / 2**20,
        "sparsity": zeros / weights,
    }


def plan_child() -> dict:
    """Planning a 50-step recipe on a model with 10,000 modules."""
    from torch import nn

    import prunerecipe

    blocks = nn.ModuleList()
    for _ in range(2000):
        blocks.append(nn.ModuleDict({"attn": nn.Linear(4, 4), "mlp": nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))}))
    model = nn.Sequential(blocks)
    modules = sum(1 for _ in model.named_modules())
    steps = []
    for i in range(50):
        kind = i % 5
        if kind == 0:
            sel = "{types: [Linear]}"
        elif kind == 1:
            sel = '{names: ["0.%d*.mlp.*"]}' % (i % 10)
        elif kind == 2:
            sel = '{names: ["re:0\\\\.%d[0-9]*\\\\.attn"]}' % (i % 10 + 1)
        elif kind == 3:
            sel = '{types: [torch.nn.Linear], exclude: {names: ["*.attn"]}}'
        else:
            sel = '{names: ["*.mlp.2"], types: [Linear]}'
        steps.append(f"  - {{select: {sel}, method: l1_unstructured, amount: 0.01}}")
    text = "version: 1\nsteps:\n" + "\n".join(steps) + "\n"
    recipe = prunerecipe.parse_recipe(text)
    start = time.perf_counter()
    plan = prunerecipe.plan_recipe(model, recipe)
    elapsed = time.perf_counter() - start
    return {"case": "plan_10k", "seconds": elapsed, "modules": modules, "targets": sum(len(s.targets) for s in plan.steps)}


# --- parent side -----------------------------------------------------------------------------


def run_child(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_of(case: str, size: str, repeats: int) -> dict:
    runs = [run_child([case, size]) for _ in range(repeats)]
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "floor_here": statistics.median(r["floor_here"] for r in runs),
        # each run against the floor timed in its own process: the same memory and machine state
        "here_ratios": sorted(r["seconds"] / r["floor_here"] for r in runs),
        "peak": statistics.median(r["peak_over_model_mb"] for r in runs),
        "weights_mb": runs[0]["weights_mb"],
        "sparsity": runs[0]["sparsity"],
        "all": [round(r["seconds"], 4) for r in runs],
    }


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as fh:
            mem = f", {int(fh.readline().split()[1]) / 2**20:.0f} GiB RAM"
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}; Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small model (smoke test)")
    parser.add_argument("--sizes", default="92m,350m", help="comma-separated: " + ", ".join(SIZES))
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the table shows medians")
    parser.add_argument("--cases", default="local,global,global_finalize,local_finalize", help="comma-separated subset of the cases")
    parser.add_argument("--no-plan", action="store_true", help="skip the planning benchmark")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        result = plan_child() if args.child[0] == "plan" else child(args.child[0], args.child[1])
        print(json.dumps(result))
        return

    sizes = ["quick"] if args.quick else args.sizes.split(",")
    print(f"machine: {machine()}")
    print()
    print(
        "| model | case | torch | ours | speed-up | peak over model: torch | ours | budget "
        "| floor (1 pass) | ours / floor | ours / out-of-place floor | ours / floor in its own process: median (range; floor) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    wanted = set(args.cases.split(","))
    pairs = [
        (label, theirs, ours, budget)
        for label, theirs, ours, budget in [
            ("per-layer L1 50%", "torch_local", "ours_local", "reparam"),
            ("global L1 50%, masks kept", "torch_global", "ours_global", "reparam"),
            ("global L1 50% + finalize", "torch_global_finalize", "ours_global_finalize", "0.3x"),
            ("per-layer L1 50% + finalize", "torch_local_finalize", "ours_local_finalize", "0.3x"),
        ]
        if ours[len("ours_") :] in wanted
    ]
    floors: list[str] = []
    for size in sizes:
        floor = median_of("floor", size, args.repeats)
        copy = median_of("floor_copy", size, args.repeats)
        floors.append(f"{size}: in place {floor['seconds']:.4f} s, out of place {copy['seconds']:.4f} s")
        reparam = median_of("reparam", size, args.repeats)
        wmb = floor["weights_mb"]
        for label, theirs, ours, budget in pairs:
            t = median_of(theirs, size, args.repeats)
            o = median_of(ours, size, args.repeats)
            assert abs(t["sparsity"] - o["sparsity"]) < 1e-6, (label, t["sparsity"], o["sparsity"])
            limit = {"reparam": f"{reparam['peak']:.1f} MB", "0.3x": f"{0.3 * wmb:.1f} MB", None: "-"}[budget]
            print(
                f"| {size} ({wmb:.0f} MB fp32) | {label} | {t['seconds']:.3f} s | {o['seconds']:.3f} s | "
                f"{t['seconds'] / o['seconds']:.1f}x | {t['peak']:.0f} MB | {o['peak']:.1f} MB | {limit} | "
                f"{floor['seconds']:.3f} s | {o['seconds'] / floor['seconds']:.1f}x | {o['seconds'] / copy['seconds']:.1f}x | "
                f"{statistics.median(o['here_ratios']):.1f}x ({o['here_ratios'][0]:.1f}-{o['here_ratios'][-1]:.1f}x; {o['floor_here']:.3f} s) |"
            )
            sys.stdout.flush()
    print()
    print("floor pass over all weights (`weight.mul_(c)` per layer; out of place: `weight * c`): " + "; ".join(floors))
    if args.no_plan:
        return
    p = run_child(["plan"])
    print()
    print(f"planning a 50-step recipe on {p['modules']} modules ({p['targets']} targets): {p['seconds']:.3f} s")


if __name__ == "__main__":
    main()
