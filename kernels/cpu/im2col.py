"""im2col + BLAS on the CPU (contract: kernels/contract.py).

x (N, C, D, H, W) * w (K, C/g, T, R, S) -> y (N, K, P, Q, U). Per group g, with O = P*Q*U output positions and
a column block cols (CTRS = C/g*T*R*S, nb, B) holding B output positions [o0, o0 + B) of nb samples [n0, n0 + nb):

    forward:          y[n0:n0+nb, g, :, o0:o0+B] = (W_g (K/g, CTRS) @ cols (CTRS, nb*B)) as (K/g, nb, B), transposed
    backward_data:    dcols (CTRS, nb*B) = W_g^T @ dy[n0:n0+nb, g, :, o0:o0+B] (staged as (K/g, nb*B));
                      dx = col2im(dcols) as a gather (no races)
    backward_filter:  dW_g (K/g, CTRS) += dy block (K/g, nb*B) @ cols^T, blocks in a fixed order (deterministic)

A pointwise problem (1x1 kernel, unit stride, no padding: g.is_pointwise) needs no columns, its column matrix
is x itself: per sample and group y = W_g @ x, dx = W_g^T @ dy, dW_g += dy @ x^T (samples in order). Nor does a
kernel that covers the whole unpadded input (g.covers_input: one output position per sample, whose column is the
sample): per group, over the batch, Y (N, K/g) = X (N, CTRS) @ W_g^T, dX = dY @ W_g, dW_g = dY^T @ X.

The GEMMs run through blas.matmul (NumPy's OpenBLAS, its parts on cnnfast's threads), one per block: a large
product rather than one per sample. A layer with few column-matrix rows (CTRS <= FUSED_ROWS: a network's first
layer, a 1-D layer) runs its forward and weight gradient in chunks instead: B positions of one sample each, every
thread building its chunks' columns (im2col_cpu's serial build) and multiplying them by OpenBLAS's cblas on that
thread, as one Numba parallel region (forward_chunks_cpu, filter_chunks_cpu); the weight gradient sums each thread's
chunks, then the threads' sums in thread order.

Blocks hold whole samples when one fits, else B < O positions of one sample; the scratch (cols, staging of the
other GEMM operand or result; the chunks' columns) stays under workspace_limit (default 256 MiB). im2col_cpu: one
task per (column-matrix row (c, t, r, s), sample); col2im_cpu: one task per (sample, c, input row), or per
(sample, c) plane. Where a layer keeps the width at unit strides along H and W ('same' padding), both move each
output plane of a column row as one contiguous run (x's plane shifted by a constant offset) instead of row by row.
"""
import numba
import numpy as np
from cnnfast.kernels.contract import DEFAULT_WORKSPACE_LIMIT
from cnnfast.kernels.cpu import blas, memory
from cnnfast.kernels.cpu.direct import geometry_args, out_range, tap_output
from cnnfast.kernels.cpu.threads import parallel, sized

# Forward blocks of whole samples with at least this many output positions run one GEMM per sample straight
# into y (no staging copy): 7-14% faster at 56x56 and 112x112 on the 2-core box, slower below ~32x32.
DIRECT_STORE_POSITIONS = 1024
# Blocks take no more whole samples than fit this much scratch (but always at least one whole sample when
# workspace_limit allows it): glibc serves larger buffers with a fresh mmap that is page-faulted on every call
# (ResNet stem forward: 15.9 -> 13.3 ms on the 2-core box), and bigger blocks were no faster.
PREFERRED_SCRATCH = 16 << 20
# A sample whose block scratch exceeds this runs in blocks of positions of about this much (when that leaves at
# least SPLIT_POSITIONS positions a block): a block of a whole large sample, fresh from mmap on every call, cost its
# page faults and cache misses (2026-12-06, batch 1, ms whole / 32 MiB blocks: 3x3 64->64 @256 input gradient 49.1 /
# 29.8; 5x5 32->64 @256 forward 57.1 / 43.8, input gradient 70.8 / 39.0, weight gradient 58.3 / 44.2; 3x3x3 32->64
# @32^3 forward 30.5 / 27.6, input gradient 33.3 / 24.7; within 3% elsewhere, never slower beyond the noise).
SAMPLE_SCRATCH = 32 << 20
SPLIT_POSITIONS = 4096
# col2im_cpu's shifted path (one task per (sample, channel) plane) needs at least this many planes to share out
# over the cores; below it the row tasks (one per dx row) keep every core busy.
SHIFTED_TASKS = 16
# The weight gradient's product of a block is computed transposed, (CTRS, K/g) = cols @ dy^T, when that is the
# taller way round and small enough to add into dW transposed at no cost: BLAS was 12-25% faster so on these
# products with a long inner axis (the ResNet stem's 64 x 147 over 12,544 positions, WaveNet's 64 x 192 over
# 32,000; 2026-12-06). (A large one, 512 x 4608, took 16 ms to add transposed.)
TRANSPOSED_PRODUCT = 1 << 16
# A layer whose column matrix has at most FUSED_ROWS rows (C/g*T*R*S: the ResNet stem's 147, WaveNet's 192, a 3x3
# layer's up to 64 channels) runs its forward and weight gradient in chunks of one sample's output positions,
# every thread building its chunks' columns and multiplying them on one OpenBLAS thread (one Numba region calling
# cblas, blas.gemm_region; where cblas is not found, the column blocks): one chunk's columns are built while
# another's GEMM runs, and OpenBLAS splits a product with a short inner axis poorly over its threads. A chunk holds
# about CHUNK_BYTES of columns, fewer positions when that leaves a thread less than two chunks, but at least
# CHUNK_POSITIONS; the problem has at least FUSED_WORK multiply-adds (without chunks, 2026-12-06:
# MobileNetV2's first layer at batch 1, ~11M, 1.0-1.1x slower; the stem and WaveNet 1.1-1.2x). Against columns on
# Numba's threads then one GEMM on OpenBLAS's (2026-12-06, 2-core box, time before / after, forward and weight
# gradient): batch 4, the stem 1.15x / 1.24x, WaveNet 1.17x / 1.35x, 3x3 16->32 @112 1.28x / 1.33x, 1x1 stride 2
# 256->512 @56 1.25x / 1.18x, 400-432 rows 1.08-1.11x, 576 rows 1.01-1.06x, 768-864 rows 0.95-1.11x, 1152 and 2304
# rows 0.85-0.94x; batch 1, 1.06-1.19x with chunks of 784-3,136 positions, 0.87-0.95x with 196 (1x1 s2 256->512).
# The chunks ran on Python threads (blas.share, ~100 us a call) until 2026-12-07; as one Numba region, ms forward /
# weight gradient, before -> after: MobileNetV2's first layer (3x3 s2 3->32 @224) batch 1 0.51 / 0.59 -> 0.24 / 0.35,
# batch 8 2.19 / 2.92 -> 2.00 / 2.68; the ResNet stem batch 1 1.65 / 1.74 -> 1.44 / 1.57, batch 4 5.86 / 6.06 ->
# 5.38 / 5.63; 3x3 16->32 @112 batch 1 1.13 / 1.14 -> 0.92 / 0.92; WaveNet batch 4 7.83 / 8.51 -> 7.37 / 7.92.
FUSED_ROWS = 576
CHUNK_BYTES = 2 << 20
CHUNK_POSITIONS = 256
FUSED_WORK = 1 << 22
# A 1x1 layer's weight gradient computes up to this many samples' products as one stack (blas.matmul shares the
# stack out over the cores), then adds them in sample order: 1x1 256->64 @56 batch 4, 2.45 -> 2.25 ms against
# one product at a time (2026-12-06).
POINTWISE_STACK = 8


@parallel()
def im2col_cpu(x, n0, c0, cols, taps, o0, sd, sh, sw, dd, dh, dw_, pd, ph, pw, Q, U):
    """cols[row, i, j] for row = ((c*T + t)*R + r)*S + s, sample n = n0 + i and output position
    o = o0 + j = (p*Q + q)*U + u: x[n, c0 + c, p*sd - pd + t*dd, q*sh - ph + r*dh, u*sw - pw + s*dw], or 0
    outside x. taps = (T, R, S). One task per (row, sample).

    When the block holds whole samples and the layer keeps the width at unit strides along H and W (U == W: a
    3x3 'same' layer), each output plane p of a row is x's plane shifted by a constant flat offset, so its rows
    that read inside x are one contiguous copy, then the columns that read the padding are zeroed (_shifted_plane):
    2.5-3.7x faster than row by row on 7x7 to 28x28 planes (bench/RESULTS.md, 2026-12-05). Otherwise each output
    row (p, q) of the block is zeros / a copy of an x row (unit stride when sw == 1) / zeros (_row_runs)."""
    _, _, D, H, W = x.shape
    T, R, S = taps[0], taps[1], taps[2]
    rows, nb, B = cols.shape
    P = B // (Q * U)
    shifted = o0 == 0 and B == P * Q * U and sh == 1 and sw == 1 and U == W
    for task in numba.prange(rows * nb):
        row, i = task // nb, task % nb
        s = row % S
        r = (row // S) % R
        t = (row // (S * R)) % T
        c = row // (S * R * T)
        u_lo, u_hi = out_range(pw, s * dw_, sw, W, U)  # the outputs u whose tap s reads inside x
        xc = x[n0 + i, c0 + c]
        dst = cols[row, i]
        if shifted:
            q_lo, q_hi = out_range(ph, r * dh, 1, H, Q)  # the output rows q whose tap r reads inside x
            xf = xc.reshape(D * H * W)
            for p in range(P):
                di = p * sd - pd + t * dd
                inside = 0 <= di < D and u_lo < u_hi
                _shifted_plane(dst[p * Q * U:(p + 1) * Q * U], xf, (di * H + r * dh - ph) * W + s * dw_ - pw,
                               q_lo, q_hi if inside else q_lo, u_lo, u_hi, U)
        else:
            _row_runs(dst, xc, o0, t * dd - pd, r * dh - ph, s * dw_ - pw, sd, sh, sw, u_lo, u_hi, Q, U)


@numba.njit(inline="always")
def _shifted_plane(plane, xf, shift, q_lo, q_hi, u_lo, u_hi, U):
    """plane[q*U + u] = xf[q*U + u + shift] for q_lo <= q < q_hi and u_lo <= u < u_hi (U == W; u_lo < u_hi when
    q_lo < q_hi), else 0: the rows [q_lo, q_hi) are copied as one run from their first read to their last (every
    index of it inside xf), then their columns outside [u_lo, u_hi), which read the neighbouring rows, are zeroed."""
    n = plane.size
    for k in range(q_lo * U):
        plane[k] = 0.0
    tail = plane[q_hi * U:]
    for k in range(n - q_hi * U):
        tail[k] = 0.0
    if q_hi <= q_lo:
        return
    first, last = q_lo * U + u_lo, (q_hi - 1) * U + u_hi
    run, src = plane[first:last], xf[first + shift:]
    for k in range(last - first):
        run[k] = src[k]
    _zero_outside_columns(plane, q_lo, q_hi, u_lo, u_hi, U)


@numba.njit(inline="always")
def _row_runs(dst, xc, o0, d0, h0, w0, sd, sh, sw, u_lo, u_hi, Q, U):
    """dst[j] for the block's outputs o0 + j = (p*Q + q)*U + u: xc[p*sd + d0, q*sh + h0, u*sw + w0], or 0 outside
    xc (which reads inside for u_lo <= u < u_hi); output row by output row. Indices are cast to uint64 (never
    negative here): a signed index costs Numba's negative-index wrap-around on every access."""
    D, H = xc.shape[0], xc.shape[1]
    B = dst.size
    p, q, u0 = o0 // (U * Q), (o0 // U) % Q, o0 % U  # the block's first output
    j = 0
    while j < B:
        seg = min(U - u0, B - j)  # outputs u0 .. u0 + seg of output row (p, q): dst[j:j + seg]
        di, hi = p * sd + d0, q * sh + h0
        a = min(max(u_lo - u0, 0), seg)  # dst[j + a:j + b] reads inside xc
        b = min(max(u_hi - u0, a), seg)
        if di < 0 or di >= D or hi < 0 or hi >= H:
            a = b = seg
        for k in range(a):
            dst[np.uint64(j + k)] = 0.0
        if b > a:
            line, start = xc[di, hi], u0 * sw + w0
            if sw == 1:
                for k in range(a, b):
                    dst[np.uint64(j + k)] = line[np.uint64(start + k)]
            else:
                for k in range(a, b):
                    dst[np.uint64(j + k)] = line[np.uint64(start + k * sw)]
        for k in range(b, seg):
            dst[np.uint64(j + k)] = 0.0
        j += seg
        u0 = 0
        q += 1
        if q == Q:
            q = 0
            p += 1


@parallel()
def col2im_cpu(dcols, dx, n0, c0, taps, o0, sd, sh, sw, dd, dh, dw_, pd, ph, pw, P, Q, U, by_plane):
    """dx[n0 + i, c0 + c, i_d, ih, l] += sum over taps (t, r, s) that read (i_d, ih, l) from an output
    o = (p*Q + q)*U + u in this block [o0, o0 + B) of dcols[((c*T + t)*R + r)*S + s, i, o - o0]. A gather: every
    element sums its terms in (t, r, s) order, each dx element written by one task (no races, deterministic).

    by_plane, on im2col_cpu's shifted path (whole samples, U == W, unit strides along H and W; the launcher asks
    for it when there are at least SHIFTED_TASKS (sample, channel) planes): one task per plane, adding each tap's
    dcols plane to dx shifted by its constant flat offset as one contiguous run, after zeroing the dcols columns
    that read the padding (which the run would add to the neighbouring rows; dcols is scratch, and adding +0.0
    leaves every sum's bits unchanged: a sum from +0.0 is never -0.0). Otherwise one task per dx row (sample i, c,
    i_d, ih): each tap's run of outputs is added along the row (every sw-th element; each tap's run [lo, hi) found
    once per call, 10-40% faster than per row on 4x4 stride-2 and 5x5 layers, 2026-12-06)."""
    _, _, D, H, W = dx.shape
    T, R, S = taps[0], taps[1], taps[2]
    rows, nb, B = dcols.shape
    Cg = rows // (T * R * S)
    if by_plane and o0 == 0 and B == P * Q * U and sh == 1 and sw == 1 and U == W:
        for task in numba.prange(nb * Cg):
            c, i = task % Cg, task // Cg
            dxf = dx[n0 + i, c0 + c].reshape(D * H * W)
            for t in range(T):
                for r in range(R):
                    q_lo, q_hi = out_range(ph, r * dh, 1, H, Q)
                    for s in range(S):
                        u_lo, u_hi = out_range(pw, s * dw_, 1, W, U)
                        src = dcols[((c * T + t) * R + r) * S + s, i]
                        for p in range(P):
                            di = p * sd - pd + t * dd
                            if 0 <= di < D and q_lo < q_hi and u_lo < u_hi:
                                _add_shifted_plane(src[p * Q * U:(p + 1) * Q * U], dxf,
                                                   (di * H + r * dh - ph) * W + s * dw_ - pw, q_lo, q_hi, u_lo, u_hi, U)
        return
    reach = np.empty((S, 2), np.int64)  # [lo, hi) of the outputs u whose tap s reads inside a dx row
    for s in range(S):
        reach[s, 0], reach[s, 1] = out_range(pw, s * dw_, sw, W, U)
    for task in numba.prange(nb * Cg * D * H):
        ih = task % H
        i_d = (task // H) % D
        c = (task // (H * D)) % Cg
        i = task // (H * D * Cg)
        dxrow = dx[n0 + i, c0 + c, i_d, ih]
        for t in range(T):
            p = tap_output(i_d, pd, t * dd, sd, P)
            if p < 0:
                continue
            for r in range(R):
                q = tap_output(ih, ph, r * dh, sh, Q)
                if q < 0:
                    continue
                first = (p * Q + q) * U - o0  # this output row's u = 0 in the block's columns
                for s in range(S):  # dxrow[u*sw + s*dw - pw] += the tap's column at u (indices >= 0: unsigned)
                    src, at = dcols[((c * T + t) * R + r) * S + s, i], s * dw_ - pw
                    for u in range(max(reach[s, 0], -first), min(reach[s, 1], B - first)):
                        dxrow[np.uint64(u * sw + at)] += src[np.uint64(first + u)]


@numba.njit(inline="always")
def _zero_outside_columns(plane, q_lo, q_hi, u_lo, u_hi, U):
    """plane[q*U + u] = 0 for q_lo <= q < q_hi and u outside [u_lo, u_hi): the columns whose tap reads the padding."""
    for q in range(q_lo, q_hi):
        line = plane[q * U:(q + 1) * U]
        for k in range(u_lo):
            line[k] = 0.0
        for k in range(u_hi, U):
            line[np.uint64(k)] = 0.0


@numba.njit(inline="always")
def _add_shifted_plane(plane, dxf, shift, q_lo, q_hi, u_lo, u_hi, U):
    """dxf[q*U + u + shift] += plane[q*U + u] for q_lo <= q < q_hi and u_lo <= u < u_hi (q_lo < q_hi, u_lo < u_hi,
    U == W): plane's columns outside [u_lo, u_hi) are zeroed, then the rows are added as one run from their first
    term to their last (every index of it inside dxf; the zeroed columns add 0 to the neighbouring rows)."""
    _zero_outside_columns(plane, q_lo, q_hi, u_lo, u_hi, U)
    first, last = q_lo * U + u_lo, (q_hi - 1) * U + u_hi
    run, dst = plane[first:last], dxf[first + shift:]
    for k in range(last - first):
        dst[k] += run[k]


def _scratch(g, primitive, itemsize, nb, B):
    """Bytes of scratch for blocks of nb samples x B positions: cols/dcols (CTRS, nb*B), a (K/g, nb*B) staging
    block for the other side of the GEMM (forward's result, or dy when it is not one contiguous view), and
    backward_filter's (K/g, CTRS) product."""
    rows, Kg = (g.C // g.groups) * g.T * g.R * g.S, g.K // g.groups
    product = Kg * rows if primitive == "backward_filter" else 0
    return ((rows + Kg) * nb * B + product) * itemsize


def _block(g, primitive, itemsize, workspace_limit):
    """(nb, B): as many whole samples as fit workspace_limit and PREFERRED_SCRATCH (at least one), else the most
    positions B of one sample (at least 1) within workspace_limit and SAMPLE_SCRATCH."""
    limit = DEFAULT_WORKSPACE_LIMIT if workspace_limit is None else workspace_limit
    O = g.P * g.Q * g.U
    fixed = _scratch(g, primitive, itemsize, 1, 0)
    per_position = _scratch(g, primitive, itemsize, 1, 1) - fixed
    fit = (limit - fixed) // per_position  # positions that fit
    preferred = (SAMPLE_SCRATCH - fixed) // per_position
    if O > preferred >= SPLIT_POSITIONS:
        fit = min(fit, preferred)
    if fit >= O:
        preferred = (PREFERRED_SCRATCH - fixed) // (per_position * O)
        return int(min(g.N, fit // O, max(1, preferred))), O
    return 1, int(max(1, fit))


def _pointwise_stack(g, itemsize, workspace_limit):
    """How many samples' (K/g, C/g) weight-gradient products a 1x1 layer holds at once: up to POINTWISE_STACK
    within workspace_limit (at least one)."""
    limit = DEFAULT_WORKSPACE_LIMIT if workspace_limit is None else workspace_limit
    return int(max(1, min(g.N, POINTWISE_STACK, limit // ((g.K // g.groups) * (g.C // g.groups) * itemsize))))


def _pointwise_batch(g, itemsize, workspace_limit):
    """Whether a 1x1 layer's weight gradient is one GEMM over the batch (its operands copied, (K/g + C/g) x N*O,
    within workspace_limit): where a sample's product is larger than its operands, K/g * C/g > O * (K/g + C/g)
    (the small maps of a network's last stage), as the stack of products (POINTWISE_STACK) costs its adds. 2026-12-06,
    batch 8: 512->2048 @7 11.0-11.6 -> 5.5-5.9 ms, 320->1280 @7 3.0-3.3 -> 1.7 ms (1024->256 @14 unchanged); a survey's
    prototype was 1.1-2.1x faster wherever the rule holds on six layers, 1.3-1.7x slower where it does not (128->512
    @28, 64->256 @56)."""
    Kg, Cg, O = g.K // g.groups, g.C // g.groups, g.P * g.Q * g.U
    limit = DEFAULT_WORKSPACE_LIMIT if workspace_limit is None else workspace_limit
    return Kg * Cg > O * (Kg + Cg) and (Kg + Cg) * g.N * O * itemsize <= limit


def _chunk_scratch(g, primitive, itemsize, B, threads):
    """Bytes of scratch for chunks of B positions on `threads` threads: each thread's columns (CTRS, B), and for
    backward_filter its product and its sums of products per group (K/g x CTRS each)."""
    rows, Kg = (g.C // g.groups) * g.T * g.R * g.S, g.K // g.groups
    products = (1 + g.groups) * Kg * rows if primitive == "backward_filter" else 0
    return threads * (rows * B + products) * itemsize


def _chunk(g, primitive, itemsize, workspace_limit):
    """B, the output positions per chunk when the problem runs in chunks side by side (FUSED_ROWS), else 0:
    ceil(O / B) chunks per sample and group, of equal size but the last, their count a multiple of the threads'."""
    rows, O, threads = (g.C // g.groups) * g.T * g.R * g.S, g.P * g.Q * g.U, blas.threads()
    if (primitive == "backward_data" or g.is_pointwise or g.covers_input or rows > FUSED_ROWS or threads == 1
            or g.N * g.K * rows * O < max(1, FUSED_WORK)  # (nothing to compute: an empty batch)
            or blas.cblas() is None or (not blas.cblas()[2] and max(O, g.K) > blas.LP64_SIZE)):
        return 0
    samples = g.groups * g.N  # (group, sample) pairs, each cut into per_sample chunks
    per_sample = max(-(-O // max(1, CHUNK_BYTES // (rows * itemsize))), -(-2 * threads // samples))
    while samples * per_sample % threads:  # as many chunks for every thread
        per_sample += 1
    B = -(-O // per_sample)
    limit = DEFAULT_WORKSPACE_LIMIT if workspace_limit is None else workspace_limit
    if B < CHUNK_POSITIONS or _chunk_scratch(g, primitive, itemsize, B, threads) > limit:
        return 0
    return B


def _chunks(g, B):
    """(chunks, 4) int64 rows (grp, n, o0, b) in a fixed order: the chunks of b = B output positions [o0, o0 + b) of
    sample n and group grp (fewer at a sample's end)."""
    O = g.P * g.Q * g.U
    return np.array([(grp, n, o0, min(B, O - o0)) for grp in range(g.groups) for n in range(g.N)
                     for o0 in range(0, O, B)], np.int64).reshape(-1, 4)


def _taps(g):
    """The kernel's taps (T, R, S) as the CPU kernels take them."""
    return np.array([g.T, g.R, g.S], np.int64)


def workspace_bytes(g, primitive, itemsize, workspace_limit):
    B = _chunk(g, primitive, itemsize, workspace_limit)
    if B:
        return _chunk_scratch(g, primitive, itemsize, B, blas.threads())
    if g.covers_input:
        return 0
    if g.is_pointwise:
        if primitive != "backward_filter":
            return 0
        if _pointwise_batch(g, itemsize, workspace_limit):
            return (g.K + g.C) // g.groups * g.N * g.P * g.Q * g.U * itemsize
        return _pointwise_stack(g, itemsize, workspace_limit) * (g.K // g.groups) * (g.C // g.groups) * itemsize
    return _scratch(g, primitive, itemsize, *_block(g, primitive, itemsize, workspace_limit))


def _blocks(g, primitive, itemsize, workspace_limit):
    """blocks() yielding (n0, nb, o0, B) in a fixed order (made as they are used: a small workspace_limit makes
    N x O / B of them, whose list outgrew the limit many times over), the column-matrix rows CTRS, and the
    scratch buffer."""
    nb, B = _block(g, primitive, itemsize, workspace_limit)
    O = g.P * g.Q * g.U

    def blocks():
        for n0 in range(0, g.N, nb):
            for o0 in range(0, O, B):
                yield n0, min(nb, g.N - n0), o0, min(B, O - o0)
    scratch = memory.pooled_empty(_scratch(g, primitive, itemsize, nb, B), np.uint8)  # (32 MiB or more: pooled)
    return blocks, (g.C // g.groups) * g.T * g.R * g.S, scratch


def _views(buf, dtype, *shapes):
    """Consecutive arrays of the given shapes carved out of the scratch buffer."""
    out, at = [], 0
    for shape in shapes:
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        out.append(buf[at:at + size].view(dtype).reshape(shape))
        at += size
    return out


def _column_blocks(x, g, primitive, workspace_limit):
    """For each group and block, in a fixed order: (grp, n0, nb, o0, B, cols, stage, product), views of one
    scratch buffer: cols (CTRS, nb, B) filled by im2col_cpu, stage (K/g, nb, B), and backward_filter's
    product (K/g, CTRS) (empty otherwise)."""
    Kg, Cg = g.K // g.groups, g.C // g.groups
    blocks, rows, buf = _blocks(g, primitive, x.itemsize, workspace_limit)
    taps = _taps(g)
    args = geometry_args(g)[:9]
    product_shape = (Kg, rows) if primitive == "backward_filter" else (0,)
    for grp in range(g.groups):
        for n0, nb, o0, B in blocks():
            cols, stage, product = _views(buf, x.dtype, (rows, nb, B), (Kg, nb, B), product_shape)
            sized(im2col_cpu, cols.size)(x, n0, grp * Cg, cols, taps, o0, *args, g.Q, g.U)
            yield grp, n0, nb, o0, B, cols, stage, product


def _pointwise(a, g):
    """a (N, C or K, ...) as (N, groups, channels per group, positions)."""
    return a.reshape(g.N, g.groups, -1, g.P * g.Q * g.U)


def _samples(a, g):
    """a (N, C or K, ...) as (groups, N, the group's elements of a sample): per group, a sample per row."""
    return a.reshape(g.N, g.groups, -1).transpose(1, 0, 2)


def forward(x, w, bias, y, g, workspace_limit=None):
    Kg, Cg, O = g.K // g.groups, g.C // g.groups, g.P * g.Q * g.U
    w2 = w.reshape(g.groups, Kg, Cg * g.T * g.R * g.S)
    if g.covers_input:
        for grp in range(g.groups):
            blas.matmul(_samples(x, g)[grp], w2[grp].T, _samples(y, g)[grp])
    elif g.is_pointwise:
        for grp in range(g.groups):
            blas.matmul(w2[grp], _pointwise(x, g)[:, grp], _pointwise(y, g)[:, grp])
    elif B := _chunk(g, "forward", x.itemsize, workspace_limit):
        _forward_chunks(x, w2, y.reshape(g.N, g.groups, Kg, O), g, B)
    else:
        y2 = y.reshape(g.N, g.groups, Kg, O)
        for grp, n0, nb, o0, B, cols, stage, _ in _column_blocks(x, g, "forward", workspace_limit):
            if B == O and (nb == 1 or O >= DIRECT_STORE_POSITIONS):  # one GEMM per sample, into y
                blas.matmul(w2[grp], cols.transpose(1, 0, 2), y2[n0:n0 + nb, grp])
            else:
                blas.matmul(w2[grp], cols.reshape(-1, nb * B), stage.reshape(Kg, nb * B))
                y2[n0:n0 + nb, grp, :, o0:o0 + B] = stage.transpose(1, 0, 2)
    if bias is not None:
        y += bias.reshape(1, -1, 1, 1, 1)


def _dy_block(dy2, grp, n0, nb, o0, B, stage):
    """dy[n0:n0+nb, grp, :, o0:o0+B] as a (K/g, nb*B) GEMM operand (a view when nb == 1, else staged)."""
    if nb == 1:
        return dy2[n0, grp, :, o0:o0 + B]
    stage[...] = dy2[n0:n0 + nb, grp, :, o0:o0 + B].transpose(1, 0, 2)
    return stage.reshape(stage.shape[0], nb * B)


def backward_data(dy, w, dx, g, workspace_limit=None):
    Kg, Cg, O = g.K // g.groups, g.C // g.groups, g.P * g.Q * g.U
    w2t = w.reshape(g.groups, Kg, Cg * g.T * g.R * g.S).transpose(0, 2, 1)
    if g.covers_input:
        for grp in range(g.groups):
            blas.matmul(_samples(dy, g)[grp], w2t[grp].T, _samples(dx, g)[grp])
        return
    if g.is_pointwise:
        for grp in range(g.groups):
            blas.matmul(w2t[grp], _pointwise(dy, g)[:, grp], _pointwise(dx, g)[:, grp])
        return
    blocks, rows, buf = _blocks(g, "backward_data", dx.itemsize, workspace_limit)
    taps = _taps(g)
    dy2 = dy.reshape(g.N, g.groups, Kg, O)
    dx[...] = 0
    args = geometry_args(g)[:9]
    for grp in range(g.groups):
        for n0, nb, o0, B in blocks():
            dcols, stage = _views(buf, dx.dtype, (rows, nb, B), (Kg, nb, B))
            blas.matmul(w2t[grp], _dy_block(dy2, grp, n0, nb, o0, B, stage), dcols.reshape(rows, nb * B))
            sized(col2im_cpu, dcols.size)(dcols, dx, n0, grp * Cg, taps, o0, *args, g.P, g.Q, g.U,
                                          nb * Cg >= SHIFTED_TASKS)


def backward_filter(x, dy, dw, g, workspace_limit=None):
    Kg, Cg, O = g.K // g.groups, g.C // g.groups, g.P * g.Q * g.U
    dw2 = dw.reshape(g.groups, Kg, Cg * g.T * g.R * g.S)
    if g.covers_input:
        for grp in range(g.groups):
            blas.matmul(_samples(dy, g)[grp].T, _samples(x, g)[grp], dw2[grp])
        return
    if g.is_pointwise and _pointwise_batch(g, dw.itemsize, workspace_limit):
        # dW_g = dy_g (K/g, N*O) @ x_g^T (N*O, C/g): one GEMM over the batch, the operands copied batch-inner
        dy_t, x_t = np.empty((Kg, g.N, O), dw.dtype), np.empty((Cg, g.N, O), dw.dtype)
        for grp in range(g.groups):
            dy_t[...] = _pointwise(dy, g)[:, grp].transpose(1, 0, 2)
            x_t[...] = _pointwise(x, g)[:, grp].transpose(1, 0, 2)
            blas.matmul(dy_t.reshape(Kg, g.N * O), x_t.reshape(Cg, g.N * O).T, dw2[grp])
        return
    dw2[...] = 0
    if g.is_pointwise:  # dW_g += dy_n @ x_n^T: a stack of samples' products at a time (blas splits it), in order
        products = np.empty((_pointwise_stack(g, dw.itemsize, workspace_limit), Kg, Cg), dw.dtype)
        for grp in range(g.groups):
            for n0 in range(0, g.N, len(products)):
                nb = min(len(products), g.N - n0)
                blas.matmul(_pointwise(dy, g)[n0:n0 + nb, grp], _pointwise(x, g)[n0:n0 + nb, grp].transpose(0, 2, 1),
                            products[:nb])
                for product in products[:nb]:
                    dw2[grp] += product
        return
    dy2 = dy.reshape(g.N, g.groups, Kg, O)
    rows = dw2.shape[2]
    transposed = Kg < rows and Kg * rows <= TRANSPOSED_PRODUCT
    if B := _chunk(g, "backward_filter", x.itemsize, workspace_limit):
        _backward_filter_chunks(x, dy2, dw2, g, B, transposed)
        return
    for grp, n0, nb, o0, B, cols, stage, product in _column_blocks(x, g, "backward_filter", workspace_limit):
        dy_block, cols = _dy_block(dy2, grp, n0, nb, o0, B, stage), cols.reshape(rows, nb * B)
        if transposed:  # dW_g^T (CTRS, K/g) += cols @ dy^T
            blas.matmul(cols, dy_block.T, product.reshape(rows, Kg))
            dw2[grp] += product.reshape(rows, Kg).T
        elif n0 == o0 == 0:  # the group's first block: straight into dW_g
            blas.matmul(dy_block, cols.T, dw2[grp])
        else:
            blas.matmul(dy_block, cols.T, product)
            dw2[grp] += product


_im2col_serial = im2col_cpu.serial  # (a jitted kernel calls it by a global name)


@numba.njit(inline="always")
def _chunk_columns(x, scratch, chunk, rows, taps, sd, sh, sw, dd, dh, dw_, pd, ph, pw, Q, U):
    """The (CTRS, b) columns of chunk (grp, n, o0, b), built in scratch (a task's) by im2col_cpu's serial build."""
    grp, n, o0, b = chunk[0], chunk[1], chunk[2], chunk[3]
    cols = scratch[:rows * b].reshape(rows, 1, b)
    _im2col_serial(x, n, grp * (rows // (taps[0] * taps[1] * taps[2])), cols, taps, o0, sd, sh, sw, dd, dh, dw_, pd,
                   ph, pw, Q, U)
    return cols.reshape(rows, b)


@parallel()
def forward_chunks_cpu(address, ilp64, one, x, w2, y2, scratch, chunks, taps, sd, sh, sw, dd, dh, dw_, pd, ph, pw,
                       Q, U):
    """y2[n, grp, :, o0:o0 + b] (K/g, b) = w2[grp] (K/g, CTRS) @ the columns (CTRS, b) of each chunk (grp, n, o0, b)
    of the table chunks, straight into y2 (N, groups, K/g, O): task k of len(scratch) builds its chunks k, k + tasks,
    ... in scratch[k] and multiplies them by the cblas ?gemm at address (64-bit sizes when ilp64; blas.gemm_region)."""
    tasks, Kg, rows, O = len(scratch), w2.shape[1], w2.shape[2], y2.shape[3]
    for k in numba.prange(tasks):
        for j in range(k, len(chunks), tasks):
            grp, n, o0, b = chunks[j, 0], chunks[j, 1], chunks[j, 2], chunks[j, 3]
            cols = _chunk_columns(x, scratch[k], chunks[j], rows, taps, sd, sh, sw, dd, dh, dw_, pd, ph, pw, Q, U)
            blas.gemm(address, ilp64, one, blas.NO_TRANS, blas.NO_TRANS, Kg, b, rows, w2[grp], rows, cols, b,
                      y2[n, grp, :, o0:], O)


@parallel()
def filter_chunks_cpu(address, ilp64, one, x, dy2, sums, summed, products, scratch, chunks, transposed, taps, sd, sh,
                      sw, dd, dh, dw_, pd, ph, pw, Q, U):
    """sums[k, grp] = the sum over task k's chunks (grp, n, o0, b) of group grp, in order, of dy chunk (K/g, b) @
    cols^T (K/g, CTRS), or when transposed of cols @ dy^T (CTRS, K/g); dy2 (N, groups, K/g, O). Task k of
    len(scratch) takes chunks k, k + tasks, ... (columns in scratch[k]; a product after the task's first of its group
    in products[k], then added) and sets summed[k, grp] (False before) where sums[k, grp] holds one."""
    tasks, Kg, O, ldc = len(scratch), dy2.shape[2], dy2.shape[3], sums.shape[3]
    rows = sums.shape[2] if transposed else ldc
    for k in numba.prange(tasks):
        for j in range(k, len(chunks), tasks):
            grp, n, o0, b = chunks[j, 0], chunks[j, 1], chunks[j, 2], chunks[j, 3]
            cols = _chunk_columns(x, scratch[k], chunks[j], rows, taps, sd, sh, sw, dd, dh, dw_, pd, ph, pw, Q, U)
            into = products[k] if summed[k, grp] else sums[k, grp]
            if transposed:  # (CTRS, K/g) = cols (CTRS, b) @ dy^T
                blas.gemm(address, ilp64, one, blas.NO_TRANS, blas.TRANS, rows, Kg, b, cols, b, dy2[n, grp, :, o0:], O,
                          into, ldc)
            else:  # (K/g, CTRS) = dy (K/g, b) @ cols^T
                blas.gemm(address, ilp64, one, blas.NO_TRANS, blas.TRANS, Kg, rows, b, dy2[n, grp, :, o0:], O, cols, b,
                          into, ldc)
            if summed[k, grp]:
                sums[k, grp] += into
            summed[k, grp] = True


def _forward_chunks(x, w2, y2, g, B):
    """y chunk (K/g, b) = W_g @ its columns (CTRS, b), straight into y; thread k takes chunks k, k + threads, ..."""
    threads, chunks = blas.threads(), _chunks(g, B)
    scratch = np.empty((threads, w2.shape[2] * B), x.dtype)
    blas.gemm_region(forward_chunks_cpu, g.N * g.K * w2.shape[2] * g.P * g.Q * g.U, x.dtype, x, w2, y2, scratch,
                     chunks, _taps(g), *geometry_args(g)[:9], g.Q, g.U)


def _backward_filter_chunks(x, dy2, dw2, g, B, transposed):
    """dW_g = the sum over chunks of dy chunk (K/g, b) @ cols^T (or its transpose, cols @ dy^T): thread k sums its
    chunks k, k + threads, ... in order, then the threads' sums are added in thread order (deterministic for a
    given thread count)."""
    threads, chunks, (_, Kg, rows) = blas.threads(), _chunks(g, B), dw2.shape
    scratch = np.empty((threads, rows * B), x.dtype)
    shape = (rows, Kg) if transposed else (Kg, rows)
    sums, products = np.empty((threads, g.groups) + shape, x.dtype), np.empty((threads,) + shape, x.dtype)
    summed = np.zeros((threads, g.groups), np.bool_)
    blas.gemm_region(filter_chunks_cpu, g.N * g.K * rows * g.P * g.Q * g.U, x.dtype, x, dy2, sums, summed, products,
                     scratch, chunks, transposed, _taps(g), *geometry_args(g)[:9], g.Q, g.U)
    for grp in range(g.groups):
        for k in range(threads):
            if summed[k, grp]:
                dw2[grp] += sums[k, grp].T if transposed else sums[k, grp]
