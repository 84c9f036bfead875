"""Array families and the two devices they map to.

    numpy   numpy.ndarray                                   -> CPU kernels, NumPy result
    cupy    cupy.ndarray                                    -> CUDA kernels, CuPy result (current stream)
    numba   Numba device arrays (also the simulator's)      -> CUDA kernels, Numba device array result
    cai     any other object with __cuda_array_interface__  -> CUDA kernels, result as CuPy (if importable) or
            (torch.Tensor on a GPU, ...)                       Numba array; a torch tensor gets a torch tensor back
                                                               (torch's memory, torch's current stream)

A Device hides where arrays live from the public ops: allocation, contiguous working copies, the host
round trip of the reference, and the layout kernels (explicit pad, its adjoint fold, bias sums).
Numba's CUDA target is imported only when a CUDA array is actually seen.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import operator
import reprlib
import sys
from functools import lru_cache

import numpy as np

from cnnfast.kernels import environ
from cnnfast.kernels.cpu import memory

FLOAT_DTYPES = (np.dtype("float32"), np.dtype("float64"))
_EXPECTED = ("a NumPy array or a CUDA array (CuPy, Numba device array, or any object with "
             "__cuda_array_interface__)")


def simulator_enabled() -> bool:
    return environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def cuda_missing():
    """Why the CUDA kernels cannot run here (no usable GPU, the simulator off), or None when they can."""
    if simulator_enabled():
        return None
    try:
        from numba import cuda
        if cuda.is_available():
            return None
    except Exception as e:  # a broken driver or toolkit: said, not raised
        return f"Numba's CUDA target failed to load ({type(e).__name__}: {e})"
    return ("no CUDA GPU found (numba.cuda.is_available() is False); NUMBA_ENABLE_CUDASIM=1 runs the CUDA kernels "
            "in Numba's simulator")


def _cupy():
    """The cupy module when it can be used (importable, and Numba is not simulating CUDA), else None."""
    return None if simulator_enabled() else _import_cupy()


@lru_cache(maxsize=1)
def _import_cupy():
    """cupy, or None when it is not installed (tried once: a failed import searches sys.path again each time)."""
    try:
        import cupy
    except ImportError:
        return None
    return cupy


@lru_cache(maxsize=None)
def _package(name):
    """A kernel package or numba.cuda, imported on first use (Numba's CUDA target only once a CUDA array is seen)."""
    return importlib.import_module(name)


class ShapeArray:
    """A shape and dtype standing in for an array in cnnfast.explain(): the op plans and returns the plan."""

    def __init__(self, shape, dtype, device):
        self.shape = tuple(int(v) for v in shape)  # NumPy ints would wrap in the size arithmetic
        self.dtype = np.dtype(dtype)
        self.family = "numpy" if device == "cpu" else "numba"


_FAMILIES = {np.ndarray: "numpy"}  # array type -> family, for the types whose type alone decides it


def family_of(a):
    """'numpy' | 'cupy' | 'numba' | 'cai' | None (not an array cnnfast accepts)."""
    family = _FAMILIES.get(type(a))
    if family is not None:
        return family
    if isinstance(a, ShapeArray):
        return a.family
    if isinstance(a, np.ndarray):
        family = "numpy"
    else:
        module = type(a).__module__  # (an array, not a stream or kernel of these packages)
        family = (("cupy" if module.startswith("cupy") else "numba" if module.startswith("numba.cuda") else None)
                  if hasattr(a, "shape") and hasattr(a, "dtype") else None)
    if family is not None:
        _FAMILIES[type(a)] = family
        return family
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):  # (as torch's __cuda_array_interface__ would tell, without
        return "cai" if a.is_cuda and not a.is_sparse and not a.requires_grad else None  # building it: ~4 us)
    try:  # (may be an attribute of the object only)
        return "cai" if hasattr(a, "__cuda_array_interface__") else None
    except RuntimeError:  # torch's, for a CUDA tensor that requires grad
        return None


@lru_cache(maxsize=1)
def _torch_floats():
    torch = sys.modules["torch"]
    return {torch.float32: np.dtype("float32"), torch.float64: np.dtype("float64")}


def _type_name(a):
    t = type(a)
    return f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__


def interface(a, op="cnnfast", name="array"):
    """(shape, dtype) of a __cuda_array_interface__ object; TypeError naming op and the argument for an interface
    without a shape of ints or a typestr NumPy reads, or with a mask (CUDA array interface v1+: cnnfast, as Numba
    and CuPy, takes no masked array). A float32 or float64 torch tensor's are read from it (torch builds the dict
    in Python)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor) and a.dtype in _torch_floats():
        return tuple(a.shape), _torch_floats()[a.dtype]
    info = a.__cuda_array_interface__
    where = f"{op}: {name}'s __cuda_array_interface__"
    if not isinstance(info, dict) or "shape" not in info or "typestr" not in info:
        raise TypeError(f"{where} is not a dict with 'shape' and 'typestr' entries: {reprlib.repr(info)}")
    if info.get("mask") is not None and info.get("version", 0) >= 1:
        raise TypeError(f"{where} has a mask; masked arrays are not supported (pass the data without it)")
    try:
        shape, dtype = tuple(operator.index(v) for v in info["shape"]), np.dtype(info["typestr"])
    except TypeError:
        raise TypeError(f"{where} has shape {info['shape']!r} and typestr {info['typestr']!r}: expected a tuple "
                        f"of ints and a NumPy type string such as '<f4'") from None
    return shape, dtype


def dtype_of(a, op="cnnfast", name="array") -> np.dtype:
    return interface(a, op, name)[1] if family_of(a) == "cai" else np.dtype(a.dtype)


def shape_of(a, op="cnnfast", name="array") -> tuple:
    return interface(a, op, name)[0] if family_of(a) == "cai" else tuple(a.shape)


_DTYPE_NAMES = {dt: dt.name for dt in FLOAT_DTYPES}


def inspect(op, **arrays):
    """Check the named array arguments (a None bias skipped); return (device name, family of the first, dtype name,
    {name: shape}).

    TypeError: not an array (None included, but for bias); dtype not float32/float64; dtypes differ; arrays on
    different devices.
    """
    first = family = dtype = None
    shapes = {}
    for name, a in arrays.items():
        if a is None and name == "bias":
            continue
        fam = family_of(a)
        if fam is None:
            grad = getattr(a, "is_cuda", False) is True and getattr(a, "requires_grad", False) is True
            raise TypeError(f"{op}: expected {name} to be {_EXPECTED}, but got {_type_name(a)}"
                            + (" that requires grad (detach() it, or use cnnfast.torch for autograd)" if grad else ""))
        if fam == "cai":
            shapes[name], dt = interface(a, op, name)
            if simulator_enabled():  # (its Numba has no as_cuda_array: an interface's pointer is a real device's)
                raise TypeError(f"{op}: Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) cannot take {name} as "
                                f"{_type_name(a)}, a __cuda_array_interface__ object; pass a Numba device array")
        else:
            dt, shapes[name] = a.dtype, tuple(a.shape)
        if dt not in _DTYPE_NAMES:
            swapped = dt.kind == "f" and dt.newbyteorder("=") in _DTYPE_NAMES
            raise TypeError(f"{op}: expected {name} to have dtype float32 or float64, but got {dt}"
                            + (" (non-native byte order: a.astype(a.dtype.newbyteorder('=')) converts it)"
                               if swapped else ""))
        if first is None:
            first, family, dtype = name, fam, dt
        elif (fam == "numpy") != (family == "numpy"):
            devices = {f: "cpu" if f == "numpy" else "cuda" for f in (family, fam)}
            raise TypeError(f"{op}: expected all arrays to be on the same device, but got {first} on "
                            f"{devices[family]} ({_type_name(arrays[first])}) and {name} on {devices[fam]} "
                            f"({_type_name(a)})")
        elif dt != dtype:
            raise TypeError(f"{op}: expected {name} to have the same dtype as {first} ({dtype}), but got {dt}")
    return "cpu" if family == "numpy" else "cuda", family, _DTYPE_NAMES[dtype], shapes


def on_their_gpu(device, op, **arrays):
    """A context for a call's work: the arrays' GPU entered where it is not the current one (gpu_to_enter), else
    nothing to do (a reusable nullcontext)."""
    return (gpu_to_enter(op, **arrays) if device == "cuda" else None) or _HERE


_HERE = contextlib.nullcontext()


def gpu_to_enter(op, **arrays):
    """The GPU a CUDA call must run on, as a context to enter (numba.cuda.gpus[i]) when it is not the current one,
    else None. PyTorch's rule: an op runs on its tensors' GPU whichever GPU is current (CuPy and Numba would launch on
    the current GPU with the other GPU's pointers: a launch error, or an illegal address that ends the CUDA context).
    Asks nothing with one GPU. ValueError: arrays on two GPUs."""
    gpus = _gpus()
    if len(gpus) < 2:
        return None
    seen = {}  # GPU -> the first argument on it
    for name, a in arrays.items():
        gpu = None if a is None or isinstance(a, ShapeArray) else gpu_of(a)
        if gpu is not None:
            seen.setdefault(gpu, name)
    if len(seen) > 1:
        (g, name), (h, other) = list(seen.items())[:2]
        raise ValueError(f"{op}: expected all arrays to be on the same device, but got {name} on cuda:{g} and "
                         f"{other} on cuda:{h}")
    gpu = next(iter(seen), None)
    return None if gpu is None or gpu == _current_gpu() else gpus[gpu]


def _gpus():
    return _package("numba.cuda").gpus


def _current_gpu():
    """The ordinal of the GPU whose context is current on this thread, None where none is (asking makes none: Numba's
    get_current_device() would make GPU 0's, a context on a GPU the process may never use)."""
    if simulator_enabled():
        return 0
    from numba.cuda.cudadrv.driver import driver
    with driver.get_active_context() as active:
        return active.devnum


def gpu_of(a):
    """The ordinal of the GPU holding a CUDA array: a torch tensor's or CuPy array's device, else the GPU of its data's
    address (None for an empty array of another family: no data, no GPU)."""
    module = type(a).__module__
    if module.startswith("torch"):
        return a.get_device()
    if module.startswith("cupy"):
        return a.device.id
    ptr = a.device_ctypes_pointer.value if module.startswith("numba.cuda") else a.__cuda_array_interface__["data"][0]
    return _pointer_gpu(ptr) if ptr else None


def _pointer_gpu(ptr):
    """The driver's CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL of a device address (any context's: unified addressing)."""
    from numba.cuda.cudadrv.driver import binding, driver
    return int(driver.cuPointerGetAttribute(binding.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                                            binding.CUdeviceptr(ptr)))


def to_host(a):
    """A NumPy array with a's values (a copy from the device for CuPy and Numba arrays)."""
    module = type(a).__module__
    if module.startswith("cupy"):
        return a.get()
    if module.startswith("numba.cuda"):
        return a.copy_to_host()
    if family_of(a) == "cai":  # torch CUDA tensors and other interface objects
        from numba import cuda
        return cuda.as_cuda_array(a).copy_to_host()
    return np.asarray(a)


# ---------------------------------------------------------------- devices


class CPU:
    """NumPy arrays, Numba CPU kernels."""

    name = "cpu"

    def __init__(self, stream=None):
        self.stream = None

    def working(self, a):
        """C-contiguous NumPy array with the same values (no copy when already contiguous)."""
        return np.ascontiguousarray(a)

    def kernel_shape(self, shape):
        """The shape a launcher takes an array of the 5-D `shape` in: the CPU kernels index 5-D arrays."""
        return shape

    def view(self, a, shape):
        """Contiguous array `a` with another shape of its size."""
        return a.reshape(shape)

    def empty(self, shape, dtype):
        return memory.pooled_empty(shape, dtype)  # (32 MiB or more: from the pool of mapped blocks)

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype)

    def add_bias(self, y, bias):
        """y (N, K, ...) += bias (K,) broadcast over the batch and space."""
        y += bias.reshape((1, -1) + (1,) * (y.ndim - 2))

    def kernels(self):
        return _package("cnnfast.kernels.cpu")

    def pad(self, src, dst, tables):
        self.kernels().pad_cpu(src, dst, *tables)

    def fold_pad(self, src, dst, tables):
        self.kernels().fold_pad_cpu(src, dst, *tables)

    def bias_grad(self, dy, db):
        self.kernels().bias_grad_cpu(dy, db)

    def launch_options(self):
        return {}

    def result(self, out, like):
        return out

    def synchronize(self):
        """Wait for the work launched so far (the CPU kernels return when done)."""


class CUDA:
    """CUDA arrays: CuPy working arrays when CuPy is usable, else Numba device arrays (also in the simulator); for a
    call whose result is like a torch tensor, Numba device arrays whose new memory is torch's (launch.TorchMemory),
    by default on torch's current stream, as torch's own ops (one caching allocator for the tensors, not CuPy's pool
    or cuMemAlloc beside it)."""

    name = "cuda"

    def __init__(self, stream=None, family="numba", op="cnnfast", like=None):
        self.cuda = _package("numba.cuda")
        torch = sys.modules.get("torch")
        on = like.device if torch is not None and isinstance(like, torch.Tensor) else None  # a torch tensor's GPU
        self.cp = _cupy() if family in ("cupy", "cai") and on is None else None
        self.stream = self._numba_stream(stream, op, on)
        self.torch = None if on is None else _package("cnnfast.kernels.cuda.launch").TorchMemory(on, self.stream)
        self._cupy_stream = None  # _on_stream's, looked up on first use

    def _on_stream(self):
        """A context in which CuPy's own work (allocations from its memory pool, copies, the bias add) runs on this
        op's stream, in order with the kernels, as launch.scratch does: CuPy's current stream unless the op was
        given another (torch's current stream, through cnnfast.torch)."""
        if self._cupy_stream is None:
            launch = _package("cnnfast.kernels.cuda.launch")
            self._cupy_stream = launch.cupy_stream(launch.stream_pointer(self.stream))
        return self._cupy_stream

    def _numba_stream(self, stream, op, on):
        """A Numba stream for the launchers: the given one (Numba's, CuPy's, torch's or 0), else torch's current
        stream on its device for torch tensors (on: their torch.device; a torch stream given must be on it), CuPy's
        current stream for CuPy arrays, or 0."""
        if stream is None:
            if on is not None:
                ptr = sys.modules["torch"].cuda.current_stream(on).cuda_stream
                return self.cuda.external_stream(ptr) if ptr else 0
            if self.cp is None:
                return 0
            else:
                stream = self.cp.cuda.get_current_stream()
        if (type(stream) is int and stream == 0) or type(stream).__module__.startswith("numba.cuda"):
            return stream
        ptr = getattr(stream, "ptr", None)  # a CuPy stream
        if ptr is None and type(stream).__module__.startswith("torch"):
            ptr = getattr(stream, "cuda_stream", None)  # a torch.cuda.Stream
            if on is not None and ptr is not None and stream.device != on:
                raise ValueError(f"{op}: expected stream to be on the arrays' device {on}, but got a stream on "
                                 f"{stream.device}")
        if ptr is None:
            given = repr(stream) if isinstance(stream, int) else _type_name(stream)
            raise TypeError(f"{op}: expected stream to be a Numba, CuPy or torch stream, or 0, but got {given}")
        return self.cuda.external_stream(ptr) if ptr else 0

    def kernels(self):
        return _package("cnnfast.kernels.cuda")

    def working(self, a):
        if self.torch is not None and isinstance(a, sys.modules["torch"].Tensor):
            if a.is_neg():  # (a negative view, such as torch._neg_view's: its memory holds the values un-negated)
                a = self.torch.resolved(a)
            if a.is_contiguous():  # (flat, as the kernels take it: a view of another shape costs a DeviceNDArray)
                return self.torch.view(a, (a.numel(),))
        if self.cp is not None:
            with self._on_stream():
                return self.cp.ascontiguousarray(self.cp.asarray(a))
        if family_of(a) in ("cai", "cupy"):  # (a CuPy array after a Numba one: no CuPy working arrays then)
            a = self.cuda.as_cuda_array(a)
        if a.is_c_contiguous():
            return a
        out = self.empty(a.shape, a.dtype)
        self.kernels().copy_cuda(a, out, stream=self.stream)
        return out

    def kernel_shape(self, shape):
        """The CUDA launchers take flat arrays: their kernels index 1-D buffers, and a Numba reshape costs ~3 us."""
        return (math.prod(shape),)

    def view(self, a, shape):
        return self.kernels().view(a, shape)

    def empty(self, shape, dtype):
        if self.torch is not None:
            return self.torch.array(shape, dtype)
        if self.cp is not None:
            with self._on_stream():
                return self.cp.empty(shape, dtype)
        return self.cuda.device_array(shape, dtype, stream=self.stream)

    def zeros(self, shape, dtype):
        if self.torch is not None:
            return self.torch.array(shape, dtype, zero=True)
        if self.cp is not None:
            with self._on_stream():
                return self.cp.zeros(shape, dtype)
        return self.cuda.to_device(np.zeros(shape, dtype), stream=self.stream)

    def add_bias(self, y, bias):
        if self.cp is not None:
            with self._on_stream():
                y += bias.reshape((1, -1) + (1,) * (y.ndim - 2))
        else:
            from cnnfast.kernels.cuda.bias import add_bias_cuda
            add_bias_cuda(y, bias, stream=self.stream)

    def pad(self, src, dst, tables):
        self.kernels().pad_cuda(src, dst, *tables, stream=self.stream)

    def fold_pad(self, src, dst, tables):
        self.kernels().fold_pad_cuda(src, dst, *tables, stream=self.stream)

    def bias_grad(self, dy, db):
        self.kernels().bias_grad_cuda(dy, db, stream=self.stream)

    def launch_options(self):
        return {"stream": self.stream}

    def synchronize(self):
        """Wait for the work launched so far on this op's stream (the default stream: the whole device)."""
        if isinstance(self.stream, int):
            self.cuda.synchronize()
        else:
            self.stream.synchronize()

    def result(self, out, like):
        """The result in the caller's family: for a torch tensor the tensor whose memory `out` is (empty or zeros
        gave every result; one of size 0 has Numba's null memory instead, whatever it was given), else the working
        array."""
        if self.torch is not None:
            if out.size == 0:
                return self.torch.tensor(out.shape, out.dtype)
            return _package("cnnfast.kernels.cuda.launch").torch_owner(out).view(out.shape)
        return out


def device_for(name, family, stream=None, op="cnnfast", like=None):
    """The device a call runs on; `like`, the array its result is like (a torch tensor's call takes torch's memory
    and stream)."""
    if name == "cpu":
        return _CPU
    return CUDA(stream, family, op, like)


_CPU = CPU()  # (it has no state: the CPU kernels take no stream)
