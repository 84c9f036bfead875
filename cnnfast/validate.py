"""Check every registered algorithm of a device against the float64 reference (`cnnfast validate`).

A Case is one problem of one op kind; `problem(case, dtype)` draws its random inputs and returns the
public call and the matching reference call, so a test or the CLI runs both and compares them with
cnnfast.compare. The grid covers 1-D/2-D/3-D, stride, dilation, groups (and depthwise with a channel
multiplier), asymmetric and 'same' padding, every padding mode, output_padding, 1x1 and input-sized kernels.
"""
from __future__ import annotations

import contextlib
import time
from typing import NamedTuple

import numpy as np

from cnnfast import api, compare, grad
from cnnfast.arrays import to_host  # noqa: F401  (re-exported for tests and the benchmark)
from cnnfast.kernels.cpu import threads
from cnnfast.spec import ConvSpec

KINDS = ("conv", "conv_input", "conv_weight", "conv_transpose", "conv_transpose_input", "conv_transpose_weight")
PRIMITIVE = {"conv": "forward", "conv_input": "backward_data", "conv_weight": "backward_filter",
             "conv_transpose": "backward_data", "conv_transpose_input": "forward",
             "conv_transpose_weight": "backward_filter"}


class Case(NamedTuple):
    """input_shape is the op's input (N, C, *L); weight_shape PyTorch's for the op (transposed: (C, K/g, *k))."""

    name: str
    input_shape: tuple
    weight_shape: tuple
    options: dict = {}
    bias: bool = True


# forward-convolution problems; each is run as all six op kinds (transposed ones use zero padding only)
CASES = (
    Case("1d", (2, 3, 11), (4, 3, 3), dict(padding=1)),
    Case("1d-s2-d2", (1, 4, 13), (4, 2, 3), dict(stride=2, dilation=2, groups=2, padding=2)),
    Case("2d", (2, 3, 7, 6), (4, 3, 3, 2), dict(padding=(1, 0))),
    Case("2d-s2-asym", (1, 4, 8, 7), (6, 2, 3, 3), dict(stride=(2, 1), padding=((1, 2), (0, 1)), groups=2)),
    Case("2d-dil", (1, 2, 9, 9), (3, 2, 3, 3), dict(dilation=(2, 3), padding=2)),
    Case("2d-depthwise-x2", (2, 4, 6, 6), (8, 1, 3, 3), dict(padding=1, groups=4)),
    Case("1d-depthwise-s2-d2", (2, 3, 12), (6, 1, 3), dict(stride=2, dilation=2, padding=((2, 1),), groups=3)),
    Case("2d-depthwise-s2-reflect", (1, 3, 7, 6), (3, 1, 3, 3),
         dict(stride=2, padding=(1, 2), padding_mode="reflect", groups=3)),
    Case("2d-1x1", (2, 5, 4, 3), (3, 5, 1, 1), {}),
    Case("2d-full", (1, 3, 5, 4), (2, 3, 5, 4), {}, False),
    Case("2d-same-s2", (1, 2, 7, 8), (3, 2, 3, 3), dict(stride=2, padding="same")),
    Case("2d-reflect", (1, 2, 5, 6), (3, 2, 3, 3), dict(padding=(2, 1), padding_mode="reflect")),
    Case("2d-replicate", (2, 2, 5, 4), (2, 2, 2, 3), dict(padding=((0, 2), (1, 1)), padding_mode="replicate")),
    Case("2d-circular", (1, 3, 4, 5), (2, 3, 3, 3), dict(stride=2, padding=(1, 2), padding_mode="circular")),
    Case("3d", (1, 2, 4, 5, 4), (3, 2, 2, 3, 2), dict(stride=(1, 2, 1), padding=(1, 1, 0))),
    Case("3d-groups-dil", (1, 4, 5, 5, 5), (4, 2, 2, 2, 2), dict(groups=2, dilation=2, padding=((0, 1), 1, 0))),
)


def transposed_case(case: Case) -> Case:
    """The transposed op of the same layer (the adjoint: same weight tensor), input of the conv's output size,
    zero padding only, output_padding chosen so the output has the conv's input size."""
    opts = dict(case.options)
    spec = ConvSpec.create("validate", case.input_shape, case.weight_shape, **opts)
    if spec.padding_mode != "zeros" or isinstance(opts.get("padding"), str):
        opts = {k: v for k, v in opts.items() if k != "padding_mode"}
        opts["padding"] = spec.padding
    w_t = case.weight_shape  # conv_transpose's (in=K, out/groups=C/groups, *k): the conv's weight, as adjoint
    out = spec.output_shape
    smallest = ConvSpec.create("validate", out, w_t, transposed=True, **opts).output_shape
    extra = tuple(a - b for a, b in zip(case.input_shape[2:], smallest[2:]))
    opts["output_padding"] = tuple(min(e, max(s, d) - 1) for e, s, d in zip(extra, spec.stride, spec.dilation))
    return Case(case.name, out, w_t, opts, case.bias)


def case_spec(case: Case, kind: str) -> ConvSpec:
    """The ConvSpec of `kind` on `case` (for transposed kinds, of the transposed layer)."""
    transposed = kind.startswith("conv_transpose")
    if transposed:
        case = transposed_case(case)
    return ConvSpec.create(kind, case.input_shape, case.weight_shape, transposed=transposed, **case.options)


class Problem(NamedTuple):
    op: str
    public: callable  # public(algo=..., **extra) -> result
    expected: np.ndarray  # float64 reference
    inputs: tuple  # the positional arguments of the public call (arrays already moved)
    options: dict  # its keyword arguments


def problem(case: Case, kind: str, dtype="float32", seed=0, to_device=None) -> Problem:
    """Random inputs for `kind` on `case`, the public call (inputs moved by to_device) and the reference."""
    spec = case_spec(case, kind)
    transposed = spec.transposed
    if transposed:
        case = transposed_case(case)
    rng = np.random.default_rng(seed)
    nd = spec.nd
    x = rng.standard_normal(case.input_shape).astype(dtype)
    w = rng.standard_normal(case.weight_shape).astype(dtype)
    b = rng.standard_normal(spec.output_shape[1]).astype(dtype) if case.bias else None
    dy = rng.standard_normal(spec.output_shape).astype(dtype)
    move = to_device or (lambda a: a)
    opts = dict(case.options)
    prefix = "conv_transpose" if transposed else "conv"
    name = f"{prefix}{nd}d{kind[len(prefix):]}"  # conv_input -> conv2d_input, ...
    if kind in ("conv", "conv_transpose"):
        fn = getattr(api, name)
        args = (move(x), move(w), None if b is None else move(b))
    elif kind.endswith("_input"):
        fn = getattr(grad, name)
        args = (x.shape, move(w), move(dy))
    else:
        fn = getattr(grad, name)
        args = (move(x), w.shape, move(dy))
    expected = compare.expected_result(kind, spec, input=x, weight=w, grad_output=dy, bias=b)
    return Problem(name, lambda **kw: fn(*args, **opts, **kw), expected, args, opts)


def device_mover(device):
    """Host array -> an array of `device` (CuPy when importable and not simulating, else Numba)."""
    if device == "cpu":
        return None
    from cnnfast.arrays import _cupy
    cp = _cupy()
    if cp is not None:
        return cp.asarray
    from numba import cuda
    return cuda.to_device


class Result(NamedTuple):
    device: str
    algorithm: str
    kind: str
    case: str
    dtype: str
    error: float  # relative error; nan when the algorithm does not apply
    ok: bool
    note: str
    seconds: float
    build: str = ""  # CPU: the kernels' build, 'serial' or 'parallel' (kernels/cpu/threads.py)


def validate(device="cpu", algos=None, dtypes=("float32", "float64"), kinds=KINDS, cases=CASES, progress=None):
    """Run every (algorithm, kind, case, dtype) through the public API against the reference; on the CPU, once with
    each build of the kernels (the grid's problems are small enough to run only the serial builds otherwise)."""
    from cnnfast.plan import algorithms

    names = algos or [a for a in algorithms(device) if a != "reference"] or ["reference"]
    mover = device_mover(device)
    builds = threads.BUILDS if device == "cpu" else ("",)
    results = []
    for algo in names:
        for kind in kinds:
            for case in cases:
                for dtype in dtypes:
                    for build in builds:
                        results.append(_check(device, build, algo, kind, case, dtype, mover))
                        if progress:
                            progress(results[-1])
    return results


def _check(device, build, algo, kind, case, dtype, mover):
    t0 = time.perf_counter()
    p = problem(case, kind, dtype, to_device=mover)
    try:
        with threads.only(build) if build else contextlib.nullcontext():
            out = p.public(algo=algo)
    except Exception as e:  # an algorithm that does not take the problem is n/a; any other error fails the check
        if isinstance(e, ValueError) and "cannot run this problem" in str(e):
            return Result(device, algo, kind, case.name, dtype, float("nan"), True,
                          "n/a: " + str(e).split(": ", 2)[-1], 0.0, build)
        return Result(device, algo, kind, case.name, dtype, float("nan"), False, f"{type(e).__name__}: {e}",
                      time.perf_counter() - t0, build)
    try:
        err, note, ok = compare.assert_close(to_host(out), p.expected, dtype, p.op), "", True
    except compare.MismatchError as e:
        err, note, ok = e.error, str(e), False
    return Result(device, algo, kind, case.name, dtype, err, ok, note, time.perf_counter() - t0, build)
