"""Winograd F(4x4, 3x3) on the CPU: T x 3 x 3 convolutions (2-D 3x3; 3-D with any number T of depth taps) with unit
stride and dilation (contract: kernels/contract.py).

Lavin and Gray's minimal filtering (arXiv:1509.09308), interpolation points 0, +-1, +-2 and infinity. Each 6x6
input tile d gives a 4x4 output tile, y_tile = A^T [(G w G^T) . (B^T d B)] A, summed over input channels in the
transformed domain, so the 36 products of a tile become 36 GEMMs over channels: 36 multiply-adds per 16 outputs
and (k, c) against 144 for im2col (4x fewer), plus transforms that read and write each tensor about once. A 3-D
layer transforms each depth slice of x alone (along height and width); the depth taps stay a plain sum, which the
GEMMs' inner axis takes with the channels: output slice p = sum over t < T and c of Wt[t, c] x input slice
p - pad_d + t (2-D: T = P = 1).

Tiles: t = (n*TH + i)*TW + j for tile row i < TH = ceil(Q/4), column j < TW = ceil(U/4) of every slice; tile
(n, i, j) of slice d reads x[n, :, d, 4i - pad_h : 4i - pad_h + 6, 4j - pad_w : 4j - pad_w + 6] (zero outside x)
and writes y[n, :, p, 4i : 4i + 4, 4j : 4j + 4] (clipped to Q x U). A block is a run of whole tile rows
[r0, r0 + nr) of every slice, columns = nr*TW:

    weights (one GEMM stack)  w (K, C/g, T, 3, 3) -> Wt (36, groups, K/g, T*C/g) = G w G^T, kron(G, G) @ taps
    input_transform_cpu       x (N, C, D, H, W) -> V (36, groups, P+T-1, C/g, columns) = B^T d B, the slices
                                                   zero-padded in depth, depth-major   task per (c, slice, rows)
    BLAS (one stack of GEMMs)                      M (36, K, P, columns): M[xi, grp's k, p] = Wt[xi, grp] @
                                                   V[xi, grp, p : p+T] as (T*C/g, columns), uniform row stride
    output_transform_cpu      M              -> y (N, K, P, Q, U) = A^T M A          task per (k, slice, rows)

backward_data at unit stride is the same convolution of dy with the filter flipped and transposed
(w'[c, k] = w[k, c] rotated 180 degrees in all three axes) and padding 2 - pad (T - 1 - pad_d in depth;
negative: dy is cropped), producing dx. backward_filter differentiates the forward form through the transforms
(the non-fused Winograd weight gradient): with U = G w G^T, dL/dU = sum over tiles of (A e A^T) . (B^T d B) for
each 4x4 tile e of dy (zero beyond Q x U) and the input tile its tap reads, so

    input_transform_cpu       x                -> V (36, C, D, columns)              channel-major, unpadded
    grad_transform_cpu        dy (N, K, P, Q, U) -> E (36, K, P, columns)    = A e A^T  task per (k, slice, rows)
    BLAS, blocks added in order                   dU[t] (36, groups, K/g, C/g) += E[:, grp, slices p] @
                                                  V[:, grp, slices p - pad_d + t]^T, one stack per depth tap t
    one GEMM stack                                dw[:, :, t] = G^T dU[t] G, kron(G, G)^T @ dU[t]

The GEMMs run through blas.matmul, which shares a stack out over the cores (18 of Winograd's 36 per thread on
two). The transforms' fixed rounding is why float32 results differ from the reference by ~1e-5 of the largest
value (GEMM algorithms: ~1e-6), inside cnnfast.compare's 1e-4; every sum runs in a fixed order (deterministic).
"""
from functools import lru_cache

import numba
import numpy as np
from cnnfast.kernels.contract import DEFAULT_WORKSPACE_LIMIT
from cnnfast.kernels.cpu import blas, im2col, memory
from cnnfast.kernels.cpu.im2col import PREFERRED_SCRATCH
from cnnfast.kernels.cpu.threads import parallel, sized

TILE = 4                  # outputs per tile side, m in F(m x m, 3x3)
TASK_TILES = 256          # tiles per transform task at most (whole tile rows): its 36 runs stay in cache
ALPHA = TILE + 2          # input tile side, m + r - 1
XI = ALPHA * ALPHA        # transformed-domain positions
# G (6 x 3) for the points 0, 1, -1, 2, -2, infinity (applied as kron(G, G) in the working dtype).
G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])


@numba.njit(inline="always")
def _bt(d0, d1, d2, d3, d4, d5, two, four, five):
    """B^T (d0 .. d5): the input transform of one tile line (B^T of the module docstring's points)."""
    return (four * d0 - five * d2 + d4, d3 + d4 - four * (d1 + d2), four * (d1 - d2) + d4 - d3,
            two * (d3 - d1) + d4 - d2, two * (d1 - d3) + d4 - d2, four * d1 - five * d3 + d5)


@numba.njit(inline="always")
def _at(m0, m1, m2, m3, m4, m5, two, four, eight):
    """A^T (m0 .. m5): the output transform of one tile line, 6 values -> 4 outputs."""
    a, b, c, d = m1 + m2, m1 - m2, m3 + m4, m3 - m4
    return m0 + a + c, b + two * d, a + four * c, b + eight * d + m5


@numba.njit(inline="always")
def _a(e0, e1, e2, e3, two, four, eight):
    """A (e0 .. e3), A = (A^T)^T: the gradient transform of one tile line, 4 values -> 6."""
    a, b = e0 + e2, e1 + e3
    c, d = e0 + four * e2, two * e1 + eight * e3
    return e0, a + b, a - b, c + d, c - d, e3


# Each 2-D transform runs as two 1-D passes: down the columns first, for a whole strip of tiles at once
# (unit-stride loops that LLVM vectorises), then across each tile's rows in registers. Indexing note: Numba
# checks every signed index for negative wrap-around unless LLVM can prove it is not negative, so the per-tile
# code indexes small views with constant indices and range() counters only (win[u, 3], out[2, j]): 25-40%
# faster than computed flat offsets, which kept ~50 checks per tile.

@numba.njit(inline="always")
def _put(out, j, o):
    """out[v, j] = o[v] for v = 0..5."""
    out[0, j] = o[0]
    out[1, j] = o[1]
    out[2, j] = o[2]
    out[3, j] = o[3]
    out[4, j] = o[4]
    out[5, j] = o[5]


@numba.njit(inline="always")
def _segment(segments, sg, TW):
    """(n, i0, i1, first column, tiles) of segment sg."""
    n, i0, i1, col = segments[sg, 0], segments[sg, 1], segments[sg, 2], segments[sg, 3]
    return n, i0, i1, col, (i1 - i0) * TW


@numba.njit(inline="always")
def _runs_out(buf, out, a, b, c, col, nt):
    """out[xi, a, b, c, col : col + nt] = buf[xi, :nt] for every xi: 36 runs of unit stride (out C-contiguous,
    indexed in full so that each run is one: a view's run of unknown stride copied element by element)."""
    for xi in range(XI):
        src, dst = buf[xi], out[xi, a, b, c, col:col + nt]
        for t in range(nt):
            dst[t] = src[t]


@parallel()
def input_transform_cpu(x, V, segments, TW, ph, pw, pd):
    """V[xi, c // Cg, d + pd, c % Cg, col + (i - i0)*TW + j] = (B^T e B)[xi // 6, xi % 6], e the 6x6 window of
    x[n, c, d] at (4i - ph, 4j - pw), for each segment (n, i0, i1, col) of tile rows and each input slice d that
    lands on one of V's slices (V: (36, C/Cg, slices, Cg, columns); depth-major for Cg = C/groups, channel-major
    for Cg = 1). One task per (c, d, segment): per tile row, its 6 input rows are copied once into a zero-padded
    strip and transformed down the columns (B^T strip, vectorised); each tile's 6 rows of that are transformed
    across into a task-local buffer (one run per xi, cache-resident), copied out to V in 36 runs of unit stride
    (36 scattered write streams straight to V ran 5-10x slower, every store missing its line)."""
    N, C, D, H, W = x.shape
    slices, Cg = V.shape[2], V.shape[3]
    two, four, five = x.dtype.type(2), x.dtype.type(4), x.dtype.type(5)
    width = TILE * TW + 2
    lo, hi = max(0, pw), min(width, W + pw)  # strip columns inside x: strip column e is x column e - pw
    nseg = segments.shape[0]
    d0 = max(0, -pd)  # the input slices V holds: [d0, d0 + nd)
    nd = max(0, min(D, slices - pd) - d0)
    for task in numba.prange(C * nd * nseg):
        c, d, sg = task // (nd * nseg), d0 + task // nseg % nd, task % nseg
        n, i0, i1, col, nt = _segment(segments, sg, TW)
        vt = np.empty((XI, nt), x.dtype)  # vt[xi, t] for this task's tiles t
        strip = np.empty((ALPHA, width), x.dtype)  # strip[u, e] = x[n, c, d, 4i - ph + u, e - pw] or 0
        down = np.empty((ALPHA, width), x.dtype)  # down[u, e] = (B^T strip)[u, e]
        for i in range(i0, i1):
            strip[:] = 0
            for u in range(ALPHA):
                row = TILE * i - ph + u
                if 0 <= row < H and lo < hi:
                    src, dst = x[n, c, d, row, lo - pw:hi - pw], strip[u, lo:hi]
                    for e in range(hi - lo):
                        dst[e] = src[e]
            s0, s1, s2, s3, s4, s5 = strip[0], strip[1], strip[2], strip[3], strip[4], strip[5]
            for e in range(width):
                _put(down, e, _bt(s0[e], s1[e], s2[e], s3[e], s4[e], s5[e], two, four, five))
            blk = vt[:, (i - i0) * TW:(i - i0 + 1) * TW]
            for j in range(TW):
                win = down[:, TILE * j:TILE * j + ALPHA]
                for u in range(ALPHA):
                    _put(blk[ALPHA * u:ALPHA * u + ALPHA], j, _bt(win[u, 0], win[u, 1], win[u, 2], win[u, 3],
                                                                  win[u, 4], win[u, 5], two, four, five))
        _runs_out(vt, V, c // Cg, d + pd, c % Cg, col, nt)


@parallel()
def output_transform_cpu(M, bias, y, segments, TW, check):
    """y[n, k, p, 4i + a, 4j + b] = bias[k] + (A^T m A)[a, b], m the 6x6 of M[:, k, p, col + (i - i0)*TW + j], for
    each segment (n, i0, i1, col) of tile rows, clipped to Q x U (bias: (K,), zeros for none). One task per
    (k, p, segment): down the columns for all its tiles at once (A^T m, 6 runs of M read per column, vectorised),
    then across each tile's 4 rows into an output-row buffer, whose rows are copied into y.
    check[task] = the sum of its outputs times 0: 0, or NaN when one of them is not finite."""
    N, K, P, Q, U = y.shape
    two, four, eight, zero = y.dtype.type(2), y.dtype.type(4), y.dtype.type(8), y.dtype.type(0)
    nseg = segments.shape[0]
    for task in numba.prange(K * P * nseg):
        k, p, sg = task // (P * nseg), task // nseg % P, task % nseg
        n, i0, i1, col, nt = _segment(segments, sg, TW)
        b, z = bias[k], zero
        down = np.empty((TILE, ALPHA, nt), y.dtype)  # down[a, v, t] = (A^T m)[a, v] of tile t
        for v in range(ALPHA):
            m0, m1 = M[v, k, p, col:col + nt], M[ALPHA + v, k, p, col:col + nt]
            m2, m3 = M[2 * ALPHA + v, k, p, col:col + nt], M[3 * ALPHA + v, k, p, col:col + nt]
            m4, m5 = M[4 * ALPHA + v, k, p, col:col + nt], M[5 * ALPHA + v, k, p, col:col + nt]
            d0, d1, d2, d3 = down[0, v], down[1, v], down[2, v], down[3, v]
            for t in range(nt):
                o = _at(m0[t], m1[t], m2[t], m3[t], m4[t], m5[t], two, four, eight)
                d0[t] = o[0]
                d1[t] = o[1]
                d2[t] = o[2]
                d3[t] = o[3]
        line = np.empty((TILE, TW, TILE), y.dtype)  # line[a, j, b]: output row 4i + a, column 4j + b
        for i in range(i0, i1):
            for a in range(TILE):
                rows = down[a, :, (i - i0) * TW:(i - i0 + 1) * TW]
                for j in range(TW):
                    r = _at(rows[0, j], rows[1, j], rows[2, j], rows[3, j], rows[4, j], rows[5, j], two, four, eight)
                    out = line[a, j]
                    out[0] = r[0] + b
                    out[1] = r[1] + b
                    out[2] = r[2] + b
                    out[3] = r[3] + b
            for a in range(min(TILE, Q - TILE * i)):
                src, dst = line[a].reshape(TILE * TW), y[n, k, p, TILE * i + a]
                for q in range(U):
                    dst[q] = src[q]
                    z += src[q] * zero
        check[task] = z


@parallel()
def grad_transform_cpu(dy, E, segments, TW):
    """E[xi, k, p, 0, col + (i - i0)*TW + j] = (A e A^T)[xi // 6, xi % 6], e the 4x4 tile of dy[n, k, p] at
    (4i, 4j) (zero beyond Q x U), for each segment (n, i0, i1, col) of tile rows. One task per (k, p, segment), laid out
    as input_transform_cpu: a zero-padded strip of 4 rows per tile row transformed down the columns (A strip, 6
    rows), then across each tile's 6 rows into a task-local buffer, copied out in 36 runs."""
    N, K, P, Q, U = dy.shape
    two, four, eight = dy.dtype.type(2), dy.dtype.type(4), dy.dtype.type(8)
    width = TILE * TW
    nseg = segments.shape[0]
    for task in numba.prange(K * P * nseg):
        k, p, sg = task // (P * nseg), task // nseg % P, task % nseg
        n, i0, i1, col, nt = _segment(segments, sg, TW)
        et = np.empty((XI, nt), dy.dtype)  # et[xi, t] for this task's tiles t
        strip = np.empty((TILE, width), dy.dtype)  # strip[a, e] = dy[n, k, p, 4i + a, e] or 0
        down = np.empty((ALPHA, width), dy.dtype)  # down[u, e] = (A strip)[u, e]
        for i in range(i0, i1):
            strip[:] = 0
            for a in range(min(TILE, Q - TILE * i)):
                src, dst = dy[n, k, p, TILE * i + a], strip[a, :U]
                for e in range(U):
                    dst[e] = src[e]
            s0, s1, s2, s3 = strip[0], strip[1], strip[2], strip[3]
            for e in range(width):
                _put(down, e, _a(s0[e], s1[e], s2[e], s3[e], two, four, eight))
            blk = et[:, (i - i0) * TW:(i - i0 + 1) * TW]
            for j in range(TW):
                win = down[:, TILE * j:TILE * j + TILE]
                for u in range(ALPHA):
                    _put(blk[ALPHA * u:ALPHA * u + ALPHA], j, _a(win[u, 0], win[u, 1], win[u, 2], win[u, 3],
                                                                 two, four, eight))
        _runs_out(et, E, k, p, 0, col, nt)


# ---------------------------------------------------------------- launchers

def supports(g, primitive):
    """None when F(4x4, 3x3) computes (g, primitive), else why not."""
    if (g.R, g.S) != (3, 3):
        return f"F(4x4, 3x3) needs a 3x3 filter across height and width, got {g.T}x{g.R}x{g.S}"
    if (g.stride_d, g.stride_h, g.stride_w, g.dil_d, g.dil_h, g.dil_w) != (1, 1, 1, 1, 1, 1):
        return (f"F(4x4, 3x3) needs unit stride and dilation, got stride ({g.stride_d}, {g.stride_h}, "
                f"{g.stride_w}), dilation ({g.dil_d}, {g.dil_h}, {g.dil_w})")
    return None


def _sides(g, primitive):
    """(input channels, output channels, output height, width, pad_h, pad_w) of the forward-form convolution."""
    if primitive != "backward_data":
        return g.C, g.K, g.Q, g.U, g.pad_h, g.pad_w
    return g.K, g.C, g.H, g.W, 2 - g.pad_h, 2 - g.pad_w


def _depth(g, primitive):
    """(input depth, output depth, depth pad) of the forward-form convolution: output slice p reads input slices
    p - pad + t (taps t < T; zero outside the input). backward_data's is that of its flipped filter."""
    if primitive != "backward_data":
        return g.D, g.P, g.pad_d
    return g.P, g.D, g.T - 1 - g.pad_d


def _tiles(g, primitive):
    """(TH, TW): tile rows and columns of one output slice."""
    _, _, Q, U, _, _ = _sides(g, primitive)
    return -(-Q // TILE), -(-U // TILE)


def tile_count(g, primitive):
    """Output tiles of all samples and output slices, N*P*TH*TW (the GEMMs' width)."""
    TH, TW = _tiles(g, primitive)
    return g.N * _depth(g, primitive)[1] * TH * TW


def _scratch(g, primitive, itemsize, rows):
    """Bytes over `rows` tile rows of every slice: forward and backward_data, Wt (36, cout, T*cin/g) and the copy of
    w's taps it is made from (weights()), V (36, cin, output depth + T - 1 padded input slices, columns) and M (36,
    cout, output depth, columns), the block's output check (cout x output depth values a segment, and their NaN
    mask) and a zero bias; backward_filter, dU and the block's products (T x 36 x K x C/g each; the products' room
    later holds the taps), dw's transposed copy, V (36, C, input depth, columns) and E (36, K, output depth,
    columns). And the block's segment table (at most 4 int64 a tile row)."""
    cin, cout = _sides(g, primitive)[:2]
    Din, P, _ = _depth(g, primitive)
    TW = _tiles(g, primitive)[1]
    taps = g.T * cout * (cin // g.groups) * itemsize  # one filter bank's taps (x 36 transformed)
    if primitive == "backward_filter":
        filters, columns, small = (2 * XI + 9) * taps, cin * Din + cout * P, 0
    else:
        filters, columns = (XI + (9 if _taps_copied(g, primitive) else 0)) * taps, cin * (P + g.T - 1) + cout * P
        small = rows * cout * P * (itemsize + 1) + cout * itemsize
    return filters + XI * columns * rows * TW * itemsize + rows * 32 + small


def _rows(g, primitive, itemsize, workspace_limit):
    """Tile rows per block: as many as fit workspace_limit, with V and M within PREFERRED_SCRATCH (at least one)."""
    limit = DEFAULT_WORKSPACE_LIMIT if workspace_limit is None else workspace_limit
    fixed = _scratch(g, primitive, itemsize, 0)
    per_row = _scratch(g, primitive, itemsize, 1) - fixed
    total = g.N * _tiles(g, primitive)[0]
    return int(max(1, min(total, (limit - fixed) // per_row, PREFERRED_SCRATCH // per_row)))


def workspace_bytes(g, primitive, itemsize, workspace_limit):
    return _scratch(g, primitive, itemsize, _rows(g, primitive, itemsize, workspace_limit))


@lru_cache(maxsize=None)
def _kron(dtype):
    """kron(G, G) (36 x 9): (G f G^T).ravel() = _kron @ f.ravel() for a 3x3 filter f."""
    return np.kron(G, G).astype(dtype)


def _taps_copied(g, primitive):
    """Whether weights() copies w's taps into its GEMM's order (a view for a forward with one depth tap)."""
    return primitive == "backward_data" or g.T > 1


def weights(w, g, primitive):
    """Wt (36, groups, cout/g, T*cin/g) of the forward-form convolution, columns (tap t, channel c): G f G^T of
    every 3x3 filter f (each depth tap's), one GEMM with the 36 x 9 matrix kron(G, G) over the taps ordered
    (group, cout/g, t, cin/g), written in Wt's layout. backward_data's filters are f[c, k] = w[k, c] rotated by 180
    degrees (the T*9 taps in reverse order)."""
    K, Cg = w.shape[:2]
    taps = w.reshape(g.groups, K // g.groups, Cg, g.T, 9)
    if primitive == "backward_data":  # (groups, C/g, K/g, T, 9)
        taps = taps.reshape(K, Cg, g.T * 9)[:, :, ::-1].reshape(g.groups, K // g.groups, Cg, g.T, 9)
        taps = taps.transpose(0, 2, 1, 3, 4)
    _, cout_g, cin_g = taps.shape[:3]
    filters = taps.transpose(0, 1, 3, 2, 4).reshape(-1, 9).T  # (9, groups*cout/g*T*cin/g)
    Wt = blas.matmul(_kron(w.dtype), filters, np.empty((XI, filters.shape[1]), w.dtype))
    return Wt.reshape(XI, g.groups, cout_g, g.T * cin_g)


def _segments(TH, TW, r0, nr):
    """(n, i0, i1, first column) of the block's tile rows [r0, r0 + nr) (tr = n*TH + i), split by sample and
    into runs of at most TASK_TILES tiles (whole rows): one transform task each per channel and slice."""
    rows = max(1, TASK_TILES // TW)
    out = []
    for tr in range(r0, r0 + nr):
        n, i = divmod(tr, TH)
        if out and out[-1][0] == n and out[-1][2] - out[-1][1] < rows:
            out[-1][2] = i + 1
        else:
            out.append([n, i, i + 1, (tr - r0) * TW])
    return np.array(out, np.int64)


def _scratch_views(dtype, *sizes):
    """1-D arrays of the given sizes carved out of one allocation. Allocated apart, the transforms' two or four
    buffers were handed back to the system at every call and page-faulted again at the next (glibc trims its heap
    when the freed space at its top exceeds twice its latest mmap threshold): 4.6 MB of faults per call at 3x3
    64@56, batch 4 (bench/RESULTS.md, 2026-12-05); one buffer of their total is reused, from memory's pool when it
    is 32 MiB or more (3x3 256@14 batch 16's weight gradient, 36 MiB: 15.3-19.3 -> 11.1-11.4 ms)."""
    return im2col._views(memory.pooled_empty(sum(sizes) * np.dtype(dtype).itemsize, np.uint8), dtype,
                         *((n,) for n in sizes))


def _slices(A, groups, lo, hi):
    """A (36, channels, slices, columns) -> its slices [lo, hi) as GEMM operands (36, groups, channels/groups,
    (hi - lo)*columns): a view (each channel's run of slices is contiguous)."""
    xi, channels, _, columns = A.shape
    return A.reshape(xi, groups, channels // groups, -1, columns)[:, :, :, lo:hi].reshape(
        xi, groups, channels // groups, (hi - lo) * columns)


def _convolve(x, Wt, bias, y, g, primitive, workspace_limit):
    """y (N, cout, P, Q, U) = the forward-form convolution of x (N, cin, Din, H, W) with the transformed filters
    Wt (36, groups, cout/g, T*cin/g) (module docstring), block by block. V holds the P + T - 1 zero-padded input
    slices depth-major, V[xi, grp, e, c, :] for slice e = d + pad, so that output slice p's operand, rows (t, c)
    = V[xi, grp, p + t, c, :], is one matrix of uniform row stride: M[xi, grp's channels, p] = Wt[xi, grp] @ it,
    a stack of 36*groups*P GEMMs into M (36, cout, P, columns). False when y holds a value that is not finite (the
    caller recomputes it: see forward)."""
    cin, cout, _, _, ph, pw = _sides(g, primitive)
    Din, P, pd = _depth(g, primitive)
    TH, TW = _tiles(g, primitive)
    groups, Kg = Wt.shape[1:3]
    Cg, slices = cin // groups, P + g.T - 1
    rows = _rows(g, primitive, x.itemsize, workspace_limit)
    V_buf, M_buf = _scratch_views(x.dtype, XI * cin * slices * rows * TW, XI * cout * P * rows * TW)
    bias = np.zeros(cout, x.dtype) if bias is None else bias
    total, finite = g.N * TH, True
    for r0 in range(0, total, rows):
        nr = min(rows, total - r0)
        segments = _segments(TH, TW, r0, nr)
        V = V_buf[:XI * cin * slices * nr * TW].reshape(XI, groups, slices, Cg, nr * TW)
        M = M_buf[:XI * cout * P * nr * TW].reshape(XI, cout, P, nr * TW)
        V[:, :, :max(0, pd)] = 0  # the padding slices
        V[:, :, max(0, pd + Din):] = 0
        sized(input_transform_cpu, V.size)(x, V, segments, TW, ph, pw, pd)
        # output slice p's operand starts at slice p, its rows (t, c) a channel's stride apart (a slice is Cg of them)
        operands = np.lib.stride_tricks.as_strided(V, (XI, groups, P, g.T * Cg, nr * TW), V.strides)
        blas.matmul(Wt[:, :, None], operands, M.reshape(XI, groups, Kg, P, -1).transpose(0, 1, 3, 2, 4))
        check = np.empty(cout * P * len(segments), x.dtype)
        sized(output_transform_cpu, M.size)(M, bias, y, segments, TW, check)
        finite = finite and not np.isnan(check).any()
    return finite


def forward(x, w, bias, y, g, workspace_limit=None):
    """Winograd, unless y holds a NaN or Inf: a tile's transforms spread a non-finite input (or filter) value
    over outputs whose windows do not hold it, so such a result is recomputed by im2col and non-finite values
    propagate exactly as in PyTorch. Whenever an output window holds one, some output of Winograd's is also
    non-finite (each tap's path through the transforms has a non-zero coefficient), so none is missed."""
    if not _convolve(x, weights(w, g, "forward"), bias, y, g, "forward", workspace_limit):
        im2col.forward(x, w, bias, y, g, workspace_limit)


def backward_data(dy, w, dx, g, workspace_limit=None):
    """As forward (im2col when the result holds a NaN or Inf)."""
    if not _convolve(dy, weights(w, g, "backward_data"), None, dx, g, "backward_data", workspace_limit):
        im2col.backward_data(dy, w, dx, g, workspace_limit)


def backward_filter(x, dy, dw, g, workspace_limit=None):
    """dw from dU (T, 36, groups, K/g, C/g) accumulated block by block (module docstring: per depth tap t, the
    product of dy's slices with the input slices they read through it); im2col's when dw holds a NaN or Inf
    (G^T dU G mixes all 36 transformed positions into every tap, where PyTorch's NaN reaches only the taps that
    read it)."""
    ranges = [(max(0, g.pad_d - t), min(g.P, g.D + g.pad_d - t)) for t in range(g.T)]  # slices tap t reads x for
    unread = np.ones(g.P, bool)  # dy slices no tap multiplies with x (only with depth padding): no GEMM sees them
    for p0, p1 in ranges:
        unread[p0:p1] = False
    if not np.isfinite(dy[:, :, unread]).all():  # (a NaN there makes dw NaN in PyTorch: NaN x padding)
        im2col.backward_filter(x, dy, dw, g, workspace_limit)
        return
    if g.N == 0:
        dw[...] = 0
        return
    TH, TW = _tiles(g, "backward_filter")
    Kg, Cg = g.K // g.groups, g.C // g.groups
    rows = _rows(g, "backward_filter", x.itemsize, workspace_limit)
    filters = g.T * XI * g.groups * Kg * Cg
    V_buf, E_buf, dU, product = _scratch_views(x.dtype, XI * g.C * g.D * rows * TW, XI * g.K * g.P * rows * TW,
                                               filters, filters)
    dU, product = dU.reshape(g.T, XI, g.groups, Kg, Cg), product.reshape(g.T, XI, g.groups, Kg, Cg)
    total = g.N * TH
    for r0 in range(0, total, rows):
        nr = min(rows, total - r0)
        segments = _segments(TH, TW, r0, nr)
        V = V_buf[:XI * g.C * g.D * nr * TW].reshape(XI, g.C, g.D, nr * TW)
        E = E_buf[:XI * g.K * g.P * nr * TW].reshape(XI, g.K, g.P, nr * TW)
        sized(input_transform_cpu, V.size)(x, V.reshape(XI, g.C, g.D, 1, -1), segments, TW, g.pad_h, g.pad_w, 0)
        sized(grad_transform_cpu, E.size)(dy, E.reshape(XI, g.K, g.P, 1, -1), segments, TW)
        for t, (p0, p1) in enumerate(ranges):  # dU[t] += dy slices [p0, p1) x the input slices tap t reads
            if p0 >= p1:  # tap t reads no input slice
                dU[t] = 0
                continue
            x_slices = _slices(V, g.groups, p0 - g.pad_d + t, p1 - g.pad_d + t).transpose(0, 1, 3, 2)
            blas.matmul(_slices(E, g.groups, p0, p1), x_slices, product[t] if r0 else dU[t])
            if r0:  # the first block wrote dU itself
                dU[t] += product[t]
    taps = product.reshape(-1)[:g.T * 9 * g.K * Cg].reshape(g.T, 9, g.K * Cg)  # (the products' room, free now)
    blas.matmul(_kron(x.dtype).T, dU.reshape(g.T, XI, g.K * Cg), taps)  # T x 9 x K*C/g
    dw[...] = taps.reshape(g.T, 9, g.K, Cg).transpose(2, 3, 0, 1).reshape(dw.shape)
    if dw.size and not (np.isfinite(dw.max()) and np.isfinite(dw.min())):  # (NaN reaches both; no mask made)
        im2col.backward_filter(x, dy, dw, g, workspace_limit)
