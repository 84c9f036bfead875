"""Host time of the raw launch path before the driver (the arguments' values handed to launch.launch_values, with a
stand-in for numba-cuda's cuLaunchKernel, and the launch's argument kinds) on CuPy-like and Numba device arrays; no
GPU and no CuPy needed (RESULTS.md, 2026-12-05; launch._launch_raw(function, grid, block, stream, args) then, the same
work as launch_values(..., _values(args)) since 2026-12-07).

    NUMBA_ENABLE_CUDASIM=0 python bench/results/raw_launch_2026-12-05.py
"""
import ctypes
import timeit
import types

import numpy as np
from cnnfast.kernels.cuda import launch
from numba.cuda.cudadrv.devicearray import DeviceNDArray

launch._driver = lambda: types.SimpleNamespace(cuLaunchKernel=lambda *args: None)


class CupyArray:  # what the raw path reads of a CuPy array
    class data:
        ptr = 0x7F0000001000
    dtype = np.dtype(np.float32)


class Memory:  # stand-in device memory under a real DeviceNDArray
    def __init__(self, nbytes):
        self._buffer = ctypes.create_string_buffer(nbytes)
        self.device_ctypes_pointer = ctypes.c_void_p(ctypes.addressof(self._buffer))


numba_array = DeviceNDArray((64,), (4,), np.float32, gpu_data=Memory(256))
function = types.SimpleNamespace(handle=1)
for family, a in (("CuPy", CupyArray()), ("Numba", numba_array)):
    cases = {"depthwise plane_kernel: 4 arrays, 36 + 1 ints (41 params)": [a] * 4 + [tuple(range(36)), 1],
             "tiled GEMM: 5 arrays, 22 + 4 ints (31 params)": [a] * 5 + [tuple(range(22)), 0, 1, 64, 0]}
    for name, args in cases.items():
        raw = min(timeit.repeat(lambda a=args: launch.launch_values(function, (4, 2, 3), 256, 0, launch._values(a)),
                                number=20000, repeat=5)) / 20000 * 1e6
        kinds = min(timeit.repeat(lambda a=args: tuple(map(launch._kind, a)), number=20000,
                                  repeat=5)) / 20000 * 1e6
        print(f"{family:5s} {name:60s} values + launch {raw:5.2f} us, argument kinds {kinds:5.2f} us")
