"""The benchmark tools run and report what they measured (tiny shapes, few calls)."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


def run(args, timeout=600):
    res = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_bench_writes_tables_json_and_plot(tmp_path):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    res = run(
        [
            "-m", "pgext.bench", "--shapes", "16x5,8x300", "--thp", "on", "--no-compile",
            "--repeat", "3", "--json", str(out_json), "--plot", str(out_png),
        ]
    )
    assert "| 16x5 " in res.stdout and "| 8x300 " in res.stdout, res.stdout
    data = json.loads(out_json.read_text())
    (mode,) = data["modes"]
    assert mode["thp"] == "on"
    shapes = {tuple(r["shape"]): r for r in mode["results"]}
    assert set(shapes) == {(16, 5), (8, 300)}
    for r in shapes.values():
        for impl in ("pgext", "reference", "exp"):
            assert r["impls"][impl]["median_ms"] > 0
            assert r["impls"][impl]["calls"] == 3
        assert r["impls"]["pgext"]["saved_bytes"] == 12 * r["shape"][0]  # lse (float64) and H (float32)
        assert r["impls"]["compiled"]["error"] == "skipped (--no-compile)"
        ratio = r["impls"]["reference"]["median_ms"] / r["impls"]["pgext"]["median_ms"]
        assert r["ratios"]["ref/pgext"] == pytest.approx(ratio)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_small_batch_floor_script():
    res = run(["benchmarks/small_batch_floor.py", "--shapes", "8x2", "--rounds", "2", "--calls", "20"])
    rows = [line for line in res.stdout.splitlines() if line.startswith("| 8x2 ")]
    assert len(rows) == 1, res.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    pgext_us, ref_us, floor_us, ratio, best = (float(c) for c in cells[1:])
    assert min(pgext_us, ref_us, floor_us) > 0
    assert ratio == pytest.approx(ref_us / pgext_us, rel=0.01)
    assert best == pytest.approx(ref_us / floor_us, rel=0.01)


def test_dtype_ratio_script():
    res = run(["benchmarks/dtype_ratio.py", "--shapes", "8x5,4x40", "--target-time", "0.02", "--thp", "off"])
    for shape in ("8x5", "4x40"):
        rows = [line for line in res.stdout.splitlines() if line.startswith(f"| {shape} ")]
        assert len(rows) == 1, res.stdout
        f32_ms, bf16_ms, ratio = (float(c) for c in rows[0].strip().strip("|").split("|")[1:])
        assert min(f32_ms, bf16_ms) > 0
        assert ratio == pytest.approx(bf16_ms / f32_ms, rel=0.01)


def test_dtype_ratio_script_rejects_an_unknown_dtype():
    res = subprocess.run([sys.executable, "benchmarks/dtype_ratio.py", "--dtypes", "float32,int8"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown dtype 'int8'" in res.stderr, res.stderr


def test_losses_script(tmp_path):
    """benchmarks/losses.py at its small shapes: both tables, every timing
    positive, the ratios computed from them."""
    out = tmp_path / "losses.json"
    res = run(["benchmarks/losses.py", "--quick", "--no-compile", "--thp", "off", "--budget", "0.2",
               "--rounds", "3", "--json", str(out)])
    assert "| 256 x 100 | float32 |" in res.stdout and "| 256 x 100 | bfloat16 |" in res.stdout, res.stdout
    assert "| 64 x 2 |" in res.stdout, res.stdout
    (mode,) = json.loads(out.read_text())
    assert mode["thp"] is False
    for rec in mode["lpe"]:
        assert set(rec["ms"]) == {"pgext", "pg_error", "eager", "read"}
        assert all(m["median"] > 0 and m["runs"] >= 3 for m in rec["ms"].values())
    for rec in mode["ppo"]:
        assert set(rec["ms"]) == {"pgext", "reference"}


@pytest.mark.parametrize("op", ["log_prob_entropy", "ppo"])
def test_bench_times_each_op(op, tmp_path):
    """--op: the same tables and JSON for the other ops, the targets of that op only."""
    out_json = tmp_path / "b.json"
    res = run(["-m", "pgext.bench", "--op", op, "--shapes", "64x2,16x300", "--thp", "off", "--no-compile",
               "--repeat", "3", "--json", str(out_json)])
    assert f"### {op}: THP off" in res.stdout, res.stdout
    data = json.loads(out_json.read_text())
    assert data["config"]["op"] == op and all(t["bench"] == op for t in data["targets"])
    (mode,) = data["modes"]
    for r in mode["results"]:
        for impl in ("pgext", "reference", "exp"):
            assert r["impls"][impl]["median_ms"] > 0
        assert r["impls"]["pgext"]["saved_bytes"] > 0
    # the (64, 2) targets of ppo are evaluated; log_prob_entropy has none at these shapes
    records = mode["results"][0]["targets"]
    assert [t["status"] in ("PASS", "MISS") for t in records] == ([True] if op == "ppo" else [])


def test_bench_linear_log_prob_entropy(tmp_path):
    """--op linear_log_prob_entropy: fused, unfused and F.linear_cross_entropy,
    each in its own process per page-fault mode (THP_MEM_ALLOC_ENABLE reaches
    the worker), time and peak memory, the targets."""
    out_json = tmp_path / "l.json"
    res = run(["-m", "pgext.bench", "--op", "linear_log_prob_entropy", "--shapes", "16x300", "--hidden", "8",
               "--repeat", "2", "--json", str(out_json)])
    for mode in ("off", "on"):
        assert f"### linear_log_prob_entropy: cpu, float32, H = 8, THP {mode}" in res.stdout, res.stdout
    data = json.loads(out_json.read_text())
    assert [(r["thp"], r["impl"]) for r in data["results"]] == [
        (mode, impl) for mode in ("off", "on") for impl in ("fused", "unfused", "lce")]
    for r in data["results"]:
        assert "error" not in r, r
        assert r["median_ms"] > 0 and r["repeat"] == 2 and r["peak_bytes"] >= 0
        assert r["thp_mem_alloc"] == (r["thp"] == "on"), r
    assert res.stdout.count("time(fused) <= 1.4 x time(unfused)") == 2
