"""Compiled-kernel caches and the list of every CUDA specialisation (one source of truth for ptx.py).

jit(pyfunc) returns the cached Numba dispatcher of a kernel's Python function (the array typing used by the
launchers and the simulator); ptx(pyfunc, argtypes, cc) the PTX of one specialisation (the raw-pointer typing
of launch.py), cached on disk so a new process does not recompile; device_constant caches small read-only
device arrays per GPU. specialisations() enumerates every (name, pyfunc, argument types) the launchers can
create, for both typings: 1-D arrays (`float32[::1]`) and raw pointers (`CPointer(float32)`).
"""
import hashlib
import os
import re
import tempfile
import threading
from collections import OrderedDict
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from numba import config, cuda, types

_DISPATCHERS = {}
_CONSTANTS = OrderedDict()  # device_constant's arrays by (GPU, key), the least recently used first
_CONSTANTS_LOCK = threading.Lock()
CONSTANT_BYTES = 256 << 20  # device_constant keeps at most this many bytes over all GPUs (or its one array larger)
_constant_bytes = 0
DTYPES = (types.float32, types.float64)
# The kernels' typed zero: a float32 constant, which Numba unifies with float32 and float64 values (so a float32
# kernel stays in float32). Not `x[0] * 0`: that is NaN when x[0] is NaN or inf.
ZERO = np.float32(0.0)

# The kernels' index casts: cast to uint64, an array index skips Numba's negative-index wrap-around (see gemm.py).
# Compiled, they are Numba's types. In the simulator, calling a Numba type costs 2.6-3.4 us (a checked NumPy scalar),
# a third of a simulated tiled GEMM's time, so there they are the same two's-complement casts on Python ints: a
# negative index still becomes 2**64 - |i| and fails NumPy's bounds check, as it would on the GPU's memory.
if config.ENABLE_CUDASIM:
    def uint64(i):
        return int(i) & 0xFFFF_FFFF_FFFF_FFFF

    def int64(i):
        return (int(i) + 2 ** 63) % 2 ** 64 - 2 ** 63

    def uint32(i):
        return int(i) & 0xFFFF_FFFF
else:
    from numba import int64, uint32, uint64  # noqa: F401  (re-exported for the kernels)


def helper(pyfunc):
    """A device function that NVVM always inlines (the kernels' device functions: none reads a `cuda.*`
    attribute); in the simulator the Python function itself.

    Inlined by NVVM (forceinline), not in Numba's IR (inline="always"): a helper is then typed and lowered once per
    signature and shared by every kernel of the process, where IR inlining copied and re-typed it at each call site
    (a tiled GEMM's 8 multiply calls, its staging's loaders). With gemm.multiply_step's indices no longer literals,
    compile_ptx of a tiled GEMM went from 8.7-10.3 s to 1.6-2.4 s, with the same SASS (bench/RESULTS.md, ninth
    session). In the simulator a device-function call costs ~12 us (the simulator swaps the module's `cuda` around
    each call), the time of 25 array reads: the loaders' range tests and masked loads, one call each per staged
    element, made the simulated GEMMs up to 2x slower."""
    return pyfunc if config.ENABLE_CUDASIM else cuda.jit(device=True, forceinline=True)(pyfunc)


def jit(pyfunc):
    """The (cached) cuda.jit dispatcher of a kernel's Python function."""
    kernel = _DISPATCHERS.get(pyfunc)
    if kernel is None:
        kernel = _DISPATCHERS[pyfunc] = cuda.jit(pyfunc, **options(pyfunc))
    return kernel


def options(pyfunc):
    """cuda.jit's and compile_ptx's options for a kernel's Python function: its launch_bounds attribute, if it has
    one ((most threads per block, blocks per SM): ptxas then caps the registers to fit); the simulator takes none."""
    bounds = getattr(pyfunc, "launch_bounds", None)
    return {"launch_bounds": bounds} if bounds and not simulating() else {}


def device_constant(key, make):
    """A read-only device copy of the host array make(), uploaded once per (current GPU, key) and kept: index
    tables and the zero-bias placeholder, so a launch does not pay a host-to-device copy each call. The one
    upload is waited for on the whole device, so that every stream may read the array at once: a synchronous copy
    from pageable memory may return once the data is staged, before it lands, and a non-blocking stream (torch's side
    streams) is not ordered after the default stream's copy. Kept while they fit in CONSTANT_BYTES, the least recently
    used dropped first: a table depends on the input's size, and a program of many sizes (audio of any length,
    detection at many image sizes) would otherwise keep one per size for good. (A dropped array is freed as Numba
    frees any: cuMemFree waits for the kernels that may still read it.)"""
    global _constant_bytes
    key = (getattr(cuda.get_current_device(), "id", 0),) + key  # the simulator's device has no id
    arr = _CONSTANTS.get(key)
    if arr is not None:
        try:
            _CONSTANTS.move_to_end(key)  # the most recently used, last
        except KeyError:  # (dropped by another thread just now: still this key's array)
            pass
        return arr
    with _CONSTANTS_LOCK:
        arr = _CONSTANTS.get(key)  # (another thread's upload)
        if arr is None:
            arr = cuda.to_device(make())
            cuda.synchronize()
            _constant_bytes += arr.nbytes
            while _constant_bytes > CONSTANT_BYTES and _CONSTANTS:
                _constant_bytes -= _CONSTANTS.popitem(last=False)[1].nbytes
            _CONSTANTS[key] = arr
    return arr


def constant(key):
    """device_constant's array under its full key (the GPU's id first), now the most recently used; None once
    dropped."""
    arr = _CONSTANTS.get(key)
    if arr is not None:
        try:
            _CONSTANTS.move_to_end(key)
        except KeyError:  # (dropped by another thread just now)
            pass
    return arr


def constants():
    """(full key, array) of every device constant kept."""
    return list(_CONSTANTS.items())


_NUMBA_TYPES = {np.dtype("float32"): types.float32, np.dtype("float64"): types.float64,  # the tensors' dtypes,
                np.dtype("int64"): types.int64, np.dtype("int32"): types.int32}  # and the index tables'


def numba_dtype(dtype):
    return _NUMBA_TYPES[np.dtype(dtype)]


def simulating():
    return bool(config.ENABLE_CUDASIM)


# ---------------------------------------------------------------- PTX, cached on disk

CACHE_ENV = "CNNFAST_CACHE_DIR"
_ENTRY = re.compile(r"\.entry\s+([A-Za-z_$][\w$]*)\s*\(")


def kernel_key(pyfunc):
    """A name for a kernel's Python function that is stable across processes (tiled kernels set theirs)."""
    return getattr(pyfunc, "cache_key", None) or f"{pyfunc.__module__}.{pyfunc.__qualname__}"


@lru_cache(maxsize=1)
def source_digest():
    """Hash of everything a kernel's PTX depends on: the CUDA kernel sources (this folder) and Numba's versions."""
    import numba
    try:
        numba_cuda = metadata.version("numba-cuda")
    except metadata.PackageNotFoundError:  # Numba's own (older) CUDA target
        numba_cuda = ""
    h = hashlib.sha256(f"{numba.__version__}|{numba_cuda}".encode())
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def cache_dir():
    """$CNNFAST_CACHE_DIR, else $XDG_CACHE_HOME/cnnfast, else ~/.cache/cnnfast."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cnnfast")
    return Path(root) / "ptx"


def ptx(pyfunc, argtypes, cc):
    """(PTX text, entry name) of pyfunc compiled for argtypes and compute capability cc; read from the disk cache
    when an earlier process compiled it (same kernel sources and Numba), else compiled and stored. A cache that
    cannot be written only costs the compile."""
    name = f"{kernel_key(pyfunc)}|{','.join(map(str, argtypes))}|sm_{cc[0]}{cc[1]}|{source_digest()}"
    path = cache_dir() / f"{hashlib.sha256(name.encode()).hexdigest()}.ptx"
    try:
        text = path.read_text()
    except OSError:
        text = compile_ptx(pyfunc, argtypes, cc)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)  # atomic: a concurrent reader sees the old state or the whole file
        except OSError:
            pass
    return text, entry_name(text)


def compile_ptx(pyfunc, argtypes, cc):
    """The PTX text of pyfunc compiled for argtypes and compute capability cc (cuda.compile_ptx, with the kernel's
    options), with no GPU or driver needed. numba-cuda 0.30 compiles each device function a kernel calls for the
    current GPU's compute capability (dispatcher.compile_device asks the driver, also under compile_ptx, and
    fails where there is none); here, under Numba's compiler lock, the answer is cc, the kernel's own target."""
    from numba.cuda import dispatcher
    from numba.cuda.core.compiler_lock import global_compiler_lock

    with global_compiler_lock:  # (reentrant) no other thread compiles while the answer is cc
        current = dispatcher.get_current_device
        dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)
        try:
            return cuda.compile_ptx(pyfunc, argtypes, cc=cc, **options(pyfunc))[0]
        finally:
            dispatcher.get_current_device = current


def entry_name(text):
    return _ENTRY.search(text).group(1)


def parameter_count(text):
    """The number of parameters of the PTX's kernel entry."""
    start = _ENTRY.search(text).end()
    return len(re.findall(r"\.param\b", text[start:text.index(")", start)]))


def specialisations():
    """[(name, pyfunc, argument types, typing)] for every kernel the launchers compile, both typings."""
    from cnnfast.kernels.cuda import bias, depthwise, depthwise_filter, direct, gemm, im2col, layout

    geo = types.UniTuple(types.int64, gemm.NGEO)
    out = []
    for dt in DTYPES:
        for typing in ("array", "pointer"):
            arr = dt[::1] if typing == "array" else types.CPointer(dt)
            iarr = types.int64[::1] if typing == "array" else types.CPointer(types.int64)
            jarr = types.int32[::1] if typing == "array" else types.CPointer(types.int32)
            kinds = {"A": arr, "I": iarr, "J": jarr, "i": types.int64, "g": geo,
                     "t": types.UniTuple(types.int64, depthwise.NTILE), "S": types.Array(dt, 5, "A")}

            def add(name, pyfunc, template, dt=dt, typing=typing, kinds=kinds):
                """template: one letter per argument: A float array, I int64 array, J int32 array, i int64, g geometry,
                t depthwise tile geometry, S 5-D float array of any strides."""
                out.append((f"{name}[{dt},{typing}]", pyfunc, tuple(kinds[c] for c in template), typing))

            for family, ops_table in (("direct", direct.OPS), ("im2col_gemm", im2col.OPS),
                                      ("pointwise_gemm", im2col.POINTWISE)):
                for primitive, ops in ops_table.items():
                    for tile in gemm.tile_names(dt.bitwidth // 8, thin=family == "direct"):
                        add(f"{family}_{primitive}/{tile}", gemm.tiled_kernel(dt, ops, tile), "AAAAJgiiiii")
            add("reduce_splits", direct.reduce_splits_kernel, "AAii")
            add("im2col", im2col.im2col_kernel, "AAgii")
            add("col2im", im2col.col2im_kernel, "AAgii")
            for sizes in (None, *depthwise_filter.SPECIALISED):
                for build in depthwise.PLANE_BUILDS:
                    add(f"depthwise_plane/{depthwise.build_name(*build)}/{depthwise.size_name(sizes)}",
                        depthwise.plane_kernel(dt, build[0], sizes, *build[1:]), "AAAAti")
                for slide in (0, *depthwise_filter.SLIDES) if sizes else (0,):
                    add(f"depthwise_backward_filter/{depthwise.size_name(sizes)}" + f"/slide{slide}" * bool(slide),
                        depthwise_filter.filter_kernel(dt, sizes, slide, depthwise_filter.FILTER_ROWS), "AAAIgi")
            add("depthwise_forward", depthwise.forward_kernel, "AAAAgi")
            add("depthwise_backward_data", depthwise.backward_data_kernel, "AAAg")
            add("add_bias", bias.add_bias_kernel, "AAiii")
            add("pad", layout.pad_kernel, "AAIII" + "i" * 7)
            add("fold_pad", layout.fold_pad_kernel, "AA" + "I" * 6 + "i" * 7)
            add("bias_grad", layout.bias_grad_kernel(dt), "AAiiii")
            if typing == "array":  # (only ever launched through Numba's dispatcher: launch.launch_numba)
                add("copy", layout.copy_kernel, "SA")
    return out
