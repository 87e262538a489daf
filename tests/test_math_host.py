"""The GPU's per-row math, run on the host.

The CUDA forward gives each thread a strided share of a row
(math::online_update per logit) and merges the threads' statistics with a
butterfly of math::combine. The CPU kernels never call online_update, so the
CPU tests do not cover it. tests/host/pg_math_lanes.cpp replays that split
with csrc/core/row_math.h compiled by the host compiler; these tests check its
log-sum-exp and entropy against float64, for masks, NaN and every way a row
can fall among the threads. No GPU needed.
"""
import math
import os
import shutil
import subprocess

import pytest
import torch

from conftest import ROOT

SOURCE = ROOT / "tests" / "host" / "pg_math_lanes.cpp"
CXX = shutil.which(os.environ.get("CXX", "c++"))
ACC = {"f": torch.float32, "d": torch.float64}
# Elements per 16-byte pack: float32 and float64 logits
VEC = {"f": 4, "d": 2}


@pytest.fixture(scope="module")
def replay_binary(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler (c++ or $CXX)")
    from torch.utils.cpp_extension import include_paths

    exe = tmp_path_factory.mktemp("math_host") / "pg_math_lanes"
    includes = [f"-I{ROOT / 'csrc'}"] + [f"-I{p}" for p in include_paths()]
    subprocess.run([CXX, "-std=c++17", "-O2", "-Wall", *includes, str(SOURCE), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    return exe


def replay(binary, rows):
    """rows: (acc, threads, head, values) -> [(lse, entropy)] from the replay."""
    lines = []
    for acc, threads, head, values in rows:
        text = " ".join(float(v).hex() if math.isfinite(v) else repr(float(v)) for v in values)
        lines.append(f"{acc} {threads} {VEC[acc]} {head} {len(values)} {text}")
    out = subprocess.run([str(binary)], input="\n".join(lines) + "\n", check=True, capture_output=True,
                         text=True).stdout.split("\n")
    return [tuple(float.fromhex(w) if w[-1].isdigit() else float(w) for w in line.split()) for line in out[:len(rows)]]


def expected(values):
    """float64 log-sum-exp and entropy of Categorical(logits=values)."""
    x = torch.tensor(values, dtype=torch.float64)
    log_p = torch.log_softmax(x, 0)  # relative to the max: exact for logits of 1e32 too
    p = log_p.exp()
    entropy = -(p * torch.where(p > 0, log_p, torch.zeros_like(x))).sum()
    return torch.logsumexp(x, 0).item(), entropy.item()


def splits(n, vec):
    """(threads, head) the kernels can give a row of n: a short row's group of
    4 to 32 lanes or a long row's block, starting at every offset from a
    16-byte boundary."""
    thread_counts = [4, 8, 32] if n <= 1024 else []
    thread_counts += [128] if n > 64 else []
    return [(t, min(h, n)) for t in thread_counts for h in range(vec)]


def assert_close_row(got, want, acc, what):
    tol = 2e-5 if acc == "f" else 1e-12
    for g, w, name in zip(got, want, ("lse", "entropy")):
        assert abs(g - w) <= tol * (1 + abs(w)), (what, name, g, w)


@pytest.mark.parametrize("acc", ["f", "d"])
@pytest.mark.parametrize("n", [1, 2, 5, 18, 37, 200, 1000, 3001])
def test_every_split_matches_float64(replay_binary, acc, n):
    """Random rows with a third of the logits masked (-inf), one row with an
    outlier far above the rest: every thread count and head offset agrees."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 3
    x[torch.rand(n, generator=g) < 0.3] = -math.inf
    x[n // 2] = 2.5  # at least one finite logit
    outlier = x.clone()
    outlier[n - 1] = 40.0
    dtype = ACC[acc]
    rows, wants = [], []
    for values in (x, outlier):
        values = values.to(dtype).tolist()
        for threads, head in splits(n, VEC[acc]):
            rows.append((acc, threads, head, values))
            wants.append(expected(values))
    for (_, threads, head, _), got, want in zip(rows, replay(replay_binary, rows), wants):
        assert_close_row(got, want, acc, (n, threads, head))


@pytest.mark.parametrize("acc", ["f", "d"])
@pytest.mark.parametrize("n", [3, 6, 8, 18, 300])
def test_a_nan_anywhere_gives_nan(replay_binary, acc, n):
    """A NaN logit at any position, whichever thread reads it and whatever
    that thread's butterfly partner holds (ordinary logits, masked ones only,
    or nothing), makes the row's lse and entropy NaN, as on the CPU."""
    rows, where = [], []
    for background in ("zeros", "masked, one finite", "masked"):
        for pos in range(n):
            values = [0.0 if background == "zeros" else -math.inf] * n
            if background == "masked, one finite":
                values[(pos + n // 2 + 1) % n] = 1.0
            values[pos] = math.nan
            for threads, head in splits(n, VEC[acc]):
                rows.append((acc, threads, head, values))
                where.append((background, pos, threads, head))
    for at, (lse, entropy) in zip(where, replay(replay_binary, rows)):
        assert math.isnan(lse) and math.isnan(entropy), (n, at, lse, entropy)


@pytest.mark.parametrize("acc", ["f", "d"])
def test_masking_with_the_lowest_finite_value(replay_binary, acc):
    """masked_fill(mask, finfo.min) is a common mask: those logits weigh
    exactly 0 and the entropy stays finite, also when a thread reads several
    of them before an ordinary logit, and under a very large maximum."""
    lowest = torch.finfo(ACC[acc]).min
    huge = 1e32 if acc == "f" else 1e300  # lowest - huge overflows to -inf
    cases = [
        [lowest, lowest, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0],
        [lowest] * 7 + [0.5] + [lowest] * 9 + [-1.0, 3.0],
        [lowest, lowest, lowest, huge, 0.0, huge, lowest, lowest],
    ]
    rows = [(acc, threads, head, values) for values in cases for threads, head in splits(len(values), VEC[acc])]
    for (_, threads, head, values), got in zip(rows, replay(replay_binary, rows)):
        finite = [v for v in values if v != lowest]
        want = expected(finite)
        assert_close_row(got, want, acc, (values, threads, head))


@pytest.mark.parametrize("acc", ["f", "d"])
def test_rows_with_no_distribution(replay_binary, acc):
    """Every logit -inf: lse -inf and entropy NaN (the CPU's answer); every
    logit NaN: both NaN."""
    rows = [(acc, 4, 0, [-math.inf] * 6), (acc, 8, 1, [-math.inf] * 40), (acc, 4, 2, [math.nan] * 6),
            (acc, 32, 0, [math.nan] * 3), (acc, 128, 1, [math.nan] * 2000)]
    got = replay(replay_binary, rows)
    assert got[0][0] == -math.inf and math.isnan(got[0][1])
    assert got[1][0] == -math.inf and math.isnan(got[1][1])
    for lse, entropy in got[2:]:
        assert math.isnan(lse) and math.isnan(entropy)
