"""Races and divergent barriers in the CUDA kernels, found in the simulator (tests/races.py), which runs a kernel's
threads without noticing either: a GPU would give wrong results or hang. First the detector on toy kernels with one
bug each, then cnnfast's kernels that use shared memory (the tiled GEMMs, the depthwise halo tiles and weight gradient,
the bias gradient) on shapes with partial tiles, several blocks per launch and several tiles per block; every kernel
argument's writes are checked too. On a GPU, bench/sanitize.py runs compute-sanitizer's racecheck instead."""
import numpy as np
import pytest
from cnnfast.kernels.cuda import depthwise, depthwise_filter, direct, layout
from races import watching
from test_cuda_kernels import _three_primitives

from cnnfast import compare, grad
from cnnfast.arrays import simulator_enabled

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not simulator_enabled(), reason="simulator only: on a GPU, "
                                                   "bench/sanitize.py runs compute-sanitizer")]
cuda = pytest.importorskip("numba.cuda")
from numba import float32  # noqa: E402


@cuda.jit
def reads_a_neighbour_without_a_barrier(out):
    s = cuda.shared.array(64, float32)
    t = cuda.threadIdx.x
    s[t] = t
    out[cuda.blockIdx.x * 64 + t] = s[(t + 1) % 64]


@cuda.jit
def reads_a_neighbour_after_a_barrier(out):
    s = cuda.shared.array(64, float32)
    t = cuda.threadIdx.x
    s[t] = t
    cuda.syncthreads()
    out[cuda.blockIdx.x * 64 + t] = s[(t + 1) % 64]


@cuda.jit
def restages_while_others_still_read(out):  # a staged tile overwritten with no barrier after its last read
    s = cuda.shared.array(64, float32)
    t = cuda.threadIdx.x
    total = 0.0
    for step in range(3):
        s[t] = t + step
        cuda.syncthreads()
        total += s[63 - t]
    out[cuda.blockIdx.x * 64 + t] = total


@cuda.jit
def barrier_in_a_branch(out):
    s = cuda.shared.array(64, float32)
    t = cuda.threadIdx.x
    s[t] = t
    if t < 32:
        cuda.syncthreads()
    out[cuda.blockIdx.x * 64 + t] = s[t]


@cuda.jit
def returns_before_a_barrier(out):
    s = cuda.shared.array(64, float32)
    t = cuda.threadIdx.x
    if t >= 60:
        return
    s[t] = t
    cuda.syncthreads()
    out[cuda.blockIdx.x * 64 + t] = s[t]


@cuda.jit
def reads_what_no_thread_staged(out):
    s = cuda.shared.array(64, float32)
    t = cuda.threadIdx.x
    if t < 32:
        s[t] = t
    cuda.syncthreads()
    out[cuda.blockIdx.x * 64 + t] = s[t]


@cuda.jit
def all_write_one_element(out):
    out[0] = cuda.threadIdx.x


@cuda.jit
def reads_a_neighbours_output(out):
    t = cuda.grid(1)
    out[t] = 1.0
    if t > 0:
        out[t] += out[t - 1]


TOYS = [(reads_a_neighbour_without_a_barrier, "shared race"), (reads_a_neighbour_after_a_barrier, None),
        (restages_while_others_still_read, "shared race"), (barrier_in_a_branch, "divergent barrier"),
        (returns_before_a_barrier, "divergent barrier"), (reads_what_no_thread_staged, "uninitialised shared read"),
        (all_write_one_element, "global conflict"), (reads_a_neighbours_output, "global conflict")]


@pytest.mark.parametrize("kernel, finding", TOYS, ids=[k.py_func.__name__ for k, _ in TOYS])
def test_the_detector_finds_the_one_bug_of_each_toy_kernel(kernel, finding):
    with watching() as seen:
        kernel[2, 64](cuda.to_device(np.zeros(128, np.float32)))
    found = seen.kinds()
    assert seen.counts["blocks"] == 2 and seen.counts["global writes"], seen.counts  # (the patches are in place)
    if finding is None:
        assert not found, seen.problems
    else:
        assert any(kind.startswith(finding) for kind in found), seen.problems


# (what it covers, x, w, algo, options, module constants lowered so that small shapes reach the case)
CASES = [
    # the double-buffered tiled GEMM on partial tiles, the sub-pixel classes of backward data, groups
    ("tiled GEMM, strided, grouped", (1, 4, 9, 8), (6, 2, 3, 3), "direct:8x64", dict(stride=2, padding=1, groups=2),
     {}),
    # two row blocks and two column blocks, a weight gradient split three ways with a short last split
    ("tiled GEMM, several blocks, split weight gradient", (2, 2, 6, 6), (10, 2, 3, 3), "direct:8x64",
     dict(padding=1), {(direct, "MIN_SPLIT"): 24}),
    # several planes staged one after another in each block, a partial last group; M = 2
    ("depthwise halo tiles, several planes per block", (2, 5, 7, 7), (10, 1, 3, 3), "depthwise",
     dict(padding=1, groups=5), {(depthwise, "TARGET_BLOCKS"): 1}),
    # two tiles across a wide plane, stride 2, and the weight gradient split with a short last split
    ("depthwise stride 2, two tiles across, split weight gradient", (1, 2, 5, 70), (2, 1, 3, 3), "depthwise",
     dict(stride=2, padding=1, groups=2), {(depthwise_filter, "MIN_CHUNK"): 2}),
    # a 5x5 filter: the weight gradient's tap passes reuse one shared buffer (9 taps a pass)
    ("depthwise 5x5, three weight-gradient passes", (1, 2, 6, 7), (2, 1, 5, 5), "depthwise",
     dict(padding=2, groups=2), {}),
]


@pytest.mark.parametrize("x_shape, w_shape, algo, options, lowered", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_shared_memory_kernels_have_no_races_or_divergent_barriers(x_shape, w_shape, algo, options, lowered,
                                                                   monkeypatch):
    for (module, name), value in lowered.items():
        monkeypatch.setattr(module, name, value)
    with watching() as seen:
        _three_primitives(x_shape, w_shape, options, "float32", algo)
    assert seen.counts["barriers"] and seen.counts["shared writes"] and seen.counts["global writes"], seen.counts
    assert not seen.problems, seen.problems


def test_the_bias_gradients_split_reduction_has_no_races(monkeypatch):
    monkeypatch.setattr(layout, "MIN_SPLIT", 64)  # three splits of each channel's sum
    dy = np.random.default_rng(0).standard_normal((3, 2, 8, 9)).astype(np.float32)
    with watching() as seen:
        db = grad.conv_bias(cuda.to_device(dy)).copy_to_host()
    compare.assert_close(db, dy.sum(axis=(0, 2, 3), dtype=np.float64), "float32", "conv_bias")
    assert seen.counts["barriers"] and seen.counts["launches"] == 2, seen.counts
    assert not seen.problems, seen.problems
