"""Is a bfloat16 step as fast as a float32 one? Both dtypes, interleaved.

Two runs of ``python -m pgext.bench``, one per dtype, see the machine in two
different moods: on a shared machine the time of the same step can move by a
third from one minute to the next, more than the difference being measured.
This script times the training step of pgext.bench (``loss = pg_error(...)``,
then ``(loss.policy_loss - 0.01 * loss.entropy_loss).backward()``) for each
dtype in one process, one dtype after the other call by call, so that noise
hits both alike, and prints the median times and their ratio to the first.

The inputs and the step are the benchmark's own (pgext.bench.measure), so
each dtype has its own leaf logits: one float32 tensor shared as the source of
the others would make them non-leaf copies whose backward adds a copy and an
accumulation into the source's gradient. THP_MEM_ALLOC_ENABLE=1 is set before
torch is imported, as the benchmark's "THP on" mode does; pass --thp off to
leave it unset.

    .venv/bin/python benchmarks/dtype_ratio.py [--shapes 4096x1000] [--dtypes float32,bfloat16]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="64x2,256x18,4096x18,4096x1000,2048x32000,512x151936")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="the first is the baseline of the ratios")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--thp", choices=("on", "off"), default="on")
    parser.add_argument("--target-time", type=float, default=1.0,
                        help="seconds of timed steps per dtype and shape (at least 5 steps each)")
    args = parser.parse_args()
    known = ("float16", "bfloat16", "float32", "float64")
    for name in args.dtypes.split(","):
        if name not in known:
            parser.error(f"unknown dtype {name!r} in --dtypes: expected some of {', '.join(known)}")
    return args


def main() -> None:
    args = parse_args()
    if args.thp == "on":
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    else:
        os.environ.pop("THP_MEM_ALLOC_ENABLE", None)
    # torch reads THP_MEM_ALLOC_ENABLE when it is imported
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from pgext.bench.measure import _inputs, _loss_step
    from pgext.bench.ops import OPS

    pg_error = OPS["pg_error"]

    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.dtypes.split(",")
    dtypes = [getattr(torch, name) for name in names]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, THP {args.thp}, "
          f"median ms per step, dtypes interleaved call by call")
    print("| shape | " + " | ".join(names) + " | " + " | ".join(f"{n} / {names[0]}" for n in names[1:]) + " |")
    print("| --- |" + " --- |" * (2 * len(names) - 1))
    for spec in args.shapes.split(","):
        rows, n = (int(v) for v in spec.lower().split("x"))
        steps = [_loss_step(pg_error, pg_error.pgext, _inputs(pg_error, rows, n, dt, "cpu")) for dt in dtypes]
        per_step = []
        for step in steps:
            step()  # first call: allocations
            t0 = time.perf_counter()
            for _ in range(3):
                step()
            per_step.append((time.perf_counter() - t0) / 3)
        calls = max(5, int(args.target_time / max(per_step)))
        samples = [[] for _ in dtypes]
        for _ in range(calls):
            for step, times in zip(steps, samples):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
        ms = [statistics.median(s) * 1e3 for s in samples]
        print(f"| {rows}x{n} | " + " | ".join(f"{m:.4g}" for m in ms) + " | "
              + " | ".join(f"{m / ms[0]:.2f}" for m in ms[1:]) + " |", flush=True)


if __name__ == "__main__":
    main()
