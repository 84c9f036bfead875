"""Compiled-kernel cache and the list of every CUDA specialisation (one source of truth for ptx.py).

jit(pyfunc) returns the cached Numba dispatcher of a kernel's Python function (the array typing used by the
launchers and the simulator); device_constant caches small read-only device arrays per GPU. specialisations()
enumerates every (name, pyfunc, argument types) the launchers can create, for both typings: 1-D arrays
(`float32[::1]`) and raw pointers (`CPointer(float32)`).
"""
import numpy as np
from numba import cuda, types

_DISPATCHERS = {}
_CONSTANTS = {}
DTYPES = (types.float32, types.float64)
# The kernels' typed zero: a float32 constant, which Numba unifies with float32 and float64 values (so a float32
# kernel stays in float32). Not `x[0] * 0`: that is NaN when x[0] is NaN or inf.
ZERO = np.float32(0.0)


def jit(pyfunc):
    """The (cached) cuda.jit dispatcher of a kernel's Python function."""
    kernel = _DISPATCHERS.get(pyfunc)
    if kernel is None:
        kernel = _DISPATCHERS[pyfunc] = cuda.jit(pyfunc)
    return kernel


def device_constant(key, make):
    """A read-only device copy of the host array make(), uploaded once per (current GPU, key) and kept: index
    tables and the zero-bias placeholder, so a launch does not pay a host-to-device copy each call. The one
    upload is synchronous, so every stream may read the array at once."""
    key = (getattr(cuda.get_current_device(), "id", 0),) + key  # the simulator's device has no id
    arr = _CONSTANTS.get(key)
    if arr is None:
        arr = _CONSTANTS[key] = cuda.to_device(make())
    return arr


def numba_dtype(dtype):
    return {np.dtype("float32"): types.float32, np.dtype("float64"): types.float64}[np.dtype(dtype)]


def specialisations():
    """[(name, pyfunc, argument types, typing)] for every kernel the launchers compile, both typings."""
    from cnnfast.kernels.cuda import bias, depthwise, direct, gemm, im2col, layout

    geo = types.UniTuple(types.int64, gemm.NGEO)
    out = []
    for dt in DTYPES:
        for typing in ("array", "pointer"):
            arr = dt[::1] if typing == "array" else types.CPointer(dt)
            iarr = types.int64[::1] if typing == "array" else types.CPointer(types.int64)
            kinds = {"A": arr, "I": iarr, "i": types.int64, "g": geo}

            def add(name, pyfunc, template, dt=dt, typing=typing, kinds=kinds):
                """template: one letter per argument: A float array, I int64 array, i int64, g geometry."""
                out.append((f"{name}[{dt},{typing}]", pyfunc, tuple(kinds[c] for c in template), typing))

            for family, ops_table in (("direct", direct.OPS), ("im2col_gemm", im2col.OPS)):
                for primitive, ops in ops_table.items():
                    add(f"{family}_{primitive}", gemm.tiled_kernel(dt, ops), "AAAAgiiii")
            add("reduce_splits", direct.reduce_splits_kernel, "AAii")
            add("im2col", im2col.im2col_kernel, "AAgii")
            add("col2im", im2col.col2im_kernel, "AAgii")
            add("depthwise_forward", depthwise.forward_kernel, "AAAAgi")
            add("depthwise_backward_data", depthwise.backward_data_kernel, "AAAg")
            add("add_bias", bias.add_bias_kernel, "AAiii")
            add("pad", layout.pad_kernel, "AAIII" + "i" * 7)
            add("fold_pad", layout.fold_pad_kernel, "AA" + "I" * 6 + "i" * 7)
            add("bias_grad", layout.bias_grad_kernel, "AAiii")
    return out
