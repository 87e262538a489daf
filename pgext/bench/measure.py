"""The measuring half of ``python -m pgext.bench``: runs in a worker process
whose THP_MEM_ALLOC_ENABLE was settled before torch was imported."""
from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import targets
from .ops import OPS, BenchOp

IMPLS = ("pgext", "reference", "compiled", "exp")
MIN_CALLS = 3  # timed calls per impl per shape, whatever the target time
MAX_CALLS = 200_000
MAX_ROUNDS = 10  # interleaving rounds per shape
WARMUP_S = 0.2
# Development only: PGEXT_BENCH_STANDIN=1 times pgext.reference in pgext's
# column (labelled as such everywhere) instead of importing the extension.
STANDIN_ENV = "PGEXT_BENCH_STANDIN"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_pgext(op: BenchOp) -> Tuple[Callable, str]:
    """``(pgext's call of op, version)`` of the real extension."""
    if os.environ.get(STANDIN_ENV) == "1":
        return op.reference, "STAND-IN: pgext.reference (PGEXT_BENCH_STANDIN=1)"
    from pgext import __version__

    return op.pgext, __version__


def pgext_cpu_kernels(dtype: str) -> Optional[str]:
    """pgext's CPU kernel build for logits of ``dtype`` (None for the stand-in)."""
    if os.environ.get(STANDIN_ENV) == "1":
        return None
    from pgext import _C

    return _C.cpu_capability(getattr(torch, dtype))


def thp_sysfs() -> Optional[str]:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().strip()
    except OSError:
        return None


def environment(device: str, pgext_version: str) -> dict:
    env = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        python=platform.python_version(),
        platform=platform.platform(),
        torch=torch.__version__,
        pgext=pgext_version,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        thp_env=os.environ.get("THP_MEM_ALLOC_ENABLE"),
        thp_sysfs=thp_sysfs(),
        device=device,
    )
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


# ----------------------------------------------------------------- timing


def _time_calls(step: Callable[[], None], k: int, device: str) -> List[float]:
    """Milliseconds of each of ``k`` consecutive calls."""
    if device == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(k)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(k)]
        torch.cuda.synchronize()
        for s, e in zip(starts, ends):
            s.record()
            step()
            e.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    clock = time.perf_counter_ns
    out = []
    for _ in range(k):
        t0 = clock()
        step()
        out.append((clock() - t0) * 1e-6)
    return out


def _warmup(step: Callable[[], None], device: str) -> float:
    """Runs ``step`` a little; returns the estimated ms per call."""
    samples: List[float] = []
    deadline = time.perf_counter() + WARMUP_S
    while len(samples) < 2 or (time.perf_counter() < deadline and len(samples) < 1000):
        samples += _time_calls(step, 1 if len(samples) < 8 else 16, device)
    return statistics.median(samples[1:])


# --------------------------------------------------------- implementations


def _inputs(op: BenchOp, rows: int, n: int, dtype: torch.dtype, device: str):
    gen = torch.Generator(device="cpu").manual_seed(rows * 1_000_003 + n)
    return op.make_inputs(rows, n, dtype, device, gen)


def _loss_step(op: BenchOp, fn, inputs) -> Callable[[], None]:
    logit = inputs[0]

    def step():
        op.loss(fn(*inputs), *inputs).backward()
        logit.grad = None

    return step


def _exp_step(logit) -> Callable[[], None]:
    x = logit.detach()

    def step():
        with torch.no_grad():
            torch.exp(x)

    return step


def _saved_bytes(op: BenchOp, fn, inputs) -> Tuple[int, int]:
    """(bytes, storages) autograd saves for backward, inputs excluded."""
    owned = {t.untyped_storage().data_ptr() for t in inputs}
    seen: Dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # storage-less tensor kinds
            key, nbytes = id(t), t.numel() * t.element_size()
        if key not in owned:
            seen[key] = max(seen.get(key, 0), nbytes)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        op.loss(fn(*inputs), *inputs).backward()
    inputs[0].grad = None
    return sum(seen.values()), len(seen)


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:300]


# ------------------------------------------------------------------ driver


def measure_shape(rows, n, cfg, op: BenchOp, pgext_fn, prefix) -> dict:
    device, dtype = cfg["device"], getattr(torch, cfg["dtype"])
    tag = f"{prefix}{rows}x{n}"
    res: Dict[str, dict] = {name: dict(error=None) for name in IMPLS}
    inputs = _inputs(op, rows, n, dtype, device)
    fns = {"pgext": pgext_fn, "reference": op.reference}
    steps: Dict[str, Callable[[], None]] = {
        "pgext": _loss_step(op, pgext_fn, inputs),
        "reference": _loss_step(op, op.reference, inputs),
        "exp": _exp_step(inputs[0]),
    }
    if cfg["compile"]:
        torch._dynamo.reset()  # one fresh static-shape compile per shape
        compiled = torch.compile(op.reference, dynamic=False)
        fns["compiled"] = compiled
        steps["compiled"] = _loss_step(op, compiled, inputs)
        log(f"{tag} compiled: compiling ...")
        t0 = time.perf_counter()
        try:
            steps["compiled"]()
            if device == "cuda":
                torch.cuda.synchronize()
            res["compiled"]["compile_s"] = time.perf_counter() - t0
            log(f"{tag} compiled: compiled in {res['compiled']['compile_s']:.1f} s")
        except Exception as exc:  # noqa: BLE001 - any compile failure is reported, never fatal
            res["compiled"]["error"] = "torch.compile failed: " + _reason(exc)
            log(f"{tag} compiled: n/a ({res['compiled']['error']})")
            del steps["compiled"]
    else:
        res["compiled"]["error"] = "skipped (--no-compile)"

    # warm up and size each impl's share of the run
    per_call: Dict[str, float] = {}
    for name in IMPLS:
        if name not in steps:
            continue
        try:
            per_call[name] = _warmup(steps[name], device)
        except Exception as exc:  # noqa: BLE001
            res[name]["error"] = _reason(exc)
            log(f"{tag} {name}: n/a ({res[name]['error']})")
            del steps[name]
    calls = {}
    for name, ms in per_call.items():
        if cfg["repeat"]:
            calls[name] = cfg["repeat"]
        else:
            want = cfg["target_time"] * 1e3 / max(ms, 1e-6)
            calls[name] = int(min(MAX_CALLS, max(MIN_CALLS, math.ceil(want))))

    # interleaved rounds: every impl gets a slice of each round, rotating order
    samples: Dict[str, List[float]] = {name: [] for name in steps}
    if calls:
        rounds = max(1, min(MAX_ROUNDS, min(calls.values())))
        order = list(steps)
        gc.collect()
        gc.disable()
        try:
            for r in range(rounds):
                for name in order[r % len(order):] + order[: r % len(order)]:
                    if name not in steps:
                        continue
                    k = calls[name] // rounds + (1 if r < calls[name] % rounds else 0)
                    try:
                        samples[name] += _time_calls(steps[name], k, device)
                    except Exception as exc:  # noqa: BLE001
                        res[name]["error"] = _reason(exc)
                        del steps[name]
        finally:
            gc.enable()

    for name in IMPLS:
        r = res[name]
        if r["error"] is None and samples.get(name):
            s = samples[name]
            r.update(median_ms=statistics.median(s), min_ms=min(s), calls=len(s))
            if name in fns:
                try:
                    r["saved_bytes"], r["saved_storages"] = _saved_bytes(op, fns[name], inputs)
                except Exception as exc:  # noqa: BLE001
                    r["saved_error"] = _reason(exc)
            extra = f", compile {r['compile_s']:.1f} s" if "compile_s" in r else ""
            saved = f", saved {r['saved_bytes']} B" if "saved_bytes" in r else ""
            log(
                f"{tag} {name}: median {r['median_ms']:.4f} ms, min {r['min_ms']:.4f} ms, "
                f"{r['calls']} calls{saved}{extra}"
            )
        elif r["error"] is not None and name in per_call:
            log(f"{tag} {name}: n/a ({r['error']})")

    del steps, fns, inputs
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    med = {name: res[name].get("median_ms") for name in IMPLS}

    def ratio(a, b):
        return med[a] / med[b] if med[a] and med[b] else None

    ratios = {
        "ref/pgext": ratio("reference", "pgext"),
        "compiled/pgext": ratio("compiled", "pgext"),
        "pgext/exp": ratio("pgext", "exp"),
    }
    logit_bytes = rows * n * torch.empty((), dtype=dtype).element_size()
    return dict(
        shape=[rows, n],
        elements=rows * n,
        logit_bytes=logit_bytes,
        impls=res,
        ratios=ratios,
        targets=targets.evaluate(op.name, (rows, n), ratios),
    )


def run(cfg: dict) -> dict:
    """Measures every shape of ``cfg``; returns the JSON-able result of this mode."""
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    op = OPS[cfg["op"]]
    pgext_fn, version = load_pgext(op)
    env = environment(cfg["device"], version)
    env["thp_mode"] = cfg["thp"]
    env["pgext_cpu_kernels"] = pgext_cpu_kernels(cfg["dtype"])
    prefix = f"[thp {cfg['thp']}] " if cfg["device"] == "cpu" else "[cuda] "
    log(
        f"{prefix}torch {env['torch']}, pgext {version}, {env['cpu_capability']} "
        f"(pgext kernels {env['pgext_cpu_kernels']}), "
        f"{env['threads']} threads, {cfg['dtype']} on {cfg['device']}"
    )
    t0 = time.perf_counter()
    shapes = []
    for rows, n in cfg["shapes"]:
        shapes.append(measure_shape(rows, n, cfg, op, pgext_fn, prefix))
    env["elapsed_s"] = round(time.perf_counter() - t0, 1)
    log(f"{prefix}done in {env['elapsed_s']} s")
    return dict(thp=cfg["thp"], op=op.name, environment=env, results=shapes)
