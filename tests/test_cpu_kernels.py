"""CPU-specific checks: im2col workspace chunking, bitwise determinism, the auto cost model (choose) against
its docstring, the layout twins against NumPy, and every CPU algorithm agreeing with the others on the grid.
Correctness of every algorithm against the reference over the grid is tests/test_ops.py. Small shapes: the
kernels compile once per process."""
import math
import os
import re
import sys

import numba
import numpy as np
import pytest
from cnnfast.kernels.cpu import ALGORITHMS, bias_grad_cpu, blas, choose, fold_pad_cpu, im2col, pad_cpu, threads
from layers import OP_NAMES as OPS
from layers import Layer

import cnnfast
from cnnfast import grad, reference
from cnnfast.compare import assert_close, relative_error
from cnnfast.validate import CASES, case_spec, problem

# the tests that cut a GEMM in two parts on Numba's threads (blas._on_numba_threads runs none with fewer threads)
two_numba_threads = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads "
                                       "(a one-core machine, or NUMBA_NUM_THREADS=1: no GEMM is cut then)")

CPU_ALGOS = tuple(ALGORITHMS)  # direct, im2col, depthwise, winograd: the kernels, not the float64 reference



# ---------------------------------------------------------------- 1. im2col workspace chunking

CHUNK_LAYERS = {
    "2d-pad1": dict(x_shape=(2, 8, 6, 7), w_shape=(8, 8, 3, 3), padding=1),
    "2d-s2-dil-groups2-asym": dict(x_shape=(2, 8, 9, 7), w_shape=(8, 4, 3, 2), stride=(2, 1),
                                   padding=((1, 2), (0, 1)), dilation=(1, 2), groups=2),
}


def _layer(name):
    spec = dict(CHUNK_LAYERS[name])
    return Layer(spec.pop("x_shape"), spec.pop("w_shape"), **spec)


def _smallest_accepted_limit(layer, primitive, algo="im2col"):
    """The smallest workspace_limit explain accepts for algo (bisection over the public API)."""
    full = layer.explain(primitive, algo=algo).workspace_bytes
    lo, hi = 0, full  # hi is accepted (the unlimited plan's scratch); find the smallest accepted value
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            layer.explain(primitive, algo=algo, workspace_limit=mid)
            hi = mid
        except ValueError:
            lo = mid + 1
    return lo, full


def _spy_blocks(monkeypatch, primitive):
    """Record (samples, channel offset, first output position, block width, rows) of every column block built."""
    calls = []
    name = "col2im_cpu" if primitive == "backward_data" else "im2col_cpu"
    real = getattr(im2col, name)

    def spy(*args):
        # im2col_cpu(x, n0, c0, cols, taps, o0, ...) / col2im_cpu(dcols, dx, n0, c0, taps, o0, ...)
        cols, n0, c0, o0 = (args[0], *args[2:4], args[5]) if name == "col2im_cpu" else (args[3], *args[1:3], args[5])
        rows, nb, B = cols.shape
        calls.append((tuple(range(n0, n0 + nb)), c0, o0, B, rows))
        return real(*args)
    monkeypatch.setattr(im2col, name, spy)
    return calls


@pytest.mark.parametrize("which", ["smallest", "third"])
@pytest.mark.parametrize("primitive", list(OPS))
@pytest.mark.parametrize("layer_name", list(CHUNK_LAYERS))
def test_im2col_under_a_small_workspace_limit_builds_column_blocks_and_matches(layer_name, primitive, which,
                                                                               monkeypatch):
    layer = _layer(layer_name)
    smallest, full = _smallest_accepted_limit(layer, primitive)
    limit = smallest if which == "smallest" else smallest + (full - smallest) // 3
    assert limit < full  # the unlimited plan does not fit: the columns must be chunked

    plan = layer.explain(primitive, algo="im2col", workspace_limit=limit)
    assert plan.algorithm == "im2col" and plan.workspace_limit == limit
    assert 0 < plan.workspace_bytes <= limit

    unlimited = layer.run(primitive, algo="im2col")
    calls = _spy_blocks(monkeypatch, primitive)
    chunked = layer.run(primitive, algo="im2col", workspace_limit=limit)

    # the column blocks tile every (sample, group)'s output positions [0, O) in order, in several blocks
    O = int(np.prod(layer.dy.shape[2:]))
    per_task = {}
    for samples, c0, o0, B, rows in calls:
        for n in samples:
            per_task.setdefault((n, c0), []).append((o0, B))
        assert rows * len(samples) * B * layer.x.itemsize <= limit  # the column block alone fits the limit
    groups = layer.opts.get("groups", 1)
    assert len(per_task) == layer.x.shape[0] * groups
    assert len(calls) > groups  # chunked: more than one block per group
    for blocks in per_task.values():
        assert [o0 for o0, _ in blocks] == list(np.cumsum([0] + [B for _, B in blocks[:-1]]))
        assert sum(B for _, B in blocks) == O

    assert_close(chunked, layer.expected(primitive), "float64", f"{OPS[primitive]} im2col limit={limit}")
    assert_close(chunked, unlimited, "float64", f"{OPS[primitive]} chunked vs unlimited")


@pytest.mark.parametrize("limit", [np.int8(100), np.uint8(0), np.int16(1000), np.uint64(0), np.int64(10_000)])
def test_numpy_int_workspace_limits_plan_and_run_like_python_ints(limit):
    """Auto and the algorithms with a workspace (whose planners' arithmetic would overflow a NumPy int8): the same
    plan, or the same refusal, as for the Python int."""
    layer = Layer((2, 4, 9, 9), (6, 4, 3, 3), padding=1)
    for primitive in OPS:
        plan = layer.explain(primitive, workspace_limit=limit)
        assert plan.workspace_bytes <= int(limit) and plan == layer.explain(primitive, workspace_limit=int(limit))
        assert type(plan.workspace_limit) is int
        assert_close(layer.run(primitive, workspace_limit=limit), layer.expected(primitive), "float64", primitive)
        for algo in ("im2col", "winograd"):
            try:
                expected = layer.explain(primitive, algo=algo, workspace_limit=int(limit))
            except ValueError as e:
                with pytest.raises(ValueError, match=re.escape(str(e))):
                    layer.run(primitive, algo=algo, workspace_limit=limit)
            else:
                assert layer.explain(primitive, algo=algo, workspace_limit=limit) == expected


@pytest.mark.parametrize("primitive", list(OPS))
def test_workspace_limit_below_the_minimum_is_refused_by_im2col_and_avoided_by_auto(primitive):
    layer = _layer("2d-pad1")
    smallest, _ = _smallest_accepted_limit(layer, primitive)
    assert smallest > 0
    too_small = smallest - 1
    with pytest.raises(ValueError, match="workspace_limit"):
        layer.explain(primitive, algo="im2col", workspace_limit=too_small)
    with pytest.raises(ValueError, match="workspace_limit"):
        layer.run(primitive, algo="im2col", workspace_limit=too_small)

    layer = Layer((1, 40, 20, 20), (40, 40, 3, 3), padding=1)  # 40 channels: winograd's weight gradient too
    auto = layer.explain(primitive).algorithm  # auto picks winograd here without a limit...
    assert auto == "winograd"
    too_small = _smallest_accepted_limit(layer, primitive, auto)[0] - 1
    below_im2col = _smallest_accepted_limit(layer, primitive, "im2col")[0] - 1
    assert below_im2col < too_small
    # ...falls back to im2col (Winograd's GEMMs without the transforms, in blocks), then to direct (its wide kernels'
    # scratch where it fits)
    for limit, fallback in ((too_small, "im2col"), (below_im2col, "direct")):
        plan = layer.explain(primitive, workspace_limit=limit)
        assert plan.algorithm == fallback and plan.workspace_bytes <= limit
        assert plan.reason.endswith(f"exceeds workspace_limit={limit:,}, so {fallback}"), plan.reason
        out = layer.run(primitive, workspace_limit=limit)
        assert_close(out, layer.expected(primitive), "float64", f"{OPS[primitive]} auto, limit={limit}")


# im2col_cpu's and col2im_cpu's shifted planes (whole samples, U == W, unit strides along H and W) against their
# row-by-row paths and a NumPy oracle: x (N, C, D, H, W), taps (T, R, S), strides, dilations, low = high pads
SHIFTED_LAYERS = {
    "3x3 same": ((2, 3, 1, 7, 6), (1, 3, 3), (1, 1, 1), (1, 1, 1), (0, 1, 1)),
    "5x5 dilation 2": ((2, 2, 1, 9, 8), (1, 5, 5), (1, 1, 1), (1, 2, 2), (0, 4, 4)),
    "3x3x3 depth stride 2": ((1, 2, 5, 6, 6), (3, 3, 3), (2, 1, 1), (1, 1, 1), (1, 1, 1)),
    "1-D dilation 8": ((2, 3, 1, 1, 40), (1, 1, 3), (1, 1, 1), (1, 1, 8), (0, 0, 8)),
    "output rows of padding only": ((1, 2, 1, 3, 5), (1, 3, 3), (1, 1, 1), (1, 1, 1), (0, 4, 1)),
    "a tap reading padding only": ((1, 2, 1, 4, 4), (1, 3, 3), (1, 1, 1), (1, 5, 5), (0, 5, 5)),
    "3x3 dilations 1 and 2": ((2, 2, 1, 8, 9), (1, 3, 3), (1, 1, 1), (1, 1, 2), (0, 1, 2)),  # rows' reach != columns'
}


def _shifted_problem(name):
    x_shape, taps, strides, dils, pads = SHIFTED_LAYERS[name]
    outs = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, k, s, d, p in zip(x_shape[2:], taps, strides, dils, pads))
    assert outs[2] == x_shape[4] and strides[1:] == (1, 1)  # the shifted paths' condition
    return x_shape, taps, strides, dils, pads, outs, (*strides, *dils, *pads)


def _columns_oracle(x, taps, strides, dils, pads, outs):
    """cols (C*T*R*S, N, P*Q*U) by NumPy slicing of the zero-padded x."""
    xp = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in pads])
    N, C = x.shape[:2]
    rows = []
    for c in range(C):
        for t in range(taps[0]):
            for r in range(taps[1]):
                for s in range(taps[2]):
                    at = [k * d for k, d in zip((t, r, s), dils)]
                    view = xp[:, c, at[0]:at[0] + strides[0] * (outs[0] - 1) + 1:strides[0],
                              at[1]:at[1] + strides[1] * (outs[1] - 1) + 1:strides[1],
                              at[2]:at[2] + strides[2] * (outs[2] - 1) + 1:strides[2]]
                    rows.append(view.reshape(N, -1))
    return np.stack(rows)


@pytest.mark.parametrize("build", ["parallel", "serial"])
@pytest.mark.parametrize("name", list(SHIFTED_LAYERS))
def test_im2col_shifted_planes_match_the_row_path_and_numpy(name, build):
    """A whole-sample block takes im2col_cpu's shifted path, blocks of part of a sample its row path: the same
    columns, bit for bit, and those of NumPy slicing (NaN and inf carried as values)."""
    x_shape, taps, strides, dils, pads, outs, args = _shifted_problem(name)
    x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
    x.flat[[1, 7]] = np.nan, np.inf
    kernel = im2col.im2col_cpu if build == "parallel" else im2col.im2col_cpu.serial
    rows, O, tp = x_shape[1] * int(np.prod(taps)), int(np.prod(outs)), np.array(taps, np.int64)
    whole = np.full((rows, x_shape[0], O), 5.0, np.float32)
    kernel(x, 0, 0, whole, tp, 0, *args, outs[1], outs[2])
    expected = _columns_oracle(x, taps, strides, dils, pads, outs)
    np.testing.assert_array_equal(whole, expected)
    B = max(1, O // 3)
    for n in range(x_shape[0]):
        for o0 in range(0, O, B):
            part = np.full((rows, 1, min(B, O - o0)), 5.0, np.float32)
            kernel(x, n, 0, part, tp, o0, *args, outs[1], outs[2])
            np.testing.assert_array_equal(part[:, 0], whole[:, n, o0:o0 + B])


def test_out_range_stays_within_the_outputs():
    """out_range's [lo, hi) lies in [0, n_out] for every tap, also one that reads only the padding (lo used to be
    past n_out there, and _shifted_plane zeroed lo * U elements from its plane's start: past its end)."""
    from cnnfast.kernels.cpu.direct import out_range
    for pad, offset, stride, length, n_out in np.ndindex(7, 7, 3, 5, 6):
        lo, hi = out_range(pad, offset, stride + 1, length, n_out)
        inside = [o for o in range(n_out) if 0 <= o * (stride + 1) - pad + offset < length]
        assert 0 <= lo <= hi <= n_out and list(range(lo, hi)) == inside, (pad, offset, stride + 1, length, n_out)


def test_shifted_plane_writes_only_its_plane():
    """The 'tap reading padding only' layer's first tap row (dilation 5, padding 5 on 4x4: no output row reads
    inside x): its 16-element plane is zeroed and the elements after it are left alone."""
    H = U = Q = 4
    q_lo, q_hi = im2col.out_range(5, 0, 1, H, Q)
    u_lo, u_hi = im2col.out_range(5, 0, 1, U, U)
    buf = np.full(2 * Q * U, 5.0, np.float32)
    im2col._shifted_plane(buf[:Q * U], np.ones(H * U, np.float32), -5 * U - 5, q_lo, q_lo, u_lo, u_hi, U)
    np.testing.assert_array_equal(buf, [0.0] * (Q * U) + [5.0] * (Q * U))


@pytest.mark.parametrize("build", ["parallel", "serial"])
@pytest.mark.parametrize("name", list(SHIFTED_LAYERS))
def test_col2im_by_plane_matches_the_row_path_bitwise_and_numpy(name, build):
    """col2im_cpu by (sample, channel) plane and by dx row: the same dx, bit for bit (NaN and inf in dcols, where
    they are summed and where they stand for padding), and NumPy's adjoint of the columns oracle (np.add.at)."""
    x_shape, taps, strides, dils, pads, outs, args = _shifted_problem(name)
    rng = np.random.default_rng(1)
    N, C = x_shape[:2]
    dcols = rng.standard_normal((C * int(np.prod(taps)), N, int(np.prod(outs)))).astype(np.float32)
    dcols.flat[[3, 11, 40]] = np.nan, np.inf, -np.inf
    kernel = im2col.col2im_cpu if build == "parallel" else im2col.col2im_cpu.serial
    results = []
    for by_plane in (True, False):
        dx = np.zeros(x_shape, np.float32)
        kernel(dcols.copy(), dx, 0, 0, np.array(taps, np.int64), 0, *args, *outs, by_plane)
        results.append(dx)
    np.testing.assert_array_equal(results[0], results[1])
    assert not np.signbit(results[0][results[0] == 0]).any()
    # the adjoint by NumPy: each column value added at the padded x position it was read from, then cropped
    index = _columns_oracle(np.arange(N * C * int(np.prod(x_shape[2:])), dtype=np.float64).reshape(x_shape) + 1,
                            taps, strides, dils, pads, outs)  # 1-based x positions, 0 where padding was read
    flat = np.zeros(N * C * int(np.prod(x_shape[2:])) + 1)
    np.add.at(flat, index.astype(np.int64).ravel(), dcols.astype(np.float64).ravel())
    np.testing.assert_allclose(results[0], flat[1:].reshape(x_shape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("limit", [None, 3_000])  # one block, or blocks of a few positions (added up)
@pytest.mark.parametrize("w_shape", [(6, 8, 3, 3), (16, 2, 1, 3)])  # K/g < CTRS (72): transposed; 16 > 6: not
def test_weight_gradient_product_either_way_round_matches_the_reference(w_shape, limit, monkeypatch):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, w_shape[1], 9, 10)).astype(np.float32)
    dy = rng.standard_normal((3, w_shape[0], 10 - w_shape[2], 11 - w_shape[3])).astype(np.float32)
    expected = reference.conv_weight(x, w_shape, dy)
    results = []
    for transposed_product in (im2col.TRANSPOSED_PRODUCT, 0):
        monkeypatch.setattr(im2col, "TRANSPOSED_PRODUCT", transposed_product)
        results.append(grad.conv2d_weight(x, w_shape, dy, algo="im2col", workspace_limit=limit))
        assert_close(results[-1], expected, "float32", f"conv2d_weight {w_shape}")
    if w_shape[0] >= w_shape[1] * w_shape[2] * w_shape[3]:  # not transposed either way: the same computation
        np.testing.assert_array_equal(*results)


@pytest.mark.parametrize("primitive", list(OPS))
@pytest.mark.parametrize("x_shape, samples_per_block", [
    ((8, 64, 56, 56), 2),    # one sample's scratch is 8.0 MB: two fit PREFERRED_SCRATCH (16 MiB)
    ((2, 64, 112, 112), 1),  # 32 MB per sample: one whole sample, over the preference, under the limit
])
def test_im2col_blocks_hold_the_samples_that_fit_the_preferred_scratch(x_shape, samples_per_block, primitive):
    g = cnnfast.ConvSpec.create("conv2d", x_shape, (64, 64, 3, 3), padding=1).geometry
    nb, B = im2col._block(g, primitive, 4, None)
    assert (nb, B) == (samples_per_block, g.P * g.Q * g.U)  # whole samples, never a split one
    scratch = im2col._scratch(g, primitive, 4, nb, B)
    assert scratch <= im2col.DEFAULT_WORKSPACE_LIMIT
    assert nb == 1 or scratch <= im2col.PREFERRED_SCRATCH
    assert im2col._block(g, primitive, 4, 2 * scratch) == (nb, B)  # a larger limit does not grow the block


@pytest.mark.parametrize("primitive", list(OPS))
def test_im2col_last_block_of_samples_may_be_smaller(primitive):
    """Five samples under a limit that fits two: blocks of 2, 2 and 1, the last one's columns only its own (every
    other test's blocks divide the batch)."""
    layer = Layer((5, 3, 6, 7), (4, 3, 3, 3), padding=1)
    g = layer.explain(primitive, algo="im2col").spec.geometry
    limit = im2col._scratch(g, primitive, 8, 2, g.P * g.Q * g.U)
    blocks, _, _ = im2col._blocks(g, primitive, 8, limit)
    assert [nb for _, nb, _, _ in blocks()] == [2, 2, 1]
    assert_close(layer.run(primitive, algo="im2col", workspace_limit=limit), layer.expected(primitive), "float64",
                 "blocks of 2, 2 and 1")


@pytest.mark.parametrize("primitive", list(OPS))
def test_im2col_cuts_a_sample_past_the_sample_scratch_into_blocks_of_positions(primitive, monkeypatch):
    """A sample whose block would exceed SAMPLE_SCRATCH runs in blocks of positions within it (blocks start
    mid-row), and the result matches the reference (float64; the limits scaled down for a small layer)."""
    monkeypatch.setattr(im2col, "SAMPLE_SCRATCH", 256 << 10)
    monkeypatch.setattr(im2col, "SPLIT_POSITIONS", 64)
    layer = Layer((2, 8, 30, 31), (16, 8, 3, 3), padding=1, stride=(1, 2))
    g = layer.explain(primitive).spec.geometry
    nb, B = im2col._block(g, primitive, 8, None)
    O = g.P * g.Q * g.U
    assert nb == 1 and im2col.SPLIT_POSITIONS <= B < O and O % B and B % g.U
    assert im2col._scratch(g, primitive, 8, 1, B) <= im2col.SAMPLE_SCRATCH < im2col._scratch(g, primitive, 8, 1, O)
    assert_close(layer.run(primitive, algo="im2col"), layer.expected(primitive), "float64", f"{primitive} blocks")


@pytest.fixture
def plans_for_one_thread(monkeypatch):
    """Depthwise plans as on one thread, where any block of LANES channels is a task for every thread: the lanes
    kernels then take layers of a few channels and one sample (they still run on all of Numba's threads)."""
    from cnnfast.kernels.cpu import depthwise
    monkeypatch.setattr(cnnfast.api, "_PLANS", {})
    monkeypatch.setattr(cnnfast.api, "_CALLS", {})
    monkeypatch.setattr(depthwise, "_threads", lambda: 1)


@pytest.mark.parametrize("primitive", list(OPS))
@pytest.mark.parametrize("opts", [
    dict(padding=1, groups=8),                                    # 3x3, same size
    dict(padding=((2, 0), (1, 3)), dilation=(2, 1), groups=8),   # asymmetric padding, dilation
    dict(padding=0, groups=4),                                    # channel multiplier 2 (w has 8 = 2 x 4 rows)
])
def test_unit_stride_depthwise_runs_the_wide_plane_kernel_and_falls_back_under_a_small_limit(primitive, opts,
                                                                                            monkeypatch):
    from cnnfast.kernels.cpu import depthwise
    channels = opts["groups"]
    layer = Layer((2, channels, 19, 18), (8, 1, 3, 3), **opts)  # planes of > LANES_FILTER_POSITIONS: not the lanes
    calls = []

    def spy(name):
        real = getattr(depthwise, name)
        return lambda *args: calls.append(name) or real(*args)

    for name in ("depthwise_wide_cpu", "depthwise_wide_filter_cpu"):
        monkeypatch.setattr(depthwise, name, spy(name))

    plan = layer.explain(primitive, algo="depthwise")
    assert plan.workspace_bytes > 0 and plan.kernels[0].startswith("depthwise_wide_")
    wide = layer.run(primitive, algo="depthwise")
    assert calls == [plan.kernels[0].split()[0]]  # one launch of the kernel explain() names
    assert_close(wide, layer.expected(primitive), "float64", f"{OPS[primitive]} depthwise wide")

    rows = layer.run(primitive, algo="depthwise", workspace_limit=plan.workspace_bytes - 1)
    assert len(calls) == 1 and layer.explain(primitive, algo="depthwise", workspace_limit=0).workspace_bytes == 0
    assert_close(rows, layer.expected(primitive), "float64", f"{OPS[primitive]} depthwise rows")


@pytest.mark.parametrize("primitive", ["forward", "backward_data"])
@pytest.mark.parametrize("x_shape, w_shape, opts", [
    ((3, 4, 9, 10), (8, 1, 3, 3), dict(padding=1, groups=4)),                           # multiplier 2
    ((2, 3, 16, 17), (3, 1, 5, 5), dict(stride=2, padding=((2, 1), (0, 3)), groups=3)),  # phase volumes; classes
    ((1, 5, 4, 6, 7), (5, 1, 2, 3, 3), dict(padding=(0, 1, 2), dilation=(1, 1, 2), groups=5)),
])
def test_depthwise_plane_kernels_reuse_their_scratch_over_a_run_of_planes(x_shape, w_shape, opts, primitive,
                                                                          monkeypatch):
    """depthwise_wide_cpu and depthwise_wide_classes_cpu allocate their scratch once per run of planes: each plane
    rewrites the padded plane's inside (its zero border kept) and clears the wide grid, so an inf in one plane
    reaches only that plane's results, as in the reference (runs of 3 planes, the last one short; 4 for a run of
    all; planes that small take the lanes kernels unless told not to)."""
    from cnnfast.kernels.cpu import depthwise
    monkeypatch.setattr(cnnfast.api, "_PLANS", {})
    monkeypatch.setattr(cnnfast.api, "_CALLS", {})
    monkeypatch.setattr(depthwise, "LANES_POSITIONS", 0)
    monkeypatch.setattr(depthwise, "LANES_STRIDED_DATA_POSITIONS", 0)
    layer = Layer(x_shape, w_shape, seed=14, **opts)
    assert layer.explain(primitive, algo="depthwise").kernels[0].startswith(("depthwise_wide_cpu",
                                                                             "depthwise_wide_classes_cpu"))
    source = layer.x if primitive == "forward" else layer.args(primitive)[2]
    source[(x_shape[0] - 1, 1) + (2,) * (len(x_shape) - 2)] = np.inf
    with np.errstate(invalid="ignore"):
        expected = layer.expected(primitive)
    assert np.isinf(expected).any() and np.isfinite(expected).mean() > 0.5
    for planes in (3, 4 * x_shape[0] * w_shape[0]):
        monkeypatch.setattr(depthwise, "_planes", lambda count, planes=planes: planes)
        assert_close(layer.run(primitive, algo="depthwise"), expected, "float64", f"runs of {planes} planes")


@pytest.mark.parametrize("family", ["lanes", "wide"])
@pytest.mark.parametrize("x_shape, w_shape, opts", [
    ((2, 4, 16, 17), (4, 1, 5, 5), dict(stride=2, padding=2, groups=4)),              # EfficientNet's 5x5 s2
    ((1, 3, 20, 22), (6, 1, 3, 3), dict(stride=(2, 3), padding=((0, 2), (1, 0)), dilation=(2, 1), groups=3)),
    ((1, 2, 9, 16, 16), (2, 1, 3, 3, 3), dict(stride=2, padding=1, groups=2)),        # 3-D: eight phase volumes
    ((2, 2, 240), (4, 1, 5), dict(stride=4, padding=3, groups=2)),                     # 1-D
    ((1, 2, 15, 15), (2, 1, 4, 4), dict(stride=3, padding=7, groups=2)),              # padding past a tap's reach
])
def test_a_strided_depthwise_forward_runs_the_plane_kernels_on_phase_volumes(x_shape, w_shape, opts, family,
                                                                             monkeypatch, plans_for_one_thread):
    """At a stride, the forward pads each plane (the lanes kernel: LANES of them interleaved) into stride-phase
    volumes that every tap reads at unit stride, against the reference (each case on both kernels: LANES_POSITIONS
    moved); non-finite weights reach the padding's zeros as in the reference; a tiny workspace_limit takes the row
    kernel."""
    from cnnfast.kernels.cpu import depthwise
    monkeypatch.setattr(cnnfast.api, "_PLANS", {})  # plans made here name a kernel for the patched threshold
    monkeypatch.setattr(cnnfast.api, "_CALLS", {})
    monkeypatch.setattr(depthwise, "LANES_POSITIONS", 10 ** 9 if family == "lanes" else 0)
    kernel = f"depthwise_{family}_cpu"
    calls = []
    real = getattr(depthwise, kernel)
    monkeypatch.setattr(depthwise, kernel, lambda *args: calls.append(args[12:15]) or real(*args))
    rng = np.random.default_rng(8)
    nd = len(x_shape) - 2
    x, w, b = rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[0])
    op = getattr(cnnfast, f"conv{nd}d")
    plan = cnnfast.explain(f"conv{nd}d", x, w, b, **opts)
    assert plan.algorithm == "depthwise" and plan.kernels[0].startswith(kernel)
    assert plan.spec.geometry.P * plan.spec.geometry.Q * plan.spec.geometry.U >= depthwise.STRIDED_WIDE_POSITIONS
    assert_close(op(x, w, b, **opts), reference.conv(x, w, b, **opts), "float64", f"strided {family}")
    g = plan.spec.geometry
    assert calls == [(g.stride_d, g.stride_h, g.stride_w)]
    w[0, 0, (0,) * nd] = np.nan  # the first tap reads the padding of the first outputs
    assert_close(op(x, w, b, **opts), reference.conv(x, w, b, **opts), "float64", f"strided {family}, NaN weight")
    rows = op(x, w, b, **opts, workspace_limit=0)
    assert len(calls) == 2
    assert_close(rows, reference.conv(x, w, b, **opts), "float64", "strided rows")


@pytest.mark.parametrize("x_shape, w_shape, opts", [
    ((3, 20, 7, 7), (20, 1, 3, 3), dict(padding=1, groups=20)),                      # MobileNet's 7x7, 2 blocks
    ((2, 5, 6, 7), (15, 1, 5, 3), dict(padding=((3, 0), (1, 2)), dilation=(1, 2), groups=5)),  # multiplier 3
    ((1, 3, 3, 4, 4), (3, 1, 3, 2, 3), dict(stride=(1, 2, 1), padding=1, groups=3)),  # 3-D
    ((2, 17, 40), (17, 1, 7), dict(stride=2, padding=3, groups=17)),                  # 1-D, a block of one lane
    ((1, 2, 6, 6), (2, 1, 4, 4), dict(stride=3, padding=7, groups=2)),                # padding past a tap's reach
    ((1, 16, 5, 5), (32, 1, 3, 3), dict(padding=1, groups=16)),  # multiplier 2: input gradient lanes at a step of 2
    ((1, 2, 5, 5), (32, 1, 3, 3), dict(stride=2, padding=1, groups=2)),  # multiplier 16: one source a block (step 0)
])
@pytest.mark.parametrize("primitive", list(OPS))
def test_small_depthwise_planes_run_the_lanes_kernels_then_the_wide_then_the_rows(x_shape, w_shape, opts, primitive,
                                                                                   monkeypatch, plans_for_one_thread):
    """Planes of at most LANES_POSITIONS positions run LANES channels at a time, interleaved (at any stride; the input
    gradient's at a stride by sub-pixel classes), against the reference, also one sample a task (the source planes of
    a whole block at a constant step, 0 to 2, or not: a forward's at a multiplier of 2); a
    workspace_limit below their scratch takes the wide kernel where it runs, then the row kernels; a NaN weight
    (input gradient) or an inf in x (weight gradient) gives the reference's non-finite values."""
    from cnnfast.kernels.cpu import depthwise
    calls = []
    for name in ("depthwise_lanes_cpu", "depthwise_lanes_classes_cpu", "depthwise_lanes_filter_cpu"):
        real = getattr(depthwise, name)
        monkeypatch.setattr(depthwise, name, lambda *args, name=name, real=real: calls.append(name) or real(*args))
    layer = Layer(x_shape, w_shape, seed=12, **opts)
    plan = layer.explain(primitive, algo="depthwise")
    assert plan.algorithm == "depthwise" and plan.kernels[0].startswith("depthwise_lanes_")
    expected = layer.expected(primitive)
    assert_close(layer.run(primitive, algo="depthwise"), expected, "float64", "lanes")
    assert len(calls) == 1
    batched = primitive != "backward_filter"  # one sample a task (these split the batch when blocks are few)
    if batched:
        monkeypatch.setattr(depthwise, "_samples", lambda n, channels: 1)
        assert_close(layer.run(primitive, algo="depthwise"), expected, "float64", "lanes, a sample a task")
    for limit in (plan.workspace_bytes - 1, 0):  # the wide kernel where it runs, then the row kernels
        assert layer.explain(primitive, algo="depthwise", workspace_limit=limit).workspace_bytes <= limit
        assert_close(layer.run(primitive, algo="depthwise", workspace_limit=limit), expected, "float64", "limit")
    assert len(calls) == 1 + batched
    if primitive == "backward_filter":
        layer.x[(0, 0) + (-1,) * (len(x_shape) - 2)] = np.inf  # few taps read it; the lane-wise products meet it
    else:                                                      # at dropped positions too
        layer.w[(0, 0) + (0,) * (len(x_shape) - 2)] = np.nan
    with np.errstate(invalid="ignore"):  # (the reference's inf - inf, inf * 0)
        expected = layer.expected(primitive)
    assert_close(layer.run(primitive, algo="depthwise"), expected, "float64", "non-finite")


@pytest.mark.parametrize("family", ["lanes", "wide"])
@pytest.mark.parametrize("x_shape, w_shape, opts", [
    ((2, 4, 16, 17), (4, 1, 5, 5), dict(stride=2, padding=2, groups=4)),
    ((2, 3, 20, 22), (6, 1, 3, 3), dict(stride=(2, 3), padding=((0, 2), (1, 0)), dilation=(2, 1), groups=3)),
    ((1, 2, 9, 10, 11), (2, 1, 3, 3, 3), dict(stride=2, padding=1, groups=2)),        # 3-D: eight classes
    ((2, 2, 41), (4, 1, 5), dict(stride=4, padding=3, groups=2)),                      # 1-D, multiplier 2
    ((2, 2, 7, 7), (2, 1, 2, 2), dict(stride=4, groups=2)),                             # classes no tap reaches
    ((2, 2, 15, 15), (2, 1, 4, 4), dict(stride=3, padding=7, groups=2)),
    ((3, 20, 9, 9), (40, 1, 3, 3), dict(stride=2, padding=1, groups=20)),  # two blocks (the second of 4 channels)
])
def test_a_strided_depthwise_input_gradient_runs_by_subpixel_classes(x_shape, w_shape, opts, family, monkeypatch,
                                                                     plans_for_one_thread):
    """At a stride, the input gradient is the unit-stride correlation of dy with the taps that reach each sub-pixel
    class of dx positions, on a padded dy plane (the lanes kernel: LANES of them interleaved; a class no tap reaches:
    zeros); the transposed forward of a depthwise layer too; an inf in the first sample's first channel of dy reaches
    only that plane of dx, also with a sample a task (the planes after it reuse its scratch); a non-finite weight, or
    a tiny workspace_limit, takes the row kernel; all against the reference (each case on both kernels:
    LANES_STRIDED_DATA_POSITIONS moved)."""
    from cnnfast.kernels.cpu import depthwise
    monkeypatch.setattr(depthwise, "LANES_STRIDED_DATA_POSITIONS", 10 ** 9 if family == "lanes" else 0)
    kernel = f"depthwise_{family}_classes_cpu"
    calls = []
    real = getattr(depthwise, kernel)
    monkeypatch.setattr(depthwise, kernel, lambda *args: calls.append(1) or real(*args))
    rng = np.random.default_rng(9)
    nd = len(x_shape) - 2
    spec = cnnfast.ConvSpec.create(f"conv{nd}d", x_shape, w_shape, **opts)
    w, dy = rng.standard_normal(w_shape), rng.standard_normal(spec.output_shape)
    op = getattr(grad, f"conv{nd}d_input")
    plan = cnnfast.explain(f"conv{nd}d_input", x_shape, w, dy, **opts)
    assert plan.algorithm == "depthwise" and plan.kernels[0].startswith(kernel)
    assert plan.workspace_bytes > 0
    dx = op(x_shape, w, dy, **opts)
    assert calls == [1]
    assert_close(dx, reference.conv_input(x_shape, w, dy, **opts), "float64", f"strided {family} classes")
    transposed = getattr(cnnfast, f"conv_transpose{nd}d")(dy, w, stride=opts["stride"], padding=opts.get("padding", 0),
                                                           groups=opts["groups"], dilation=opts.get("dilation", 1),
                                                           output_size=x_shape[2:])
    assert calls == [1, 1] and np.array_equal(transposed, dx)
    middle = (0, 0) + tuple(n // 2 for n in dy.shape[2:])
    dy[middle] = np.inf  # the padded planes after it rewritten, the grids cleared
    with np.errstate(invalid="ignore"):
        expected = reference.conv_input(x_shape, w, dy, **opts)
    reached = np.zeros(expected.shape, bool)
    reached[0, 0] = True
    assert np.isinf(expected[0, 0]).any() and np.isfinite(expected[~reached]).all()
    for samples in (1, x_shape[0]):
        monkeypatch.setattr(depthwise, "_samples", lambda n, channels, samples=samples: samples)
        assert_close(op(x_shape, w, dy, **opts), expected, "float64", f"inf in dy, {samples} samples a task")
    assert len(calls) == 4
    dy[middle] = 0.0
    assert_close(op(x_shape, w, dy, **opts, workspace_limit=0), reference.conv_input(x_shape, w, dy, **opts),
                 "float64", "strided rows")
    w[0, 0, (0,) * nd] = np.inf
    with np.errstate(invalid="ignore"):  # (the reference's inf - inf)
        expected = reference.conv_input(x_shape, w, dy, **opts)
    assert_close(op(x_shape, w, dy, **opts), expected, "float64", "inf weight")
    assert len(calls) == 4


@pytest.mark.parametrize("x_shape, w_shape, opts", [
    ((2, 8, 9, 11), (8, 2, 3, 3), dict(padding=1, groups=4)),                       # ResNeXt-like: compact pitches
    ((3, 12, 10, 9), (9, 4, 3, 2), dict(stride=(2, 1), padding=((1, 0), (2, 1)), dilation=(1, 2), groups=3)),
    ((1, 6, 7, 7), (6, 3, 4, 4), dict(stride=3, padding=5, groups=2)),              # padding past a tap's reach
    ((2, 8, 30), (12, 4, 5), dict(padding=2, dilation=3, groups=2)),                # 1-D
    ((1, 4, 5, 6, 7), (8, 2, 3, 3, 3), dict(padding=1, groups=2)),                  # 3-D
    ((2, 5, 8, 8), (3, 5, 3, 3), dict(padding=(0, 2))),                             # dense, 3 output channels
    ((2, 4, 8, 8), (2, 4, 3, 3), dict(padding=1)),                                  # 2: the row kernels (forward)
])
@pytest.mark.parametrize("primitive", list(OPS))
def test_direct_runs_the_wide_kernels_in_blocks_of_samples_and_falls_back_to_the_row_kernels(x_shape, w_shape, opts,
                                                                                              primitive, monkeypatch):
    """direct's wide kernels (kernels/cpu/wide.py) against the reference, also in blocks of one sample (the input
    gradient at a stride by sub-pixel classes); with fewer than MIN_CHANNELS destination channels per group the row
    kernels run, as they do under a workspace_limit of 0, for a NaN or inf weight's input gradient, and for a weight
    gradient that the wide kernel made non-finite (an inf in x, met by dy's zeros at the dropped grid positions)."""
    from cnnfast.kernels.cpu import wide
    calls = []
    for name in ("wide_direct_cpu", "wide_direct_filter_cpu"):
        real = getattr(wide, name)
        monkeypatch.setattr(wide, name, lambda *args, real=real: calls.append(1) or real(*args))
    nd = len(x_shape) - 2
    rng = np.random.default_rng(11)
    x, w, b = rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[0])
    dy = rng.standard_normal(cnnfast.ConvSpec.create(f"conv{nd}d", x_shape, w_shape, **opts).output_shape)
    suffix = {"forward": "", "backward_data": "_input", "backward_filter": "_weight"}[primitive]
    op = getattr(cnnfast, f"conv{nd}d") if primitive == "forward" else getattr(grad, f"conv{nd}d{suffix}")
    ref = {"forward": reference.conv, "backward_data": reference.conv_input,
           "backward_filter": reference.conv_weight}[primitive]

    def args():
        return {"forward": (x, w, b), "backward_data": (x_shape, w, dy), "backward_filter": (x, w_shape, dy)}[primitive]

    plan = cnnfast.explain(f"conv{nd}d{suffix}", *args(), **opts, algo="direct")
    runs_wide = wide.supports(plan.spec.geometry, primitive) is None
    assert runs_wide == (plan.workspace_bytes > 0) == plan.kernels[0].startswith("spread_cpu + wide_direct")
    groups = opts.get("groups", 1)
    destination = (x_shape[1] if primitive == "backward_data" else w_shape[0]) // groups
    assert runs_wide == (destination >= wide.MIN_CHANNELS)
    expected = ref(*args(), **opts)
    assert_close(op(*args(), **opts, algo="direct"), expected, "float64", "wide")
    launches = len(calls)  # per block: one, or (the input gradient at a stride) one per sub-pixel class
    assert (launches > 0) == runs_wide
    monkeypatch.setattr(wide, "BLOCK_SCRATCH", 1)  # a block per sample (the weight gradient: their sums in order)
    assert_close(op(*args(), **opts, algo="direct"), expected, "float64", "wide, blocks of one sample")
    assert len(calls) == launches * (1 + x_shape[0])
    monkeypatch.undo()
    assert_close(op(*args(), **opts, algo="direct", workspace_limit=0), expected, "float64", "rows")
    if primitive == "backward_filter":
        x[(0, 0) + (-1,) * nd] = np.inf  # read by few taps; the wide dot products meet it at dropped positions too
    else:
        w[(0, 0) + (0,) * nd] = np.inf  # a tap that reads the padding (forward) or past dy (input gradient)
    with np.errstate(invalid="ignore"):  # (the reference's inf - inf, inf * 0)
        expected = ref(*args(), **opts)
    assert_close(op(*args(), **opts, algo="direct"), expected, "float64", "non-finite")


@pytest.mark.parametrize("primitive", list(OPS))
def test_the_wide_kernels_take_smaller_blocks_of_samples_under_a_workspace_limit(primitive):
    """A workspace_limit below the wide kernels' scratch for their default blocks shrinks the blocks (to one sample
    at least) before it falls back to the row kernels; the plan's workspace stays within the limit."""
    layer = Layer((4, 12, 10, 10), (12, 4, 3, 3), padding=1, groups=3)
    full = layer.explain(primitive, algo="direct")
    smaller = layer.explain(primitive, algo="direct", workspace_limit=full.workspace_bytes - 1)
    assert smaller.kernels == full.kernels and smaller.kernels[0].startswith("spread_cpu + wide_direct")
    assert 0 < smaller.workspace_bytes < full.workspace_bytes
    assert_close(layer.run(primitive, algo="direct", workspace_limit=full.workspace_bytes - 1),
                 layer.expected(primitive), "float64", "smaller blocks")


@pytest.mark.parametrize("primitive", list(OPS))
def test_the_wide_kernels_last_block_of_samples_may_be_smaller(primitive):
    """Five samples in blocks of two: the last block holds one, and its grid is laid out for one (every other test's
    blocks divide the batch)."""
    from cnnfast.kernels.cpu import wide
    layer = Layer((5, 12, 10, 10), (12, 4, 3, 3), padding=1, groups=3)
    g = layer.explain(primitive, algo="direct").spec.geometry
    limit = wide._bytes(g, primitive, 8, 2)
    assert [n for _, n, _ in wide._blocks(g, primitive, 8, limit)] == [2, 2, 1]
    assert_close(layer.run(primitive, algo="direct", workspace_limit=limit), layer.expected(primitive), "float64",
                 "blocks of 2, 2 and 1")


def test_the_wide_weight_gradient_adds_parts_that_end_inside_a_run():
    """A block's grid past FILTER_POSITIONS runs in parts, each summed by its own task; here a part is not a whole
    number of GRID_POSITIONS runs, so a part's last run stops at the part's end: no position summed twice or skipped
    (every other test's grid fits one part)."""
    from cnnfast.kernels.cpu import wide
    layer = Layer((2, 3, 128, 130), (3, 3, 3, 3), padding=1)
    layout = wide._layout(layer.explain("backward_filter", algo="direct").spec.geometry, "backward_filter", 2)
    parts = wide._parts(layout)
    assert parts > 1 and -(-layout.volume // parts) % wide.GRID_POSITIONS
    assert_close(layer.run("backward_filter", algo="direct"), layer.expected("backward_filter"), "float64", "parts")


@pytest.mark.parametrize("primitive", list(OPS))
@pytest.mark.parametrize("kernel", [(2,), (2, 2), (5, 1)])
def test_depthwise_plane_kernels_add_the_last_one_or_two_taps(kernel, primitive, plans_for_one_thread):
    """The depthwise plane kernels add three taps a pass, then the one or two left (the wide weight gradient: dummy
    taps up to a multiple of three): kernels of 2, 4 and 5 taps (the grid's depthwise layers have 3 or 9), on small
    planes (the lanes kernels) and larger ones (the wide kernels), with a channel multiplier of 2."""
    for spatial in ((7,) * len(kernel), (300,) if len(kernel) == 1 else (17, 17)):
        layer = Layer((2, 3) + spatial, (6, 1) + kernel, padding=1, groups=3)
        assert_close(layer.run(primitive, algo="depthwise"), layer.expected(primitive), "float64",
                     f"{kernel} {spatial}")


@pytest.mark.parametrize("x_shape, w_shape, stride, forward, data, weight", [
    ((8, 960, 7, 7), (960, 1, 3, 3), 2, "lanes", "lanes_classes", "lanes_filter"),  # 4x4 outputs, 7x7 dx
    ((8, 960, 7, 7), (960, 1, 3, 3), 1, "lanes", "lanes", "lanes_filter"),          # 49
    ((8, 960, 10, 10), (960, 1, 3, 3), 1, "lanes", "lanes", "lanes_filter"),        # 100
    ((8, 576, 14, 14), (576, 1, 3, 3), 1, "wide", "wide", "lanes_filter"),          # 196
    ((8, 240, 17, 17), (240, 1, 3, 3), 1, "wide", "wide", "wide_filter"),           # 289
    ((8, 112, 20, 20), (112, 1, 3, 3), 2, "lanes", "lanes_classes", "lanes_filter"),  # 100 at stride 2, 400 dx
    ((8, 80, 24, 24), (80, 1, 3, 3), 2, "wide", "wide_classes", "lanes_filter"),    # 144 at stride 2, 576 dx
    ((8, 240, 28, 28), (240, 1, 5, 5), 2, "wide", "wide_classes", "lanes_filter"),  # 196 at stride 2, 784 dx
    ((8, 144, 112, 112), (144, 1, 3, 3), 2, "wide", "wide_classes", "lanes_filter"),  # 3,136 at stride 2
    ((8, 96, 114, 114), (96, 1, 3, 3), 2, "wide", "wide_classes", None),           # 3,249 at stride 2
])
def test_the_depthwise_plane_kernels_by_plane_size(x_shape, w_shape, stride, forward, data, weight,
                                                   plans_for_one_thread):
    """The lanes kernels on planes of at most LANES_POSITIONS outputs (3x3 stride 2 960 @7, 4x4 outputs, took the
    row kernel, faster than the wide one there), the weight gradient up to LANES_FILTER_POSITIONS, at a stride
    LANES_STRIDED_FILTER_POSITIONS (else direct's kernel), the input gradient at a stride on dx planes up to
    LANES_STRIDED_DATA_POSITIONS; under a limit below their scratch, the next kernel."""
    from cnnfast.kernels.cpu import depthwise
    opts = dict(stride=stride, padding=w_shape[-1] // 2, groups=x_shape[1])
    dy = cnnfast.ConvSpec.create("conv2d", x_shape, w_shape, **opts).output_shape
    plan = cnnfast.explain("conv2d", x_shape, w_shape, **opts)
    assert plan.algorithm == "depthwise" and plan.kernels[0].startswith(f"depthwise_{forward}_cpu (")
    assert cnnfast.explain("conv2d_input", x_shape, w_shape, dy, **opts).kernels[0].startswith(
        f"depthwise_{data}_cpu (")
    assert cnnfast.explain("conv2d_weight", x_shape, w_shape, dy, **opts).kernels[0].startswith(
        f"depthwise_{weight}_cpu " if weight else "direct_backward_filter_cpu ")
    smaller = cnnfast.explain("conv2d", x_shape, w_shape, **opts, workspace_limit=plan.workspace_bytes - 1)
    assert smaller.workspace_bytes < plan.workspace_bytes
    wide = stride == 1 or math.prod(dy[2:]) >= depthwise.STRIDED_WIDE_POSITIONS
    assert (smaller.workspace_bytes > 0) == (forward == "lanes" and wide)  # lanes, wide, rows


@pytest.mark.parametrize("primitive, x_shape, multiplier, stride, tasks", [
    ("forward", (1, 16, 7, 7), 1, 1, 1),             # one block of 16 channels, one sample
    ("forward", (3, 20, 7, 7), 1, 1, 6),             # two blocks (the second of 4 channels), three samples
    ("forward", (2, 16, 7, 7), 2, 1, 4),             # blocks of the 32 output channels
    ("backward_data", (2, 16, 7, 7), 2, 1, 2),       # ... of the 16 input channels
    ("backward_data", (3, 20, 14, 14), 1, 2, 6),     # ... at a stride
    ("backward_filter", (4, 16, 56, 56), 1, 2, 1),   # one block of 16 filters, whatever the batch
    ("backward_filter", (1, 20, 7, 7), 2, 1, 3),
])
def test_the_lanes_kernels_run_where_their_blocks_make_a_task_for_every_thread(primitive, x_shape, multiplier, stride,
                                                                               tasks, monkeypatch):
    """The lanes kernels take a layer's small planes only where their tasks (blocks of LANES channels; in the forward
    and input gradient, of one sample) are at least the threads that run them: one block on two threads ran a 56x56
    strided weight gradient at 0.67x of direct's kernel's speed; a call small enough for the serial build has one."""
    from cnnfast.kernels.cpu import depthwise
    opts = dict(stride=stride, padding=1, groups=x_shape[1])
    g = cnnfast.ConvSpec.create("conv2d", x_shape, (x_shape[1] * multiplier, 1, 3, 3), **opts).geometry
    for small, count in [(False, 1), (False, tasks), (False, tasks + 1), (False, 64), (True, 64)]:
        monkeypatch.setattr(depthwise, "DEFAULT_SERIAL_WORK", g.dense_macs + small)
        monkeypatch.setattr(depthwise, "_threads", lambda count=count: count)
        assert ("lanes" in depthwise.takes(g, primitive)) == (small or count <= tasks), count


@pytest.mark.parametrize("stride", [1, 2])
def test_a_depthwise_weight_gradient_on_directs_kernels_keeps_within_the_limit(stride, monkeypatch):
    """A depthwise weight gradient with no plane kernel (stride 2, 60x60 outputs), or none that fits the limit, runs
    direct's kernels: its wide one (channel multiplier >= 3) where that fits the same limit, counted in the plan's
    workspace, else its row kernel, with none (direct ran under its own default limit until 2026-12-06)."""
    from cnnfast.kernels.cpu import depthwise, direct, wide
    calls = []
    real = wide.backward_filter
    monkeypatch.setattr(wide, "backward_filter", lambda *args: calls.append(1) or real(*args))
    rng = np.random.default_rng(13)
    opts = dict(stride=stride, padding=1, groups=8)
    x, w_shape = rng.standard_normal((1, 8, 120, 120)), (32, 1, 3, 3)  # multiplier 4
    dy = rng.standard_normal(cnnfast.ConvSpec.create("conv2d", x.shape, w_shape, **opts).output_shape)
    expected = reference.conv_weight(x, w_shape, dy, **opts)
    g = cnnfast.explain("conv2d_weight", x, w_shape, dy, **opts, algo="depthwise").spec.geometry
    assert depthwise.takes(g, "backward_filter") == (() if stride > 1 else ("wide",))
    directs = direct.workspace_bytes(g, "backward_filter", x.itemsize, None)
    limits = [None, directs, 0] if stride > 1 else [0]  # (stride 1: the wide plane kernel's scratch is smaller)
    for limit in limits:
        plan = cnnfast.explain("conv2d_weight", x, w_shape, dy, **opts, algo="depthwise", workspace_limit=limit)
        runs = limit != 0
        assert plan.workspace_bytes == (directs if runs else 0) and 0 < directs
        assert plan.kernels[0].startswith("direct's spread_cpu + wide_direct_filter_cpu" if stride > 1 else
                                          "depthwise_wide_filter_cpu (direct's spread_cpu")
        before = len(calls)
        assert_close(grad.conv2d_weight(x, w_shape, dy, **opts, algo="depthwise", workspace_limit=limit), expected,
                     "float64", f"limit {limit}")
        assert len(calls) - before == runs


# ---------------------------------------------------------------- 2. bitwise determinism

DENSE = dict(x_shape=(3, 16, 12, 12), w_shape=(16, 16, 3, 3), padding=1)
DEPTHWISE = dict(x_shape=(3, 16, 12, 12), w_shape=(32, 1, 3, 3), padding=1, groups=16)


def _determinism_grid():
    for layer_name, spec in (("dense", DENSE), ("depthwise", DEPTHWISE)):
        for algo in CPU_ALGOS:
            if algo == "depthwise" and layer_name == "dense":
                continue
            for primitive in OPS:
                for dtype in ("float32", "float64"):
                    yield pytest.param(spec, algo, primitive, dtype, id=f"{layer_name}-{algo}-{primitive}-{dtype}")


@pytest.mark.parametrize("spec, algo, primitive, dtype", list(_determinism_grid()))
def test_repeated_calls_are_bitwise_identical(spec, algo, primitive, dtype):
    spec = dict(spec)
    layer = Layer(spec.pop("x_shape"), spec.pop("w_shape"), seed=5, dtype=dtype, **spec)
    assert layer.explain(primitive, algo=algo).deterministic
    first = layer.run(primitive, algo=algo)
    for _ in range(2):
        again = layer.run(primitive, algo=algo)
        assert again.dtype == np.dtype(dtype)
        assert np.array_equal(first, again), f"{algo} {primitive} {dtype}: results differ between calls"
    assert_close(first, layer.expected(primitive), dtype, f"{algo} {primitive}")


# ---------------------------------------------------------------- 3. choose() follows its docstring

# (id, primitive, input shape, weight shape, options, expected algorithm)
CHOOSE_RULES = [
    # 1. depthwise layers (groups == C), channel multiplier 1 and 2, whatever the primitive
    *[(f"depthwise-{p}", p, (2, 16, 40, 40), (32, 1, 3, 3), dict(padding=1, groups=16), "depthwise") for p in OPS],
    ("depthwise-m1-forward", "forward", (1, 8, 6, 6), (8, 1, 3, 3), dict(groups=8), "depthwise"),
    ("multiplier-9-forward", "forward", (2, 32, 8, 8), (288, 1, 3, 3), dict(padding=1, groups=32), "depthwise"),
    #    ... but a single-channel input with >= SINGLE_CHANNEL_GEMM output channels -> im2col (the gradients from
    #    4096 input positions or at a stride > 1), the weight gradient of a 1-D layer -> direct
    *[(f"1-to-64-channels-{p}", p, (1, 1, 64, 64), (64, 1, 3, 3), dict(padding=1), "im2col") for p in OPS],
    *[(f"1-to-64-channels-32x32-{p}", p, (1, 1, 32, 32), (64, 1, 3, 3), dict(padding=1), "depthwise")
      for p in ("backward_data", "backward_filter")],
    *[(f"1-to-64-channels-1d-stride-5-{p}", p, (1, 1, 3000), (64, 1, 10), dict(stride=5), "im2col") for p in OPS],
    *[(f"1-to-16-channels-{p}", p, (1, 1, 32, 32), (16, 1, 3, 3), dict(padding=1), algo)
      for p, algo in (("forward", "im2col"), ("backward_data", "depthwise"), ("backward_filter", "depthwise"))],
    *[(f"1-to-32-channels-3x3x3-{p}", p, (1, 1, 8, 8, 8), (32, 1, 3, 3, 3), dict(padding=1), "im2col")
      for p in OPS],  # ... or from 32 channels with a kernel of >= 27 taps (a 3-D UNet's first layer)
    *[(f"1-to-16-channels-3x3x3-{p}", p, (1, 1, 8, 8, 8), (16, 1, 3, 3, 3), dict(padding=1), "depthwise")
      for p in ("backward_data", "backward_filter")],
    *[(f"depthwise-1d-{p}", p, (2, 16, 40), (16, 1, 3), dict(padding=1, groups=16), algo)
      for p, algo in (("forward", "depthwise"), ("backward_data", "depthwise"), ("backward_filter", "direct"))],
    # 2. a kernel that covers the whole unpadded input -> im2col (one GEMM over the batch), however thin
    *[(f"covers-input-1-out-channel-{p}", p, (2, 64, 4, 4), (1, 64, 4, 4), {}, "im2col") for p in OPS],
    ("covers-input-se-1x1-forward", "forward", (2, 96, 1, 1), (4, 96, 1, 1), {}, "im2col"),
    # 3. a grouped layer of <= 32 channels per group in and out, more than one tap -> direct (its wide kernels)
    *[(f"resnext-3x3-g32-{p}", p, (8, 256, 28, 28), (256, 8, 3, 3), dict(padding=1, groups=32), "direct")
      for p in OPS],
    ("grouped-3x3-stride-2-32-per-group-backward_filter", "backward_filter", (2, 64, 14, 14), (64, 32, 3, 3),
     dict(stride=2, padding=1, groups=2), "direct"),
    ("grouped-3x3-33-per-group-forward", "forward", (2, 66, 14, 14), (66, 33, 3, 3), dict(padding=1, groups=2),
     "winograd"),
    #    ... and the weight gradient of such a layer without groups (not its forward or input gradient)
    *[(f"dense-3x3-32-channels-{p}", p, (1, 32, 56, 56), (32, 32, 3, 3), dict(padding=1), algo)
      for p, algo in (("forward", "winograd"), ("backward_data", "winograd"), ("backward_filter", "direct"))],
    ("dense-3x3-33-channels-backward_filter", "backward_filter", (1, 33, 56, 56), (33, 33, 3, 3), dict(padding=1),
     "winograd"),
    ("mbv2-stem-backward_filter", "backward_filter", (2, 3, 32, 32), (32, 3, 3, 3), dict(stride=2, padding=1),
     "direct"),
    #    ... but not a 3-D one of >= 24 channels and >= 4096 output positions that Winograd takes (rule 5)
    ("3x3x3-32@16^3-backward_filter", "backward_filter", (1, 32, 16, 16, 16), (32, 32, 3, 3, 3), dict(padding=1),
     "winograd"),
    ("3x3x3-32@12^3-backward_filter", "backward_filter", (1, 32, 12, 12, 12), (32, 32, 3, 3, 3), dict(padding=1),
     "direct"),  # 1,728 positions
    ("3x3x3-16@16^3-backward_filter", "backward_filter", (4, 16, 16, 16, 16), (16, 16, 3, 3, 3), dict(padding=1),
     "direct"),  # 16 channels
    ("3x3x3-32@16^3-stride-2-backward_filter", "backward_filter", (4, 32, 32, 32, 32), (32, 32, 3, 3, 3),
     dict(padding=1, stride=2), "direct"),  # Winograd does not take it
    ("3x3x3-4-to-32@32^3-backward_filter", "backward_filter", (1, 4, 32, 32, 32), (32, 4, 3, 3, 3), dict(padding=1),
     "direct"),  # nor 4 input channels (rule 5: at least 8)
    #    ... and every pass of a small 3-D layer of <= 32 channels: max(C, K) x output positions <= 32768
    *[(f"3x3x3-16@8^3-batch-4-{p}", p, (4, 16, 8, 8, 8), (16, 16, 3, 3, 3), dict(padding=1), "direct")
      for p in OPS],  # 16 x 2048 = 32768
    *[(f"3x3x3-32@8^3-batch-4-{p}", p, (4, 32, 8, 8, 8), (32, 32, 3, 3, 3), dict(padding=1), algo)
      for p, algo in (("forward", "winograd"), ("backward_data", "winograd"), ("backward_filter", "direct"))],
    #    ... but not where the wide kernels do not run: 2 input channels a group's input gradient (rule 6)
    ("grouped-2-in-channels-backward_data", "backward_data", (2, 8, 12, 12), (64, 2, 3, 3), dict(padding=1, groups=4),
     "im2col"),
    # 4. fewer than 8 output channels per group -> direct (even where rule 6 would pick im2col)
    *[(f"7-out-channels-{p}", p, (1, 16, 8, 8), (7, 16, 3, 3), {}, "direct") for p in OPS],
    ("6-out-channels-per-group-forward", "forward", (1, 16, 8, 8), (12, 8, 3, 3), dict(groups=2), "direct"),
    ("8-out-channels-forward", "forward", (1, 16, 12, 12), (8, 16, 5, 5), {}, "im2col"),
    #    ... but a grouped 1x1 layer of >= 4 input channels per group -> im2col
    *[(f"grouped-1x1-2-out-channels-{p}", p, (2, 16, 8, 8), (8, 4, 1, 1), dict(groups=4), "im2col") for p in OPS],
    ("1x1-4-out-channels-forward", "forward", (2, 16, 8, 8), (4, 16, 1, 1), {}, "direct"),
    # 5. 3x3 across height and width, unit stride and dilation with >= 0.2 x max(C/g, K/g) tiles (backward_data:
    #    0.45 x, backward_filter: 0.3 x) -> winograd
    *[(f"3x3-32x32-inputs-{p}", p, (1, 16, 32, 32), (16, 16, 3, 3), dict(padding=1), "winograd")
      for p in ("forward", "backward_data")],  # (the weight gradient of 16 channels: direct, rule 3)
    *[(f"3x3-resnet-256@14-batch-8-{p}", p, (8, 256, 14, 14), (256, 256, 3, 3), dict(padding=1), "winograd")
      for p in OPS],  # 8 * 4 * 4 = 128 tiles = 0.5 x 256
    ("3x3-resnet-256@14-batch-4-forward", "forward", (4, 256, 14, 14), (256, 256, 3, 3), dict(padding=1),
     "winograd"),  # 64 tiles = 0.25 x 256
    ("3x3-resnet-512@7-batch-32-forward", "forward", (32, 512, 7, 7), (512, 512, 3, 3), dict(padding=1),
     "winograd"),  # 32 * 2 * 2 = 128 tiles = 0.25 x 512
    *[(f"3x3-128@28-batch-1-{p}", p, (1, 128, 28, 28), (128, 128, 3, 3), dict(padding=1), "winograd")
      for p in ("forward", "backward_filter")],  # 7 * 7 = 49 tiles >= 0.3 x 128
    ("3x3-grouped-forward", "forward", (2, 128, 12, 12), (128, 64, 3, 3), dict(padding=1, groups=2), "winograd"),
    #    ... in 3-D too, each depth slice's tiles counted, from 0.5 x the channels with more than one depth tap
    #    (backward_data: 0.75 x)
    *[(f"3x3x3-64@8x28x28-{p}", p, (1, 64, 8, 28, 28), (64, 64, 3, 3, 3), dict(padding=1), "winograd") for p in OPS],
    *[(f"3x3x3-128@8x8x8-batch-3-{p}", p, (3, 128, 8, 8, 8), (128, 128, 3, 3, 3), dict(padding=1), "winograd")
      for p in OPS],  # 3 * 8 * 2 * 2 = 96 tiles = 0.75 x 128
    *[(f"3x3x3-128@8x8x8-batch-2-{p}", p, (2, 128, 8, 8, 8), (128, 128, 3, 3, 3), dict(padding=1), algo)
      for p, algo in (("forward", "winograd"), ("backward_data", "im2col"), ("backward_filter", "winograd"))],
    # 2 * 8 * 2 * 2 = 64 tiles = 0.5 x 128
    ("1x3x3-bwd-data-4x16x16-inputs", "backward_data", (1, 8, 4, 16, 16), (8, 8, 1, 3, 3), dict(padding=(0, 1, 1)),
     "winograd"),
    #    ... not with fewer than 8 channels per group in or out (VGG's first layer: 3 -> 64)
    *[(f"3x3-3-in-channels-{p}", p, (1, 3, 64, 64), (64, 3, 3, 3), dict(padding=1), "im2col") for p in OPS],
    # 6. otherwise -> im2col, whatever the spatial size or the input channels (an RGB stem, a LeNet input)
    ("3x3-resnet-256@14-batch-3-forward", "forward", (3, 256, 14, 14), (256, 256, 3, 3), dict(padding=1),
     "im2col"),  # 48 tiles < 0.2 x 256
    *[(f"3x3-resnet-256@14-batch-4-{p}", p, (4, 256, 14, 14), (256, 256, 3, 3), dict(padding=1), "im2col")
      for p in ("backward_data", "backward_filter")],  # 64 tiles < 0.3 x 256
    ("3x3-resnet-512@7-batch-32-backward_data", "backward_data", (32, 512, 7, 7), (512, 512, 3, 3),
     dict(padding=1), "im2col"),  # 128 tiles < 0.45 x 512
    ("3x3-128@28-batch-1-backward_data", "backward_data", (1, 128, 28, 28), (128, 128, 3, 3), dict(padding=1),
     "im2col"),  # 49 tiles < 0.45 x 128
    *[(f"3x3-resnet-512@7-batch-4-{p}", p, (4, 512, 7, 7), (512, 512, 3, 3), dict(padding=1), "im2col")
      for p in OPS],  # 16 tiles < 0.2 x 512
    ("3x3-stride-2-forward", "forward", (1, 16, 32, 32), (16, 16, 3, 3), dict(stride=2, padding=1), "im2col"),
    ("3x3-dilation-2-backward_data", "backward_data", (1, 16, 32, 32), (16, 16, 3, 3),
     dict(dilation=2, padding=2), "im2col"),
    ("5x5-forward", "forward", (1, 16, 32, 32), (16, 16, 5, 5), dict(padding=2), "im2col"),
    *[(f"rgb-stem-{p}", p, (2, 3, 16, 16), (64, 3, 7, 7), dict(stride=2, padding=3), "im2col") for p in OPS],
    ("bwd-data-2-in-channels", "backward_data", (4, 2, 28, 28), (8, 2, 5, 5), {}, "im2col"),
    # ... in 1-D and 3-D too
    ("plain-1d-forward", "forward", (2, 16, 20), (16, 16, 3), {}, "im2col"),
    ("plain-3d-backward_data", "backward_data", (1, 64, 6, 6, 6), (64, 64, 3, 3, 3), dict(dilation=(2, 1, 1)),
     "im2col"),
    ("3d-depth-stride-2-forward", "forward", (1, 64, 6, 6, 6), (64, 64, 3, 3, 3), dict(stride=(2, 1, 1)), "im2col"),
    *[(f"3x3x3-64@4x8x8-{p}", p, (1, 64, 4, 8, 8), (64, 64, 3, 3, 3), dict(padding=1), "im2col")
      for p in OPS],  # 4 * 2 * 2 = 16 tiles < 0.5 x 64 (with more than one depth tap)
]


@pytest.mark.parametrize("primitive, x_shape, w_shape, opts, expected",
                         [pytest.param(*r[1:], id=r[0]) for r in CHOOSE_RULES])
def test_choose_follows_its_documented_cost_model(primitive, x_shape, w_shape, opts, expected):
    op_base = f"conv{len(x_shape) - 2}d"
    spec = cnnfast.ConvSpec.create(op_base, x_shape, w_shape, **opts)
    name, reason = choose(spec.geometry, primitive)
    assert name == expected, reason
    assert reason

    args = {"forward": (x_shape, w_shape), "backward_data": (x_shape, w_shape, spec.output_shape),
            "backward_filter": (x_shape, w_shape, spec.output_shape)}[primitive]
    op = op_base + {"forward": "", "backward_data": "_input", "backward_filter": "_weight"}[primitive]
    plan = cnnfast.explain(op, *args, **opts)
    assert plan.algorithm == expected and plan.primitive == primitive
    assert isinstance(plan.reason, str) and plan.reason.strip()


# ---------------------------------------------------------------- 4. layout twins vs NumPy

PAD_SHAPE = (2, 3, 4, 5, 6)
PADS = ((1, 2), (3, 1), (2, 4))  # asymmetric per axis, each < the axis length (reflect needs that)
NP_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap", "zeros": "constant"}


def _pad_tables(mode):
    """The tables as api._execute gets them: spec.pad_tables() of a ConvSpec with this padding_mode."""
    spec = cnnfast.ConvSpec.create("conv3d", PAD_SHAPE, (2, 3, 1, 1, 1), padding=PADS, padding_mode=mode)
    tables = [np.asarray(t, dtype=np.int64) for t in spec.pad_tables()]
    assert [len(t) for t in tables] == [L + lo + hi for L, (lo, hi) in zip(PAD_SHAPE[2:], PADS)]
    return tables


@pytest.mark.parametrize("mode", list(NP_MODES))
def test_pad_cpu_matches_numpy_pad(mode):
    x = np.random.default_rng(11).standard_normal(PAD_SHAPE)
    tables = _pad_tables(mode)
    out = np.full(PAD_SHAPE[:2] + tuple(len(t) for t in tables), np.nan)
    pad_cpu(x, out, *tables)
    np.testing.assert_array_equal(out, np.pad(x, ((0, 0), (0, 0)) + PADS, mode=NP_MODES[mode]))


@pytest.mark.parametrize("mode", list(NP_MODES))
def test_fold_pad_cpu_is_the_adjoint_of_pad_cpu(mode):
    rng = np.random.default_rng(12)
    tables = _pad_tables(mode)
    padded_shape = PAD_SHAPE[:2] + tuple(len(t) for t in tables)
    x = rng.standard_normal(PAD_SHAPE)
    y = rng.standard_normal(padded_shape)
    px = np.empty(padded_shape)
    pad_cpu(x, px, *tables)
    fy = np.full(PAD_SHAPE, np.nan)  # fold must overwrite its output, not accumulate into it
    fold_pad_cpu(y, fy, *tables)
    lhs, rhs = float(np.vdot(px, y)), float(np.vdot(x, fy))
    assert abs(lhs - rhs) <= 1e-12 * max(abs(lhs), abs(rhs), 1.0), (lhs, rhs)
    # and against NumPy's pad: <np.pad(x), y> too, per (n, c) plane, so no plane is dropped or swapped
    npx = np.pad(x, ((0, 0), (0, 0)) + PADS, mode=NP_MODES[mode])
    np.testing.assert_allclose((fy * x).sum(axis=(2, 3, 4)), (npx * y).sum(axis=(2, 3, 4)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 7, 4, 5, 6), (1, 1, 1, 1, 9), (4, 33, 1, 2, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_bias_grad_cpu_matches_numpy_sum(shape):
    dy = np.random.default_rng(13).standard_normal(shape)
    db = np.full(shape[1], np.nan)
    bias_grad_cpu(dy, db)
    np.testing.assert_allclose(db, dy.sum(axis=(0, 2, 3, 4)), rtol=1e-12, atol=1e-12)


def test_bias_grad_cpu_sums_more_than_2_to_the_24_float32_terms():
    """A float32 running sum of ones stops at 2^24 = 16,777,216 (adding 1 rounds back): a layer of 4100 x 4100
    positions (or a batch of 3-D volumes) got 16,777,216 for 16,810,000 (0.2% off; 2.5% at 4096 x 4200)."""
    dy = np.ones((1, 1, 1, 4100, 4100), np.float32)
    db = np.full(1, np.nan, np.float32)
    bias_grad_cpu(dy, db)
    assert db[0] == 4100 * 4100


# ---------------------------------------------------------------- 5. the algorithms agree with each other

AGREE_KINDS = ("conv", "conv_input", "conv_weight")
PRIMITIVES = {"conv": "forward", "conv_input": "backward_data", "conv_weight": "backward_filter"}


@pytest.mark.parametrize("kind", AGREE_KINDS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cpu_algorithms_agree_on_the_grid(case, kind):
    p = problem(case, kind, "float64", seed=21)
    results = {}
    for name in CPU_ALGOS:
        try:
            results[name] = np.asarray(p.public(algo=name))
        except ValueError as e:
            if "cannot run this problem" not in str(e):
                raise
    assert {"direct", "im2col"} <= set(results)  # both handle every problem
    g = case_spec(case, kind).geometry
    assert ("depthwise" in results) == g.is_depthwise, sorted(results)
    assert ("winograd" in results) == (ALGORITHMS["winograd"].supports(g, PRIMITIVES[kind]) is None), sorted(results)
    names = sorted(results)
    for a in names:
        assert results[a].shape == p.expected.shape
        for b in names:
            if a < b:
                err = relative_error(results[a], results[b])[0]
                assert err <= 1e-10, f"{p.op} {case.name}: {a} vs {b} differ by {err:.3e} (relative)"


# ---------------------------------------------------------------- 6. thread-pool settings (README, "CPU threads")

THREAD_PROBE = """
import os
import cnnfast, numpy
from cnnfast.kernels import cpu
from numba.np.ufunc import parallel
print(os.environ.get("OPENBLAS_THREAD_TIMEOUT"), os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT"),
      parallel._is_initialized, cpu.blas.WORKERS_SPIN)
"""


@pytest.mark.parametrize("user_env, expected", [
    ({}, "4 None None True False"),  # cnnfast's defaults; GOMP_SPINCOUNT was set only while Numba's pool started
    ({"OPENBLAS_THREAD_TIMEOUT": "12", "OMP_WAIT_POLICY": "ACTIVE"}, "12 ACTIVE None False False"),  # the user's
    ({"GOMP_SPINCOUNT": "0"}, "4 None 0 False False"),
    ({"OPENBLAS_THREAD_TIMEOUT": "24"}, "24 None None True True"),  # workers that spin: cnnfast never wakes them
    ({"NUMPY_FIRST": "1"}, "4 None None True True"),  # OpenBLAS read its default (28) before cnnfast set 4
    ({"NUMPY_FIRST": "1", "OPENBLAS_THREAD_TIMEOUT": "8"}, "8 None None True False"),
])
def test_thread_settings_apply_once_and_user_values_win(user_env, expected):
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "OMP_WAIT_POLICY",
                                                            "GOMP_SPINCOUNT")}
    user_env = dict(user_env)
    probe = ("import numpy\n" if user_env.pop("NUMPY_FIRST", None) else "") + THREAD_PROBE
    done = subprocess.run([sys.executable, "-c", probe], env={**env, **user_env}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == expected


def _parallel_kernels():
    from cnnfast.kernels.cpu import depthwise, direct, layout, winograd
    modules = (depthwise, direct, im2col, layout, winograd)
    return {f"{m.__name__.rsplit('.', 1)[1]}.{name}": k for m in modules for name, k in vars(m).items()
            if getattr(k, "targetoptions", {}).get("parallel")}


def test_every_parallel_cpu_kernel_has_a_serial_build_with_its_own_cache_files():
    kernels = _parallel_kernels()
    assert len(kernels) == 21, sorted(kernels)
    for name, k in kernels.items():
        serial = k.serial
        assert serial.py_func.__code__ is k.py_func.__code__ and "parallel" not in serial.targetoptions, name
        assert serial.targetoptions.get("fastmath") == k.targetoptions.get("fastmath"), name
        assert serial.targetoptions.get("nogil"), name  # threads may run it side by side
        # Numba's disk cache keys entries by signature and bytecode: one shared file would mix the two builds
        assert k._cache._cache_file._index_name != serial._cache._cache_file._index_name, name


WORKQUEUE_PROBE = """
import numpy as np, cnnfast, numba
from concurrent.futures import ThreadPoolExecutor
x, w = np.random.rand(2, 32, 48, 48).astype(np.float32), np.random.rand(32, 1, 3, 3).astype(np.float32)
alone = cnnfast.conv2d(x, w, padding=1, groups=32, algo="depthwise")
with ThreadPoolExecutor(4) as pool:
    same = [np.array_equal(y, alone) for y in pool.map(
        lambda _: cnnfast.conv2d(x, w, padding=1, groups=32, algo="depthwise"), range(48))]
print(numba.threading_layer(), all(same))
"""


NO_CACHE_PROBE = """
import warnings
import numba.core.caching
numba.core.caching.CacheImpl._locator_classes = []  # as for a read-only install with no writable home
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import numpy as np, cnnfast
    y = cnnfast.conv2d(np.ones((2, 3, 40, 40), np.float32), np.ones((4, 3, 3, 3), np.float32), algo="direct")
print(float(y[0, 0, 0, 0]), sum("NUMBA_CACHE_DIR" in str(w.message) for w in caught))
"""


def test_cnnfast_imports_and_runs_where_numba_cannot_cache_its_kernels():
    """A read-only site-packages and no writable home: Numba refuses cache=True as the module imports ("no locator
    available"); the kernels then compile without the disk cache, with one warning."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", NO_CACHE_PROBE], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.split() == ["27.0", "1"], done.stdout + done.stderr[-2000:]


def test_threads_calling_parallel_kernels_at_once_on_numbas_workqueue_layer():
    """The workqueue layer (no OpenMP or TBB: macOS without libomp) aborted the process when two threads entered
    parallel regions at once; cnnfast runs one region at a time there."""
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    done = subprocess.run([sys.executable, "-c", WORKQUEUE_PROBE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["workqueue", "True"], done.stdout + done.stderr[-2000:]


TORCH_FIRST_PROBE = """
import sys, warnings
if sys.argv[1] == "torch-first":
    import torch
import numpy as np, cnnfast, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
        cnnfast.conv2d(np.ones((2, 16, 40, 40), np.float32), np.ones((16, 16, 3, 3), np.float32), padding=1)
print(len([w for w in caught if "Import cnnfast before torch" in str(w.message)]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GNU OpenMP's spin: Linux")
@pytest.mark.parametrize("order, env, expected", [("torch-first", {}, 1), ("cnnfast-first", {}, 0),
                                                   ("torch-first", {"GOMP_SPINCOUNT": "10000"}, 0)])
def test_torch_imported_first_is_named_once_where_its_openmp_runtime_spins(order, env, expected):
    """torch imported before cnnfast loads GNU OpenMP with its default spin, which Numba's pool then shares (the CPU
    kernels 1.2-2x slower): the first parallel launch says so, once; not when cnnfast came first or the user set the
    spin."""
    pytest.importorskip("torch")
    import subprocess
    if __import__("numba").threading_layer() != "omp":
        pytest.skip("Numba's OpenMP layer only")
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-c", TORCH_FIRST_PROBE, order], env={**clean, **env},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.split() == [str(expected)], done.stdout + done.stderr[-2000:]


def test_sized_picks_the_serial_build_below_serial_work_unless_told_otherwise():
    k, work = _parallel_kernels()["direct.direct_forward_cpu"], threads.SERIAL_WORK
    assert threads.sized(k, work - 1) is k.serial and threads.sized(k, work) is k
    with threads.only("parallel"):
        assert threads.sized(k, 1) is k
    with threads.only("serial"):
        assert threads.sized(k, 10**12) is k.serial
    assert threads.SERIAL_WORK == work


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_serial_and_parallel_builds_give_bit_identical_results(algo):
    """The same loops, compiled with and without parallel=True: a problem's result does not depend on the build."""
    from cnnfast.validate import KINDS, PRIMITIVE
    checked = 0
    for kind in KINDS:
        for case in CASES:
            if ALGORITHMS[algo].supports(case_spec(case, kind).geometry, PRIMITIVE[kind]) is not None:
                continue
            p = problem(case, kind, "float32", seed=3)
            with threads.only("serial"):
                serial = p.public(algo=algo)
            with threads.only("parallel"):
                parallel = p.public(algo=algo)
            assert np.array_equal(serial, parallel), f"{algo} {kind} {case.name}"
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("primitive", list(OPS))
@pytest.mark.parametrize("module, rows", [("direct", True), ("wide", False)])
def test_small_calls_run_the_serial_build_and_large_ones_the_parallel_build(primitive, module, rows, monkeypatch):
    """direct's row kernels (under a workspace_limit of 0) and its wide kernels alike."""
    from cnnfast.kernels.cpu import direct, wide
    names = {"direct": ("direct_forward_cpu", "direct_backward_data_cpu", "direct_backward_filter_cpu"),
             "wide": ("wide_direct_cpu", "wide_direct_cpu", "wide_direct_filter_cpu")}[module]
    name = dict(zip(OPS, names))[primitive]
    owner = {"direct": direct, "wide": wide}[module]
    real, calls = getattr(owner, name), []

    class Spy:  # the kernel, recording which build each call ran
        def __call__(self, *args):
            return calls.append("parallel") or real(*args)

        def serial(self, *args):
            return calls.append("serial") or real.serial(*args)

    monkeypatch.setattr(owner, name, Spy())
    small = Layer((1, 3, 6, 6), (3, 3, 3, 3), padding=1)  # 2,916 multiply-adds
    large = Layer((1, 8, 16, 16), (8, 8, 3, 3), padding=1)  # 147,456 >= threads.SERIAL_WORK
    limit = 0 if rows else None
    for layer, build in ((small, "serial"), (large, "parallel")):
        calls.clear()
        assert_close(layer.run(primitive, algo="direct", workspace_limit=limit), layer.expected(primitive), "float64",
                     f"{name} {build}")
        assert calls == [build]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_nonfinite_channels_finds_each_nan_and_inf_as_numpy_does(dtype):
    from cnnfast.kernels.cpu.direct import nonfinite_channels
    rng = np.random.default_rng(5)
    dy = rng.standard_normal((3, 6, 50)).astype(dtype)
    dy[0, 0, :2] = np.finfo(dtype).max  # huge but finite: v - v is still 0
    dy[2, 1, 49], dy[0, 3, 0], dy[1, 4, 7], dy[1, 4, 8] = np.nan, np.inf, -np.inf, np.inf
    assert nonfinite_channels(dy).tolist() == (~np.isfinite(dy).all(axis=(0, 2))).tolist()
    assert nonfinite_channels(dy).tolist() == [False, True, False, True, True, False]


# ---------------------------------------------------------------- 7. im2col's pointwise path (no columns)

POINTWISE = [  # (id, input shape, weight shape, options): 1x1 kernel, unit stride, no padding
    ("2d", (2, 8, 5, 6), (6, 8, 1, 1), {}),
    ("2d-groups", (2, 8, 5, 6), (6, 4, 1, 1), dict(groups=2)),
    ("2d-batch-0", (0, 8, 5, 6), (6, 8, 1, 1), {}),
    ("1d-dilated", (3, 8, 7), (4, 8, 1), dict(dilation=3)),  # dilation does not matter for a 1x1 kernel
    ("3d", (1, 4, 3, 3, 3), (8, 4, 1, 1, 1), {}),
    ("2d-small-map", (3, 64, 3, 3), (48, 64, 1, 1), {}),  # a product larger than its operands: one batch GEMM
    ("2d-small-map-groups", (2, 64, 2, 3), (64, 16, 1, 1), dict(groups=4)),
]


@pytest.mark.parametrize("primitive", OPS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("x_shape, w_shape, opts", [pytest.param(*c[1:], id=c[0]) for c in POINTWISE])
def test_pointwise_im2col_is_a_plain_gemm_without_workspace(x_shape, w_shape, opts, dtype, primitive):
    nd = len(x_shape) - 2
    spec = cnnfast.ConvSpec.create(f"conv{nd}d", x_shape, w_shape, **opts)
    assert spec.geometry.is_pointwise
    rng = np.random.default_rng(3)
    x, w, b = (rng.standard_normal(s) for s in (x_shape, w_shape, w_shape[:1]))
    dy = rng.standard_normal(spec.output_shape)
    op = f"conv{nd}d" + {"forward": "", "backward_data": "_input", "backward_filter": "_weight"}[primitive]
    args, expected = {
        "forward": ((x, w, b), reference.conv(x, w, b, **opts)),
        "backward_data": ((x_shape, w, dy), reference.conv_input(x_shape, w, dy, **opts)),
        "backward_filter": ((x, w_shape, dy), reference.conv_weight(x, w_shape, dy, **opts)),
    }[primitive]
    args = tuple(a.astype(dtype) if isinstance(a, np.ndarray) else a for a in args)
    plan = cnnfast.explain(op, *args, **opts, algo="im2col")
    kg, cg, positions = w_shape[0] // spec.groups, x_shape[1] // spec.groups, int(np.prod(x_shape[2:]))
    products = max(1, min(x_shape[0], im2col.POINTWISE_STACK))  # backward_filter: one (K/g, C/g) per sample held,
    if kg * cg > positions * (kg + cg):  # or, where a product outgrows its operands, the operands over the batch
        held = (kg + cg) * x_shape[0] * positions
    else:
        held = products * kg * cg
    assert plan.workspace_bytes == (0 if primitive != "backward_filter" else held * np.dtype(dtype).itemsize)
    fn = getattr(cnnfast, op, None) or getattr(grad, op)
    assert_close(fn(*args, **opts, algo="im2col"), expected, dtype, f"{op} pointwise")


def test_pointwise_weight_gradient_adds_the_samples_in_order_whatever_the_stack():
    """A stack of 8 samples' products at a time, or one (the workspace of one product): the same bits, since both
    add them in sample order."""
    rng = np.random.default_rng(5)
    x, dy = (rng.standard_normal(s).astype(np.float32) for s in ((11, 24, 9, 10), (11, 16, 9, 10)))
    one = 16 * 24 * 4
    assert cnnfast.explain("conv2d_weight", x, (16, 24, 1, 1), dy, algo="im2col").workspace_bytes == 8 * one
    stacked = grad.conv2d_weight(x, (16, 24, 1, 1), dy, algo="im2col")
    single = grad.conv2d_weight(x, (16, 24, 1, 1), dy, algo="im2col", workspace_limit=one)
    np.testing.assert_array_equal(stacked, single)
    assert_close(stacked, reference.conv_weight(x, (16, 24, 1, 1), dy), "float32", "conv2d_weight pointwise")


def test_transposed_output_padding_is_not_pointwise():
    """stride 1, dilation 2 allows output_padding 1: dx then has a row no output reads (the general path)."""
    x, w = np.random.default_rng(4).standard_normal((2, 4, 5, 5)), np.ones((4, 3, 1, 1))
    plan = cnnfast.explain("conv_transpose2d", x, w, dilation=2, output_padding=1, algo="im2col")
    assert not plan.spec.geometry.is_pointwise
    y = cnnfast.conv_transpose2d(x, w, dilation=2, output_padding=1, algo="im2col")
    assert_close(y, reference.conv_transpose(x, w, dilation=2, output_padding=1), "float64", "conv_transpose2d")


COVERS_INPUT = [  # (op, input shape, weight shape, options): the kernel covers the whole unpadded input
    ("conv_transpose2d", (6, 16, 1, 1), (16, 24, 4, 4), {}),  # a DCGAN generator's first layer
    ("conv_transpose2d", (5, 6, 1, 1), (6, 4, 3, 3), dict(groups=2, stride=2)),  # (the stride does not matter)
    ("conv2d", (7, 32, 4, 4), (1, 32, 4, 4), {}),  # a discriminator's last layer (thin: it was direct's)
    ("conv2d", (4, 8, 3, 5), (8, 2, 3, 5), dict(groups=4)),
    ("conv1d", (3, 4, 7), (5, 4, 7), dict(stride=3)),
    ("conv3d", (2, 3, 2, 3, 4), (8, 3, 2, 3, 4), {}),
    ("conv2d", (0, 3, 3, 3), (4, 3, 3, 3), {}),  # an empty batch
    ("conv1d", (3, 4, 1), (5, 4, 1), dict(dilation=4)),  # (a one-tap kernel's dilation reads nothing more)
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op, x_shape, w_shape, opts", COVERS_INPUT, ids=[f"{c[0]}-{c[1]}" for c in COVERS_INPUT])
def test_a_kernel_covering_the_input_is_one_gemm_over_the_batch(op, x_shape, w_shape, opts, dtype):
    """Auto takes im2col's GEMM over the batch (no columns, no workspace) for all three passes, whatever the
    channels, and each pass matches the reference (with a bias)."""
    rng = np.random.default_rng(6)
    transposed = op.startswith("conv_transpose")
    channels = w_shape[1] * opts.get("groups", 1) if transposed else w_shape[0]
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in (x_shape, w_shape, (channels,)))
    kind = "conv_transpose" if transposed else "conv"
    y = getattr(cnnfast, op)(x, w, b, **opts)
    dy = rng.standard_normal(y.shape).astype(dtype)
    calls = [(op, (x, w, b), getattr(reference, kind)(x, w, b, **opts)),
             (op + "_input", (x_shape, w, dy), getattr(reference, kind + "_input")(x_shape, w, dy, **opts)),
             (op + "_weight", (x, w_shape, dy), getattr(reference, kind + "_weight")(x, w_shape, dy, **opts))]
    for name, args, expected in calls:
        plan = cnnfast.explain(name, *args, **opts)
        assert plan.spec.geometry.covers_input and plan.algorithm == "im2col" and plan.workspace_bytes == 0
        assert "fully connected" in plan.reason and "no columns" in plan.kernels[0]
        fn = getattr(cnnfast, name, None) or getattr(grad, name)
        assert_close(fn(*args, **opts), expected, dtype, name)


def test_a_kernel_short_of_the_input_or_padded_does_not_cover_it():
    for x_shape, w_shape, opts in [((1, 2, 4, 4), (3, 2, 4, 4), dict(padding=1)),
                                   ((1, 2, 5, 4), (3, 2, 4, 4), {}),
                                   ((1, 2, 7, 4), (3, 2, 4, 4), dict(dilation=(2, 1)))]:
        assert not cnnfast.ConvSpec.create("conv2d", x_shape, w_shape, **opts).geometry.covers_input
    # a transposed convolution's output_padding adds a row no input reads: the general path
    assert not cnnfast.ConvSpec.create("conv_transpose2d", (1, 2, 1, 1), (2, 3, 4, 4), stride=2, output_padding=1,
                                       transposed=True).geometry.covers_input


DILATED_PAST_THE_INPUT = [  # a kernel as long as the input, dilated into high padding: one output, some taps outside
    ("conv2d", (2, 3, 3, 3), (4, 3, 3, 3), dict(dilation=2, padding=((0, 2), (0, 2)))),
    ("conv2d", (2, 3, 2, 2), (4, 3, 2, 2), dict(stride=2, dilation=2, padding=((0, 1), (0, 1)))),  # 'same's pads
    ("conv1d", (2, 3, 3), (4, 3, 3), dict(dilation=(1,), padding=((0, 0),))),  # (covers: the control)
    ("conv_transpose1d", (2, 3, 3), (3, 4, 3), dict(dilation=2, padding=((0, 2),))),
]


@pytest.mark.parametrize("algo", ["auto", "im2col", "direct"])
@pytest.mark.parametrize("op, x_shape, w_shape, opts", DILATED_PAST_THE_INPUT,
                         ids=[f"{c[0]}-{c[1]}" for c in DILATED_PAST_THE_INPUT])
def test_a_dilated_kernel_as_long_as_the_input_does_not_cover_it(op, x_shape, w_shape, opts, algo):
    """Its taps past the first read every dil-th element, then the high padding: not a fully connected layer (im2col
    had run it as one, reading the neighbouring elements). All three passes against the reference."""
    rng = np.random.default_rng(9)
    transposed = op.startswith("conv_transpose")
    kind = "conv_transpose" if transposed else "conv"
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    covers = cnnfast.explain(op, x, w, **opts).spec.geometry.covers_input
    assert covers == (opts.get("dilation") == (1,))
    y = getattr(reference, kind)(x, w, **opts)
    dy = rng.standard_normal(y.shape)
    assert_close(getattr(cnnfast, op)(x, w, algo=algo, **opts), y, "float64", op)
    assert_close(getattr(grad, op + "_input")(x_shape, w, dy, algo=algo, **opts),
                 getattr(reference, kind + "_input")(x_shape, w, dy, **opts), "float64", op + "_input")
    assert_close(getattr(grad, op + "_weight")(x, w_shape, dy, algo=algo, **opts),
                 getattr(reference, kind + "_weight")(x, w_shape, dy, **opts), "float64", op + "_weight")


HUGE_STRIDES = [  # a transposed conv (an input gradient) whose stride is far past its output: few positions
    ("conv_transpose1d", (1, 4, 1), (4, 1, 3), dict(stride=10 ** 7, groups=4)),  # depthwise
    ("conv_transpose1d", (1, 8, 1), (8, 8, 3), dict(stride=10 ** 6)),  # dense: direct's wide kernels
    ("conv_transpose2d", (1, 4, 1, 1), (4, 1, 3, 3), dict(stride=10 ** 4, groups=4)),
]


@pytest.mark.parametrize("algo", ["auto", "direct"])
@pytest.mark.parametrize("op, x_shape, w_shape, opts", HUGE_STRIDES, ids=[f"{c[0]}-{c[1]}" for c in HUGE_STRIDES])
def test_a_huge_stride_costs_no_more_than_the_positions(op, x_shape, w_shape, opts, algo):
    """The sub-pixel classes of the input gradient's wide kernels were one per residue of the stride, not of the
    positions: at stride 10**7 one call planned for 35 s in 4 GB (at 2**31 - 1, never finished); now classes past
    the extent are left out and more than depthwise.MAX_CLASSES go to the row kernels."""
    rng = np.random.default_rng(11)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    assert_close(getattr(cnnfast, op)(x, w, algo=algo, **opts), reference.conv_transpose(x, w, **opts), "float64", op)
    huge = cnnfast.explain(op, x_shape, w_shape, stride=2 ** 31 - 1, groups=opts.get("groups", 1))
    assert huge.algorithm in ("depthwise", "direct", "im2col")  # (planned at once)
    assert cnnfast.explain("conv_transpose1d", (1, 2, 3), (2, 3, 3), stride=2 ** 31 - 1).algorithm == "direct"


# ---------------------------------------------------------------- 8. Winograd F(4x4, 3x3)

# (id, input shape, weight shape, options): partial tiles (sizes not multiples of 4), every padding the
# transposed form turns into a negative offset (2 - pad < 0), groups, a 1x1 input, and 256 channels (the
# float32 error of the transforms grows with the channel sum; it must stay inside compare's 1e-4).
WINOGRAD_LAYERS = [
    ("odd-sizes", (2, 3, 7, 10), (5, 3, 3, 3), dict(padding=1)),
    ("valid", (1, 4, 9, 6), (8, 4, 3, 3), {}),
    ("asymmetric", (2, 4, 6, 5), (4, 4, 3, 3), dict(padding=((0, 2), (2, 1)))),
    ("pad-3", (1, 2, 5, 5), (3, 2, 3, 3), dict(padding=3)),
    ("groups-2", (2, 8, 8, 9), (12, 4, 3, 3), dict(padding=1, groups=2)),
    ("1x1-input", (3, 4, 1, 1), (6, 4, 3, 3), dict(padding=1)),
    ("256-channels", (1, 256, 6, 6), (256, 256, 3, 3), dict(padding=1)),
    # 3-D: T x 3 x 3 filters, the depth taps in the GEMMs' inner axis; depth padding, even one that leaves an
    # output slice no input slice (only the bias; and in the transposed form a crop), asymmetric, one and five
    # depth taps, and 64 channels x 27 taps for the float32 error
    ("3-D", (2, 3, 5, 7, 6), (4, 3, 3, 3, 3), dict(padding=1)),
    ("3-D-asymmetric", (1, 4, 7, 5, 9), (6, 4, 2, 3, 3), dict(padding=((2, 0), (1, 1), (0, 1)))),
    ("3-D-pad-4-of-2-slices", (2, 2, 2, 4, 4), (3, 2, 3, 3, 3), dict(padding=(4, 1, 1))),
    ("3-D-pad-3-groups-2", (1, 4, 3, 6, 6), (6, 2, 3, 3, 3), dict(padding=3, groups=2)),
    ("3-D-one-depth-tap", (2, 3, 2, 6, 5), (4, 3, 1, 3, 3), dict(padding=(0, 1, 1))),
    ("3-D-5-depth-taps", (1, 3, 6, 5, 5), (4, 3, 5, 3, 3), dict(padding=(1, 1, 1))),
    ("3-D-64-channels", (1, 64, 4, 6, 6), (64, 64, 3, 3, 3), dict(padding=1)),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("primitive", list(OPS))
@pytest.mark.parametrize("x_shape, w_shape, opts", [pytest.param(*c[1:], id=c[0]) for c in WINOGRAD_LAYERS])
def test_winograd_matches_the_reference(x_shape, w_shape, opts, primitive, dtype):
    layer = Layer(x_shape, w_shape, seed=8, dtype=dtype, **opts)
    assert layer.explain(primitive, algo="winograd").algorithm == "winograd"
    assert_close(layer.run(primitive, algo="winograd"), layer.expected(primitive), dtype,
                 f"{OPS[primitive]} winograd {x_shape} {opts}")


@pytest.mark.parametrize("primitive", list(OPS))
def test_winograd_3d_blocks_of_tile_rows_under_a_small_workspace_limit(primitive):
    """Blocks of one tile row of every depth slice, tile rows crossing samples."""
    layer = Layer((2, 3, 4, 9, 10), (5, 3, 3, 3, 3), seed=11, padding=(2, 1, 1))
    smallest, full = _smallest_accepted_limit(layer, primitive, "winograd")
    assert smallest < full
    assert_close(layer.run(primitive, algo="winograd", workspace_limit=smallest), layer.expected(primitive),
                 "float64", f"{OPS[primitive]} 3-D winograd, one tile row per block")


@pytest.mark.parametrize("primitive, source, padding", [
    *((p, "dy" if p == "backward_data" else "x", 1) for p in OPS),
    ("backward_filter", "dy", 1),
    # output slice 2 reads only depth padding: its dy slice meets x in no GEMM, only padding (NaN x 0 in PyTorch)
    ("backward_filter", "dy", ((0, 3), (1, 1), (1, 1)))])
def test_winograd_3d_non_finite_values_land_where_the_reference_puts_them(primitive, source, padding):
    """A NaN and an inf in a 3-D layer's input, dy or x: the result is recomputed (im2col), so each non-finite
    output is where the float64 reference has it, and every other output matches."""
    layer = Layer((1, 3, 2, 6, 7), (4, 3, 3, 3, 3), seed=12, padding=padding)
    data = getattr(layer, source)
    data[0, 1, -1, 3, 4], data[0, 0, -1, 0, 0] = np.nan, np.inf
    with np.errstate(invalid="ignore"):  # (the reference's inf x 0)
        got, want = layer.run(primitive, algo="winograd"), layer.expected(primitive)
    assert not np.isfinite(want).all()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    assert_close(np.where(finite, got, 0), np.where(finite, want, 0), "float64", f"{OPS[primitive]} 3-D winograd")


@pytest.mark.parametrize("padding, output_padding", [(0, 0), (1, 0), (3, 1)])
def test_winograd_transposed_convolution_matches_the_reference(padding, output_padding):
    """conv_transpose2d (backward_data): the flipped filter runs with offset 2 - padding, cropping dy when < 0."""
    rng = np.random.default_rng(9)
    x, w, b = rng.standard_normal((2, 6, 5, 7)), rng.standard_normal((6, 4, 3, 3)), rng.standard_normal(4)
    opts = dict(padding=padding, output_padding=output_padding, dilation=1, stride=1 + output_padding)
    if output_padding:  # output_padding needs stride > 1, which winograd refuses: auto falls back
        assert cnnfast.explain("conv_transpose2d", x, w, b, **opts).algorithm != "winograd"
        return
    y = cnnfast.conv_transpose2d(x, w, b, **opts, algo="winograd")
    assert_close(y, reference.conv_transpose(x, w, b, **opts), "float64", f"conv_transpose2d padding={padding}")


@pytest.mark.parametrize("primitive", list(OPS))
def test_winograd_blocks_of_tile_rows_under_a_small_workspace_limit(primitive, monkeypatch):
    """The smallest accepted limit leaves one tile row per block (tile rows cross samples and TASK_TILES)."""
    from cnnfast.kernels.cpu import winograd
    layer = Layer((3, 4, 9, 70), (5, 4, 3, 3), seed=10, padding=1)  # 3 tile rows per sample, 18 tiles per row
    smallest, full = _smallest_accepted_limit(layer, primitive, "winograd")
    assert smallest < full
    blocks = []
    real = winograd.input_transform_cpu
    monkeypatch.setattr(winograd, "input_transform_cpu",
                        lambda x, V, segments, *rest: blocks.append(segments.copy()) or real(x, V, segments, *rest))
    monkeypatch.setattr(winograd, "TASK_TILES", 36)  # at most two tile rows per task
    assert_close(layer.run(primitive, algo="winograd", workspace_limit=smallest), layer.expected(primitive),
                 "float64", f"{OPS[primitive]} winograd, one tile row per block")
    assert [b.tolist() for b in blocks] == [[[n, i, i + 1, 0]] for n in range(3) for i in range(3)]
    blocks.clear()
    assert_close(layer.run(primitive, algo="winograd"), layer.expected(primitive), "float64", "one block")
    assert [b.tolist() for b in blocks] == [[[0, 0, 2, 0], [0, 2, 3, 36], [1, 0, 2, 54], [1, 2, 3, 90],
                                             [2, 0, 2, 108], [2, 2, 3, 144]]]


@pytest.mark.parametrize("primitive, x_shape, w_shape, opts, why", [
    ("backward_filter", (1, 4, 8, 8), (4, 4, 3, 3), dict(stride=2), r"unit stride .*, got stride \(1, 2, 2\)"),
    ("forward", (1, 4, 8, 8), (4, 4, 3, 3), dict(stride=2), "unit stride and dilation"),
    ("backward_data", (1, 4, 8, 8), (4, 4, 3, 3), dict(dilation=2), r"dilation \(1, 2, 2\)"),
    ("forward", (1, 4, 5, 8, 8), (4, 4, 3, 3, 3), dict(stride=(2, 1, 1)), r"got stride \(2, 1, 1\)"),
    ("backward_filter", (1, 4, 5, 8, 8), (4, 4, 3, 3, 3), dict(dilation=(2, 1, 1)), r"dilation \(2, 1, 1\)"),
    ("forward", (1, 4, 8, 8), (4, 4, 5, 5), {}, "3x3 filter across height and width, got 1x5x5"),
    ("forward", (1, 4, 8), (4, 4, 3), {}, "3x3 filter across height and width, got 1x1x3"),
    ("forward", (1, 4, 5, 8, 8), (4, 4, 3, 1, 3), {}, "3x3 filter across height and width, got 3x1x3"),
])
def test_winograd_refuses_what_it_cannot_compute(primitive, x_shape, w_shape, opts, why):
    layer_op = f"conv{len(x_shape) - 2}d" + {"forward": "", "backward_data": "_input",
                                             "backward_filter": "_weight"}[primitive]
    spec = cnnfast.ConvSpec.create(f"conv{len(x_shape) - 2}d", x_shape, w_shape, **opts)
    args = {"forward": (x_shape, w_shape), "backward_data": (x_shape, w_shape, spec.output_shape),
            "backward_filter": (x_shape, w_shape, spec.output_shape)}[primitive]
    with pytest.raises(ValueError, match=f"{layer_op}: algo='winograd' cannot run this problem on cpu: .*{why}"):
        cnnfast.explain(layer_op, *args, **opts, algo="winograd")


# ---------------------------------------------------------------- 9. blas.matmul: GEMMs shared out by cnnfast

class _FakeOpenBLAS(blas.OpenBLAS):
    """Reports `threads` and records set_num_threads; the real BLAS computes (with its own thread count)."""

    def __init__(self, threads):
        self.threads, self.sets = threads, []
        super().__init__(lambda: self.threads, self._set)

    def _set(self, n):
        self.sets.append(n)
        self.threads = n


MATMULS = {  # name: (a shape, b shape)
    "stack-of-36": ((36, 1, 6, 5), (36, 1, 5, 40)),  # 5 threads: 8, 7, 7, 7, 7
    "stack-of-9": ((9, 6, 5), (9, 5, 40)),  # 2 threads: 5 and 4; 3: 3 each; 4 and 5: not by the stack
    "stack-broadcast-a": ((6, 5), (4, 5, 40)),
    "stack-of-3": ((3, 6, 5), (3, 5, 40)),
    "rows": ((70, 9), (9, 33)),
    "columns": ((7, 9), (9, 100)),
    "too-narrow": ((7, 9), (9, 20)),
}


def _operands(name, dtype, rng):
    a_shape, b_shape = MATMULS[name]
    a = rng.standard_normal(a_shape).astype(dtype)
    b = np.asfortranarray(rng.standard_normal(b_shape).astype(dtype))  # any strides
    shape = np.broadcast_shapes(a_shape[:-2], b_shape[:-2]) + (a_shape[-2], b_shape[-1])
    big = np.full(shape[:-1] + (shape[-1] + 3,), np.nan, dtype)
    return a, b, big, big[..., 1:-2]  # out: a strided view; its neighbours must stay NaN


@pytest.mark.parametrize("spin", [True, False])
@pytest.mark.parametrize("threads", [2, 3, 5])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", MATMULS)
def test_blas_matmul_is_np_matmul_bit_for_bit_and_restores_the_thread_count(name, dtype, threads, spin,
                                                                             monkeypatch):
    fake = _FakeOpenBLAS(threads)
    monkeypatch.setattr(blas, "openblas", lambda: fake)
    monkeypatch.setattr(blas, "SPLIT_WORK", 0)
    monkeypatch.setattr(blas, "OPENBLAS_SINGLE", -1)
    monkeypatch.setattr(blas, "WORKERS_SPIN", spin)
    a, b, big, out = _operands(name, dtype, np.random.default_rng(threads))
    assert blas.matmul(a, b, out) is out
    np.testing.assert_array_equal(out, np.matmul(a, b))
    assert np.isnan(big[..., 0]).all() and np.isnan(big[..., -2:]).all()
    stack = out.ndim > 2 and (out.shape[0] % threads == 0 or out.shape[0] >= 4 * threads)
    cut = stack or spin or blas.cblas() is not None  # (on Numba's threads, or share()'s: more than Numba has)
    assert fake.sets == ([1, threads] if cut else [])  # else one GEMM on OpenBLAS's threads


@pytest.mark.skipif(blas.cblas() is None, reason="no cblas found in NumPy's OpenBLAS")
@two_numba_threads
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("a_shape, b_shape, a_order, b_order, out_view", [
    ((70, 9), (9, 33), "C", "C", "C"),
    ((70, 9), (9, 33), "F", "F", "C"),                  # both transposed for cblas
    ((7, 9), (9, 100), "C", "F", "strided"),            # out's rows padded (ldc > N)
    ((40, 9), (9, 20), "F", "C", "F"),                  # out column-major: out^T = b^T @ a^T
    ((100, 9), (9, 200), "C", "C", "C"),                # fewer rows than columns, cut by rows (a small inner size)
    ((1, 9), (9, 40), "C", "C", "C"),                   # a single row, a single column
    ((40, 9), (9, 1), "F", "C", "C"),
    ((6, 5), (4, 5, 40), "C", "C", "C"),                # a stack, a broadcast
    ((1, 6, 5), (1, 1, 5, 40), "C", "T", "strided"),    # a stack of one product (im2col's 1x1 layers at batch 1)
    ((2, 3, 6, 5), (3, 5, 40), "T", "C", "strided"),    # a stack of two axes, its matrices transposed
])
def test_gemms_on_numba_threads_are_np_matmul_for_every_layout_and_cut(a_shape, b_shape, a_order, b_order, out_view,
                                                                       dtype):
    """blas.gemms_cpu (OpenBLAS's cblas ?gemm in a Numba parallel region) cut by the stack, the rows or the columns
    gives np.matmul's result, the same bits as share()'s parts (each on one OpenBLAS thread), whatever the strides,
    and writes nothing outside out."""
    rng = np.random.default_rng(len(a_shape) * 10 + len(b_shape))
    def matrices(shape, order):  # "T": each matrix the transpose of a C-ordered one
        if order == "T":
            return np.asarray(rng.standard_normal(shape[:-2] + shape[:-3:-1]), dtype).swapaxes(-1, -2)
        return np.asarray(rng.standard_normal(shape), dtype, order=order)
    a, b = matrices(a_shape, a_order), matrices(b_shape, b_order)
    shape = np.broadcast_shapes(a_shape[:-2], b_shape[:-2]) + (a_shape[-2], b_shape[-1])
    big = np.full(shape[:-1] + (shape[-1] + 3,), np.nan, dtype)
    out = {"C": np.full(shape, np.nan, dtype), "F": np.asfortranarray(np.full(shape, np.nan, dtype)),
           "strided": big[..., 1:-2]}[out_view]
    pieces = blas.parts(a, b, expected := np.empty(shape, dtype), 2, True)
    blas.share(lambda k: np.matmul(*pieces[k][:2], out=pieces[k][2]), len(pieces))
    for axis in (blas.STACK, blas.ROWS, blas.COLUMNS) if len(shape) > 2 else (blas.ROWS, blas.COLUMNS):
        out[...] = np.nan
        assert blas._on_numba_threads(a, b, out, 2, axis)
        np.testing.assert_allclose(out, np.matmul(a, b), rtol=1e-5 if dtype == "float32" else 1e-12)
        if axis == blas._cut(out, 2, True, a.shape[-1]) and 1 not in shape[-2:]:  # (OpenBLAS's small-matrix
            np.testing.assert_array_equal(out, expected)  # kernels may round another cut otherwise; NumPy takes a
        assert np.isnan(big[..., 0]).all() and np.isnan(big[..., -2:]).all()  # row or a column to gemv)


def test_products_of_a_small_inner_size_and_few_columns_are_cut_by_rows():
    """blas.ROWS_INNER's rule, on 2 threads: rows where OpenBLAS took up to 2.4x longer over column halves
    (MobileNetV2's 32 -> 192 @28 at batch 1: 192 x 32 x 784), columns where they won (a large inner size, many
    columns, few rows)."""
    def cut(m, k, n):
        return blas._cut(np.empty((1, m, n), np.float32), 2, True, k)
    assert cut(192, 32, 784) == cut(144, 24, 784) == cut(96, 96, 1568) == blas.ROWS
    assert cut(192, 576, 784) == cut(192, 32, 3136) == cut(64, 32, 784) == cut(16, 32, 12544) == blas.COLUMNS


def test_gemms_on_numba_threads_refuse_what_cblas_cannot_take():
    """Strides with no unit axis, overlapping operands, mixed dtypes or nothing to multiply: np.matmul's way."""
    a, b, out = np.ones((8, 6)), np.ones((6, 10)), np.empty((8, 10))
    fixed = np.empty((8, 10))
    fixed.flags.writeable = False
    for args in ((a[:, ::2], b[::2], out), (a, b, np.empty((20, 10))[::2]), (a, b.astype(np.float32), out),
                 (a, b, np.empty((8, 0))), (np.ones((8, 0)), np.ones((0, 10)), out), (a, b, fixed),
                 (a.astype(">f8"), b.astype(">f8"), out.astype(">f8"))):
        assert not blas._on_numba_threads(*args, 2, blas.ROWS)


@pytest.fixture
def lp64(monkeypatch):
    """cnnfast's cblas paths on an OpenBLAS with 32-bit sizes (LP64, as conda's libopenblas is): scipy-openblas32's,
    found by cblas() as NumPy's would be, its thread count the one blas sets to one meanwhile. NumPy's own GEMMs
    (the comparisons) stay on NumPy's OpenBLAS."""
    import ctypes
    import glob
    openblas32 = pytest.importorskip("scipy_openblas32")
    path = sorted(glob.glob(os.path.join(openblas32.get_lib_dir(), "*openblas*.*")))[0]
    monkeypatch.setattr(blas, "_openblas_paths", lambda: [path])
    found = blas.cblas.__wrapped__()
    assert found is not None and found[2] is False  # plain symbols, no USE64BITINT in its configuration
    lib = ctypes.CDLL(path)
    get, set_ = lib.scipy_openblas_get_num_threads, lib.scipy_openblas_set_num_threads
    get.restype, get.argtypes, set_.restype, set_.argtypes = ctypes.c_int, [], None, [ctypes.c_int]
    set_(2)
    monkeypatch.setattr(blas, "openblas", lambda: blas.OpenBLAS(get, set_))
    monkeypatch.setattr(blas, "cblas", lambda: found)
    return found


def test_cblas_tells_an_ilp64_build_from_its_symbols():
    if blas.openblas() is None or blas.cblas() is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS with cblas found here")
    assert blas.cblas()[2] is True  # NumPy 2's scipy-openblas64: the 64_ symbols


@two_numba_threads
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gemms_on_numba_threads_take_an_lp64_openblas(lp64, dtype):
    """The same layouts and cuts through a 32-bit-size cblas: np.matmul's result (another library: to rounding),
    nothing written outside out; sizes past 2**31 - 1 are refused before any call (np.matmul's way)."""
    rng = np.random.default_rng(7)
    for (a_shape, b_shape), out_view in ((((70, 9), (9, 33)), "C"), (((7, 9), (9, 100)), "strided"),
                                         (((40, 9), (9, 20)), "F"), (((6, 5), (4, 5, 40)), "C")):
        a, b = rng.standard_normal(a_shape).astype(dtype), rng.standard_normal(b_shape).astype(dtype)
        shape = np.broadcast_shapes(a_shape[:-2], b_shape[:-2]) + (a_shape[-2], b_shape[-1])
        big = np.full(shape[:-1] + (shape[-1] + 3,), np.nan, dtype)
        out = {"C": np.full(shape, np.nan, dtype), "F": np.asfortranarray(np.full(shape, np.nan, dtype)),
               "strided": big[..., 1:-2]}[out_view]
        for axis in (blas.STACK, blas.ROWS, blas.COLUMNS) if len(shape) > 2 else (blas.ROWS, blas.COLUMNS):
            out[...] = np.nan
            assert blas._on_numba_threads(a, b, out, 2, axis)
            np.testing.assert_allclose(out, np.matmul(a, b), rtol=1e-5 if dtype == "float32" else 1e-12)
            assert np.isnan(big[..., 0]).all() and np.isnan(big[..., -2:]).all()
    wide = np.lib.stride_tricks.as_strided(np.ones(1, dtype), (4, 3), (2 ** 31 * np.dtype(dtype).itemsize, 0))
    assert not blas._on_numba_threads(wide, np.ones((3, 5), dtype), np.empty((4, 5), dtype), 2, blas.ROWS)


@pytest.mark.parametrize("primitive", ["forward", "backward_filter"])
@pytest.mark.parametrize("name", ["stem-like", "3d-groups"])
def test_im2col_chunks_take_an_lp64_openblas(lp64, name, primitive, monkeypatch):
    """im2col's chunks through a 32-bit-size cblas: the reference's result; a layer with more output positions than
    such a cblas takes runs as column blocks."""
    x, w, dy, opts = _fused_case(name, "float32")
    monkeypatch.setattr(im2col, "FUSED_WORK", 0)
    monkeypatch.setattr(im2col, "CHUNK_POSITIONS", 1)
    monkeypatch.setattr(im2col, "CHUNK_BYTES", 7 * int(np.prod(w.shape[1:])) * x.itemsize)
    g = cnnfast.ConvSpec.create(f"conv{x.ndim - 2}d", x.shape, w.shape, **opts).geometry
    assert 0 < im2col._chunk(g, primitive, x.itemsize, None)
    expected = (reference.conv(x.astype(np.float64), w.astype(np.float64), **opts) if primitive == "forward" else
                reference.conv_weight(x.astype(np.float64), w.shape, dy.astype(np.float64), **opts))
    for build in ("parallel", "serial"):
        with threads.only(build):
            assert_close(_fused_run(primitive, x, w, dy, opts), expected, "float32", f"{name} {primitive} LP64")
    huge = cnnfast.ConvSpec.create("conv1d", (1, 3, 2 ** 31 + 10), (8, 3, 3)).geometry
    assert im2col._chunk(huge, primitive, 4, None) == 0
    monkeypatch.setattr(blas, "cblas", lambda: lp64[:2] + (True,))
    assert im2col._chunk(huge, primitive, 4, None) > 0  # (with 64-bit sizes it would run in chunks)


@pytest.mark.parametrize("overlap", ["a", "b"])
def test_blas_matmul_into_an_operand_is_np_matmul(overlap, monkeypatch):
    """out overlapping an input runs whole, as np.matmul (which copies): its cut parts would race."""
    monkeypatch.setattr(blas, "SPLIT_WORK", 0)
    monkeypatch.setattr(blas, "SHARE_WORK", 0)
    monkeypatch.setattr(blas, "OPENBLAS_SINGLE", -1)
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((64, 64)), rng.standard_normal((64, 64))
    expected = a @ b
    np.testing.assert_allclose(blas.matmul(a, b, a if overlap == "a" else b), expected, rtol=1e-12)


@pytest.mark.parametrize("threads", [2, 3, 4, 5])
@pytest.mark.parametrize("name", MATMULS)
def test_blas_parts_cover_the_output_once_along_the_documented_axis(name, threads):
    a, b, _, out = _operands(name, "float32", np.random.default_rng(0))
    hits = np.zeros(out.shape, np.int64)
    pieces = blas.parts(a, b, hits, threads, cut_2d=True)
    for pa, pb, po in pieces:
        po += 1
        assert np.matmul(pa, pb).shape == po.shape
    assert (hits == 1).all()
    # the documented rule: the stack when it divides evenly or has 4 products per thread, else rows when M >= N,
    # else aligned columns
    stack, (M, N) = out.shape[:-2], out.shape[-2:]
    by_stack = bool(stack) and (stack[0] % threads == 0 or stack[0] >= 4 * threads)
    stack_only = blas.parts(a, b, hits, threads, cut_2d=False)  # [] unless out is a stack cut so
    assert [po.shape for _, _, po in stack_only] == ([po.shape for _, _, po in pieces] if by_stack else [])
    if by_stack:
        lengths = [po.shape[0] for _, _, po in pieces]
        assert len(pieces) == threads and max(lengths) - min(lengths) <= 1
    elif M >= N:
        assert len(pieces) == threads and all(po.shape[-1] == N for _, _, po in pieces)
    elif N >= threads * blas.COLUMN_ALIGN:
        assert len(pieces) == threads and all(po.shape[-2] == M for _, _, po in pieces)
        assert all((po.ctypes.data - hits.ctypes.data) % (8 * blas.COLUMN_ALIGN) == 0 for _, _, po in pieces)
    else:
        assert len(pieces) == 1


@pytest.mark.parametrize("m, calls", [(4, []), (40, [1, 2])])  # 4*m*6 outputs x 5: 480 and 4,800 multiply-adds
def test_blas_matmul_leaves_small_products_to_openblas_and_runs_mid_sized_ones_whole_on_one_thread(m, calls,
                                                                                                   monkeypatch):
    fake = _FakeOpenBLAS(2)
    monkeypatch.setattr(blas, "openblas", lambda: fake)
    monkeypatch.setattr(blas, "OPENBLAS_SINGLE", 1_000)
    monkeypatch.setattr(blas, "SPLIT_WORK", 100_000)
    a, b = np.ones((4, m, 5)), np.ones((4, 5, 6))
    assert (blas.matmul(a, b, np.empty((4, m, 6))) == 5).all()
    assert fake.sets == calls


@pytest.mark.parametrize("region", [True, False])
@pytest.mark.parametrize("m, spin", [(100, False), (100, True), (1000, False), (1000, True), (10000, False),
                                     (10000, True)])  # 3,000, 30,000 and 300,000 multiply-adds
def test_blas_matmul_runs_a_2d_product_by_its_size_and_openblas_workers_spin(m, spin, region, monkeypatch):
    """Below THREADS_WORK one part on one thread; from SPLIT_WORK cut, the parts on Numba's threads (cblas found),
    else from SHARE_WORK on share()'s when OpenBLAS's workers spin; between them OpenBLAS's threads when its
    workers sleep after a GEMM, else one part."""
    if region and blas.cblas() is None:
        pytest.skip("no cblas found in NumPy's OpenBLAS")
    if region and numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads (a one-core machine, or NUMBA_NUM_THREADS=1: no GEMM is cut then)")
    fake = _FakeOpenBLAS(2)
    monkeypatch.setattr(blas, "openblas", lambda: fake)
    if not region:
        monkeypatch.setattr(blas, "cblas", lambda: None)
    monkeypatch.setattr(blas, "OPENBLAS_SINGLE", 1_000)
    monkeypatch.setattr(blas, "THREADS_WORK", 10_000)
    monkeypatch.setattr(blas, "SPLIT_WORK", 10_000 if region else 10 ** 9)
    monkeypatch.setattr(blas, "SHARE_WORK", 100_000)
    monkeypatch.setattr(blas, "WORKERS_SPIN", spin)
    shares, regions = [], []
    real_share, real_region = blas.share, blas._on_numba_threads
    monkeypatch.setattr(blas, "share", lambda task, parts: shares.append(parts) or real_share(task, parts))
    monkeypatch.setattr(blas, "_on_numba_threads", lambda *args: regions.append(args[3]) or real_region(*args))
    assert (blas.matmul(np.ones((m, 5)), np.ones((5, 6)), np.empty((m, 6))) == 5).all()
    cut = m >= 1000 if region else m == 10000 and spin  # (SHARE_WORK monkeypatched away when region)
    whole = not cut and (m == 100 or spin)
    assert regions == ([2] if cut and region else [])
    assert shares == ([2] if cut and not region else [1] if whole else [])
    assert fake.sets == ([1, 2] if cut or whole else [])


def test_blas_matmul_raises_a_parts_error_after_restoring_the_thread_count(monkeypatch):
    fake = _FakeOpenBLAS(2)
    monkeypatch.setattr(blas, "openblas", lambda: fake)
    monkeypatch.setattr(blas, "SPLIT_WORK", 0)
    monkeypatch.setattr(blas, "OPENBLAS_SINGLE", -1)
    monkeypatch.setattr(blas, "WORKERS_SPIN", False)
    with pytest.raises(ValueError):
        blas.matmul(np.ones((4, 3, 5)), np.ones((4, 6, 2)), np.empty((4, 3, 2)))  # 5 != 6: each part fails
    assert fake.sets == [1, 2]


def test_blas_matmul_runs_concurrent_callers_correctly(monkeypatch):
    """Two threads at once: one splits, the other waits for it; both right."""
    import threading
    monkeypatch.setattr(blas, "SPLIT_WORK", 0)
    monkeypatch.setattr(blas, "OPENBLAS_SINGLE", -1)
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((8, 40, 30)), rng.standard_normal((8, 30, 50))
    expected, errors = np.matmul(a, b), []
    before = blas.openblas().get_num_threads() if blas.openblas() else None

    def work():
        for _ in range(50):
            out = np.empty_like(expected)
            if not np.array_equal(blas.matmul(a, b, out), expected):
                errors.append("mismatch")
    workers = [threading.Thread(target=work) for _ in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert errors == []
    assert (blas.openblas().get_num_threads() if blas.openblas() else None) == before


def test_a_thread_count_set_during_a_share_is_kept(monkeypatch):
    """A count someone else sets while a share has OpenBLAS on one thread (threadpoolctl in another thread) is not
    overwritten by the share's restore; the share's own one-thread setting is."""
    fake = _FakeOpenBLAS(2)
    monkeypatch.setattr(blas, "openblas", lambda: fake)
    blas.share(lambda k: k == 1 and fake.set_num_threads(3), 2)
    assert fake.threads == 3 and fake.sets == [1, 3]
    blas.share(lambda k: None, 3)
    assert fake.threads == 3 and fake.sets == [1, 3, 1, 3]


@pytest.mark.parametrize("when", ["before setting one thread", "after setting one thread", "in a part"])
def test_an_exception_anywhere_in_a_share_leaves_the_thread_count_and_its_state_as_found(when, monkeypatch):
    """An exception (a KeyboardInterrupt) between the share's bookkeeping and its try left threads() reading a share
    that had ended (its generation odd: every later CPU op spun forever) or OpenBLAS on one thread for good."""
    fake = _FakeOpenBLAS(2)
    monkeypatch.setattr(blas, "openblas", lambda: fake)
    real_set = fake.set_num_threads

    def interrupted(n):
        if when == "after setting one thread":
            real_set(n)
        raise KeyboardInterrupt
    if when != "in a part":
        monkeypatch.setattr(fake, "set_num_threads", lambda n: interrupted(n) if n == 1 else real_set(n))

    def task(k):
        if when == "in a part":
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        blas.share(task, 2)
    assert fake.threads == 2 and blas._generation % 2 == 0 and blas._shared_count is None
    assert blas.threads() == 2 and blas._lock.acquire(timeout=1)
    blas._lock.release()


def test_a_share_cut_short_in_its_end_is_set_back_by_the_next_share(monkeypatch):
    """A KeyboardInterrupt is raised when a ctypes call returns: one at the end's read of OpenBLAS's count skipped
    the rest of the end, leaving OpenBLAS on one thread (the user's own GEMMs too) for good; the next share sets it
    back first."""
    fake = _FakeOpenBLAS(2)
    monkeypatch.setattr(blas, "openblas", lambda: fake)
    real_get, reads = fake.get_num_threads, []

    def get():
        reads.append(1)
        if len(reads) == 2:  # (the share's start reads it, then its end)
            raise KeyboardInterrupt
        return real_get()
    monkeypatch.setattr(fake, "get_num_threads", get)
    with pytest.raises(KeyboardInterrupt):
        blas.share(lambda k: None, 2)
    assert fake.threads == 1 and blas._generation % 2 == 1  # (as a Ctrl-C there left it)
    blas.share(lambda k: None, 2)
    assert fake.threads == 2 and blas._generation % 2 == 0 and blas._shared_count is None and blas.threads() == 2


def test_cpu_results_are_the_same_bits_while_another_thread_runs_cnnfast():
    """OpenBLAS's one- and two-thread GEMMs round differently: a GEMM planned for OpenBLAS's threads must not run
    while another thread's share has OpenBLAS on one (about 1 call in 10 differed here before)."""
    import threading
    rng = np.random.default_rng(0)
    x, w, dy = (rng.standard_normal(s).astype(np.float32) for s in ((4, 32, 28, 28), (64, 32, 3, 3), (4, 64, 14, 14)))
    xf, wf = (rng.standard_normal(s).astype(np.float32) for s in ((2, 16, 28, 28), (64, 16, 7, 7)))
    calls = [lambda: grad.conv2d_weight(x, w.shape, dy, stride=2, padding=1, algo="im2col"),
             lambda: cnnfast.conv2d(xf, wf, padding=3, algo="im2col")]
    alone = [f() for f in calls]
    xa, wa = rng.standard_normal((2, 32, 40, 40)).astype(np.float32), rng.standard_normal((32, 32, 3, 3))
    stop = threading.Event()

    def winograd():  # its 36 GEMMs per call run through blas.share
        while not stop.is_set():
            cnnfast.conv2d(xa, wa.astype(np.float32), padding=1, algo="winograd")
    other = threading.Thread(target=winograd)
    other.start()
    try:
        differ = sum(not np.array_equal(f(), a) for _ in range(40) for f, a in zip(calls, alone))
    finally:
        stop.set()
        other.join()
    assert differ == 0


@pytest.mark.skipif("openblas" not in blas._numpy_blas_name(), reason="NumPy's BLAS is not OpenBLAS")
def test_a_gemm_on_openblas_threads_waits_for_another_threads_share(monkeypatch):
    """The mechanism behind the test above, made deterministic: a share in progress in another thread (OpenBLAS on
    one thread) holds back a GEMM planned for OpenBLAS's threads, which then gives np.matmul's bits."""
    import threading
    if blas.openblas().get_num_threads() < 2:
        pytest.skip("OpenBLAS runs on one thread")
    monkeypatch.setattr(blas, "WORKERS_SPIN", False)  # a 2-D product is then one GEMM on OpenBLAS's threads
    monkeypatch.setattr(blas, "cblas", lambda: None)  # (not cut for Numba's threads)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((288, 784)).astype(np.float32), rng.standard_normal((784, 64)).astype(np.float32)
    expected = np.matmul(a, b)
    started, release, result = threading.Event(), threading.Event(), {}
    sharing = threading.Thread(target=blas.share, args=(lambda k: k or (started.set(), release.wait(30)), 2))
    sharing.start()
    assert started.wait(30)
    gemm = threading.Thread(target=lambda: result.update(out=blas.matmul(a, b, np.empty_like(expected))))
    gemm.start()
    gemm.join(0.5)
    waited = gemm.is_alive()
    release.set()
    sharing.join(30)
    gemm.join(30)
    assert waited
    np.testing.assert_array_equal(result["out"], expected)


SHUTDOWN_PROBE = """
import threading, time, numpy as np, cnnfast
from cnnfast.kernels.cpu import blas
blas.SPLIT_WORK, blas.SHARE_WORK, blas.OPENBLAS_SINGLE, blas.cblas = 0, 0, -1, lambda: None  # share()'s threads
x, w = np.random.rand(2, 8, 12, 12).astype(np.float32), np.random.rand(8, 8, 3, 3).astype(np.float32)
def worker():
    time.sleep(0.3)  # past the main thread's end: the interpreter has shut its executors down
    print(bool(np.isfinite(cnnfast.conv2d(x, w, padding=1, algo="winograd")).all()))
cnnfast.conv2d(x, w, padding=1, algo="winograd")
threading.Thread(target=worker).start()
"""


def test_a_thread_running_past_the_main_threads_end_completes_its_calls():
    """A non-daemon thread still calling cnnfast after the main thread returned (a server's worker): its shares
    run their parts on its own thread (the executor refuses new work then)."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", SHUTDOWN_PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["True"], done.stdout + done.stderr


FORK_PROBE = """
import os
import sys
import time
import numpy as np
from cnnfast.kernels.cpu import blas
from test_cpu_kernels import _FakeOpenBLAS
blas.openblas = lambda: _FakeOpenBLAS(2)
blas.SPLIT_WORK, blas.SHARE_WORK, blas.OPENBLAS_SINGLE = 0, 0, -1
if sys.argv[1] == "share":  # share()'s threads, not Numba's
    blas.cblas = lambda: None
a, b = np.ones((36, 4, 3)), np.ones((36, 3, 5))
blas.matmul(a, b, np.empty((36, 4, 5)))  # the parent's worker thread exists now
pid = os.fork()
if pid == 0:
    os._exit(0 if (blas.matmul(a, b, np.empty((36, 4, 5))) == 3).all() else 1)
for _ in range(600):  # up to 60 s, then the child is taken to hang and killed
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print(status)
        break
    time.sleep(0.1)
else:
    os.kill(pid, 9)
    print("hung")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
@pytest.mark.parametrize("threads", ["share", "numba"])
def test_blas_matmul_works_in_a_forked_child(threads):
    """A child forked after a split (a DataLoader worker, multiprocessing's fork) starts its own worker threads:
    the parent's executor would queue the child's parts to threads that are not there, and wait forever; a Numba
    region there (GNU OpenMP after fork) would end the child: it runs the serial build."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", FORK_PROBE, threads], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(__file__))
    assert done.returncode == 0 and done.stdout.split() == ["0"], done.stdout + done.stderr


@pytest.mark.skipif("openblas" not in blas._numpy_blas_name(), reason="NumPy's BLAS is not OpenBLAS")
def test_numpys_openblas_is_found_and_split_on_its_threads(monkeypatch):
    lib = blas.openblas()
    assert lib is not None
    threads = lib.get_num_threads()
    monkeypatch.setattr(blas, "SHARE_WORK", 0)
    monkeypatch.setattr(blas, "OPENBLAS_SINGLE", -1)
    monkeypatch.setattr(blas, "cblas", lambda: None)  # (share()'s threads: not cut for Numba's)
    a, b = np.ones((36, 4, 3), np.float32), np.ones((36, 3, 5), np.float32)
    out = blas.matmul(a, b, np.empty((36, 4, 5), np.float32))
    assert (out == 3).all() and lib.get_num_threads() == threads
    if threads > 1:  # the parts after the first ran on this module's workers
        assert threads in blas._pools


@pytest.mark.parametrize("timeout, spin", [(None, True), ("4", False), ("20", False), ("21", True), ("28", True),
                                           (" 8 ", False), ("x", True)])
def test_workers_spin_past_a_short_openblas_thread_timeout(timeout, spin):
    assert blas.workers_spin(timeout) is spin


# ---------------------------------------------------------------- 10. im2col's chunks side by side (FUSED_ROWS)

def test_blas_share_runs_every_part_once_part_0_on_the_caller_and_restores_the_thread_count(monkeypatch):
    import threading
    fake = _FakeOpenBLAS(3)
    monkeypatch.setattr(blas, "openblas", lambda: fake)
    ran = []
    blas.share(lambda k: ran.append((k, threading.current_thread().name)), 3)
    assert sorted(k for k, _ in ran) == [0, 1, 2]
    assert dict(ran)[0] == threading.current_thread().name
    assert all(name.startswith("cnnfast-blas") for k, name in ran if k)
    assert fake.sets == [1, 3]


@pytest.mark.parametrize("why", ["no OpenBLAS", "one thread", "inside a part"])
def test_blas_share_runs_the_parts_in_order_on_the_caller_when_it_cannot_share(why, monkeypatch):
    import threading
    fake = _FakeOpenBLAS(1 if why == "one thread" else 2)
    monkeypatch.setattr(blas, "openblas", lambda: None if why == "no OpenBLAS" else fake)
    ran = []
    if why == "inside a part":  # a share from a part of another (OpenBLAS is on one thread already)
        monkeypatch.setattr(blas._inside, "share", True, raising=False)
    blas.share(lambda k: ran.append((k, threading.current_thread().name)), 3)
    assert ran == [(k, threading.current_thread().name) for k in range(3)]
    assert fake.sets == []


@pytest.mark.parametrize("threads", [1, 2])
def test_a_share_inside_a_part_runs_inline_at_any_thread_count(threads, monkeypatch):
    """A part that shares again (on the caller's thread, which holds the lock, or on a worker) runs the inner parts
    itself: no deadlock on the lock."""
    import threading
    fake = _FakeOpenBLAS(threads)
    monkeypatch.setattr(blas, "openblas", lambda: fake)
    ran = []
    outer = threading.Thread(target=blas.share, args=(lambda k: blas.share(lambda j: ran.append((k, j)), 2), 2))
    outer.start()
    outer.join(60)
    assert not outer.is_alive() and sorted(ran) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_blas_share_raises_a_parts_error_once_every_part_is_done(monkeypatch):
    fake = _FakeOpenBLAS(2)
    monkeypatch.setattr(blas, "openblas", lambda: fake)
    done = []

    def task(k):
        if k == 1:
            raise ValueError("part 1")
        done.append(k)
    with pytest.raises(ValueError, match="part 1"):
        blas.share(task, 3)
    assert sorted(done) == [0, 2] and fake.sets == [1, 2]


FUSED_LAYERS = {  # name: (x shape, w shape, options); C/g*T*R*S <= FUSED_ROWS; chunks of ~7 positions
    "stem-like": ((3, 3, 23, 21), (8, 3, 7, 7), dict(stride=2, padding=3)),  # K/g < CTRS: transposed product
    "1d-dilated": ((3, 4, 50), (8, 4, 3), dict(padding=8, dilation=8)),  # WaveNet's, a shifted-plane geometry
    "3d-groups": ((2, 4, 5, 9, 8), (6, 2, 3, 3, 2), dict(stride=(1, 2, 1), padding=(1, 1, 0), groups=2)),
    "2d-asym-wide": ((2, 2, 11, 12), (24, 2, 2, 2), dict(padding=((1, 2), (0, 3)), dilation=(2, 1))),  # K/g > CTRS
}


def _fused_case(name, dtype):
    x_shape, w_shape, opts = FUSED_LAYERS[name]
    rng = np.random.default_rng(len(name))
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    dy = rng.standard_normal(reference.conv(x, w, **opts).shape)
    return x.astype(dtype), w.astype(dtype), dy.astype(dtype), opts


def _fused_run(primitive, x, w, dy, opts):
    nd = x.ndim - 2
    if primitive == "forward":
        return getattr(cnnfast, f"conv{nd}d")(x, w, algo="im2col", **opts)
    return getattr(grad, f"conv{nd}d_weight")(x, w.shape, dy, algo="im2col", **opts)


@pytest.mark.parametrize("threads_", [2, 3])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("primitive", ["forward", "backward_filter"])
@pytest.mark.parametrize("name", FUSED_LAYERS)
def test_im2col_chunks_side_by_side_match_the_reference_and_repeat_bitwise(name, primitive, dtype, threads_,
                                                                           monkeypatch):
    x, w, dy, opts = _fused_case(name, dtype)
    fake = _FakeOpenBLAS(threads_)
    monkeypatch.setattr(blas, "openblas", lambda: fake)
    monkeypatch.setattr(im2col, "FUSED_WORK", 0)
    monkeypatch.setattr(im2col, "CHUNK_POSITIONS", 1)
    rows = int(np.prod(w.shape[1:]))
    monkeypatch.setattr(im2col, "CHUNK_BYTES", 7 * rows * x.itemsize)  # ~7 positions a chunk, several per sample
    g = cnnfast.ConvSpec.create(f"conv{x.ndim - 2}d", x.shape, w.shape, **opts).geometry
    B = im2col._chunk(g, primitive, x.itemsize, None)
    assert 0 < B < g.P * g.Q * g.U  # in chunks, and a sample's positions split over several
    with threads.only("parallel"):
        chunked = _fused_run(primitive, x, w, dy, opts)
    assert fake.sets == [1, threads_]  # the chunks ran side by side, OpenBLAS on one thread meanwhile
    expected = (reference.conv(x.astype(np.float64), w.astype(np.float64), **opts) if primitive == "forward" else
                reference.conv_weight(x.astype(np.float64), w.shape, dy.astype(np.float64), **opts))
    assert_close(chunked, expected, dtype, f"{name} {primitive} in chunks")
    with threads.only("serial"):  # the same tasks one after another: the same bits
        np.testing.assert_array_equal(_fused_run(primitive, x, w, dy, opts), chunked)
    monkeypatch.setattr(im2col, "FUSED_ROWS", 0)  # the column blocks, for comparison
    assert_close(_fused_run(primitive, x, w, dy, opts), expected, dtype, f"{name} {primitive} in blocks")


@pytest.mark.parametrize("w_shape", [(6, 4, 3, 3), (30, 4, 1, 2)], ids=["transposed-product", "plain-product"])
def test_im2col_weight_gradient_of_one_chunk_per_group_matches_the_column_blocks(w_shape, monkeypatch):
    """vmap's per-sample weight gradients: one sample, many groups, each group's positions one chunk, whichever way
    round the product is: the reference's result, and the column blocks' to the bit (each dW_g is one product
    either way). (Writing each product straight into dW, without the sums buffer, measured no faster: 10.2-10.5
    against 10.6-10.8 ms for 16 groups of 3x3 64->64 @28, 2026-12-06.)"""
    fake = _FakeOpenBLAS(2)
    monkeypatch.setattr(blas, "openblas", lambda: fake)
    monkeypatch.setattr(im2col, "FUSED_WORK", 0)
    monkeypatch.setattr(im2col, "CHUNK_POSITIONS", 1)
    groups = 6  # (a multiple of the threads: one chunk each)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 4 * groups, 6, 7)).astype(np.float32)
    w_shape = (w_shape[0] * groups,) + w_shape[1:]
    dy = rng.standard_normal(reference.conv(x, np.ones(w_shape), padding=1, groups=groups).shape).astype(np.float32)
    g = cnnfast.ConvSpec.create("conv2d", x.shape, w_shape, padding=1, groups=groups).geometry
    assert len(im2col._chunks(g, im2col._chunk(g, "backward_filter", 4, None))) == groups
    chunked = grad.conv2d_weight(x, w_shape, dy, padding=1, groups=groups, algo="im2col")
    assert fake.sets == [1, 2]  # side by side
    expected = reference.conv_weight(x.astype(np.float64), w_shape, dy.astype(np.float64), padding=1, groups=groups)
    assert_close(chunked, expected, "float32", "one chunk per group")
    monkeypatch.setattr(im2col, "FUSED_ROWS", 0)  # the column blocks
    np.testing.assert_array_equal(grad.conv2d_weight(x, w_shape, dy, padding=1, groups=groups, algo="im2col"),
                                  chunked)


def test_im2col_runs_in_chunks_only_where_its_rule_says(monkeypatch):
    fake = _FakeOpenBLAS(2)
    monkeypatch.setattr(blas, "openblas", lambda: fake)

    def chunk(x_shape, w_shape, primitive="forward", limit=None, **opts):
        g = cnnfast.ConvSpec.create("conv2d", x_shape, w_shape, **opts).geometry
        return im2col._chunk(g, primitive, 4, limit)
    stem = ((4, 3, 224, 224), (64, 3, 7, 7))
    # 147 rows: 2 MiB of columns is 3,566 positions, so 4 chunks of 3,136 per 112 x 112 sample
    assert chunk(*stem, stride=2, padding=3) == chunk(*stem, "backward_filter", stride=2, padding=3) == 3136
    assert chunk(*stem, "backward_data", stride=2, padding=3) == 0  # a gather into dx: column blocks
    assert chunk((4, 96, 56, 56), (64, 96, 3, 3), padding=1) == 0  # 864 rows > FUSED_ROWS
    assert chunk((1, 3, 20, 20), (64, 3, 7, 7), padding=3) == 0  # under FUSED_WORK multiply-adds
    assert chunk((1, 3, 224, 224), (64, 3, 7, 7), stride=2, padding=3) == 3136  # 4 chunks: 2 per thread
    assert chunk((1, 32, 112, 112), (32, 32, 3, 3), padding=1) == 1568  # 7 chunks of <= 2 MiB, made 4 per thread
    fake.threads = 3
    assert chunk((1, 3, 224, 224), (64, 3, 7, 7), stride=2, padding=3) == 2091  # 6 chunks: 2 per thread
    assert chunk((1, 64, 14, 14), (256, 64, 3, 3), padding=1) == 0  # 2 chunks per thread would hold 49 positions
    fake.threads = 1
    assert chunk(*stem, stride=2, padding=3) == 0  # nothing to share
    fake.threads = 2
    g = cnnfast.ConvSpec.create("conv2d", *stem, stride=2, padding=3).geometry
    scratch = im2col._chunk_scratch(g, "forward", 4, 3136, 2)
    assert scratch == 2 * 147 * 3136 * 4  # each thread's columns
    x, w = cnnfast.arrays.ShapeArray(stem[0], "float32", "cpu"), cnnfast.arrays.ShapeArray(stem[1], "float32", "cpu")
    assert cnnfast.explain("conv2d", x, w, stride=2, padding=3, algo="im2col").workspace_bytes == scratch
    under = cnnfast.explain("conv2d", x, w, stride=2, padding=3, algo="im2col", workspace_limit=scratch - 1)
    assert 0 < under.workspace_bytes <= scratch - 1  # column blocks within the limit
    assert chunk(*stem, limit=scratch - 1, stride=2, padding=3) == 0
    monkeypatch.setattr(blas, "cblas", lambda: None)
    assert chunk(*stem, stride=2, padding=3) == 0  # its GEMMs need cblas_?gemm from Numba's threads


def test_im2col_chunks_from_two_threads_at_once_match_one_at_a_time(monkeypatch):
    """Two callers in chunks at once: one shares its chunks out, the other (finding blas's lock taken) runs the same
    parts one after another; every result bit-identical to a call alone, the thread count restored."""
    import threading
    monkeypatch.setattr(im2col, "FUSED_WORK", 0)
    monkeypatch.setattr(im2col, "CHUNK_POSITIONS", 1)
    x, w, dy, opts = _fused_case("stem-like", "float64")
    monkeypatch.setattr(im2col, "CHUNK_BYTES", 7 * int(np.prod(w.shape[1:])) * x.itemsize)
    expected = {p: _fused_run(p, x, w, dy, opts) for p in ("forward", "backward_filter")}
    before, errors = blas.threads(), []

    def work():  # bit for bit: while one caller has OpenBLAS on one thread, blas.threads() still says `before`
        for i in range(20):
            primitive = ("forward", "backward_filter")[i % 2]
            if not np.array_equal(_fused_run(primitive, x, w, dy, opts), expected[primitive]):
                errors.append(primitive)
    workers = [threading.Thread(target=work) for _ in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert errors == [] and blas.threads() == before


def test_stale_numba_caches_are_dropped_when_a_kernel_source_changes(tmp_path):
    """Numba keys a kernel's disk cache by its own file: threads.drop_stale_caches deletes the kernels' cache files
    when the digest of the folder's sources (and Numba's version) kept beside them differs, and only then."""
    import types
    from types import SimpleNamespace

    import numba
    kernel = numba.njit(lambda: 0)
    kernel._cache = SimpleNamespace(cache_path=str(tmp_path))  # where Numba would keep this kernel's files
    module = types.ModuleType("cnnfast.kernels.cpu.im2col")
    module.kernel = kernel
    ours, theirs = ["im2col.im2col_cpu-68.py311.nbi", "im2col.im2col_cpu-68.py311.1.nbc"], "other.f-1.py311.nbi"
    for name in ours + [theirs]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "cnnfast-sources.sha256").write_text("an older digest")
    threads.drop_stale_caches([module])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnnfast-sources.sha256", theirs]
    for name in ours:  # written again by this version: kept
        (tmp_path / name).write_bytes(b"")
    threads.drop_stale_caches([module])
    assert len(list(tmp_path.iterdir())) == 4
