"""Streaming a checkpoint bigger than the memory it may use: ``apply --stream`` against a plain
per-tensor copy of the same checkpoint (the I/O floor), side by side, with its peak memory and a
bit-for-bit comparison with the in-memory ``apply --format dense`` result.

    python benchmarks/bench_stream.py                      # ~3 GB bf16 Llama-like checkpoint
    python benchmarks/bench_stream.py --gb 1 --repeats 3

The checkpoint is built here, tensor by tensor, in a temporary folder (deleted at the end): a
Hugging Face folder (``config.json`` + ``model.safetensors``) of a Llama-like model with random
weights. The recipe prunes every Linear weight of the decoder layers to 50% with one global L1
step (the whole group, ~90% of the checkpoint, ranked together).

Each timed case runs in a fresh process:

- floor: ``safe_open`` each tensor and write the same file (header first, then each tensor's
  bytes, fsync'd) through the page cache, a plain copy (the issue's floor);
- direct-I/O floor: the same copy written with the streaming run's own writer
  (:class:`prunerecipe.stream.direct.DirectFile`: ``O_DIRECT`` from a reused aligned buffer),
  so the table shows what the pruning itself costs on top of the writes;
- stream: ``prunerecipe.apply_recipe_streaming`` (exactly what ``apply --stream`` runs), with
  its peak anonymous memory (RssAnon, polled every 2 ms) over the process's own before the call;
- in memory (once, for the comparison): ``prunerecipe apply --format dense`` on the same folder
  (the recipe finalizes, so the in-memory run folds its masks in place: its peak stays ~2x the
  checkpoint instead of ~4x; the dense output is the same either way).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPE = """\
version: 1
name: llama-global-50
finalize: true
steps:
  - name: decoder-linears
    select: {types: [Linear], names: ["model.layers.*"]}
    method: l1_unstructured
    sparsity: 0.5
    scope: global
"""

# what each case runs, in its own process (argv: case, folder, output)
CHILD = textwrap.dedent(
    """
    import os, sys, threading, time
    import torch

    def anon():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("RssAnon"))

    case, folder, out = sys.argv[1:4]
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    if case in ("floor", "floor_direct"):
        from safetensors import safe_open
        from prunerecipe.stream.direct import DirectFile
        from prunerecipe.stream.format import Writer
        t0 = time.perf_counter()
        with safe_open(os.path.join(folder, "model.safetensors"), "pt") as src, (open(out, "wb") if case == "floor" else DirectFile(out)) as fh:
            names = list(src.keys())
            entries = [(n, src.get_slice(n).get_dtype(), tuple(src.get_slice(n).get_shape())) for n in names]
            import prunerecipe.stream.format as fmt
            by = {v: k for k, v in fmt.DTYPES.items()}
            writer = Writer(fh, [(n, by[d], s) for n, d, s in entries], {"x": "y" * 64})
            for n in names:
                writer.write(n, src.get_tensor(n))
            writer.finish({"x": "y"})
            fh.flush()
            if case == "floor":
                os.fsync(fh.fileno())
        if case == "floor_direct":  # its last blocks are written by close()
            fd = os.open(out, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        print(time.perf_counter() - t0, 0)
    else:
        from prunerecipe import apply_recipe_streaming
        from prunerecipe.stream import meta_model
        model, _ = meta_model(folder)
        peak, stop = [0], []
        def watch():
            while not stop:
                peak[0] = max(peak[0], anon())
                time.sleep(0.002)
        base = anon()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t0 = time.perf_counter()
        apply_recipe_streaming(model, os.path.join(folder, "recipe.yaml"), folder, out, fmt="dense", force=True)
        took = time.perf_counter() - t0
        stop.append(1)
        watcher.join()
        print(took, max(peak[0], anon()) - base)
    """
)


def build(folder: Path, gb: float, dtype: str, hidden: int = 2048, inter: int = 8192, vocab: int = 32000) -> tuple[int, int]:
    """A Llama-like folder of about ``gb`` GB, written tensor by tensor; returns (bytes, largest tensor bytes)."""
    import torch
    import transformers

    from prunerecipe.stream import meta_model
    from prunerecipe.stream.format import Writer, entries_in_file_order

    width = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    per_layer = (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) * width
    layers = max(1, round((gb * 1e9 - 2 * vocab * hidden * width) / per_layer))
    cfg = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 128),
        num_key_value_heads=max(1, hidden // 128),
        vocab_size=vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype=dtype,
        architectures=["LlamaForCausalLM"],
    )
    folder.mkdir()
    cfg.save_pretrained(folder)
    model, _ = meta_model(str(folder))
    state = model.state_dict()
    entries = entries_in_file_order([(k, v.dtype, tuple(v.shape)) for k, v in state.items()])
    g = torch.Generator().manual_seed(0)
    with open(folder / "model.safetensors", "wb") as fh:
        writer = Writer(fh, entries, {"format": "pt"})
        for name, dt, shape in entries:
            t = torch.empty(shape, dtype=torch.float32)
            t.normal_(0.0, 0.02, generator=g) if len(shape) > 1 else t.fill_(1.0)
            writer.write(name, t.to(dt))
        writer.finish({"format": "pt"})
    (folder / "recipe.yaml").write_text(RECIPE)
    largest = max(math.prod(s) * torch.empty((), dtype=d).element_size() for _, d, s in entries)
    return (folder / "model.safetensors").stat().st_size, largest


def child(case: str, folder: Path, out: Path) -> tuple[float, int]:
    done = subprocess.run([sys.executable, "-c", CHILD, case, str(folder), str(out)], capture_output=True, text=True, cwd=HERE.parent)
    if done.returncode:
        raise SystemExit(f"{case} failed:\n{done.stderr[-4000:]}")
    took, peak = done.stdout.split()[-2:]
    return float(took), int(peak)


def in_memory(folder: Path, out: Path) -> tuple[float, int]:
    """``prunerecipe apply --format dense`` in memory: (seconds, peak RSS of the process)."""
    code = (
        "import resource, sys, time\n"
        "from prunerecipe.cli import main\n"
        "t0 = time.perf_counter()\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
    )
    args = ["apply", str(folder / "recipe.yaml"), "--model", str(folder), "--format", "dense", "-o", str(out), "--force"]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=HERE.parent)
    if done.returncode:
        raise SystemExit(f"in-memory apply failed:\n{done.stderr[-4000:]}")
    took, peak = done.stdout.split()[-2:]
    return float(took), int(peak)


def identical(a: Path, b: Path) -> tuple[bool, int]:
    """Every tensor of two safetensors files equal, bit for bit (read one at a time)."""
    import torch
    from safetensors import safe_open

    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        if sorted(fa.keys()) != sorted(fb.keys()):
            return False, 0
        n = 0
        for key in fa.keys():  # noqa: SIM118
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            if x.dtype != y.dtype or not torch.equal(x.view(torch.uint8) if x.dim() else x, y.view(torch.uint8) if y.dim() else y):
                return False, n
            n += 1
        return True, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=3.0, help="checkpoint size to build (GB)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--repeats", type=int, default=3, help="floor/stream pairs, alternated")
    ap.add_argument("--dir", default=None, help="where the temporary folder goes (default: the system's)")
    ap.add_argument("--skip-memory", action="store_true", help="skip the in-memory run (and the comparison)")
    ap.add_argument("--hidden", type=int, default=2048, help="the model's hidden size (intermediate: 4x; a smaller model for a quick check)")
    args = ap.parse_args()

    import torch

    tmp = Path(tempfile.mkdtemp(prefix="bench-stream-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        size, largest = build(tmp / "model", args.gb, args.dtype, args.hidden, 4 * args.hidden, 16 * args.hidden if args.hidden < 2048 else 32000)
        print(f"built {size / 1e9:.2f} GB ({args.dtype}) in {time.perf_counter() - t0:.0f} s; largest tensor {largest / 2**20:.0f} MiB", flush=True)
        bound = 4 * largest + 256 * 2**20
        floors, directs, streams, peaks, ratios = [], [], [], [], []
        for i in range(args.repeats):
            # the two cases alternate which goes first: this VM's I/O speed drifts between runs
            order = ("floor", "floor_direct", "stream") if i % 2 == 0 else ("stream", "floor_direct", "floor")
            took = {}
            for case in order:
                out = tmp / f"{case}.safetensors"
                if out.exists():
                    out.unlink()  # no old file to replace inside the timing
                took[case] = child(case, tmp / "model", out)
            (tmp / "floor.safetensors").unlink()
            (tmp / "floor_direct.safetensors").unlink()
            f, (s, peak) = took["floor"][0], took["stream"]
            directs.append(took["floor_direct"][0])
            floors.append(f)
            streams.append(s)
            peaks.append(peak)
            ratios.append(s / f)
            print(
                f"run {i + 1}: floor {f:.2f} s, direct-I/O floor {directs[-1]:.2f} s, stream {s:.2f} s ({s / f:.2f}x; {s / directs[-1]:.2f}x the direct one),"
                f" peak {peak / 2**20:.0f} MiB over the process's own",
                flush=True,
            )
        same, count = (None, 0)
        mem = (float("nan"), 0)
        if not args.skip_memory:
            mem = in_memory(tmp / "model", tmp / "memory.safetensors")
            same, count = identical(tmp / "memory.safetensors", tmp / "stream.safetensors")
        med = statistics.median
        rows = [
            ("checkpoint", f"{size / 1e9:.2f} GB {args.dtype}, {largest / 2**20:.0f} MiB largest tensor"),
            ("copy floor (safe_open + write, fsync)", f"{med(floors):.2f} s (runs: {', '.join(f'{x:.2f}' for x in floors)})"),
            ("copy floor, direct I/O (the stream's own writer)", f"{med(directs):.2f} s (runs: {', '.join(f'{x:.2f}' for x in directs)})"),
            ("apply --stream", f"{med(streams):.2f} s (runs: {', '.join(f'{x:.2f}' for x in streams)})"),
            ("stream / floor", f"{med(ratios):.2f}x median of per-run ratios ({min(ratios):.2f}-{max(ratios):.2f}x)"),
            ("stream / direct-I/O floor", f"{med([s / d for s, d in zip(streams, directs)]):.2f}x median of per-run ratios"),
            ("peak anonymous memory, stream", f"{max(peaks) / 2**20:.0f} MiB (max of runs) vs bound {bound / 2**20:.0f} MiB"),
            ("in memory (apply --format dense)", f"{mem[0]:.2f} s, peak RSS {mem[1] / 2**30:.2f} GiB" if not args.skip_memory else "skipped"),
            ("bit-identical to in memory", "skipped" if same is None else f"{'yes' if same else 'NO'} ({count} tensors compared)"),
        ]
        print()
        print("| measure | value |")
        print("|---|---|")
        for k, v in rows:
            print(f"| {k} | {v} |")
        print()
        print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), Python {sys.version.split()[0]}")
        met = [
            ("peak under the bound", max(peaks) < bound),
            ("within 2x of the copy floor (median)", med(ratios) <= 2.0),
        ]
        if same is not None:
            met.append(("bit-identical to the in-memory result", bool(same)))
        for what, ok in met:
            print(f"- {'met' if ok else 'NOT MET'}: {what}")
        print(
            json.dumps({"floor": floors, "floor_direct": directs, "stream": streams, "peak": peaks, "bound": bound, "memory": mem, "identical": same})
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
