"""Timing and peak-memory helpers shared by the token-level examples."""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``step()`` over ``repeats`` runs, after one warm-up."""
    times = []
    for i in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        out = step()
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
        del out
    return statistics.median(times)


def _rss_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:  # Linux: writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def malloc_returns_big_blocks() -> None:
    """Makes glibc serve and return blocks >= 1 MiB with mmap, so freed tensors leave RSS
    and the next measurement's growth is not hidden by memory malloc kept."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_growth(step: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak memory above the starting point while ``step()`` runs (bytes): the
    CUDA caching allocator's peak on GPU, peak RSS on CPU (None where the
    kernel cannot reset it)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not _reset_peak_rss():
        return None
    base = _rss_kib("VmRSS")
    step()
    peak = _rss_kib("VmHWM")
    return None if base is None or peak is None else (peak - base) * 1024
