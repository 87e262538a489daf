"""pgext's CUDA kernels, executed on the CPU.

csrc/core/cuda/*.cu are compiled by the host compiler against tests/cuda_host
(CUDA's execution model on the host: every GPU thread a fiber, real barrier
and shuffle semantics, deadlocks reported) and registered as the CPU kernels
of the ops ``torch.ops.pgext_cuda_host.*``, which have pgext's kernel op
schemas and run pgext's CUDA backend code (pg_cuda.cu) unchanged. Every test
compares them with pgext's CPU ops through the ops' outputs, cast to float64:
every dtype, both sides of each launch-configuration boundary, misaligned
rows, masks, NaN at every position, an empty batch and the device-side
assert. A pseudo-random schedule (deterministic per seed) must give the same
bits as running the threads in order, and a copy of the batch reduction
without its tree barrier must be caught. No GPU or CUDA toolkit is needed.
"""
import math
import platform
import shutil
import textwrap

import pytest
import torch

import pgext  # noqa: F401  (torch.ops.pgext)
from conftest import FLOAT_DTYPES, ROOT, acc_dtype, dtype_id, make_inputs
from cuda_host import build as cuda_host_build

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler"),
    pytest.mark.skipif(platform.system() != "Linux", reason="the fiber scheduler is written for Linux"),
]

SEEDS = (1, 2, 3)
# Relative tolerance per compared dtype (the less precise of the two
# outputs): the GPU and CPU kernels sum in different orders, and outputs in a
# half dtype may round to neighbouring values.
RTOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# The CUDA kernels' launch configuration (csrc/core/cuda): short rows up to
# kShortRow, blocks of 256 threads for short rows and backward, 8 packs per
# thread for long rows.
SHORT_ROW = 1024
PACKS_PER_THREAD = 8


@pytest.fixture(scope="session")
def emulated():
    """torch.ops.pgext_cuda_host, built once (incrementally in build/cuda_host)."""
    lib = cuda_host_build.build(ROOT / "build" / "cuda_host")
    yield torch.ops.pgext_cuda_host
    del lib


@pytest.fixture(autouse=True)
def threads_in_order(request):
    """Every test starts (and leaves) with the in-order schedule."""
    if "emulated" not in request.fixturenames:
        yield
        return
    ops = request.getfixturevalue("emulated")
    ops.set_schedule(0)
    yield
    ops.set_schedule(0)


def vec(dtype):
    """Elements per 16-byte pack."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def row_sizes(dtype):
    """Row lengths on both sides of every boundary of the kernels' launch
    configuration: the short-row group of 4/8/16/32 lanes, short vs long rows,
    the long-row forward block of 128/256/512/1024 threads and the backward's
    split of a row over 1/2/3 blocks."""
    v = vec(dtype)
    short = [1, 3, 8 * v, 8 * v + 1, 16 * v, 16 * v + 1, 32 * v, 32 * v + 1, SHORT_ROW]
    per_block = PACKS_PER_THREAD * v
    long = [SHORT_ROW + 1, 128 * per_block + 1, 256 * per_block, 256 * per_block + 1, 512 * per_block + 1]
    return short + long


def rows_for(n):
    # short rows: several blocks with a partial last one; long rows: a block each
    return 70 if n <= SHORT_ROW else 3


def laid_out(logit, layout):
    """logit's values in a layout the kernels must handle, padding poisoned with NaN."""
    rows, n = logit.shape
    v = vec(logit.dtype)
    if layout == "contiguous":
        return logit.contiguous()
    if layout == "misaligned start":  # aligned row stride, rows start one element past a boundary
        stride, offset = (n + v - 1) // v * v + v, 1
    elif layout == "misaligned stride":  # every row aligned differently
        stride, offset = n + 1, 0
    else:
        raise AssertionError(layout)
    buf = torch.full((rows, stride), math.nan, dtype=logit.dtype)
    view = buf[:, offset:offset + n]
    view.copy_(logit)
    return view


def assert_same(got, want, what, logit_dtype):
    """got == want up to the kernels' rounding (of the outputs' dtypes and of
    the accumulation type of logit_dtype), compared in float64; NaN and
    infinities must sit at the same places."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert got.device.type == "cpu"
    rtol = max(RTOL[got.dtype], RTOL[want.dtype], RTOL[acc_dtype(logit_dtype)])
    g, w = got.double(), want.double()
    assert torch.equal(g.isnan(), w.isnan()), f"{what}: NaN at different places"
    finite = w.isfinite()
    assert torch.equal(g[~finite & ~w.isnan()], w[~finite & ~w.isnan()]), f"{what}: infinities differ"
    scale = 1.0 + (w[finite].abs().max().item() if finite.any() else 0.0)
    torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_all_same(got, want, what, logit_dtype):
    for i, (g, w) in enumerate(zip(got, want)):
        assert_same(g, w, f"{what}[{i}]", logit_dtype)


def upstream(reduction, rows, dtype, seed=7):
    g = torch.Generator().manual_seed(seed)
    shape = (rows,) if reduction == "none" else ()
    ups = [torch.randn(shape, generator=g, dtype=torch.float64) * 2 for _ in range(2)]
    if reduction == "none":
        ups[1][::3] = 0  # rows without an entropy gradient: the policy-only form
    return [u.to(dtype) for u in ups]


def run_ops(ops, inp, reduction, temperature=1.0):
    """Forward and backward through `ops` (torch.ops.pgext or the emulated
    CUDA ops), with the CPU forward's saved statistics, so that each kernel
    is compared on its own."""
    logit, action, ret, weight = inp
    fwd = ops.pg_error_forward(logit, action, ret, weight, reduction, temperature)
    saved = torch.ops.pgext.pg_error_forward(logit, action, ret, weight, reduction, temperature)
    gp, ge = upstream(reduction, action.numel(), fwd[0].dtype)
    if reduction == "none":
        gp, ge = gp.view(action.shape), ge.view(action.shape)
    grad = ops.pg_error_backward(gp, ge, logit, action, ret, weight, saved[2], saved[3], reduction, temperature)
    return (*fwd, grad)


def compare_forward_backward(emulated, inp, what, temperature=1.0):
    for reduction in ("none", "mean", "sum"):
        before = emulated.launch_count()
        got = run_ops(emulated, inp, reduction, temperature)
        # the emulated kernels ran (not pgext's CPU kernels by mistake)
        assert emulated.launch_count() > before or inp.logit.shape[0] == 0
        want = run_ops(torch.ops.pgext, inp, reduction, temperature)
        assert_all_same(got, want, f"{what}, {reduction}", inp.logit.dtype)


def inputs(rows, n, dtype, seed, layout="contiguous", weight=True, mask=True, **kwargs):
    inp = make_inputs((rows,), n, dtype, seed=seed, mask=mask and n > 1, weight=weight, scale=3.0, **kwargs)
    return inp._replace(logit=laid_out(inp.logit, layout))


# ------------------------------------------------------------------------ the kernels against the CPU ops
@pytest.mark.parametrize("layout", ["contiguous", "misaligned start", "misaligned stride"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_forward_and_backward_match_the_cpu(emulated, dtype, layout):
    """Every row length around a launch-configuration boundary, 30% of the
    logits -inf, with and without weights, float64 or the logits' dtype for
    return_, int64 or int32 actions, 'none', 'mean' and 'sum'."""
    for i, n in enumerate(row_sizes(dtype)):
        inp = inputs(rows_for(n), n, dtype, seed=n, layout=layout, weight=i % 2 == 0,
                     return_dtype=torch.float64 if i % 3 == 1 else dtype,
                     action_dtype=torch.int32 if i % 4 == 3 else torch.int64)
        compare_forward_backward(emulated, inp, f"N={n}")


@pytest.mark.parametrize("n", [37, SHORT_ROW + 77], ids=["short", "long"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_nan_at_every_position(emulated, dtype, n):
    """Row i has a NaN at position i (the head, the packs and the tail of a
    misaligned row, every thread's share): its outputs are NaN, the other
    rows' are not."""
    rows = n
    inp = inputs(rows, n, dtype, seed=3, layout="misaligned start", mask=0.1)
    logit = inp.logit.clone()
    logit[torch.arange(rows), torch.arange(rows)] = math.nan
    logit = laid_out(logit, "misaligned start")
    inp = inp._replace(logit=logit)
    got = run_ops(emulated, inp, "none")
    assert got[2].isnan().all() and got[4].isnan().all()
    assert_all_same(got, run_ops(torch.ops.pgext, inp, "none"), "NaN rows", dtype)


@pytest.mark.parametrize("n", [5, 40, 3000], ids=lambda n: f"N={n}")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_masks(emulated, dtype, n):
    """Logits masked with -inf and with finfo.min (several in a row, under a
    large maximum), a row whose only finite logit is the action, and a row
    with every logit -inf (no distribution: NaN)."""
    rows = 8
    inp = inputs(rows, n, dtype, seed=11, mask=0.6)
    logit = inp.logit.clone()
    logit[1] = -math.inf
    logit[1, inp.action[1]] = 2.0
    logit[2] = -math.inf
    logit[3, 0] = 50.0
    for finfo_min in (False, True):
        masked = logit.masked_fill(logit == -math.inf, torch.finfo(dtype).min) if finfo_min else logit
        case = inp._replace(logit=masked)
        compare_forward_backward(emulated, case, f"finfo.min mask={finfo_min}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_row_stats_and_grad_from_stats(emulated, dtype):
    """A shard of classes [start, start + n) of wider rows (a view: misaligned
    when start is), actions inside and outside the shard."""
    for n, start in ((30, 0), (30, 17), (2500, 3), (2500, 2500)):
        total = 2 * n + 21
        full = inputs(40 if n <= SHORT_ROW else 4, total, dtype, seed=n + start)
        shard = full.logit[:, start:start + n]
        got = emulated.pg_row_stats(shard, full.action, start)
        want = torch.ops.pgext.pg_row_stats(shard, full.action, start)
        assert_all_same(got, want, f"row stats N={n} start={start}", dtype)
        saved = torch.ops.pgext.pg_error_forward(full.logit, full.action, full.return_, full.weight, "none")
        for reduction in ("none", "mean"):
            gp, ge = upstream(reduction, full.action.numel(), saved[0].dtype)
            args = (gp, ge, shard, full.action, full.return_, full.weight, saved[2], saved[3], reduction, start)
            assert_same(emulated.pg_grad_from_stats(*args), torch.ops.pgext.pg_grad_from_stats(*args),
                        f"grad from stats N={n} start={start} {reduction}", dtype)


@pytest.mark.parametrize("part_dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_merge_row_stats(emulated, part_dtype):
    """pg_merge_row_stats_ on the emulated GPU updates the running statistics
    as the CPU op does: class slices of rows with masked slices, NaN and
    +inf, more rows than one block (the grid-stride loop), merged in turn."""
    rows, n, width = 700, 40, 9
    inp = inputs(rows, n, torch.float64, seed=13, mask=0.4)
    logit = inp.logit.clone()
    logit[1, :width] = -math.inf
    logit[2, 5] = math.nan
    logit[3, 30] = math.inf
    logit[4] = -math.inf
    states = []
    for ops in (emulated, torch.ops.pgext):
        running = [torch.full((rows,), -math.inf, dtype=torch.float64)] + \
            [torch.zeros(rows, dtype=torch.float64) for _ in range(3)]
        for c0 in range(0, n, width):
            part = torch.ops.pgext.pg_row_stats(logit[:, c0:c0 + width].contiguous(), inp.action, c0)
            ops.pg_merge_row_stats_(*running, *(p.to(part_dtype) for p in part))
        states.append(running)
    assert_all_same(states[0], states[1], "merged row stats", torch.float64)
    assert states[1][0][2].isnan() and states[1][0][4] == -math.inf


@pytest.mark.parametrize("temperature", [0.3, 2.5])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_temperature(emulated, dtype, temperature):
    """The temperature at every launch path (short rows of a few lanes and of
    a warp, the longest short row, long rows and a backward split over
    blocks), misaligned, masked: the CPU kernels' values (which test_temperature.py
    checks against float64), with and without a temperature apart (so it is
    applied, not ignored), and row stats / grad from stats of a shard."""
    v = vec(dtype)
    sizes = [3, 8 * v + 1, SHORT_ROW, SHORT_ROW + 1, 256 * PACKS_PER_THREAD * v + 1]
    for i, n in enumerate(sizes):
        inp = inputs(rows_for(n), n, dtype, seed=n, layout="misaligned start" if i % 2 else "contiguous",
                     weight=i % 2 == 0)
        compare_forward_backward(emulated, inp, f"T={temperature} N={n}", temperature)
        scaled = run_ops(emulated, inp, "none", temperature)
        plain = run_ops(emulated, inp, "none")
        assert not torch.allclose(scaled[3].double(), plain[3].double()), "the temperature changed no entropy"
        start = n // 3
        shard = inp.logit[:, start:]
        got = emulated.pg_row_stats(shard, inp.action, start, temperature)
        assert_all_same(got, torch.ops.pgext.pg_row_stats(shard, inp.action, start, temperature),
                        f"row stats T={temperature} N={n}", dtype)
        saved = torch.ops.pgext.pg_error_forward(*inp, "none", temperature)
        gp, ge = upstream("none", inp.action.numel(), saved[0].dtype)
        args = (gp, ge, shard, inp.action, inp.return_, inp.weight, saved[2], saved[3], "none", start, temperature)
        assert_same(emulated.pg_grad_from_stats(*args), torch.ops.pgext.pg_grad_from_stats(*args),
                    f"grad from stats T={temperature} N={n}", dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_one_return_for_every_row(emulated, dtype):
    """A 0-d return_ (log_prob_entropy's -1) is read in place for every row,
    short rows and long: the emulated CUDA kernels give the CPU kernels'
    values, and those are the bits of the return expanded to one per row."""
    for n in (5, SHORT_ROW + 77):
        inp = inputs(rows_for(n), n, dtype, seed=n, weight=n > SHORT_ROW)
        shared = inp._replace(return_=torch.tensor(-1.5, dtype=inp.return_.dtype))
        expanded = inp._replace(return_=torch.full_like(inp.return_, -1.5))
        compare_forward_backward(emulated, shared, f"0-d return N={n}")
        for reduction in ("none", "mean"):
            for got, want in zip(run_ops(torch.ops.pgext, shared, reduction),
                                 run_ops(torch.ops.pgext, expanded, reduction)):
                torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_empty_batch(emulated, dtype):
    """'mean' of nothing is NaN, 'sum' 0 (the reduction kernel with no rows)."""
    for n in (5, 2000):
        inp = inputs(0, n, dtype, seed=0)
        compare_forward_backward(emulated, inp, f"empty batch N={n}")
        got = emulated.pg_error_forward(*inp, "mean")
        assert got[0].isnan() and got[1].isnan()
        assert_all_same(emulated.pg_row_stats(inp.logit, inp.action, 0),
                        torch.ops.pgext.pg_row_stats(inp.logit, inp.action, 0), "row stats", dtype)


@pytest.mark.parametrize("n", [18, 3000], ids=["short", "long"])
def test_out_of_range_action_is_a_device_side_assert(emulated, n):
    """Forward and backward trip the kernels' device-side assert, which the
    launch check turns into the RuntimeError users of the GPU build see."""
    inp = inputs(5, n, torch.float32, seed=1)
    saved = torch.ops.pgext.pg_error_forward(*inp, "none")
    for bad in (n, -1, 2**40):
        action = inp.action.clone()
        action[3] = bad
        with pytest.raises(RuntimeError, match="device-side assert triggered(.|\n)*action out of range"):
            emulated.pg_error_forward(inp.logit, action, inp.return_, inp.weight, "mean")
        g = torch.ones(5)
        with pytest.raises(RuntimeError, match="device-side assert triggered(.|\n)*action out of range"):
            emulated.pg_error_backward(g, g, inp.logit, action, inp.return_, inp.weight, saved[2], saved[3], "none")
    # the error is not sticky: the next launch runs
    compare_forward_backward(emulated, inp, "after an assert")


@pytest.mark.parametrize("n", [18, 3000], ids=["short", "long"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_weight_zero_samples_may_carry_any_action(emulated, dtype, n):
    """Padding: samples of weight 0 with actions outside the row (-100, n,
    2**40) trip no assert, read nothing and get exactly zero gradient, as on
    the CPU."""
    inp = inputs(6, n, dtype, seed=2)
    weight = inp.weight.clone()
    action = inp.action.clone()
    weight[1] = weight[4] = 0
    action[1], action[4] = -100, n
    case = inp._replace(action=action, weight=weight)
    compare_forward_backward(emulated, case, "weight-0 padding")
    grad = run_ops(emulated, case, "none")[4]
    assert torch.all(grad[1] == 0) and torch.all(grad[4] == 0)


# ------------------------------------------------------------------------ schedules
def every_output(ops, inp, start):
    out = []
    for reduction in ("none", "mean", "sum"):
        out += run_ops(ops, inp, reduction)
    out += ops.pg_row_stats(inp.logit[:, start:], inp.action, start)
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_random_schedules_give_the_same_bits(emulated, dtype, seed):
    """Threads run in a pseudo-random order between synchronization points,
    held back at random: results are bitwise those of the in-order schedule
    (no race, no missing barrier), for short, long and split rows."""
    for n in (50, 300, 2 * SHORT_ROW + 1, 256 * PACKS_PER_THREAD * vec(dtype) + 1):
        inp = inputs(9 if n > SHORT_ROW else 45, n, dtype, seed=n, layout="misaligned start")
        emulated.set_schedule(0)
        in_order = every_output(emulated, inp, 2)
        emulated.set_schedule(seed)
        shuffled = every_output(emulated, inp, 2)
        for i, (a, b) in enumerate(zip(in_order, shuffled)):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), (n, i)


def test_random_schedule_is_reproducible(emulated):
    """The same seed gives the same schedule: a race (below) reads the same
    values each time, which differ from the in-order results."""
    results = []
    for seed in (5, 5, 0):
        emulated.set_schedule(seed)
        results.append(emulated.neighbours(1000, False))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def reduction_errors(emulated, missing_barrier):
    """Whether the batch reduction (or its broken copy) misses the float64
    sum, in order and under each random schedule."""
    g = torch.Generator().manual_seed(0)
    policy = torch.randn(3001, generator=g, dtype=torch.float64)
    entropy = torch.rand(3001, generator=g, dtype=torch.float64)
    wrong = []
    for seed in (0, *SEEDS):
        emulated.set_schedule(seed)
        for reduction, want_p, want_e in (("sum", policy.sum(), entropy.sum()),
                                          ("mean", policy.mean(), entropy.mean())):
            p, e = emulated.reduce_losses(policy, entropy, reduction, torch.float64, missing_barrier)
            ok = math.isclose(p.item(), want_p.item(), rel_tol=1e-12, abs_tol=1e-12) and \
                math.isclose(e.item(), want_e.item(), rel_tol=1e-12)
            wrong.append(not ok)
    return wrong


def test_a_missing_barrier_in_the_reduction_is_caught(emulated):
    """The batch reduction matches the float64 sum under every schedule; a
    copy of it without the barrier between the levels of its tree (built only
    here) fails under every one of them."""
    assert reduction_errors(emulated, missing_barrier=False) == [False] * 8
    assert reduction_errors(emulated, missing_barrier=True) == [True] * 8


# ------------------------------------------------------------------------ the emulation itself
def test_launch_rewrite():
    """Launches become host launches whatever their layout (comments, lines,
    template arguments), line numbers are kept, and a launch the rewrite does
    not understand fails the build."""
    source = textwrap.dedent("""\
        void f() {
          int a = 1;  // a comment; with <<< in it
          k<float, 2>
              <<<grid(n), 256, 0,
                 stream>>>(a, g(b, c));
          h<<<1, 32>>>();
          int z = 2;
        }
        """)
    out = cuda_host_build.rewrite_launches(source, "test.cu").splitlines()
    assert len(out) == source.count("\n")
    assert out[2].strip() == "::cuda_host::launch(::cuda_host::config(grid(n), 256, 0, stream), k<float, 2>, a, g(b, c))"
    assert out[4].strip() == ";"
    assert out[5].strip() == "::cuda_host::launch(::cuda_host::config(1, 32), h);"
    assert out[6].strip() == "int z = 2;"
    with pytest.raises(ValueError, match="not rewritten"):
        cuda_host_build.rewrite_launches("int x = y >>> 2;", "test.cu")
    with pytest.raises(ValueError, match="without"):
        cuda_host_build.rewrite_launches("k<<<1, 2>(x);", "test.cu")


def expected_warp_ops(block, width):
    """CUDA's documented results of warp_ops_kernel (tests/cuda_host/harness_ops.cu)."""
    rows = []
    for t in range(block):
        lane, base = t % 32, t - t % 32
        value = lambda src: (base + src) * 1000 + 7  # noqa: E731
        seg = lane - lane % width
        up = lane - 3 if lane - seg >= 3 else lane
        down = lane + 5 if lane - seg + 5 < width else lane
        xor = lane ^ 5 if (lane ^ 5) < seg + width else lane
        ballot = sum(1 << i for i in range(32) if i % 3 == 0)
        half = lane ^ 1 if lane < 16 else lane ^ 2
        count = sum(1 for i in range(block) if i % 5 == 0)
        warp = range(base, base + 32)
        vote = all(i < 40 for i in warp) * 2 + any(i == 33 for i in warp)
        rows.append([value(seg + (lane * 7 + 3) % 32 % width), value(up), value(down), value(xor), ballot,
                     value(half), 2 * value(lane ^ 1) + 1, count, vote])
    return torch.tensor(rows)


@pytest.mark.parametrize("width", [32, 16, 8, 4, 1])
def test_shuffle_and_vote_semantics(emulated, width):
    for seed in (0, 1):
        emulated.set_schedule(seed)
        assert torch.equal(emulated.warp_ops(64, width), expected_warp_ops(64, width))


@pytest.mark.parametrize("kernel, message", [
    ("divergent_shuffle", r"deadlock(.|\n)*lanes 0-15 wait in __shfl_xor_sync(.|\n)*16-31 \(exited\)"),
    ("divergent_barrier", r"deadlock(.|\n)*32 of 64 threads wait at __syncthreads"),
    ("mismatched_shuffle", r"__shfl_down_sync while lanes 0 wait in __shfl_xor_sync"),
    ("invalid_config", r"invalid configuration argument"),
])
def test_broken_kernels_are_reported_not_hung(emulated, kernel, message):
    with pytest.raises(RuntimeError, match=message):
        emulated.launch_broken(kernel)


def test_a_race_on_shared_memory_is_caught_by_random_schedules(emulated):
    """Thread t reads what thread t - 1 wrote before a barrier. Without the
    barrier, running the threads in order hides the race; every random
    schedule exposes it: the early reads find the garbage that fills shared
    memory at the start of each block, not the previous launch's values."""
    want = torch.tensor([0] + list(range(255))) + 1000
    for seed in (0, *SEEDS):
        emulated.set_schedule(seed)
        assert torch.equal(emulated.neighbours(1000, True), want)
        racy = emulated.neighbours(1000, False)
        assert torch.equal(racy, want) == (seed == 0), seed
        assert ((racy == want) | (racy == -1)).all()


def test_dynamic_shared_memory(emulated):
    out = emulated.dynamic_shared(96)
    assert torch.equal(out[:96], torch.arange(95, -1, -1) + 100)
    assert out[96].item() == sum(range(100, 196))
