"""What the vmap batching rules (pgext/_vmap.py) buy: per-policy gradients of
an ensemble of E policies on one batch, ``vmap(grad(step))``, against the loop
over the policies that PyTorch's per-entry fallback amounts to. Both in one
process, interleaved; prints median ms and the ratio.

    .venv/bin/python benchmarks/vmap_ensemble.py [--ensemble 16] [--shape 256x18]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.func import grad, vmap  # noqa: E402

import pgext  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ensemble", type=int, default=16)
    parser.add_argument("--shape", default="256x18")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    rows, n = (int(v) for v in args.shape.lower().split("x"))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(args.ensemble, rows, n, generator=g)
    action = torch.randint(0, n, (rows,), generator=g)
    ret = torch.randn(rows, generator=g)

    def step(logit):
        loss = pgext.pg_error(pgext.pg_data(logit, action, ret))
        return loss.policy_loss - 0.01 * loss.entropy_loss

    batched = vmap(grad(step))
    per_policy = grad(step)
    fns = {
        "vmap": lambda: batched(logits),
        "loop": lambda: torch.stack([per_policy(x) for x in logits]),
    }
    torch.testing.assert_close(fns["vmap"](), fns["loop"]())
    samples = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            fn()
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            samples[name].append((time.perf_counter() - t0) / 5 * 1e3)
    ms = {name: statistics.median(s) for name, s in samples.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, vmap(grad(pg_error step)) over "
          f"{args.ensemble} policies of {rows}x{n}, median ms")
    print("| vmap | loop | loop / vmap |")
    print("| --- | --- | --- |")
    print(f"| {ms['vmap']:.2f} | {ms['loop']:.2f} | {ms['loop'] / ms['vmap']:.1f} |")


if __name__ == "__main__":
    main()
