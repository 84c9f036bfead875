"""One shared-memory tiled, register-blocked GEMM kernel, specialised by its operand loaders.

Every CUDA convolution here is a GEMM per group g:  out[m, col] = sum_j A[m, j] * B[j, col]
where A and B are not stored matrices but gathers from the convolution's tensors (implicit GEMM), or dense
column matrices (im2col). A kernel is built by `tiled_kernel(dtype, ops, tile)` from the device functions of
an Ops tuple:

    dims(geo)                          -> (M, J, NCOL) per group
    a_row(g, m, geo, n0)               -> ra, what row m of A needs (a tuple of ints)
    load_a(a, ra, r, geo, tab, ok)     -> A[m, j] if ok (m < M and j < J), else 0
    b_col(g, col, geo, n0)             -> cb, what column col of B needs (a tuple of ints)
    load_b(b, cb, r, geo, tab, ok)     -> B[j, col] if ok (j < J and col < NCOL), else 0; 0 for padding
    store(out, bias, g, m, col, v, geo, flag, split, n0)
    select(z, geo, tab)                -> (g, geo): the group and the geometry the block's problem has (default
                                          `whole`: z, geo). One launch can so run several problems of one
                                          shape class (backward_data's sub-pixel classes).
    seek(j, geo)                       -> r, the loaders' cursor at reduction index j (default: j itself)
    step(r, d, j, geo)                 -> the cursor at index j, d indices after cursor r (0 <= d <= BJ; default j).
                                          backward_filter's cursor is (n, o) for j = n*span + o (sample_seek):
                                          seek divides once per thread and step carries, so no division is left
                                          in the main loop (each was ~20 instructions, 6-12 per step).
    a_along_j, b_along_j               -> stage the operand along j (staging), True or on the tiles named: for an
                                          operand contiguous in j, read by consecutive threads at consecutive j

Staging (staging(): place, prepare, fetch, put). An operand is staged either row-major, each thread one row of A
(column of B) at reduction indices tid // BM + i*THREADS/BM, consecutive threads on consecutive rows: coalesced
where consecutive rows lie side by side in memory (x and dy patches at consecutive pixels, im2col's column matrix
in forward). Or along j, each thread one index tid % BJ of rows tid // BJ + i*THREADS/BJ, 8 consecutive threads on
8 consecutive j of one row (the shared rows padded by PAD): for the operands contiguous in j (the weights in
forward; dy, and the column matrix or x of im2col and pointwise, in backward_filter). Row-major, a warp read 32
rows of those, 32 cache lines per load instruction; along j it reads 4 runs of 32 bytes. (direct backward_filter's
x patches go along j on 128x128 only: each of a thread's columns keeps 4 ints of context, which cost 64x128 255
registers and spills, 32x64 a block per SM.) a_row and b_col (with their integer divisions) run once per thread
and staged row (prepare), not per element; tab is a per-problem table of the reduction index j (TAB int32 per j:
direct.reduction_table); each thread keeps the cursors of the first index of A and of B it stages, advanced by BJ
per step, and steps from them to its other elements, so no loader divides in the loop. A loader never branches:
with ok false it reads element 0 of its arrays and returns 0, so a thread's loads of one step issue back to back
(direct.masked); an element's range test on j is one 32-bit compare with the indices left (left).
geo is the contract's ConvGeometry as a tuple of 22 ints; flag is the store's option (bias / accumulate);
n0 a batch offset (im2col chunks). Arrays are 1-D (flat, C-contiguous). Indices into arrays are cast to uint64
(none is negative where it is used): Numba wraps a negative signed index at every access, which in the inner loop
also kept each shared load's address out of an immediate offset, 194 instructions per reduction index of an 8x8
tile instead of 99 (64 of them FMAs; ptx.py's inner_loop).

Block: BM x BN outputs of one group and one split of the reduction, THREADS = (BM/TM)*(BN/TN) threads,
each holding a TM x TN register tile: rows m = ty*TM + a, and columns in runs of V = 4 (column(tx, b) =
tx*V + b%V + (b//V)*BN*V/TN), so a thread reads its TM values of A and its TN of B at one reduction index as
TM/4 + TN/4 vector loads (the tiles are 16-byte aligned), and a warp's stores cover 4 consecutive columns per
thread. Per step, BJ reduction indices of A (BJ x BM) and B (BJ x BN) are staged in shared memory,
double-buffered: the next step's elements are loaded into registers before the current step's multiply-adds and
stored into the other shared buffer after them, so one barrier per step suffices.
Grid: (ceil(NCOL/BN), ceil(M/BM), groups * splits), sized for the largest problem of a launch (a block past its
own problem's M or NCOL returns at once), cut along z into launches of at most GRID_Z (CUDA's limit), each given its
first z as z0; split s reduces j in [s*jchunk, (s+1)*jchunk). No atomics: each output
is written by exactly one thread.

Tiles (TILES, compile-time constants of each specialisation): 32x64 with 4x4 per thread loads 8 shared values
(2 vector loads) per 16 multiply-adds; the 8x8 register tiles load 16 (4 vector loads) per 64, but need 4-8x the
outputs per block to fill the GPU; 8x64 (2x4 per thread) wastes fewest rows when a problem has few (M <= 16).
A step's multiply-adds are written out for its 8 reduction indices (multiply_step; LLVM unrolls no loop of more
than two of them), so a step is one trip of one loop. With it (and the staging above), the direct forward 128x128
issues 728 SASS instructions per step of 512 FFMAs on 167 registers, where a loop of two indices per trip inside the
step took 828 on 188 (bench/RESULTS.md, 2026-12-04).
choose_tile picks the largest that still gives a full wave of blocks; autotuning times them all.
"""
from functools import lru_cache
from typing import NamedTuple

from cnnfast.kernels.cuda.compile import helper, int64, simulating, uint32, uint64
from numba import cuda, types


@helper
def whole(z, geo, tab):
    """The default select op: grid z (split removed) is the group, geo the whole problem's."""
    return z, geo


@helper
def index_seek(j, geo):
    """The default cursor: the reduction index itself."""
    return j


@helper
def index_step(r, d, j, geo):
    return j


class Ops(NamedTuple):
    """A tiled GEMM's device functions (module docstring); the kernel's cache key names them all."""
    dims: object
    a_row: object
    load_a: object
    b_col: object
    load_b: object
    store: object
    select: object = whole
    seek: object = index_seek
    step: object = index_step
    a_along_j: object = False  # stage A along j (staging): True, or the names of the tiles that do
    b_along_j: object = False


class Tile(NamedTuple):
    BM: int  # block tile: BM rows x BN columns, BJ reduction indices per shared-memory step
    BN: int
    BJ: int
    TM: int  # register tile per thread: TM x TN
    TN: int

    @property
    def threads(self):
        return (self.BM // self.TM) * (self.BN // self.TN)


TILES = {"32x64": Tile(32, 64, 8, 4, 4), "64x128": Tile(64, 128, 8, 8, 8), "128x128": Tile(128, 128, 8, 8, 8),
         "8x64": Tile(8, 64, 8, 2, 4)}
SMALL = "32x64"  # the fallback: the most blocks per problem
THIN = "8x64"  # for problems of at most 16 rows (direct's): 64 threads, 2x4 outputs each
BJ = 8  # every tile's reduction step (launchers round split chunks to it)
GRID_Z = 65535  # CUDA's limit on a grid's z: more (group, split) pairs (131,072 groups of a per-sample gradient,
#                 sub-pixel classes x groups) run as several launches (launches)
WAVE = 132  # blocks in one wave: an H100's SMs (one block each at least)
MIN_USE = 0.75  # a tile must use this share of its rows x columns (the rest is masked work)
NGEO = 22  # len(ConvGeometry)
ALIGN = None if simulating() else 16  # the shared tiles' alignment: vector loads (the simulator takes none)
TAB = 5  # int32 per reduction index in the loaders' table (direct.reduction_table)
CTX = 4  # ints of a row's context at most (Ops.a_row's and b_col's tuples)
PAD = 4  # elements after each row of a shared tile staged along j (a multiple of 4: rows stay 16-byte aligned)
# each thread stages one fixed row of A and column of B: threads a multiple of BM and of BN (tested)


def tile_names(itemsize, thin=False):
    """The tiles of a dtype: float64's 8x8 register tiles need 230-255 registers and spill (ptx.py), so float64
    has SMALL only; with THIN when asked for."""
    return (SMALL, "64x128", "128x128")[:3 if itemsize <= 4 else 1] + ((THIN,) if thin else ())


@lru_cache(maxsize=1024)
def choose_tile(M, NCOL, groups, splittable=False, itemsize=4, thin=False):
    """The name of the largest tile of the dtype with at least WAVE blocks (or any count when split-K can add
    blocks) that uses at least MIN_USE of its outputs; else SMALL. With thin, THIN for M <= 16 rows, where
    SMALL would compute at least half of its rows for nothing (the ResNet stem's input gradient has 3)."""
    if thin and M <= TILES[SMALL].BM // 2:
        return THIN
    for name in ("128x128", "64x128")[:len(tile_names(itemsize)) - 1]:
        t = TILES[name]
        rows, cols = -(-M // t.BM), -(-NCOL // t.BN)
        if M * NCOL >= MIN_USE * rows * t.BM * cols * t.BN and (splittable or rows * cols * groups >= WAVE):
            return name
    return SMALL


@lru_cache(maxsize=None)
def tiled_kernel(dtype, ops, tile=SMALL):
    """The tiled GEMM kernel's Python function for a numba dtype, an Ops tuple and a tile name (TILES)."""
    dims, a_row, load_a, b_col, load_b, store, select, seek, step, a_along_j, b_along_j = ops
    BM, BN, BJ, TM, TN = TILES[tile]
    if BJ != 8:
        raise ValueError(f"tiled_kernel: tile {tile!r} has BJ = {BJ}: multiply_step is written for 8")
    THREADS = TILES[tile].threads
    V = min(4, TN)  # a thread's columns come in runs of V (one vector load each), runs BN*V/TN apart
    a_along_j, b_along_j = (flag is True or tile in (flag or ()) for flag in (a_along_j, b_along_j))
    STAGE_A, CTX_A, ROW_A, place_a, prepare_a, fetch_a, put_a = staging(a_row, load_a, step, BM, BJ, THREADS,
                                                                        a_along_j)
    STAGE_B, CTX_B, ROW_B, place_b, prepare_b, fetch_b, put_b = staging(b_col, load_b, step, BN, BJ, THREADS,
                                                                        b_along_j)

    @helper
    def column(tx, k):
        """The block column of thread column tx's k-th output."""
        return k // V * (BN * V // TN) + tx * V + k % V

    @helper
    def multiply(acc, reg_a, reg_b, shared_a, shared_b, buf, jj, tx, ty):
        """acc += the outer product of reduction index jj's TM values of A and TN of B (TM/4 + TN/4 vector loads)."""
        for i in range(TM):
            reg_a[i] = shared_a[uint64(buf), uint64(jj), uint64(ty * TM + i)]
        for k in range(TN):
            reg_b[k] = shared_b[uint64(buf), uint64(jj), uint64(column(tx, k))]
        for i in range(TM):
            for k in range(TN):
                acc[i, k] += reg_a[i] * reg_b[k]

    @helper
    def multiply_step(acc, reg_a, reg_b, shared_a, shared_b, buf, tx, ty):
        """multiply for the BJ = 8 indices of a step, written out: LLVM unrolls no loop of more than two of them.
        Each index is passed as a uint64, not a literal: Numba compiles a device function once per distinct literal
        argument (16 compiles of multiply: 3 s of the 5 s compile_ptx then took); NVVM folds it either way."""
        multiply(acc, reg_a, reg_b, shared_a, shared_b, buf, uint64(0), tx, ty)
        multiply(acc, reg_a, reg_b, shared_a, shared_b, buf, uint64(1), tx, ty)
        multiply(acc, reg_a, reg_b, shared_a, shared_b, buf, uint64(2), tx, ty)
        multiply(acc, reg_a, reg_b, shared_a, shared_b, buf, uint64(3), tx, ty)
        multiply(acc, reg_a, reg_b, shared_a, shared_b, buf, uint64(4), tx, ty)
        multiply(acc, reg_a, reg_b, shared_a, shared_b, buf, uint64(5), tx, ty)
        multiply(acc, reg_a, reg_b, shared_a, shared_b, buf, uint64(6), tx, ty)
        multiply(acc, reg_a, reg_b, shared_a, shared_b, buf, uint64(7), tx, ty)

    def kernel(a, b, out, bias, tab, geo, flag, splits, jchunk, n0, z0):
        shared_a = cuda.shared.array((2, BJ, ROW_A), dtype, alignment=ALIGN)
        shared_b = cuda.shared.array((2, BJ, ROW_B), dtype, alignment=ALIGN)
        acc = cuda.local.array((TM, TN), dtype)
        reg_a = cuda.local.array(TM, dtype)
        reg_b = cuda.local.array(TN, dtype)
        next_a = cuda.local.array(STAGE_A, dtype)
        next_b = cuda.local.array(STAGE_B, dtype)
        ctx_a = cuda.local.array((CTX_A, CTX), types.int64)
        ctx_b = cuda.local.array((CTX_B, CTX), types.int64)
        z = z0 + cuda.blockIdx.z  # (group, split) of this block: z0 is the launch's first (launches)
        g, pgeo = select(z // splits, geo, tab)
        split = z % splits
        M, J, NCOL = dims(pgeo)
        col0 = cuda.blockIdx.x * BN
        m0 = cuda.blockIdx.y * BM
        if m0 >= M or col0 >= NCOL:  # a block past a smaller problem of a batched launch (uniform: no barrier)
            return
        tid = cuda.threadIdx.x
        tx = tid % (BN // TN)
        ty = tid // (BN // TN)
        j_begin = min(split * jchunk, J)  # a split past J (chunks rounded up to BJ) is empty: it stages masked rows
        j_end = min(J, j_begin + jchunk)
        prepare_a(ctx_a, g, m0, M, tid, pgeo, n0)  # what the rows of A and the columns of B this thread stages need
        prepare_b(ctx_b, g, col0, NCOL, tid, pgeo, n0)
        for i in range(TM):
            for k in range(TN):
                acc[i, k] = 0
        # step 0 staged; then each step loads the next one into registers, computes from one buffer and
        # stores the next step into the other: one barrier per step, global loads in flight during the FMAs
        cur_a = seek(j_begin + place_a(tid, 0)[1], pgeo)  # the cursors of the first index of A and of B this
        cur_b = seek(j_begin + place_b(tid, 0)[1], pgeo)  # thread stages
        fetch_a(next_a, a, ctx_a, m0, M, cur_a, j_begin, j_end, tid, pgeo, tab)
        fetch_b(next_b, b, ctx_b, col0, NCOL, cur_b, j_begin, j_end, tid, pgeo, tab)
        buf = int64(0)  # not the literal 0: put and multiply_step are then compiled once (see multiply_step)
        put_a(shared_a, buf, next_a, tid)
        put_b(shared_b, buf, next_b, tid)
        cuda.syncthreads()
        for j0 in range(j_begin, j_end, BJ):
            more = j0 + BJ < j_end
            if more:
                cur_a = step(cur_a, BJ, j0 + BJ + place_a(tid, 0)[1], pgeo)
                cur_b = step(cur_b, BJ, j0 + BJ + place_b(tid, 0)[1], pgeo)
                fetch_a(next_a, a, ctx_a, m0, M, cur_a, j0 + BJ, j_end, tid, pgeo, tab)
                fetch_b(next_b, b, ctx_b, col0, NCOL, cur_b, j0 + BJ, j_end, tid, pgeo, tab)
            multiply_step(acc, reg_a, reg_b, shared_a, shared_b, buf, tx, ty)
            if more:
                put_a(shared_a, 1 - buf, next_a, tid)
                put_b(shared_b, 1 - buf, next_b, tid)
            cuda.syncthreads()
            buf = 1 - buf
        for i in range(TM):
            m = m0 + ty * TM + i
            if m < M:
                for k in range(TN):
                    col = col0 + column(tx, k)
                    if col < NCOL:
                        store(out, bias, g, m, col, acc[i, k], pgeo, flag, split, n0)

    names = ",".join(f"{f.__module__}.{f.__name__}" if callable(f) else str(f)
                     for f in (getattr(op, "py_func", op) for op in ops))
    kernel.cache_key = f"{__name__}.tiled_kernel[{dtype}:{names}:{tile}]"  # the PTX cache's name (kernel_key)
    return kernel


def staging(row_of, load, step, R, BJ, THREADS, along_j):
    """The device functions that stage one operand of a tiled GEMM, a BJ x R tile per step (R = BM rows of A, or BN
    columns of B; `row` below is either), for a kernel of THREADS threads:

        place(tid, i)                 -> (row, jj): the tile position of the i-th of the STAGE elements the thread
                                         stages. Along j (an operand contiguous in j): 8 consecutive threads read 8
                                         consecutive j of one row, so a warp reads 4 runs of 32 bytes; rows
                                         tid//BJ + i*THREADS/BJ. Otherwise consecutive threads read consecutive
                                         rows (each thread one row), at jj = tid//R + i*THREADS/R.
        prepare(ctx, g, r0, count, tid, geo, n0)
                                      -> ctx[i] = row_of's ints for the thread's i-th row (CTX_ROWS of them: STAGE
                                         along j, else 1), once per thread: divisions never in the loop
        fetch(regs, src, ctx, r0, count, cur, j, j_end, tid, geo, tab)
                                      -> regs[i] = the i-th element of the step at j (cursor cur at the first);
                                         masked past count rows and past j_end
        put(shared, buf, regs, tid)   -> the staged elements into a shared buffer, of rows of ROW elements

    returns (STAGE, CTX_ROWS, ROW, place, prepare, fetch, put). ROW is R + PAD along j (so that the 8 threads on
    the 8 indices of a row store to 8 distinct banks), else R (32 consecutive rows, or 8 rows x 4 indices)."""
    STAGE = BJ * R // THREADS
    CTX_ROWS = STAGE if along_j else 1
    ROW = R + PAD if along_j else R

    @helper
    def place(tid, i):
        if along_j:
            return tid // BJ + i * (THREADS // BJ), tid % BJ
        return tid % R, tid // R + i * (THREADS // R)

    @helper
    def prepare(ctx, g, r0, count, tid, geo, n0):
        for i in range(CTX_ROWS):
            c = row_of(g, min(r0 + place(tid, i)[0], count - 1), geo, n0)
            for t in range(len(c)):
                ctx[i, t] = c[t]

    @helper
    def fetch(regs, src, ctx, r0, count, cur, j, j_end, tid, geo, tab):
        first = place(tid, 0)[1]
        rest = left(j + first, j_end)
        for i in range(STAGE):
            row, jj = place(tid, i)
            r = cur if along_j else step(cur, jj - first, j + jj, geo)
            ok = r0 + row < count and uint32(jj - first) < rest
            regs[i] = load(src, ctx[i if along_j else 0], r, geo, tab, ok)

    @helper
    def put(shared, buf, regs, tid):
        for i in range(STAGE):
            row, jj = place(tid, i)
            shared[uint64(buf), uint64(jj), uint64(row)] = regs[i]

    return STAGE, CTX_ROWS, ROW, place, prepare, fetch, put


def grid(M, NCOL, groups, splits, tile=SMALL):
    """(column blocks, row blocks, groups x splits): the blocks of every launch of the problem (launches)."""
    t = TILES[tile]
    return ((NCOL + t.BN - 1) // t.BN, (M + t.BM - 1) // t.BM, groups * splits)


GRID_Y = 65535  # CUDA's limit on a grid's y: the row blocks of one launch (y is not cut into launches as z is)


def beyond_grid(M):
    """Why a GEMM of M rows per group has too many row blocks for a launch's grid with the smallest tile, or None.
    (M: output channels per group, or input channels per group, or im2col's column-matrix rows per group.)"""
    BM = min(t.BM for t in TILES.values())
    if M > GRID_Y * BM:
        return f"its GEMM has {M:,} rows per group, more than the {GRID_Y:,} row blocks of {BM} a launch takes"
    return None


def launches(blocks):
    """[(grid, z0)]: the launches that run `blocks` (grid()'s), each of at most GRID_Z along z, told its first z."""
    gx, gy, gz = blocks
    return [((gx, gy, min(GRID_Z, gz - z0)), z0) for z0 in range(0, gz, GRID_Z)]


@helper
def left(j, j_end):
    """The reduction indices from a thread's first staged index j to j_end, clamped to [0, BJ], as a uint32: its
    element d indices further is in range when d < left, one 32-bit compare."""
    return uint32(max(min(j_end - j, BJ), 0))
