"""Numba's thread pool: started so that it does not take the cores from NumPy's BLAS, and skipped by small calls.

im2col alternates Numba parallel regions (building the columns) with BLAS GEMMs (kernels/cpu/blas.py). With
Numba's OpenMP layer, GNU OpenMP's workers busy-wait after every region (GOMP_SPINCOUNT, 300,000 spins by
default), holding the cores the GEMM then needs: on the 2-core dev box one im2col conv2d took 26-31 ms with its
two halves alternating against 15 ms for the same halves timed apart (bench/RESULTS.md). start() launches the pool
with GOMP_SPINCOUNT=SPIN_COUNT in the environment while Numba's libgomp loads (it reads the variable once, at
load), then restores the environment: workers spin ~0.1-0.2 ms after a region, then sleep.

That runtime is the process's: torch imported after cnnfast finds libgomp.so.1 loaded and uses it too (its own
copy is never loaded). It was started passive (OMP_WAIT_POLICY=PASSIVE, no spinning) until 2026-12-05, and then
every torch op that entered a parallel region woke sleeping workers: a tiny torch conv2d 4.3 -> 57 us, a 1M-element
add 222 -> 297 us. With the short spin torch runs as fast as on its own runtime (a whole model too, at SPIN_COUNT's
10,000 spins), and cnnfast's im2col as fast as passive (bench/RESULTS.md). A user's own OMP_WAIT_POLICY or
GOMP_SPINCOUNT wins; other layers ignore it.
cnnfast/__init__.py calls start() on import: a pool started after torch was imported binds to torch's libgomp
(its default spin), and an im2col convolution then runs ~1.7x slower.

Every parallel CPU kernel is declared with @parallel(...), which also compiles it without parallel=True; the
launchers call sized(kernel, work), which picks that serial build for a call of less than SERIAL_WORK inner-loop
iterations, as ATen's parallel_for runs a loop inline below its grain size: a tiny convolution spent ~55 of its
~80 us entering the parallel region.
"""
import contextlib
import hashlib
import os
import sys
import threading
import types
import warnings
from pathlib import Path

import numba
from numba.np.ufunc import parallel as numba_parallel

# GNU OpenMP's spins before a worker sleeps (bench/RESULTS.md). A region entered this long after the last one cost,
# us (2026-12-06, the 2-core VM): 3,000 spins: 20 us 1.6, 50 us 48; 10,000: 100 us 3.9, 200 us 48; 30,000: 200 us 4.7,
# 500 us 43. It was 3,000 until 2026-12-06, when a whole torch model turned out to pay for it: MobileNetV2 on torch's
# own convolutions at batch 1, 19-21 ms without cnnfast, took 27-28 ms with it imported (every torch op, ~50 us of
# Python after the last, woke sleeping workers); 19-20 ms at 10,000, which ran the CPU benchmark's geometric means
# 4% faster for cnnfast and 6% for torch.
SPIN_COUNT = 10000


# Whether the pool joined a GNU OpenMP runtime that torch, imported before cnnfast, had loaded with its default spin:
# its workers then busy-wait after every region on the cores the next GEMM needs, and cnnfast's CPU convolutions ran
# 1.2-2x slower (the CPU benchmark, 2026-12-06: geometric means 0.72x / 0.87x / 0.70x of torch against 0.97x / 1.24x /
# 1.02x; Numba's TBB or workqueue layer did no better). The first parallel launch warns once (sized).
SPINNING_RUNTIME = False


def start():
    global SPINNING_RUNTIME
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    torch_first = "torch" in sys.modules  # (torch loads libgomp, which reads GOMP_SPINCOUNT once, as it loads)
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    try:
        numba_parallel._launch_threads()  # idempotent; picks the threading layer (NUMBA_THREADING_LAYER) as usual
    finally:
        del os.environ["GOMP_SPINCOUNT"]
    SPINNING_RUNTIME = torch_first and sys.platform.startswith("linux") and numba.threading_layer() == "omp"


def _warn_spinning_runtime():
    global SPINNING_RUNTIME
    SPINNING_RUNTIME = False
    frame, level = sys._getframe(1), 2  # the warning names the caller's line outside cnnfast
    while frame is not None and frame.f_globals.get("__name__", "").startswith("cnnfast."):
        frame, level = frame.f_back, level + 1
    warnings.warn("cnnfast: torch was imported before cnnfast, so Numba's threads share torch's OpenMP runtime, whose "
                  "workers busy-wait after every parallel region on the cores the next BLAS call needs: cnnfast's "
                  "CPU convolutions run 1.2-2x slower. Import cnnfast before torch, or set GOMP_SPINCOUNT=10000 (or "
                  "OMP_WAIT_POLICY) in the environment before Python starts.", RuntimeWarning, stacklevel=level)


# ---------------------------------------------------------------- serial builds for small calls

# Inner-loop iterations (multiply-adds, or elements moved) below which a call runs its kernel's serial build:
# ATen's grain size. Entering a parallel region costs ~2 us while the workers still spin and 50-60 us once they
# sleep (the 2-core dev box); the serial build of depthwise_wide_cpu on one 8x8 plane takes 0.6 us. At this much
# work the serial builds take 5-10 us there: at most a few us slower than a region the workers are spinning for,
# ~45 us faster than one they sleep through (bench/RESULTS.md, 2026-12-05).
SERIAL_WORK = 1 << 15
# ... as set: a plan that counts the threads a call runs on reads this one (only() and a forked child change what
# runs, not which kernels: a problem's bits do not depend on the build).
DEFAULT_SERIAL_WORK = SERIAL_WORK


def njit(**options):
    """numba.njit(cache=True, **options): the machine code on disk (Numba's folder: the package's __pycache__, else
    ~/.cache/numba, or NUMBA_CACHE_DIR). Where Numba finds no folder it can write (a read-only install and no
    writable home: it raises "no locator available" as the module imports), the same function without the disk cache
    (compiled in each process), warned once."""
    def build(pyfunc):
        try:
            return numba.njit(cache=True, **options)(pyfunc)
        except RuntimeError as e:
            if "no locator available" not in str(e):
                raise
            global _UNCACHED
            if not _UNCACHED:
                _UNCACHED = True
                warnings.warn("cnnfast: Numba has no folder to cache the CPU kernels in (the package's folder and "
                              "~/.cache are read-only); they compile in every process. Set NUMBA_CACHE_DIR to a "
                              "writable folder to keep them.", RuntimeWarning, stacklevel=2)
            return numba.njit(**options)(pyfunc)
    return build


_UNCACHED = False


def parallel(**options):
    """Decorator: numba.njit(parallel=True, cache=True, **options), with `.serial`, the same function compiled
    without parallel=True (numba.prange runs as range) for calls too small to pay for a parallel region (sized).
    The serial build releases the GIL (nogil=True), so that threads can run it side by side (a server's, say).

    The serial build compiles a copy of the function under its own qualified name: Numba's disk cache names its
    files by module and qualified name and keys entries by signature and bytecode, not by options, so two builds
    of one function would load each other's machine code."""
    def build(pyfunc):
        kernel = njit(parallel=True, **options)(pyfunc)
        twin = types.FunctionType(pyfunc.__code__, pyfunc.__globals__, pyfunc.__name__, pyfunc.__defaults__,
                                  pyfunc.__closure__)
        twin.__qualname__ = f"{pyfunc.__qualname__}_serial"
        twin.__doc__ = pyfunc.__doc__
        kernel.serial = njit(nogil=True, **options)(twin)
        return kernel
    return build


def drop_stale_caches(modules):
    """Numba keys a function's disk cache by its own source file only, so a kernel that inlines a helper from another
    module (im2col_cpu calls direct.out_range) kept its old machine code when only that module changed (an editable
    install after `git pull`). Here the cache files of these modules' kernels are deleted whenever a source file of
    this folder, or Numba, differs from what wrote them: a digest of both is kept beside the cache files (Numba's
    folder: the in-tree __pycache__, or under NUMBA_CACHE_DIR). A folder that cannot be written is left alone."""
    digest = hashlib.sha256(numba.__version__.encode())
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    digest = digest.hexdigest()
    folders = {getattr(getattr(f, "_cache", None), "cache_path", None)
               for module in modules for f in vars(module).values() if isinstance(f, numba.core.dispatcher.Dispatcher)}
    stems = tuple(f"{module.__name__.rpartition('.')[2]}." for module in modules)
    for folder in filter(None, folders):
        stamp = Path(folder) / "cnnfast-sources.sha256"
        with contextlib.suppress(OSError):
            if stamp.read_text() == digest:
                continue
        with contextlib.suppress(OSError):
            for path in Path(folder).iterdir():
                if path.name.startswith(stems) and path.suffix in (".nbi", ".nbc"):
                    path.unlink(missing_ok=True)
            stamp.write_text(digest)


# In a child forked from a process whose pool has started (cnnfast's import starts it), every call picks the serial
# build: GNU OpenMP, Numba's threading layer on Linux, cannot run a parallel region after fork(), and Numba ends such
# a child with SIGTERM ("fork() called from a process already using GNU OpenMP"): torch's DataLoader workers, a
# multiprocessing pool. torch runs its DataLoader workers on one thread too.
FORKED = False


def _forked():
    global FORKED
    FORKED = True


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forked)


def sized(kernel, work):
    """The build of a `parallel` kernel for a call of `work` inner-loop iterations: serial below SERIAL_WORK, or in
    a forked child; on Numba's workqueue layer, the parallel build behind a lock. (A stand-in without a serial
    build, such as a test's spy, is returned as it is.)"""
    if SPINNING_RUNTIME:
        _warn_spinning_runtime()
    if work < SERIAL_WORK or FORKED:
        return getattr(kernel, "serial", kernel)
    return _one_at_a_time(kernel) if _workqueue() else kernel


# Numba's workqueue layer (where it has neither OpenMP nor TBB: macOS wheels without libomp, or
# NUMBA_THREADING_LAYER=workqueue) aborts the process when two threads enter parallel regions at once ("Terminating:
# Nested parallel kernel launch detected" / "Concurrent access has been detected"): there, one region at a time.
_WORKQUEUE = None
_REGION_LOCK = threading.Lock()


def _workqueue():
    global _WORKQUEUE
    if _WORKQUEUE is None:
        numba_parallel._launch_threads()  # idempotent: the layer is chosen when the pool starts
        _WORKQUEUE = numba.threading_layer() == "workqueue"
    return _WORKQUEUE


def _one_at_a_time(kernel):
    def call(*args):
        with _REGION_LOCK:
            return kernel(*args)
    return call


BUILDS = {"serial": sys.maxsize, "parallel": 0}  # build -> the SERIAL_WORK that makes every call pick it


@contextlib.contextmanager
def only(build):
    """Within the block every sized() call picks `build` ('serial' or 'parallel'), whatever its work: validation
    runs each build on problems of any size (not thread-safe: it sets the module's SERIAL_WORK)."""
    global SERIAL_WORK
    before, SERIAL_WORK = SERIAL_WORK, BUILDS[build]
    try:
        yield
    finally:
        SERIAL_WORK = before
