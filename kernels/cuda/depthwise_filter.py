"""Depthwise weight gradient on CUDA: groups == C, K = M*C (channel multiplier M); memory-bound.

x (N, C, D, H, W), dy (N, K, P, Q, U) -> dw (K, 1, T, R, S); output channel k = c*M + m reads input channel c.

    filter_kernel  block per (output channel k, split of the reduction over n, p, q, u);
                   each thread accumulates TAPS taps at once in registers over a strided slice of the split's
                   items, runs of FILTER_ROWS output rows down a column, two rows a trip (their loads issue
                   together). The item's setup and index carries serve the whole run; where stride_h is 1 or 2
                   times dil_h (the slide builds) each row takes its taps' x from the row above's in registers
                   and loads only its filter's last 1 or 2 rows. sm_90 SASS per dy element, 3x3 float32: ~75 at
                   56x56 and ~104 at 7x7 (stride 1), ~105 and ~123 (stride 2), ~115-150 loading every tap,
                   against 239 with one element per item and every tap loaded. The block adds its threads' sums
                   in a fixed tree order, and direct.reduce_splits_kernel adds the splits in order:
                   deterministic, no atomics.
    (builds)       one per SPECIALISED filter size (shared with depthwise.plane_kernel), compiled in: the tap
                   loops unroll, each tap's offsets fold; else the taps come from tap_table().
Indices into the arrays are cast to uint64 (none is negative where it is used): Numba wraps a negative signed
index at every access, a compare and select whose live values cost filter_kernel 152 -> 92 registers (float32,
array typing).
"""
from functools import lru_cache

import numpy as np
from cnnfast.kernels.contract import DEFAULT_WORKSPACE_LIMIT
from cnnfast.kernels.cuda import direct, indexing
from cnnfast.kernels.cuda.compile import ZERO, device_constant, helper, numba_dtype, uint64
from cnnfast.kernels.cuda.launch import flat, launch, scratch
from numba import cuda

FILTER_BLOCK = 128  # threads of filter_kernel (a power of two: tree reduction)
TAPS = 9  # weight-gradient taps a thread accumulates per pass (a 3x3 filter in one pass)
TARGET_BLOCKS = 1056  # filter_kernel and plane_kernel: at least 8 blocks per SM on an H100 (132 SMs)
MIN_CHUNK = 8 * FILTER_BLOCK  # filter_kernel: reduction items per split at least
SLIDES = (1, 2)  # filter_kernel's SPECIALISED builds: the slides they have builds for (strides 1 and 2)
FILTER_ROWS = 16  # filter_kernel: output rows per reduction item (a thread's run down a column)
SPECIALISED = ((1, 3, 3),)  # filter sizes plane_kernel and filter_kernel have builds for (MobileNet's 3x3)


def constant_sizes(g):
    """(T, R, S) when the kernels have a build for this filter size (SPECIALISED), else None."""
    sizes = (g.T, g.R, g.S)
    return sizes if sizes in SPECIALISED else None


def sizes_note(g):
    """['3x3 taps compiled in'] when the kernels have a build for this filter size, else [] (explain())."""
    sizes = constant_sizes(g)
    return [f"{'x'.join(map(str, sizes[1:] if sizes[0] == 1 else sizes))} taps compiled in"] if sizes else []


def size_name(sizes):
    """'1x3x3' for a build's compiled-in filter size, 'any' for the generic build."""
    return "x".join(map(str, sizes)) if sizes else "any"


@lru_cache(maxsize=None)
def filter_kernel(dtype, sizes=None, slide=0, V=FILTER_ROWS):
    """The weight-gradient kernel's Python function for a numba dtype: partial[split, k, tap] (see the module
    docstring); taps is the (t*dd, r*dh, s*dw) table of tap_table(), chunk the reduction items per split. Item
    ((n*P + p)*QB + b)*U + u is the run of rows q = b*V + v, v < V (FILTER_ROWS; QB = ceil(Q / V)), at output column
    u: per row one dy load, then each tap's x (0 in the padding, multiplied like the reference's: a NaN or inf in dy
    reaches every tap). sizes = (T, R, S) compiles the filter size in (SPECIALISED): each tap's (t, r, s) folds to
    constants and its offsets come from the dilations, not the table. slide > 0 (T = 1, stride_h = slide*dil_h): row
    v's tap (r, s) reads row v-1's tap (r + slide, s), kept in registers, so a row loads only its filter's last slide
    rows; the run starts ceil((R - 1) / slide) rows early, those rows only filling the window."""
    KT, KR, KS = sizes or (0, 0, 0)  # 0: the table
    if slide and not (KT == 1 and KR * KS <= TAPS and slide < KR):
        raise ValueError(f"filter_kernel: slide {slide} needs a compiled-in filter size (1, R, S) with R*S <= {TAPS} "
                         f"and R > slide, got sizes={sizes}")
    KEPT = (KR - slide) * KS if slide else 0  # a row's taps i < KEPT are the row above's i + slide*KS

    @helper
    def tap(x, taps, geo, i, row, h, d0, w0, exists):
        """x at tap i of an output row (0 in the padding, or where the row does not exist): row, h = the offset in x
        and the input row of its tap 0."""
        D, H, W = geo[2], geo[3], geo[4]
        if KT:
            dd = i // (KR * KS) * geo[15]
            dr = i // KS % KR * geo[16]
            ds = i % KS * geo[17]
        else:
            dd, dr, ds = taps[uint64(3 * i)], taps[uint64(3 * i + 1)], taps[uint64(3 * i + 2)]
        value = ZERO
        if exists & indexing.within(d0 + dd, D) & indexing.within(h + dr, H) & indexing.within(w0 + ds, W):
            value = x[uint64(row + (dd * H + dr) * W + ds)]  # (the tap's offset: the same for every row)
        return value

    @helper
    def step(x, dy, taps, geo, win, acc, first, trs, v, rows, row, h, d0, w0, grads):
        """Row v of the item's run (rows of them; v < 0: the slide build's rows above, which only fill win): win
        takes its taps' x, acc adds dy[grads] times them. Predicated, no branch: two steps' loads issue together."""
        for i in range(TAPS):
            if first + i < trs:
                if i < KEPT:
                    win[i] = win[i + slide * KS]  # (ascending i: the row above's value, not yet replaced)
                else:
                    win[i] = tap(x, taps, geo, first + i, row, h, d0, w0, v < rows)
        summed = v >= 0 and v < rows
        grad = dy[uint64(grads)] if summed else ZERO
        for i in range(TAPS):
            if first + i < trs:
                acc[i] = acc[i] + grad * win[i] if summed else acc[i]

    def kernel(x, dy, partial, taps, geo, chunk):
        acc = cuda.local.array(TAPS, dtype)
        win = cuda.local.array(TAPS, dtype)  # each tap's x for the current row
        sums = cuda.shared.array((TAPS, FILTER_BLOCK), dtype)
        C, D, H, W, K = geo[1], geo[2], geo[3], geo[4], geo[5]
        P, Q, U = geo[9], geo[10], geo[11]
        QB = (Q + V - 1) // V
        O = P * Q * U
        trs = KT * KR * KS if KT else geo[6] * geo[7] * geo[8]
        k = cuda.blockIdx.x % K
        split = cuda.blockIdx.x // K
        c = k // (K // C)
        tid = cuda.threadIdx.x
        begin = split * chunk
        end = min(geo[0] * P * QB * U, begin + chunk)
        # item e = ((n*P + p)*QB + b)*U + u, split once; then stepped by FILTER_BLOCK's digits with carries
        n0, _, p0, b0, u0 = indexing.split(begin + tid, 1, P, QB, U)
        sn, _, sp, sb, su = indexing.split(FILTER_BLOCK, 1, P, QB, U)
        for first in range(0, trs, TAPS):
            for i in range(TAPS):
                acc[i] = 0
            # (nothing is shared yet, but entered from a barrier the loop keeps the global-memory descriptor in
            # uniform registers: without it ptxas re-moves it (R2UR) for each predicated load, 16 a trip of 126)
            cuda.syncthreads()
            e, n, p, b, u = begin + tid, n0, p0, b0, u0
            while e < end:
                d0 = p * geo[12] - geo[18]
                h0 = b * V * geo[13] - geo[19]
                w0 = u * geo[14] - geo[20]
                lead = -(-(KR - 1) // slide) if slide else 0  # rows above the first that only fill the window
                v = -lead
                row = ((n * C + c) * D + d0) * H * W + (h0 + v * geo[13]) * W + w0  # row v's tap 0 in x,
                h = h0 + v * geo[13]  # its input row,
                grads = (n * K + k) * O + (p * Q + b * V + v) * U + u  # and its dy
                rows = min(V, Q - b * V)
                while v < rows:  # two rows a trip: their loads issue together
                    step(x, dy, taps, geo, win, acc, first, trs, v, rows, row, h, d0, w0, grads)
                    step(x, dy, taps, geo, win, acc, first, trs, v + 1, rows, row + geo[13] * W, h + geo[13], d0, w0,
                         grads + U)
                    v += 2
                    row += 2 * geo[13] * W
                    h += 2 * geo[13]
                    grads += 2 * U
                e += FILTER_BLOCK
                u, b = indexing.carry(u + su, b + sb, U)  # each digit stays under 2x its size: one carry at most
                b, p = indexing.carry(b, p + sp, QB)
                p, n = indexing.carry(p, n + sn, P)
            for i in range(TAPS):
                sums[i, tid] = acc[i]
            cuda.syncthreads()
            half = FILTER_BLOCK // 2
            while half > 0:  # fixed tree order: thread t adds t + half
                if tid < half:
                    for i in range(TAPS):
                        sums[i, tid] += sums[i, tid + half]
                cuda.syncthreads()
                half //= 2
            if tid < TAPS and first + tid < trs:
                partial[uint64((split * K + k) * trs + first + tid)] = sums[tid, 0]
            cuda.syncthreads()  # sums is rewritten by the next pass

    kernel.cache_key = f"{__name__}.filter_kernel[{dtype}:{V}rows:{slide}slide:{size_name(sizes)}]"
    return kernel


def filter_slides(g):
    """filter_kernel's slide: the filter rows its taps move down from one output row to the next, stride_h / dil_h
    where that is one of SLIDES (T = 1, a SPECIALISED size), else 0."""
    shift = g.stride_h // g.dil_h
    slides = constant_sizes(g) is not None and g.T == 1 and g.stride_h % g.dil_h == 0 and shift in SLIDES
    return shift if slides else 0


def filter_items(g):
    """filter_kernel's reduction items: N*P*ceil(Q / FILTER_ROWS)*U, runs of FILTER_ROWS output rows."""
    return g.N * g.P * -(-g.Q // FILTER_ROWS) * g.U


def tap_table(g):
    """(t*dd, r*dh, s*dw) per tap (t, r, s), flat int64: a device constant per filter shape and dilation."""
    def make():
        t, r, s = np.unravel_index(np.arange(g.T * g.R * g.S, dtype=np.int64), (g.T, g.R, g.S))
        return np.stack([t * g.dil_d, r * g.dil_h, s * g.dil_w], axis=1).ravel()

    return device_constant(("depthwise-taps", g.T, g.R, g.S, g.dil_d, g.dil_h, g.dil_w), make)


def filter_splits(g, itemsize, workspace_limit):
    """Splits of the filter_items() reduction: enough blocks to fill the GPU, each at least MIN_CHUNK long, and the
    partial sums (splits x K x TRS) under workspace_limit."""
    splits = max(1, min(-(-TARGET_BLOCKS // g.K), filter_items(g) // MIN_CHUNK))
    limit = DEFAULT_WORKSPACE_LIMIT if workspace_limit is None else workspace_limit
    while splits > 1 and splits * g.K * g.T * g.R * g.S * itemsize > limit:
        splits -= 1
    return splits


# ---------------------------------------------------------------- launcher

def workspace_bytes(g, itemsize, workspace_limit):
    """The split partial sums backward_filter allocates (0 unsplit)."""
    splits = filter_splits(g, itemsize, workspace_limit)
    return splits * g.K * g.T * g.R * g.S * itemsize if splits > 1 else 0


def backward_filter(x, dy, dw, g, workspace_limit=None, stream=0):
    splits = filter_splits(g, dw.dtype.itemsize, workspace_limit)
    chunk = -(-filter_items(g) // splits)
    out = flat(dw) if splits == 1 else scratch(splits * dw.size, dw.dtype, dw, stream)
    kernel = filter_kernel(numba_dtype(dw.dtype), constant_sizes(g), filter_slides(g), FILTER_ROWS)
    launch(kernel, splits * g.K, FILTER_BLOCK, stream, flat(x), flat(dy), out, tap_table(g), tuple(g), chunk)
    if splits > 1:
        launch(direct.reduce_splits_kernel, max(1, min(-(-dw.size // 256), 1024)), 256, stream, out,
               flat(dw), splits, dw.size)


def kernels(g, dtype):
    """The kernels backward_filter launches (explain())."""
    notes = sizes_note(g) + [f"runs of {FILTER_ROWS} output rows"]
    shift = filter_slides(g)
    notes += [f"taps slide {shift} filter row{'s' * (shift > 1)} per output row"] if shift else []
    return f"depthwise filter_kernel [{dtype}] ({', '.join(notes)})", f"reduce_splits_kernel [{dtype}] (when split)"
