"""How the launchers start kernels: Numba's dispatcher, or raw pointers through the CUDA driver (the fast path).

Every launcher calls launch(pyfunc, grid, block, stream, *args) with 1-D device arrays, ints and tuples of
ints, and scratch(size, dtype, like, stream) for its workspace. The same kernel source runs on two paths:

    numba  jit(pyfunc)[grid, block, stream](*args): the simulator, and the default.
           the toolchain notes measured 44-135 us of host time per launch on this path, and ~20 us more for a grid
           under 128 blocks (Numba's low-occupancy warning). On a GPU the configured launch, jit(pyfunc)[grid,
           block, stream], is built once per (kernel, grid, block, stream) and kept (_configured), without the
           warning: the launchers size small grids on purpose for small problems.
    raw    the kernel typed with raw pointers (array -> CPointer(dtype), int -> int64, tuple -> its ints),
           compiled to PTX once per specialisation (cached on disk across processes: compile.ptx), loaded as
           a module into Numba's CUDA context once per GPU, launched with cuLaunchKernel through the CUDA Python
           bindings (cuda-bindings) that numba-cuda itself calls, so it needs no CuPy and takes any CUDA array
           (8-10 us measured for one launch of this kind through CuPy's bindings). Numba's kernel ABI passes each
           of those as one 8-byte parameter, so one int64 buffer holds every argument; tests check the count
           against each PTX entry.

Kernels typed on arrays of any strides (layout.copy_kernel) go through launch_numba, on Numba's dispatcher whatever
the path. While a call is recorded as a launch program (program.py: a repeated call replayed as its allocations and
launches alone), launch and scratch tell its recorder (RECORDING) what they start and allocate.

CNNFAST_CUDA_LAUNCH=raw selects the raw path on a GPU (never in Numba's CUDA simulator); anything else keeps
Numba's dispatcher. The raw path stays opt-in until it has been validated and timed on a GPU (run the CUDA tests
with CNNFAST_CUDA_LAUNCH=raw; bench/test_cuda.py times both paths). A kernel whose raw specialisation cannot be
prepared (no NVVM, an unsupported GPU) falls back to Numba's dispatcher with one warning.

In Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) every CUDA thread of a block is a Python thread, which the
simulator's block manager busy-polls; after each barrier the threads wait for GIL hand-offs, one per interpreter
switch interval (5 ms by default), and that waiting was most of a simulated launch. A simulated launch runs with a
switch interval of SIMULATED_SWITCH_INTERVAL (then restored): 3-5x faster (a 3-D depthwise test 25 s -> 5-6 s).
Finer switching exposes a race in the simulator's cuda.shared.array, fixed here (_atomic_shared_arrays).
"""
import contextlib
import sys
import threading
import warnings
from functools import lru_cache

import numpy as np
from cnnfast.kernels import environ
from cnnfast.kernels.cuda import compile
from numba import cuda, types
from numba.cuda.core.errors import NumbaPerformanceWarning  # (numba-cuda's own class, not numba.core's)
from numba.cuda.cudadrv import devices

try:
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    from numba.cuda.cudadrv.driver import MemoryPointer, binding
except ImportError:  # Numba's CUDA simulator (its arrays are NumPy-backed: they reshape)
    DeviceNDArray = MemoryPointer = binding = None

ENV = "CNNFAST_CUDA_LAUNCH"
_FUNCTIONS = {}  # (pyfunc, argument kinds, GPU) -> loaded Numba Function | None (use Numba's dispatcher)
_PARAMETERS = threading.local()  # number of parameters -> this thread's kernelParams buffers (_parameters)
_INTEGERS = (int, np.integer)


class _Recording(threading.local):
    recorder = None  # the program.Recorder of the call running on this thread, if any (an attribute never set on a
    # thread.local costs ~0.35 us to miss, read at every launch)


RECORDING = _Recording()
_CONFIGURED = {}  # (pyfunc, grid, block, stream handle) -> Numba's configured launch (on a GPU)
CONFIGURED_SIZE = 4096
SIMULATED_SWITCH_INTERVAL = 1e-4  # s: sys.setswitchinterval during a simulated launch (flat from 1e-5 to 5e-4)


def raw_enabled():
    """True when launches take the raw-pointer path (CNNFAST_CUDA_LAUNCH=raw on a real GPU)."""
    return _raw_possible() and environ.get(ENV, "numba") == "raw"


@lru_cache(maxsize=1)
def _raw_possible():
    return not compile.simulating() and cuda.is_available()


def recorder():
    """The program.Recorder of this thread's call, or None."""
    return RECORDING.recorder


def launch(pyfunc, grid, block, stream, *args):
    """Launch kernel pyfunc over grid x block threads on stream (0 or a Numba stream) with args."""
    function = _function(pyfunc, tuple(map(_kind, args))) if raw_enabled() else None
    recording = recorder()
    if recording is not None:
        recording.launch(pyfunc, function, grid, block, args)
    if function is not None:
        launch_values(function, grid, block, stream, _values(args))
    else:
        dispatch(pyfunc, grid, block, stream, args)


def launch_numba(pyfunc, grid, block, stream, *args):
    """Launch kernel pyfunc through Numba's dispatcher whatever the launch path: for kernels typed on arrays of any
    strides (layout.copy_kernel), which raw pointers cannot carry (nor a launch program: program.py)."""
    recording = recorder()
    if recording is not None:
        recording.refuse(f"{compile.kernel_key(pyfunc)} takes strided arrays")
    dispatch(pyfunc, grid, block, stream, args)


def dispatch(pyfunc, grid, block, stream, args):
    """Launch kernel pyfunc through Numba's dispatcher (the simulator's when simulating)."""
    if compile.simulating():
        _simulated(compile.jit(pyfunc)[grid, block, stream], args)
        return
    _configured(pyfunc, grid, block, stream)(*args)


def _simulated(kernel, args):
    """Run a configured kernel in the simulator with the switch interval at SIMULATED_SWITCH_INTERVAL, one launch at a
    time in the process: the simulator keeps one kernel context, and launches from two host threads failed
    (AttributeError: 'Thread' object has no attribute 'blockIdx')."""
    with _SIMULATING:
        before = sys.getswitchinterval()
        sys.setswitchinterval(SIMULATED_SWITCH_INTERVAL)
        try:
            kernel(*args)
        finally:
            sys.setswitchinterval(before)


_SIMULATING = threading.Lock()


def _atomic_shared_arrays():
    """The simulator's cuda.shared.array (FakeCUDAShared.array) looks a block's array up by the calling line, then
    creates it if missing: two threads could each create one, and a thread then computed on its own uninitialised
    array (seen about once in 20 depthwise launches at a 5 us switch interval, also possible at the default). Here the
    same method creates it with dict.setdefault (atomic under the GIL), keyed by the kernel's line as the original is
    (its caller's frame, without the original's walk of the whole stack on every call of every thread)."""
    from numba.cuda import types as cuda_types
    from numba.cuda.np import numpy_support
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    original = FakeCUDAShared.array

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory (no lookup), or the simulator's error
            return original(self, shape, dtype, alignment)
        if isinstance(dtype, cuda_types.Type):
            dtype = numpy_support.as_dtype(dtype)
        frame = sys._getframe(1)  # the kernel's line: what the original's traceback.extract_stack(...)[-2] names
        caller = frame.f_code.co_filename, frame.f_lineno
        found = self._allocations.get(caller)
        return found if found is not None else self._allocations.setdefault(caller, np.empty(shape, dtype))

    FakeCUDAShared.array = array


if compile.simulating():
    _atomic_shared_arrays()


def _configured(pyfunc, grid, block, stream):
    """jit(pyfunc)[grid, block, stream]: on a GPU built once per (kernel, grid, block, stream handle) and kept
    (Numba's configuration normalises the dimensions, wraps the stream and checks the grid size each time), with
    Numba's NumbaPerformanceWarning for grids under 128 blocks ignored. (Not in the simulator, whose kernel[...]
    configures the kernel object itself and returns it.)"""
    key = (pyfunc, grid, block, stream_pointer(stream))
    configured = _CONFIGURED.get(key)
    if configured is None:
        if len(_CONFIGURED) >= CONFIGURED_SIZE:
            _CONFIGURED.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NumbaPerformanceWarning)
            configured = _CONFIGURED[key] = compile.jit(pyfunc)[grid, block, stream]
    return configured


def view(a, shape):
    """C-contiguous device array `a` with another C-contiguous shape of the same size (a itself when it has it). A
    Numba DeviceNDArray's reshape re-derives the layout and builds a new array (3-4 us of host time); its view is
    built directly (~1 us). CuPy's and the simulator's arrays reshape."""
    if a.shape == shape:
        return a
    if type(a) is DeviceNDArray:
        return DeviceNDArray(shape, _strides(shape, a.dtype.itemsize), a.dtype, gpu_data=a.gpu_data)
    return a.reshape(shape)


def _strides(shape, itemsize):
    """A C-contiguous array's strides (bytes)."""
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def flat(a):
    """A C-contiguous device array as the 1-D array its kernel indexes (view)."""
    return a if a.ndim == 1 else view(a, (a.size,))


def scratch(size, dtype, like, stream):
    """An uninitialised 1-D device array of `size` elements for a launcher's workspace, tied to the launch stream
    (its pool cannot hand it out again before the kernels that use it ran): from CuPy's memory pool when `like` is a
    CuPy array, from torch's caching allocator when like's memory is a torch tensor's (TorchMemory), else a Numba
    device array."""
    owner = torch_owner(like)
    if type(like).__module__.startswith("cupy"):
        import cupy
        with cupy_stream(stream_pointer(stream)):
            out = cupy.empty(size, dtype)
    elif owner is not None:
        out = TorchMemory(owner.device, stream).array((size,), dtype)
    else:
        out = cuda.device_array(size, dtype, stream=stream)
    recording = recorder()
    if recording is not None:
        recording.allocated(out, (size,), dtype, False)
    return out


class TorchMemory:
    """New device memory for a call on torch tensors, from torch's caching allocator on torch.device `device`, in
    the order of `stream` (0 or a Numba stream: torch hands a block out again once its tensor is freed, ordered after
    the work queued on that stream so far, as for its own ops; the stream is made torch's current one meanwhile
    where it is not). So a call on torch tensors takes its memory as torch's own ops do: torch counts it and reuses
    it once freed, where Numba's allocator calls cuMemAlloc each time and its deferred cuMemFree can wait for the GPU.
    Made once per call: it looks up torch's current stream once, and Numba's CUDA context once if it views a tensor
    as a Numba array (a call replayed from its launch program views none: program.py)."""

    def __init__(self, device, stream):
        torch = sys.modules["torch"]
        self.device, self._context, ptr = device, None, stream_pointer(stream)
        self._stream = (contextlib.nullcontext() if ptr == torch.cuda.current_stream(device).cuda_stream else
                        torch.cuda.stream(torch.cuda.ExternalStream(ptr, device=device) if ptr else
                                          torch.cuda.default_stream(device)))

    def tensor(self, shape, dtype, zero=False):
        """A new torch tensor of `shape` and NumPy `dtype` (float32 or float64), uninitialised (zero: zeros)."""
        return self.tensors([(shape, dtype, zero)])[0]

    def tensors(self, allocations):
        """tensor(shape, dtype, zero) of each (shape, dtype, zero) of allocations, in order."""
        torch, dtypes = sys.modules["torch"], _dtypes()[0]
        with self._stream:
            return [(torch.zeros if zero else torch.empty)(shape, dtype=dtypes[np.dtype(dtype)], device=self.device)
                    for shape, dtype, zero in allocations]

    def resolved(self, t):
        """t's values in memory of their own, for a tensor whose negative bit is set."""
        with self._stream:
            return t.resolve_neg()

    def array(self, shape, dtype, zero=False):
        """A C-contiguous Numba device array over a new tensor's memory (tensor)."""
        return self.view(self.tensor(shape, dtype, zero))

    def view(self, t, shape=None):
        """A C-contiguous torch tensor of dtype float32 or float64 on this GPU as a Numba device array of `shape`
        (t's by default, else another of the same size) over its memory, which keeps t alive: Numba's as_cuda_array
        without the __cuda_array_interface__ dict, the driver's query of the pointer (the same under unified
        addressing) or a context lookup per array."""
        dtype = _dtypes()[1][t.dtype]
        shape = tuple(t.shape) if shape is None else shape
        if self._context is None:
            self._context = _context()
        memory = MemoryPointer(self._context, binding.CUdeviceptr(t.data_ptr()), t.nbytes, owner=t)
        return DeviceNDArray(shape, _strides(shape, dtype.itemsize), dtype, gpu_data=memory)


@lru_cache(maxsize=1)
def _dtypes():
    """The kernels' dtypes, NumPy's -> torch's and torch's -> NumPy's (dtype.name costs ~2 us a call)."""
    torch = sys.modules["torch"]
    pairs = [(np.dtype(name), getattr(torch, name)) for name in ("float32", "float64")]
    return dict(pairs), {t: n for n, t in pairs}


def torch_owner(a):
    """The torch tensor whose memory Numba device array `a` views (TorchMemory's; also Numba's as_cuda_array of a
    tensor), else None (a size-0 array's memory is always Numba's own)."""
    owner = getattr(getattr(a, "gpu_data", None), "_owner", None)  # (MemoryPointer.owner is itself when it has none)
    torch = sys.modules.get("torch")
    return owner if torch is not None and isinstance(owner, torch.Tensor) else None


def cupy_stream(ptr):
    """A context in which CuPy's work runs on the CUstream handle ptr (0: the legacy default stream): none needed when
    it is CuPy's current stream, else its ExternalStream (whose deprecation warning in CuPy 14 is kept from the
    caller: the replacement differs between CuPy versions)."""
    import cupy
    if ptr == cupy.cuda.get_current_stream().ptr:
        return contextlib.nullcontext()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return cupy.cuda.ExternalStream(ptr)


def stream_pointer(stream):
    """The CUstream handle of 0 or a Numba stream, as an int."""
    return int(stream.handle) if stream else 0


# ---------------------------------------------------------------- the raw path


def _kind(a):
    """What the raw signature depends on: 'i' for an int, a tuple's length, an array's dtype string ('<f4'; not
    the dtype itself, which compares equal to 'i' when it is int32)."""
    if isinstance(a, _INTEGERS):
        return "i"
    if isinstance(a, tuple):
        return len(a)
    return a.dtype.str


def argument_types(kinds):
    """Numba argument types of the raw-pointer specialisation for argument kinds (see _kind)."""
    out = []
    for k in kinds:
        if k == "i":
            out.append(types.int64)
        elif isinstance(k, int):
            out.append(types.UniTuple(types.int64, k))
        else:
            out.append(types.CPointer(compile.numba_dtype(k)))
    return tuple(out)


def pack(args):
    """The kernel parameters of args in Numba's raw-pointer ABI: one int64 per array (its device address),
    per int, and per element of a tuple, in argument order."""
    return np.array(_values(args), np.int64)


def _values(args):
    """pack()'s values as a list of ints."""
    values = []
    for a in args:
        if isinstance(a, _INTEGERS):
            values.append(int(a))
        elif isinstance(a, tuple):
            values.extend(a)
        else:
            values.append(_address(a))
    return values


def _address(a):
    if type(a) is DeviceNDArray:  # Numba's (its __cuda_array_interface__ builds a dict)
        return a.device_ctypes_pointer.value or 0
    data = getattr(a, "data", None)
    ptr = getattr(data, "ptr", None)  # CuPy: a.data.ptr, the fast way
    return ptr if ptr is not None else a.__cuda_array_interface__["data"][0]


def _function(pyfunc, kinds):
    """pyfunc's raw specialisation as a Numba Function loaded in Numba's current CUDA context (its GPU's), or None
    (use Numba's dispatcher)."""
    context = _context()
    key = (pyfunc, kinds, context.device.id)
    if key in _FUNCTIONS:
        return _FUNCTIONS[key]
    try:
        text, entry = compile.ptx(pyfunc, argument_types(kinds), cc=tuple(context.device.compute_capability))
        function = context.create_module_ptx(text).get_function(entry)  # (the context keeps the module)
    except Exception as e:  # no NVVM, an unsupported GPU, ...: keep working on Numba's dispatcher
        warnings.warn(f"cnnfast: raw launch of {compile.kernel_key(pyfunc)} unavailable ({type(e).__name__}: "
                      f"{e}); using Numba's dispatcher", RuntimeWarning, stacklevel=3)
        function = None
    _FUNCTIONS[key] = function
    return function


def raw_fallbacks():
    """The kernels whose raw launches fell back to Numba's dispatcher in this process (their PTX did not load)."""
    return sorted({compile.kernel_key(key[0]) for key, function in _FUNCTIONS.items() if function is None})


def _context():
    """Numba's CUDA context on this thread (made current when none is), as Numba's own launches take it."""
    return devices.get_context()


@lru_cache(maxsize=1)
def _driver():
    """numba-cuda's driver object: cuda-bindings' functions, each raising CudaAPIError on an error."""
    from numba.cuda.cudadrv.driver import driver
    return driver


def _parameters(n):
    """This thread's kernelParams for n 8-byte parameters: (an int64 buffer, the address of an array of pointers to
    its slots), made once and reused: cuLaunchKernel copies the values before it returns, and a new pair per launch
    (two NumPy arrays and their ctypes addresses) was half of the raw path's ~8 us of host time."""
    kept = _PARAMETERS.__dict__
    found = kept.get(n)
    if found is None:
        values = np.zeros(n, np.int64)
        pointers = np.arange(n, dtype=np.uint64) * np.uint64(8) + np.uint64(values.ctypes.data)
        found = kept[n] = values, pointers, int(pointers.ctypes.data)  # (pointers kept alive with its address)
    return found[0], found[2]


def launch_values(function, grid, block, stream, values):
    """cuLaunchKernel of a raw specialisation over grid x block threads on stream (0 or a Numba stream) with its
    parameters' values (pack's)."""
    launch_parameters(function.handle, dimensions(grid, block), stream, values)


def dimensions(grid, block):
    """cuLaunchKernel's six dimensions of a grid and a block (each an int or a tuple of up to three)."""
    gx, gy, gz = (tuple(grid) + (1, 1))[:3] if isinstance(grid, tuple) else (grid, 1, 1)
    bx, by, bz = (tuple(block) + (1, 1))[:3] if isinstance(block, tuple) else (block, 1, 1)
    return gx, gy, gz, bx, by, bz


def launch_parameters(handle, dims, stream, values, slots=(), addresses=()):
    """cuLaunchKernel of kernel `handle` over `dims` (dimensions') on stream with the 8-byte parameters `values` (a
    sequence, or an int64 template), each (position, buffer, offset) of `slots` then set to addresses[buffer] +
    offset (a launch program's arrays: program.py)."""
    buffer, params = _parameters(len(values))
    buffer[:] = values
    for position, index, offset in slots:
        buffer[position] = addresses[index] + offset
    _driver().cuLaunchKernel(handle, *dims, 0, stream.handle if stream else 0, params, 0)
