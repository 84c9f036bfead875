"""Every registered (device, algorithm, primitive, dtype) through the public API against the float64 reference.

The grid (cnnfast.validate.CASES, each run as all six op kinds) covers 1-D/2-D/3-D, stride, dilation, groups,
depthwise with a channel multiplier, asymmetric and 'same' padding, every padding mode, output_padding, 1x1 and
input-sized kernels. CUDA runs on the GPU when there is one, else in Numba's CUDA simulator (tests/conftest.py).
"""
import contextlib
import os
import zlib

import numpy as np
import pytest
from cnnfast.kernels.cpu import threads

import cnnfast
from cnnfast import compare
from cnnfast.plan import algorithms
from cnnfast.validate import CASES, KINDS, PRIMITIVE, case_spec, device_mover, problem, to_host

DTYPES = ("float32", "float64")
# In the CUDA simulator a kernel is Python code that runs the same for either dtype; each dtype's compiled kernel
# is checked by the PTX test (tests/test_cuda_kernels.py). So the simulator runs float64 on a few cases only,
# which halves its share of CI; on a GPU every case runs in both dtypes.
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
SIMULATOR_FLOAT64_CASES = {"2d-s2-asym", "2d-depthwise-x2", "3d-groups-dil"}


def _dtypes(device, case):
    if device == "cuda" and SIMULATED and case.name not in SIMULATOR_FLOAT64_CASES:
        return ("float32",)
    return DTYPES


# The CPU kernels' builds: the grid's problems are small, so by default they would run only the serial builds
# (kernels/cpu/threads.py); each CPU case runs once with every kernel call serial and once with every call parallel.


def _grid():
    for device in ("cpu", "cuda"):
        marks = [pytest.mark.cuda] if device == "cuda" else []
        for build in threads.BUILDS if device == "cpu" else (None,):
            where = f"{device}-{build}" if build else device
            for name, algo in algorithms(device).items():
                if name == "reference" and build == "parallel":  # (no build of its own: its row checks how the
                    continue  # kernel interface hands the geometry to cnnfast.reference, on the serial build's run)
                for kind in KINDS:
                    for case in CASES:
                        g = case_spec(case, kind).geometry
                        if algo.supports(g, PRIMITIVE[kind]) is not None:
                            continue
                        for dtype in _dtypes(device, case):
                            yield pytest.param(device, build, name, kind, case, dtype, marks=marks,
                                               id=f"{where}-{name}-{kind}-{case.name}-{dtype}")


@pytest.mark.parametrize("device, build, algo, kind, case, dtype", list(_grid()))
def test_matches_reference(device, build, algo, kind, case, dtype):
    p = problem(case, kind, dtype, seed=zlib.crc32(f"{kind}/{case.name}".encode()), to_device=device_mover(device))
    with threads.only(build) if build else contextlib.nullcontext():
        out = p.public(algo=algo)
    array_in = p.inputs[1] if kind.endswith("_input") else p.inputs[0]
    assert type(out) is type(array_in)  # the caller's array family comes back
    host = to_host(out)
    assert host.dtype == np.dtype(dtype)
    compare.assert_close(host, p.expected, dtype, f"{p.op} algo={algo} on {device}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_auto_runs_the_algorithm_explain_names(device):
    for kind in KINDS:
        p = problem(CASES[3], kind, to_device=device_mover(device))
        plan = cnnfast.explain(p.op, *p.inputs, **p.options)
        assert plan.device == device and plan.primitive == PRIMITIVE[kind]
        assert plan.algorithm in algorithms(device) and plan.reason
        compare.assert_close(to_host(p.public(algo="auto")), p.expected, "float32", f"{p.op} auto on {device}")


@pytest.mark.cuda
def test_implicit_gemm_names_the_cuda_direct_algorithm():
    """algo="implicit_gemm" (the issue's and cuDNN's name) runs the CUDA 'direct' kernels, the implicit GEMM: the same
    bits; on the CPU, whose direct loops are not one, it stays an unknown algorithm."""
    p = problem(CASES[3], "conv", to_device=device_mover("cuda"))
    plan = cnnfast.explain(p.op, *p.inputs, algo="implicit_gemm", **p.options)
    assert plan.algorithm == "direct" and "'implicit_gemm' (the cuda algorithm 'direct')" in plan.reason
    assert np.array_equal(to_host(p.public(algo="implicit_gemm")), to_host(p.public(algo="direct")))
    with pytest.raises(ValueError, match="unknown algo 'implicit_gemm' for device cpu"):
        problem(CASES[3], "conv").public(algo="implicit_gemm")
