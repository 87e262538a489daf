"""What the vmap batching rules (pgext/ops/vmap.py) buy: ``vmap(grad(step))``
and ``vmap(step)`` over E policies' logits on one batch, with the rules and
with PyTorch's per-entry fallback (which the rules replace; it warns and calls
the ops once per entry). The rules' cost is mostly PyTorch's fixed price of a
Python batching rule, so they win from a few tens of entries on, and for large
rows. Both in one process, in alternating blocks; prints median ms.

    .venv/bin/python benchmarks/vmap_ensemble.py [--cases 4x64x18,64x64x18,...]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.func import grad, vmap  # noqa: E402

import pgext  # noqa: E402
from pgext.ops import vmap as _vmap  # noqa: E402

CASES = "4x64x18,16x256x18,64x64x18,256x16x6,4x2048x1000"


def timed(fn, reps: int = 5) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=CASES, help="ENTRIESxROWSxN,...")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*performance drop.*")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median ms per call")
    print("| entries x rows x N | vmap(grad) rules | vmap(grad) fallback | vmap rules | vmap fallback |")
    print("| --- | --- | --- | --- | --- |")
    for spec in args.cases.split(","):
        entries, rows, n = (int(v) for v in spec.lower().split("x"))
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(entries, rows, n, generator=g)
        action = torch.randint(0, n, (rows,), generator=g)
        ret = torch.randn(rows, generator=g)

        def step(logit):
            loss = pgext.pg_error(pgext.pg_data(logit, action, ret))
            return loss.policy_loss - 0.01 * loss.entropy_loss

        fns = {"grad": lambda: vmap(grad(step))(logits), "value": lambda: vmap(step)(logits)}
        ms = {(kind, rules): [] for kind in fns for rules in (True, False)}
        for _ in range(args.rounds):
            for rules in (True, False):
                if rules:
                    _vmap.register()
                else:
                    _vmap.unregister()
                for kind, fn in fns.items():
                    ms[kind, rules].append(timed(fn))
        _vmap.register()
        med = {k: statistics.median(v) for k, v in ms.items()}
        print(f"| {spec} | {med['grad', True]:.2f} | {med['grad', False]:.2f} | "
              f"{med['value', True]:.2f} | {med['value', False]:.2f} |")


if __name__ == "__main__":
    main()
