"""Reliability: bitwise determinism of every default kernel, thread safety, host memory (workspace_limit and
no growth over many calls), index arithmetic of huge problems (shape-only: nothing of that size is allocated),
bench/sanitize.py's prerequisite check, and the plan cache (a hit keeps every check). CUDA parts run on a GPU
or in Numba's CUDA simulator (conftest.py)."""
import concurrent.futures
import copy
import dataclasses
import gc
import math
import os
import pickle
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest
from cnnfast.kernels.cpu import blas, memory
from cnnfast.kernels.cpu import im2col as cpu_im2col
from cnnfast.kernels.cpu.direct import geometry_args
from layers import OP_NAMES, OPS, Layer

import cnnfast
from cnnfast import reference
from cnnfast.arrays import simulator_enabled, to_host
from cnnfast.compare import assert_close
from cnnfast.plan import algorithms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIM = simulator_enabled()
MiB = 1 << 20


def _kernel_algos(device):
    """The device's kernel algorithms (direct, im2col, depthwise, and winograd on the CPU): not the float64
    reference."""
    return [a for a in algorithms(device) if a != "reference"]


# ---------------------------------------------------------------- 1. determinism

CPU_REPEATS = 100
# The simulator runs a kernel's threads one after another in a fixed order, so its results cannot vary between
# calls the way a GPU's scheduling could: more repeats prove nothing more there (and each costs seconds).
CUDA_REPEATS = 5 if SIM else 100

# dense: 2 samples over 2 cores (prange tasks interleave differently per call); groups to cover per-group blocks
CPU_LAYERS = {
    "dense": dict(x_shape=(2, 8, 12, 12), w_shape=(16, 4, 3, 3), padding=1, stride=(1, 2), groups=2),
    "depthwise": dict(x_shape=(2, 8, 12, 12), w_shape=(16, 1, 3, 3), padding=1, groups=8),
    "winograd": dict(x_shape=(2, 8, 12, 13), w_shape=(16, 4, 3, 3), padding=1, groups=2),
}
# simulator: one 128-thread block per launch (the simulator runs every thread as a Python thread, seconds per
# launch beyond that); the split-K reduction's determinism at larger sizes is tests/test_cuda_kernels.py's
CUDA_LAYERS = {
    "dense": dict(x_shape=(1, 2, 5, 5), w_shape=(3, 2, 3, 3), padding=1) if SIM else
    dict(x_shape=(8, 64, 28, 28), w_shape=(64, 64, 3, 3), padding=1),
    "depthwise": dict(x_shape=(1, 2, 6, 6), w_shape=(4, 1, 3, 3), padding=1, groups=2) if SIM else
    dict(x_shape=(8, 64, 28, 28), w_shape=(128, 1, 3, 3), padding=1, groups=64),
}


def _layer(spec, **kw):
    spec = dict(spec)
    return Layer(spec.pop("x_shape"), spec.pop("w_shape"), **{"dtype": "float32", **kw}, **spec)


def _determinism_params(device, layers):
    for algo in _kernel_algos(device):
        layer = algo if algo in ("depthwise", "winograd") else "dense"
        for primitive in OPS:
            yield pytest.param(device, algo, layers[layer], primitive, id=f"{device}-{algo}-{primitive}",
                               marks=[pytest.mark.cuda] if device == "cuda" else [])


@pytest.mark.parametrize("device, algo, spec, primitive", [*_determinism_params("cpu", CPU_LAYERS),
                                                           *_determinism_params("cuda", CUDA_LAYERS)])
def test_repeated_calls_are_bitwise_identical(device, algo, spec, primitive):
    layer = _layer(spec, seed=11)
    move = lambda a: a  # noqa: E731
    repeats = CPU_REPEATS
    if device == "cuda":
        from numba import cuda
        move, repeats = cuda.to_device, CUDA_REPEATS
    args = layer.args(primitive, move)
    plan = cnnfast.explain(OP_NAMES[primitive], *args, **layer.opts, algo=algo)
    assert plan.algorithm == algo and plan.device == device and plan.deterministic
    first = to_host(layer.run(primitive, args, algo=algo))
    assert_close(first, layer.expected(primitive), layer.dtype, f"{device} {algo} {primitive}")
    for i in range(1, repeats):
        again = to_host(layer.run(primitive, args, algo=algo))
        assert np.array_equal(first, again), f"{device} {algo} {primitive}: call {i} differs from call 0"


# ---------------------------------------------------------------- 2. concurrency

# 8 different problems (shapes, stride, dilation, groups, padding modes, algorithms), one per thread
CPU_THREAD_PROBLEMS = [
    ("direct", dict(x_shape=(2, 4, 9, 8), w_shape=(6, 4, 3, 3), padding=1)),
    ("im2col", dict(x_shape=(1, 8, 10, 10), w_shape=(16, 8, 3, 3), stride=2, padding=1)),
    ("im2col", dict(x_shape=(2, 8, 7, 9), w_shape=(8, 4, 3, 2), groups=2, dilation=(2, 1), padding=((1, 2), (0, 1)))),
    ("depthwise", dict(x_shape=(2, 6, 8, 8), w_shape=(12, 1, 3, 3), groups=6, padding=1)),
    ("auto", dict(x_shape=(1, 3, 11, 11), w_shape=(8, 3, 5, 5), stride=2, padding=2)),
    ("direct", dict(x_shape=(1, 4, 8, 9), w_shape=(4, 4, 3, 3), padding=1, padding_mode="reflect")),
    ("im2col", dict(x_shape=(3, 8, 6, 6), w_shape=(8, 8, 1, 1))),
    ("auto", dict(x_shape=(1, 4, 7, 7), w_shape=(8, 4, 3, 3), padding=1, padding_mode="circular")),
]


def _thread_work(layer, algo, iterations, stream=None, move=lambda a: a):
    """Run forward and both gradients `iterations` times; return every result (host arrays)."""
    extra = {} if stream is None else {"stream": stream}
    args = {p: layer.args(p, move) for p in OPS}
    out = []
    for _ in range(iterations):
        for primitive in OPS:
            out.append((primitive, to_host(layer.run(primitive, args[primitive], algo=algo, **extra))))
        if stream is not None:
            stream.synchronize()
    return out


def _check_thread_results(layers, results, algos, device):
    for (layer, algo), res in zip(zip(layers, algos), results):
        single = {}
        for primitive, r in res:
            assert_close(r, layer.expected(primitive), layer.dtype, f"{device} {algo} {primitive} (threaded)")
            # the same problem gives the same bits whichever thread ran it, and however they interleaved
            single.setdefault(primitive, r)
            assert np.array_equal(r, single[primitive]), f"{device} {algo} {primitive}: threaded results differ"


def test_cpu_ops_are_thread_safe():
    layers = [_layer(spec, seed=i) for i, (_, spec) in enumerate(CPU_THREAD_PROBLEMS)]
    algos = [algo for algo, _ in CPU_THREAD_PROBLEMS]
    for layer, algo in zip(layers, algos):  # compile / load every kernel before the threads start
        _thread_work(layer, algo, 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(layers)) as pool:
        futures = [pool.submit(_thread_work, layer, algo, 10) for layer, algo in zip(layers, algos)]
        results = [f.result() for f in futures]
    _check_thread_results(layers, results, algos, "cpu")


# layers whose every primitive is past threads.SERIAL_WORK (the parallel builds, in the parent)
FORK_PROBLEMS = {"direct": ((2, 16, 16, 16), (16, 16, 3, 3), 1), "im2col": ((2, 16, 16, 16), (16, 16, 3, 3), 1),
                 "winograd": ((2, 16, 16, 16), (16, 16, 3, 3), 1), "depthwise": ((2, 16, 16, 16), (16, 1, 3, 3), 16)}


def _forked_child_work(algo):
    from cnnfast.kernels.cpu import threads
    x_shape, w_shape, groups = FORK_PROBLEMS[algo]
    layer = Layer(x_shape, w_shape, dtype="float32", padding=1, groups=groups)
    return threads.FORKED, [(layer.run(p, algo=algo), layer.expected(p)) for p in OPS]


@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="no fork() here")
def test_cpu_ops_run_in_a_forked_child():
    """After fork(), GNU OpenMP (Numba's threading layer here) cannot run a parallel region: Numba ended the child
    with SIGTERM (a DataLoader worker). A forked child runs the serial builds (threads.FORKED)."""
    import multiprocessing

    for algo in FORK_PROBLEMS:  # the parent's pool at work before the fork, as in a training process
        _forked_child_work(algo)
    # (a child ended by a signal breaks the executor: BrokenProcessPool at once, not a timeout)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        for algo in FORK_PROBLEMS:
            forked, results = pool.submit(_forked_child_work, algo).result(timeout=300)
            assert forked
            for (result, expected), primitive in zip(results, OPS):
                assert_close(result, expected, "float32", f"{algo} {primitive} in a forked child")


@pytest.mark.cuda
def test_cuda_ops_are_thread_safe_with_a_stream_per_thread():
    """(In the simulator, which keeps one kernel context, cnnfast runs one simulated launch at a time: the host
    threads' calls still interleave.)"""
    from numba import cuda
    if SIM:
        problems = [("direct", dict(x_shape=(1, 2, 5, 5), w_shape=(3, 2, 3, 3), padding=1)),
                    ("depthwise", dict(x_shape=(1, 2, 5, 5), w_shape=(4, 1, 3, 3), padding=1, groups=2))]
        iterations = 2
    else:
        problems = CPU_THREAD_PROBLEMS + [("im2col", dict(x_shape=(4, 32, 28, 28), w_shape=(64, 32, 3, 3),
                                                           padding=1))]
        problems = problems[:8]
        iterations = 10
    layers = [_layer(spec, seed=i) for i, (_, spec) in enumerate(problems)]
    algos = [algo for algo, _ in problems]
    streams = [None if SIM else cuda.stream() for _ in layers]
    for layer, algo, s in zip(layers, algos, streams):  # compile every kernel first
        _thread_work(layer, algo, 1, s, cuda.to_device)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(layers)) as pool:
        futures = [pool.submit(_thread_work, layer, algo, iterations, s, cuda.to_device)
                   for layer, algo, s in zip(layers, algos, streams)]
        results = [f.result() for f in futures]
    _check_thread_results(layers, results, algos, "cuda")


# ---------------------------------------------------------------- 3. host memory

# 1.2 MB of columns unchunked (144 rows x 2 x 1024 positions); the limit forces ~100-position column blocks
MEM_LAYER = dict(x_shape=(2, 16, 32, 32), w_shape=(16, 16, 3, 3), padding=1)
MEM_LIMIT = 256 << 10
SLACK = 48 << 10  # NumPy's ufunc buffer (8192 elements: 32 KiB for the bias add), index tables, plan objects


def _peak_extra_bytes(fn):
    """(peak bytes allocated by fn() above what was allocated before it, the result) under tracemalloc."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak - before, result


@pytest.mark.parametrize("primitive", list(OPS))
def test_cpu_im2col_scratch_stays_under_workspace_limit(primitive):
    layer = _layer(MEM_LAYER, seed=3)
    args = layer.args(primitive)
    plan = cnnfast.explain(OP_NAMES[primitive], *args, **layer.opts, algo="im2col", workspace_limit=MEM_LIMIT)
    unlimited = cnnfast.explain(OP_NAMES[primitive], *args, **layer.opts, algo="im2col")
    assert plan.algorithm == "im2col" and 0 < plan.workspace_bytes <= MEM_LIMIT < unlimited.workspace_bytes

    run = lambda: layer.run(primitive, args, algo="im2col", workspace_limit=MEM_LIMIT)  # noqa: E731
    run()  # warm: kernels loaded, dispatcher caches filled
    peak, out = _peak_extra_bytes(run)
    out_bytes = out.nbytes
    scratch = peak - out_bytes
    assert peak <= MEM_LIMIT + out_bytes + SLACK, (
        f"{primitive}: peak extra {peak:,} B > limit {MEM_LIMIT:,} + output {out_bytes:,} + slack {SLACK:,}")
    # what explain() promised is what the call used (to within the slack)
    assert abs(scratch - plan.workspace_bytes) <= SLACK, (
        f"{primitive}: measured scratch {scratch:,} B vs explain's {plan.workspace_bytes:,} B")
    assert_close(out, layer.expected(primitive), layer.dtype, f"im2col {primitive} limit={MEM_LIMIT}")


@pytest.mark.parametrize("algo, primitive, x_shape, w_shape, limit", [
    *(("winograd", p, (2, 64, 12, 12), (64, 64, 3, 3), None) for p in OPS),
    *(("winograd", p, (1, 64, 2, 4, 4), (64, 64, 3, 3, 3), None) for p in OPS),
    ("im2col", "forward", (4, 64, 56, 56), (64, 64, 3, 3), 16 << 10),  # 2,092 blocks of 12 positions
    ("im2col", "backward_filter", (4, 3, 32, 32), (16, 3, 3, 3), 2000)])
def test_cpu_scratch_is_what_explain_reports(algo, primitive, x_shape, w_shape, limit):
    """What a call allocates beyond its result is explain()'s workspace, to within the slack: Winograd's weight
    gradient used to add its 9 x K x C/g taps and a finiteness mask (~190 KB here), its 3-D input gradient a second
    copy of the transformed filters (~390 KB), im2col under a tiny limit a list of every block (~110 KB and ~290 KB
    here, growing with N x positions / block)."""
    layer = Layer(x_shape, w_shape, seed=5, dtype="float32", padding=1)
    args = layer.args(primitive)
    plan = layer.explain(primitive, algo=algo, workspace_limit=limit)
    run = lambda: layer.run(primitive, args, algo=algo, workspace_limit=limit)  # noqa: E731
    run()
    peak, out = _peak_extra_bytes(run)
    assert peak - out.nbytes <= plan.workspace_bytes + SLACK, (
        f"{algo} {primitive}: peak extra {peak - out.nbytes:,} B > explain's {plan.workspace_bytes:,} + {SLACK:,}")
    assert_close(out, layer.expected(primitive), layer.dtype, f"{algo} {primitive}")


def test_an_algo_with_an_empty_tile_is_unknown():
    for device, algo in (("cpu", "im2col:"), ("cuda", "direct:"), ("cuda", "auto:")):
        with pytest.raises(ValueError, match=rf"^conv2d: unknown algo '{algo}' for device {device}"):
            cnnfast.explain("conv2d", (2, 16, 20, 20), (16, 16, 3, 3), padding=1, algo=algo, device=device)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _data(a):
    return a.__array_interface__["data"][0]


def test_large_cpu_results_reuse_their_memory_once_every_view_is_freed(monkeypatch):
    """CPU results of POOLED_FROM bytes or more come from memory.py's pool of blocks (here from 64 KiB rather
    than 32 MiB): a block is lent again only after every array over it is gone, and each result holds its own
    values (a 1x1 depthwise layer: x * w per channel, one rounding, so exactly NumPy's product)."""
    gc.collect()  # (a lease left by an earlier test, collected in the middle of this one, would join its pool)
    monkeypatch.setattr(memory, "POOLED_FROM", 64 << 10)
    monkeypatch.setattr(memory, "_idle", memory.OrderedDict())
    monkeypatch.setattr(memory, "_returned", memory.deque())
    rng = np.random.default_rng(7)
    w = rng.standard_normal((8, 1, 1, 1)).astype(np.float32)
    xs = [rng.standard_normal((2, 8, 48, 48)).astype(np.float32) for _ in range(4)]  # results of 147 KiB

    def run(x):
        y = cnnfast.conv2d(x, w, groups=8)
        assert np.array_equal(y, x * w.reshape(1, 8, 1, 1)) and y.flags.writeable and y.flags.c_contiguous
        return y

    y0 = run(xs[0])
    y1 = run(xs[1])
    a, b = _data(y0), _data(y1)
    assert a != b
    row = y0[1, 3]  # a view keeps y0's block lent
    del y0
    y2 = run(xs[2])
    assert _data(y2) not in (a, b)
    assert np.array_equal(row, xs[0][1, 3] * w[3, 0, 0, 0]) and np.array_equal(y1, xs[1] * w.reshape(1, 8, 1, 1))
    del row, y1
    assert len(memory._idle) == 2
    y3 = run(xs[3])  # y1's block again, the last given back (the likeliest in cache): nothing new faulted in
    assert _data(y3) == b
    dx = cnnfast.grad.conv2d_input(xs[0].shape, w, xs[1], groups=8)  # the gradient ops take the pool's blocks too
    assert _data(dx) == a and np.array_equal(dx, xs[1] * w.reshape(1, 8, 1, 1))
    del y2, y3, dx
    assert len(memory._idle) == 3
    monkeypatch.setattr(memory, "POOL_IDLE_BYTES", 2 * xs[0].nbytes)
    run(xs[0])  # its block taken and given back: the idle blocks over the limit are freed, the oldest first
    assert len(memory._idle) == 2
    cnnfast.empty_cache()
    assert len(memory._idle) == 0
    y = run(xs[0])
    lease = y.base
    while not isinstance(lease, memory._Lease):
        lease = lease.base
    for copier in (copy.copy, copy.deepcopy, pickle.dumps):  # (a copy would lend the block twice)
        with pytest.raises(TypeError, match="cannot be copied"):
            copier(lease)
    del lease
    # a finalizer run inside the pool's lock (the garbage collector, in the thread that holds it) never waits:
    # a request allocates afresh, a freed block and empty_cache() wait for the lock's release
    z = run(xs[2])
    idle = _data(z)
    del z
    memory._idle_lock.acquire()
    try:
        fresh = run(xs[1])
        assert _data(fresh) != idle
        del y
        cnnfast.empty_cache()
        assert len(memory._returned) == 1 and len(memory._idle) == 1 and memory._clear
    finally:
        memory._idle_lock.release()
    memory._drain()  # (what the lock's holder does after its release)
    assert len(memory._returned) == 0 and len(memory._idle) == 0 and not memory._clear
    assert np.array_equal(fresh, xs[1] * w.reshape(1, 8, 1, 1))


STALE_LAYERS = [  # (x shape, w shape, options, primitives): outputs that no tap reaches, padded copies
    ((2, 4, 11, 11), (6, 4, 2, 2), dict(stride=3), ("backward_data",)),
    ((2, 6, 5, 5), (6, 3, 2, 2), dict(stride=3, output_padding=2, transposed=True), ("forward",)),
    ((1, 4, 9, 9), (4, 2, 3, 3), dict(padding=2, groups=2, padding_mode="reflect"), tuple(OPS)),
    ((1, 6, 10, 10), (6, 1, 3, 3), dict(padding=1, stride=2, groups=6), tuple(OPS)),
    ((2, 3, 17), (4, 3, 3), dict(padding=4, dilation=4, padding_mode="circular"), tuple(OPS)),
    ((1, 2, 5, 6, 7), (3, 2, 3, 3, 3), dict(padding=1, stride=(2, 1, 3)), tuple(OPS)),
    ((2, 8, 12, 12), (8, 8, 3, 3), dict(padding=1), tuple(OPS)),
]


@pytest.mark.parametrize("x_shape, w_shape, opts, primitives", STALE_LAYERS)
def test_cpu_results_are_written_whole_over_stale_memory(monkeypatch, x_shape, w_shape, opts, primitives):
    """A buffer from the pool holds what the last one left, where np.empty's fresh pages were zeros: every CPU
    result, temporary and im2col or Winograd scratch here starts as NaN, and every algorithm that takes the layer
    still matches the reference."""
    real = memory.pooled_empty

    def stale(shape, dtype):
        out = real(shape, dtype)
        out.view(np.uint8).fill(0xFF)  # (NaN in every float32 or float64 view: the kernels' scratch too)
        return out

    monkeypatch.setattr(memory, "pooled_empty", stale)
    opts = dict(opts)
    transposed = opts.pop("transposed", False)
    rng = np.random.default_rng(5)
    for primitive in primitives:
        for algo in ("auto", "direct", "im2col", "depthwise", "winograd"):
            try:
                if transposed:  # (x, w: conv_transpose's input and (C_in, C_out/groups, ...) weight)
                    x, w, b = (rng.standard_normal(s) for s in (x_shape, w_shape, w_shape[1]))
                    got = getattr(cnnfast, f"conv_transpose{len(x_shape) - 2}d")(x, w, b, algo=algo, **opts)
                    want = reference.conv_transpose(x, w, b, **opts)
                else:
                    layer = Layer(x_shape, w_shape, seed=5, dtype="float64", **opts)
                    got, want = layer.run(primitive, algo=algo), layer.expected(primitive)
            except ValueError as e:  # (an algorithm that does not take this layer)
                assert algo in str(e), e
                continue
            assert not np.isnan(got).any(), f"{primitive} {algo}: NaN left in the result"
            assert_close(got, want, "float64", f"{primitive} {algo}")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc/self/statm")
def test_ten_thousand_calls_leave_host_memory_flat():
    """10,000 tiny calls cycling through every CPU algorithm and primitive: RSS (native leaks: Numba's NRT, BLAS)
    and Python's traced allocations (caches that grow per call) stay flat after a warm-up."""
    tiny = Layer((1, 2, 5, 5), (8, 2, 3, 3), seed=1, dtype="float32", padding=1)
    dw = Layer((1, 2, 5, 5), (4, 1, 3, 3), seed=2, dtype="float32", padding=1, groups=2)
    calls = [(tiny, p, a) for a in ("direct", "im2col") for p in OPS] + [(dw, p, "depthwise") for p in OPS]
    calls = [(layer.args(p), layer, p, a) for layer, p, a in calls]

    def loop(n):
        for i in range(n):
            args, layer, p, a = calls[i % len(calls)]
            layer.run(p, args, algo=a)

    loop(200)
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    loop(8_000)
    tracemalloc.start()
    try:
        traced0 = tracemalloc.get_traced_memory()[0]
        loop(2_000)
        traced = tracemalloc.get_traced_memory()[0] - traced0
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - t0
    grew = _rss_bytes() - rss0
    assert grew < 4 * MiB, f"RSS grew by {grew / MiB:.1f} MiB over 10,000 calls ({seconds:.1f} s)"
    assert traced < 256 << 10, f"traced Python allocations grew by {traced:,} B over 2,000 calls"


# ---------------------------------------------------------------- 4. huge problems (shape-only)

INT32_MAX, GRID_YZ_MAX = 2**31 - 1, 65535
# (id, op input shape, weight shape, options): every tensor named here has > 2**31 elements somewhere
HUGE = [
    ("image-8192x8192", (1, 64, 8192, 8192), (64, 64, 3, 3), dict(padding=1)),            # x, y: 4.3e9
    ("batch-65536", (65536, 64, 32, 32), (64, 64, 3, 3), dict(padding=1)),                  # x, y: 4.3e9
    ("volume-512^3", (1, 32, 512, 512, 512), (32, 32, 3, 3, 3), dict(padding=1)),           # x, y: 4.3e9
    ("strided-16384^2", (1, 32, 16384, 16384), (64, 32, 7, 7), dict(stride=2, padding=3)),  # x: 8.6e9
    ("depthwise-8192^2", (1, 256, 8192, 8192), (256, 1, 3, 3), dict(padding=1, groups=256)),  # x, y: 1.7e10
    ("1d-2^32", (1, 2, 2**31), (2, 2, 5), dict(padding=2)),                                 # x, y: 4.3e9
]


def _conv_name(x_shape):
    return f"conv{len(x_shape) - 2}d"


def _explain(primitive, x_shape, w_shape, opts, device, **kw):
    name = _conv_name(x_shape)
    spec = cnnfast.ConvSpec.create(name, x_shape, w_shape, **opts)
    y_shape = spec.output_shape
    if primitive == "forward":
        return cnnfast.explain(name, x_shape, w_shape, device=device, **opts, **kw)
    if primitive == "backward_data":
        return cnnfast.explain(f"{name}_input", list(x_shape), w_shape, y_shape, device=device, **opts, **kw)
    return cnnfast.explain(f"{name}_weight", x_shape, list(w_shape), y_shape, device=device, **opts, **kw)


# The HUGE layers CUDA refuses (each algorithm's supports(): a ValueError that says why, before any launch): direct's
# tables hold 32-bit offsets within a sample and a group (forward: C/g x D*H*W, backward_data: K/g x P*Q*U past 2**31),
# its range tests 32-bit extents, and im2col's columns of one whole sample exceed any workspace limit. To lift: 64-bit
# tables, or the reduction over channels cut into launches.
CUDA_REFUSED = {("image-8192x8192", "forward"), ("image-8192x8192", "backward_data"),
                ("volume-512^3", "forward"), ("volume-512^3", "backward_data"),
                ("strided-16384^2", "forward"), ("strided-16384^2", "backward_data"),
                ("1d-2^32", "forward"), ("1d-2^32", "backward_data"), ("1d-2^32", "backward_filter")}


def _refused_on_cuda(x_shape, primitive):
    return any(x == x_shape and (name, primitive) in CUDA_REFUSED for name, x, _, _ in HUGE)


def _huge_params():
    for name, x, w, opts in HUGE:
        for primitive in OPS:
            yield pytest.param(x, w, opts, primitive, id=f"{name}-{primitive}")


@pytest.mark.parametrize("x_shape, w_shape, opts, primitive", list(_huge_params()))
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_huge_problems_plan_within_the_workspace_limit(device, x_shape, w_shape, opts, primitive):
    assert math.prod(x_shape) > 2**31
    if device == "cuda" and _refused_on_cuda(x_shape, primitive):
        with pytest.raises(ValueError, match=r"cannot run this problem on cuda: its (table holds 32-bit offsets|index "
                                             r"tests are 32-bit)"):
            _explain(primitive, x_shape, w_shape, opts, device)
        return
    for limit in (None, 64 * MiB):
        plan = _explain(primitive, x_shape, w_shape, opts, device, workspace_limit=limit)
        assert plan.device == device and plan.kernels
        assert plan.workspace_bytes <= (256 * MiB if limit is None else limit), str(plan)
        g = plan.spec.geometry
        assert all(type(v) is int for v in g), f"geometry fields are not all Python ints: {g!r}"


@pytest.mark.parametrize("x_shape, w_shape, opts, primitive", list(_huge_params()))
def test_cpu_im2col_blocks_of_huge_problems_fit_and_cover_every_position_once(x_shape, w_shape, opts, primitive,
                                                                              monkeypatch):
    g = cnnfast.ConvSpec.create(_conv_name(x_shape), x_shape, w_shape, **opts).geometry
    plan = _explain(primitive, x_shape, w_shape, opts, "cpu", algo="im2col")
    assert plan.workspace_bytes <= cpu_im2col.DEFAULT_WORKSPACE_LIMIT
    O = g.P * g.Q * g.U
    chunk = cpu_im2col._chunk(g, primitive, 4, None)
    if chunk:  # chunks side by side (few rows): one sample's positions each, tiling every sample once, in order
        assert plan.workspace_bytes == cpu_im2col._chunk_scratch(g, primitive, 4, chunk, blas.threads())
        ends = {}  # (group, sample) -> where its chunks so far end
        chunks = cpu_im2col._chunks(g, chunk)
        assert chunks.dtype == np.int64 and chunks.shape[1] == 4  # (the kernels' table: no narrower int)
        for grp, n, o0, b in chunks.tolist():
            assert ends.get((grp, n), 0) == o0 and 1 <= b <= chunk
            ends[grp, n] = o0 + b
        assert list(ends) == [(grp, n) for grp in range(g.groups) for n in range(g.N)]
        assert set(ends.values()) == {O}
        return
    # _blocks would allocate its scratch buffer: record the size instead
    wanted = []
    monkeypatch.setattr(memory, "pooled_empty", lambda n, dtype: wanted.append(n) or None)
    blocks, rows, _ = cpu_im2col._blocks(g, primitive, 4, None)
    blocks = list(blocks())
    nb, B = cpu_im2col._block(g, primitive, 4, None)
    assert wanted == [plan.workspace_bytes] and wanted[0] <= cpu_im2col.DEFAULT_WORKSPACE_LIMIT
    assert rows == g.C // g.groups * g.T * g.R * g.S
    assert all(type(v) is int for blk in blocks for v in blk) and type(nb) is int and type(B) is int
    # every block's scratch fits; blocks tile samples x positions exactly once, in order
    assert max(cpu_im2col._scratch(g, primitive, 4, bn, bB) for _, bn, _, bB in blocks) <= wanted[0]
    assert sum(bn * bB for _, bn, _, bB in blocks) == g.N * O
    sample_starts = sorted({n0 for n0, *_ in blocks})
    assert sample_starts == list(range(0, g.N, nb))
    widths = {}
    for n0, bn, o0, bB in blocks:
        assert 1 <= bn <= nb and 1 <= bB <= B and n0 + bn <= g.N and o0 + bB <= O
        widths.setdefault((n0, bn), []).append((o0, bB))
    for spans in widths.values():
        assert [o0 for o0, _ in spans] == [sum(b for _, b in spans[:i]) for i in range(len(spans))]
        assert sum(b for _, b in spans) == O
    assert sum(bn for n0, bn in widths) == g.N


def _cuda_launches(g, primitive, algo, limit=None):
    """[(kernel, grid, block)] the CUDA launchers would issue for (g, primitive, algo), computed as they do."""
    from cnnfast.kernels.cuda import depthwise, depthwise_filter, direct, gemm
    from cnnfast.kernels.cuda import im2col as cuda_im2col
    if algo == "depthwise" and primitive != "backward_filter":
        n = g.N * g.K * g.P * g.Q * g.U if primitive == "forward" else g.N * g.C * g.D * g.H * g.W
        tg = depthwise.tile_geometry(g, primitive)  # the halo tile when one fits, and the fallback
        return [(f"depthwise {primitive}", (depthwise._blocks(n), 1, 1), depthwise.BLOCK)] + (
            [("depthwise plane", *depthwise.plane_grid(g, tg))] if tg else [])
    if algo == "depthwise":
        splits = depthwise_filter.filter_splits(g, 4, limit)
        return [("depthwise filter", (splits * g.K, 1, 1), depthwise_filter.FILTER_BLOCK),
                ("reduce_splits", (max(1, min(-(-g.K * g.T * g.R * g.S // 256), 1024)), 1, 1), 256)]
    if algo == "direct":
        M, J, NCOL = direct.dims(g, primitive)  # backward_data: the sub-pixel classes' grids are no larger
        tile = direct.tile_for(g, primitive, 4, limit)
        splits = direct.filter_splits(g, 4, limit, tile) if primitive == "backward_filter" else 1
        classes = g.stride_d * g.stride_h * g.stride_w if primitive == "backward_data" else 1  # (at most)
        out = [("tiled", grid, gemm.TILES[tile].threads)
               for grid, _ in gemm.launches(gemm.grid(M, NCOL, g.groups * classes, splits, tile))]
        if splits > 1:
            size = g.K * NCOL
            out.append(("reduce_splits", (max(1, min(-(-size // 256), 1024)), 1, 1), 256))
        return out
    nb = cuda_im2col.chunk(g, 4, limit)
    rows, O = g.C * g.T * g.R * g.S, g.P * g.Q * g.U
    Kg, J = g.K // g.groups, rows // g.groups
    shape = {"forward": (Kg, J, nb * O), "backward_data": (J, Kg, nb * O), "backward_filter": (Kg, nb * O, J)}
    M, _, NCOL = shape[primitive]
    blocks = max(1, min(cuda_im2col.MAX_BLOCKS, -(-rows * nb * O // cuda_im2col.BLOCK)))
    tile = cuda_im2col.tile_for(g, primitive, 4, limit)
    return [("im2col/col2im", (blocks, 1, 1), cuda_im2col.BLOCK)] + [
        ("tiled", grid, gemm.TILES[tile].threads) for grid, _ in gemm.launches(gemm.grid(M, NCOL, g.groups, 1, tile))]


# More (group, split) pairs than a grid's z may hold (65,535): per-sample gradients of a grouped layer (vmap folds a
# batch of 4,096 into 131,072 groups), and the sub-pixel classes x groups of a strided backward_data
MANY_GROUPS = [("groups-131072", (1, 262144, 6, 6), (262144, 2, 3, 3), dict(padding=1, groups=131072)),
               ("groups-32768-s2", (1, 65536, 6, 6), (65536, 2, 3, 3), dict(padding=1, stride=2, groups=32768))]


@pytest.mark.parametrize("x_shape, w_shape, opts, primitive", list(_huge_params()) + [
    pytest.param(x, w, opts, primitive, id=f"{name}-{primitive}")
    for name, x, w, opts in MANY_GROUPS for primitive in OPS])
def test_cuda_launch_grids_of_huge_problems_stay_within_cuda_limits(x_shape, w_shape, opts, primitive):
    from cnnfast.kernels.cuda import direct
    if _refused_on_cuda(x_shape, primitive):  # (refused before any launch: test_huge_problems_plan_...)
        return
    plan = _explain(primitive, x_shape, w_shape, opts, "cuda")
    g = plan.spec.geometry
    algos = {plan.algorithm, "direct"} | ({"depthwise"} if g.is_depthwise else set())
    for algo in sorted(algos):
        for kernel, grid, block in _cuda_launches(g, primitive, algo):
            assert all(type(v) is int for v in grid), f"{algo} {kernel}: grid {grid!r} is not Python ints"
            assert 1 <= grid[0] <= INT32_MAX and 1 <= grid[1] <= GRID_YZ_MAX and 1 <= grid[2] <= GRID_YZ_MAX, (
                f"{algo} {primitive} {kernel}: grid {grid} exceeds CUDA's limits for x {x_shape} w {w_shape}")
            assert block <= 1024
    assert direct.workspace_bytes(g, primitive, 4, None) <= direct.DEFAULT_WORKSPACE_LIMIT


def test_geometry_reaching_kernels_is_python_ints():
    """Shapes of arrays and Python-int shapes / NumPy-integer options give a geometry of Python ints (int64 in
    Numba), and the huge products are exact (no wrap-around)."""
    plan = cnnfast.explain("conv2d", (1, 64, 8192, 8192), (64, 64, 3, 3), stride=np.int32(1), padding=np.int32(1),
                           dilation=np.int16(1), groups=np.int8(1))
    g = plan.spec.geometry
    assert all(type(v) is int for v in g), g
    assert all(type(v) is int for v in geometry_args(g))
    assert g.N * g.K * g.P * g.Q * g.U == 2**32
    grads = cnnfast.explain("conv2d_input", tuple(np.int64(v) for v in (1, 64, 8192, 8192)), (64, 64, 3, 3),
                            (1, 64, 8192, 8192), padding=1)  # input_size goes through _size_arg: int()
    assert all(type(v) is int for v in grads.spec.geometry)


def test_explain_with_numpy_int32_shapes_matches_python_ints():
    i32 = np.int32
    x, w = (1, 64, 8192, 8192), (64, 64, 3, 3)
    ref = cnnfast.explain("conv2d", x, w, padding=1)
    with np.errstate(over="ignore"):
        plan = cnnfast.explain("conv2d", tuple(i32(v) for v in x), tuple(i32(v) for v in w), padding=1)
    assert all(type(v) is int for v in plan.spec.geometry), plan.spec.geometry
    assert plan.spec.flops == ref.spec.flops and plan.workspace_bytes == ref.workspace_bytes


def test_explain_of_a_nested_list_names_it_briefly():
    """A list of data where a shape belongs (an array's .tolist()): the message shows the start of it, not all of it
    (a 1x3x64x64 one was 249,707 characters)."""
    data = np.zeros((1, 3, 64, 64)).tolist()
    with pytest.raises(TypeError, match=r"^conv2d: expected input to be an array or a shape") as info:
        cnnfast.explain("conv2d", data, (4, 3, 3, 3))
    assert len(str(info.value)) < 200


def test_cpu_kernels_receive_python_int_scalars(monkeypatch):
    """Spy on the im2col kernels' scalar arguments (block offsets, geometry; col2im's by_plane flag, a bool) in a
    chunked call: Python ints, never NumPy's fixed-width ones."""
    seen = []
    for name in ("im2col_cpu", "col2im_cpu"):
        real = getattr(cpu_im2col, name)

        def spy(*args, real=real):
            seen.append([a for a in args if not isinstance(a, np.ndarray)])
            return real(*args)
        monkeypatch.setattr(cpu_im2col, name, spy)
    layer = _layer(MEM_LAYER, seed=4)
    for primitive in OPS:
        layer.run(primitive, algo="im2col", workspace_limit=MEM_LIMIT)
    assert len(seen) > 3
    assert all(type(v) in (int, bool) for args in seen for v in args), {type(v) for args in seen for v in args}


def test_cuda_im2col_default_workspace_limit_holds_for_huge_images():
    """cuda im2col chunks only over the batch; when one sample's columns exceed the default 256 MiB limit
    (9 * 4.3e9 * 4 B = 144 GiB for a (1, 64, 8192, 8192) image, 3x3 kernel) an explicit algo='im2col' is
    refused before any allocation; auto plans direct where direct can index the layer (the weight gradient), whose
    workspace stays under the limit, and else refuses it naming both (the forward: 32-bit table offsets)."""
    with pytest.raises(ValueError, match=r"conv2d: algo='im2col' needs at least .* workspace_limit=268,435,456 "
                                         r"\(the default\)"):
        cnnfast.explain("conv2d", (1, 64, 8192, 8192), (64, 64, 3, 3), padding=1, device="cuda", algo="im2col")
    with pytest.raises(ValueError, match=r"conv2d: algo='im2col' needs at least .* \(the default\), and "
                                         r"algo='direct' cannot run this problem on cuda: its table holds 32-bit"):
        _explain("forward", (1, 64, 8192, 8192), (64, 64, 3, 3), {"padding": 1}, "cuda")
    plan = _explain("backward_filter", (1, 64, 8192, 8192), (64, 64, 3, 3), {"padding": 1}, "cuda")
    assert plan.algorithm == "direct" and plan.workspace_bytes <= 256 * MiB, str(plan)


# ---------------------------------------------------------------- 5. bench/sanitize.py


def test_sanitize_script_reports_missing_prerequisites_with_exit_2():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}  # let the script probe itself
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "sanitize.py"), "--check"], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    text = done.stdout + done.stderr
    assert "Traceback" not in text, text
    if SIM:  # no GPU on this machine (conftest.py switched to the simulator)
        assert done.returncode == 2, text
        assert "no CUDA GPU" in text or "no usable CUDA GPU" in text, text
        assert "cannot run compute-sanitizer" in text
    else:
        assert done.returncode in (0, 2), text
        assert ("prerequisites OK" in text) == (done.returncode == 0), text


# ---------------------------------------------------------------- 6. the plan cache

def _small_problem():
    rng = np.random.default_rng(7)
    return rng.standard_normal((2, 4, 9, 9)).astype(np.float32), rng.standard_normal((6, 4, 3, 3)).astype(np.float32)


def test_plan_cache_reuses_a_plan_and_still_checks_every_call():
    from cnnfast import api
    x, w = _small_problem()
    api._PLANS.clear(), api._CALLS.clear()
    first = cnnfast.conv2d(x, w, padding=1)
    assert len(api._PLANS) == 1
    again = cnnfast.conv2d(x, w, padding=1)
    assert len(api._PLANS) == 1 and np.array_equal(first, again)
    assert_close(again, cnnfast.reference.conv(x.astype(np.float64), w.astype(np.float64), padding=1),
                 "float32", "conv2d from a cached plan")
    # values equal to a cached call's but of the wrong type are refused as before (the key is type-exact)
    for bad in (dict(padding=True), dict(padding=1.0), dict(padding=[1.0, 1]), dict(padding=np.float32(1))):
        with pytest.raises(TypeError, match="conv2d: expected padding"):
            cnnfast.conv2d(x, w, **bad)
    # grad_output is checked on a cache hit too
    dy = np.zeros(first.shape, np.float32)
    cnnfast.grad.conv2d_input(x.shape, w, dy, padding=1)
    with pytest.raises(ValueError, match="expected grad_output of size"):
        cnnfast.grad.conv2d_input(x.shape, w, dy[:, :, 1:], padding=1)
    # so are the arrays themselves: a cached shape with another dtype is a different key, a mixed one an error
    with pytest.raises(TypeError, match="same dtype"):
        cnnfast.conv2d(x, w.astype(np.float64), padding=1)


def test_a_repeated_call_skips_the_checks_and_any_other_call_is_checked_afresh(monkeypatch):
    """A call on NumPy arrays of the types, shapes and dtypes of an earlier valid call, with the same other arguments
    (type-exact), skips the checks and planning (api._call_key): its result is the first call's. A call differing
    in any of those is checked (and planned) afresh, and a bad call raises every time."""
    import numba

    from cnnfast import api, arrays
    x, w = _small_problem()
    arrays.family_of(np.ma.masked_array(x))  # (a type met for the first time is checked twice: then it has a key)
    checked = []
    real = api._checked
    monkeypatch.setattr(api, "_checked", lambda op, *args: checked.append(op) or real(op, *args))
    monkeypatch.setattr(api, "_CALLS", {})
    first = cnnfast.conv2d(x, w, padding=1)
    again = cnnfast.conv2d(x.copy(), w.copy(), padding=1)  # other arrays, the same types, shapes and dtypes
    assert checked == ["conv2d"] and np.array_equal(first, again)
    others = [lambda: cnnfast.conv2d(x, w, padding=(1, 1)), lambda: cnnfast.conv2d(x, w, padding=[1, 1]),
              lambda: cnnfast.conv2d(x, w, padding=np.int64(1)), lambda: cnnfast.conv2d(x, w, padding=1, stride=(1, 1)),
              lambda: cnnfast.conv2d(x, w, padding=1, algo="im2col"), lambda: cnnfast.conv2d(x[:1], w, padding=1),
              lambda: cnnfast.conv2d(x[0], w, padding=1), lambda: cnnfast.conv2d(x, w, w[:, 0, 0, 0], padding=1),
              lambda: cnnfast.conv2d(x.astype(np.float64), w.astype(np.float64), padding=1),
              lambda: cnnfast.conv2d(np.ma.masked_array(x), w, padding=1),
              lambda: cnnfast.conv2d(x, w, padding=1, workspace_limit=1 << 20),
              lambda: cnnfast.conv_transpose2d(first, w, padding=1)]
    for i, call in enumerate(others, 2):
        for _ in range(2):
            call()
        assert len(checked) == i, i
    dy = np.zeros(first.shape, np.float32)
    for _ in range(2):  # the input gradient of the first call's layer, then one given a grad_output of another size
        cnnfast.grad.conv2d_input(x.shape, w, dy, padding=1)
        with pytest.raises(ValueError, match="expected grad_output of size"):
            cnnfast.grad.conv2d_input(x.shape, w, dy[:, :, 1:], padding=1)
    assert checked[len(others) + 1:] == ["conv2d_input", "conv2d_input", "conv2d_input"]
    class ListShape(np.ndarray):  # an array type whose shape is a list: no key, checked every call (as before)
        shape = property(lambda self: list(np.ndarray.shape.__get__(self)))

    for _ in range(3):
        assert np.array_equal(cnnfast.conv2d(x.view(ListShape), w, padding=1), first)
    looped = []
    looped.append(looped)
    for _ in range(2):  # an option that holds itself: the dtype's error first, every time
        with pytest.raises(TypeError, match="expected input to have dtype float32 or float64"):
            cnnfast.conv2d(x.astype(np.int32), w, padding=looped)
    numba_threads = numba.get_num_threads()
    try:  # a change of Numba's threads plans the call afresh (the per-thread scratch of some kernels)
        numba.set_num_threads(1)
        before = len(checked)
        assert np.array_equal(cnnfast.conv2d(x, w, padding=1), first) and checked[before:] == ["conv2d"]
    finally:
        numba.set_num_threads(numba_threads)


def test_torch_tensors_are_keyed_by_what_decides_their_checks(monkeypatch):
    """api._call_key of a call on torch tensors: equal for tensors of the same type, shape, dtype, device, grad
    requirement and layout (a CUDA tensor's checks then skipped, as for CuPy's arrays), different where any differs;
    a call the checks refuse (CPU tensors) is refused every time."""
    torch = pytest.importorskip("torch")
    from cnnfast import api

    def key(x, w):
        return api._call_key("conv2d", {"input": x, "weight": w}, None, None, "auto", None, {"padding": 1})

    class Sub(torch.Tensor):
        pass

    x, w = torch.zeros(1, 2, 5, 5), torch.zeros(3, 2, 3, 3)
    first = key(x, w)
    assert first is not None and key(x.clone(), w.clone()) == first
    others = [x.double(), x.clone().requires_grad_(True), x.to_sparse(), x[:, :1], x[0], x.as_subclass(Sub)]
    assert len({key(other, w) for other in others} | {first}) == len(others) + 1
    monkeypatch.setattr(api, "_CALLS", {})
    for _ in range(2):
        with pytest.raises(TypeError, match="conv2d: expected input to be a NumPy array or a CUDA array"):
            cnnfast.conv2d(x, w, padding=1)
    assert api._CALLS == {}


def test_replacing_an_algorithm_invalidates_its_cached_plans(monkeypatch):
    from cnnfast.kernels.cpu import ALGORITHMS
    x, w = _small_problem()
    before = cnnfast.explain("conv2d", x, w, padding=1, algo="im2col")
    assert before.workspace_bytes > 0
    monkeypatch.setitem(ALGORITHMS, "im2col", dataclasses.replace(ALGORITHMS["im2col"],
                                                                  workspace_bytes=lambda *args: 12345))
    assert cnnfast.explain("conv2d", x, w, padding=1, algo="im2col").workspace_bytes == 12345


def test_each_replacement_of_choose_or_an_algorithm_is_planned_afresh():
    """The registry's token held the replaced objects' ids only: once one was freed, the next replacement could get
    its address and the plans made under the freed one were taken for its (a replaced choose's third and fourth
    answers were the first and second's). Each replacement here frees the last (not monkeypatch, which keeps them)."""
    from cnnfast.kernels import cpu
    x, w = _small_problem()
    choose, im2col = cpu.choose, cpu.ALGORITHMS["im2col"]

    def choosing(name):
        return lambda g, primitive: (name, f"chosen: {name}")
    try:
        for name in ["direct", "im2col", "winograd", "direct", "winograd", "im2col"] * 2:
            cpu.choose = choosing(name)
            assert cnnfast.explain("conv2d", x, w, padding=1).algorithm == name
        for size in range(1, 9):
            cpu.ALGORITHMS["im2col"] = dataclasses.replace(im2col, workspace_bytes=lambda *a, s=size: s)
            assert cnnfast.explain("conv2d", x, w, padding=1, algo="im2col").workspace_bytes == size
    finally:
        cpu.choose, cpu.ALGORITHMS["im2col"] = choose, im2col


def test_a_cached_plan_follows_numbas_thread_count():
    """The per-thread scratch of the depthwise and wide kernels scales with Numba's thread count (the calling
    thread's): a plan made at one count is not reused at another (explain reported the old workspace, and an explicit
    algorithm planned under a tight workspace_limit at one thread was accepted at two)."""
    import numba
    rng = np.random.default_rng(3)
    x, w = (rng.standard_normal(shape).astype(np.float32) for shape in ((2, 16, 12, 12), (16, 1, 3, 3)))
    threads = numba.get_num_threads()
    at = {}
    try:
        for n in sorted({1, threads}) + [1]:
            numba.set_num_threads(n)
            at[n] = cnnfast.explain("conv2d", x, w, padding=1, groups=16).workspace_bytes
            assert at[n] == at[1] * n
    finally:
        numba.set_num_threads(threads)


def test_plan_cache_is_bounded(monkeypatch):
    from cnnfast import api
    monkeypatch.setattr(api, "PLAN_CACHE_SIZE", 4)
    x, w = _small_problem()
    for pad in range(10):
        cnnfast.explain("conv2d", x, w, padding=pad)
        assert len(api._PLANS) <= 4


def test_a_device_without_kernels_runs_the_reference_and_autotune_keeps_no_winner(monkeypatch):
    """The reference is the fallback while a device has no kernels registered: algo='auto' plans it and says why, the
    result is the float64 reference's cast to the dtype, and autotuning, with no candidate to time, keeps no winner."""
    from cnnfast.kernels import cpu

    from cnnfast import reference, tune
    monkeypatch.setattr(cpu, "ALGORITHMS", {})
    monkeypatch.delenv(tune.CACHE_ENV, raising=False)
    tune.clear()
    x, w = _small_problem()
    expected = reference.conv(x, w, padding=1)
    for tuned in (False, True):
        with cnnfast.autotune(tuned):
            plan = cnnfast.explain("conv2d", x, w, padding=1)
            y = cnnfast.conv2d(x, w, padding=1)
        assert plan.algorithm == "reference" and plan.reason.startswith("no cpu kernels are registered yet")
        np.testing.assert_array_equal(y, expected.astype(x.dtype))
    assert tune._WINNERS == {}
    with pytest.raises(ValueError, match=r"^conv2d: unknown algo 'im2col' for device cpu; expected 'auto' or one of "
                                         r"\['reference'\]$"):
        cnnfast.conv2d(x, w, padding=1, algo="im2col")


def test_on_the_workqueue_layer_parallel_kernels_take_turns(monkeypatch):
    """Numba's workqueue layer ends the process when two threads enter parallel regions at once: there every parallel
    build runs behind one lock (a call too small for the pool runs its serial build, without it)."""
    from cnnfast.kernels.cpu import threads

    from cnnfast import reference

    class CountingLock:
        def __init__(self):
            self.lock, self.entered = threading.Lock(), 0

        def __enter__(self):
            self.entered += 1
            return self.lock.__enter__()

        def __exit__(self, *exc):
            return self.lock.__exit__(*exc)
    lock = CountingLock()
    monkeypatch.setattr(threads, "_WORKQUEUE", True)
    monkeypatch.setattr(threads, "_REGION_LOCK", lock)
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((2, 8, 24, 24)).astype(np.float32), rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    y = cnnfast.conv2d(x, w, padding=1, algo="direct")  # 2*8*8*9*24*24 multiply-adds: the parallel build
    assert lock.entered >= 1
    assert_close(y, reference.conv(x, w, padding=1), "float32", "direct on the workqueue layer")
    entered = lock.entered
    small = cnnfast.conv2d(x[:1, :1, :4, :4], w[:1, :1], padding=1, algo="direct")  # 144 multiply-adds: serial
    assert lock.entered == entered
    assert_close(small, reference.conv(x[:1, :1, :4, :4], w[:1, :1], padding=1), "float32", "serial build")
