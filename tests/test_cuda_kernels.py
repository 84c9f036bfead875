"""CUDA-specific checks: PTX/spills for every specialisation, workspace chunking, split reductions,
determinism, layout twins, cached device constants. Correctness of every algorithm over the grid is tests/test_ops.py.
Runs on a GPU, or in Numba's CUDA simulator (tests/conftest.py) with small shapes."""
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from cnnfast.kernels.contract import ConvGeometry, pad_indices
from cnnfast.kernels.cuda import depthwise, depthwise_filter, direct, gemm, im2col, layout
from cnnfast.kernels.cuda.compile import kernel_key

import cnnfast
from cnnfast import api, compare, grad, reference

pytestmark = pytest.mark.cuda
cuda = pytest.importorskip("numba.cuda")
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
# about 1-2 thousand threads per launch in the simulator; realistic sizes on a GPU
N, C, K, HW = (2, 4, 6, 7) if SIM else (8, 64, 64, 28)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((N, C, HW, HW)).astype(np.float32)
    w = rng.standard_normal((K, C, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((N, K, HW, HW)).astype(np.float32)
    return x, w, dy


def _no_gpu_compiler(done):
    """A skip reason when a subprocess failed only because the NVVM/NVRTC wheels are missing (numba-cuda 0.30 looks
    NVRTC up first, for the supported architectures: then the error names libnvrtc only)."""
    if done.returncode != 0 and any(s in done.stderr for s in ("NVVM", "libnvvm", "NVRTC", "libnvrtc")) \
            and not done.stdout:
        return f"CUDA NVVM/NVRTC wheels missing (pip install -e '.[cuda-toolchain]'): {done.stderr[-300:]}"
    return None


def _python_without_simulator(args, **env):
    """Run python args with the simulator off (compile_ptx needs the NVVM wheels, not a GPU)."""
    return subprocess.run([sys.executable, *args], env=dict(os.environ, NUMBA_ENABLE_CUDASIM="0", **env),
                          capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def ptx_rows(ptx_table):
    """ptx.py's table for every specialisation (compiled in the background: tests/conftest.py)."""
    done = ptx_table
    reason = _no_gpu_compiler(done)
    if reason:
        pytest.skip(reason)
    assert done.stdout, done.stderr[-2000:]
    return json.loads(done.stdout)


def _kernel_name(specialisation):
    """'direct_forward' of 'direct_forward/64x128[float32,array]'."""
    return specialisation.split("[")[0].split("/")[0]


def test_every_specialisation_compiles_to_ptx_9_for_sm90_without_spills(ptx_rows):
    rows = ptx_rows
    names = {_kernel_name(r["name"]) for r in rows}
    assert {"direct_forward", "direct_backward_data", "direct_backward_filter", "im2col", "col2im",
            "depthwise_plane", "depthwise_backward_filter", "depthwise_forward", "pad", "fold_pad",
            "bias_grad"} <= names
    assert {r["typing"] for r in rows} == {"array", "pointer"}
    print("\n".join(f"{r['name']:55s} regs {r.get('registers')} spills {r.get('spill_stores')}" for r in rows))
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad
    assert all(r["ptx_version"] == "9.0" and r["target"] == "sm_90" and r["spill_stores"] == 0 for r in rows)
    assert all(r["calls"] == 0 for r in rows)  # NVVM inlined every helper (compile.helper: forceinline)


def test_the_ptx_tool_without_the_toolchain_says_what_to_install(monkeypatch, capsys):
    """No NVVM/NVRTC (the cuda-toolchain extra not installed, no CUDA toolkit): one message and exit 2, not one error
    per kernel from every compiling process."""
    from cnnfast.kernels.cuda import compile as kernel_compile
    from cnnfast.kernels.cuda import ptx

    def no_nvrtc(*args, **kwargs):
        raise OSError("libnvrtc.so.13: cannot open shared object file: No such file or directory")
    monkeypatch.setattr(kernel_compile, "compile_ptx", no_nvrtc)
    assert ptx.main(["--warm"]) == 2
    err = capsys.readouterr().err
    assert "libnvrtc.so.13" in err and "pip install -e '.[cuda-toolchain]'" in err


def _group(pgid):
    """The live processes (not zombies) of process group pgid, from Linux's /proc."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                state, _, group = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # (ended meanwhile)
        if int(group) == pgid and state != "Z":
            found.append(stat)
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="processes end with their parent on Linux only")
def test_a_killed_test_run_leaves_no_ptx_compilers_behind():
    """The background PTX table (tests/conftest.py) and its compiling processes end with the run that started it,
    even killed by a timeout's SIGKILL; they used to compile on for minutes, on every core."""
    started = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, time\nfrom cnnfast.kernels.cuda import ptx\n"
         "job = ptx.start_background(['--jobs', '2'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
         "print(job.pid, flush=True)\ntime.sleep(600)"],
        env=dict(os.environ, NUMBA_ENABLE_CUDASIM="0"), stdout=subprocess.PIPE, text=True)
    group = int(started.stdout.readline())
    deadline = time.monotonic() + 180
    while 0 < len(_group(group)) < 3 and time.monotonic() < deadline:  # ptx.py, then its two compiling processes
        time.sleep(0.2)
    compiling = len(_group(group))
    started.kill()
    started.wait()
    deadline = time.monotonic() + 30
    while _group(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = len(_group(group))
    if left:
        os.killpg(group, signal.SIGKILL)
    if compiling < 3:
        pytest.skip("ptx.py ended before it started compiling processes (no NVVM/NVRTC wheels?)")
    assert left == 0, f"{left} of ptx.py's {compiling} processes outlived the killed run"


def test_depthwise_3x3_halo_builds_fit_their_blocks_per_sm(ptx_rows):
    """The float32 SPECIALISED straight plane_kernel builds carry launch bounds (BLOCK threads, PLANE_BLOCKS blocks
    per SM; grouped builds GROUPED_BLOCKS), which ptxas meets without spills: 4-row builds at ~130 registers would
    fit 2 blocks per SM, not 3; grouped ones at 134, 1. The other builds carry none."""
    plane = [r for r in ptx_rows if r["name"].startswith("depthwise_plane/")]
    bounded = [r for r in plane if "/1x3x3[float32" in r["name"] and "/walk/" not in r["name"]]
    assert len(bounded) == 2 * 6 and all(r["max_threads"] == depthwise.BLOCK for r in bounded), bounded
    for r in bounded:
        blocks = depthwise.GROUPED_BLOCKS if "/grouped/" in r["name"] else depthwise.PLANE_BLOCKS
        assert r["registers"] * depthwise.BLOCK * blocks <= 65536, r
    assert all(r["max_threads"] is None for r in plane if r not in bounded)


def test_tiled_gemm_tile_constants_give_each_thread_one_staged_row_and_column():
    for tile in gemm.TILES.values():
        assert tile.threads % tile.BM == 0 and tile.threads % tile.BN == 0 and tile.BJ == gemm.BJ
        assert tile.threads <= 1024 and tile.BM % tile.TM == 0 and tile.BN % tile.TN == 0
        assert 2 * tile.BJ * (tile.BM + tile.BN) * 8 <= 48 * 1024  # float64 shared buffers within 48 KiB


def test_tile_choice_takes_the_largest_tile_that_fills_a_wave():
    """choose_tile: a full wave of blocks (or split-K to add them), at least MIN_USE of each tile's outputs used."""
    n = 32  # ResNet-50 at batch 32: (M, NCOL) per group of forward
    assert gemm.choose_tile(64, n * 56 * 56, 1) == "64x128"      # 64 rows: 128x128 would mask half of them
    assert gemm.choose_tile(128, n * 28 * 28, 1) == "128x128"    # 196 blocks
    assert gemm.choose_tile(256, n * 14 * 14, 1) == "64x128"     # 128x128: 98 blocks, under a wave of 132
    assert gemm.choose_tile(512, n * 7 * 7, 1) == "32x64"        # 64x128: 104 blocks
    assert gemm.choose_tile(512, n * 7 * 7, 1, splittable=True) == "128x128"
    assert gemm.choose_tile(6, 10_000_000, 1) == "32x64"         # 6 of 32 rows used: without the thin tile
    assert gemm.choose_tile(6, 10_000_000, 1, thin=True) == gemm.choose_tile(16, 99, 1, thin=True) == "8x64"
    assert gemm.choose_tile(17, 10_000_000, 1, thin=True) == "32x64"
    stem = cnnfast.explain("conv2d_input", (n, 3, 224, 224), (64, 3, 7, 7), (n, 64, 112, 112), stride=2, padding=3,
                           device="cuda")  # M = 3 input channels: 3 of 8 rows used, not 3 of 32
    assert stem.tile == direct.tile_for(stem.spec.geometry, "backward_data") == "8x64"
    assert gemm.choose_tile(128, n * 28 * 28, 1, itemsize=8) == "32x64"  # float64: 8x8 tiles spill
    # DCGAN's transposed 4x4/2 at batch 32 is backward_data in 4 sub-pixel classes of 8192 columns launched
    # together: 64 blocks of 128x128 per class, 256 in the launch (one class alone would be under a wave)
    g = cnnfast.explain("conv_transpose2d", (n, 256, 16, 16), (256, 128, 4, 4), stride=2, padding=1,
                        device="cuda").spec.geometry
    assert direct.tile_for(g, "backward_data") == gemm.choose_tile(128, n * 16 * 16, 4) == "128x128"
    assert gemm.choose_tile(128, n * 16 * 16, 1) == "32x64"
    with pytest.raises(ValueError, match=r"^conv2d: algo 'direct:128x128' has no float64 build on cuda \(a tile of "
                                         r"the other dtype's\); float64's tiles: direct:32x64, "):
        cnnfast.explain("conv2d", (1, 2, 5, 5), (3, 2, 3, 3), device="cuda", dtype="float64", algo="direct:128x128")
    for M, NCOL, groups in ((64, 100_352, 1), (256, 6272, 2), (40, 5000, 3), (1, 1, 1)):
        t = gemm.TILES[gemm.choose_tile(M, NCOL, groups)]
        blocks = -(-M // t.BM) * -(-NCOL // t.BN) * groups
        assert t == gemm.TILES[gemm.SMALL] or (blocks >= gemm.WAVE and M * NCOL >= gemm.MIN_USE * blocks / groups
                                               * t.BM * t.BN)


# each tile on a problem with partial row and column blocks, groups, stride 2 (sub-pixel classes) and a bias
def _three_primitives(xs, ws, kw, dtype, algo, seed=0, **call):
    """forward (with a bias), backward_data and backward_filter of one layer on the device against the reference."""
    rng = np.random.default_rng(seed)
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in (xs, ws, ws[:1]))
    D, nd = cuda.to_device, len(xs) - 2
    y = getattr(cnnfast, f"conv{nd}d")(D(x), D(w), D(b), algo=algo, **kw, **call).copy_to_host()
    compare.assert_close(y, reference.conv(x, w, b, **kw), dtype, f"{algo} forward")
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = getattr(grad, f"conv{nd}d_input")(xs, D(w), D(dy), algo=algo, **kw, **call).copy_to_host()
    compare.assert_close(dx, reference.conv_input(xs, w, dy, **kw), dtype, f"{algo} backward_data")
    dw = getattr(grad, f"conv{nd}d_weight")(D(x), ws, D(dy), algo=algo, **kw, **call).copy_to_host()
    compare.assert_close(dw, reference.conv_weight(x, ws, dy, **kw), dtype, f"{algo} backward_filter")


TILE_PROBLEM = ((2, 6, 12, 11), (10, 3, 3, 3), dict(stride=2, padding=1, groups=2))


@pytest.mark.parametrize("algo, dtype", [(f"{a}:{t}", "float32") for a in ("direct", "im2col")
                                         for t in ("32x64", "64x128", "128x128")]
                         + [("direct:8x64", "float32"), ("direct:32x64", "float64"), ("im2col:32x64", "float64"),
                            ("direct:8x64", "float64")])  # (float64's tiles: gemm.tile_names)
def test_every_tile_matches_reference(algo, dtype):
    xs, ws, kw = TILE_PROBLEM
    assert cnnfast.explain("conv2d", xs, ws, device="cuda", dtype=dtype, algo=algo, **kw).tile == algo.split(":")[1]
    _three_primitives(xs, ws, kw, dtype, algo, seed=3)


# backward_filter problems whose output planes (O = 1, 2, 3, 7) are smaller than a shared-memory step of 8 reduction
# indices j = n*O + o: the sample cursor (direct.sample_step) carries across several samples per step
FEW_OUTPUTS = {1: ((11, 4, 3, 3), (5, 4, 3, 3)), 2: ((10, 6, 1, 2), (4, 6, 1, 1)), 3: ((9, 3, 1, 5), (4, 3, 1, 3)),
               7: ((9, 3, 1, 9), (4, 3, 1, 3))}


@pytest.mark.parametrize("algo, outputs", [("direct:32x64", 1), ("direct:64x128", 3), ("direct:128x128", 7),
                                           ("direct:8x64", 1), ("im2col:32x64", 3), ("im2col:64x128", 2),
                                           ("im2col:128x128", 1)])
def test_backward_filter_cursor_carries_samples_within_a_step(algo, outputs):
    xs, ws = FEW_OUTPUTS[outputs]
    rng = np.random.default_rng(outputs)
    x = rng.standard_normal(xs).astype(np.float32)
    dy = rng.standard_normal((xs[0], ws[0], xs[2] - ws[2] + 1, xs[3] - ws[3] + 1)).astype(np.float32)
    assert dy.shape[2] * dy.shape[3] == outputs
    plan = cnnfast.explain("conv2d_weight", xs, ws, dy.shape, device="cuda", algo=algo)
    assert plan.tile == algo.split(":")[1] and ("pointwise" in plan.kernels[0]) == (ws[2:] == (1, 1))
    dw = grad.conv2d_weight(cuda.to_device(x), ws, cuda.to_device(dy), algo=algo).copy_to_host()
    compare.assert_close(dw, reference.conv_weight(x, ws, dy), "float32", f"{algo} backward_filter, O={outputs}")


@pytest.mark.parametrize("filters, padding, ops, algo, dtype", [
    ((8, 8), (3, 4), "forward", "direct", "float32"), ((5, 13), (2, 6), "forward_wide", "direct", "float32")] + [
    ((5, 13), (2, 6), "forward_wide", f"direct:{tile}", dtype)
    for tile, dtype in (("32x64", "float32"), ("64x128", "float32"), ("128x128", "float32"), ("8x64", "float64"),
                        ("32x64", "float64"))])
def test_direct_forward_masks_up_to_64_taps_and_tests_wider_filters_per_element(filters, padding, ops, algo, dtype,
                                                                              monkeypatch):
    """direct's forward tests a tap against its column's mask of direct.MASK_TAPS = 64 bits (fwd_col_taps: 8x8
    sets the top bit), a wider filter (5x13: 65 taps) the three axes per element (gather), on every tile; both
    read a padded input, so the masks have holes at the borders."""
    launched, launch_tiled = [], direct.launch_tiled
    monkeypatch.setattr(direct, "launch_tiled", lambda o, *a, **kw: launched.append(o) or launch_tiled(o, *a, **kw))
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 2, 9, 12)).astype(dtype)
    w = rng.standard_normal((3, 2, *filters)).astype(dtype)
    b = rng.standard_normal(3).astype(dtype)
    y = cnnfast.conv2d(cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), padding=padding,
                       algo=algo).copy_to_host()
    compare.assert_close(y, reference.conv(x, w, b, padding=padding), dtype, f"{algo} forward {filters}")
    assert launched == [direct.OPS[ops]]


def test_shared_memory_main_loops_stage_operands_without_integer_division(ptx_rows):
    """A 64-bit division is dozens of instructions against 16 FMAs per reduction index: the per-thread row/column
    contexts and the reduction-index tables keep them out of the tiled GEMMs' loops (backward_data's sub-pixel
    classes need no stride test), and backward_filter walks its sample x output reduction index with a cursor
    that carries (6-12 divisions per step before). The depthwise kernels step their halo elements, tap walks and
    reduction elements by carries too."""
    checked = set()
    for name, divisions in ((r["name"], r["loop_divisions"]) for r in ptx_rows):
        if name.startswith(("direct_", "im2col_gemm_", "pointwise_gemm_", "depthwise_plane",
                            "depthwise_backward_filter")):
            assert divisions == 0, (name, divisions)
            checked.add(_kernel_name(name))
    assert {f"{family}_backward_filter" for family in ("direct", "im2col_gemm", "pointwise_gemm")} <= checked


@pytest.mark.parametrize("tile", sorted(gemm.TILES))
@pytest.mark.parametrize("along_j", [False, True])
def test_gemm_staging_places_every_element_once_and_stores_without_bank_conflicts(tile, along_j):
    """Each operand tile of a step (BJ x BM of A, BJ x BN of B) is staged by exactly one thread per element, in
    both staging maps (gemm.staging); a warp's shared-memory stores of one element index hit 32 distinct banks
    (along j thanks to the rows' PAD: 8 threads on 8 indices of one row would otherwise share a bank), and its
    global reads along j are 4 runs of 8 consecutive indices of a row."""
    t = gemm.TILES[tile]
    for rows in (t.BM, t.BN):
        stage, _, row, place, *_ = gemm.staging(None, None, None, rows, t.BJ, t.threads, along_j)
        place = getattr(place, "py_func", place)
        seen = [place(tid, i) for tid in range(t.threads) for i in range(stage)]
        assert sorted(seen) == [(r, jj) for r in range(rows) for jj in range(t.BJ)]
        for warp in range(0, t.threads, 32):
            for i in range(stage):
                spots = [place(tid, i) for tid in range(warp, min(warp + 32, t.threads))]
                banks = {(jj * row + r) % 32 for r, jj in spots}
                assert len(banks) == len(spots), (rows, warp, i)
                if along_j:
                    assert all(spots[k] == (spots[k - k % 8][0], k % 8) for k in range(len(spots)))


def test_tiled_gemm_steps_are_one_unrolled_loop_of_mostly_multiply_adds(ptx_rows):
    """A step of a tiled GEMM is one loop trip: its BJ reduction indices written out (gemm.multiply_step: TM*TN*BJ
    FMAs, each index's values read as TM/4 + TN/4 vector shared loads) and the staging of the next step. The
    loaders take their element's mask instead of being branched around (direct.masked), so a step branches only
    for its loop and its two `if more` blocks; the direct loaders' table rows precombine each element's offset
    and are read unmasked (direct.gather), and backward_filter's cursor carries in 32 bits (direct.sample_step).
    FMA share of a step in the PTX (the direct GEMMs' are the lowest): 128x128 0.71-0.79, 64x128 0.55-0.74,
    32x64 0.34-0.54, 8x64 0.15-0.21; in the SASS 0.67-0.73, 0.53-0.69, 0.32-0.49. Before, with a loop of one or
    two indices inside the step, the SASS had 0.50-0.68, 0.39-0.57 and 0.24-0.41."""
    share = {"8x64": 0.14, "32x64": 0.32, "64x128": 0.52, "128x128": 0.68}  # FMAs / instructions of a step, at least
    checked = 0
    for r in ptx_rows:
        family, _, tile = r["name"].split("[")[0].partition("/")
        if family.startswith(("direct_", "im2col_gemm_", "pointwise_gemm_")):
            t = gemm.TILES[tile]
            instructions, fmas, branches = r["inner_loop"]
            assert fmas == t.TM * t.TN * t.BJ and branches <= 3, (r["name"], r["inner_loop"])
            assert fmas >= share[tile] * instructions, (r["name"], r["inner_loop"])
            checked += 1
    assert checked == 96  # 3 families x 3 primitives x (3 float32 tiles + 1 float64) x 2 typings, + direct's 8x64
    # and its forward_wide (6 tiles x 2 typings)


def test_direct_tables_refuse_offsets_past_32_bits():
    """direct.gather adds its table's offsets in 32 bits: a layer whose input sample needs larger ones (here 2
    channels of 2**31 elements) is refused with the way out, never indexed wrong; one channel fits."""
    def geometry(channels):
        return ConvGeometry(1, channels, 1, 2 ** 16, 2 ** 15, 1, 1, 1, 1, 1, 2 ** 16, 2 ** 15, *[1] * 6, 0, 0, 0, 1)

    with pytest.raises(ValueError, match=r"algo='direct'.*2147483648.*use algo='im2col'"):
        direct.reduction_table(geometry(2), "forward")
    assert direct.int32_table(np.array([0, 2 ** 31 - 1, -5])).dtype == np.int32
    direct.reduction_table(geometry(1), "forward")


# ---------------------------------------------------------------- the raw-pointer launch path (launch.py)

def _reach_every_kernel(x, w, dy, monkeypatch):
    """Calls on Numba device arrays that launch every CUDA kernel at least once (float32)."""
    dx, dw, ddy = cuda.to_device(x), cuda.to_device(w), cuda.to_device(dy)
    bias = cuda.to_device(np.arange(K, dtype=np.float32))
    monkeypatch.setattr(direct, "MIN_SPLIT", 8)  # a split-K weight gradient: reduce_splits_kernel
    pointwise_w = cuda.to_device(w[:, :, :1, :1].copy())
    for algo in [f"direct:{t}" for t in direct.tile_names(4)] + [f"im2col:{t}" for t in gemm.tile_names(4)]:
        if algo.startswith("im2col"):  # a 1x1 layer: the pointwise GEMMs
            y = cnnfast.conv2d(dx, pointwise_w, bias, algo=algo)
            grad.conv2d_input(x.shape, pointwise_w, y, algo=algo)
            grad.conv2d_weight(dx, pointwise_w.shape, y, algo=algo)
        cnnfast.conv2d(dx, dw, bias, padding=1, algo=algo)
        grad.conv2d_input(x.shape, dw, ddy, padding=1, algo=algo)
        grad.conv2d_weight(dx, w.shape, ddy, padding=1, algo=algo)
        if algo.startswith("direct"):  # a filter of more than direct.MASK_TAPS taps: forward_wide
            cnnfast.conv2d(dx, cuda.to_device(np.ones((K, C, 5, 13), np.float32)), padding=(2, 6), algo=algo)
    depthwise_w = cuda.to_device(w[:C, :1].copy())
    y = cnnfast.conv2d(dx, depthwise_w, padding=1, groups=C, algo="depthwise")  # plane_kernel
    grad.conv2d_input(x.shape, depthwise_w, y, padding=1, groups=C, algo="depthwise")  # plane_kernel, backward
    generic_w = cuda.to_device(w[:C, :1, :2, :2].copy())  # a filter size without a build of its own
    y2 = cnnfast.conv2d(dx, generic_w, groups=C, algo="depthwise")
    grad.conv2d_input(x.shape, generic_w, y2, groups=C, algo="depthwise")
    grad.conv2d_weight(dx, generic_w.shape, y2, groups=C, algo="depthwise")
    for fw in (depthwise_w, generic_w):
        k = fw.shape[3]
        # planes taller than a block of thread rows (64 wide: 4 of them): the 4-row builds
        tall = cuda.to_device(np.zeros((1, C, 9, 64), np.float32))
        grad.conv2d_input(tall.shape, fw, cnnfast.conv2d(tall, fw, padding=k // 2, groups=C, algo="depthwise"),
                          padding=k // 2, groups=C, algo="depthwise")
        # backward_data at stride 2: the tap-walk builds
        strided = cuda.to_device(np.zeros((N, C) + ((HW + 2 * (k // 2) - k) // 2 + 1,) * 2, np.float32))
        grad.conv2d_input(x.shape, fw, strided, padding=k // 2, stride=2, groups=C, algo="depthwise")
        short = cuda.to_device(np.zeros((1, C, 2, HW), np.float32))  # under ROWS rows: the 1-row builds
        grad.conv2d_input(short.shape, fw, cnnfast.conv2d(short, fw, padding=k // 2, groups=C, algo="depthwise"),
                          padding=k // 2, groups=C, algo="depthwise")
        with monkeypatch.context() as patch:  # the HW x HW planes side by side in a block: the grouped builds
            patch.setattr(depthwise, "TARGET_BLOCKS", 1)
            grad.conv2d_input(x.shape, fw, cnnfast.conv2d(dx, fw, padding=k // 2, groups=C, algo="depthwise"),
                              padding=k // 2, groups=C, algo="depthwise")
    monkeypatch.setattr(depthwise_filter, "MIN_CHUNK", 2)  # filter_kernel split, then reduce_splits_kernel
    grad.conv2d_weight(dx, depthwise_w.shape, y, padding=1, groups=C, algo="depthwise")  # slide 1
    grad.conv2d_weight(dx, depthwise_w.shape, cuda.to_device(dy[:, :C, ::2, ::2].copy()), padding=1, stride=2,
                       groups=C, algo="depthwise")  # stride 2: slide 2
    grad.conv2d_weight(dx, depthwise_w.shape, y, padding=2, dilation=2, groups=C,
                       algo="depthwise")  # the 3x3 build that loads every tap
    monkeypatch.setattr(depthwise, "HALO", 0)  # no halo tile fits: forward_kernel, backward_data_kernel
    cnnfast.conv2d(dx, depthwise_w, padding=1, groups=C, algo="depthwise")
    grad.conv2d_input(x.shape, depthwise_w, cuda.to_device(dy[:, :C, ::2, ::2].copy()), padding=1, stride=2, groups=C,
                      algo="depthwise")
    cnnfast.conv2d(dx, dw, padding=1, padding_mode="reflect")  # pad
    grad.conv2d_input(x.shape, dw, ddy, padding=1, padding_mode="reflect")  # its adjoint fold_pad
    cnnfast.conv_transpose2d(ddy, dw, cuda.to_device(np.ones(C, np.float32)), padding=1)  # add_bias
    grad.conv_bias(ddy)  # bias_grad


def test_every_launch_has_a_checked_raw_specialisation_with_matching_parameters(problem, ptx_rows, monkeypatch):
    """The raw path's ABI, checked without a GPU: every launch of a workload reaching every kernel is recorded
    (not run: what the kernels compute is checked everywhere else); its raw-pointer signature must be one ptx.py
    compiled and checked for spills, and pack() must give exactly as many 8-byte values as that PTX entry has
    parameters."""
    from cnnfast.kernels.cuda import compile as kernel_cache
    from cnnfast.kernels.cuda import launch as launching

    seen = {}

    def recording_jit(pyfunc):
        class Configured:
            def __getitem__(self, config):
                def record(*args):
                    seen[(pyfunc, tuple(launching._kind(a) for a in args))] = len(launching.pack(args))
                return record
        return Configured()

    monkeypatch.setattr(kernel_cache, "jit", recording_jit)
    monkeypatch.setattr(launching, "_address", lambda a: 0)  # simulator arrays have no device address
    # on a GPU: Numba's dispatcher path (the raw one would launch on those null addresses), configured afresh
    monkeypatch.setenv(launching.ENV, "numba")
    monkeypatch.setattr(launching, "_CONFIGURED", {})
    _reach_every_kernel(*problem, monkeypatch)

    compiled = {(pyfunc, argtypes): name for name, pyfunc, argtypes, typing in kernel_cache.specialisations()
                if typing == "pointer"}
    params = {r["name"]: r["params"] for r in ptx_rows}
    reached = set()
    for (pyfunc, kinds), count in seen.items():
        name = compiled.get((pyfunc, launching.argument_types(kinds)))
        assert name is not None, f"{kernel_cache.kernel_key(pyfunc)} launched with {kinds}: not in specialisations()"
        assert count == params[name], f"{name}: pack() gives {count} values, the PTX entry has {params[name]}"
        reached.add(name.split("[")[0])
    raw = {r["name"].split("[")[0] for r in ptx_rows if r["typing"] == "pointer"}  # (copy_kernel is Numba's only)
    assert reached == raw, "the workload must reach every kernel and tile"


def test_pack_gives_one_8_byte_value_per_pointer_int_and_tuple_element():
    from cnnfast.kernels.cuda import launch as launching
    from numba import types

    class Interface:  # any __cuda_array_interface__ object
        dtype = np.dtype("float64")
        __cuda_array_interface__ = {"data": (0x7F0012345600, False), "shape": (3,), "typestr": "<f8", "version": 3}

    args = (Interface(), 7, (1, -2, 3), np.int64(-4))
    assert launching.pack(args).tolist() == [0x7F0012345600, 7, 1, -2, 3, -4]
    kinds = tuple(launching._kind(a) for a in args)
    assert launching.argument_types(kinds) == (types.CPointer(types.float64), types.int64,
                                               types.UniTuple(types.int64, 3), types.int64)


def test_raw_launch_hands_the_driver_one_pointer_per_8_byte_parameter(monkeypatch):
    """The host side of the raw path's cuLaunchKernel, checked without a GPU: a stand-in for numba-cuda's driver
    object reads kernelParams back as the driver does (an array of pointers, each to one 8-byte value) and gets
    pack()'s values, in order; the grid and block come as three dimensions each, the stream as its handle. Twice per
    argument count and from two threads, since the buffers are kept and reused. Then cuda-bindings' own
    cuLaunchKernel is handed the same arguments, to check that it accepts their types (where no driver is
    installed, it converts them and then fails to find libcuda)."""
    import ctypes
    import ctypes.util
    import threading
    import types as pytypes

    from cnnfast.kernels.cuda import launch as launching

    class Interface:  # any __cuda_array_interface__ object
        dtype = np.dtype("float32")

        def __init__(self, address):
            self.__cuda_array_interface__ = {"data": (address, False), "shape": (4,), "typestr": "<f4", "version": 3}

    calls = []

    def cuLaunchKernel(f, gx, gy, gz, bx, by, bz, shared, stream, params, extra):  # noqa: N802 (the driver's name)
        n = len(launching.pack(current.args))
        pointers = (ctypes.c_void_p * n).from_address(params)
        calls.append(((f, gx, gy, gz, bx, by, bz, shared, stream, params, extra),
                      [ctypes.c_int64.from_address(p).value for p in pointers]))

    monkeypatch.setattr(launching, "_driver", lambda: pytypes.SimpleNamespace(cuLaunchKernel=cuLaunchKernel))
    current = threading.local()
    function = pytypes.SimpleNamespace(handle=0xF00)
    stream = pytypes.SimpleNamespace(handle=0xABC)  # a Numba stream's handle (a CUstream)
    cases = [((Interface(0x7F0000001000), Interface(0x7F0000002000), 7, (1, -2, 3), np.int64(-4)), 5, 64, 0),
             ((Interface(0x7F0000003000), tuple(range(36)), 1), (6, 2), (32, 4), stream),
             ((Interface(0x7F0000004000), Interface(0x7F0000005000), -7, (3, 2, 1), np.int64(4)), (1, 2, 3), 128, 0)]

    def run(case_list):
        for args, grid, block, on in case_list:
            current.args = args
            launching.launch_values(function, grid, block, on, launching._values(args))

    run(cases)
    threads = [threading.Thread(target=run, args=(cases,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 3 * len(cases)
    for (config, values), (args, grid, block, on) in zip(calls[:3], cases):
        assert values == launching.pack(args).tolist()
        g = (grid, 1, 1) if isinstance(grid, int) else tuple(grid) + (1,) * (3 - len(grid))
        b = (block, 1, 1) if isinstance(block, int) else tuple(block) + (1,) * (3 - len(block))
        assert config[:9] == (0xF00, *g, *b, 0, on.handle if on else 0) and config[10] == 0
        assert isinstance(config[9], int)  # kernelParams: the address of the array of pointers
    assert sorted(v for _, v in calls) == sorted(launching.pack(a).tolist() for a, _, _, _ in cases * 3)

    if ctypes.util.find_library("cuda"):
        return  # a driver is installed: the stand-in arguments must not reach it
    binding = pytest.importorskip("cuda.bindings.driver")
    for config, _ in calls[:3]:
        f, *dims, stream_handle, params, extra = config
        try:
            returned = binding.cuLaunchKernel(binding.CUkernel(f), *dims, stream_handle, params, extra)
        except (TypeError, ValueError, OverflowError) as e:
            pytest.fail(f"cuda-bindings rejects the raw path's arguments: {e}")
        except Exception as e:  # noqa: BLE001 (the arguments were converted; then no libcuda)
            assert "cuda" in str(e), e
        else:
            assert isinstance(returned[0], binding.CUresult)


class _SimulatedDriver:
    """numba-cuda's driver object for the raw path in the simulator: cuLaunchKernel reads each 8-byte parameter back
    as the driver does, finds each address among the simulator's arrays (registered as cuda.to_device and
    cuda.device_array make them), and runs the kernel there on flat views from those addresses, so what the raw path
    hands the driver is computed, not just counted."""

    def __init__(self, monkeypatch):
        from cnnfast.kernels.cuda import compile as kernel_cache
        from cnnfast.kernels.cuda import launch as launching
        from cnnfast.kernels.cuda import program

        self.arrays, self.launching = [a for _, a in kernel_cache.constants()], launching  # (those uploaded so far)
        self.running = True  # False: launches read back, not run
        for name in ("to_device", "device_array"):
            monkeypatch.setattr(cuda, name, self._registering(getattr(cuda, name)))
        monkeypatch.setattr(launching, "_address", program.address)  # (the simulator's arrays: their NumPy memory)
        monkeypatch.setattr(launching, "_function", lambda pyfunc, kinds: SimpleNamespace(handle=(pyfunc, kinds)))
        monkeypatch.setattr(launching, "_driver", lambda: self)

    def _registering(self, make):
        def registered(*args, **kwargs):
            a = make(*args, **kwargs)
            self.arrays.append(a)
            return a
        return registered

    def _array(self, address, dtype):
        for a in self.arrays:
            first = a._ary.__array_interface__["data"][0]
            if a.dtype.str == dtype and first <= address < first + max(a.nbytes, 1):
                return self.launching.flat(a)[(address - first) // a.dtype.itemsize:]
        raise AssertionError(f"the raw path passed {address:#x}, no array's")

    def cuLaunchKernel(self, f, gx, gy, gz, bx, by, bz, shared, stream, params, extra):  # noqa: N802 (the driver's)
        import ctypes

        pyfunc, kinds = f
        n = sum(k if isinstance(k, int) else 1 for k in kinds)
        values = iter([ctypes.c_int64.from_address(p).value for p in (ctypes.c_void_p * n).from_address(params)])
        args = [next(values) if k == "i" else tuple(next(values) for _ in range(k)) if isinstance(k, int) else
                self._array(next(values), k) for k in kinds]
        assert (shared, stream, extra) == (0, 0, 0)
        if self.running:
            self.launching.dispatch(pyfunc, (gx, gy, gz), (bx, by, bz), 0, args)


@pytest.mark.skipif(not SIM, reason="simulator stand-ins for the raw path's driver (on a GPU: the test below)")
def test_every_kernel_replayed_from_a_launch_program_computes_what_the_full_call_did(problem, monkeypatch):
    """program.py on the raw path: every call of the workload that reaches every kernel (tile, table, scratch,
    padding, bias and split) runs in full on Numba's dispatcher, then in full on the raw path, recorded (its
    launches read back, not run), then again: replayed from its program, through a stand-in driver that runs each
    launch in the simulator from the addresses it is handed. The replay must give the dispatcher's bits. (Replays
    on Numba's dispatcher: the test after this one.)"""
    from cnnfast.kernels.cuda import launch as launching
    from cnnfast.kernels.cuda import program

    monkeypatch.setattr(program, "DISPATCHER", True)
    raw = [False]
    driver = _SimulatedDriver(monkeypatch)
    monkeypatch.setattr(launching, "raw_enabled", lambda: raw[0])
    # the smallest square tile and the thin one (another tile's launches differ only in the kernel and the grid)
    monkeypatch.setattr(gemm, "tile_names", lambda itemsize, thin=False: (gemm.SMALL,) + ((gemm.THIN,) if thin else ()))
    monkeypatch.setattr(api, "_CALLS", {})
    replays = []
    program_run = program.Program.run

    def counted(self, dev, arrays):
        out = program_run(self, dev, arrays)
        replays.append((out is not None, self.raw))
        return out

    monkeypatch.setattr(program.Program, "run", counted)
    run = api.run

    def twice(op, *args, **kwargs):
        if isinstance(kwargs.get("size"), tuple):  # (the simulator's shapes are a tuple subclass: no call key)
            kwargs["size"] = tuple(kwargs["size"])
        api._CALLS.clear()
        raw[0] = False
        expected = run(op, *args, **kwargs).copy_to_host()  # the full call, on Numba's dispatcher
        api._CALLS.clear()
        raw[0], driver.running = True, False
        run(op, *args, **kwargs)  # the full call on the raw path, recorded (its launches not run: the replay's are)
        driver.running = True
        seen = len(replays)
        replayed = run(op, *args, **kwargs)
        assert replays[seen:] == [(True, raw[0])], f"{op} {kwargs.get('algo')}: not replayed"
        np.testing.assert_array_equal(replayed.copy_to_host(), expected, err_msg=f"{op} {kwargs.get('algo')}")
        return replayed

    monkeypatch.setattr(api, "run", twice)
    monkeypatch.setattr(grad, "run", twice)
    cnnfast.arrays.family_of(cuda.to_device(problem[0]))  # (a type met once: its calls are kept from the first)
    _reach_every_kernel(*problem, monkeypatch)
    assert len(replays) > 30  # (41 calls: each one replayed)


def test_a_launch_program_is_replayed_only_where_it_computes_the_call(monkeypatch):
    """program.py's refusals, each checked against the reference: inputs that share memory are not recorded (an
    address would name either); an input not C-contiguous is neither recorded nor replayed (it is copied first),
    and the key's next call is; a program whose device constant was dropped runs the call in full, which keeps the
    new program; an algorithm a user registers is never recorded (its launches may not go through launch.launch);
    and with replay off nothing is recorded."""
    from cnnfast.kernels.cuda import compile as kernel_cache
    from cnnfast.kernels.cuda import program

    monkeypatch.setattr(program, "DISPATCHER", True)
    monkeypatch.setattr(api, "_CALLS", {})
    outcomes = []
    program_run = program.Program.run
    monkeypatch.setattr(program.Program, "run", lambda self, *a: _counted(outcomes, program_run, self, *a))
    rng = np.random.default_rng(3)
    host = [rng.standard_normal((1, 2, 5, 5)).astype(np.float32) for _ in range(3)]
    a, b, c = (cuda.to_device(h) for h in host)
    cnnfast.arrays.family_of(a)

    def check(x, w, hx, hw):
        got = cnnfast.conv2d(x, w, padding=2).copy_to_host()
        expected = reference.conv(hx.astype(np.float64), hw.astype(np.float64), padding=2)
        compare.assert_close(got, expected, "float32")

    def programs():
        return [p for entry in api._CALLS.values() for p in entry[6].values()]

    check(a, a.reshape((1, 2, 5, 5)), host[0], host[0])  # (one array as input and weight)
    assert programs() == [None]  # not recorded; a later call may be
    check(a, b, host[0], host[1])  # recorded
    check(c, a, host[2], host[0])  # replayed on other arrays
    assert outcomes == [True]
    check(b, b, host[1], host[1])  # replayed where they share memory: as the full call computes it
    strided = cuda.to_device(np.repeat(host[2], 2, axis=3))[:, :, :, ::2]
    check(strided, b, host[2], host[1])  # not C-contiguous: the full call (the program kept)
    assert outcomes == [True, True, False]
    kernel_cache._CONSTANTS.clear()  # (dropped: the full call uploads them again, and its program is kept)
    check(c, b, host[2], host[1])
    check(a, c, host[0], host[2])
    assert outcomes == [True, True, False, False, True]
    api._CALLS.clear()  # a key's first call on a strided input (copied: not recorded), then its calls are
    check(strided, b, host[2], host[1])
    for _ in range(2):
        check(a, c, host[0], host[2])
    assert outcomes == [True, True, False, False, True, True]

    @cuda.jit
    def doubled(x, y):  # a user's algorithm (its own kernel, not started through launch.launch): never recorded
        i = cuda.grid(1)
        if i < y.size:
            y[i] = 2 * x[i]

    def forward(x, w, bias, y, g, stream=0, **_):
        doubled[(y.size + 63) // 64, 64, stream](x, y)

    import dataclasses

    from cnnfast.kernels import cuda as cuda_kernels
    monkeypatch.setitem(cuda_kernels.ALGORITHMS, "doubled", dataclasses.replace(
        cuda_kernels.ALGORITHMS["direct"], name="doubled", forward=forward))
    one = cuda.to_device(np.ones((2, 2, 1, 1), np.float32))
    for h, x in zip(host, (a, b, c)):
        np.testing.assert_array_equal(cnnfast.conv2d(x, one, algo="doubled").copy_to_host(), 2 * h)
    assert len(outcomes) == 6

    monkeypatch.setattr(program, "DISPATCHER", False)  # (as on a GPU on Numba's dispatcher)
    api._CALLS.clear()
    for _ in range(2):
        check(a, b, host[0], host[1])
    assert programs() == [] and len(outcomes) == 6
    monkeypatch.setattr(program.launch, "raw_enabled", lambda: True)  # the raw path: on, unless turned off
    assert program.path() is True
    monkeypatch.setenv(program.ENV, "0")
    assert program.path() is None


def _counted(outcomes, run, self, *args):
    out = run(self, *args)
    outcomes.append(out is not None)
    return out


def test_raw_specialisations_load_once_per_kernel_and_gpu_into_numba_context(monkeypatch):
    """_function, checked with a stand-in for Numba's CUDA context: the PTX is compiled for the context's GPU
    (its compute capability) and loaded into that context once per (kernel, argument kinds, GPU); another GPU loads
    its own; a specialisation that cannot be prepared warns once and leaves the kernel on Numba's dispatcher."""
    import types as pytypes
    import warnings

    from cnnfast.kernels.cuda import compile as kernel_cache
    from cnnfast.kernels.cuda import launch as launching
    from numba import types

    compiled, loaded = [], []

    class Context:
        def __init__(self, gpu, cc):
            self.device = pytypes.SimpleNamespace(id=gpu, compute_capability=cc)

        def create_module_ptx(self, text):
            if text == "broken":
                raise RuntimeError("CUDA_ERROR_UNSUPPORTED_PTX_VERSION")
            loaded.append((self.device.id, text))
            return pytypes.SimpleNamespace(get_function=lambda entry: pytypes.SimpleNamespace(handle=(text, entry)))

    def ptx(pyfunc, argtypes, cc):
        compiled.append((pyfunc.__name__, argtypes, cc))
        return ("broken" if pyfunc is broken else f"ptx {pyfunc.__name__} sm_{cc[0]}{cc[1]}"), "entry"

    def kernel(a, n):
        """A stand-in kernel."""

    def broken(a):
        """A stand-in kernel whose module does not load."""

    monkeypatch.setattr(kernel_cache, "ptx", ptx)
    monkeypatch.setattr(launching, "_FUNCTIONS", {})
    gpus = {0: Context(0, (9, 0)), 1: Context(1, (8, 6))}
    on = [0]
    monkeypatch.setattr(launching, "_context", lambda: gpus[on[0]])
    kinds = ("<f4", "i")
    first = launching._function(kernel, kinds)
    assert first.handle == ("ptx kernel sm_90", "entry")
    assert launching._function(kernel, kinds) is first
    assert compiled == [("kernel", (types.CPointer(types.float32), types.int64), (9, 0))]
    assert loaded == [(0, "ptx kernel sm_90")]
    on[0] = 1
    assert launching._function(kernel, kinds).handle == ("ptx kernel sm_86", "entry")
    assert launching._function(kernel, ("<f8", "i")).handle == ("ptx kernel sm_86", "entry")
    assert len(loaded) == 3 and compiled[-1][1][0] == types.CPointer(types.float64)
    with pytest.warns(RuntimeWarning, match="raw launch of .*broken unavailable.*UNSUPPORTED_PTX_VERSION"):
        assert launching._function(broken, ("<f4",)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert launching._function(broken, ("<f4",)) is None  # kept: no second warning


def test_raw_launch_is_opt_in_and_never_used_in_the_simulator(monkeypatch):
    from cnnfast.kernels.cuda import launch as launching
    monkeypatch.delenv(launching.ENV, raising=False)
    assert not launching.raw_enabled()
    monkeypatch.setenv(launching.ENV, "raw")
    assert launching.raw_enabled() is (not SIM)  # (on a GPU the variable turns it on)


_CACHED_REDUCE_SPLITS = ("import sys\n"  # the raw path's PTX of reduce_splits: with `cached`, from the disk cache only
                         "from numba import cuda\n"
                         "from cnnfast.kernels.cuda import compile as kc, direct, launch as kl\n"
                         "if sys.argv[1] == 'cached':\n"
                         "    cuda.compile_ptx = None  # calling it now would fail\n"
                         "types = kl.argument_types(('<f4', '<f4', 'i', 'i'))\n"
                         "text, entry = kc.ptx(direct.reduce_splits_kernel, types, (9, 0))\n"
                         "print(entry, kc.parameter_count(text), len(list(kc.cache_dir().iterdir())))\n")


@pytest.mark.parametrize("fill", ["first use", "ptx --warm"])
def test_raw_specialisations_compile_once_then_load_from_the_disk_cache(tmp_path, fill):
    """A second process finds the PTX on disk and never calls the compiler, whether a first launch compiled it or
    `python -m cnnfast.kernels.cuda.ptx --warm` did (gpu_session.sh's bench: every raw specialisation at once)."""
    warm = ("from cnnfast.kernels.cuda import compile as kc, ptx\n"
            "names = [s[0] for s in kc.specialisations()]\n"
            "ptx.warm(names.index('reduce_splits[float32,pointer]'))\n")
    script = ["-c", _CACHED_REDUCE_SPLITS, "fresh"] if fill == "first use" else ["-c", warm]
    first = _python_without_simulator(script, CNNFAST_CACHE_DIR=str(tmp_path))
    reason = _no_gpu_compiler(first)
    if reason:
        pytest.skip(reason)
    assert first.returncode == 0, first.stderr[-2000:]
    second = _python_without_simulator(["-c", _CACHED_REDUCE_SPLITS, "cached"], CNNFAST_CACHE_DIR=str(tmp_path))
    assert second.returncode == 0, second.stderr[-2000:]
    entry, params, files = second.stdout.split()
    assert "reduce_splits_kernel" in entry and params == "4" and files == "1"
    assert fill != "first use" or second.stdout == first.stdout


@pytest.mark.gpu
@pytest.mark.skipif(SIM, reason="the raw path needs a GPU")
@pytest.mark.parametrize("family", ["numba", "cupy"])
def test_raw_launch_path_matches_numba_dispatcher_bitwise(problem, family, monkeypatch):
    """On a GPU: every algorithm and primitive, launched both ways, same bits; on Numba device arrays, and on CuPy
    arrays where CuPy is installed. The raw path's second call is replayed from its launch program: same bits."""
    from cnnfast.kernels.cuda import launch as launching
    from cnnfast.kernels.cuda import program
    if family == "cupy":
        cp = pytest.importorskip("cupy")
        put, host, sync = cp.asarray, cp.asnumpy, cp.cuda.get_current_stream().synchronize
    else:
        put, host, sync = cuda.to_device, (lambda a: a.copy_to_host()), cuda.synchronize
    x, w, dy = (put(a) for a in problem)
    calls = {f"{algo} {name}": (lambda op=op, algo=algo: op(algo))
             for algo in ("direct", "im2col")
             for name, op in (("forward", lambda a: cnnfast.conv2d(x, w, padding=1, algo=a)),
                              ("backward_data", lambda a: grad.conv2d_input(x.shape, w, dy, padding=1, algo=a)),
                              ("backward_filter", lambda a: grad.conv2d_weight(x, w.shape, dy, padding=1, algo=a)))}
    depthwise_w, depthwise_dy = put(problem[1][:C, :1].copy()), put(problem[2][:, :C].copy())
    calls["depthwise forward"] = lambda: cnnfast.conv2d(x, depthwise_w, padding=1, groups=C, algo="depthwise")
    calls["depthwise backward_data"] = lambda: grad.conv2d_input(x.shape, depthwise_w, depthwise_dy, padding=1,
                                                                 groups=C, algo="depthwise")
    calls["depthwise backward_filter"] = lambda: grad.conv2d_weight(x, depthwise_w.shape, depthwise_dy, padding=1,
                                                                    groups=C, algo="depthwise")
    calls["reflect backward_data"] = lambda: grad.conv2d_input(x.shape, w, dy, padding=1, padding_mode="reflect")
    replays = []
    program_run = program.Program.run
    monkeypatch.setattr(program.Program, "run", lambda self, *a: replays.append(program_run(self, *a)) or replays[-1])
    for name, call in calls.items():
        monkeypatch.setenv(launching.ENV, "numba")
        expected = call()
        monkeypatch.setenv(launching.ENV, "raw")
        assert launching.raw_enabled()
        got = call()  # (recorded: program.py)
        seen = len(replays)
        replayed = call()
        sync()
        assert len(replays) == seen + 1 and replays[-1] is not None, f"{name}: not replayed"
        for result in (got, replayed):
            np.testing.assert_array_equal(host(result), host(expected), err_msg=name)
    assert launching._FUNCTIONS and all(f is not None for f in launching._FUNCTIONS.values())


VIEW_PROBE = """
import ctypes
import numpy as np
from cnnfast.kernels.cuda.launch import flat, view
from cnnfast.kernels.cuda.layout import _five_axes
from numba.cuda.cudadrv.devicearray import DeviceNDArray

class Memory:
    def __init__(self, nbytes):
        self._buffer = ctypes.create_string_buffer(nbytes)
        self.device_ctypes_pointer = ctypes.c_void_p(ctypes.addressof(self._buffer))

for dtype in (np.float32, np.float64):
    item = np.dtype(dtype).itemsize
    a = DeviceNDArray((2, 3, 1, 4, 5), tuple(item * s for s in (60, 20, 20, 5, 1)), dtype, gpu_data=Memory(120 * item))
    for shape in ((120,), (2, 60), (2, 3, 4, 5), (1, 2, 3, 1, 4, 5), (120, 1)):
        v, r = view(a, shape), a.reshape(shape)
        assert type(v) is DeviceNDArray and (v.shape, v.strides, v.dtype) == (r.shape, r.strides, r.dtype), shape
        assert v.gpu_data is a.gpu_data and v.device_ctypes_pointer.value == r.device_ctypes_pointer.value
        assert v.is_c_contiguous() and view(v, a.shape).strides == a.strides
    assert view(a, a.shape) is a
    one = flat(a)
    assert one.shape == (120,) and flat(one) is one
    sliced = DeviceNDArray((2, 2, 5), (item * 60, item * 10, item), dtype, gpu_data=a.gpu_data)  # a strided view
    five = _five_axes(sliced)
    assert type(five) is DeviceNDArray and five.shape == (1, 1, 2, 2, 5) and five.gpu_data is a.gpu_data
    assert five.strides == (item, item, item * 60, item * 10, item)
print("views ok")
"""


def test_a_device_constant_is_uploaded_once_and_waited_for(monkeypatch):
    """An index table is read by kernels on any stream (torch's side streams do not wait for the default stream's
    copy, which may return before the data lands): its one upload is followed by a device-wide wait, its later uses
    by nothing."""
    from cnnfast.kernels.cuda import compile as kernel_compile
    from numba import cuda
    events = []
    real = cuda.to_device
    monkeypatch.setattr(cuda, "to_device", lambda a, *args, **kw: events.append("upload") or real(a, *args, **kw))
    monkeypatch.setattr(cuda, "synchronize", lambda: events.append("wait"))
    key = ("test table", object())
    for _ in range(3):
        table = kernel_compile.device_constant(key, lambda: np.arange(5, dtype=np.int64))
        assert np.array_equal(table.copy_to_host(), np.arange(5))
    assert events == ["upload", "wait"]


def test_numba_device_arrays_are_viewed_as_their_reshape_would_be_without_reshaping():
    """launch.view builds a Numba DeviceNDArray's C-contiguous view directly (its reshape re-derives the layout: 3-4
    us of host time per call, several per op): the same shape, strides, dtype and memory as reshape's. Real
    DeviceNDArray objects over a stand-in for device memory (given gpu_data, the constructor allocates nothing), in
    a process without the simulator, which has no DeviceNDArray."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    done = subprocess.run([sys.executable, "-c", VIEW_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "views ok", done.stderr


def _strided_layouts(rng):
    """Device arrays of 1 to 5 axes that are not C-contiguous, with their host values."""
    x = rng.standard_normal((3, 4, 10, 6)).astype(np.float32)
    y = rng.standard_normal((2, 3, 4, 5, 6))
    d, e = cuda.to_device(x), cuda.to_device(y)
    return {"slice": (d[:, 1:3, ::2, :], x[:, 1:3, ::2, :]),
            "fortran": (cuda.to_device(np.asfortranarray(x)), x),
            "permuted": (d.transpose((0, 2, 3, 1)), x.transpose(0, 2, 3, 1)),
            "1-D every third": (cuda.to_device(x.ravel())[::3], x.ravel()[::3]),
            "5-D float64 slice": (e[:, :, 1:, ::2, 1:], y[:, :, 1:, ::2, 1:]),
            "negative": (d[:, :, ::-1, :], x[:, :, ::-1, :])}


def test_strided_device_arrays_are_copied_on_the_device(monkeypatch):
    """copy_cuda (CUDA.working's copy of a Numba array that is not C-contiguous) runs copy_kernel for any
    non-negative strides and goes through the host only for a negative one."""
    launched = []
    real = layout.launch_numba
    monkeypatch.setattr(layout, "launch_numba", lambda kernel, *a: launched.append(kernel) or real(kernel, *a))
    for name, (src, expected) in _strided_layouts(np.random.default_rng(3)).items():
        assert not src.is_c_contiguous(), name
        launched.clear()
        out = cuda.device_array(src.shape, src.dtype)
        layout.copy_cuda(src, out)
        assert np.array_equal(out.copy_to_host(), expected), name
        assert launched == ([] if name == "negative" else [layout.copy_kernel]), name


NEGATIVE_PROBE = """
import contextlib, ctypes
import numpy as np
from numba.cuda.cudadrv import devices, driver
from numba.cuda.cudadrv.devicearray import DeviceNDArray
from cnnfast.kernels.cuda import layout

devices._runtime.ensure_context = lambda: contextlib.nullcontext()  # (no driver: the copies below stand in for it)
pointer = lambda a: a.ctypes.data if isinstance(a, np.ndarray) else a.device_ctypes_pointer.value
driver.device_to_host = driver.host_to_device = lambda dst, src, size, stream=0: ctypes.memmove(pointer(dst),
                                                                                                 pointer(src), size)

class Memory:  # stand-in device memory (host bytes), its view() as numba-cuda's MemoryPointer's: start + offset
    def __init__(self, buffer, start=0):
        self.buffer, self.start = buffer, start
        self.device_ctypes_pointer = ctypes.c_void_p(ctypes.addressof(buffer) + start)
    def view(self, start, stop=None):
        return Memory(self.buffer, self.start + start)

def device(a):
    buffer = ctypes.create_string_buffer(a.tobytes(), a.nbytes)
    return DeviceNDArray(a.shape, a.strides, a.dtype, gpu_data=Memory(buffer))

rng = np.random.default_rng(5)
x, y = rng.standard_normal((3, 4, 10, 6)).astype(np.float32), rng.standard_normal((2, 3, 4, 5, 6))
d, e = device(x), device(y)
cases = [(d[:, :, ::-1, :], x[:, :, ::-1, :]), (d[::-1, 1:3, ::-2, 2:], x[::-1, 1:3, ::-2, 2:]),
         (device(x.ravel())[::-3], x.ravel()[::-3]), (e[:, ::-1, 1:, :, ::-1], y[:, ::-1, 1:, :, ::-1]),
         (d[2:0:-1, ::2, 9:2:-3, ::-1], x[2:0:-1, ::2, 9:2:-3, ::-1])]
for src, expected in cases:
    assert any(s < 0 for s in src.strides) and src.shape == expected.shape
    out = device(np.zeros(expected.shape, expected.dtype))
    layout.copy_cuda(src, out)
    got = np.frombuffer(out.gpu_data.buffer, expected.dtype, expected.size).reshape(expected.shape)
    assert np.array_equal(got, expected), (src.strides, got, expected)
try:
    d[:, :, ::-1, :].copy_to_host()  # what copy_cuda had called: numba-cuda refuses it
except NotImplementedError:
    print("negative strides ok")
"""


def test_a_negatively_strided_numba_device_array_is_copied_through_the_host_without_numbas_refusal():
    """numba-cuda's copy_to_host refuses a view with a negative stride (NotImplementedError; the simulator's takes
    it, so the fuzz never saw it): copy_cuda copies the bytes from the view's lowest element to its highest and views
    them with its strides. Real DeviceNDArray views over stand-in device memory, the driver's copies stood in for."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    done = subprocess.run([sys.executable, "-c", NEGATIVE_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "negative strides ok", done.stderr


STAND_IN_GPU = """
import ctypes, math
import numpy as np
from numba import cuda
from numba.cuda.cudadrv.devicearray import DeviceNDArray
import cnnfast
from cnnfast import grad
from cnnfast.kernels.cuda import compile as kernel_compile

class Memory:
    def __init__(self, nbytes):
        self._buffer = ctypes.create_string_buffer(max(nbytes, 1))
        self.device_ctypes_pointer = ctypes.c_void_p(ctypes.addressof(self._buffer))

def device_array(shape, dtype=np.float64, stream=0, **_):
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    item = np.dtype(dtype).itemsize
    strides = tuple(math.prod(shape[i + 1:]) * item for i in range(len(shape)))
    return DeviceNDArray(shape, strides, dtype, stream, gpu_data=Memory(math.prod(shape) * item))

launches = []

class Configured:
    def __init__(self, pyfunc):
        self.name = getattr(pyfunc, "cache_key", None) or pyfunc.__name__
    def __getitem__(self, config):
        return lambda *args: launches.append((self.name, args, config[2]))

gpu = type("Device", (), {"id": 0})()
cuda.device_array, cuda.get_current_device = device_array, lambda: gpu
cuda.to_device = lambda a, stream=0, **_: device_array(np.shape(a), np.asarray(a).dtype, stream)
cuda.synchronize = lambda: None
cuda.gpus = [gpu]  # (one GPU: no array is asked where it is)
kernel_compile.jit = Configured
"""

CALLS = """
x, w, b, dy = put((2, 4, 9, 8)), put((8, 1, 3, 3)), put((8,)), put((2, 8, 9, 8))
x2, w2, dy2 = put((2, 3, 9, 8)), put((5, 3, 3, 3)), put((2, 5, 9, 8))
calls = {
    "depthwise conv2d + bias": (lambda: cnnfast.conv2d(x, w, b, padding=1, groups=4), (2, 8, 9, 8)),
    "depthwise conv2d_input": (lambda: grad.conv2d_input((2, 4, 9, 8), w, dy, padding=1, groups=4), (2, 4, 9, 8)),
    "depthwise conv2d_weight": (lambda: grad.conv2d_weight(x, (8, 1, 3, 3), dy, padding=1, groups=4), (8, 1, 3, 3)),
    "dense conv2d": (lambda: cnnfast.conv2d(x2, w2, padding=1), (2, 5, 9, 8)),
    "dense conv2d im2col": (lambda: cnnfast.conv2d(x2, w2, padding=1, algo="im2col"), (2, 5, 9, 8)),
    "dense conv2d reflect": (lambda: cnnfast.conv2d(x2, w2, padding=1, padding_mode="reflect"), (2, 5, 9, 8)),
    "dense conv2d_input reflect": (lambda: grad.conv2d_input((2, 3, 9, 8), w2, dy2, padding=1,
                                                             padding_mode="reflect"), (2, 3, 9, 8)),
    "dense conv2d_weight": (lambda: grad.conv2d_weight(x2, (5, 3, 3, 3), dy2, padding=1), (5, 3, 3, 3)),
    "conv_transpose2d + bias": (lambda: cnnfast.conv_transpose2d(dy2, w2, put((3,)), padding=1), (2, 3, 9, 8)),
    "unbatched conv1d": (lambda: cnnfast.conv1d(put((3, 11)), put((5, 3, 3))), (5, 9)),
    "pointwise conv3d": (lambda: cnnfast.conv3d(put((1, 4, 3, 4, 5)), put((6, 4, 1, 1, 1))), (1, 6, 3, 4, 5)),
    "conv_bias": (lambda: grad.conv_bias(dy2), (5,)),
}
"""  # (each probe defines put(shape), an input array of zeros, first)

HOST_PATH_PROBE = STAND_IN_GPU + """
def put(shape):
    return cuda.to_device(np.zeros(shape, np.float32))
""" + CALLS + """
for name, (call, shape) in calls.items():
    launches.clear()
    out = call()
    assert type(out) is DeviceNDArray and out.shape == shape and out.is_c_contiguous(), (name, out.shape)
    assert launches, name
    for kernel, args, _ in launches:
        arrays = [a for a in args if hasattr(a, "gpu_data")]
        assert arrays and all(type(a) is DeviceNDArray and a.ndim == 1 and a.is_c_contiguous() for a in arrays), (
            name, kernel, [getattr(a, "shape", a) for a in args])
    read = {id(a.gpu_data) for _, args, _ in launches for a in args if hasattr(a, "gpu_data")}
    inputs = {"depthwise conv2d + bias": (x, w, b), "dense conv2d": (x2, w2), "dense conv2d_weight": (x2, dy2)}
    assert all(id(a.gpu_data) in read for a in inputs.get(name, ())), name  # views of the inputs, not copies
print("host path ok")
"""


def test_the_cuda_host_path_hands_numba_kernels_flat_device_arrays():
    """Every op's CUDA path on Numba's own DeviceNDArray objects (over stand-in memory, the launches recorded
    instead of run; no GPU, no simulator, whose arrays are NumPy's): each kernel gets C-contiguous 1-D
    DeviceNDArrays (launch.view instead of reshape), and each result comes back as a DeviceNDArray of the op's
    shape, through the explicit pad and fold of a padding mode, a transposed bias, unbatched and pointwise calls."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0", "CNNFAST_CUDA_LAUNCH": "numba"}  # (on a GPU: not raw)
    done = subprocess.run([sys.executable, "-c", HOST_PATH_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "host path ok", done.stderr[-3000:]


TORCH_PROBE = STAND_IN_GPU + """
import contextlib
import torch
from numba.cuda.cudadrv.driver import MemoryPointer, binding
from cnnfast import arrays
from cnnfast.kernels.cuda import launch

class OnGPU(torch.Tensor):  # a torch tensor that says it is on GPU 0 (torch here is a CPU build)
    is_cuda = property(lambda self: True)
    device = property(lambda self: torch.device("cuda", 0))
    @property
    def __cuda_array_interface__(self):
        item = self.element_size()
        return {"shape": tuple(self.shape), "strides": tuple(s * item for s in self.stride()), "version": 2,
                "typestr": {torch.float32: "<f4", torch.float64: "<f8"}[self.dtype], "data": (self.data_ptr(), False)}

current, made = [0, 77], []  # torch's current stream handle (the last), and torch's allocations: (tensor, stream)

class Stream:  # torch.cuda.Stream's stand-in
    __module__ = "torch.cuda.streams"
    def __init__(self, ptr, device=None):
        self.cuda_stream, self.device = ptr, torch.device(device or "cuda:0")

@contextlib.contextmanager
def made_current(stream):
    current.append(stream.cuda_stream)
    yield
    current.pop()

def allocator(real):
    def allocate(*shape, dtype=None, device=None, **options):
        if getattr(device, "type", device) != "cuda":
            return real(*shape, dtype=dtype, device=device, **options)
        t = real(*shape, dtype=dtype).as_subclass(OnGPU)
        made.append((t, current[-1]))
        return t
    return allocate

torch.empty, torch.zeros = allocator(torch.empty), allocator(torch.zeros)
torch.cuda.current_stream = lambda device=None: Stream(current[-1])
torch.cuda.default_stream = lambda device=None: Stream(0)
torch.cuda.ExternalStream, torch.cuda.stream = Stream, made_current
cuda.external_stream = lambda ptr: type("Stream", (), {"__module__": "numba.cuda.stand_in", "handle": ptr})()
interfaced = []  # the tensors read through Numba's as_cuda_array (contiguous ones are viewed without it)
cuda.as_cuda_array = lambda t: interfaced.append(t) or DeviceNDArray(  # (Numba's: the tensor owns the memory)
    t.shape, t.__cuda_array_interface__["strides"], np.dtype(t.__cuda_array_interface__["typestr"]),
    gpu_data=MemoryPointer(None, binding.CUdeviceptr(t.data_ptr()), t.numel() * t.element_size(), owner=t))
from numba.cuda.cudadrv import devices
launch._context = devices.get_context = lambda *_: None  # (the context a MemoryPointer records)
arrays._cupy = lambda: (_ for _ in ()).throw(AssertionError("CuPy asked for"))  # (a call on torch tensors: none)

def put(shape):
    return torch.zeros(shape).as_subclass(OnGPU)
""" + CALLS + """
def check(name, out, shape, stream):
    assert type(out) is OnGPU and tuple(out.shape) == shape and out.is_contiguous(), (name, type(out), out.shape)
    assert any(t.data_ptr() == out.data_ptr() and t.numel() == out.numel() for t, _ in made), name  # torch's memory
    assert made and all(on == stream for _, on in made), (name, [(t.shape, on) for t, on in made])  # on the op's stream
    assert launches and all(getattr(on, "handle", on) == stream for _, _, on in launches), name  # and each launch
    for kernel, args, _ in launches:  # every array a kernel gets: an input's or torch allocation's, or a table
        memory = [a for a in args if hasattr(a, "gpu_data")]
        assert memory and all(isinstance(launch.torch_owner(a), OnGPU) or type(a.gpu_data) is Memory
                              for a in memory), (name, kernel)
        assert kernel == "copy_kernel" or all(a.ndim == 1 and a.is_c_contiguous() for a in memory), (  # (copy_kernel:
            name, kernel, [a.shape for a in memory])  # any strides)

for call, _ in calls.values():  # each call once: its index tables are uploaded (from Numba's allocator), and kept
    call()
cuda.device_array = cuda.to_device = None  # from now on a call allocates nothing from Numba
for name, (call, shape) in calls.items():  # on torch's current stream (77)
    launches.clear(), made.clear()
    check(name, call(), shape, 77)
    read = {(a.device_ctypes_pointer.value, a.size) for _, args, _ in launches for a in args if hasattr(a, "gpu_data")}
    inputs = {"depthwise conv2d + bias": (x, w, b), "dense conv2d": (x2, w2), "dense conv2d_weight": (x2, dy2)}
    assert all((t.data_ptr(), t.numel()) in read for t in inputs.get(name, ())), name  # the inputs' memory, whole
assert not interfaced
launches.clear(), made.clear()  # a strided tensor: copied into torch's memory on the device first
strided = put((2, 3, 8, 9)).transpose(2, 3)
check("strided", cnnfast.conv2d(strided, w2, padding=1), (2, 5, 9, 8), 77)
assert launches[0][0] == "copy_kernel" and launches[0][1][1].device_ctypes_pointer.value == made[0][0].data_ptr()
assert interfaced == [strided]
launches.clear(), made.clear()  # a negative view (its memory holds the values un-negated): resolved first
ramp = torch.arange(2 * 3 * 9 * 8, dtype=torch.float32).reshape(2, 3, 9, 8).as_subclass(OnGPU)
negative = torch._neg_view(ramp)
check("negative", cnnfast.conv2d(negative, w2, padding=1), (2, 5, 9, 8), 77)
read = [launch.torch_owner(a) for a in launches[-1][1] if hasattr(a, "gpu_data")]
assert negative.is_neg() and any(t.data_ptr() != ramp.data_ptr() and not t.is_neg() and torch.equal(t, -ramp)
                                 for t in read), read  # (memory of its own holding the values)
for given, stream in ((Stream(55), 55), (0, 0), (cuda.external_stream(66), 66)):  # on a stream given
    launches.clear(), made.clear()
    check(f"stream {stream}", cnnfast.conv2d(x2, w2, padding=1, algo="im2col", stream=given), (2, 5, 9, 8), stream)
    assert current == [0, 77]
try:
    cnnfast.conv2d(x2, w2, stream=Stream(55, "cuda:1"))
except ValueError as e:
    assert str(e) == "conv2d: expected stream to be on the arrays' device cuda:0, but got a stream on cuda:1", e
else:
    raise AssertionError("a torch stream on another GPU was taken")
for name, call, shape in (("no samples", lambda: cnnfast.conv2d(put((0, 3, 9, 8)), w2, padding=1), (0, 5, 9, 8)),
                          ("no input channels", lambda: cnnfast.conv2d(put((2, 0, 9, 8)), put((5, 0, 3, 3))),
                           (2, 5, 7, 6)),
                          ("no bias channels", lambda: grad.conv_bias(put((2, 0, 9, 8))), (0,))):
    out = call()  # (a result of size 0: Numba gives an empty array memory of its own)
    assert type(out) is OnGPU and tuple(out.shape) == shape and (out == 0).all(), (name, type(out), out.shape)
from cnnfast import _torch_ops  # cnnfast.torch's ops run their kernels so (a custom op would unwrap OnGPU)
layer = "conv2d:(1, 1, 1, 1, 'zeros', 'auto')"
for suffix, args, shape in (("", (x2, w2, put((5,))), (2, 5, 9, 8)), ("_input", ((2, 3, 9, 8), w2, dy2), (2, 3, 9, 8)),
                            ("_weight", (x2, (5, 3, 3, 3), dy2), (5, 3, 3, 3))):
    launches.clear(), made.clear()
    check("cnnfast.torch " + suffix, _torch_ops._run(layer, suffix, *args, like=args[0 if suffix == "" else 2]),
          shape, 77)
launches.clear(), made.clear()
check("cnnfast.torch bias_grad", _torch_ops._bias_grad_eager(dy2, False), (5,), 77)
assert tuple(_torch_ops._run(layer, "", put((0, 3, 9, 8)), w2, None, like=x2).shape) == (0, 5, 9, 8)
print("torch memory ok")
"""


def test_a_call_on_torch_tensors_takes_torchs_memory_on_torchs_stream():
    """A call on torch CUDA tensors (here tensors that say so, over host memory: torch is a CPU build here) takes its
    result and workspace from torch's allocator, each allocation on the op's stream: torch's current stream by
    default, else the one given (torch's, Numba's or 0; made current for torch meanwhile, then restored); its
    kernels get the inputs' and those allocations' memory (none from Numba's allocator or CuPy's pool; a contiguous
    input read without __cuda_array_interface__); the result is the allocated tensor, of the op's shape (also one
    of size 0; a negative view read resolved). Every op of the host path's probe, and cnnfast.torch's ops. A torch
    stream on another GPU than the tensors' is refused."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0", "CNNFAST_CUDA_LAUNCH": "numba"}
    done = subprocess.run([sys.executable, "-c", TORCH_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "torch memory ok", done.stderr[-3000:]


def test_numba_launches_are_configured_once_per_grid_and_stream_without_the_low_occupancy_warning(monkeypatch):
    """On a GPU, launch.launch keeps Numba's configured launch per (kernel, grid, block, stream handle), built with
    Numba's low-occupancy NumbaPerformanceWarning ignored (the launchers pick small grids for small problems on
    purpose). Checked with a stand-in for Numba's dispatcher, whose [grid, block, stream] warns as Numba's does for
    under 128 blocks; the simulator's kernel[...] configures the kernel object itself, so there it is not kept."""
    import warnings

    from cnnfast.kernels.cuda import compile as kernel_cache
    from cnnfast.kernels.cuda import launch as launching
    from numba.cuda.core.errors import NumbaPerformanceWarning

    configured, calls = [], []

    class Dispatcher:
        def __getitem__(self, config):
            grid, block, stream = config
            if math.prod(grid if isinstance(grid, tuple) else (grid,)) < 128:
                warnings.warn(NumbaPerformanceWarning("Grid size will likely result in GPU under-utilization"),
                              stacklevel=2)
            configured.append(config)
            return lambda *args: calls.append((config, args))

    def kernel(*args):
        """A stand-in kernel."""

    monkeypatch.setattr(kernel_cache, "jit", lambda pyfunc: Dispatcher())
    monkeypatch.setattr(kernel_cache, "simulating", lambda: False)
    monkeypatch.setattr(launching, "_CONFIGURED", {})
    monkeypatch.setenv(launching.ENV, "numba")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for grid in (4, 4, (2, 3), 4, 256):
            launching.launch(kernel, grid, 64, 0, 1, 2)
    assert not seen, [str(w.message) for w in seen]
    assert configured == [(4, 64, 0), ((2, 3), 64, 0), (256, 64, 0)]
    assert [c for c, _ in calls] == [(4, 64, 0)] * 2 + [((2, 3), 64, 0), (4, 64, 0), (256, 64, 0)]
    assert all(args == (1, 2) for _, args in calls)
    monkeypatch.setattr(kernel_cache, "simulating", lambda: True)
    launching.launch(kernel, 256, 64, 0)
    launching.launch(kernel, 256, 64, 0)
    assert len(configured) == 5  # configured at each launch


@pytest.mark.skipif(not SIM, reason="a fix to Numba's CUDA simulator")
def test_simulated_shared_arrays_are_one_per_line_and_block_even_when_threads_race():
    """launch.py replaces the simulator's cuda.shared.array (a lookup by the calling line, then a creation that two
    threads could both do) with one that creates the array atomically: one array per line of a block, shared by all
    its threads, a separate one per line. Eight threads start together, 500 times, at a 1 us switch interval."""
    import threading

    from cnnfast.kernels.cuda import launch as launching  # noqa: F401 (the fix is made on import, when simulating)
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    def one(shared):
        return shared.array(4, np.float32)

    def race(shared, got, start):
        start.wait()
        got.append(one(shared))

    shared = FakeCUDAShared(0)
    first = one(shared)
    assert one(shared) is first and shared.array(4, np.float32) is not first
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(500):  # unfixed, 2 rounds in 200 gave a thread its own array
            shared, got, start = FakeCUDAShared(0), [], threading.Barrier(8)
            threads = [threading.Thread(target=race, args=(shared, got, start)) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(got) == 8 and all(a is got[0] for a in got)
    finally:
        sys.setswitchinterval(before)


def test_im2col_workspace_chunks_over_the_batch(problem):
    x, w, _ = problem
    y_full = cnnfast.conv2d(cuda.to_device(x), cuda.to_device(w), padding=1, algo="im2col").copy_to_host()
    per_sample = C * 9 * HW * HW * 4
    limit = per_sample + 10  # one sample per chunk
    plan = cnnfast.explain("conv2d", x, w, padding=1, algo="im2col", device="cuda", workspace_limit=limit)
    assert plan.workspace_bytes == per_sample <= limit
    assert im2col.chunk(plan.spec.geometry, 4, limit) == 1
    y_chunked = cnnfast.conv2d(cuda.to_device(x), cuda.to_device(w), padding=1, algo="im2col",
                               workspace_limit=limit).copy_to_host()
    compare.assert_close(y_chunked, reference.conv(x, w, padding=1), "float32")
    np.testing.assert_array_equal(y_chunked, y_full)  # same arithmetic order per output


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_workspace_limits_cut_im2col_chunks_and_weight_gradient_splits(dtype, monkeypatch):
    """A workspace limit under the default's choice: im2col's three primitives in batch chunks of 2 then 1 (the
    backward passes' chunks at n0 > 0: col2im, the weight gradient added to earlier chunks' sums), direct's and
    depthwise's weight-gradient splits cut down to fit their partial sums."""
    itemsize = np.dtype(dtype).itemsize
    xs, ws, kw = (3, 4, 5, 5), (6, 2, 3, 3), dict(padding=1, groups=2)
    limit = 2 * 4 * 9 * 25 * itemsize  # two samples' columns
    g = cnnfast.explain("conv2d", xs, ws, device="cuda", **kw).spec.geometry
    assert im2col.chunk(g, itemsize, limit) == 2
    _three_primitives(xs, ws, kw, dtype, "im2col", workspace_limit=limit)

    xs, ws, kw = (4, 2, 16, 16), (4, 2, 3, 3), dict(padding=1)
    g = cnnfast.explain("conv2d", xs, ws, device="cuda", **kw).spec.geometry
    limit = 2 * 4 * 18 * itemsize  # two splits' partial sums (K x C*R*S)
    assert direct.filter_splits(g, itemsize, None) > 2 == direct.filter_splits(g, itemsize, limit)
    _three_primitives(xs, ws, kw, dtype, "direct", workspace_limit=limit)

    monkeypatch.setattr(depthwise_filter, "MIN_CHUNK", 2)
    xs, ws, kw = (1, 2, 8, 9), (2, 1, 3, 3), dict(padding=1, groups=2)
    g = cnnfast.explain("conv2d", xs, ws, device="cuda", **kw).spec.geometry
    limit = 2 * 2 * 9 * itemsize
    assert depthwise_filter.filter_splits(g, itemsize, None) > 2 == depthwise_filter.filter_splits(g, itemsize, limit)
    _three_primitives(xs, ws, kw, dtype, "depthwise", workspace_limit=limit)


def test_depthwise_output_depths_past_the_grids_y_limit_take_the_thread_per_output_kernels(monkeypatch):
    """plane_kernel's grid has one y per output depth (CUDA's limit 65,535, cut to 2 here): a deeper output runs
    forward_kernel / backward_data_kernel."""
    monkeypatch.setattr(depthwise, "GRID_YZ", 2)
    depthwise._tile_geometry.cache_clear()  # (its key leaves GRID_YZ out)
    try:
        xs, ws, kw = (1, 2, 3, 5, 5), (4, 1, 3, 3, 3), dict(padding=1, groups=2)
        assert "forward_kernel" in cnnfast.explain("conv3d", xs, ws, device="cuda", algo="depthwise", **kw).kernels[0]
        _three_primitives(xs, ws, kw, "float32", "depthwise")
    finally:
        depthwise._tile_geometry.cache_clear()


# Layers an H100 could hold that the CUDA kernels' index arithmetic cannot take: planned (cnnfast.explain, nothing
# allocated), each refused by the algorithm's supports() with a ValueError before any launch (they wrapped a 32-bit
# cursor or range test, or asked for a grid of more than 65,535 row blocks, or a table of ~150 bytes of host memory
# per output position).
TOO_LARGE = [
    ("conv1d_weight", ((1, 2, 2**32 + 64), (1, 2, 1), (1, 1, 2**32 + 64)), {}, "im2col",
     "weight gradient walks a sample's 4,294,967,360 output positions with a 32-bit cursor"),
    ("conv1d", ((1, 256, 1), (2_200_000, 256, 1)), {}, "im2col", "GEMM has 2,200,000 rows per group"),
    ("conv2d_input", ((1, 2_200_000, 3, 3), (8, 2_200_000, 3, 3), (1, 8, 1, 1)), {}, "direct",
     "GEMM has 2,200,000 rows per group"),
    ("conv2d", ((1, 1, 2**32 + 64, 1), (1, 1, 3, 1)), dict(padding=(1, 0)), "depthwise",
     "index tests are 32-bit, and an extent of x or y plus its padding reaches 2\\*\\*31"),
    ("conv2d_weight", ((1, 3, 32768, 32768), (4, 3, 3, 3), (1, 4, 32768, 32768)), dict(padding=1), "direct",
     "weight gradient's table would hold a row per output position, 1,073,741,824"),
    ("conv2d", ((1, 64, 8192, 8192), (64, 64, 3, 3)), dict(padding=1), "direct",
     "table holds 32-bit offsets within a sample and a group, and this layer reaches 4,227,874,818"),
]


@pytest.mark.parametrize("op, shapes, kw, algo, why", TOO_LARGE, ids=[f"{c[0]}-{c[3]}" for c in TOO_LARGE])
def test_layers_beyond_the_kernels_index_arithmetic_are_refused_before_any_launch(op, shapes, kw, algo, why):
    with pytest.raises(ValueError, match=f"^{op}: algo='{algo}' cannot run this problem on cuda: its {why}"):
        cnnfast.explain(op, *shapes, device="cuda", algo=algo, **kw)


def test_auto_takes_im2col_where_directs_tables_cannot_index_the_layer():
    """A weight gradient of 32768 x 32768 output positions per sample: direct's table would take 20 GiB of device
    and ~28 GiB of host memory; im2col runs it within a workspace limit that holds one sample's columns (else a
    ValueError that names both)."""
    shapes, kw = ((1, 3, 32768, 32768), (4, 3, 3, 3), (1, 4, 32768, 32768)), dict(padding=1)
    plan = cnnfast.explain("conv2d_weight", *shapes, device="cuda", workspace_limit=2**37, **kw)
    assert plan.algorithm == "im2col" and plan.reason.startswith("direct cannot index this layer (its weight grad")
    with pytest.raises(ValueError, match=r"algo='im2col' needs at least 115,964,116,992 bytes of workspace, more "
                                         r"than workspace_limit=268,435,456 \(the default\), and algo='direct' "
                                         r"cannot run this problem on cuda: its weight gradient's table"):
        cnnfast.explain("conv2d_weight", *shapes, device="cuda", **kw)


def test_auto_takes_a_depthwise_layer_its_kernels_cannot_index_as_a_dense_one():
    """A depthwise layer past depthwise's 32-bit row tests (padding and stride near 2**31): auto chose depthwise, whose
    refusal then named an algorithm the caller never asked for; im2col computes it, checked against the explicit
    convolution matrix (tests/oracles.py: the reference would materialise the padding)."""
    from oracles import conv_matrix, pattern_matrices

    big = 2 ** 31 - 1
    stride, pads = (big, 2 ** 30), ((big, 0), (1, big))
    rng = np.random.default_rng(12)
    x, w = rng.standard_normal((1, 2, 4, 5)).astype(np.float32), rng.standard_normal((2, 1, 2, 2)).astype(np.float32)
    plan = cnnfast.explain("conv2d", x.shape, w.shape, device="cuda", stride=stride, padding=pads, groups=2)
    assert plan.algorithm == "im2col" and plan.reason.startswith("depthwise cannot index this layer (")
    E, out = pattern_matrices(x.shape, w.shape, stride, pads, (1, 1), 2, "zeros")
    expected = (conv_matrix(w.astype(np.float64), E) @ x.astype(np.float64).ravel()).reshape(1, 2, *out)
    y = cnnfast.conv2d(cuda.to_device(x), cuda.to_device(w), stride=stride, padding=pads, groups=2)
    compare.assert_close(y.copy_to_host(), expected, "float32", "depthwise layer past 32 bits, on auto")


def test_numba_stream_and_check_mode_on_device_arrays():
    """An explicit Numba stream for every op, conv_bias included, under check mode (the reference's comparison
    after the op's stream is synchronised)."""
    stream = cuda.stream()
    with compare.checking():
        _three_primitives((2, 3, 6, 5), (4, 3, 3, 3), dict(padding=1), "float32", "auto", stream=stream)
        rng = np.random.default_rng(5)
        dy = rng.standard_normal((2, 4, 6, 5)).astype(np.float32)
        db = grad.conv_bias(cuda.to_device(dy), stream=stream).copy_to_host(stream=stream)
        stream.synchronize()
    compare.assert_close(db, dy.astype(np.float64).sum((0, 2, 3)), "float32", "conv_bias")
    assert compare.check("conv2d", cuda.to_device(rng.standard_normal((1, 3, 5, 5)).astype(np.float32)),
                         cuda.to_device(rng.standard_normal((2, 3, 3, 3)).astype(np.float32)), algo="im2col").ok


def test_workspace_limit_below_one_sample_is_refused_or_avoided(problem):
    x, w, _ = problem
    with pytest.raises(ValueError, match="needs at least .* bytes of workspace"):
        cnnfast.explain("conv2d", x, w, padding=1, algo="im2col", device="cuda", workspace_limit=100)
    plan = cnnfast.explain("conv2d", x, w, padding=1, device="cuda", workspace_limit=0)
    assert plan.workspace_bytes == 0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_split_reduction_of_the_weight_gradient_is_deterministic(problem, dtype, monkeypatch):
    """Force several splits (tiny MIN_SPLIT): partial sums reduced in order give the same bits every run."""
    x, _, dy = (a.astype(dtype) for a in problem)
    monkeypatch.setattr(direct, "MIN_SPLIT", 8)
    g = cnnfast.explain("conv2d_weight", x, (K, C, 3, 3), dy, padding=1, device="cuda").spec.geometry
    assert direct.filter_splits(g, x.itemsize, None) > 1
    runs = [grad.conv2d_weight(cuda.to_device(x), (K, C, 3, 3), cuda.to_device(dy), padding=1,
                               algo="direct").copy_to_host() for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])
    compare.assert_close(runs[0], reference.conv_weight(x, (K, C, 3, 3), dy, padding=1), dtype)


@pytest.mark.parametrize("algo", ["direct", "im2col"])
def test_more_groups_than_a_grid_holds_run_as_several_launches(algo, monkeypatch):
    """gemm.GRID_Z (CUDA's 65,535) cut to 2: 3 groups, 3 x 4 sub-pixel classes of a stride-2 backward_data and the
    weight gradient's groups x splits run as launches of at most 2 along z, each told its first z: the results of
    one launch, to the bit, and the reference's."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 7, 7)).astype(np.float32)
    w = rng.standard_normal((9, 2, 3, 3)).astype(np.float32)
    opts = dict(stride=2, padding=1, groups=3)
    dy = rng.standard_normal((2, 9, 4, 4)).astype(np.float32)
    monkeypatch.setattr(direct, "MIN_SPLIT", 8)  # (direct's weight gradient in splits too)
    calls = [lambda: cnnfast.conv2d(cuda.to_device(x), cuda.to_device(w), algo=algo, **opts),
             lambda: grad.conv2d_input(x.shape, cuda.to_device(w), cuda.to_device(dy), algo=algo, **opts),
             lambda: grad.conv2d_weight(cuda.to_device(x), w.shape, cuda.to_device(dy), algo=algo, **opts)]
    whole = [call().copy_to_host() for call in calls]
    grids = []
    real = gemm.launches
    monkeypatch.setattr(gemm, "GRID_Z", 2)
    monkeypatch.setattr(gemm, "launches", lambda blocks: grids.append(blocks[2]) or real(blocks))
    cut = [call().copy_to_host() for call in calls]
    assert max(grids) > 2  # some launch was cut
    for a, b in zip(whole, cut):
        np.testing.assert_array_equal(a, b)
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    for out, expected in zip(cut, (reference.conv(x64, w64, **opts), reference.conv_input(x.shape, w64, dy64, **opts),
                                   reference.conv_weight(x64, w.shape, dy64, **opts))):
        compare.assert_close(out, expected, "float32")


@pytest.mark.parametrize("tile, dtype", [("32x64", "float32"), ("64x128", "float32"), ("128x128", "float32"),
                                         ("32x64", "float64")])
def test_pointwise_gemm_reads_the_tensors_in_place(tile, dtype, monkeypatch):
    """A 1x1 unit-stride layer on im2col: no workspace, no im2col/col2im launch (im2col_kernel is never compiled
    here), the three primitives against the reference, groups and a bias; auto picks it."""
    xs, ws, kw = (2, 6, 5, 7), (4, 3, 1, 1), dict(groups=2)
    rng = np.random.default_rng(11)
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in (xs, ws, ws[:1]))
    plan = cnnfast.explain("conv2d", xs, ws, device="cuda", **kw)
    assert plan.algorithm == "im2col" and plan.workspace_bytes == 0 and "pointwise" in plan.kernels[0]
    algo = f"im2col:{tile}"
    launched = []
    real = im2col.launch
    monkeypatch.setattr(im2col, "launch", lambda kernel, *a: launched.append(kernel) or real(kernel, *a))
    y = cnnfast.conv2d(cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), algo=algo, **kw).copy_to_host()
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = grad.conv2d_input(xs, cuda.to_device(w), cuda.to_device(dy), algo=algo, **kw).copy_to_host()
    dw = grad.conv2d_weight(cuda.to_device(x), ws, cuda.to_device(dy), algo=algo, **kw).copy_to_host()
    assert im2col.im2col_kernel not in launched and im2col.col2im_kernel not in launched
    compare.assert_close(y, reference.conv(x, w, b, **kw), dtype, "pointwise forward")
    compare.assert_close(dx, reference.conv_input(xs, w, dy, **kw), dtype, "pointwise backward_data")
    compare.assert_close(dw, reference.conv_weight(x, ws, dy, **kw), dtype, "pointwise backward_filter")


# ---------------------------------------------------------------- backward_data by sub-pixel classes (direct.py)

# (x shape, w shape, options): the stem (7x7/2), DCGAN's 4x4/2, a stride above the kernel (taps-less classes), a
# stride above the input's size (position-less classes), stride and dilation sharing a factor, 3-D
SUBPIXEL = {
    "7x7-s2": ((1, 2, 9, 10), (3, 2, 7, 7), dict(stride=2, padding=3)),
    "4x4-s2": ((2, 3, 8, 8), (4, 3, 4, 4), dict(stride=2, padding=1)),
    "1x1-s3": ((1, 2, 7, 8), (3, 2, 1, 1), dict(stride=3)),
    "s-over-size": ((1, 2, 1, 5), (4, 1, 1, 2), dict(stride=(4, 2), padding=(0, 1), groups=2)),
    "s2-dil2": ((1, 2, 9, 9), (3, 2, 3, 3), dict(stride=2, dilation=2, padding=(2, 1))),
    "3d-s232": ((1, 2, 5, 6, 7), (3, 2, 3, 2, 3), dict(stride=(2, 3, 2), padding=1)),
}


def _subpixel_geometry(name):
    xs, ws, kw = SUBPIXEL[name]
    op = "conv2d_input" if len(xs) == 4 else "conv3d_input"
    y_shape = cnnfast.explain(op.replace("_input", ""), xs, ws, device="cuda", **kw).spec.output_shape
    return cnnfast.explain(op, xs, ws, y_shape, device="cuda", **kw).spec.geometry


@pytest.mark.parametrize("name", sorted(SUBPIXEL))
def test_subpixel_classes_cover_each_position_once_with_only_its_taps(name):
    """Counted independently of the decomposition: per dx position, the taps whose window position is a multiple
    of the stride (the only ones that can meet a dy element); the classes must hold each position once, with
    exactly those taps and the output offsets they read."""
    g = _subpixel_geometry(name)
    sizes, ks = (g.D, g.H, g.W), (g.T, g.R, g.S)
    strides, dils, pads = (g.stride_d, g.stride_h, g.stride_w), (g.dil_d, g.dil_h, g.dil_w), (g.pad_d, g.pad_h, g.pad_w)
    expected = {}
    for pos in np.ndindex(*sizes):
        taps = set()
        for tap in np.ndindex(*ks):
            at = [i + p - t * d for i, p, t, d in zip(pos, pads, tap, dils)]
            if all(a % s == 0 for a, s in zip(at, strides)):
                taps.add((int(np.ravel_multi_index(tap, ks)),) + tuple(a // s for a, s in zip(at, strides)))
        expected[pos] = taps
    seen = {}
    for cls, taps in direct.subpixel_classes(g):
        assert cls[6] == len(taps)
        for i2 in np.ndindex(*cls[3:6]):
            pos = tuple(a + s * i for a, s, i in zip(cls[:3], strides, i2))
            assert pos not in seen and all(p < n for p, n in zip(pos, sizes))
            seen[pos] = {(t, *(o + i for o, i in zip(offs, i2))) for t, *offs in taps}
    assert seen == {pos: {(t, *offs) for t, *offs in taps} for pos, taps in expected.items()}


def test_subpixel_classes_do_a_stride_product_fewer_multiply_adds():
    """The stem's 7x7/2: 16 + 12 + 12 + 9 taps over four classes of a quarter of the positions each (49/4 per
    position, not 49); DCGAN's 4x4/2: 4 taps per class (4 per position, not 16)."""
    assert sorted(cls[6] for cls, _ in direct.subpixel_classes(_subpixel_geometry("7x7-s2"))) == [9, 12, 12, 16]
    assert [cls[6] for cls, _ in direct.subpixel_classes(_subpixel_geometry("4x4-s2"))] == [4, 4, 4, 4]


@pytest.mark.parametrize("name", sorted(SUBPIXEL))
def test_subpixel_backward_data_matches_reference_and_writes_every_position(name, monkeypatch):
    """Through the launcher on a NaN-filled dx: a position no GEMM wrote (a class without taps must still write
    its zeros) stays NaN and fails the comparison. All classes run in one launch, grid z = classes x groups."""
    xs, ws, kw = SUBPIXEL[name]
    g = _subpixel_geometry(name)
    rng = np.random.default_rng(sum(map(ord, name)))
    w = rng.standard_normal(ws).astype(np.float32)
    dy = rng.standard_normal((g.N, g.K) + (g.P, g.Q, g.U)[3 - (len(xs) - 2):]).astype(np.float32)
    dx = cuda.to_device(np.full((g.N, g.C, g.D, g.H, g.W), np.nan, np.float32))
    launches = []
    real = direct.launch
    monkeypatch.setattr(direct, "launch", lambda kernel, grid, *a: launches.append(grid) or real(kernel, grid, *a))
    direct.backward_data(cuda.to_device(dy.reshape(g.y_shape)), cuda.to_device(w.reshape(g.w_shape)), dx, g)
    compare.assert_close(dx.copy_to_host().reshape(xs), reference.conv_input(xs, w, dy, **kw), "float32",
                         f"sub-pixel backward_data {name}")
    assert len(launches) == 1 and launches[0][2] == len(direct.subpixel_classes(g)) * g.groups  # one launch


# + rows wider than one tile (TILE_W): tiles starting at a column that is not a multiple of the stride
DEPTHWISE_STRIDED = dict(SUBPIXEL, **{
    "wide-s2": ((1, 1, 3, 150), (1, 1, 3, 3), dict(stride=2, padding=1)),
    "wide-s3-dil2": ((1, 1, 4, 140), (1, 1, 2, 3), dict(stride=(1, 3), dilation=(1, 2), padding=(0, 2)))})


@pytest.mark.parametrize("fits", ["halo tile", "fallback"])
@pytest.mark.parametrize("name", sorted(DEPTHWISE_STRIDED))
def test_depthwise_strided_backward_data_matches_reference_and_writes_every_position(name, fits, monkeypatch):
    """The sub-pixel geometries above as depthwise layers with channel multiplier 2: plane_kernel's tap walks (and,
    when no halo tile fits, the thread-per-input kernel's) on a NaN-filled dx, so a position no thread wrote
    (one no tap reads must still get its 0) stays NaN and fails the comparison."""
    xs, ws, kw = DEPTHWISE_STRIDED[name]
    ws, kw = (2 * xs[1], 1) + ws[2:], dict(kw, groups=xs[1])
    op = "conv2d" if len(xs) == 4 else "conv3d"
    y_shape = cnnfast.explain(op, xs, ws, device="cuda", **kw).spec.output_shape
    if fits == "fallback":
        monkeypatch.setattr(depthwise, "HALO", 0)
        monkeypatch.setattr(api, "_PLANS", {})  # plans made with the halo tile are not reused
        monkeypatch.setattr(api, "_CALLS", {})
    plan = cnnfast.explain(f"{op}_input", xs, ws, y_shape, device="cuda", algo="depthwise", **kw)
    assert ("plane_kernel" if fits == "halo tile" else "backward_data_kernel") in plan.kernels[0]
    g = plan.spec.geometry
    rng = np.random.default_rng(sum(map(ord, name)))
    w, dy = rng.standard_normal(ws).astype(np.float32), rng.standard_normal(y_shape).astype(np.float32)
    dx = cuda.to_device(np.full(xs, np.nan, np.float32))
    depthwise.backward_data(cuda.to_device(dy), cuda.to_device(w), dx, g)
    compare.assert_close(dx.copy_to_host(), reference.conv_input(xs, w, dy, **kw), "float32",
                         f"depthwise strided backward_data {name} ({fits})")


# depthwise: (x shape, w shape, options); multipliers 1 and 2, strides, dilation with asymmetric padding, padding
# wider than the filter, 1-D, 3-D with more taps than one register pass (TAPS), a plane wider than one tile
DEPTHWISE = {
    "2d-x2": ((2, 3, 7, 9), (6, 1, 3, 3), dict(padding=1, groups=3)),
    "2d-s2": ((1, 4, 9, 8), (4, 1, 3, 3), dict(padding=1, stride=2, groups=4)),
    "2d-dil-asym": ((1, 2, 8, 11), (4, 1, 3, 2), dict(padding=(2, 0), dilation=(2, 3), groups=2)),
    "2d-pad-over-filter": ((1, 2, 5, 5), (2, 1, 2, 2), dict(padding=3, groups=2)),
    "1d-dil8": ((2, 2, 40), (2, 1, 3), dict(padding=8, dilation=8, groups=2)),
    "3d-x2": ((1, 2, 4, 5, 6), (4, 1, 2, 3, 3), dict(padding=1, groups=2)),
    "3d-s2": ((1, 2, 5, 5, 6), (2, 1, 3, 3, 3), dict(padding=1, stride=2, groups=2)),
    "2d-two-tiles": ((1, 1, 3, 70), (1, 1, 3, 3), dict(padding=1)),
}
_ND_OPS = {1: (cnnfast.conv1d, grad.conv1d_input, grad.conv1d_weight),
           2: (cnnfast.conv2d, grad.conv2d_input, grad.conv2d_weight),
           3: (cnnfast.conv3d, grad.conv3d_input, grad.conv3d_weight)}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(DEPTHWISE))
def test_depthwise_kernels_match_reference(name, dtype, monkeypatch):
    """The halo-tile kernels (forward and backward_data, any stride), and the register-tap
    weight gradient with several splits (reduced in order: the same bits twice)."""
    xs, ws, kw = DEPTHWISE[name]
    fwd, bwd_data, bwd_filter = _ND_OPS[len(xs) - 2]
    rng = np.random.default_rng(sum(map(ord, name)))
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in (xs, ws, ws[:1]))
    y = fwd(cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), algo="depthwise", **kw).copy_to_host()
    compare.assert_close(y, reference.conv(x, w, b, **kw), dtype, f"depthwise {name} forward")
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = bwd_data(xs, cuda.to_device(w), cuda.to_device(dy), algo="depthwise", **kw).copy_to_host()
    compare.assert_close(dx, reference.conv_input(xs, w, dy, **kw), dtype, f"depthwise {name} backward_data")
    g = cnnfast.explain("conv2d_weight" if len(xs) == 4 else f"conv{len(xs) - 2}d_weight", xs, ws, y.shape,
                        device="cuda", **kw).spec.geometry
    # 3-4 splits (few blocks: simulator)
    monkeypatch.setattr(depthwise_filter, "MIN_CHUNK", depthwise_filter.filter_items(g) // 3)
    assert depthwise_filter.filter_splits(g, x.itemsize, None) in (3, 4)
    runs = [bwd_filter(cuda.to_device(x), ws, cuda.to_device(dy), algo="depthwise", **kw).copy_to_host()
            for _ in range(2)]
    compare.assert_close(runs[0], reference.conv_weight(x, ws, dy, **kw), dtype, f"depthwise {name} filter")
    np.testing.assert_array_equal(runs[0], runs[1])


# filter_kernel's runs of output rows: the slide builds (stride_h / dil_h filter rows a row: 1 at stride 1 and at
# stride = dilation = 2, 2 at stride 2), the 3x3 build that loads every tap (dilation 2), the generic build
FILTER_RUNS = {
    "slide1-s1": ((2, 3, 8, 9), (6, 1, 3, 3), dict(padding=1, groups=3), 1),
    "slide1-s2-dil2": ((1, 2, 13, 9), (2, 1, 3, 3), dict(padding=2, stride=2, dilation=2, groups=2), 1),
    "slide2-s2": ((1, 2, 14, 8), (2, 1, 3, 3), dict(padding=1, stride=2, groups=2), 2),
    "every-tap-dil2": ((1, 2, 7, 8), (2, 1, 3, 3), dict(padding=2, dilation=2, groups=2), 0),
    "generic-2x3": ((1, 2, 9, 7), (2, 1, 2, 3), dict(padding=1, groups=2), 0),
}


@pytest.mark.parametrize("name", sorted(FILTER_RUNS))
def test_depthwise_filter_threads_walk_runs_of_rows(name, monkeypatch):
    """filter_kernel's items are runs of FILTER_ROWS output rows down a column, here 3: several runs per column,
    the last one short, and two rows a trip. The slide builds take each row's taps, but its filter's last 1 or 2
    rows, from the row above's. A NaN in dy at the first output reaches every tap of its filter, the padding's too
    (0 * NaN, as in the reference). explain() names the build."""
    monkeypatch.setattr(depthwise_filter, "FILTER_ROWS", 3)
    xs, ws, kw, slide = FILTER_RUNS[name]
    g = cnnfast.explain("conv2d", xs, ws, device="cuda", **kw).spec.geometry
    assert depthwise_filter.filter_slides(g) == slide and g.Q > 3 and g.Q % 3
    explained = cnnfast.explain("conv2d_weight", xs, ws, (xs[0], ws[0], g.Q, g.U), device="cuda", algo="depthwise",
                                **kw).kernels[0]
    assert ("3x3 taps compiled in" in explained) == (ws[2:] == (3, 3))
    assert (f"taps slide {slide} filter row" in explained) == (slide > 0), explained
    rng = np.random.default_rng(sum(map(ord, name)))
    x = rng.standard_normal(xs).astype(np.float32)
    dy = rng.standard_normal((xs[0], ws[0], g.Q, g.U)).astype(np.float32)
    dy[0, 0, 0, 0] = np.nan
    expected = reference.conv_weight(x, ws, dy, **kw)
    assert np.isnan(expected[0]).all() and np.isfinite(expected[1:]).all()
    dw = grad.conv2d_weight(cuda.to_device(x), ws, cuda.to_device(dy), algo="depthwise", **kw).copy_to_host()
    compare.assert_close(dw, expected, "float32", f"depthwise {name} backward_filter")


@pytest.mark.parametrize("taps", ["compiled in", "read from the geometry"])
def test_depthwise_3x3_kernels_with_their_filter_size_compiled_in_or_not(taps, monkeypatch):
    """MobileNet's 3x3 (multiplier 2, and stride 2) launches the SPECIALISED (1, 3, 3) builds of plane_kernel
    (forward, backward_data) and filter_kernel, whose tap loops unroll; with the specialisation off, the generic
    builds. All match the reference."""
    monkeypatch.setattr(api, "_PLANS", {})  # plans made here name the build: not kept for other tests
    monkeypatch.setattr(api, "_CALLS", {})
    if taps == "read from the geometry":
        monkeypatch.setattr(depthwise_filter, "SPECIALISED", ())
    keys = []
    real = depthwise.launch
    for module in (depthwise, depthwise_filter):
        monkeypatch.setattr(module, "launch", lambda kernel, *a: keys.append(kernel_key(kernel)) or real(kernel, *a))
    rng = np.random.default_rng(5)
    for name in ("2d-x2", "2d-s2"):
        xs, ws, kw = DEPTHWISE[name]
        x, w = (rng.standard_normal(s).astype(np.float32) for s in (xs, ws))
        explained = cnnfast.explain("conv2d", xs, ws, device="cuda", algo="depthwise", **kw).kernels[0]
        assert ("3x3 taps compiled in" in explained) == (taps == "compiled in")
        y = cnnfast.conv2d(cuda.to_device(x), cuda.to_device(w), algo="depthwise", **kw).copy_to_host()
        compare.assert_close(y, reference.conv(x, w, **kw), "float32", f"depthwise {name} forward ({taps})")
        dy = rng.standard_normal(y.shape).astype(np.float32)
        dx = grad.conv2d_input(xs, cuda.to_device(w), cuda.to_device(dy), algo="depthwise", **kw).copy_to_host()
        compare.assert_close(dx, reference.conv_input(xs, w, dy, **kw), "float32",
                             f"depthwise {name} backward_data ({taps})")
        dw = grad.conv2d_weight(cuda.to_device(x), ws, cuda.to_device(dy), algo="depthwise", **kw).copy_to_host()
        compare.assert_close(dw, reference.conv_weight(x, ws, dy, **kw), "float32",
                             f"depthwise {name} backward_filter ({taps})")
    sizes = ":1x3x3]" if taps == "compiled in" else ":any]"
    built = [k for k in keys if "plane_kernel" in k or "filter_kernel" in k]
    assert len(built) == 6 and all(k.endswith(sizes) for k in built), keys


def test_depthwise_halo_blocks_work_through_several_planes(monkeypatch):
    """A plane_kernel block computes its tile for the planes n*C + c = z, z + slots, ...: here 5 planes in 3 slots
    (2, 2 and 1 per block); or, grouped, for the groups of G planes side by side from z*G, (z + slots)*G, ...: here
    G = 2 of 2 x 7 threads in a 32-thread block, 3 groups in 2 slots (the last group of 1 plane). Forward and
    backward_data at strides 1 and 2, on NaN-filled outputs."""
    monkeypatch.setattr(depthwise, "PLANES", 2)
    monkeypatch.setattr(depthwise, "TARGET_BLOCKS", 1)
    monkeypatch.setattr(depthwise, "BLOCK", 32)
    rng = np.random.default_rng(9)
    xs, ws = (5, 1, 6, 7), (2, 1, 3, 3)  # groups 1 = C: depthwise with multiplier 2
    x, w = rng.standard_normal(xs).astype(np.float32), rng.standard_normal(ws).astype(np.float32)
    grouped = set()
    for kw in (dict(padding=1), dict(padding=1, stride=2)):
        g = cnnfast.explain("conv2d", xs, ws, device="cuda", **kw).spec.geometry
        for primitive in ("forward", "backward_data"):
            tg = depthwise.tile_geometry(g, primitive)
            grouped.add(tg[35])
            assert depthwise.plane_grid(g, tg)[0][2] == (2 if tg[35] == 2 else 3)
        y_shape = (g.N, g.K, g.Q, g.U)
        y = cuda.to_device(np.full(y_shape, np.nan, np.float32))
        depthwise.forward(cuda.to_device(x), cuda.to_device(w), None, y, g)
        compare.assert_close(y.copy_to_host(), reference.conv(x, w, **kw), "float32", f"forward {kw}")
        dy = rng.standard_normal(y_shape).astype(np.float32)
        dx = cuda.to_device(np.full(xs, np.nan, np.float32))
        depthwise.backward_data(cuda.to_device(dy), cuda.to_device(w), dx, g)
        compare.assert_close(dx.copy_to_host(), reference.conv_input(xs, w, dy, **kw), "float32",
                             f"backward_data {kw}")
    assert grouped == {1, 2}  # stride 1 (6x7 planes): grouped; stride 2 (3x4 outputs, a tap walk): not


# small planes side by side in a block (grouped builds: one V = ROWS tile covers a plane), N*C not a multiple of G
DEPTHWISE_GROUPS = {
    "7x7-x2": ((3, 3, 7, 7), (6, 1, 3, 3), dict(padding=1, groups=3)),
    "9x11-s2": ((2, 3, 9, 11), (3, 1, 3, 3), dict(padding=1, stride=2, groups=3)),  # forward only: 5 x 6 outputs
    "valid": ((3, 3, 9, 9), (3, 1, 3, 3), dict(groups=3)),  # a plane's first staged row is data, not padding
    "dil2": ((5, 1, 8, 9), (1, 1, 3, 3), dict(padding=2, dilation=2, groups=1)),
    "3d-x2": ((3, 2, 3, 6, 7), (4, 1, 3, 3, 3), dict(padding=1, groups=2)),
}


@pytest.mark.parametrize("name", sorted(DEPTHWISE_GROUPS))
def test_depthwise_grouped_blocks_hold_several_small_planes(name, monkeypatch):
    """Blocks of 64 threads here, 4 planes of 2 x 7 threads side by side (as 18 are in a 7x7 layer's 256-thread
    blocks): each plane's halo staged after the one before, each thread on its own plane and channel. NaN-filled
    outputs: a plane of a partial last group not written fails the comparison."""
    monkeypatch.setattr(depthwise, "TARGET_BLOCKS", 1)
    monkeypatch.setattr(depthwise, "BLOCK", 64)
    xs, ws, kw = DEPTHWISE_GROUPS[name]
    nd = len(xs) - 2
    g = cnnfast.explain(f"conv{nd}d", xs, ws, device="cuda", **kw).spec.geometry
    primitives = ["forward"] + ["backward_data"] * (not depthwise.walks(g, "backward_data"))
    for primitive in primitives:
        tg = depthwise.tile_geometry(g, primitive)
        assert tg[34] == depthwise.ROWS and 1 < tg[35] < g.N * g.C and g.N * g.C % tg[35], tg
    rng = np.random.default_rng(sum(map(ord, name)))
    x, w = rng.standard_normal(xs).astype(np.float32), rng.standard_normal(ws).astype(np.float32)
    b = rng.standard_normal(ws[:1]).astype(np.float32)
    y_shape = (g.N, g.K) + (g.P, g.Q, g.U)[3 - nd:]
    y = cuda.to_device(np.full(y_shape, np.nan, np.float32))
    depthwise.forward(cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), y, g)
    compare.assert_close(y.copy_to_host(), reference.conv(x, w, b, **kw), "float32", f"forward {name}")
    if "backward_data" in primitives:
        dy = rng.standard_normal(y_shape).astype(np.float32)
        dx = cuda.to_device(np.full(xs, np.nan, np.float32))
        depthwise.backward_data(cuda.to_device(dy), cuda.to_device(w), dx, g)
        compare.assert_close(dx.copy_to_host(), reference.conv_input(xs, w, dy, **kw), "float32",
                             f"backward_data {name}")


# planes taller than one block of thread rows: plane_kernel's threads own ROWS output rows each, the last thread row
# of the plane only some of them (backward_data: at stride 1 along h and w; along d the tap walk is the block's)
DEPTHWISE_ROWS = {
    "forward-s1": ((1, 2, 15, 33), (4, 1, 3, 3), dict(padding=1, groups=2), "forward"),
    "forward-s2": ((1, 1, 45, 64), (2, 1, 3, 3), dict(padding=1, stride=2, groups=1), "forward"),
    "backward-s1": ((1, 2, 21, 64), (4, 1, 3, 3), dict(padding=1, groups=2), "backward_data"),
    "backward-dil2": ((1, 1, 23, 64), (2, 1, 3, 2), dict(padding=(2, 0), dilation=(2, 1), groups=1), "backward_data"),
    "backward-3d-sd2": ((1, 1, 3, 21, 40), (2, 1, 3, 3, 3), dict(padding=1, stride=(2, 1, 1), groups=1),
                        "backward_data"),
}


@pytest.mark.parametrize("op, xs, ws, kw", [
    ("conv2d", (1, 1, 50000, 50000), (1, 1, 2, 2), dict(dilation=63)),
    ("conv2d", (1, 1, 46341, 46341), (1, 1, 2, 2), dict(dilation=63, padding=32)),
    ("conv2d_input", (1, 1, 50000, 50000), (1, 1, 2, 2), dict(dilation=63)),
])
def test_depthwise_halo_tiles_never_ask_for_a_grid_wider_than_cuda_allows(op, xs, ws, kw):
    """A plane of billions of positions whose halo takes only 1x1 tiles asked for more than 2**31 - 1 blocks along x
    (a launch error on a GPU, not a ValueError): such a plane runs the thread-per-output kernel (grid-stride)."""
    g = cnnfast.explain("conv2d", xs, ws, device="cuda", **kw).spec.geometry
    primitive = "forward" if op == "conv2d" else "backward_data"
    assert depthwise.tile_geometry(g, primitive) is None
    shapes = (xs, ws) if op == "conv2d" else (xs, ws, (1, 1, g.Q, g.U))
    assert cnnfast.explain(op, *shapes, device="cuda", **kw).kernels == (f"depthwise {primitive}_kernel [float32]",)
    small = cnnfast.explain("conv2d", (1, 1, 4000, 4000), ws, device="cuda", **kw).spec.geometry
    assert depthwise.plane_grid(small, depthwise.tile_geometry(small, primitive))[0][0] <= depthwise.GRID_X


@pytest.mark.parametrize("name", sorted(DEPTHWISE_ROWS))
def test_depthwise_halo_threads_own_several_output_rows(name):
    """A thread of plane_kernel's ROWS builds sums ROWS output rows at once, each tap's weight read once for them.
    On NaN-filled outputs: a row no thread wrote fails the comparison; a thread's rows past the plane's end must
    not be written (out of bounds)."""
    xs, ws, kw, primitive = DEPTHWISE_ROWS[name]
    nd = len(xs) - 2
    g = cnnfast.explain(f"conv{nd}d", xs, ws, device="cuda", **kw).spec.geometry
    tg = depthwise.tile_geometry(g, primitive)
    dst_rows = g.Q if primitive == "forward" else g.H
    assert tg[34] == depthwise.ROWS > 1 and dst_rows % tg[28] % depthwise.ROWS  # a thread row in part past the end
    assert not depthwise.walks(g, primitive)
    rng = np.random.default_rng(sum(map(ord, name)))
    x, w = rng.standard_normal(xs).astype(np.float32), rng.standard_normal(ws).astype(np.float32)
    y_shape = (g.N, g.K) + (g.P, g.Q, g.U)[3 - nd:]
    if primitive == "forward":
        b = rng.standard_normal(ws[:1]).astype(np.float32)
        y = cuda.to_device(np.full(y_shape, np.nan, np.float32))
        depthwise.forward(cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), y, g)
        compare.assert_close(y.copy_to_host(), reference.conv(x, w, b, **kw), "float32", f"forward {name}")
    else:
        dy = rng.standard_normal(y_shape).astype(np.float32)
        dx = cuda.to_device(np.full(xs, np.nan, np.float32))
        depthwise.backward_data(cuda.to_device(dy), cuda.to_device(w), dx, g)
        compare.assert_close(dx.copy_to_host(), reference.conv_input(xs, w, dy, **kw), "float32",
                             f"backward_data {name}")


def test_depthwise_names_its_kernels_and_falls_back_when_no_halo_tile_fits(monkeypatch):
    xs, ws, kw = DEPTHWISE["2d-x2"]
    plans = {op: cnnfast.explain(op, *shapes, device="cuda", **kw).kernels for op, shapes in (
        ("conv2d", (xs, ws)), ("conv2d_input", (xs, ws, (2, 6, 7, 9))), ("conv2d_weight", (xs, ws, (2, 6, 7, 9))))}
    assert "plane_kernel" in plans["conv2d"][0] and "plane_kernel" in plans["conv2d_input"][0]
    assert "filter_kernel" in plans["conv2d_weight"][0]
    strided = cnnfast.explain("conv2d_input", xs, ws, (2, 6, 4, 5), device="cuda", stride=2, **kw).kernels
    assert "plane_kernel" in strided[0]
    rng = np.random.default_rng(11)
    x, w, dy = (rng.standard_normal(s).astype(np.float32) for s in (xs, ws, (2, 6, 7, 9)))
    monkeypatch.setattr(depthwise, "HALO", 4)  # no tile fits: the thread-per-output kernels
    # (algo= named: a plan not cached above)
    assert "forward_kernel" in cnnfast.explain("conv2d", xs, ws, device="cuda", algo="depthwise", **kw).kernels[0]
    y = cnnfast.conv2d(cuda.to_device(x), cuda.to_device(w), algo="depthwise", **kw).copy_to_host()
    compare.assert_close(y, reference.conv(x, w, **kw), "float32", "depthwise forward fallback")
    dx = grad.conv2d_input(xs, cuda.to_device(w), cuda.to_device(dy), algo="depthwise", **kw).copy_to_host()
    compare.assert_close(dx, reference.conv_input(xs, w, dy, **kw), "float32", "depthwise backward_data fallback")


@pytest.mark.parametrize("algo", ["direct", "im2col"])
def test_repeated_calls_are_bitwise_identical(problem, algo):
    x, w, dy = problem
    for op in (lambda: cnnfast.conv2d(cuda.to_device(x), cuda.to_device(w), padding=1, algo=algo),
               lambda: grad.conv2d_input(x.shape, cuda.to_device(w), cuda.to_device(dy), padding=1, algo=algo)):
        a, b = op().copy_to_host(), op().copy_to_host()
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular", "zeros"])
def test_pad_and_fold_twins_match_numpy(mode):
    rng = np.random.default_rng(3)
    src = rng.standard_normal((2, 3, 1, 5, 4))
    pads = [(0, 0), (2, 1), (1, 3)] if mode != "reflect" else [(0, 0), (2, 1), (1, 2)]
    tables = [np.array(pad_indices(L, lo, hi, mode)) for L, (lo, hi) in zip(src.shape[2:], pads)]
    dst = cuda.device_array((2, 3) + tuple(len(t) for t in tables))
    layout.pad_cuda(cuda.to_device(src), dst, *tables)
    np_mode = {"reflect": "reflect", "replicate": "edge", "circular": "wrap", "zeros": "constant"}[mode]
    expected = np.pad(src, [(0, 0), (0, 0)] + pads, mode=np_mode)
    np.testing.assert_array_equal(dst.copy_to_host(), expected)
    # fold is the adjoint of pad: <pad(a), b> == <a, fold(b)>
    b = rng.standard_normal(expected.shape)
    folded = cuda.device_array(src.shape)
    layout.fold_pad_cuda(cuda.to_device(b), folded, *tables)
    assert np.isclose(np.vdot(expected, b), np.vdot(src, folded.copy_to_host()), rtol=1e-12)


def test_fold_tables_list_each_sources_padded_positions_in_order():
    """layout._inverse (CSR, built by a sort) against its definition, entry by entry; -1 (a zero) reads nothing."""
    rng = np.random.default_rng(4)
    for length in (1, 2, 7, 40):
        table = rng.integers(-1, length, 3 * length + 2)
        starts, items = layout._inverse(table, length)
        for i in range(length):
            assert list(items[starts[i]:starts[i + 1]]) == list(np.flatnonzero(table == i))
        assert starts[-1] == (table >= 0).sum() and len(items) == starts[-1] + 1


def test_index_tables_and_the_zero_bias_are_uploaded_once_per_gpu(problem):
    from cnnfast.kernels.cuda import compile as kernel_cache
    x, w, _ = problem
    dx, dw = cuda.to_device(x), cuda.to_device(w)
    first = cnnfast.conv2d(dx, dw, padding=1, padding_mode="circular", algo="direct")  # pad tables + zero bias
    held = dict(kernel_cache._CONSTANTS)
    again = cnnfast.conv2d(dx, dw, padding=1, padding_mode="circular", algo="direct")
    assert kernel_cache._CONSTANTS == held  # nothing uploaded again: the same device arrays are reused
    assert any(key[1] == "zero" for key in held) and any(key[1] == "pad" for key in held)
    assert any(key[1] == "reduction-table" for key in held)
    cnnfast.conv2d(cuda.to_device(x[:1]), dw, padding=1, padding_mode="circular", algo="direct")
    assert kernel_cache._CONSTANTS == held  # another batch size: the same tables
    np.testing.assert_array_equal(again.copy_to_host(), first.copy_to_host())
    expected = reference.conv(x.astype(np.float64), w.astype(np.float64), padding=1, padding_mode="circular")
    compare.assert_close(first.copy_to_host(), expected, "float32", "circular conv2d, cached device constants")


def test_a_pad_tables_key_is_made_once_per_table():
    """device_constant's key of a pad table is its bytes, made once per read-only table array (a tuple of its entries
    each call took 0.84 ms at 16,000): the same object again, equal for an equal table (a copy, a list); a writable
    table's made each call (a table changed in place kept its old key)."""
    table = np.arange(-1, 16000, dtype=np.int64)
    table.flags.writeable = False  # (as api._pad_arrays keeps them)
    key = layout._content(table)
    assert layout._content(table) is key and layout._content(table.copy()) == key
    assert layout._content(list(table)) == key and layout._content(table[:-1]) != key
    writable = table.copy()  # (may change between calls: its key is made each call)
    layout._content(writable)
    writable[0] = 5
    assert layout._content(writable) != key
    entries = len(layout._CONTENTS)
    del table
    assert len(layout._CONTENTS) == entries - 1  # (a dead table's bytes are not kept)


def test_device_constants_are_bounded_least_recently_used_first(problem, monkeypatch):
    """Tables depend on the input's size: a program of many sizes must not keep one per size for good. Past
    CONSTANT_BYTES the least recently used goes first (one array larger than the bound is kept alone), and a layer
    whose tables keep being dropped uploads them again and computes the same."""
    from cnnfast.kernels.cuda import compile as kernel_cache
    monkeypatch.setattr(kernel_cache, "_CONSTANTS", type(kernel_cache._CONSTANTS)())
    monkeypatch.setattr(kernel_cache, "_constant_bytes", 0)
    monkeypatch.setattr(kernel_cache, "CONSTANT_BYTES", 100)
    ints = lambda n: (lambda: np.arange(n, dtype=np.int32))  # noqa: E731 (n * 4 bytes)
    first = kernel_cache.device_constant(("t", 1), ints(10))
    kernel_cache.device_constant(("t", 2), ints(10))
    assert kernel_cache.device_constant(("t", 1), lambda: pytest.fail("uploaded again")) is first  # now the newest
    kernel_cache.device_constant(("t", 3), ints(10))  # 120 bytes: ("t", 2) goes
    assert [key[1:] for key in kernel_cache._CONSTANTS] == [("t", 1), ("t", 3)] and kernel_cache._constant_bytes == 80
    np.testing.assert_array_equal(first.copy_to_host(), np.arange(10))
    kernel_cache.device_constant(("t", 4), ints(50))
    assert [key[1:] for key in kernel_cache._CONSTANTS] == [("t", 4)] and kernel_cache._constant_bytes == 200
    x, w, _ = problem
    dx, dw = cuda.to_device(x), cuda.to_device(w)
    expected = reference.conv(x.astype(np.float64), w.astype(np.float64), padding=1, padding_mode="circular")
    for _ in range(2):
        out = cnnfast.conv2d(dx, dw, padding=1, padding_mode="circular", algo="direct")
        compare.assert_close(out.copy_to_host(), expected, "float32", "circular conv2d, tables dropped and uploaded")


def test_bias_grad_twin():
    dy = np.random.default_rng(4).standard_normal((3, 5, 2, 3, 4))
    db = cuda.device_array(5)
    layout.bias_grad_cuda(cuda.to_device(dy), db)
    np.testing.assert_allclose(db.copy_to_host(), dy.sum(axis=(0, 2, 3, 4)), rtol=1e-12)
    out = grad.conv_bias(cuda.to_device(dy.reshape(3, 5, 24)))
    np.testing.assert_allclose(out.copy_to_host(), reference.conv_bias(dy.reshape(3, 5, 24)), rtol=1e-12)


# (1, 2, 725): 3 splits of 242 that do not divide the 725 elements: catches a last split summed past N*L
@pytest.mark.parametrize("shape", [(2, 2, 500), (5, 3, 100), (2, 1, 1), (1, 2, 725)])
def test_bias_grad_splits_are_deterministic(shape, monkeypatch):
    """Forced splits that start and end inside rows (500 and 100 elements), rows shorter than the block (a thread
    steps over several samples at once) and a single element: the reference sum, the same bits twice."""
    monkeypatch.setattr(layout, "MIN_SPLIT", 240)
    N, K, L = shape
    assert layout.bias_grad_splits(N, K, L) == max(1, N * L // 240)  # 4, 2, 1 and 3
    dy = np.random.default_rng(L).standard_normal(shape).astype(np.float32)
    runs = [grad.conv_bias(cuda.to_device(dy)).copy_to_host() for _ in range(2)]
    compare.assert_close(runs[0], reference.conv_bias(dy), "float32", f"bias gradient {shape}")
    np.testing.assert_array_equal(runs[0], runs[1])


def test_non_contiguous_device_input():
    x = np.random.default_rng(5).standard_normal((2, 6, 8, 8))
    w = np.random.default_rng(6).standard_normal((3, 3, 3, 3))
    x_dev = cuda.to_device(x)[:, ::2]
    y = cnnfast.conv2d(x_dev, cuda.to_device(w), padding=1).copy_to_host()
    compare.assert_close(y, reference.conv(x[:, ::2], w, padding=1), "float64")


def test_numpy_row_stack_shim_lets_kernels_compile_without_it():
    """numba-cuda 0.30.4 needs numpy.row_stack, which numpy 2.5 removed: with the alias deleted (as on
    numpy >= 2.5), importing cnnfast's CUDA kernels restores it and a kernel still compiles to PTX."""
    code = ("import numpy as np\n"
            "if hasattr(np, 'row_stack'): del np.row_stack\n"
            "import cnnfast.kernels.cuda\n"
            "from numba import cuda, types\n"
            "from cnnfast.kernels.cuda.bias import add_bias_kernel\n"
            "a = types.float32[::1]\n"
            "ptx, _ = cuda.compile_ptx(add_bias_kernel, (a, a, types.int64, types.int64, types.int64), cc=(9, 0))\n"
            "print(np.row_stack is np.vstack, '.version 9.0' in ptx)\n")
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, NUMBA_ENABLE_CUDASIM="0"),
                          capture_output=True, text=True, timeout=600)
    reason = _no_gpu_compiler(done)
    if reason:
        pytest.skip(reason)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "True"]


def test_compile_ptx_compiles_the_helpers_for_its_target_without_a_driver():
    """compile.compile_ptx: a kernel that calls helpers (im2col_kernel: x_patch) compiles to sm_90 PTX with every
    helper inlined, the helpers compiled for the kernel's target whatever GPU or driver the machine has (here
    none needed), and numba-cuda's own question for the current device is put back afterwards."""
    code = ("import re\n"
            "from numba import types\n"
            "from numba.cuda import api, dispatcher\n"
            "from cnnfast.kernels.cuda import compile, gemm, im2col\n"
            "a = types.float32[::1]\n"
            "geo = types.UniTuple(types.int64, gemm.NGEO)\n"
            "ptx = compile.compile_ptx(im2col.im2col_kernel, (a, a, geo, types.int64, types.int64), (9, 0))\n"
            "print('.target sm_90' in ptx, re.search(r'^\\s+call', ptx, re.M) is None,\n"
            "      dispatcher.get_current_device is api.get_current_device)\n")
    done = _python_without_simulator(["-c", code])
    reason = _no_gpu_compiler(done)
    if reason:
        pytest.skip(reason)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "True", "True"]


def test_raw_fallbacks_name_the_kernels_left_on_numbas_dispatcher(monkeypatch):
    """What cnnfast bench reports when a kernel's PTX did not load on the raw path (its launches then ran on Numba's
    dispatcher): those kernels, by name, and none of the loaded ones."""
    from cnnfast.kernels.cuda import launch as launching

    def fell_back():
        pass

    def loaded():
        pass
    monkeypatch.setattr(launching, "_FUNCTIONS", {(fell_back, ("<f4",), 0): None, (loaded, ("<f4",), 0): object()})
    assert [name.rsplit(".", 1)[-1] for name in launching.raw_fallbacks()] == ["fell_back"]


# ---------------------------------------------------------------- several blocks and items: paths the grid misses

@pytest.mark.parametrize("algo, xs, ws", [("direct:8x64", (2, 12, 4, 5), (12, 12, 3, 3)),
                                          ("direct:32x64", (1, 36, 3, 4), (36, 36, 1, 2)),
                                          ("im2col:32x64", (1, 3, 4, 5), (40, 3, 3, 3))])
def test_gemm_with_several_row_blocks(algo, xs, ws):
    """More rows than one tile (K/g, and direct's C/g, > BM, the last row block partial) and, for direct's weight
    gradient, more columns than one (C/g*TRS > BN): catches a block's row offset m0 dropped or mis-scaled in the
    GEMM's staging (every other direct test, and im2col's forward and weight gradient, have at most 6 rows per
    group: one row block)."""
    g = cnnfast.explain("conv2d", xs, ws, device="cuda", padding=1).spec.geometry
    t = gemm.TILES[algo.split(":")[1]]
    assert g.K > t.BM and g.K % t.BM and (algo.startswith("im2col") or g.C > t.BM and g.C % t.BM)
    _three_primitives(xs, ws, dict(padding=1), "float32", algo, seed=5)


def test_depthwise_filter_threads_take_several_items(monkeypatch):
    """More reduction items than filter_kernel's FILTER_BLOCK threads in one split: each thread steps its item
    (n, p, b, u) by the block's digits with carries, and threads past half the block hold sums for the tree; catches
    a wrong carry radix or a tree that drops threads (every other test has under 128 items per split)."""
    monkeypatch.setattr(depthwise_filter, "FILTER_ROWS", 3)
    xs, ws, kw = (2, 2, 8, 45), (4, 1, 3, 3), dict(padding=1, groups=2)
    g = cnnfast.explain("conv2d", xs, ws, device="cuda", **kw).spec.geometry
    assert depthwise_filter.filter_splits(g, 4, None) == 1
    assert depthwise_filter.filter_items(g) > 2 * depthwise_filter.FILTER_BLOCK
    rng = np.random.default_rng(22)
    x = rng.standard_normal(xs).astype(np.float32)
    dy = rng.standard_normal((g.N, g.K, g.Q, g.U)).astype(np.float32)
    dw = grad.conv2d_weight(cuda.to_device(x), ws, cuda.to_device(dy), algo="depthwise", **kw).copy_to_host()
    compare.assert_close(dw, reference.conv_weight(x, ws, dy, **kw), "float32", "depthwise filter, many items")
