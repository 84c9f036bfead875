"""Direct (implicit-GEMM) convolution on CUDA: the tiled kernel of gemm.py reading the tensors in place.

x (N, C, D, H, W) * w (K, C/g, T, R, S) -> y (N, K, P, Q, U); O = P*Q*U, TRS = T*R*S, per group g:

    forward          y[n, k, o]      = sum_{(c, tap)} w[k, c, tap] * x-patch     M = K/g, J = C/g*TRS, NCOL = N*O
    backward_data    dx[n, c, i]     = sum_{(k, tap)} w[k, c, tap] * dy-gather   M = C/g, J = K/g*TRS, NCOL = N*DHW
                     (one GEMM per sub-pixel class of positions i, over the taps that read it: below)
    backward_filter  dw[k, (c, tap)] = sum_{(n, o)} dy[n, k, o] * x-patch        M = K/g, J = N*span, NCOL = C/g*TRS

Each thread owns a register tile of outputs (4x4 or 8x8: output channels x pixels for forward, gemm.TILES); the
weight and input tiles of each 8-deep reduction step are staged in shared memory (gemm.py). backward_filter splits its
long reduction over `splits` blocks writing partial sums to scratch, then `reduce_splits` adds them in split
order: deterministic, no atomics. Its loaders read j = n*span + o at a cursor (n, o) that each thread carries from
one staged index to the next (sample_seek, sample_step): no division per element, and no branch (span = max(O, BJ):
the indices past O pad a sample to a step, and are masked).
"""
import itertools
import math
from functools import lru_cache

import numpy as np
from cnnfast.kernels.contract import DEFAULT_WORKSPACE_LIMIT
from cnnfast.kernels.cuda import gemm, indexing
from cnnfast.kernels.cuda.compile import ZERO, device_constant, helper, int64, numba_dtype, uint32, uint64
from cnnfast.kernels.cuda.indexing import within, within32
from cnnfast.kernels.cuda.launch import flat, launch, scratch
from numba import cuda

TARGET_BLOCKS = 264  # 2 blocks per SM on an H100 (132 SMs): enough splits to fill the GPU
MIN_SPLIT = 256  # reduction indices per split at least
ONE, TWO, THREE, FOUR = uint64(1), uint64(2), uint64(3), uint64(4)  # table columns (no wrap-around test)
MASK_TAPS = 64  # forward's filters of at most this many taps test them by a mask (fwd_col_taps), others by gather


# ---------------------------------------------------------------- loaders shared by several GEMMs

@helper
def strided_a(a, ra, j, geo, tab, ok):
    """A[m, j] = a[base + j*stride] for ra = (base, stride)."""
    return masked(a, ra[0] + j * ra[1], ok)


@helper
def strided_b(b, cb, j, geo, tab, ok):
    """B[j, col] = b[base + j*stride] for cb = (base, stride, -, -)."""
    return masked(b, cb[0] + j * cb[1], ok)


@helper
def sample_span(geo):
    """backward_filter's reduction indices per sample, j = n*span + o: its O = P*Q*U outputs o, padded to at least
    gemm.BJ (the loaders mask o >= O), so that a cursor moving d <= BJ indices carries once at most."""
    return max(geo[9] * geo[10] * geo[11], gemm.BJ)


def span(g):
    """sample_span of a ConvGeometry, on the host."""
    return max(g.P * g.Q * g.U, gemm.BJ)


@helper
def sample_seek(j, geo):
    """backward_filter's cursor (n, o) at its reduction index j = n*span + o over samples n and outputs o, as two
    uint32 (so that the cursor steps and the range tests on it run in 32 bits): one unsigned division (a signed //
    also computes a remainder to floor), once per thread."""
    n = uint64(j) // uint64(sample_span(geo))
    return uint32(n), uint32(j - n * sample_span(geo))


@helper
def sample_step(r, d, j, geo):
    """The cursor d <= BJ reduction indices after r (at j): o carried into n once at most (span >= BJ), without a
    branch, in 32 bits."""
    n, o = r
    o = uint32(o + d)
    past = o >= uint32(sample_span(geo))
    return uint32(n + past), uint32(o - (uint32(sample_span(geo)) if past else uint32(0)))


@helper
def by_sample(t, ctx, r, geo, tab, ok):
    """t[n, c, o] at cursor r = (n, o) of a (N, channels, O) tensor, with ctx = (offset of t[0, c, 0],
    channels*O); 0 at the padding o >= O: backward_filter's dy rows (and pointwise x columns, im2col's column
    matrix)."""
    return masked(t, ctx[0] + r[0] * ctx[1] + r[1], ok & (r[1] < uint32(geo[9] * geo[10] * geo[11])))


@helper
def masked(src, i, ok):
    """src[i] if ok, else 0 (reading src[0]): a load without a branch, so a thread's loads issue back to back."""
    v = src[uint64(i) if ok else uint64(0)]
    return v if ok else ZERO


@helper
def gather(src, base, d, h, w, tab, e, D, H, W, ok):
    """src[base + delta] for the table row at e = (delta, od, oh, ow, -) when ok and (d + od, h + oh, w + ow)
    lies in the D x H x W box, else 0: every patch loader's element, one add and three 32-bit unsigned compares, no
    multiply, no branch. The row is read unmasked (so a thread's rows are one address plus constants): e lies in
    the table when its index is under the problem's end + BJ (int32_table's padding rows)."""
    ok &= within32(d + tab[e + ONE], D) & within32(h + tab[e + TWO], H) & within32(w + tab[e + THREE], W)
    return masked(src, base + tab[e], ok)


# ---------------------------------------------------------------- forward: A = W_g, B = x-patches
# j = c*TRS + tap (tab row: c*DHW + (t*dd*H + r*dh)*W + s*dw, t*dd, r*dh, s*dw, tap), col = n*O + o

@helper
def fwd_dims(geo):
    groups = geo[21]
    return geo[5] // groups, geo[1] // groups * geo[6] * geo[7] * geo[8], geo[0] * geo[9] * geo[10] * geo[11]


@helper
def fwd_row(g, m, geo, n0):
    """w[k = g*Kg + m, j] = w[k*J + j]"""
    groups = geo[21]
    J = geo[1] // groups * geo[6] * geo[7] * geo[8]
    return (g * (geo[5] // groups) + m) * J, 1


@helper
def fwd_col(g, col, geo, n0):
    """(offset of x[n, g*Cg, d0, h0, w0], d0, h0, w0) for col = n*O + o: (d0, h0, w0) the first input position
    output o = (p, q, u) reads (padding may make it negative, and the offset with it)."""
    C, D, H, W = geo[1], geo[2], geo[3], geo[4]
    n, _, p, q, u = indexing.split(col, 1, geo[9], geo[10], geo[11])
    d0, h0, w0 = p * geo[12] - geo[18], q * geo[13] - geo[19], u * geo[14] - geo[20]
    return (n * C + g * (C // geo[21])) * D * H * W + (d0 * H + h0) * W + w0, d0, h0, w0


@helper
def fwd_load_x(x, cb, j, geo, tab, ok):
    return gather(x, cb[0], cb[1], cb[2], cb[3], tab, uint64(j) * uint64(gemm.TAB), geo[2], geo[3], geo[4], ok)


@helper
def fwd_col_taps(g, col, geo, n0):
    """(fwd_col's offset, taps) for filters of at most MASK_TAPS taps: bit t*R*S + r*S + s of taps is set where tap
    (t, r, s) of output col reads inside x (the tests of gather, once per thread instead of once per element)."""
    base, d0, h0, w0 = fwd_col(g, col, geo, n0)
    taps = uint64(0)
    bit = uint64(1)
    for t in range(geo[6]):
        for r in range(geo[7]):
            for s in range(geo[8]):
                inside = within(d0 + t * geo[15], geo[2]) & within(h0 + r * geo[16], geo[3])
                if inside & within(w0 + s * geo[17], geo[4]):
                    taps |= bit
                bit <<= uint64(1)
    return base, int64(taps)


@helper
def fwd_load_tap(x, cb, j, geo, tab, ok):
    """x at the table row of j = c*TRS + tap (delta, -, -, -, tap) where bit tap of the column's taps is set: two
    table reads and a bit test per element, where gather reads four and tests three axes."""
    e = uint64(j) * uint64(gemm.TAB)
    return masked(x, cb[0] + tab[e], ok & ((uint64(cb[1]) >> uint64(tab[e + FOUR])) & uint64(1) != uint64(0)))


@helper
def fwd_store(y, bias, g, m, col, v, geo, flag, split, n0):
    K = geo[5]
    O = geo[9] * geo[10] * geo[11]
    k = g * (K // geo[21]) + m
    if flag:
        v += bias[k]
    y[((col // O) * K + k) * O + col % O] = v


# ---------------------------------------------------------------- backward data: A = W_g^T, B = dy gathers
# Sub-pixel decomposition: the dx positions i = a + stride*i2 of one residue class a = (a_d, a_h, a_w) are read
# only by the taps t with (a + pad - t*dil) % stride == 0, each from output i2 + (a + pad - t*dil) // stride. One
# GEMM per class runs over those taps only, so no multiply-add meets a zero inserted by the stride (stride 1 is
# one class holding every tap); one launch runs them all, grid z = class*groups + group (bwd_select). Per block,
# geo is the ConvGeometry + SUBPIXEL ints (a_d, a_h, a_w, D2, H2, W2, taps, first) of its class: the class, its grid
# of positions, its number of taps, and where its rows start in the table (subpixel_table).
# j = kk*taps + i (tab row: kk*O + (off_d*Q + off_h)*U + off_w, off_d, off_h, off_w, kk*Cg*TRS + tap),
# col = n*D2*H2*W2 + i2

SUBPIXEL = 8


@helper
def bwd_select(z, geo, tab):
    """(group, geo + the class's SUBPIXEL ints) for grid z = class*groups + group: classes head the table."""
    groups = geo[21]
    cls = z // groups
    e = cls * SUBPIXEL
    return z - cls * groups, geo + (tab[e], tab[e + 1], tab[e + 2], tab[e + 3], tab[e + 4], tab[e + 5], tab[e + 6],
                                    tab[e + 7])


@helper
def bwd_dims(geo):
    groups = geo[21]
    return geo[1] // groups, geo[5] // groups * geo[28], geo[0] * geo[25] * geo[26] * geo[27]


@helper
def bwd_row(g, m, geo, n0):
    """w[g*Kg + kk, c = m, tap] = w[g*Kg*Cg*TRS + m*TRS + (kk*Cg*TRS + tap)]"""
    groups = geo[21]
    trs = geo[6] * geo[7] * geo[8]
    return (g * (geo[5] // groups) * (geo[1] // groups) + m) * trs, 0


@helper
def bwd_load_w(w, ra, j, geo, tab, ok):
    return masked(w, ra[0] + tab[uint64(geo[29]) + uint64(j) * uint64(gemm.TAB) + FOUR], ok)  # row unmasked: gather


@helper
def bwd_col(g, col, geo, n0):
    """(offset of dy[n, g*Kg, d2, h2, w2], d2, h2, w2) for col = n*D2H2W2 + (d2*H2 + h2)*W2 + w2 (class position
    i2 = (d2, h2, w2))."""
    K, P, Q, U = geo[5], geo[9], geo[10], geo[11]
    n, _, d2, h2, w2 = indexing.split(col, 1, geo[25], geo[26], geo[27])
    return (n * K + g * (K // geo[21])) * P * Q * U + (d2 * Q + h2) * U + w2, d2, h2, w2


@helper
def bwd_load_dy(dy, cb, j, geo, tab, ok):
    """dy at the output i2 + offset of the j-th (channel, tap); 0 past dy's borders."""
    return gather(dy, cb[0], cb[1], cb[2], cb[3], tab, uint64(geo[29]) + uint64(j) * uint64(gemm.TAB), geo[9],
                  geo[10], geo[11], ok)


@helper
def bwd_store(dx, bias, g, m, col, v, geo, flag, split, n0):
    """dx[n, g*Cg + m, a + stride*i2] for col = n*D2H2W2 + i2."""
    C, D, H, W = geo[1], geo[2], geo[3], geo[4]
    n, _, d2, h2, w2 = indexing.split(col, 1, geo[25], geo[26], geo[27])
    i = ((geo[22] + d2 * geo[12]) * H + geo[23] + h2 * geo[13]) * W + geo[24] + w2 * geo[14]
    dx[(n * C + g * (C // geo[21]) + m) * D * H * W + i] = v


@lru_cache(maxsize=256)
def subpixel_classes(g):
    """[(class, taps)] for the residue classes of dx positions (module comment above), classes without a position
    (stride > size) left out: class = (a_d, a_h, a_w, D2, H2, W2, len(taps)) extends geo, taps lists the taps
    reading the class as (t*R*S + r*S + s, off_d, off_h, off_w)."""
    axes = []
    for size, k, stride, dil, pad in ((g.D, g.T, g.stride_d, g.dil_d, g.pad_d),
                                      (g.H, g.R, g.stride_h, g.dil_h, g.pad_h),
                                      (g.W, g.S, g.stride_w, g.dil_w, g.pad_w)):
        axes.append([(a, -(-(size - a) // stride), [(t, (a + pad - t * dil) // stride) for t in range(k)
                                                    if (a + pad - t * dil) % stride == 0])
                     for a in range(min(stride, size))])
    out = []
    for (ad, d2, td), (ah, h2, th), (aw, w2, tw) in itertools.product(*axes):
        taps = tuple(((t * g.R + r) * g.S + s, od, oh, ow) for t, od in td for r, oh in th for s, ow in tw)
        out.append(((ad, ah, aw, d2, h2, w2, len(taps)), taps))
    return out


# ---------------------------------------------------------------- backward filter: A = dy, B = x-patches^T
# j = n*span + o (tab row per output o: (p*sd*H + q*sh)*W + u*sw, p*sd, q*sh, u*sw, -), col = c*TRS + tap

@helper
def flt_dims(geo):
    groups = geo[21]
    return geo[5] // groups, geo[0] * sample_span(geo), geo[1] // groups * geo[6] * geo[7] * geo[8]


@helper
def flt_row(g, m, geo, n0):
    O = geo[9] * geo[10] * geo[11]
    return (g * (geo[5] // geo[21]) + m) * O, geo[5] * O


@helper
def flt_col(g, col, geo, n0):
    """(offset of x[0, g*Cg + c, d0, h0, w0], d0, h0, w0) for col = c*TRS + tap: (d0, h0, w0) = (t*dd - pd,
    r*dh - ph, s*dw - pw), the position output 0 reads at the tap (the offset may be negative)."""
    H, W, T, R, S = geo[3], geo[4], geo[6], geo[7], geo[8]
    s = col % S
    r = (col // S) % R
    t = (col // (S * R)) % T
    c = col // (S * R * T)
    d0, h0, w0 = t * geo[15] - geo[18], r * geo[16] - geo[19], s * geo[17] - geo[20]
    return (g * (geo[1] // geo[21]) + c) * geo[2] * H * W + (d0 * H + h0) * W + w0, d0, h0, w0


@helper
def flt_load_x(x, cb, r, geo, tab, ok):
    D, H, W = geo[2], geo[3], geo[4]
    n, o = r
    return gather(x, n * geo[1] * D * H * W + cb[0], cb[1], cb[2], cb[3], tab, uint64(o) * uint64(gemm.TAB), D, H, W,
                  ok & (o < uint32(geo[9] * geo[10] * geo[11])))


@helper
def flt_store(partial, bias, g, m, col, v, geo, flag, split, n0):
    """partial (splits, K, C/g*TRS): split s's sum; with one split this is dw itself."""
    K = geo[5]
    ncol = geo[1] // geo[21] * geo[6] * geo[7] * geo[8]
    partial[(split * K + g * (K // geo[21]) + m) * ncol + col] = v


def reduce_splits_kernel(partial, out, splits, size):
    """out[i] = sum over s of partial[s*size + i], s in order. Thread i (grid-stride) owns out[i]."""
    for i in range(cuda.grid(1), size, cuda.gridsize(1)):
        total = partial[i]
        for s in range(1, splits):
            total += partial[s * size + i]
        out[i] = total


OPS = {
    "forward": gemm.Ops(fwd_dims, fwd_row, strided_a, fwd_col_taps, fwd_load_tap, fwd_store, a_along_j=True),
    "forward_wide": gemm.Ops(fwd_dims, fwd_row, strided_a, fwd_col, fwd_load_x, fwd_store, a_along_j=True),
    "backward_data": gemm.Ops(bwd_dims, bwd_row, bwd_load_w, bwd_col, bwd_load_dy, bwd_store, select=bwd_select),
    "backward_filter": gemm.Ops(flt_dims, flt_row, by_sample, flt_col, flt_load_x, flt_store, seek=sample_seek,
                                step=sample_step, a_along_j=True, b_along_j=("128x128",)),
}


def no_table():
    """The table argument of GEMMs whose loaders read none (one zero row)."""
    return device_constant(("no-table",), lambda: np.zeros(gemm.TAB, np.int32))


def int32_table(rows):
    """The loaders' table as int32 (gather adds and compares its offsets in 32 bits), with BJ zero rows after the
    last: a loader reads its row without a mask (gather), and a step reads up to BJ - 1 rows past a problem's last
    reduction index. An input sample, a sample of dy or a group's weights too large for 32-bit offsets is refused,
    never indexed wrong."""
    if rows.size and max(rows.max(), -rows.min()) > np.iinfo(np.int32).max:
        raise ValueError(f"algo='direct' on CUDA indexes one sample and a group's weights with 32-bit offsets, and "
                         f"this layer needs offsets up to {max(rows.max(), -rows.min())} (more than 2**31 - 1): "
                         f"use algo='im2col'")
    return np.concatenate([rows, np.zeros(gemm.TAB * gemm.BJ, rows.dtype)]).astype(np.int32)


def reduction_table(g, primitive):
    """The loaders' table (TAB int32 per row, flat; gather's rows: (delta, od, oh, ow, -)) of forward's
    j = c*TRS + tap: od, oh, ow = t*dd, r*dh, s*dw, delta = c*DHW + (od*H + oh)*W + ow and tap (fwd_load_tap's
    bit), or of backward_filter's output o = (p*Q + q)*U + u of j = n*span + o: od, oh, ow = p*sd, q*sh, u*sw and
    delta = (od*H + oh)*W + ow (backward_data's: subpixel_table). A device constant: built and uploaded once per GPU
    and table key (a new batch size reuses it)."""
    if primitive == "backward_filter":
        def make_outputs():  # written in place as int32 (~28 bytes of host memory per row at the peak, not ~150)
            table = np.zeros((g.P * g.Q * g.U + gemm.BJ, gemm.TAB), np.int32)  # (int32_table's BJ zero rows)
            rows = table[:g.P * g.Q * g.U].reshape(g.P, g.Q, g.U, gemm.TAB)
            od, oh, ow = (np.arange(n, dtype=np.int64) * s for n, s in ((g.P, g.stride_d), (g.Q, g.stride_h),
                                                                          (g.U, g.stride_w)))
            od, oh, ow = od[:, None, None], oh[None, :, None], ow[None, None, :]
            delta = (od * g.H + oh) * g.W + ow
            if delta.size and delta.max() > np.iinfo(np.int32).max:
                int32_table(delta.ravel())  # (raises: supports() keeps layers this large away)
            rows[..., 0], rows[..., 1], rows[..., 2], rows[..., 3] = delta, od, oh, ow
            return table.ravel()

        key = (g.P, g.Q, g.U, g.stride_d, g.stride_h, g.stride_w, g.H, g.W)
        return device_constant(("output-table",) + key, make_outputs)

    def make():
        trs = g.T * g.R * g.S
        c, tap = np.divmod(np.arange(g.C // g.groups * trs, dtype=np.int64), trs)
        od, oh, ow = tap // (g.R * g.S) * g.dil_d, (tap // g.S) % g.R * g.dil_h, tap % g.S * g.dil_w
        delta = c * g.D * g.H * g.W + (od * g.H + oh) * g.W + ow
        return int32_table(np.stack([delta, od, oh, ow, tap], axis=1).ravel())

    # keyed by what the table depends on (not the batch size, so a new batch size reuses it)
    key = (g.C // g.groups, g.T, g.R, g.S, g.dil_d, g.dil_h, g.dil_w, g.D, g.H, g.W)
    return device_constant(("reduction-table",) + key, make)


def subpixel_table(g):
    """backward_data's table (bwd_select): SUBPIXEL ints per class of subpixel_classes (its class row, then the
    table offset of its first tap row), then each class's rows: row j = kk*len(taps) + i is
    (kk*O + (off_d*Q + off_h)*U + off_w, off_d, off_h, off_w, kk*Cg*TRS + tap) for taps[i] = (tap, off_d, off_h,
    off_w)."""
    classes = subpixel_classes(g)

    def make():
        heads, rows = [], []
        first = len(classes) * SUBPIXEL
        for cls, taps in classes:
            heads.append((*cls, first))
            if taps:
                kk = np.repeat(np.arange(g.K // g.groups, dtype=np.int64), len(taps))
                tap, off_d, off_h, off_w = np.tile(np.array(taps, np.int64), (g.K // g.groups, 1)).T
                delta = kk * g.P * g.Q * g.U + (off_d * g.Q + off_h) * g.U + off_w
                rows.append(np.stack([delta, off_d, off_h, off_w,
                                      kk * (g.C // g.groups) * g.T * g.R * g.S + tap], axis=1).ravel())
                first += rows[-1].size
        return int32_table(np.concatenate([np.array(heads, np.int64).ravel()] + rows))

    key = (g.K // g.groups, g.C // g.groups, g.T * g.R * g.S, g.P, g.Q, g.U, tuple(classes))
    return device_constant(("subpixel-table",) + key, make)


def dims(g, primitive):
    Kg, Cg, O, TRS = g.K // g.groups, g.C // g.groups, g.P * g.Q * g.U, g.T * g.R * g.S
    return {"forward": (Kg, Cg * TRS, g.N * O), "backward_data": (Cg, Kg * TRS, g.N * g.D * g.H * g.W),
            "backward_filter": (Kg, g.N * span(g), Cg * TRS)}[primitive]


# backward_filter's output table (reduction_table) holds at most this many rows, one per output position of a sample:
# 20 bytes each on the device, ~28 bytes while NumPy builds it (a 16384 x 16384 output plane: 5.4 GB and 7.5 GB).
OUTPUT_TABLE_ROWS = 1 << 28
# backward_filter's cursor (sample_seek) holds a position in a sample's span as a uint32 and steps it by up to BJ.
SPAN_LIMIT = 2**32 - 1 - gemm.BJ


def beyond_cursor(g):
    """Why the weight gradient's 32-bit cursor (direct's and im2col's loaders) cannot walk g's samples, or None."""
    if span(g) > SPAN_LIMIT:
        return f"its weight gradient walks a sample's {g.P * g.Q * g.U:,} output positions with a 32-bit cursor"
    return None


def supports(g, primitive):
    """None when direct's kernels can index the problem, else why not (a ValueError before any launch)."""
    why = indexing.beyond32(g) or gemm.beyond_grid(dims(g, primitive)[0])
    if primitive == "forward":  # the table's largest offset (reduction_table, subpixel_table)
        reach = ((g.C // g.groups - 1) * g.D * g.H * g.W
                 + ((g.T - 1) * g.dil_d * g.H + (g.R - 1) * g.dil_h) * g.W + (g.S - 1) * g.dil_w)
    elif primitive == "backward_filter":
        reach = ((g.P - 1) * g.stride_d * g.H + (g.Q - 1) * g.stride_h) * g.W + (g.U - 1) * g.stride_w
    else:  # (a bound: kk * P*Q*U plus a class's offset within a dy plane)
        reach = g.K // g.groups * g.P * g.Q * g.U
    if why is None and reach >= 2**31:
        why = (f"its table holds 32-bit offsets within a sample and a group, and this layer reaches {reach:,} "
               f"elements")
    if why is None and primitive == "backward_filter":
        O = g.P * g.Q * g.U
        why = beyond_cursor(g)
        if why is None and O > OUTPUT_TABLE_ROWS:
            why = (f"its weight gradient's table would hold a row per output position, {O:,} (at most "
                   f"{OUTPUT_TABLE_ROWS:,})")
    return why


def tile_names(itemsize):
    """direct's tiles: the GEMM's, and gemm.THIN for problems of few rows (output or input channels per group)."""
    return gemm.tile_names(itemsize, thin=True)


def tile_for(g, primitive, itemsize=4, workspace_limit=None):
    """The tile the launcher runs without an explicit tile= (gemm.choose_tile on the problem; backward_data's
    sub-pixel classes launch together, so on the largest class with classes x groups blocks per tile position;
    backward_filter fills the GPU by split-K, so its tile need not)."""
    M, _, NCOL = dims(g, primitive)
    groups = g.groups
    if primitive == "backward_data":
        classes = subpixel_classes(g)
        NCOL, groups = g.N * max(cls[3] * cls[4] * cls[5] for cls, _ in classes), groups * len(classes)
    return gemm.choose_tile(M, NCOL, groups, primitive == "backward_filter", itemsize, thin=True)


def filter_splits(g, itemsize, workspace_limit, tile=None):
    """Splits of backward_filter's reduction: enough blocks to fill the GPU, each split >= MIN_SPLIT long,
    and the partial sums (splits x K x C/g*TRS) under workspace_limit."""
    M, J, NCOL = dims(g, "backward_filter")
    blocks = math.prod(gemm.grid(M, NCOL, g.groups, 1, tile or tile_for(g, "backward_filter", itemsize)))
    splits = max(1, min(TARGET_BLOCKS // blocks, J // MIN_SPLIT))
    limit = DEFAULT_WORKSPACE_LIMIT if workspace_limit is None else workspace_limit
    per_split = g.K * NCOL * itemsize
    while splits > 1 and splits * per_split > limit:
        splits -= 1
    return splits


def workspace_bytes(g, primitive, itemsize, workspace_limit, tile=None):
    if primitive != "backward_filter":
        return 0
    splits = filter_splits(g, itemsize, workspace_limit, tile)
    return splits * g.K * dims(g, primitive)[2] * itemsize if splits > 1 else 0


def launch_tiled(ops, a, b, out, bias, tab, geo, shape, groups, flag, splits, stream, n0=0, tile=None):
    """Launch the tiled GEMM kernel of `ops` on a problem of `shape` = (M, J, NCOL) per group with `tile` (None:
    gemm.choose_tile's); arrays are flattened to 1-D."""
    M, J, NCOL = shape
    tile = tile or gemm.choose_tile(M, NCOL, groups, itemsize=out.dtype.itemsize)
    jchunk = -(-J // splits)
    jchunk = -(-jchunk // gemm.BJ) * gemm.BJ
    kernel, args = gemm.tiled_kernel(numba_dtype(out.dtype), ops, tile), (flat(a), flat(b), flat(out), bias, tab, geo)
    for grid, z0 in gemm.launches(gemm.grid(M, NCOL, groups, splits, tile)):
        launch(kernel, grid, gemm.TILES[tile].threads, stream, *args, flag, splits, jchunk, n0, z0)


def _bias_arg(bias, like):
    if bias is not None:
        return bias, 1
    return device_constant(("zero", like.dtype.str), lambda: np.zeros(1, like.dtype)), 0


def forward(x, w, bias, y, g, workspace_limit=None, stream=0, tile=None):
    """OPS["forward"] (each column's tap mask) for filters of at most MASK_TAPS taps, else OPS["forward_wide"]."""
    bias, flag = _bias_arg(bias, y)
    ops = OPS["forward" if g.T * g.R * g.S <= MASK_TAPS else "forward_wide"]
    launch_tiled(ops, w, x, y, bias, reduction_table(g, "forward"), tuple(g), dims(g, "forward"),
                 g.groups, flag, 1, stream, tile=tile or tile_for(g, "forward", y.dtype.itemsize))


def backward_data(dy, w, dx, g, workspace_limit=None, stream=0, tile=None):
    """One launch of a GEMM per sub-pixel class of dx positions (subpixel_classes), sized for the largest."""
    bias, _ = _bias_arg(None, dx)
    classes = subpixel_classes(g)
    shape = (g.C // g.groups, g.K // g.groups * max(cls[6] for cls, _ in classes),
             g.N * max(cls[3] * cls[4] * cls[5] for cls, _ in classes))
    launch_tiled(OPS["backward_data"], w, dy, dx, bias, subpixel_table(g), tuple(g), shape, g.groups * len(classes),
                 0, 1, stream, tile=tile or tile_for(g, "backward_data", dx.dtype.itemsize))


def backward_filter(x, dy, dw, g, workspace_limit=None, stream=0, tile=None):
    tile = tile or tile_for(g, "backward_filter", dw.dtype.itemsize)
    splits = filter_splits(g, dw.dtype.itemsize, workspace_limit, tile)
    bias, _ = _bias_arg(None, dw)
    target = dw if splits == 1 else scratch(splits * dw.size, dw.dtype, dw, stream)
    launch_tiled(OPS["backward_filter"], dy, x, target, bias, reduction_table(g, "backward_filter"), tuple(g),
                 dims(g, "backward_filter"), g.groups, 0, splits, stream, tile=tile)
    if splits > 1:
        blocks = max(1, min(-(-dw.size // 256), 1024))
        launch(reduce_splits_kernel, blocks, 256, stream, target, flat(dw), splits, dw.size)
