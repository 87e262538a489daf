"""The CPU kernels' separate code paths, each against the reference.

The CPU build picks, by row length N and output size:
  - short rows (N up to four vectors of the accumulation type: 64 float32 /
    32 float64 with AVX-512, half that with AVX2), W rows at a time in a
    transposed tile; backward uses tiles up to half a vector with AVX-512,
    and for every row shorter than one logit vector elsewhere; bfloat16 with
    AVX2 moves tiles of N >= 8 by vector transposes, and backward uses them
    up to N = 28 except at N = 16;
  - the per-row loop over 4096-logit cache blocks, one or several blocks;
  - rows split across threads when they are fewer than 4x the threads;
  - gradients of 16 MiB and more written with non-temporal stores;
  - gradients of 2 MiB and more allocated on 2 MiB pages, the last one freed
    kept for the next of the same size (pg_cpu_alloc.h).
Every boundary is crossed here, with masks, partial tiles and odd row lengths.
"""
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import pgext
from conftest import (
    FLOAT_DTYPES, ROOT, check_against_reference, dtype_id, kernel_library, make_inputs, undefined_symbols,
)

# Both sides of every length threshold above, for W = 4, 8 and 16.
PATH_NS = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 28, 29, 31, 32, 33, 63, 64, 65, 4095, 4096, 4097, 8193]


@pytest.mark.parametrize("n", PATH_NS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_every_path_matches_reference(n, dtype):
    # 37 rows: the last tile is partial whatever W is
    rows = 37 if n < 4000 else 5
    inp = make_inputs((rows,), n, dtype, seed=n, mask=0.3 if n > 1 else False, weight=True)
    check_against_reference(inp, "none")
    check_against_reference(inp, "mean")


@pytest.mark.parametrize("n", [6, 13, 18, 21, 37, 4099, 4104])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_action_at_every_column_of_ragged_rows(n, dtype):
    """Backward writes a ragged row end as the last whole vector (for
    bfloat16 on AVX2, the last float vector when at most that many logits are
    left), overlapping the one before, and applies the one-hot entry once: the
    action at every column, the overlapped ones included, matches the
    reference."""
    rows = n if n < 100 else 40
    inp = make_inputs((rows,), n, dtype, seed=n, mask=0.2, weight=True)
    action = torch.arange(rows) % n if n < 100 else n - 1 - torch.arange(rows)
    logit = inp.logit.clone()
    logit[torch.arange(rows), action] = 0.5  # never a masked action
    check_against_reference(inp._replace(logit=logit, action=action), "none")


@pytest.mark.parametrize("n", [5, 18, 40, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_degenerate_rows_stay_in_their_lane(n, dtype):
    """A fully masked row, a NaN row and a row with a +inf logit give NaN for
    themselves only: tile lanes (short rows) and rows (long ones) never leak
    into their neighbours."""
    inp = make_inputs((20,), n, dtype, seed=3, mask=0.2, weight=True)
    logit = inp.logit.clone()
    logit[4] = -math.inf
    logit[9, n // 2] = math.nan
    logit[14, n // 3] = math.inf
    got = pgext.pg_error((logit, inp.action, inp.return_), weight=inp.weight, reduction="none")
    bad = torch.zeros(20, dtype=torch.bool)
    bad[4] = bad[9] = bad[14] = True
    for name, value in (("policy", got.policy_loss), ("entropy", got.entropy_loss)):
        assert torch.isnan(value[bad]).all(), (name, value)
    # the fully masked row has no distribution: its entropy is NaN (0 * log 0 over nothing)
    assert torch.isnan(got.entropy_loss[4])
    healthy = inp._replace(
        logit=logit[~bad], action=inp.action[~bad], return_=inp.return_[~bad], weight=inp.weight[~bad]
    )
    ref = pgext.pg_error(healthy.data, weight=healthy.weight, reduction="none")
    assert torch.equal(got.policy_loss[~bad], ref.policy_loss)
    assert torch.equal(got.entropy_loss[~bad], ref.entropy_loss)


@pytest.mark.parametrize("n", [4, 18, 40, 100, 5000, 20000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_row_stats_of_nan_and_inf_rows_are_nan(n, dtype):
    """pg_row_stats gives a row with a NaN or +inf logit NaN in all three
    statistics. Its max used to be the max without the NaN, the +inf, or NaN,
    depending on N and on where the NaN sat (a vector max drops NaN)."""
    inp = make_inputs((8,), n, dtype, seed=n, mask=0.2)
    logit = inp.logit.clone()
    logit[1, 0] = logit[2, n // 2] = logit[3, n - 1] = math.nan
    logit[4, n // 3] = logit[5, n - 1] = math.inf
    logit[6] = -math.inf
    logit[7, 0] = math.nan
    logit[7, n - 1] = math.inf
    stats = torch.ops.pgext.pg_row_stats(logit, inp.action, 0)
    bad = [1, 2, 3, 4, 5, 7]
    for name, value in zip(("max", "sum_exp", "shifted_sum"), stats[:3]):
        assert torch.isnan(value[bad]).all(), (name, value)
        assert not torch.isnan(value[[0, 6]]).any(), (name, value)
    assert stats[0][6] == -math.inf and stats[1][6] == 0 and stats[2][6] == 0  # no distribution: empty


@pytest.mark.parametrize("n", [5, 18, 40, 1000, 5000])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_masking_with_the_lowest_finite_value(n, dtype):
    """masked_fill(mask, finfo.min) masks exactly as -inf does: those logits
    weigh 0 and get a gradient of exactly 0, the entropy stays finite. (The
    float64 reference is no yardstick here: its gradient is NaN.)"""
    inp = make_inputs((24,), n, dtype, seed=n, mask=0.3, weight=True)
    masked = inp.logit == -math.inf
    results = []
    for fill in (-math.inf, torch.finfo(dtype).min):
        logit = inp.logit.detach().masked_fill(masked, fill).requires_grad_()
        got = pgext.pg_error((logit, inp.action, inp.return_), weight=inp.weight, reduction="none")
        (got.policy_loss.sum() + got.entropy_loss.sum()).backward()
        results.append((got.policy_loss, got.entropy_loss, logit.grad))
    assert torch.isfinite(results[1][1]).all() and (results[1][2][masked] == 0).all()
    for with_inf, with_lowest in zip(*results):
        assert torch.equal(with_inf, with_lowest)


def test_nan_in_a_block_with_no_finite_logit():
    """The block maximum may drop a NaN (the sums carry it); a block of -inf
    and NaN has no sums, so it must find the NaN itself."""
    n = 5000  # blocks [0, 4096) and [4096, 5000)
    inp = make_inputs((4,), n, torch.float32, seed=21)
    logit = inp.logit.clone()
    logit[0, :4096] = -math.inf
    logit[0, 100] = math.nan
    logit[1, 4096:] = -math.inf
    logit[1, 4999] = math.nan
    logit[2, :] = -math.inf
    logit[2, 7] = math.nan
    got = pgext.pg_error((logit, inp.action, inp.return_), reduction="none")
    for name, value in (("policy", got.policy_loss), ("entropy", got.entropy_loss)):
        assert torch.isnan(value[:3]).all(), (name, value)
        assert torch.isfinite(value[3]), (name, value)


@pytest.mark.parametrize("rows", [2, 64])  # blocks of few rows are merged after a parallel pass
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_nan_block_merged_with_a_masked_block(rows, dtype):
    """A block of NaN and -inf, then a fully masked block, then ordinary
    logits: the merge of the first two must keep the NaN (it used to take
    them for an empty part and give a finite loss). Odd rows are healthy."""
    n = 3 * 4096 + 5
    logit = torch.randn(rows, n, dtype=dtype, generator=torch.Generator().manual_seed(5))
    logit[0::2, :4096] = -math.inf
    logit[0::2, 17] = math.nan
    logit[0::2, 4096:8192] = -math.inf
    logit.requires_grad_()
    action = torch.full((rows,), n - 1)
    got = pgext.pg_error((logit, action, torch.ones(rows, dtype=dtype)), reduction="none")
    (got.policy_loss.sum() + got.entropy_loss.sum()).backward()
    for name, value in (("policy", got.policy_loss), ("entropy", got.entropy_loss)):
        assert torch.isnan(value[0::2]).all() and torch.isfinite(value[1::2]).all(), (name, value)
    assert torch.isnan(logit.grad[0::2]).all() and torch.isfinite(logit.grad[1::2]).all()


@pytest.mark.parametrize("n", [8, 9, 11, 13, 18, 22, 23, 28, 40, 1000, 4133])
def test_bfloat16_gradient_is_the_float32_gradient_rounded(n):
    """Given the same row statistics, the bfloat16 backward computes in float32
    exactly as the float32 one does and rounds once, to nearest even: whatever
    the conversion (at::vec's, the AVX512_BF16 instructions with their
    interleaved lane order, or the AVX2 tiles' transposes of column pairs),
    with the action at every position of a vector pair, masked logits and a
    NaN row; 70 rows, so that the last tile is partial. N = 8 to 28 end the
    tiles' transposed blocks of 8 columns with every width from 1 to 8."""
    rows = 70
    g = torch.Generator().manual_seed(n)
    logit = (3 * torch.randn(rows, n, generator=g)).bfloat16()
    logit[5, ::7] = -math.inf
    logit[6, n // 2] = math.nan
    action = torch.randint(0, n, (rows,), generator=g)
    action[:64] = (torch.arange(64) + n // 3) % n  # every position within 64 logits
    return_ = torch.randn(rows, generator=g).bfloat16()
    fwd, bwd = torch.ops.pgext.pg_error_forward.default, torch.ops.pgext.pg_error_backward.default
    stats = fwd(logit.float(), action, return_.float(), None, "none")
    lse, entropy = stats[2], stats[3]
    up_p, up_e = torch.randn(rows, generator=g).bfloat16(), torch.randn(rows, generator=g).bfloat16()
    got = bwd(up_p, up_e, logit, action, return_, None, lse, entropy, "none")
    want = bwd(up_p.float(), up_e.float(), logit.float(), action, return_.float(), None, lse, entropy, "none")
    assert got.dtype == torch.bfloat16
    nan = torch.isnan(want)
    assert nan[6].all() and nan.sum() == n, nan.sum()
    # no float32 gradient here is below 2^-126, where AVX512_BF16 flushes to zero
    assert (want[(want != 0) & ~nan].abs() > 2**-126).all()
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan], want[~nan].bfloat16()), (got.float() - want.bfloat16().float())[~nan].abs().max()


def _nan_with_payload(bits, dtype=torch.float32):
    int_type = torch.int32 if dtype == torch.float32 else torch.int64
    return torch.tensor([bits], dtype=torch.int64).to(int_type).view(dtype)[0]


@pytest.mark.parametrize("n", [8, 18, 40, 1000])
def test_bfloat16_gradient_of_a_nan_with_any_payload_is_nan(n):
    """A NaN upstream gradient (float32, so with any payload) or a NaN log-sum-
    exp makes its row's bfloat16 gradient NaN: the AVX2 rounding skips the
    test for NaN, which is right only for NaNs whose low 16 bits are zero
    (rounding a NaN with all ones there would carry into its sign and give
    -0). Tiles (N = 8, 18), the per-row loop with a ragged end (40) and
    without (1000)."""
    rows = 20
    g = torch.Generator().manual_seed(n)
    logit = torch.randn(rows, n, generator=g).bfloat16().requires_grad_()
    action = torch.randint(0, n, (rows,), generator=g)
    log_prob, entropy = pgext.log_prob_entropy(logit, action)
    up_p, up_e = torch.randn(rows, generator=g), torch.randn(rows, generator=g)
    up_p[3] = _nan_with_payload(0x7FFFFFFF)
    up_e[4] = _nan_with_payload(-1)  # 0xFFFFFFFF
    up_p[5] = _nan_with_payload(0x7F808000)
    torch.autograd.backward([log_prob, entropy], [up_p, up_e])
    nan_rows = torch.tensor([3, 4, 5])
    assert torch.isnan(logit.grad[nan_rows]).all(), logit.grad[nan_rows]
    others = torch.ones(rows, dtype=torch.bool)
    others[nan_rows] = False
    assert torch.isfinite(logit.grad[others]).all()

    fwd, bwd = torch.ops.pgext.pg_error_forward.default, torch.ops.pgext.pg_error_backward.default
    ret = torch.randn(rows, generator=g)
    _, _, lse, ent = fwd(logit.detach(), action, ret, None, "none")
    lse = lse.clone()
    lse[7] = _nan_with_payload(0x7FFFFFFFFFFFFFFF, torch.float64)
    grad = bwd(torch.ones(rows), torch.ones(rows), logit.detach(), action, ret, None, lse, ent, "none")
    assert torch.isnan(grad[7]).all(), grad[7]
    assert torch.isfinite(grad[8:]).all()


@pytest.mark.parametrize("n", [18, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_huge_coefficients_keep_masked_gradients_exactly_zero(dtype, n):
    """Backward factors the gradient as p * (k - cE * t) only while that
    stays finite at t = -88; a row with entropy coefficient 1e37 takes
    p * k - cE * (p * t) instead, so its masked logits still get exactly 0
    (the factored form would give 0 * inf = NaN) and the rest match float64.
    N = 18 is a bfloat16 tile (AVX2), where the whole tile takes the
    unfactored form."""
    rows = 3
    g = torch.Generator().manual_seed(7)
    logit = torch.randn(rows, n, generator=g).to(dtype)
    logit[:, ::5] = -math.inf
    action = torch.tensor([1, 2, 3])
    return_ = torch.randn(rows, generator=g).to(dtype)
    fwd, bwd = torch.ops.pgext.pg_error_forward.default, torch.ops.pgext.pg_error_backward.default
    _, _, lse, entropy = fwd(logit.float(), action, return_.float(), None, "none")
    up_p = torch.tensor([1.0, 1e37, 1.0]).to(dtype)
    up_e = torch.tensor([1e37, 1.0, 0.5]).to(dtype)
    got = bwd(up_p, up_e, logit, action, return_, None, lse, entropy, "none").double()
    want = bwd(up_p.double(), up_e.double(), logit.double(), action, return_.double(), None,
               lse.double(), entropy.double(), "none")
    masked = torch.isinf(logit)
    assert (got[masked] == 0).all(), got[masked]
    assert torch.isfinite(got).all(), got
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    scale = want.abs().amax(dim=1, keepdim=True)
    assert ((got - want).abs() <= tol * scale).all(), ((got - want).abs() / scale).max()


def test_float32_exp_over_its_whole_range():
    """Probabilities from 1 down to below float's smallest normal: the
    gradient keeps float32 accuracy where the probability is a normal float,
    and is exactly 0 for masked logits and where it underflows."""
    n = 20000
    logit = torch.cat([torch.linspace(-87.0, 0.0, n - 4), torch.tensor([-88.0, -100.0, -1e30, -math.inf])])
    logit = logit[torch.randperm(n, generator=torch.Generator().manual_seed(0))].reshape(1, n)
    action, return_ = torch.tensor([int(logit.argmax())]), torch.ones(1)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        x = logit.to(dtype).clone().requires_grad_(True)
        pgext.pg_error((x, action, return_.to(dtype))).policy_loss.backward()
        grads[dtype] = x.grad[0].double()
    g32, g64 = grads[torch.float32], grads[torch.float64]
    normal = (g64.abs() > 2**-126) & (torch.arange(n) != action)
    assert normal.sum() > n * 0.9
    # t = x - lse is rounded to float32 first: at |t| = 87 that alone is
    # 3.8e-6 relative; a broken exp is off by far more
    rel = ((g32 - g64).abs() / g64.abs())[normal]
    assert rel.max() < 1e-5, rel.max()
    assert torch.isfinite(g32).all()
    assert (g32[logit[0] <= -100.0] == 0).all()


@pytest.mark.parametrize(
    "rows, n, dtype",
    [(64, 70001, torch.float32), (130, 70001, torch.bfloat16), (30, 70001, torch.float64)],
    ids=["float32", "bfloat16", "float64"],
)
def test_streamed_gradient(rows, n, dtype):
    """Gradients of 16 MiB and more: non-temporal stores, rows not aligned to
    a cache line (N is odd), several blocks per row."""
    inp = make_inputs((rows,), n, dtype, seed=11, mask=0.1, weight=True)
    assert rows * n * inp.logit.element_size() >= 16 << 20
    check_against_reference(inp, "mean", wrt=("logit",))


HUGE = sys.platform.startswith("linux")


@pytest.mark.skipif(not HUGE, reason="transparent huge pages are a Linux feature")
def test_large_gradient_is_on_2mib_pages_and_behaves_like_any_tensor():
    inp = make_inputs((64,), 20000, torch.float32, seed=5)
    logit = inp.logit.clone().requires_grad_(True)
    out = pgext.pg_error((logit, inp.action, inp.return_))
    (out.policy_loss - 0.01 * out.entropy_loss).backward()
    grad = logit.grad
    assert grad.data_ptr() % (2 << 20) == 0, hex(grad.data_ptr())
    expected = grad.clone()
    # an ordinary, resizable CPU tensor
    grad.mul_(2).div_(2)  # exact in binary floating point
    assert torch.equal(grad, expected)
    grad.resize_(2 * grad.numel())
    assert grad.untyped_storage().nbytes() >= 2 * expected.numel() * 4
    del out, grad
    logit.grad = None


def _grad_of(inp):
    logit = inp.logit.clone().requires_grad_(True)
    out = pgext.pg_error((logit, inp.action, inp.return_))
    (out.policy_loss - 0.01 * out.entropy_loss).backward()
    return logit.grad


@pytest.mark.skipif(not HUGE, reason="transparent huge pages are a Linux feature")
@pytest.mark.skipif(os.environ.get("PGEXT_GRAD_CACHE") == "0", reason="gradient cache turned off")
def test_freed_gradient_block_is_reused_and_fully_rewritten():
    first = make_inputs((64,), 20000, torch.float32, seed=7)
    second = make_inputs((64,), 20000, torch.float32, seed=8, mask=0.5)
    g1 = _grad_of(first)
    ptr = g1.data_ptr()
    held = _grad_of(second)  # g1 still alive: a block in use is never handed out
    assert held.data_ptr() != ptr
    del g1
    g2 = _grad_of(second)  # the freed block comes back, with every entry rewritten
    assert g2.data_ptr() == ptr
    assert torch.equal(g2, held)
    # a request of another size releases the block (malloc may well hand the
    # same address out again) and still gets a whole, correct gradient
    del g2
    check_against_reference(make_inputs((64,), 30000, torch.float32, seed=9), "mean", wrt=("logit",))
    check_against_reference(second, "mean", wrt=("logit",))


@pytest.mark.skipif(not HUGE, reason="transparent huge pages are a Linux feature")
def test_huge_pages_and_cache_can_be_turned_off_and_change_no_value(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import pgext\n"
        "g = torch.Generator().manual_seed(0)\n"
        "logit = torch.randn(64, 20000, generator=g).requires_grad_(True)\n"
        "action = torch.randint(0, 20000, (64,), generator=g)\n"
        "ret = torch.randn(64, generator=g)\n"
        "out = pgext.pg_error((logit, action, ret))\n"
        "(out.policy_loss - 0.01 * out.entropy_loss).backward()\n"
        "print(logit.grad.data_ptr() % (2 << 20) == 0)\n"
        "torch.save(logit.grad, sys.argv[1])\n"
    )
    grads = {}
    for value in ("1", "0"):
        env = dict(os.environ, PGEXT_HUGE_PAGES=value, PGEXT_GRAD_CACHE=value)
        path = tmp_path / f"grad{value}.pt"
        res = subprocess.run(
            [sys.executable, str(script), str(path)], env=env, capture_output=True, text=True, timeout=300
        )
        assert res.returncode == 0, res.stderr
        grads[value] = (res.stdout.split()[-1], torch.load(path))
    assert grads["1"][0] == "True"
    assert torch.equal(grads["1"][1], grads["0"][1])


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_kernels_are_built_with_openmp():
    """at::parallel_for parallelizes with `#pragma omp parallel` in ATen's
    headers: without -fopenmp every kernel silently runs on one thread."""
    assert "GOMP_parallel" in undefined_symbols(kernel_library())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_one_openmp_runtime_in_the_process(tmp_path):
    """pgext's kernels share torch's libgomp (and so torch.set_num_threads)."""
    script = tmp_path / "child.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import pgext\n"
        "x = torch.randn(4096, 1000)\n"
        "pgext.pg_error((x, torch.zeros(4096, dtype=torch.long), torch.ones(4096)))\n"
        "libs = {line.split()[-1] for line in open('/proc/self/maps') if 'libgomp' in line}\n"
        "print(len(libs), sorted(libs))\n"
    )
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == "1", res.stdout
