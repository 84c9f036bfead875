"""Host time per call, in microseconds, of the figures in RESULTS.md (2026-12-05): tiny problems, best of 5 x 2,000.

    python bench/results/host_cost_2026-12-05.py cpu                         the CPU path, kernels included
    NUMBA_ENABLE_CUDASIM=1 python bench/results/host_cost_2026-12-05.py cuda cnnfast's CUDA path up to the kernel
    python bench/results/host_cost_2026-12-05.py numba                       the same with Numba's own arrays

cuda: the simulator's device arrays, with compile.jit replaced by a stand-in whose [grid, block, stream](*args)
does nothing, so what is timed is everything cnnfast does before Numba's dispatcher would start the kernel (the
dispatcher's own 44-135 us per launch on a GPU, TOOLCHAIN.md, is not in it).

numba (no simulator, no GPU needed): as cuda, but the arrays are Numba's real DeviceNDArray objects over fake device
memory (cuda.device_array and cuda.to_device replaced), so their Python costs (a reshape builds a new DeviceNDArray:
~3 us, against ~0.5 us for the simulator's NumPy-backed arrays) are in the figure, as on a GPU. No memory is
allocated, so a GPU's allocation (cuMemAlloc per output without a pool) is not.
"""
import sys
import timeit

import numpy as np

import cnnfast
from cnnfast import grad

device = sys.argv[1]
if device in ("cuda", "numba"):
    from cnnfast.kernels.cuda import compile as kernel_compile
    from numba import cuda

    class _Configured:  # compile.jit(pyfunc)[grid, block, stream]: the kernel call, stubbed
        def __getitem__(self, config):
            return lambda *args: None

    kernel_compile.jit = lambda pyfunc: _Configured()
    if device == "numba":
        import ctypes
        import math

        from numba.cuda.cudadrv.devicearray import DeviceNDArray

        class _Memory:  # stands in for a MemoryPointer: an address, no GPU
            def __init__(self, nbytes):
                self._buffer = ctypes.create_string_buffer(max(nbytes, 1))
                self.device_ctypes_pointer = self.handle = ctypes.c_void_p(ctypes.addressof(self._buffer))

        def _device_array(shape, dtype=np.float64, stream=0, **_):
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            itemsize = np.dtype(dtype).itemsize
            strides = tuple(math.prod(shape[i + 1:]) * itemsize for i in range(len(shape)))
            return DeviceNDArray(shape, strides, dtype, stream, gpu_data=_Memory(math.prod(shape) * itemsize))

        cuda.device_array = _device_array
        gpu = type("Device", (), {"id": 0})()
        cuda.get_current_device = lambda: gpu  # (device_constant keys on the GPU's id)
        cuda.to_device = lambda a, stream=0, **_: _device_array(np.shape(a), np.asarray(a).dtype, stream)
        cuda.synchronize = lambda: None  # (device_constant waits for its one upload)
        cuda.gpus = [gpu]  # (api.run asks where arrays are only with several GPUs)
    put = cuda.to_device
else:
    def put(a):
        return a

rng = np.random.default_rng(0)
x, w, b, dy = (put(rng.standard_normal(s).astype(np.float32)) for s in ((1, 1, 8, 8), (1, 1, 3, 3), (1,), (1, 1, 8, 8)))
x2, w2, dy2 = (put(rng.standard_normal(s).astype(np.float32)) for s in ((1, 2, 8, 8), (4, 2, 3, 3), (1, 4, 8, 8)))
cases = {
    "dense conv2d": lambda: cnnfast.conv2d(x2, w2, padding=1),
    "dense conv2d_input": lambda: grad.conv2d_input((1, 2, 8, 8), w2, dy2, padding=1),
    "dense conv2d_weight": lambda: grad.conv2d_weight(x2, (4, 2, 3, 3), dy2, padding=1),
    "conv2d": lambda: cnnfast.conv2d(x, w, padding=1),
    "conv2d+bias": lambda: cnnfast.conv2d(x, w, b, padding=1),
    "conv2d_input": lambda: grad.conv2d_input((1, 1, 8, 8), w, dy, padding=1),
    "conv2d_weight": lambda: grad.conv2d_weight(x, (1, 1, 3, 3), dy, padding=1),
    "conv_transpose2d": lambda: cnnfast.conv_transpose2d(x, w, padding=1),
}
for name, fn in cases.items():
    for _ in range(20):
        fn()
    best = min(timeit.repeat(fn, number=2000, repeat=5)) / 2000 * 1e6
    print(f"{device:5s} {name:20s} {best:6.1f} us", flush=True)
