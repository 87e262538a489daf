"""Benchmark of pgext's fused policy-gradient loss + entropy bonus.

Run ``python -m pgext.bench --help`` for the options.  The measuring itself
happens in one worker subprocess per page-fault mode (``--thp``), because
PyTorch reads THP_MEM_ALLOC_ENABLE only when torch is imported; this process
only launches the workers, then prints/saves/plots what they return.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Tuple

from .ops import OPS

DEFAULT_SHAPES: Tuple[Tuple[int, int], ...] = (
    (64, 2),
    (256, 18),
    (4096, 18),
    (4096, 1000),
    (2048, 32000),
    (512, 151936),
)
DTYPES = ("float32", "bfloat16", "float16", "float64")
THP_ENV = "THP_MEM_ALLOC_ENABLE"

DESCRIPTION = """\
Times an op of pgext forward + backward (--op, default pg_error):
  pg_error          loss = pg_error(pg_data(logit, action, return_))
                    (loss.policy_loss - 0.01 * loss.entropy_loss).backward()
                    reference: pgext.reference.pg_error (Categorical)
  log_prob_entropy  log_prob, entropy = log_prob_entropy(logit, action), both
                    backpropagated with per-sample upstream gradients;
                    reference: log_softmax, gather, entropy from the probabilities
  ppo               ppo_policy_error(ppo_policy_data(logit_new, logit_old,
                    action, adv, None)), policy - 0.01 * entropy backpropagated;
                    reference: pgext.reference.ppo_policy_error (DI-engine's code)
  linear_log_prob_entropy
                    the output layer fused in (--shapes are tokens x V, --hidden H):
                    fused, unfused (F.linear then log_prob_entropy) and PyTorch's
                    chunked F.linear_cross_entropy, each in its own process:
                    time and peak memory (pgext/bench/linear.py)
for four implementations, per shape (rows x N):
  pgext       the compiled extension
  reference   the op's eager reference, as above
  compiled    torch.compile(reference), compiled once per shape, untimed
  exp         floor: torch.exp(logit) forward only (one exp per logit,
              one logit-sized output)
Inputs: logit ~ randn (requires_grad), action int64 in [0, N), return_ ~ randn.
Each implementation is warmed up, then timed in interleaved rounds so machine
noise hits all alike; the number of calls is chosen so each implementation
runs about --target-time seconds per shape (at least 3 calls).  Medians and
minimums are reported in ms, with the ratios reference/pgext,
compiled/pgext and pgext/exp, and PASS/MISS against the project's targets
(informational, never fails the run).

Memory: the bytes autograd saves for backward (unique storages seen by
torch.autograd.graph.saved_tensors_hooks, the inputs logit/action/return_
excluded), per row, and as a multiple of logit's size.

Page faults (CPU): a fresh large tensor pays 4 KiB page faults unless
THP_MEM_ALLOC_ENABLE=1 (PyTorch then backs large allocations with 2 MiB
transparent huge pages).  The variable only counts before torch is imported,
so each mode runs in its own subprocess; --thp both (default) prints a table
per mode and a comparison.

The markdown tables go to stdout (copy-pastable); progress goes to stderr."""

EPILOG = """\
examples:
  python -m pgext.bench                            # default shapes, THP off and on
  python -m pgext.bench --shapes 64x2,4096x1000 --thp off --no-compile
  python -m pgext.bench --threads 1 --json bench_results.json --plot bench.png
  python -m pgext.bench --device cuda --dtype bfloat16
  python -m pgext.bench --op log_prob_entropy --shapes 4096x1000,2048x32000,512x151936
  python -m pgext.bench --op ppo --shapes 64x2,256x18,4096x1000
  python -m pgext.bench --op linear_log_prob_entropy --shapes 1024x151936 --hidden 896

The full default run (6 shapes, both THP modes, with torch.compile) takes
several minutes on a small CPU machine, mostly compiling and timing the
reference at the two largest shapes."""


def _shapes(text: str) -> List[Tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            rows, n = (int(v) for v in item.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: expected ROWSxN, e.g. 4096x1000") from None
        if rows < 1 or n < 1:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: rows and N must be positive")
        shapes.append((rows, n))
    if not shapes:
        raise argparse.ArgumentTypeError("no shapes given")
    return shapes


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pgext.bench",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--shapes", type=_shapes, default=list(DEFAULT_SHAPES), metavar="RxN[,RxN...]",
        help="comma-separated rows x N (default: %s)" % ",".join(f"{r}x{n}" for r, n in DEFAULT_SHAPES),
    )
    p.add_argument("--op", choices=tuple(OPS) + ("linear_log_prob_entropy",), default="pg_error",
                   help="what to time (default: pg_error); see the description")
    p.add_argument("--hidden", type=_positive(int), default=896, metavar="H",
                   help="linear_log_prob_entropy: the hidden size H (default: 896, Qwen2.5-0.5B's); "
                        "--shapes are then tokens x V")
    p.add_argument("--impls", default="fused,unfused,lce", metavar="I[,I...]",
                   help="linear_log_prob_entropy: which of fused, unfused, lce to run (default: all)")
    p.add_argument("--chunk-size", type=_positive(int), default=None, metavar="N",
                   help="linear_log_prob_entropy: classes per slice of the fused op (default: its own)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="logit/return_ dtype (default: float32)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu, or cuda (timed with CUDA events; skipped with a message if there is no GPU)")
    p.add_argument("--threads", type=_positive(int), default=None, metavar="N",
                   help="torch.set_num_threads(N) in the workers (default: torch's own choice)")
    p.add_argument("--thp", choices=("on", "off", "both"), default="both",
                   help="THP_MEM_ALLOC_ENABLE=1 (on), unset (off), or one run of each (default: both)")
    p.add_argument("--repeat", type=_positive(int), default=None, metavar="N",
                   help="timed calls per implementation per shape (default: auto, see --target-time)")
    p.add_argument("--target-time", type=_positive(float), default=0.75, metavar="S",
                   help="seconds of timed calls per implementation per shape when --repeat is not given "
                        "(default: 0.75)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) column")
    p.add_argument("--json", metavar="PATH", help="write every result and the environment as JSON")
    p.add_argument("--plot", metavar="PATH.png",
                   help="plot ns per element against N (log-x), a panel per THP mode (needs matplotlib)")
    p.add_argument("--_worker-out", dest="worker_out", help=argparse.SUPPRESS)
    return p


def _config(args, thp: str) -> dict:
    return dict(
        op=args.op,
        shapes=[list(s) for s in args.shapes],
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        thp=thp,
        repeat=args.repeat,
        target_time=args.target_time,
        compile=not args.no_compile,
    )


def _worker(args) -> int:
    from . import measure

    result = measure.run(_config(args, args.thp))
    Path(args.worker_out).write_text(json.dumps(result, indent=1))
    return 0


def _launch(args, mode: str, out: str) -> int:
    cmd = [sys.executable, "-m", "pgext.bench", "--op", args.op, "--thp", mode, "--_worker-out", out,
           "--shapes", ",".join(f"{r}x{n}" for r, n in args.shapes),
           "--dtype", args.dtype, "--device", args.device, "--target-time", str(args.target_time)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.repeat:
        cmd += ["--repeat", str(args.repeat)]
    if args.no_compile:
        cmd.append("--no-compile")
    env = dict(os.environ)
    env.pop(THP_ENV, None)
    if mode == "on":
        env[THP_ENV] = "1"
    # the worker must import this very checkout of pgext
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return subprocess.run(cmd, env=env, stdout=sys.stderr).returncode


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.worker_out:
        return _worker(args)
    if args.op == "linear_log_prob_entropy":
        from . import linear

        return linear.main(args)

    import torch  # already loaded by the pgext package; only for the device check

    from . import report, targets

    if args.device == "cuda" and not torch.cuda.is_available():
        print("pgext.bench: --device cuda but no CUDA device is available "
              "(torch.cuda.is_available() is False); nothing measured.", file=sys.stderr)
        return 0
    modes = ["off", "on"] if args.thp == "both" else [args.thp]
    if args.device == "cuda" and args.thp == "both":
        print("pgext.bench: THP only affects CPU memory; --device cuda runs once (THP off).",
              file=sys.stderr)
        modes = ["off"]

    results, failed = [], []
    with tempfile.TemporaryDirectory(prefix="pgext-bench-") as tmp:
        for mode in modes:
            out = os.path.join(tmp, f"thp-{mode}.json")
            rc = _launch(args, mode, out)
            if rc != 0 or not os.path.exists(out):
                print(f"pgext.bench: the THP {mode} worker failed (exit status {rc}).", file=sys.stderr)
                failed.append(mode)
                continue
            results.append(json.loads(Path(out).read_text()))
    if not results:
        return 1

    cfg = _config(args, args.thp)
    sections = [report.mode_report(m, cfg) for m in results]
    comparison = report.thp_comparison(results)
    if comparison:
        sections.append(comparison)
    print("\n".join(sections))

    if args.json:
        doc = dict(
            benchmark="pgext.bench",
            argv=sys.argv[1:] if argv is None else list(argv),
            config=cfg,
            environment=results[0]["environment"],
            targets=[t._asdict() for t in targets.TARGETS if t.bench == args.op],
            modes=results,
        )
        Path(args.json).write_text(json.dumps(doc, indent=1))
        print(f"pgext.bench: wrote {args.json}", file=sys.stderr)
    if args.plot:
        try:
            report.plot(results, cfg, args.plot)
            print(f"pgext.bench: wrote {args.plot}", file=sys.stderr)
        except ImportError as exc:
            print(f"pgext.bench: --plot needs matplotlib ({exc}); "
                  "pip install -r requirements/demo.txt", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
