"""How fast can a small-batch training step be? The autograd floor.

The benchmark's step is ``loss = pg_error(...)``, then
``(loss.policy_loss - 0.01 * loss.entropy_loss).backward()``. At (64, 2) the
arithmetic is nothing; what costs is the fixed price of Python, the dispatcher
and the autograd engine. This script times, in one process and interleaved:

  pgext      the step with pgext.pg_error
  reference  the step with pgext.reference.pg_error (Categorical)
  floor      the same step with the cheapest possible loss node instead of
             pg_error: ``s = logit.sum(); (s - 0.01 * s).backward()``. Its
             graph has as many nodes as pgext's (loss, mul, sub, accumulate),
             so no implementation of pg_error can take less.

and prints reference / floor: the largest reference / pgext ratio that any
pg_error could reach on this machine.

    .venv/bin/python benchmarks/small_batch_floor.py [--shapes 64x2,256x18]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import pgext  # noqa: E402
from pgext.reference import pg_error as reference_pg_error  # noqa: E402


def steps(rows: int, n: int):
    g = torch.Generator().manual_seed(0)
    logit = torch.randn(rows, n, generator=g).requires_grad_(True)
    action = torch.randint(0, n, (rows,), generator=g)
    ret = torch.randn(rows, generator=g)

    def with_loss(fn):
        def step():
            loss = fn(pgext.pg_data(logit, action, ret))
            (loss.policy_loss - 0.01 * loss.entropy_loss).backward()
            logit.grad = None

        return step

    def floor():
        s = logit.sum()
        (s - 0.01 * s).backward()
        logit.grad = None

    return {"pgext": with_loss(pgext.pg_error), "reference": with_loss(reference_pg_error), "floor": floor}


def measure(rows: int, n: int, rounds: int, calls: int) -> dict:
    fns = steps(rows, n)
    samples = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(200):
            fn()
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter_ns()
                for _ in range(calls):
                    fn()
                samples[name].append((time.perf_counter_ns() - t0) / calls / 1e3)
    finally:
        gc.enable()
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="64x2,256x18")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median us per step")
    print("| shape | pgext | reference | floor | reference / pgext | reference / floor (best possible) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for spec in args.shapes.split(","):
        rows, n = (int(v) for v in spec.lower().split("x"))
        us = measure(rows, n, args.rounds, args.calls)
        print(
            f"| {rows}x{n} | {us['pgext']:.1f} | {us['reference']:.1f} | {us['floor']:.1f} | "
            f"{us['reference'] / us['pgext']:.2f} | {us['reference'] / us['floor']:.2f} |"
        )


if __name__ == "__main__":
    main()
