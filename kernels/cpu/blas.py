"""The CPU algorithms' GEMMs: NumPy's OpenBLAS, its work shared out over the cores by cnnfast where that pays.

matmul(a, b, out) is np.matmul(a, b, out=out), run one of two ways:
  - cut into one part per OpenBLAS thread, the parts side by side on this module's worker threads and the
    caller's, each on one OpenBLAS thread (OpenBLAS is set to one thread meanwhile, a process-wide setting, as
    threadpoolctl's threadpool_limits sets it; a GEMM of another thread's own in that time runs on one thread, and
    rounds as OpenBLAS's one-thread GEMM does), a product of at least SPLIT_WORK multiply-adds:
      - a stack of products (out (S, ..., M, N)) whose length S divides evenly, or with at least STACK_PER_THREAD
        products per thread: S / threads products per part (rounded);
      - when WORKERS_SPIN, any other product too: out's rows when M >= N, else its columns (multiples of
        COLUMN_ALIGN);
    and as one part, on the caller's thread, a product that cannot be cut, a smaller stack, and any smaller product
    when WORKERS_SPIN or of fewer than THREADS_WORK multiply-adds;
  - otherwise as np.matmul runs it, one GEMM on OpenBLAS's threads (or, up to OPENBLAS_SINGLE multiply-adds, on
    the caller's: OpenBLAS does not split those).
Each output element is one BLAS dot product over the whole inner axis either way (bit-identical to np.matmul in
the tests).

Why (2-core Sapphire Rapids VM, bench/RESULTS.md 2026-12-06):
  - A stack: Winograd's 36 GEMMs per call (64 x 64 x 784 at 3x3 64@56, batch 4) ran at 97-124 GFLOP/s on
    OpenBLAS's two threads, slower than on one (135), since each GEMM woke OpenBLAS's sleeping worker (~50 us on
    this VM); split by the stack they ran at 197-212 GFLOP/s, and the Winograd convolutions 1.3-1.5x faster.
  - One large GEMM: OpenBLAS's own two threads were 5-12% faster than these cuts (the ResNet stem), as long as its
    workers sleep after it. They spin instead, for 2**OPENBLAS_THREAD_TIMEOUT cycles (by default 2**28, ~0.1 s),
    on the cores the next Numba kernel needs, when NumPy was imported before cnnfast could shorten the timeout
    (cnnfast/__init__.py): then im2col ran 10-25% slower. WORKERS_SPIN (set at import) says so, and then every
    product is cut, so that cnnfast never wakes them: the stem's forward 8.0-8.7 -> 6.5-6.7 ms.

It falls back to plain np.matmul when NumPy's BLAS is not an OpenBLAS found in this process or OpenBLAS runs on one
thread. One split, or one GEMM on OpenBLAS's threads, runs at a time: another thread's waits, so that each GEMM
runs on the thread count it was planned for (OpenBLAS's one- and two-thread GEMMs round differently: results are
then the same bits whatever else cnnfast runs meanwhile). Tuned on 2 cores only.
share(task, parts) runs any parts so (im2col's chunks of columns and their GEMMs, kernels/cpu/im2col.py).
"""
import ctypes
import glob
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from functools import lru_cache

import numpy as np

# Multiply-adds below which a product runs as one part. A share of two parts costs ~100 us on the 2-core VM even with
# nothing to do (the worker is woken, then the caller that waits for it: ~50 us each), as long as ~6M multiply-adds
# take on one core. us on one thread / cut (2026-12-06, either import order): 2-D 512 x 96 x 196 146 / 202, 1024 x
# 128 x 196 372 / 331; stacks of 36 64 x 64 x 49 139 / 206, 128 x 128 x 16 217 / 261, 64 x 64 x 196 504 / 471,
# 256 x 256 x 16 1040 / 755. (It was 1 << 22, for an assumed ~50 us: MobileNetV2's 1x1 convolutions at batch 1 ran
# 1.4-2.4x slower than on one thread.)
SPLIT_WORK = 1 << 24
# Multiply-adds from which a 2-D product runs on OpenBLAS's own threads when they sleep after a GEMM (not
# WORKERS_SPIN): waking them costs less than the cut's two wakes. us on one thread / OpenBLAS's two: 128 x 64 x 196
# 27 / 46, 256 x 64 x 196 53 / 50, 384 x 64 x 196 76 / 60, 64 x 147 x 784 111 / 86 (2026-12-06).
THREADS_WORK = 1 << 22
# Multiply-adds up to which OpenBLAS runs a GEMM on one thread itself (65536 x GEMM_MULTITHREAD_THRESHOLD, 4 by
# default): matmul hands these straight to np.matmul (the split's lock and thread-count calls cost ~3.5 us).
OPENBLAS_SINGLE = 1 << 18
# A stack whose length the thread count does not divide is cut anyway when it has at least this many products per
# thread (parts then differ by one product, at most 25% of a part): Winograd's 36 on up to 9 threads. Not measured
# beyond 2 cores.
STACK_PER_THREAD = 4
# A column cut lands on a multiple of this many columns (64 bytes of float32).
COLUMN_ALIGN = 16
# The symbol prefixes and suffixes OpenBLAS builds export: NumPy >= 2's scipy-openblas64, older NumPy wheels'
# openblas64_, a system libopenblas.
_NAMES = (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "64_"), ("openblas_", ""))

# Whether OpenBLAS's workers spin long after each GEMM (cnnfast/__init__.py sets it at import: workers_spin).
WORKERS_SPIN = True
# OpenBLAS's thread timeout (OPENBLAS_THREAD_TIMEOUT, its workers spin 2**timeout cycles) above which they count as
# spinning: every value from 4 to 20 ran cnnfast's im2col 10-25% faster than OpenBLAS's default 28 (2026-12-05).
SHORT_TIMEOUT = 20

_lock = threading.Lock()  # one split (or GEMM on OpenBLAS's threads) at a time: OpenBLAS's thread count is process-wide
_pools = {}  # OpenBLAS's thread count -> the executor of the parts after the first
_shared_count = None  # while a share runs: OpenBLAS's thread count before it (set back after)
_generation = 0  # odd while a share has OpenBLAS on one thread (threads() reads _shared_count then)
_inside = threading.local()  # .share: this thread runs a share's part (its caller's or a worker's)


class OpenBLAS:
    """get_num_threads() and set_num_threads(n) of one loaded OpenBLAS library (ctypes functions)."""

    def __init__(self, get_num_threads, set_num_threads):
        self.get_num_threads, self.set_num_threads = get_num_threads, set_num_threads


def _numpy_blas_name():
    try:
        return np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"].lower()
    except Exception:  # a NumPy before 1.26 (show_config has no mode), or a build that does not say
        pass
    # NumPy 1.24/1.25 (distutils builds): numpy.__config__ keeps the link info, e.g. libraries ['openblas64_']
    config = getattr(np, "__config__", None)
    for key in ("blas_ilp64_opt_info", "blas_opt_info"):
        info = getattr(config, key, None)
        if isinstance(info, dict) and info.get("libraries"):
            return " ".join(map(str, info["libraries"])).lower()
    return ""


def _openblas_paths():
    """Candidate paths of NumPy's OpenBLAS: the copy its wheel ships (numpy.libs, numpy/.dylibs), else the one
    OpenBLAS mapped into this process (Linux), if there is exactly one."""
    root = os.path.dirname(os.path.abspath(np.__file__))
    shipped = [p for d in (os.path.join(root, os.pardir, "numpy.libs"), os.path.join(root, ".dylibs"))
               for p in sorted(glob.glob(os.path.join(d, "*openblas*")))]
    if shipped:
        return shipped
    try:
        with open("/proc/self/maps") as maps:
            mapped = {line.split(None, 5)[-1].strip() for line in maps if "openblas" in line.lower()}
    except OSError:
        return []
    mapped = [p for p in mapped if os.path.isfile(p)]
    return mapped if len(mapped) == 1 else []


@lru_cache(maxsize=None)
def openblas():
    """The OpenBLAS NumPy's GEMMs run on, or None when that cannot be told."""
    if "openblas" not in _numpy_blas_name():
        return None
    for path in _openblas_paths():
        try:
            lib = ctypes.CDLL(path)  # the library already loaded: the same handle, nothing loaded twice
        except OSError:
            continue
        for prefix, suffix in _NAMES:
            get = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
            set_ = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
            if get is not None and set_ is not None:
                get.restype, get.argtypes, set_.restype, set_.argtypes = ctypes.c_int, [], None, [ctypes.c_int]
                return OpenBLAS(get, set_)
    return None


def parts(a, b, out, threads, cut_2d):
    """[(a, b, out) views], one per thread, covering out once (module docstring); [] when out is not a stack to cut
    and not cut_2d; [(a, b, out)] when it cannot be cut that many ways."""
    stack = out.shape[0] if out.ndim >= 3 else 0
    if stack and (stack % threads == 0 or stack >= STACK_PER_THREAD * threads):
        cuts = [stack * i // threads for i in range(threads + 1)]  # lengths differ by one at most

        def cut(m, lo, hi):  # a stacked operand is cut with out; a broadcast one (2-D, or a stack of 1) is shared
            return m[lo:hi] if m.ndim == out.ndim and m.shape[0] == stack else m
        return [(cut(a, lo, hi), cut(b, lo, hi), out[lo:hi]) for lo, hi in zip(cuts, cuts[1:])]
    rows, columns = out.shape[-2:]
    if not cut_2d:
        return []
    if rows >= columns and rows >= threads:
        cuts = [rows * i // threads for i in range(threads + 1)]
        return [(a[..., lo:hi, :], b, out[..., lo:hi, :]) for lo, hi in zip(cuts, cuts[1:])]
    if rows < columns and columns >= threads * COLUMN_ALIGN:
        cuts = [columns * i // threads // COLUMN_ALIGN * COLUMN_ALIGN for i in range(threads)] + [columns]
        return [(a, b[..., lo:hi], out[..., lo:hi]) for lo, hi in zip(cuts, cuts[1:])]
    return [(a, b, out)]


def workers_spin(timeout):
    """Whether OpenBLAS's workers spin long after a GEMM, given the OPENBLAS_THREAD_TIMEOUT it read (None: unset,
    OpenBLAS's default 28)."""
    return timeout is None or not timeout.strip().isdigit() or int(timeout) > SHORT_TIMEOUT


def _forget_threads():
    """In a forked child: the parent's worker threads are not there (an executor that still lists them would queue
    parts that never run), and the lock may be held by one of them; a share forked in the middle left OpenBLAS on
    one thread, which gets its count back."""
    global _lock, _shared_count, _generation
    _lock = threading.Lock()
    _pools.clear()
    if _shared_count is not None:
        openblas().set_num_threads(_shared_count)
        _shared_count = None
    _generation += _generation % 2


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_threads)


def _pool(threads):
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(threads - 1, thread_name_prefix="cnnfast-blas")
    return _pools[threads]


def threads():
    """How many threads share() runs parts on side by side: OpenBLAS's thread count (1 when NumPy's BLAS is not an
    OpenBLAS found in this process); while a share has it set to one, the count it will set back, so that another
    thread's calls plan the same parts, and sum in the same order, as when they run alone."""
    lib = openblas()
    if lib is None:
        return 1
    while True:  # read again if a share began or ended meanwhile
        generation, shared = _generation, _shared_count
        count = shared if generation % 2 else lib.get_num_threads()
        if generation == _generation and count is not None:
            return count


def share(task, parts):
    """task(k) for k in range(parts), each with OpenBLAS on one thread: part 0 on the caller's thread, the others
    side by side on this module's workers (OpenBLAS's thread count less one of them). One share at a time: another
    thread's waits (its parts would otherwise run on OpenBLAS as this one left it, and could sum in another order:
    OpenBLAS's one- and two-thread GEMMs round differently). One after another on the caller's thread when OpenBLAS
    is not found or runs on one thread, inside a part of a share, or once the interpreter shuts the workers down.
    A part's exception is raised once every part is done."""
    lib = openblas()
    if lib is None or getattr(_inside, "share", False):
        for k in range(parts):
            task(k)
        return
    global _shared_count, _generation
    with _lock:
        count = lib.get_num_threads()
        if count == 1:
            _inside.share = True  # (a share in a part runs inline: the lock is this thread's)
            try:
                for k in range(parts):
                    task(k)
            finally:
                _inside.share = False
            return
        _shared_count = count
        _generation += 1
        lib.set_num_threads(1)
        pending, inline = [], []

        def quiet(k):  # NumPy's errors ignored, as in the caller's op (cnnfast.api): its state is not the workers'
            _inside.share = True
            try:
                with np.errstate(all="ignore"):
                    task(k)
            finally:
                _inside.share = False
        try:
            for k in range(1, parts):
                try:
                    pending.append(_pool(count).submit(quiet, k))
                except RuntimeError:  # the interpreter is shutting its executors down: a thread past the main one's end
                    inline.append(k)
            _inside.share = True
            for k in [0] + inline:
                task(k)
        finally:
            _inside.share = False
            wait(pending)
            if lib.get_num_threads() == 1:  # (not a count the user set meanwhile)
                lib.set_num_threads(count)
            _generation += 1
            _shared_count = None
        for done in pending:
            done.result()


def matmul(a, b, out):
    """np.matmul(a, b, out=out), split as the module docstring says; returns out. a, b: 2-D or stacks that
    np.matmul takes (a broadcast operand is shared by the parts); out: (..., M, N), any strides."""
    work = out.size * a.shape[-1]
    count = 1 if work <= OPENBLAS_SINGLE else threads()
    if count > 1 and work >= SPLIT_WORK:
        pieces = parts(a, b, out, count, WORKERS_SPIN)
    elif count > 1 and (WORKERS_SPIN or out.ndim > 2 or work < THREADS_WORK):
        pieces = [(a, b, out)]
    else:
        pieces = []
    if pieces:
        share(lambda k: np.matmul(pieces[k][0], pieces[k][1], out=pieces[k][2]), len(pieces))
    elif count == 1 or getattr(_inside, "share", False):  # a small product, or OpenBLAS on one thread (or not found)
        np.matmul(a, b, out=out)
    else:  # one GEMM on OpenBLAS's threads: not while another thread's share has them set to one
        with _lock:
            np.matmul(a, b, out=out)
    return out
