"""What one eager torch op costs next to the floor pass: the numbers behind RESULTS.md's
"why the finalize path is not within 3x of an in-place pass".

    python benchmarks/op_costs.py            # the 92M-weight model of bench_prune.py
    python benchmarks/op_costs.py --layers 6 # smaller

Every op runs over all weights in chunks (as the fast path does), medians of 9 runs,
printed as milliseconds and as multiples of the floor (one in-place multiply per layer).
"In cache" ops run on a chunk that the previous op just produced.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22, help="Linear layers of 1024x4096 / 4096x1024 (22: 92M weights)")
    parser.add_argument("--chunk", type=int, default=1 << 18, help="entries per chunk")
    args = parser.parse_args()

    torch.manual_seed(0)
    weights = [torch.randn(4096, 1024) if i % 2 == 0 else torch.randn(1024, 4096) for i in range(args.layers)]
    chunk = args.chunk
    a, b = torch.empty(chunk), torch.empty(chunk)
    flags = torch.empty(chunk, dtype=torch.bool)
    flags.zero_()
    flags[::1000] = True
    ints = torch.empty(chunk, dtype=torch.int32)
    edges = torch.tensor([1e-45, 0.6, 0.7])

    def chunks():
        for w in weights:
            flat = w.view(-1)
            for start in range(0, flat.numel(), chunk):
                yield flat[start : start + chunk]

    def timed(fn) -> float:
        fn()
        runs = []
        for _ in range(9):
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        return statistics.median(runs) * 1e3

    def floor() -> None:
        with torch.no_grad():
            for w in weights:
                w.mul_(1.0)

    def over_chunks(op):
        def run() -> None:
            for c in chunks():
                op(c)

        return run

    cases = {
        "abs (reads memory)": lambda c: torch.abs(c, out=a),
        "abs, then abs again in cache": lambda c: (torch.abs(c, out=a), torch.abs(a, out=b)),
        "sum (reads memory)": lambda c: c.sum(),
        "lt into float (reads memory)": lambda c: torch.lt(c, 0.5, out=a),
        "digits of abs(w) + bincount": lambda c: (
            torch.bitwise_right_shift(c.view(torch.int32), 16, out=ints),
            ints.bitwise_and_(0x7FFF),
            torch.bincount(ints),
        ),
        "nonzero of a sparse bool chunk": lambda c: torch.nonzero(flags),
        "masked_select of a sparse bool chunk": lambda c: torch.masked_select(c, flags),
        "bucketize into 4 buckets": lambda c: torch.bucketize(c, edges, out_int32=True, out=ints),
        "histc, one bin": lambda c: torch.histc(c, bins=1, min=-0.5, max=0.5),
    }
    base = timed(floor)
    n = sum(w.numel() for w in weights)
    print(f"{n / 1e6:.0f}M fp32 weights, chunks of {chunk}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"| op | ms | x floor |\n|---|---|---|\n| floor: weight.mul_(c) per layer | {base:.1f} | 1.0 |")
    for name, op in cases.items():
        ms = timed(over_chunks(op))
        print(f"| {name} | {ms:.1f} | {ms / base:.1f} |")


if __name__ == "__main__":
    main()
