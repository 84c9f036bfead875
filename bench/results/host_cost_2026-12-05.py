"""Host time per call, in microseconds, of the figures in RESULTS.md (2026-12-05): tiny problems, best of 5 x 2,000.

    python bench/results/host_cost_2026-12-05.py cpu                         the CPU path, kernels included
    NUMBA_ENABLE_CUDASIM=1 python bench/results/host_cost_2026-12-05.py cuda cnnfast's CUDA path up to the kernel
    python bench/results/host_cost_2026-12-05.py numba                       the same with Numba's own arrays
    python bench/results/host_cost_2026-12-05.py torch                       the same on torch CUDA tensors, and
                                                                             api.run as cnnfast.torch's ops call it
    python bench/results/host_cost_2026-12-05.py numba|torch raw             the raw launch path (program.py's
                                                                             replay on; CNNFAST_CUDA_REPLAY=0: off)

cuda: the simulator's device arrays, with compile.jit replaced by a stand-in whose [grid, block, stream](*args)
does nothing, so what is timed is everything cnnfast does before Numba's dispatcher would start the kernel (the
dispatcher's own 44-135 us per launch on a GPU, TOOLCHAIN.md, is not in it).

numba (no simulator, no GPU needed): as cuda, but the arrays are Numba's real DeviceNDArray objects over fake device
memory (cuda.device_array and cuda.to_device replaced), so their Python costs (a reshape builds a new DeviceNDArray:
~3 us, against ~0.5 us for the simulator's NumPy-backed arrays) are in the figure, as on a GPU. No memory is
allocated, so a GPU's allocation (cuMemAlloc per output without a pool) is not.

raw (added 2026-12-07, the thirty-fifth session): the raw launch path, each kernel's Function a stand-in and
cuLaunchKernel one that returns at once (the driver's own ~2-5 us per launch on a GPU is not in it), so a repeated call
is replayed from its launch program (kernels/cuda/program.py) unless CNNFAST_CUDA_REPLAY=0.

torch (added 2026-12-07, RESULTS.md of that date): as numba, on tensors that say they are on GPU 0 (torch here is a
CPU build), torch.empty and torch.zeros on the "cuda" device answered by CPU tensors (~0.8 us, where a GPU's caching
allocator takes a few us more), torch's current stream a stand-in. cnnfast before that date (which read torch tensors
with Numba's as_cuda_array and returned torch.as_tensor of a Numba array) runs with Numba's as_cuda_array given no
driver (no context, the pointer as given) and torch.as_tensor reading the Numba array's interface and allocating.
"""
import os
import sys
import timeit

import numpy as np

import cnnfast
from cnnfast import grad

device = sys.argv[1]
if device in ("cuda", "numba", "torch"):
    from cnnfast.kernels.cuda import compile as kernel_compile
    from numba import cuda

    class _Configured:  # compile.jit(pyfunc)[grid, block, stream]: the kernel call, stubbed
        def __getitem__(self, config):
            return lambda *args: None

    kernel_compile.jit = lambda pyfunc: _Configured()
    if sys.argv[2:] == ["raw"]:  # the raw path: each kernel a stand-in Function, cuLaunchKernel doing nothing
        import types

        from cnnfast.kernels.cuda import launch as raw_launch

        raw_launch._raw_possible = lambda: True  # (raw_enabled still reads CNNFAST_CUDA_LAUNCH, as on a GPU)
        os.environ[raw_launch.ENV] = "raw"
        raw_launch._function = lambda pyfunc, kinds: types.SimpleNamespace(handle=0)
        raw_launch._driver = lambda: types.SimpleNamespace(cuLaunchKernel=lambda *args: None)
    if device in ("numba", "torch"):
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
    if device == "torch":
        import contextlib

        import torch
        from cnnfast.kernels.cuda import launch
        from numba.cuda import api as numba_cuda_api
        from numba.cuda.cudadrv import devices, driver

        class OnGPU(torch.Tensor):  # a tensor that says it is on GPU 0 (its methods as fast as a tensor's: no
            __torch_function__ = torch._C._disabled_torch_function_impl  # subclass dispatch in Python, ~10 us)
            is_cuda = property(lambda self: True)
            device = property(lambda self: torch.device("cuda", 0))

            @property
            def __cuda_array_interface__(self):
                return {"shape": tuple(self.shape), "typestr": _TYPESTR[self.dtype], "version": 2,
                        "strides": tuple(s * self.element_size() for s in self.stride()),
                        "data": (self.data_ptr(), False)}

        _TYPESTR = {torch.float32: "<f4", torch.float64: "<f8"}  # (as torch's own property looks it up)

        def _on_gpu(real):
            def allocate(*shape, dtype=None, device=None, **options):
                if getattr(device, "type", device) != "cuda":
                    return real(*shape, dtype=dtype, device=device, **options)
                return real(*shape, dtype=dtype).as_subclass(OnGPU)
            return allocate

        class _Stream:
            __module__ = "torch.cuda.streams"
            cuda_stream, device = 0, torch.device("cuda", 0)

        def _as_tensor(a, dtype=None, device=None):  # of a CUDA array (what cnnfast before 2026-12-07 returned)
            if getattr(device, "type", device) != "cuda":
                return _real_as_tensor(a, dtype=dtype, device=device)
            info = a.__cuda_array_interface__  # (torch reads it, then wraps the memory)
            return torch.empty(info["shape"], dtype=torch.float32, device="cuda")

        launch._context = devices.get_context = lambda *_: None
        torch.empty, torch.zeros = _on_gpu(torch.empty), _on_gpu(torch.zeros)
        torch.cuda.current_stream = lambda device=None: _Stream()
        _real_as_tensor, torch.as_tensor = torch.as_tensor, _as_tensor
        devices._runtime.ensure_context = contextlib.nullcontext  # Numba's as_cuda_array without a driver: no
        numba_cuda_api.current_context = lambda: None  # context, and the pointer as given (its query's answer)
        driver.get_devptr_for_active_ctx = driver.binding.CUdeviceptr

        def put(a):
            return torch.from_numpy(a).as_subclass(OnGPU)
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
    "dense conv2d im2col": lambda: cnnfast.conv2d(x2, w2, padding=1, algo="im2col"),
}
if device == "torch":  # as cnnfast.torch's ops call it: api.run keeps the checked call under the caller's key (its
    # layer string and tensors), so no checks; not timed: _torch_ops._array's detach().contiguous()
    from cnnfast import api

    options = dict(stride=1, padding=1, dilation=1, groups=1, padding_mode="zeros")
    cases["keyed dense conv2d"] = lambda: api.run("conv2d", "conv", 2, input=x2, weight=w2, key="dense", **options)
    cases["keyed conv2d"] = lambda: api.run("conv2d", "conv", 2, input=x, weight=w, key="depthwise", **options)
for name, fn in cases.items():
    for _ in range(20):
        fn()
    best = min(timeit.repeat(fn, number=2000, repeat=5)) / 2000 * 1e6
    print(f"{' '.join(sys.argv[1:]):9s} {name:20s} {best:6.1f} us", flush=True)
