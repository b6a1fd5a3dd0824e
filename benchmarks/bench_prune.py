"""prunerecipe vs torch.nn.utils.prune on large MLP stacks: time and peak memory, quiet and busy.

Every case runs in a fresh subprocess (so peak RSS is honest): the same case runs first on
a small model (warm-up: as many layers as the measured model, of two chunks each, so ours takes
the same code path and both sides make the same per-layer objects as on the big model), the
model is built, the process is settled (every page of the loaded libraries made
resident, the C heap's free pages handed back), the resident-set high-water mark is reset
(/proc/self/clear_refs), the operation is timed, and the peak RSS over the settled process's
is read from /proc/self/status (VmHWM). Settling makes the peak count data:
without it, code of libtorch that a case runs for the first time (0.7-2 MB here) and free
heap left over from building the model (0-5 MB, a matter of chance) move the figure.

    python benchmarks/bench_prune.py                 # 92M weights, 3 runs per case (medians)
    python benchmarks/bench_prune.py --busy 2        # also with 2 CPU-bound processes running
    python benchmarks/bench_prune.py --quick         # a small model: a smoke test

With ``--busy N``, N processes that spin on the CPU run while each case is timed a second
time, and are stopped after it; quiet and busy times of both sides are printed side by side.

The floor is one pass that applies a known threshold, ``w.mul_(w.abs() > t)`` over every
weight, timed inside each of our runs' own processes, after the case (same memory, same
machine state): the last columns give our time over it, the median of the per-run ratios
and their range. The memory budget for runs that keep masks is torch's re-parametrization
itself (``prune.identity`` on every layer: the ones mask, the masked weight and torch's
bookkeeping, measured in its own runs); for finalized runs, 0.3x the weights.

The script ends with the targets of issue 13, each marked met or not.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time

SIZES = {
    # name: (number of Linear layers, width, hidden); layers alternate width->hidden, hidden->width
    "tiny": (2, 16, 64),
    "quick": (6, 256, 1024),
    "92m": (22, 1024, 4096),
    "350m": (84, 1024, 4096),
}

RECIPES = {
    "local": "steps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}",
    "global": "steps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5, scope: global}",
    "global_finalize": "finalize: true\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5, scope: global}",
    "local_finalize": "finalize: true\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}",
}

# (label, torch's case, ours, memory budget)
PAIRS = [
    ("per-layer L1 50%, masks kept", "torch_local", "ours_local", "reparam"),
    ("global L1 50%, masks kept", "torch_global", "ours_global", "reparam"),
    ("global L1 50% + finalize", None, "ours_global_finalize", "0.3x"),
    ("per-layer L1 50% + finalize", None, "ours_local_finalize", "0.3x"),
]


# --- child side ------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _warm_size(size: str) -> tuple[int, int, int]:
    """The warm-up model for ``size``: as many layers, each of 512K entries (two chunks: above
    the select's direct path, which takes layers of one chunk or less)."""
    return SIZES[size][0], 512, 1024


def _build(size: str | tuple[int, int, int]):
    import torch
    from torch import nn

    layers, width, hidden = SIZES[size] if isinstance(size, str) else size
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, hidden) if i % 2 == 0 else nn.Linear(hidden, width) for i in range(layers)])


def _floor(linears) -> float:
    """One pass applying a known threshold to every weight: ``w.mul_(w.abs() > t)``."""
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        for m in linears:
            w = m.weight
            w.mul_(w.abs() > 1e-30)  # keeps every nonzero: the pass can be repeated on the same weights
    return time.perf_counter() - start


def _settle() -> None:
    """Every page of every file mapped readable (the libraries' code and data) made resident,
    and the C heap's free pages handed back: the same for torch's cases and ours (Linux with
    glibc; elsewhere whatever part is available)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    madvise = getattr(libc, "madvise", None)
    if madvise is not None and sys.platform.startswith("linux"):
        madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
        with open("/proc/self/maps") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) > 5 and fields[5].startswith("/") and fields[1].startswith("r"):
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    madvise(lo, hi - lo, 22)  # MADV_POPULATE_READ (Linux 5.14+; refused harmlessly before)
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        trim(0)


def child(case: str, size: str | tuple[int, int, int], warm: bool = True) -> dict:
    import torch
    import torch.nn.utils.prune as prune

    import prunerecipe

    if warm:
        # The same case on a small model first: code pages of the kernels it uses are then
        # resident, and prunerecipe's worker threads started (as torch's OpenMP threads are),
        # so the peak below measures data, not libtorch being paged in or threads starting.
        # Its layers are bigger than one chunk: a layer of one chunk or less is selected
        # directly, and the code of the sampled select (and its bindings' one-time set-up)
        # would first run in the measured case. It has as many layers as the measured model:
        # the per-layer objects either side makes (torch's hooks and containers; our plan and
        # report entries) then fit in the interpreter's and C heap's pools, as they would the
        # next time, instead of the measured case growing those pools by a few pages.
        assert isinstance(size, str)
        child(case, _warm_size(size), warm=False)
    model = _build(size)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    weights = sum(m.weight.numel() for m in linears)
    recipe = None
    if case.startswith("ours_"):
        recipe = prunerecipe.parse_recipe("version: 1\n" + RECIPES[case[len("ours_") :]])
    _settle()
    base_kb = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS

    start = time.perf_counter()
    if case == "floor":
        _floor(linears)
    elif case == "reparam":  # torch's re-parametrization itself, with nothing to compute: ones as the mask
        for m in linears:
            prune.identity(m, "weight")
    elif case == "torch_local":
        for m in linears:
            prune.l1_unstructured(m, "weight", amount=0.5)
    elif case == "torch_global":
        prune.global_unstructured([(m, "weight") for m in linears], pruning_method=prune.L1Unstructured, amount=0.5)
    elif recipe is not None:
        prunerecipe.apply_recipe(model, recipe)
    else:
        raise SystemExit(f"unknown case {case}")
    elapsed = time.perf_counter() - start

    peak_kb = _status_kb("VmHWM")
    if not warm:
        return {}
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    # The floor again, in this process, over these weights: the same memory, page sizes and
    # machine state as the case just timed (fresh processes vary by up to ~1.5x here).
    if case.startswith("ours_"):
        for m in linears:
            prune.remove(m, "weight") if prune.is_pruned(m) else None
        here = statistics.median(_floor(linears) for _ in range(3))
    else:
        here = float("nan")
    return {
        "case": case,
        "seconds": elapsed,
        "floor_here": here,
        "peak_over_model_mb": max(0, peak_kb - base_kb) / 1024,
        "weights_mb": weights * 4 / 2**20,
        "sparsity": zeros / weights,
    }


def _burn(stop) -> None:  # a CPU-bound process for --busy
    x = 0
    while not stop.is_set():
        for i in range(100_000):
            x += i * i


# --- parent side -----------------------------------------------------------------------------


def run_child(args: list[str], busy: int = 0) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    stop = multiprocessing.Event()
    burners = [multiprocessing.Process(target=_burn, args=(stop,), daemon=True) for _ in range(busy)]
    for p in burners:
        p.start()
    try:
        done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    finally:
        stop.set()
        for p in burners:
            p.join()
    if done.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_of(case: str, size: str, repeats: int, busy: int = 0) -> dict:
    runs = [run_child([case, size], busy) for _ in range(repeats)]
    ratios = sorted(r["seconds"] / r["floor_here"] for r in runs if r["floor_here"] == r["floor_here"])
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "ratios": ratios,
        "peak": statistics.median(r["peak_over_model_mb"] for r in runs),
        "weights_mb": runs[0]["weights_mb"],
        "sparsity": runs[0]["sparsity"],
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


def ratio_text(r: dict) -> str:
    rs = r["ratios"]
    return f"{statistics.median(rs):.2f}x ({rs[0]:.2f}-{rs[-1]:.2f}x)" if rs else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small model (smoke test)")
    parser.add_argument("--sizes", default="92m", help="comma-separated: " + ", ".join(SIZES))
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the table shows medians")
    parser.add_argument("--busy", type=int, default=0, metavar="N", help="also time every case with N CPU-bound processes running")
    parser.add_argument("--cases", default="local,global,global_finalize,local_finalize", help="comma-separated subset of our cases")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child[0], args.child[1])))
        return

    sizes = ["quick"] if args.quick else args.sizes.split(",")
    wanted = set(args.cases.split(","))
    pairs = [p for p in PAIRS if p[2][len("ours_") :] in wanted]
    print(f"machine: {machine()}")
    print(f"command: python benchmarks/{os.path.basename(__file__)} {' '.join(sys.argv[1:])}".rstrip())
    print()
    head = "| model | case | torch | ours | speed-up | peak over model: torch / ours / budget | ours / floor (median, range) |"
    rule = "|---|---|---|---|---|---|---|"
    if args.busy:
        head += f" busy {args.busy}: torch | ours | speed-up | ours busy / quiet | busy: ours / floor |"
        rule += "---|---|---|---|---|"
    print(head)
    print(rule)
    checks: list[tuple[str, bool]] = []
    for size in sizes:
        reparam = median_of("reparam", size, args.repeats)
        for label, theirs, ours, budget in pairs:
            o = median_of(ours, size, args.repeats)
            t = median_of(theirs, size, args.repeats) if theirs else None
            if t is not None:
                assert abs(t["sparsity"] - o["sparsity"]) < 1e-6, (label, t["sparsity"], o["sparsity"])
            limit = reparam["peak"] if budget == "reparam" else 0.3 * o["weights_mb"]
            speed = t["seconds"] / o["seconds"] if t else None
            row = (
                f"| {size} ({o['weights_mb']:.0f} MB fp32) | {label} | {t['seconds']:.3f} s | "
                if t
                else f"| {size} ({o['weights_mb']:.0f} MB fp32) | {label} | - | "
            )
            row += f"{o['seconds']:.3f} s | {f'{speed:.1f}x' if speed else '-'} | "
            row += f"{t['peak'] if t else float('nan'):.0f} / {o['peak']:.1f} / {limit:.1f} MB | {ratio_text(o)} |"
            checks.append((f"{size} {label}: peak {o['peak']:.1f} MB <= budget {limit:.1f} MB", o["peak"] <= limit + 0.05))
            if speed is not None:
                need = 15 if ours == "ours_global" else 8
                checks.append((f"{size} {label}: quiet speed-up {speed:.1f}x >= {need}x", speed >= need))
            elif o["ratios"] and ours == "ours_global_finalize":
                checks.append((f"{size} {label}: quiet, {statistics.median(o['ratios']):.2f}x the floor <= 2x", statistics.median(o["ratios"]) <= 2))
            if args.busy:
                ob = median_of(ours, size, args.repeats, args.busy)
                tb = median_of(theirs, size, args.repeats, args.busy) if theirs else None
                bspeed = tb["seconds"] / ob["seconds"] if tb else None
                slow = ob["seconds"] / o["seconds"]
                theirs_busy = f"{tb['seconds']:.3f} s" if tb else "-"
                busy_speed = f"{bspeed:.1f}x" if bspeed else "-"
                row += f" {theirs_busy} | {ob['seconds']:.3f} s | {busy_speed} | {slow:.2f}x | {ratio_text(ob)} |"
                checks.append((f"{size} {label}: busy {args.busy}, ours {slow:.2f}x our quiet time <= 3x", slow <= 3))
                if bspeed is not None:
                    need = 8 if ours == "ours_global" else 4
                    checks.append((f"{size} {label}: busy {args.busy}, speed-up {bspeed:.1f}x >= {need}x", bspeed >= need))
            print(row)
            sys.stdout.flush()
    print()
    print("targets (issue 13):")
    for text, ok in checks:
        print(f"- {'met' if ok else 'NOT MET'}: {text}")


if __name__ == "__main__":
    main()
