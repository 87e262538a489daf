"""log_prob_entropy and the PPO policy loss against what RL code writes today.

    python benchmarks/losses.py                      # both THP modes, the default shapes
    python benchmarks/losses.py --quick              # small shapes only (what the tests run)

Forward + backward, median ms over interleaved rounds whose order rotates (with
the spread, min-max of the middle half), one process per page-fault mode
(THP_MEM_ALLOC_ENABLE counts only before torch is imported):

log_prob_entropy at (rows x N), float32 and bfloat16, upstream gradient to both outputs:
  pgext        pgext.log_prob_entropy
  pg_error     pgext.pg_error (the same kernels with one reduction): the 1.1x target
  eager        log_softmax, gather, entropy from the probabilities (TRL/verl style)
  compiled     torch.compile of eager (compiled once per shape, untimed)
  read         logit.sum(): one read of the logits, the yardstick of memory
               traffic (forward + backward reads them twice and writes the
               gradient once, so it costs at least about three reads)

ppo_policy_error at (rows x N), float32, DI-engine's defaults, loss backpropagated:
  pgext        pgext.ppo_policy_error
  reference    pgext.reference.ppo_policy_error (DI-engine's Categorical code)

The ratios printed are the measurement; nothing here fails on a target.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

LPE_SHAPES = [(4096, 1000), (2048, 32000), (512, 151936)]
PPO_SHAPES = [(64, 2), (256, 18), (4096, 1000)]
QUICK = dict(lpe=[(256, 100)], ppo=[(64, 2)])


def _eager(logit, action):
    logp = torch.log_softmax(logit.float(), -1)
    log_prob = logp.gather(-1, action.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return log_prob, entropy


def _lpe_step(fn, logit, action, ups):
    def step():
        x = logit.detach().requires_grad_()
        log_prob, entropy = fn(x, action)
        torch.autograd.backward([log_prob, entropy], ups)
    return step


def _pg_error_step(logit, action, ups):
    ret = ups[0]

    def step():
        x = logit.detach().requires_grad_()
        loss = pgext.pg_error(pgext.pg_data(x, action, ret))
        (loss.policy_loss - 0.01 * loss.entropy_loss).backward()
    return step


def _ppo_step(fn, new, old, action, adv):
    def step():
        x = new.detach().requires_grad_()
        loss, _ = fn(pgext.ppo_policy_data(x, old, action, adv, None))
        (loss.policy_loss - 0.01 * loss.entropy_loss).backward()
    return step


def _time(steps: dict, rounds: int, budget: float) -> dict:
    for step in steps.values():  # warm-up
        step()
    t0 = time.perf_counter()
    for step in steps.values():
        step()
    per_round = max(time.perf_counter() - t0, 1e-6)
    rounds = max(3, min(rounds, int(budget / per_round)))
    times = {k: [] for k in steps}
    order = list(steps)
    # The order rotates each round: a step that always ran right after eager's
    # would pay the page faults and cache misses eager leaves behind.
    for r in range(rounds):
        for k in order[r % len(order):] + order[: r % len(order)]:
            t = time.perf_counter()
            steps[k]()
            times[k].append((time.perf_counter() - t) * 1e3)
    out = {}
    for k, v in times.items():
        v = sorted(v)
        q = len(v) // 4
        out[k] = dict(median=statistics.median(v), low=v[q], high=v[len(v) - 1 - q], runs=len(v))
    return out


def worker(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    results = dict(thp=os.environ.get("THP_MEM_ALLOC_ENABLE", "0") == "1", lpe=[], ppo=[])
    lpe_shapes = QUICK["lpe"] if args.quick else LPE_SHAPES
    ppo_shapes = QUICK["ppo"] if args.quick else PPO_SHAPES
    compiled = torch.compile(_eager, dynamic=False) if not args.no_compile else None
    for dtype in (torch.float32, torch.bfloat16):
        for rows, n in lpe_shapes:
            logit = torch.randn(rows, n).to(dtype)
            action = torch.randint(0, n, (rows,))
            ups = [torch.randn(rows), torch.randn(rows)]
            steps = {"pgext": _lpe_step(pgext.log_prob_entropy, logit, action, ups),
                     "pg_error": _pg_error_step(logit, action, ups),
                     "eager": _lpe_step(_eager, logit, action, ups),
                     "read": logit.sum}
            if compiled is not None:
                steps["compiled"] = _lpe_step(compiled, logit, action, ups)
            print(f"log_prob_entropy {rows}x{n} {dtype}", file=sys.stderr, flush=True)
            results["lpe"].append(dict(shape=[rows, n], dtype=str(dtype).split(".")[1],
                                       ms=_time(steps, args.rounds, args.budget)))
    for rows, n in ppo_shapes:
        new, old = torch.randn(rows, n), torch.randn(rows, n)
        action, adv = torch.randint(0, n, (rows,)), torch.randn(rows)
        steps = {"pgext": _ppo_step(pgext.ppo_policy_error, new, old, action, adv),
                 "reference": _ppo_step(pgext.reference.ppo_policy_error, new, old, action, adv)}
        print(f"ppo_policy_error {rows}x{n}", file=sys.stderr, flush=True)
        results["ppo"].append(dict(shape=[rows, n], ms=_time(steps, args.rounds, args.budget)))
    return results


def _cell(m: dict) -> str:
    return f"{m['median']:.3g} ({m['low']:.3g}-{m['high']:.3g})"


def report(mode: dict) -> str:
    lines = [f"### THP {'on' if mode['thp'] else 'off'}", "",
             "log_prob_entropy, forward + backward, median ms (middle half):", "",
             "| shape | dtype | pgext | pg_error | eager | compiled | read | pgext / pg_error | eager / pgext "
             "| compiled / pgext | pgext / read | eager / read |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in mode["lpe"]:
        ms = r["ms"]
        p = ms["pgext"]["median"]
        comp = ms.get("compiled")
        comp_cell, comp_ratio = (_cell(comp), f"{comp['median'] / p:.1f}") if comp else ("n/a", "n/a")
        read = ms["read"]["median"]
        lines.append(f"| {r['shape'][0]} x {r['shape'][1]} | {r['dtype']} | {_cell(ms['pgext'])} | "
                     f"{_cell(ms['pg_error'])} | {_cell(ms['eager'])} | {comp_cell} | {_cell(ms['read'])} | "
                     f"{p / ms['pg_error']['median']:.2f} | {ms['eager']['median'] / p:.1f} | {comp_ratio} | "
                     f"{p / read:.1f} | {ms['eager']['median'] / read:.0f} |")
    lines += ["", "ppo_policy_error (float32), forward + backward, median ms (middle half):", "",
              "| shape | pgext | reference | reference / pgext |", "| --- | --- | --- | --- |"]
    for r in mode["ppo"]:
        ms = r["ms"]
        lines.append(f"| {r['shape'][0]} x {r['shape'][1]} | {_cell(ms['pgext'])} | {_cell(ms['reference'])} | "
                     f"{ms['reference']['median'] / ms['pgext']['median']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--thp", choices=["off", "on", "both"], default="both")
    p.add_argument("--quick", action="store_true", help="small shapes only")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the eager composition")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15, help="at most this many timed rounds per shape")
    p.add_argument("--budget", type=float, default=20.0, help="about this many seconds of rounds per shape")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    modes = []
    for thp in (["off", "on"] if args.thp == "both" else [args.thp]):
        env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1" if thp == "on" else "0")
        cmd = [sys.executable, __file__, "--worker", "--threads", str(args.threads), "--rounds", str(args.rounds),
               "--budget", str(args.budget)] + (["--quick"] if args.quick else []) + \
            (["--no-compile"] if args.no_compile else [])
        out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
        modes.append(json.loads(out.strip().splitlines()[-1]))
        print(report(modes[-1]), flush=True)
        print()
    if args.json:
        Path(args.json).write_text(json.dumps(modes, indent=1))
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        import torch

        try:
            import pgext
        except ImportError:  # from a checkout: the package is next to benchmarks/
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            import pgext
        import pgext.reference  # noqa: F401
    sys.exit(main())
