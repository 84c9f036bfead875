"""The CPU algorithms' GEMMs: NumPy's OpenBLAS, its work shared out over the cores by cnnfast where that pays.

matmul(a, b, out) is np.matmul(a, b, out=out), run one of two ways:
  - cut into one part per OpenBLAS thread, each part's GEMMs on one OpenBLAS thread (OpenBLAS is set to one thread
    meanwhile, a process-wide setting, as threadpoolctl's threadpool_limits sets it; a GEMM of another thread's own
    in that time runs on one thread, and rounds as OpenBLAS's one-thread GEMM does):
      - a stack of products (out (S, ..., M, N)) whose length S divides evenly, or with at least STACK_PER_THREAD
        products per thread: S / threads products per part (rounded);
      - any other product too (when WORKERS_SPIN, or cblas was found): out's rows when M >= N (or the inner size
        and N are small: ROWS_INNER), else its columns (multiples of COLUMN_ALIGN);
    the parts as the tasks of one Numba parallel region calling OpenBLAS's cblas_sgemm / cblas_dgemm (gemms_cpu;
    gemm_cpu for three C-contiguous matrices; where cblas() finds them), from SPLIT_WORK multiply-adds; else on
    this module's worker threads and the caller's (share), from SHARE_WORK;
  - otherwise whole: as one part on the caller's thread, or (a 2-D product of at least THREADS_WORK multiply-adds,
    when OpenBLAS's workers sleep after a GEMM, not WORKERS_SPIN) one GEMM on OpenBLAS's threads (or, up to
    OPENBLAS_SINGLE multiply-adds, on the caller's: OpenBLAS does not split those).
Each output element is one BLAS dot product over the whole inner axis either way (bit-identical to np.matmul in
the tests; OpenBLAS's small-matrix kernels can round a part otherwise than the whole product).

Why (2-core Sapphire Rapids VM, bench/RESULTS.md 2026-12-06):
  - A stack: Winograd's 36 GEMMs per call (64 x 64 x 784 at 3x3 64@56, batch 4) ran at 97-124 GFLOP/s on
    OpenBLAS's two threads, slower than on one (135), since each GEMM woke OpenBLAS's sleeping worker (~50 us on
    this VM); split by the stack they ran at 197-212 GFLOP/s, and the Winograd convolutions 1.3-1.5x faster.
  - One large GEMM: OpenBLAS's own two threads were 5-12% faster than cuts on share()'s threads (the ResNet stem),
    as long as its workers sleep after it. They spin instead, for 2**OPENBLAS_THREAD_TIMEOUT cycles (by default
    2**28, ~0.1 s), on the cores the next Numba kernel needs, when NumPy was imported before cnnfast could shorten
    the timeout (cnnfast/__init__.py): then im2col ran 10-25% slower. WORKERS_SPIN (set at import) says so, and then
    every product is cut, so that cnnfast never wakes them: the stem's forward 8.0-8.7 -> 6.5-6.7 ms. Cut on Numba's
    threads (gemms_cpu), a product timed back to back is 3-8% slower than on OpenBLAS's threads, but in a
    convolution, where those have gone to sleep since the last one, 1.1-1.8x faster (MobileNetV2's 1x1 layers at
    batch 1): every product that cblas can take is cut so, whichever the import order.

It falls back to plain np.matmul when NumPy's BLAS is not an OpenBLAS found in this process or OpenBLAS runs on one
thread. One split, or one GEMM on OpenBLAS's threads, runs at a time: another thread's waits, so that each GEMM
runs on the thread count it was planned for (OpenBLAS's one- and two-thread GEMMs round differently: results are
then the same bits whatever else cnnfast runs meanwhile). Tuned on 2 cores only.
share(task, parts) runs any parts on Python threads (matmul's parts where cblas is not found): a share costs ~100 us
of thread wakes on the 2-core VM, a Numba region ~2 us while Numba's workers still spin after the last one (the same
workers torch's CPU ops use, when cnnfast was imported first). gemm_region runs a kernel whose tasks call cblas
themselves (gemm(): im2col's chunks, each thread building columns and multiplying them) as one such region.
"""
import contextlib
import ctypes
import glob
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from functools import lru_cache

import numba
import numpy as np
from cnnfast.kernels.cpu.threads import parallel, sized
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

# Multiply-adds below which matmul runs a product as one part when its parts would run on share()'s threads (cblas not
# found). A share of two parts costs ~100 us on the 2-core VM even with nothing to do (the worker is woken, then the
# caller that waits for it: ~50 us each), as long as ~6M multiply-adds take on one core. us on one thread / cut
# (2026-12-06, either import order): 2-D 512 x 96 x 196 146 / 202, 1024 x 128 x 196 372 / 331; stacks of 36 64 x 64 x 49
# 139 / 206, 128 x 128 x 16 217 / 261, 64 x 64 x 196 504 / 471, 256 x 256 x 16 1040 / 755. (It was 1 << 22, for an
# assumed ~50 us: MobileNetV2's 1x1 convolutions at batch 1 ran 1.4-2.4x slower than on one thread.)
SHARE_WORK = 1 << 24
# ... and from which it is cut when its parts run on Numba's threads instead (cblas found: matmul's products), where
# a cut costs ~2 us while those threads spin and ~50 us once they sleep: us on one thread / cut (2026-12-06, cnnfast
# imported first): 256 x 64 x 196 51 / 57, 384 x 64 x 196 82 / 72, 576 x 96 x 196 159 / 113, 1280 x 320 x 49 382 /
# 237 (OpenBLAS's own two threads 47, 61, 104, 230, whose workers then sleep while Numba's do).
SPLIT_WORK = 1 << 22
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
# A product with fewer rows than columns is cut by its rows all the same where its inner size is at most ROWS_INNER,
# it has at most ROWS_COLUMNS columns and at least ROWS_PER_PART rows a part: OpenBLAS took up to 2.4x longer over
# column halves there (us, one thread a part, rows / columns, 2026-12-07: 192 x 32 x 784, MobileNetV2's 32 -> 192
# @28 at batch 1, 45-47 / 105-108; 144 x 24 x 784 33 / 77; 512 x 64 x 1000 242-249 / 321-325; 96 x 8 x 1568 13 / 19;
# every product the rule takes 0.43-1.01 of the columns' time). Outside it columns won: 64 x 96 x 1568 103 / 82, 72 x
# 24 x 1568 57 / 43, 112 x 32 x 3136 126 / 104, 16 x 32 x 12544 135 / 82 (bench/RESULTS.md: 47 products). Measured on
# 2 threads only.
ROWS_INNER, ROWS_COLUMNS, ROWS_PER_PART = 96, 1568, 48
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


STACK, ROWS, COLUMNS, WHOLE = range(4)  # how a product is cut (_cut)


def _cut(out, threads, cut_2d, inner):
    """How parts() cuts out (inner: the products' inner size) for that many threads: by the STACK, its ROWS or its
    COLUMNS (module docstring), WHOLE when it cannot be cut that many ways, None when it is not to be cut (not a stack
    cut so, and not cut_2d)."""
    stack = out.shape[0] if out.ndim >= 3 else 0
    if stack and (stack % threads == 0 or stack >= STACK_PER_THREAD * threads):
        return STACK
    if not cut_2d:
        return None
    rows, columns = out.shape[-2:]
    if (rows >= columns and rows >= threads) or (
            inner <= ROWS_INNER and columns <= ROWS_COLUMNS and rows >= ROWS_PER_PART * threads):
        return ROWS
    if rows < columns and columns >= threads * COLUMN_ALIGN:
        return COLUMNS
    return WHOLE


def parts(a, b, out, threads, cut_2d):
    """[(a, b, out) views], one per thread, covering out once (module docstring); [] when out is not a stack to cut
    and not cut_2d; [(a, b, out)] when it cannot be cut that many ways."""
    axis = _cut(out, threads, cut_2d, a.shape[-1])
    if axis == STACK:
        stack = out.shape[0]
        cuts = [stack * i // threads for i in range(threads + 1)]  # lengths differ by one at most

        def cut(m, lo, hi):  # a stacked operand is cut with out; a broadcast one (2-D, or a stack of 1) is shared
            return m[lo:hi] if m.ndim == out.ndim and m.shape[0] == stack else m
        return [(cut(a, lo, hi), cut(b, lo, hi), out[lo:hi]) for lo, hi in zip(cuts, cuts[1:])]
    rows, columns = out.shape[-2:]
    if axis == ROWS:
        cuts = [rows * i // threads for i in range(threads + 1)]
        return [(a[..., lo:hi, :], b, out[..., lo:hi, :]) for lo, hi in zip(cuts, cuts[1:])]
    if axis == COLUMNS:
        cuts = [columns * i // threads // COLUMN_ALIGN * COLUMN_ALIGN for i in range(threads)] + [columns]
        return [(a, b[..., lo:hi], out[..., lo:hi]) for lo, hi in zip(cuts, cuts[1:])]
    return [] if axis is None else [(a, b, out)]


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


@contextlib.contextmanager
def _one_openblas_thread(lib):
    """Holds the lock (one share at a time) with OpenBLAS set to one thread, and yields the count it had, set back
    after (threads() reports that count meanwhile); yields 1, setting nothing, when it runs on one thread."""
    global _shared_count, _generation
    with _lock:
        if _generation % 2:  # (no share runs while the lock is held: an earlier one's finally was cut short)
            _set_back(lib)
        count = lib.get_num_threads()
        if count == 1:
            yield 1
            return
        try:  # (entered first: an exception anywhere, a KeyboardInterrupt, leaves the state as it found it)
            _shared_count = count
            _generation += 1
            lib.set_num_threads(1)
            yield count
        finally:
            _set_back(lib)


def _set_back(lib):
    """A share's end: OpenBLAS's count set back (where it is still the share's one thread: not a count the user set
    meanwhile), the generation even. Also at the next share's start where a KeyboardInterrupt cut this short (it is
    raised when a ctypes call here returns), which had left OpenBLAS on one thread for good."""
    global _shared_count, _generation
    if _shared_count is not None and lib.get_num_threads() == 1:
        lib.set_num_threads(_shared_count)
    _shared_count = None
    _generation += _generation % 2  # even again (odd only while a share runs)


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
    with _one_openblas_thread(lib) as count:
        if count == 1:
            _inside.share = True  # (a share in a part runs inline: the lock is this thread's)
            try:
                for k in range(parts):
                    task(k)
            finally:
                _inside.share = False
            return
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
    for done in pending:
        done.result()


# ---------------------------------------------------------------- the parts on Numba's threads
#
# A share's parts run on Python threads: waking the worker, then the caller that waits for it, costs ~100 us on the
# 2-core VM, and meanwhile Numba's OpenMP workers (which torch's ops share) fall asleep. matmul's parts run instead
# as one Numba parallel region calling OpenBLAS's cblas_sgemm / cblas_dgemm, one part per thread: us on the VM
# (2026-12-06), one thread / the share / the region: 384 x 64 x 196 88 / 90 / 52, 960 x 160 x 49 150 / 135 / 83,
# 1280 x 320 x 49 405 / 309 / 201, 64 x 147 x 3136 585 / 372 / 276 (OpenBLAS's own two threads 66, 97, 245, 310).

@lru_cache(maxsize=None)
def cblas():
    """(cblas_sgemm's address, cblas_dgemm's, whether their sizes are 64-bit) in the OpenBLAS NumPy runs on, or None
    when not found: an ILP64 build's suffixed symbols (NumPy 2's scipy-openblas64, openblas64_), else a build's plain
    ones (conda's libopenblas, scipy-openblas32), whose size width its openblas_get_config tells (USE64BITINT)."""
    if openblas() is None:
        return None
    for path in _openblas_paths():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_", ""):
            for suffix in ("64_", ""):
                sgemm, dgemm = (getattr(lib, f"{prefix}cblas_{t}gemm{suffix}", None) for t in "sd")
                config = getattr(lib, f"{prefix}openblas_get_config{suffix}", None)
                if sgemm is None or dgemm is None or config is None:
                    continue
                config.restype, config.argtypes = ctypes.c_char_p, []
                return (ctypes.cast(sgemm, ctypes.c_void_p).value, ctypes.cast(dgemm, ctypes.c_void_p).value,
                        b"USE64BITINT" in (config() or b""))
    return None


# The largest size a 32-bit (LP64) cblas takes: a product with a larger size or leading dimension runs as np.matmul
# does (matmul), and a layer with more output positions (or channels) than that takes im2col's column blocks.
LP64_SIZE = (1 << 31) - 1


@intrinsic
def _call(typingctx, address, args):
    """Calls the C function at address (an integer) with the values of the tuple args, as C arguments of their
    types (int32, int64, float, double; addresses as int64); it returns nothing."""
    def codegen(context, builder, signature, llargs):
        values = [builder.extract_value(llargs[1], i) for i in range(len(signature.args[1]))]
        function = ir.FunctionType(ir.VoidType(), [v.type for v in values])
        builder.call(builder.inttoptr(llargs[0], function.as_pointer()), values)
        return context.get_dummy_value()
    return types.void(address, args), codegen


ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112  # CBLAS's enumerations


@parallel()
def gemms_cpu(address, ilp64, one, itemsize, table, parts, axis):
    """The GEMMs of table, each out = a @ b by the cblas ?gemm at address (row-major, alpha = one, beta = 0; sizes
    64-bit when ilp64, else 32-bit), a row (trans a, trans b, M, N, K, a's address, lda, b's, ldb, out's, ldc), in
    `parts` tasks as parts() cuts them: by the STACK (task p: rows R*p // parts to R*(p + 1) // parts, in order), or
    each GEMM's ROWS or COLUMNS (task p: its share of each of them, _gemm_part). itemsize: bytes per element."""
    R = len(table)
    for p in numba.prange(parts):
        first, last = (R * p // parts, R * (p + 1) // parts) if axis == STACK else (0, R)
        for row in range(first, last):
            ta, tb, M, N, K, a, lda, b, ldb, c, ldc = table[row]
            _gemm_part(address, ilp64, one, itemsize, p, parts, axis, ta, tb, M, N, K, a, lda, b, ldb, c, ldc)


@parallel()
def gemm_cpu(address, ilp64, one, a, b, out, parts, axis):
    """out (M, N) = a (M, K) @ b (K, N), three C-contiguous matrices, as gemms_cpu runs its one-row table (without
    the table: its three addresses cost ~2.5 us a call in Python)."""
    (M, K), N = a.shape, b.shape[1]
    for p in numba.prange(parts):
        _gemm_part(address, ilp64, one, a.itemsize, p, parts, axis, NO_TRANS, NO_TRANS, M, N, K, a.ctypes.data, K,
                   b.ctypes.data, N, out.ctypes.data, N)


@numba.njit(inline="always")
def _gemm_part(address, ilp64, one, itemsize, p, parts, axis, ta, tb, M, N, K, a, lda, b, ldb, c, ldc):
    """Task p's share of c = op(a) @ op(b) (gemms_cpu's row): rows M*p // parts to M*(p + 1) // parts of c (ROWS),
    its columns from multiples of COLUMN_ALIGN (COLUMNS), else all of it."""
    if axis == ROWS:
        lo, hi = M * p // parts, M * (p + 1) // parts
        a, c, M = a + lo * (lda if ta == NO_TRANS else 1) * itemsize, c + lo * ldc * itemsize, hi - lo
    elif axis == COLUMNS:
        lo = N * p // parts // COLUMN_ALIGN * COLUMN_ALIGN
        hi = N if p == parts - 1 else N * (p + 1) // parts // COLUMN_ALIGN * COLUMN_ALIGN
        b, c, N = b + lo * (1 if tb == NO_TRANS else ldb) * itemsize, c + lo * itemsize, hi - lo
    if M > 0 and N > 0:
        _gemm_at(address, ilp64, one, ta, tb, M, N, K, a, lda, b, ldb, c, ldc)


@numba.njit(inline="always")
def _gemm_at(address, ilp64, one, ta, tb, M, N, K, a, lda, b, ldb, c, ldc):
    """c = op(a) @ op(b) by the cblas ?gemm at address (row-major, alpha = one, beta = 0), the matrices at addresses
    a, b and c; sizes passed as 64-bit ints when ilp64, else 32-bit (which the caller checked they fit)."""
    if ilp64:
        _call(address, (np.int32(ROW_MAJOR), np.int32(ta), np.int32(tb), np.int64(M), np.int64(N), np.int64(K), one,
                        np.int64(a), np.int64(lda), np.int64(b), np.int64(ldb), one - one, np.int64(c), np.int64(ldc)))
    else:
        _call(address, (np.int32(ROW_MAJOR), np.int32(ta), np.int32(tb), np.int32(M), np.int32(N), np.int32(K), one,
                        np.int64(a), np.int32(lda), np.int64(b), np.int32(ldb), one - one, np.int64(c), np.int32(ldc)))


@numba.njit(inline="always")
def gemm(address, ilp64, one, ta, tb, M, N, K, a, lda, b, ldb, c, ldc):
    """From a kernel of gemm_region's: c (M, N, row stride ldc) = op(a) (M, K) @ op(b) (K, N), by the cblas ?gemm
    at address (row-major, alpha = one, beta = 0, sizes 64-bit when ilp64); a, b and c: arrays whose first element
    starts each matrix."""
    _gemm_at(address, ilp64, one, ta, tb, M, N, K, a.ctypes.data, lda, b.ctypes.data, ldb, c.ctypes.data, ldc)


def gemm_region(kernel, work, dtype, *args):
    """kernel(address, ilp64, one, *args), a parallel kernel whose tasks call OpenBLAS's cblas ?gemm for dtype (at
    address, with 64-bit sizes when ilp64; one = dtype's 1) by gemm(), as one Numba region (sized by work) with
    OpenBLAS on one thread meanwhile (one such region or share at a time). Only where cblas() found it."""
    sgemm, dgemm, ilp64 = cblas()
    with _one_openblas_thread(openblas()):  # (in a forked child, where GNU OpenMP cannot run, the serial build)
        sized(kernel, work)(dgemm if dtype.char == "d" else sgemm, ilp64, dtype.type(1), *args)


def _layout(m):
    """(trans, leading dimension) of the matrices m[..., :, :] as cblas reads them in row-major order, or None when
    neither axis has unit stride (or a stride is negative, or broadcast along an axis longer than one)."""
    rows, cols = m.shape[-2:]
    if any(stride % m.itemsize for stride in m.strides[-2:]):
        return None
    r, c = (stride // m.itemsize for stride in m.strides[-2:])
    if (c == 1 or cols == 1) and (rows == 1 or r >= max(1, cols)):
        return NO_TRANS, max(1, cols) if rows == 1 else r
    if (r == 1 or rows == 1) and (cols == 1 or c >= max(1, rows)):
        return TRANS, max(1, rows) if cols == 1 else c
    return None


def _matrices(a, b, out):
    """(a, b, out) as cblas takes them (a stack of one product as its matrices), or None where np.matmul must
    (nothing to multiply, shapes or dtypes that do not match, out not writeable or not in native byte order)."""
    if (out.size == 0 or a.shape[-1] == 0 or a.shape[-1] != b.shape[-2] or out.shape[-2:] != (a.shape[-2], b.shape[-1])
            or not a.dtype == b.dtype == out.dtype or not out.dtype.isnative or not out.flags.writeable):
        return None  # (np.matmul's own checks and copies then)
    if out.ndim > 2 and out.size == out.shape[-2] * out.shape[-1]:  # a stack of one product: its matrices
        return a.reshape(a.shape[-2:]), b.reshape(b.shape[-2:]), out.reshape(out.shape[-2:])
    return a, b, out


def _gemm_rows(a, b, out):
    """(gemms_cpu's table rows for np.matmul(a, b, out=out) (_matrices'), one per product of the stack (a and b
    broadcast), and whether they compute out's transpose, b^T @ a^T), or None when cblas cannot take a matrix's
    strides."""
    layout = _layout(out)
    transposed = layout is None or layout[0] == TRANS  # out must be row-major: out^T = b^T @ a^T
    if transposed:
        a, b, out = b.swapaxes(-1, -2), a.swapaxes(-1, -2), out.swapaxes(-1, -2)
        layout = _layout(out)
    layouts = [_layout(a), _layout(b), layout]
    if None in layouts or layout[0] == TRANS:
        return None
    (M, N), K = out.shape[-2:], a.shape[-1]
    head = [layouts[0][0], layouts[1][0], M, N, K]
    if a.ndim == b.ndim == out.ndim == 2:  # (without NumPy's per-call costs)
        row = head + [_address(a), layouts[0][1], _address(b), layouts[1][1], _address(out), layouts[2][1]]
        return [row], transposed
    stack = out.shape[:-2]
    try:
        a, b = np.broadcast_to(a, stack + a.shape[-2:]), np.broadcast_to(b, stack + b.shape[-2:])
    except ValueError:
        return None
    rows = np.empty((int(np.prod(stack)), 11), np.int64)
    rows[:, :5] = head
    for column, m, (_, lead) in zip((5, 7, 9), (a, b, out), layouts):
        at = np.full(stack, _address(m), np.int64)
        for axis, (size, stride) in enumerate(zip(stack, m.strides[:-2])):
            at += (np.arange(size, dtype=np.int64) * stride).reshape((-1,) + (1,) * (len(stack) - axis - 1))
        rows[:, column], rows[:, column + 1] = at.ravel(), lead
    return rows, transposed


def _address(m):
    return m.__array_interface__["data"][0]


def _on_numba_threads(a, b, out, parts, axis):
    """np.matmul(a, b, out=out) in `parts` tasks of one Numba parallel region, cut by axis, with OpenBLAS on one
    thread; False (nothing run) where cblas, the dtype or a matrix's strides do not allow it, or Numba has fewer
    threads."""
    if cblas() is None or out.dtype.char not in "fd" or numba.get_num_threads() < parts:
        return False
    matrices = _matrices(a, b, out)
    if matrices is None:
        return False
    a, b, out = matrices
    if (out.ndim == a.ndim == b.ndim == 2 and axis in (ROWS, COLUMNS) and out.flags.c_contiguous
            and a.flags.c_contiguous and b.flags.c_contiguous
            and (cblas()[2] or max(out.shape + a.shape) <= LP64_SIZE)):  # (the common case)
        gemm_region(gemm_cpu, out.size * a.shape[-1], out.dtype, a, b, out, parts, axis)
        return True
    table = _gemm_rows(a, b, out)
    if table is None:
        return False
    rows, transposed = table
    rows = np.asarray(rows, np.int64)
    if not cblas()[2] and rows[:, [2, 3, 4, 6, 8, 10]].max() > LP64_SIZE:  # (sizes and leading dimensions)
        return False
    if transposed and axis != STACK:
        axis = ROWS + COLUMNS - axis  # (out's rows are its transpose's columns)
    gemm_region(gemms_cpu, out.size * a.shape[-1], out.dtype, out.itemsize, rows, parts, axis)
    return True


def matmul(a, b, out):
    """np.matmul(a, b, out=out), split as the module docstring says; returns out. a, b: 2-D or stacks that
    np.matmul takes (a broadcast operand is shared by the parts); out: (..., M, N), any strides."""
    work = out.size * a.shape[-1]
    count = 1 if work <= OPENBLAS_SINGLE else threads()
    if count == 1 or getattr(_inside, "share", False) or np.may_share_memory(out, a) or np.may_share_memory(out, b):
        np.matmul(a, b, out=out)  # a small product, OpenBLAS on one thread (or not found), in a share's part, or an
        return out                # out that overlaps an input (np.matmul copies; parts would race)
    region = cblas() is not None
    if work >= (SPLIT_WORK if region else SHARE_WORK):
        cut_2d = WORKERS_SPIN or region
        axis = _cut(out, count, cut_2d, a.shape[-1])
        if region and axis in (STACK, ROWS, COLUMNS) and _on_numba_threads(a, b, out, count, axis):
            return out
        pieces = parts(a, b, out, count, cut_2d)
    elif WORKERS_SPIN or out.ndim > 2 or work < THREADS_WORK:
        pieces = [(a, b, out)]
    else:
        pieces = []
    if pieces:
        share(lambda k: np.matmul(pieces[k][0], pieces[k][1], out=pieces[k][2]), len(pieces))
    else:  # one GEMM on OpenBLAS's threads: not while another thread's share has them set to one
        with _lock:
            np.matmul(a, b, out=out)
    return out
