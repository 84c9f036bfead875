"""Host time Numba's CUDA launch spends turning a kernel's arguments into launch parameters (numba-cuda's
_Kernel._prepare_args, called once per argument on every launch), without a GPU: real DeviceNDArray objects over a
stand-in for device memory, the argument types a depthwise plane_kernel launch has (RESULTS.md, 2026-12-05).

    python bench/results/numba_marshalling_2026-12-05.py

Not included: the dispatcher's typing of the arguments and cuda.core's launch (both need a GPU to run).
"""
import ctypes
import timeit

import numpy as np
from numba import types
from numba.cuda.cudadrv.devicearray import DeviceNDArray
from numba.cuda.dispatcher import _Kernel


class Memory:  # stands in for a MemoryPointer: an address, no GPU
    def __init__(self, nbytes):
        self._buffer = ctypes.create_string_buffer(nbytes)
        self.device_ctypes_pointer = ctypes.c_void_p(ctypes.addressof(self._buffer))


class Kernel:  # what _prepare_args reads of a compiled kernel
    extensions = []
    _prepare_args = _Kernel._prepare_args


def array(n):
    return DeviceNDArray((n,), (4,), np.float32, gpu_data=Memory(4 * n))


def prepare(argtypes, args):
    retr, params = [], []
    for ty, value in zip(argtypes, args):
        Kernel()._prepare_args(ty, value, 0, retr, params)
    return params


ARRAY, INT = types.Array(types.float32, 1, "C"), types.int64
arrays, geometry = [array(64), array(9), array(1), array(64)], tuple(range(36))
cases = {
    "4 arrays, a tuple of 36 ints, 1 int (plane_kernel)": ([ARRAY] * 4 + [types.UniTuple(INT, 36), INT],
                                                          arrays + [geometry, 1]),
    "4 arrays, 1 int": ([ARRAY] * 4 + [INT], arrays + [1]),
    "a tuple of 36 ints": ([types.UniTuple(INT, 36)], [geometry]),
    "1 array": ([ARRAY], arrays[:1]),
    "1 int": ([INT], [1]),
}
for name, (argtypes, args) in cases.items():
    best = min(timeit.repeat(lambda t=argtypes, a=args: prepare(t, a), number=20000, repeat=5)) / 20000 * 1e6
    print(f"{name:52s} {len(prepare(argtypes, args)):3d} parameters {best:6.2f} us")
