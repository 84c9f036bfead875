"""CUDA benchmarks with pytest-benchmark: the anchor set (cnnfast.benchmark's "gpu" shapes) against cuDNN, and
the host cost of one call on both launch paths. On a GPU machine:

    pytest bench/test_cuda.py --benchmark-group-by=param:shape --benchmark-json=cuda.json
    CNNFAST_BENCH_SHAPES=quick pytest bench/test_cuda.py                   (small shapes)
    pytest bench/test_cuda.py -k host_cost                                  (launch overhead only)

Each cnnfast case is validated against the float64 reference before it is timed. pytest-benchmark times the host,
so each timed round ends with a device synchronisation; `cnnfast bench --device cuda` gives CUDA-event medians
with measured ceilings. "torch" is cuDNN in strict fp32 (allow_tf32 = False), "torch-tf32" PyTorch's default.
Skipped on a machine without a CUDA GPU (benchmarks never run in the simulator).
"""
import os

import numpy as np
import pytest

from cnnfast import benchmark as harness
from cnnfast import compare

if harness.detect_device() != "cuda":
    pytest.skip("no CUDA GPU: bench/test_cuda.py times real kernels only", allow_module_level=True)

from cnnfast.kernels.cuda import launch  # noqa: E402
from numba import cuda  # noqa: E402

from cnnfast.validate import to_host  # noqa: E402

SHAPES = harness.SHAPE_SETS[os.environ.get("CNNFAST_BENCH_SHAPES", "gpu")]


@pytest.fixture(autouse=True)
def strict_fp32():
    try:
        import torch
    except ImportError:
        yield
        return
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield


@pytest.mark.parametrize("primitive", harness.PRIMITIVES)
@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
@pytest.mark.parametrize("provider", ["cnnfast:auto", "torch", "torch-tf32"])
def test_cuda(benchmark, shape, primitive, provider):
    spec = harness.spec_of(shape, "float32")
    host = harness.inputs(shape, spec, "float32")
    if provider.startswith("torch"):
        torch = pytest.importorskip("torch")
        fn = harness.torch_call(shape, primitive, dict(host, spec=spec), "cuda")
        if fn is None:
            pytest.skip("torch has no asymmetric padding")
        fn = harness.torch_tf32(fn) if provider == "torch-tf32" else fn
        sync = torch.cuda.synchronize
    else:
        arrays = {k: harness.to_device(v, "cuda") for k, v in host.items()}
        fn = harness.cnnfast_call(shape, primitive, arrays, "auto")
        for _ in range(2):  # (the second call as it is timed: on the raw path, replayed from the first's launches)
            compare.assert_close(to_host(fn()), harness.reference_result(shape, primitive, host), "float32")
        sync = cuda.synchronize
    benchmark.extra_info.update(flops=spec.flops, bytes=spec.min_bytes(primitive))
    benchmark(lambda: (fn(), sync()))


@pytest.mark.parametrize("path", ["numba", "raw", "raw-full"])
@pytest.mark.parametrize("family", ["numba", "cupy", "cai", "cnnfast.torch", "torch"])
def test_cuda_host_cost(benchmark, monkeypatch, family, path):
    """Host time of one conv2d on a problem too small to matter (1x1x8x8 by one 3x3 filter), not synchronised:
    argument checks, the cached plan, the launches. torch's own conv2d is the family "torch", path "numba" row;
    "cai" is cnnfast.conv2d on torch tensors (torch's memory and stream), "cnnfast.torch" the drop-in's conv2d.
    "raw" replays a repeated call from its launch program (kernels/cuda/program.py), "raw-full" runs it in full.
    extra_info["event_us"]: the same call timed with CUDA events (host gaps included), for overhead = wall - kernel."""
    from cnnfast.kernels.cuda import program

    import cnnfast
    from cnnfast import reference

    monkeypatch.setenv(launch.ENV, path.split("-")[0])
    if path == "raw-full":
        monkeypatch.setenv(program.ENV, "0")
    else:
        monkeypatch.delenv(program.ENV, raising=False)
    if path != "numba" and not launch.raw_enabled():
        pytest.skip("the raw launch path needs a GPU")
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 1, 8, 8)).astype(np.float32), rng.standard_normal((1, 1, 3, 3)).astype(np.float32)
    if family in ("torch", "cnnfast.torch"):
        torch = pytest.importorskip("torch")
        if path != "numba" and family == "torch":
            pytest.skip("torch has one launch path")
        xd, wd = torch.from_numpy(x).cuda(), torch.from_numpy(w).cuda()
        if family == "torch":
            fn = lambda: torch.nn.functional.conv2d(xd, wd, padding=1)  # noqa: E731
        else:
            import cnnfast.torch
            fn = lambda: cnnfast.torch.conv2d(xd, wd, padding=1)  # noqa: E731
            for _ in range(2):
                compare.assert_close(fn().cpu().numpy(), reference.conv(x.astype(np.float64), w.astype(np.float64),
                                                                          padding=1), "float32")
        timer = harness.time_torch_cuda
    else:
        if family == "cupy":
            cp = pytest.importorskip("cupy")
            xd, wd = cp.asarray(x), cp.asarray(w)
        elif family == "cai":
            torch = pytest.importorskip("torch")
            xd, wd = torch.from_numpy(x).cuda(), torch.from_numpy(w).cuda()
        else:
            xd, wd = cuda.to_device(x), cuda.to_device(w)
        fn = lambda: cnnfast.conv2d(xd, wd, padding=1)  # noqa: E731
        for _ in range(2):  # (the second call of the raw path replayed from the first's launch program)
            compare.assert_close(to_host(fn()), reference.conv(x.astype(np.float64), w.astype(np.float64),
                                                               padding=1), "float32")
        timer = harness.time_cuda
    benchmark.extra_info["event_us"] = 1e6 * harness.time_interleaved([(fn, timer)], 50)[0]
    benchmark(fn)
    cuda.synchronize()
