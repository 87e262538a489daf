"""``python -m pgext.bench --op linear_log_prob_entropy``: the fused output
layer against the two ways to do without it.

  fused     pgext.linear_log_prob_entropy(input, W, action)
  unfused   pgext.log_prob_entropy(F.linear(input, W), action)
  lce       F.linear_cross_entropy(input, W, action, reduction='sum',
            options=torch.nn.LinearCrossEntropyOptions()): PyTorch's chunked
            path, cross-entropy only (log_prob; no entropy)

Each step is forward + backward of ``sum(g1 * log_prob + g2 * entropy)``
(lce: of its loss) with gradients to input and W. Each implementation runs
in its own process, so that its peak memory is its own: that of the first
step, the CUDA allocator's peak or the largest RSS on the CPU, above what
exists before the step, minus the two parameter gradients (input.grad,
W.grad) the step allocates. The times are of the steps after it. With
``--thp both`` (the default on the CPU) every implementation runs once per
page-fault mode, THP_MEM_ALLOC_ENABLE unset and set to 1, a table for each.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

IMPLS = ("fused", "unfused", "lce")
MIB = float(1 << 20)

# the fused head's targets: (what, bound), checked in report()
TARGETS = (
    ("peak(fused) <= peak(unfused) / 8", 1 / 8),
    ("peak(fused) <= peak(lce)", 1.0),
    ("time(fused) <= 1.4 x time(unfused)", 1.4),
    ("time(lce) >= 2 x time(fused)", 2.0),
)


def _step_fn(impl: str, x, w, a, g1, g2, chunk_size: Optional[int]):
    import torch
    import torch.nn.functional as F

    import pgext

    if impl == "fused":
        def step():
            lp, ent = pgext.linear_log_prob_entropy(x, w, a, chunk_size=chunk_size)
            ((lp * g1).sum() + (ent * g2).sum()).backward()
    elif impl == "unfused":
        def step():
            lp, ent = pgext.log_prob_entropy(F.linear(x, w), a)
            ((lp * g1).sum() + (ent * g2).sum()).backward()
    elif impl == "lce":
        options = torch.nn.LinearCrossEntropyOptions()

        def step():
            F.linear_cross_entropy(x, w, a, reduction="sum", options=options).backward()
    else:
        raise ValueError(f"unknown implementation {impl!r}")

    def run():
        x.grad = w.grad = None
        step()
    return run


def _rss_kib(field: str) -> Optional[int]:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _peak_rss(step) -> int:
    """The largest RSS (bytes) while ``step()`` runs: VmHWM after a reset,
    and a thread that samples the RSS every millisecond, whichever is larger
    (the kernel updates VmHWM lazily; a tensor alive for a few milliseconds
    is seen by the thread)."""
    import threading

    page = os.sysconf("SC_PAGE_SIZE")
    statm = open("/proc/self/statm", "rb", buffering=0)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            statm.seek(0)
            peak[0] = max(peak[0], int(statm.read().split()[1]) * page)
            done.wait(0.001)

    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        step()
    finally:
        done.set()
        thread.join()
        statm.close()
    return max(peak[0], _rss_kib("VmHWM") * 1024)


def worker(cfg: dict) -> dict:
    """One implementation at one shape, in this process: times and peak."""
    import ctypes
    import gc

    import torch

    if cfg["device"] == "cpu":
        try:  # freed blocks >= 1 MiB leave RSS, so the next peak starts from the truth
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
        except (OSError, AttributeError):
            pass
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    dev = torch.device(cfg["device"])
    dtype = getattr(torch, cfg["dtype"])
    rows, vocab, hidden = cfg["rows"], cfg["vocab"], cfg["hidden"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=gen).to(dev, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) / hidden ** 0.5).to(dev, dtype).requires_grad_()
    a = torch.randint(0, vocab, (rows,), generator=gen).to(dev)
    g1, g2 = (torch.randn(rows, generator=gen).to(dev) for _ in range(2))
    step = _step_fn(cfg["impl"], x, w, a, g1, g2, cfg.get("chunk_size"))
    grad_bytes = (x.numel() + w.numel()) * x.element_size()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # The peak is the first step's, in this fresh process: memory that an
    # earlier step freed may stay with the process (allocator caches) and
    # hide the growth. That step is also the warm-up of the timed ones; with
    # --repeat 1 (sizes where a step takes minutes) it is the one timed, cold.
    cold = cfg["repeat"] == 1
    gc.collect()
    t0 = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        step()
        sync()
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        base = _rss_kib("VmRSS") * 1024
        peak = _peak_rss(step) - base
    times: List[float] = [time.perf_counter() - t0] if cold else []
    for _ in range(0 if cold else cfg["repeat"]):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return dict(impl=cfg["impl"], rows=rows, vocab=vocab, hidden=hidden, dtype=cfg["dtype"],
                device=cfg["device"], thp_mem_alloc=os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
                peak_bytes=max(peak - grad_bytes, 0), grad_bytes=grad_bytes,
                median_ms=statistics.median(times) * 1e3, min_ms=min(times) * 1e3, max_ms=max(times) * 1e3,
                repeat=len(times))


def _launch(cfg: dict, thp: str) -> dict:
    root = str(Path(__file__).resolve().parent.parent.parent)
    env = dict(os.environ)
    env.pop("THP_MEM_ALLOC_ENABLE", None)  # read once, when torch is imported
    if thp == "on":
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "pgext.bench.linear", json.dumps(cfg)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(impl=cfg["impl"], rows=cfg["rows"], vocab=cfg["vocab"], thp=thp, error=last[-200:])
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), thp=thp)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def report(results: List[dict], cfg: dict, thp: str) -> str:
    """The table and the targets of one page-fault mode's results."""
    env = f"{cfg['device']}, {cfg['dtype']}, H = {cfg['hidden']}, THP {thp}"
    lines = [f"### linear_log_prob_entropy: {env}", "",
             "| tokens x V | impl | median ms | min-max ms | peak MiB | peak / unfused | time / unfused |",
             "|---|---|---:|---:|---:|---:|---:|"]
    checks = []
    for shape in dict.fromkeys((r["rows"], r["vocab"]) for r in results):
        by = {r["impl"]: r for r in results if (r["rows"], r["vocab"]) == shape}
        ok = {k: v for k, v in by.items() if "error" not in v}
        base = ok.get("unfused")
        for impl, r in by.items():
            label = f"{shape[0]} x {shape[1]}"
            if "error" in r:
                lines.append(f"| {label} | {impl} | failed: {r['error']} | | | | |")
                continue
            pr = _ratio(r["peak_bytes"], base["peak_bytes"]) if base else None
            tr = _ratio(r["median_ms"], base["median_ms"]) if base else None
            lines.append(f"| {label} | {impl} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | "
                         f"{r['peak_bytes'] / MIB:.1f} | {'-' if pr is None else f'{pr:.3f}'} | "
                         f"{'-' if tr is None else f'{tr:.2f}'} |")
        f, u, c = ok.get("fused"), ok.get("unfused"), ok.get("lce")
        values = (
            _ratio(f and f["peak_bytes"], u and u["peak_bytes"]),
            _ratio(f and f["peak_bytes"], c and c["peak_bytes"]),
            _ratio(f and f["median_ms"], u and u["median_ms"]),
            _ratio(c and c["median_ms"], f and f["median_ms"]),
        )
        for (what, bound), value in zip(TARGETS, values):
            if value is None:
                continue
            passed = value >= bound if what.startswith("time(lce)") else value <= bound
            checks.append(f"- {shape[0]} x {shape[1]}: {what}: {value:.3g} {'PASS' if passed else 'MISS'}")
    lines.append("")
    lines.append("peak: memory beyond the inputs and the parameter gradients (input.grad, W.grad); "
                 "lce computes cross-entropy only.")
    if checks:
        lines += ["", "Targets (informational):", ""] + checks
    return "\n".join(lines)


def main(args) -> int:
    """Run from pgext.bench's CLI: every shape (tokens x V) and implementation."""
    cfg = dict(hidden=args.hidden, dtype=args.dtype, device=args.device, threads=args.threads,
               repeat=args.repeat or 3, chunk_size=args.chunk_size)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for impl in impls:
        if impl not in IMPLS:
            print(f"pgext.bench: unknown implementation {impl!r}; choose from {', '.join(IMPLS)}", file=sys.stderr)
            return 2
    # THP only changes CPU memory; CUDA runs once
    modes = ["off"] if args.device == "cuda" else (["off", "on"] if args.thp == "both" else [args.thp])
    results, sections = [], []
    for thp in modes:
        mode_results = []
        for rows, vocab in args.shapes:
            for impl in impls:
                print(f"pgext.bench: {impl} at {rows} x {vocab}, THP {thp}", file=sys.stderr)
                mode_results.append(_launch(dict(cfg, impl=impl, rows=rows, vocab=vocab), thp))
        sections.append(report(mode_results, cfg, thp))
        results += mode_results
    print("\n\n".join(sections))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(benchmark="pgext.bench", op="linear_log_prob_entropy",
                                                   config=cfg, results=results), indent=1))
        print(f"pgext.bench: wrote {args.json}", file=sys.stderr)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
