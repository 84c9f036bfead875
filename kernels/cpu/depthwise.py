"""Depthwise convolution on the CPU: groups == C, K = M*C (channel multiplier M >= 1).

x (N, C, D, H, W) * w (K, 1, T, R, S) -> y (N, K, P, Q, U); output channel k reads input channel k // M.
Memory-bound (T*R*S multiply-adds per output), so each task streams whole planes once:

    forward:         one task per (n, k) plane; each output row accumulates its taps into a U-long row.
    backward_data:   one task per (n, c) plane; dx row gathers dy rows of the M filters of channel c.
    backward_filter: direct's kernel (one task per k when C/groups == 1), a fixed-order sum over n, p, q.

With unit stride the wide kernels run instead (depthwise_wide_cpu for forward and backward_data,
depthwise_wide_filter_cpu): short rows made the row kernels spend most of their time starting loops (T*R*S
loops of U elements per output row), so each task pads its source plane once into scratch and makes each tap
ONE pass over the whole plane (3x3 depthwise 144 @56, batch 4, 2 cores: forward 3.5 -> 1.8 ms). So does a strided
forward of at least STRIDED_WIDE_POSITIONS outputs per plane, its padded plane split into stride-phase volumes
(every tap reads one of them at unit stride), where the row kernel gathered every sw-th input; and a strided input
gradient, by sub-pixel classes of dx positions, each the unit-stride correlation of dy with the taps that reach it
(depthwise_wide_classes_cpu), where the row kernel scattered into every sw-th dx element. Three taps a pass
(one load and store of the output for three multiply-adds; 1.1-1.3x faster than a tap a pass, 2026-12-06). Their
scratch is allocated once per run of planes, and a plane's tap weights are read in order (tap_weights) rather than
each from its index by three integer divisions, which took a third of a 14x14 plane's time.
On planes of at most LANES_POSITIONS positions a pass over one plane is mostly loop overhead (~60 multiply-adds
on 7x7), so the lanes kernels (depthwise_lanes_cpu, depthwise_lanes_filter_cpu) run LANES channels at a time, their
planes interleaved element by element in the same padded layout, the weights laid out per lane: each tap is one pass
over LANES planes. Interleaving took more time than the taps on 7x7 planes until each element's lanes were copied
in one inner loop, in and out (3x3 depthwise 960 @7, batch 8: 1.25x the wide kernel, 2026-12-07; the weight gradient
at stride 2, which took direct's kernel, 2.5x faster). Their scratch (about two planes per thread, LANES planes deep
for the lanes kernels) counts against workspace_limit; when it does not fit, the next family runs: lanes, wide, rows.
Non-finite values as the reference has them: the wide input gradient also multiplies dy's zero border, so a NaN or
inf weight takes the row kernel; the wide weight gradient also meets x past each row (dy 0 there), so a result that
is not finite is computed again by direct's kernel; the row forward skips the padding, whose products with a
non-finite weight are then set to NaN (direct.nan_where_nonfinite_taps_read_padding).
"""
import math
from functools import lru_cache

import numba
import numpy as np
from cnnfast.kernels.contract import DEFAULT_WORKSPACE_LIMIT
from cnnfast.kernels.cpu import direct
from cnnfast.kernels.cpu.direct import (
    CONTRACT,
    CONTRACT_REASSOC,
    geometry_args,
    out_range,
    tap_output,
)
from cnnfast.kernels.cpu.threads import njit, parallel, sized

# The lanes kernels (depthwise_lanes_cpu, depthwise_lanes_filter_cpu) interleave this many planes (a 16-float AVX-512
# vector; LLVM's loop vectorizer takes any multiple) and lay the weights out per lane for LANE_CHUNK positions.
LANES = 16
LANE_CHUNK = 16


@njit()
def tap_ranges(S, pw, dw_, sw, W, U):
    """(lo, hi): per tap s, the outputs u in [lo[s], hi[s]) whose tap reads inside a W-long input row."""
    lo, hi = np.empty(S, np.int64), np.empty(S, np.int64)
    for s in range(S):
        lo[s], hi[s] = out_range(pw, s * dw_, sw, W, U)
    return lo, hi


@parallel(fastmath=CONTRACT)
def depthwise_forward_cpu(x, w, bias, has_bias, y, sd, sh, sw, dd, dh, dw_, pd, ph, pw):
    N, C, D, H, W = x.shape
    K, _, T, R, S = w.shape
    _, _, P, Q, U = y.shape
    M = K // C
    lo, hi_ = tap_ranges(S, pw, dw_, sw, W, U)
    for plane in numba.prange(N * K):
        n, k = plane // K, plane % K
        c = k // M
        b = bias[k] if has_bias else 0.0
        for p in range(P):
            for q in range(Q):
                acc = y[n, k, p, q]  # accumulate the taps straight into the output row
                for u in range(U):
                    acc[u] = b
                for t in range(T):
                    di = p * sd - pd + t * dd
                    if di < 0 or di >= D:
                        continue
                    for r in range(R):
                        hi = q * sh - ph + r * dh
                        if hi < 0 or hi >= H:
                            continue
                        for s in range(S):
                            u0, u1 = lo[s], hi_[s]
                            base = s * dw_ - pw
                            wv = w[k, 0, t, r, s]
                            if sw == 1:  # vectorised (see direct.py)
                                xs = x[n, c, di, hi, u0 + base:u1 + base]
                                a = acc[u0:u1]
                                for i in range(xs.shape[0]):
                                    a[i] += wv * xs[i]
                            else:
                                for u in range(u0, u1):
                                    acc[u] += wv * x[n, c, di, hi, u * sw + base]


@parallel(fastmath=CONTRACT)
def depthwise_backward_data_cpu(dy, w, dx, sd, sh, sw, dd, dh, dw_, pd, ph, pw):
    N, C, D, H, W = dx.shape
    K, _, T, R, S = w.shape
    _, _, P, Q, U = dy.shape
    M = K // C
    lo, hi_ = tap_ranges(S, pw, dw_, sw, W, U)
    for plane in numba.prange(N * C):
        n, c = plane // C, plane % C
        for i_d in range(D):
            for ih in range(H):
                acc = dx[n, c, i_d, ih]  # gather the taps straight into the dx row
                for i in range(W):
                    acc[i] = 0.0
                for t in range(T):
                    p = tap_output(i_d, pd, t * dd, sd, P)
                    if p < 0:
                        continue
                    for r in range(R):
                        q = tap_output(ih, ph, r * dh, sh, Q)
                        if q < 0:
                            continue
                        for s in range(S):
                            u0, u1 = lo[s], hi_[s]
                            base = s * dw_ - pw
                            for m in range(M):
                                k = c * M + m
                                wv = w[k, 0, t, r, s]
                                ds = dy[n, k, p, q, u0:u1]
                                if sw == 1:
                                    a = acc[u0 + base:u1 + base]
                                    for i in range(ds.shape[0]):
                                        a[i] += wv * ds[i]
                                else:
                                    for u in range(u0, u1):
                                        acc[u * sw + base] += wv * ds[u - u0]


@numba.njit(inline="always")
def pad_plane(planes, rows, padded, pd, ph, pw, Hp, Wp, sd, sh, sw, lanes=1):
    """Planes planes[rows[l]] ((D, H, W) each) zero-padded and split into sd*sh*sw phase volumes of (Dp, Hp, Wp)
    (zeros outside the plane): element ((phase*Dp + a)*Hp + b)*Wp + e of plane l's volumes, phase = (fd*sh + fh)*sw
    + fw, is planes[rows[l], a*sd + fd - pd, b*sh + fh - ph, e*sw + fw - pw] where that is inside (unit strides: one
    volume, element (a*Hp + b)*Wp + e is planes[rows[l], a - pd, ...]). With lanes > 1 the volumes hold up to that
    many planes interleaved, element o of plane l at padded[o*lanes + l], each element's lanes copied in one inner
    loop (one plane at a time, the lanes kernels' copies of 7x7 planes took 2.4x as long: mostly starting short
    rows). Inlined in Numba's IR: LLVM left this body a call, and the strided input gradient of 7x7 dy planes ran
    10% slower."""
    _, D, H, W = planes.shape
    Dp = len(padded) // (sd * sh * sw * Hp * Wp * lanes)
    plane = planes[rows[0]]  # the one plane when lanes == 1 (indexed from planes and rows each row: 15% slower)
    for fd in range(sd):
        for fh in range(sh):
            for fw in range(sw):
                volume = ((fd * sh + fh) * sw + fw) * Dp
                if sw == 1:  # columns [lo, hi) of the phase hold plane columns e*sw + fw - pw
                    lo, hi = max(0, pw), min(Wp, pw + W)  # (no divisions: a third of a 7x7 plane's copy)
                else:
                    lo, hi = max(0, -((fw - pw) // sw)), min(Wp, -((fw - pw - W) // sw))
                for a in range(Dp):
                    i_d = a * sd + fd - pd
                    for b in range(Hp):
                        i_h = b * sh + fh - ph
                        if i_d < 0 or i_d >= D or i_h < 0 or i_h >= H:
                            continue
                        at = ((volume + a) * Hp + b) * Wp
                        line = plane[i_d, i_h]
                        if lanes == 1 and sw == 1:  # unsigned offsets: no negative-index wraparound, so LLVM
                            for e in range(lo, hi):  # vectorises
                                padded[np.uint64(at + e)] = line[np.uint64(e - pw)]
                        elif lanes == 1:
                            for e in range(lo, hi):
                                padded[np.uint64(at + e)] = line[np.uint64(e * sw + fw - pw)]
                        else:
                            for e in range(lo, hi):
                                base, column = np.uint64((at + e) * lanes), e * sw + fw - pw
                                for lane in range(len(rows)):
                                    padded[base + np.uint64(lane)] = planes[rows[lane], i_d, i_h, column]


@numba.njit(inline="always")
def move_lanes(wide, planes, j0, lanes, Hp, Wp, into_planes):
    """Between the lanes kernels' grid and planes planes[j0 + l] (l < lanes; (P, Q, U) each): element (p, q, u) of
    plane l is wide[((p*Hp + q)*Wp + u)*LANES + l]; into_planes copies the grid's into the planes, else the planes'
    into the grid. Each element's lanes in one inner loop, as pad_plane's."""
    _, P, Q, U = planes.shape
    for p in range(P):
        for q in range(Q):
            at = (p * Hp + q) * Wp
            for u in range(U):
                base = np.uint64((at + u) * LANES)
                for l in range(lanes):
                    if into_planes:
                        planes[j0 + l, p, q, u] = wide[base + np.uint64(l)]
                    else:
                        wide[base + np.uint64(l)] = planes[j0 + l, p, q, u]


@njit()
def tap_offsets(T, R, S, dd, dh, dw_, sd, sh, sw, Dp, Hp, Wp):
    """Per tap (t, r, s), in order: where it reads pad_plane's volumes, as an offset from the output's position on
    the wide grid: phase ((t*dd) % sd, ...) at ((t*dd) // sd, ...). (The kernels scale them by LANES as they read
    them: offsets LLVM sees are multiples of LANES made the lanes kernel 15-25% faster than the same offsets stored.)"""
    offsets = np.empty(T * R * S, np.int64)
    for tap in range(T * R * S):
        t, r, s = tap // (R * S), (tap // S) % R, tap % S
        phase = ((t * dd % sd) * sh + r * dh % sh) * sw + s * dw_ % sw
        offsets[tap] = ((phase * Dp + t * dd // sd) * Hp + r * dh // sh) * Wp + s * dw_ // sw
    return offsets


@njit()
def tap_weights(w, row, flip, out):
    """w[row, 0] into out[0 .. T*R*S) with its taps (t, r, s) in order; flip: each tap mirrored in every axis (the
    input gradient). (Loops, not a tap's (t, r, s) from its index: three integer divisions a tap were a third of a
    14x14 plane's time.)"""
    T, R, S = w.shape[2], w.shape[3], w.shape[4]
    tap = 0
    for t in range(T):
        for r in range(R):
            for s in range(S):
                out[tap] = w[row, 0, T - 1 - t, R - 1 - r, S - 1 - s] if flip else w[row, 0, t, r, s]
                tap += 1


@numba.njit(inline="always")
def three_taps(wide, padded, i, e, w0, w1, w2, a0, a1, a2):
    """The lanes forward's step: wide[i] += w0[e]*padded[i + a0], then w1's and w2's taps, in that order."""
    acc = wide[i]
    acc += w0[e] * padded[i + a0]
    acc += w1[e] * padded[i + a1]
    acc += w2[e] * padded[i + a2]
    wide[i] = acc


@parallel(fastmath=CONTRACT)
def depthwise_wide_cpu(src, w, bias, has_bias, dst, flip, pd, ph, pw, dd, dh, dw_, sd, sh, sw, planes):
    """Depthwise correlation, one task per run of `planes` destination planes (n, j) (their scratch allocated once):

        dst[n, j, p, q, u] = bias + sum over terms and taps of w[row, 0, t, r, s] * src[n, i, p*sd + t'*dd - pd, ...]

    forward (flip False):      src x, dst y; one term: i = j // M, row = j, t' = t (pd, ph, pw: the padding).
    backward_data (flip True): src dy, dst dx, unit strides; M terms: i = row = j*M + m, t' = T-1-t
                               (pd = (T-1)*dd - padding).
    The source plane is copied into zero-bordered scratch: at unit strides one volume (Dp, Hp, Wp) =
    (P + (T-1)*dd, ...), at strides (sd, sh, sw) its sd*sh*sw phase volumes (pad_plane) of (P + (T-1)*dd // sd, ...),
    where tap (t, r, s) reads phase ((t*dd) % sd, ...) at offset ((t*dd) // sd, ...); then each tap is one pass
    wide[o] += w * padded[o + offset] over the flattened (P, Hp, Wp) grid (the columns past U are computed and
    dropped), and the valid rows are copied out. Terms and taps in order."""
    N, Cs, D, H, W = src.shape
    _, Cd, P, Q, U = dst.shape
    K, _, T, R, S = w.shape
    M = K // min(Cs, Cd)
    terms = M if flip else 1
    Dp, Hp, Wp = P + (T - 1) * dd // sd, Q + (R - 1) * dh // sh, U + (S - 1) * dw_ // sw
    L = ((P - 1) * Hp + (Q - 1)) * Wp + U
    taps = T * R * S
    offsets = tap_offsets(T, R, S, dd, dh, dw_, sd, sh, sw, Dp, Hp, Wp)
    for run in numba.prange(-(-N * Cd // planes)):
        padded = np.zeros(sd * sh * sw * Dp * Hp * Wp, src.dtype)  # (pad_plane writes the same elements each plane)
        wide = np.empty(L, src.dtype)
        weights = np.empty(taps, w.dtype)
        source = np.empty(1, np.int64)  # (pad_plane's rows)
        for plane in range(run * planes, min(N * Cd, (run + 1) * planes)):
            n, j = plane // Cd, plane % Cd
            b = bias[j] if has_bias else 0.0
            for o in range(L):
                wide[np.uint64(o)] = b
            for m in range(terms):
                row = j * M + m if flip else j
                source[0] = row if flip else j // M
                pad_plane(src[n], source, padded, pd, ph, pw, Hp, Wp, sd, sh, sw)
                tap_weights(w, row, flip, weights)
                for tap in range(0, taps - taps % 3, 3):  # three taps a pass: fewer loads, stores and loop starts
                    w0, w1, w2 = weights[tap], weights[tap + 1], weights[tap + 2]
                    a0, a1, a2 = np.uint64(offsets[tap]), np.uint64(offsets[tap + 1]), np.uint64(offsets[tap + 2])
                    for o in range(L):
                        i_ = np.uint64(o)
                        acc = wide[i_]
                        acc += w0 * padded[i_ + a0]
                        acc += w1 * padded[i_ + a1]
                        acc += w2 * padded[i_ + a2]
                        wide[i_] = acc
                for tap in range(taps - taps % 3, taps):
                    wv, offset = weights[tap], np.uint64(offsets[tap])
                    for o in range(L):
                        wide[np.uint64(o)] += wv * padded[np.uint64(o) + offset]
            for p in range(P):
                for q in range(Q):
                    out = dst[n, j, p, q]
                    at = (p * Hp + q) * Wp
                    for u in range(U):
                        out[np.uint64(u)] = wide[np.uint64(at + u)]


@parallel(fastmath=CONTRACT)
def depthwise_lanes_cpu(src, w, bias, has_bias, dst, flip, pd, ph, pw, dd, dh, dw_, sd, sh, sw, samples):
    """depthwise_wide_cpu's correlation on small planes, LANES destination planes at a time: one task per block of
    LANES channels j0.. and run of `samples` samples. Per sample the block's source planes go interleaved into one
    zero-bordered scratch (pad_plane's volumes, element (o, l) at o*LANES + l), so each tap is ONE pass

        wide[o*LANES + l] += w[row(j0 + l), tap] * padded[(o + offset)*LANES + l]

    over the block's flattened grid, the weights laid out per lane for LANE_CHUNK positions at a time (a
    depthwise_wide_cpu pass over one 7x7 plane is ~60 multiply-adds: mostly loop overhead). Three taps a pass;
    terms and taps in order, as there. Lanes past the last channel hold zeros and are not written out."""
    N, Cs, D, H, W = src.shape
    _, Cd, P, Q, U = dst.shape
    K, _, T, R, S = w.shape
    M = K // min(Cs, Cd)
    terms = M if flip else 1
    taps = T * R * S
    Dp, Hp, Wp = P + (T - 1) * dd // sd, Q + (R - 1) * dh // sh, U + (S - 1) * dw_ // sw
    L = ((P - 1) * Hp + (Q - 1)) * Wp + U
    offsets = tap_offsets(T, R, S, dd, dh, dw_, sd, sh, sw, Dp, Hp, Wp)
    runs = -(-N // samples)
    for task in numba.prange(-(-Cd // LANES) * runs):
        j0, run = task // runs * LANES, task % runs
        lanes = min(LANES, Cd - j0)
        padded = np.zeros(sd * sh * sw * Dp * Hp * Wp * LANES, src.dtype)
        wide = np.empty(L * LANES, src.dtype)
        weights = np.zeros((terms, taps, LANE_CHUNK * LANES), src.dtype)  # [m, tap, q*LANES + l]: lane l's weight
        first = np.zeros(LANE_CHUNK * LANES, src.dtype)  # the bias, laid out the same way
        sources = np.empty(lanes, np.int64)  # (pad_plane's rows)
        for m in range(terms):
            for t in range(T):
                for r in range(R):
                    for s in range(S):
                        tap = (t * R + r) * S + s
                        for l in range(lanes):
                            k = (j0 + l) * M + m if flip else j0 + l
                            weights[m, tap, l] = w[k, 0, T - 1 - t, R - 1 - r, S - 1 - s] if flip else w[k, 0, t, r, s]
                        for e in range(LANES, LANE_CHUNK * LANES):  # (copies at a distance of LANES: vectorised)
                            weights[m, tap, e] = weights[m, tap, e - LANES]
        if has_bias:
            for l in range(lanes):
                first[l] = bias[j0 + l]
            for e in range(LANES, LANE_CHUNK * LANES):
                first[e] = first[e - LANES]
        size = L * LANES
        chunk = LANE_CHUNK * LANES
        # The taps' passes take two whole chunks a step, then the rest: a loop of a constant count that loads each
        # weight once for two positions (5x5 taps on 7x7 planes 1.2x faster, 3x3 1.03x, 2026-12-07; bitwise the same)
        pairs = size // (2 * chunk) * (2 * chunk)
        for n in range(run * samples, min(N, (run + 1) * samples)):
            for o0 in range(0, size, LANE_CHUNK * LANES):
                for e in range(min(LANE_CHUNK * LANES, size - o0)):
                    wide[np.uint64(o0 + e)] = first[np.uint64(e)]
            for m in range(terms):
                for l in range(lanes):
                    sources[l] = (j0 + l) * M + m if flip else (j0 + l) // M
                pad_plane(src[n], sources, padded, pd, ph, pw, Hp, Wp, sd, sh, sw, LANES)
                for tap0 in range(0, taps, 3):
                    if taps - tap0 >= 3:
                        w0, w1, w2 = weights[m, tap0], weights[m, tap0 + 1], weights[m, tap0 + 2]
                        a0, a1, a2 = (np.uint64(offsets[tap0] * LANES), np.uint64(offsets[tap0 + 1] * LANES),
                                      np.uint64(offsets[tap0 + 2] * LANES))
                        for o0 in range(0, pairs, 2 * chunk):
                            for e in range(chunk):
                                e_ = np.uint64(e)
                                three_taps(wide, padded, np.uint64(o0 + e), e_, w0, w1, w2, a0, a1, a2)
                                three_taps(wide, padded, np.uint64(o0 + chunk + e), e_, w0, w1, w2, a0, a1, a2)
                        for o0 in range(pairs, size, chunk):
                            for e in range(min(chunk, size - o0)):
                                three_taps(wide, padded, np.uint64(o0 + e), np.uint64(e), w0, w1, w2, a0, a1, a2)
                    else:
                        for tap in range(tap0, taps):
                            wv, offset = weights[m, tap], np.uint64(offsets[tap] * LANES)
                            for o0 in range(0, size, LANE_CHUNK * LANES):
                                for e in range(min(LANE_CHUNK * LANES, size - o0)):
                                    wide[np.uint64(o0 + e)] += wv[np.uint64(e)] * padded[np.uint64(o0 + e) + offset]
            move_lanes(wide, dst[n], j0, lanes, Hp, Wp, True)


@parallel(fastmath=CONTRACT)
def depthwise_wide_classes_cpu(dy, w, dx, classes, taps, lows, sd, sh, sw, planes):
    """Strided depthwise input gradient, one task per run of `planes` dx planes (n, c) (their scratch allocated once),
    by sub-pixel classes (subpixel_classes): the dx positions a + stride*j of class a = (a_d, a_h, a_w) read only the
    taps whose (a + pad - tap*dil) is a multiple of the stride, each from dy at j + (a + pad - tap*dil) // stride.
    Each dy plane (n, c*M + m) is padded once into scratch (lows: its low zero borders and padded extents); per class
    each of its taps is one pass grid[o] += w * padded[o + offset] over the class's grid (J_d, J_h, J_w) laid out on
    the padded rows (columns past J_w computed and dropped, as in depthwise_wide_cpu), then the grids are scattered
    into dx (a class without taps gives zeros). classes rows: (a_d, a_h, a_w, J_d, J_h, J_w, first tap row, tap rows,
    first grid element); taps rows: (t, r, s, offset in the padded volume). Terms m in order, then each class's taps
    in order."""
    N, K = dy.shape[0], dy.shape[1]
    C = dx.shape[1]
    M = K // C
    lo_d, lo_h, lo_w, Dp, Hp, Wp = lows[0], lows[1], lows[2], lows[3], lows[4], lows[5]
    size = 0
    for cls in range(len(classes)):
        size = max(size, classes[cls, 8] + classes[cls, 3] * Hp * Wp)
    for run in numba.prange(-(-N * C // planes)):
        padded = np.zeros(Dp * Hp * Wp, dx.dtype)  # (pad_plane writes the same elements each plane)
        wide = np.empty(size, dx.dtype)
        source = np.empty(1, np.int64)  # (pad_plane's rows)
        for plane in range(run * planes, min(N * C, (run + 1) * planes)):
            n, c = plane // C, plane % C
            for o in range(size):
                wide[np.uint64(o)] = 0.0
            for m in range(M):
                k = c * M + m
                source[0] = k
                pad_plane(dy[n], source, padded, lo_d, lo_h, lo_w, Hp, Wp, 1, 1, 1)
                for cls in range(len(classes)):
                    Jd, Jh, Jw, at = classes[cls, 3], classes[cls, 4], classes[cls, 5], classes[cls, 8]
                    if Jd == 0 or Jh == 0 or Jw == 0:
                        continue
                    L = ((Jd - 1) * Hp + (Jh - 1)) * Wp + Jw
                    for e in range(classes[cls, 6], classes[cls, 6] + classes[cls, 7]):
                        wv = w[k, 0, taps[e, 0], taps[e, 1], taps[e, 2]]
                        offset = np.uint64(taps[e, 3])
                        for o in range(L):
                            wide[np.uint64(at + o)] += wv * padded[np.uint64(o) + offset]
            for cls in range(len(classes)):
                a_d, a_h, a_w, Jd, Jh, Jw, at = (classes[cls, 0], classes[cls, 1], classes[cls, 2], classes[cls, 3],
                                                 classes[cls, 4], classes[cls, 5], classes[cls, 8])
                for jd in range(Jd):
                    for jh in range(Jh):
                        line = dx[n, c, a_d + jd * sd, a_h + jh * sh]
                        start = at + (jd * Hp + jh) * Wp
                        for jw in range(Jw):
                            line[np.uint64(a_w + jw * sw)] = wide[np.uint64(start + jw)]


@parallel(fastmath=CONTRACT_REASSOC)
def depthwise_wide_filter_cpu(x, dy, dw, pd, ph, pw, dd, dh, dw_):
    """Unit-stride depthwise weight gradient, one task per filter k (input channel c = k // M):

        dw[k, 0, t, r, s] = sum over n, then over outputs o of dy[n, k, o] * x[n, c, o + tap offset - padding]

    Per sample, x's plane is padded once and dy's plane spread over the same wide grid (zeros in the dropped
    columns), so each tap is one dot product over the whole plane (reassociated so LLVM vectorises it, like
    direct's filter kernel: fixed code, so bit-identical run to run); samples in order."""
    N, C, D, H, W = x.shape
    K, _, T, R, S = dw.shape
    _, _, P, Q, U = dy.shape
    M = K // C
    taps = T * R * S
    Dp, Hp, Wp = P + (T - 1) * dd, Q + (R - 1) * dh, U + (S - 1) * dw_
    L = ((P - 1) * Hp + (Q - 1)) * Wp + U
    offsets = tap_offsets(T, R, S, dd, dh, dw_, 1, 1, 1, Dp, Hp, Wp)
    for k in numba.prange(K):
        padded = np.zeros(Dp * Hp * Wp, x.dtype)
        wide = np.zeros(L, x.dtype)  # dy[n, k] on the wide grid: zero in the dropped columns
        total = np.zeros(taps, x.dtype)
        source = np.empty(1, np.int64)  # (pad_plane's rows)
        source[0] = k // M
        for n in range(N):
            pad_plane(x[n], source, padded, pd, ph, pw, Hp, Wp, 1, 1, 1)
            for p in range(P):
                for q in range(Q):
                    line = dy[n, k, p, q]
                    at = (p * Hp + q) * Wp
                    for u in range(U):
                        wide[np.uint64(at + u)] = line[np.uint64(u)]
            for tap in range(0, taps - taps % 3, 3):  # three taps a pass: each dy element loaded once for three
                a0, a1, a2 = np.uint64(offsets[tap]), np.uint64(offsets[tap + 1]), np.uint64(offsets[tap + 2])
                dot0 = dot1 = dot2 = 0.0
                for o in range(L):
                    v = wide[np.uint64(o)]
                    dot0 += v * padded[np.uint64(o) + a0]
                    dot1 += v * padded[np.uint64(o) + a1]
                    dot2 += v * padded[np.uint64(o) + a2]
                total[tap] += dot0
                total[tap + 1] += dot1
                total[tap + 2] += dot2
            for tap in range(taps - taps % 3, taps):
                offset, dot = np.uint64(offsets[tap]), 0.0
                for o in range(L):
                    dot += wide[np.uint64(o)] * padded[np.uint64(o) + offset]
                total[tap] += dot
        for tap in range(taps):
            dw[k, 0, tap // (R * S), (tap // S) % R, tap % S] = total[tap]


@parallel(fastmath=CONTRACT)
def depthwise_lanes_filter_cpu(x, dy, dw, pd, ph, pw, dd, dh, dw_, sd, sh, sw):
    """depthwise_wide_filter_cpu on small planes, at any stride: one task per block of LANES filters k0.. . Per
    sample the block's x planes go interleaved into padded scratch (pad_plane's volumes, as depthwise_lanes_cpu's)
    and its dy planes onto the same wide grid (zeros in the dropped columns), so each tap's LANES dot products are
    one pass of lane-wise products summed into sums[tap, q*LANES + l], whose LANE_CHUNK partial sums per lane are
    added at the end. Samples in order (fixed code: bit-identical run to run)."""
    N, C, D, H, W = x.shape
    K, _, T, R, S = dw.shape
    _, _, P, Q, U = dy.shape
    M = K // C
    taps = T * R * S
    Dp, Hp, Wp = P + (T - 1) * dd // sd, Q + (R - 1) * dh // sh, U + (S - 1) * dw_ // sw
    L = ((P - 1) * Hp + (Q - 1)) * Wp + U
    offsets = tap_offsets(T, R, S, dd, dh, dw_, sd, sh, sw, Dp, Hp, Wp)
    size = L * LANES
    chunk = LANE_CHUNK * LANES
    pairs = size // (2 * chunk) * (2 * chunk)
    for block in numba.prange(-(-K // LANES)):
        k0 = block * LANES
        lanes = min(LANES, K - k0)
        padded = np.zeros(sd * sh * sw * Dp * Hp * Wp * LANES, x.dtype)
        wide = np.zeros(size, x.dtype)
        sums = np.zeros((taps, LANE_CHUNK * LANES), x.dtype)
        sources = np.empty(lanes, np.int64)  # (pad_plane's rows)
        for l in range(lanes):
            sources[l] = (k0 + l) // M
        for n in range(N):
            pad_plane(x[n], sources, padded, pd, ph, pw, Hp, Wp, sd, sh, sw, LANES)
            move_lanes(wide, dy[n], k0, lanes, Hp, Wp, False)
            for tap in range(taps):
                acc, offset = sums[tap], np.uint64(offsets[tap] * LANES)
                for o0 in range(0, pairs, 2 * chunk):  # two whole chunks a step, as the forward's, in order (1.1-1.2x)
                    for e in range(chunk):
                        i_, j_, e_ = np.uint64(o0 + e), np.uint64(o0 + chunk + e), np.uint64(e)
                        total = acc[e_] + wide[i_] * padded[i_ + offset]
                        acc[e_] = total + wide[j_] * padded[j_ + offset]
                for o0 in range(pairs, size, chunk):
                    for e in range(min(chunk, size - o0)):
                        i_ = np.uint64(o0 + e)
                        acc[np.uint64(e)] += wide[i_] * padded[i_ + offset]
        for l in range(lanes):
            for tap in range(taps):
                total = 0.0
                for q in range(LANE_CHUNK):
                    total += sums[tap, q * LANES + l]
                dw[k0 + l, 0, tap // (R * S), (tap // S) % R, tap % S] = total


@lru_cache(maxsize=256)
def subpixel_classes(g):
    """depthwise_wide_classes_cpu's tables: (classes, taps, lows) as int64 arrays (see its docstring), from the
    sub-pixel classes of dx positions along each axis (cached per geometry: explain, the workspace and the launch
    each ask)."""
    axes = []  # per axis: ([(a, J, [(tap, offset into dy)])], low border, padded extent)
    for length, out, n_taps, stride, dil, pad in ((g.D, g.P, g.T, g.stride_d, g.dil_d, g.pad_d),
                                                  (g.H, g.Q, g.R, g.stride_h, g.dil_h, g.pad_h),
                                                  (g.W, g.U, g.S, g.stride_w, g.dil_w, g.pad_w)):
        per_class = []
        for a in range(min(stride, max(length, 1))):  # (a class a >= length has no position: a huge stride, few)
            J = max(0, -(-(length - a) // stride))
            reads = [(t, (a + pad - t * dil) // stride) for t in range(n_taps) if (a + pad - t * dil) % stride == 0]
            per_class.append((a, J, reads))
        offsets = [off for _, _, reads in per_class for _, off in reads] or [0]
        low = max(0, -min(offsets))
        reach = max([J - 1 + off + 1 for _, J, reads in per_class for _, off in reads] + [out])
        axes.append((per_class, low, low + reach))
    (cd, lo_d, Dp), (ch, lo_h, Hp), (cw, lo_w, Wp) = axes
    classes, taps, at = [], [], 0
    for a_d, Jd, reads_d in cd:
        for a_h, Jh, reads_h in ch:
            for a_w, Jw, reads_w in cw:
                first = len(taps)
                taps += [(t, r, s, ((od + lo_d) * Hp + oh + lo_h) * Wp + ow + lo_w)
                         for t, od in reads_d for r, oh in reads_h for s, ow in reads_w]
                classes.append((a_d, a_h, a_w, Jd, Jh, Jw, first, len(taps) - first, at))
                at += Jd * Hp * Wp
    return (np.array(classes, np.int64), np.array(taps or [(0, 0, 0, 0)], np.int64).reshape(-1, 4),
            np.array([lo_d, lo_h, lo_w, Dp, Hp, Wp], np.int64))


def _scratch(g, primitive, itemsize, family):
    """Bytes of a plane kernel family's scratch per thread: the padded source volume (its phase volumes at a stride:
    the forward's and the lanes weight gradient's) and the wide grid (the input gradient's at a stride: its classes'
    grids); the lanes kernels' are LANES planes deep, beside their weights (or sums) laid out per lane."""
    if primitive == "backward_data" and not g.stride_d == g.stride_h == g.stride_w == 1:
        classes, _, lows = subpixel_classes(g)
        grids = max(int((classes[:, 8] + classes[:, 3] * lows[4] * lows[5]).max()), 1)
        return (int(np.prod(lows[3:])) + grids) * itemsize
    P, Q, U = (g.D, g.H, g.W) if primitive == "backward_data" else (g.P, g.Q, g.U)
    strided = primitive == "forward" or primitive == "backward_filter" and family == "lanes"
    sd, sh, sw = (g.stride_d, g.stride_h, g.stride_w) if strided else (1, 1, 1)
    Dp, Hp, Wp = P + (g.T - 1) * g.dil_d // sd, Q + (g.R - 1) * g.dil_h // sh, U + (g.S - 1) * g.dil_w // sw
    wide = ((P - 1) * Hp + (Q - 1)) * Wp + U
    taps = g.T * g.R * g.S
    if family == "wide":
        return (sd * sh * sw * Dp * Hp * Wp + wide + taps) * itemsize
    weights = (taps if primitive == "backward_filter" else (g.K // g.C if primitive == "backward_data" else 1) * taps
               + 1) * LANE_CHUNK
    return ((sd * sh * sw * Dp * Hp * Wp + wide + weights) * LANES + taps) * itemsize


# A strided forward runs the wide kernel on phase volumes from this many output positions per plane (2026-12-06,
# stride 2, batch 8, ms row kernel / wide: 5x5 144 @56 (28x28 outputs) 8.4-9.1 / 1.8, 3x3 96 @112 8.5-8.8 / 3.2-3.4,
# 5x5 240 @28 3.7 / 1.2, 5x5 672 @14 (7x7) 2.9 / 1.8, 3x3 576 @14 1.17 / 0.97, a 3-D 16^3 0.46 / 0.14, 1-D k5 over
# 1,000 0.61 / 0.29; but 3x3 960 @7 (4x4 outputs) 0.74 / 0.97 and 256 @8 0.25 / 0.28). (Planes that small now take
# the lanes kernels while their scratch fits.)
STRIDED_WIDE_POSITIONS = 49

# The input gradient's sub-pixel classes (subpixel_classes: one per residue of the dx positions along each axis,
# the product of min(stride, extent) over the axes) that its wide kernels take: beyond, the row kernels (a stride of
# millions made that many classes, minutes and gigabytes of tables before the call).
MAX_CLASSES = 4096


def class_count(g):
    return math.prod(min(s, max(n, 1)) for s, n in ((g.stride_d, g.D), (g.stride_h, g.H), (g.stride_w, g.W)))


# The lanes kernels run the forward and the unit-stride input gradient on grids (the output plane, the dx plane) of at
# most this many positions. ms depthwise_wide_cpu / depthwise_lanes_cpu, batch 8, ~47,000 positions x channels
# (2026-12-06, after the wide kernels' tap weights lost their divisions: 1.2-1.6x on 14x14 planes), forward and input
# gradient: 3x3 4x4 1.07 / 1.00, 1.15 / 1.06; 6x6 0.58 / 0.62, 0.66 / 0.69; 7x7 0.46 / 0.52, 0.53 / 0.56 (another
# run 0.48 / 0.45, 0.58 / 0.51); 8x8 0.36 / 0.43; 10x10 0.32 / 0.42; 5x5 7x7 0.76 / 0.81, 8x8 0.60 / 0.74; batch 4:
# 3x3 960 @7 0.24 / 0.21, 0.26 / 0.22; 5x5 1152 @7 0.48 / 0.44, 0.52 / 0.49; 3x3 1280 @4 0.24 / 0.19; at stride 2
# (the row kernel below STRIDED_WIDE_POSITIONS / lanes) 3x3 6x6 outputs 1.88 / 1.05, 7x7 1.08 / 0.92; 5x5 7x7 1.40 /
# 1.24; wide / lanes 8x8 0.76 / 0.86. With each element's lanes copied in one loop (2026-12-07, the same sizes): 3x3 7x7
# 0.43 / 0.34, 0.46 / 0.35; 8x8 0.33 / 0.34, 0.35 / 0.36; 10x10 0.29 / 0.34; 5x5 7x7 0.70 / 0.63; 8x8 0.58 / 0.63.
LANES_POSITIONS = 49
# ... the unit-stride weight gradient on grids of at most this many (depthwise_wide_filter_cpu / lanes: 3x3 7x7 0.53
# / 0.47, 10x10 0.37 / 0.40, 12x12 0.32 / 0.37; 5x5 7x7 1.21 / 0.95, 10x10 0.88 / 0.77, 14x14 0.74 / 0.71; 2026-12-07:
# 3x3 7x7 0.55 / 0.42, 10x10 0.40 / 0.40, 12x12 0.34 / 0.45; 5x5 7x7 1.18 / 0.84, 10x10 0.87 / 0.76)
LANES_FILTER_POSITIONS = 100
# ... and the weight gradient at a stride, which has no wide kernel (direct's kernel, one task per filter, otherwise),
# on output planes of at most this many: ms direct / lanes, stride 2, 3x3 7x7 outputs 2.53 / 0.85, 10x10 2.25 / 0.68,
# 12x12 2.07 / 1.00, 14x14 2.10 / 1.34, 28x28 2.85 / 3.43; 5x5 7x7 6.54 / 1.19, 14x14 5.20 / 1.74, 28x28 11.9 / 7.0.
LANES_STRIDED_FILTER_POSITIONS = 196


def family(g, primitive, itemsize, workspace_limit):
    """The kernels the primitive runs on g: "lanes" or "wide" (see takes), where their scratch for every thread
    fits the limit, else "rows"."""
    limit = DEFAULT_WORKSPACE_LIMIT if workspace_limit is None else workspace_limit
    for name in takes(g, primitive):
        if _scratch(g, primitive, itemsize, name) * _threads() <= limit:
            return name
    return "rows"


def takes(g, primitive):
    """The plane kernel families that run the primitive on g, in order of preference, when their scratch fits:
    "lanes" on grids of at most LANES_POSITIONS positions (the weight gradient: LANES_FILTER_POSITIONS, at a stride
    LANES_STRIDED_FILTER_POSITIONS; not the input gradient at a stride); "wide" at unit stride, or at a stride the
    forward of a plane of at least STRIDED_WIDE_POSITIONS outputs and the input gradient of at most MAX_CLASSES
    classes (depthwise_wide_classes_cpu: 1.4-4x faster than the row kernel from 4x4 to 56x56 dy planes, 2026-12-06)."""
    unit = g.stride_d == g.stride_h == g.stride_w == 1
    positions = g.D * g.H * g.W if primitive == "backward_data" else g.P * g.Q * g.U
    most = LANES_POSITIONS
    if primitive == "backward_filter":
        most = LANES_FILTER_POSITIONS if unit else LANES_STRIDED_FILTER_POSITIONS
    lanes = (unit or primitive != "backward_data") and positions <= most
    wide = (unit or primitive == "backward_data" and class_count(g) <= MAX_CLASSES
            or primitive == "forward" and g.P * g.Q * g.U >= STRIDED_WIDE_POSITIONS)
    return ("lanes",) * lanes + ("wide",) * wide


def _threads():
    return numba.get_num_threads()


def workspace_bytes(g, primitive, itemsize, workspace_limit):
    name = family(g, primitive, itemsize, workspace_limit)
    if name == "rows":  # the weight gradient's: direct's kernels, its wide one where that fits (a multiplier >= 3)
        return direct.workspace_bytes(g, primitive, itemsize, workspace_limit) if primitive == "backward_filter" else 0
    return _scratch(g, primitive, itemsize, name) * _threads()


def supports(g, primitive):
    return None if g.is_depthwise else (f"depthwise needs groups == in_channels and out_channels a multiple "
                                        f"of them, got groups={g.groups}, C={g.C}, K={g.K}")


def _samples(n, channels):
    """Samples per task of depthwise_lanes_cpu: all of them, unless its blocks of LANES channels are fewer than four
    tasks a thread."""
    runs = min(n, -(-4 * _threads() // -(-channels // LANES)))
    return -(-n // max(runs, 1))


def _planes(planes):
    """Planes per task of depthwise_wide_cpu: eight tasks a thread (each allocates its scratch once)."""
    return max(-(-planes // (8 * _threads())), 1)


def forward(x, w, bias, y, g, workspace_limit=None):
    has_bias = bias is not None
    bias = bias if has_bias else np.zeros(1, x.dtype)
    name = family(g, "forward", x.itemsize, workspace_limit)
    plane = (g.pad_d, g.pad_h, g.pad_w, g.dil_d, g.dil_h, g.dil_w, g.stride_d, g.stride_h, g.stride_w)
    if name == "lanes":  # (the padded plane's zeros are multiplied, as in the reference)
        sized(depthwise_lanes_cpu, g.dense_macs)(x, w, bias, has_bias, y, False, *plane, _samples(g.N, g.K))
    elif name == "wide":
        sized(depthwise_wide_cpu, g.dense_macs)(x, w, bias, has_bias, y, False, *plane, _planes(g.N * g.K))
    else:
        sized(depthwise_forward_cpu, g.dense_macs)(x, w, bias, has_bias, y, *geometry_args(g)[:9])
        direct.nan_where_nonfinite_taps_read_padding(w, y, g)


def backward_data(dy, w, dx, g, workspace_limit=None):
    # the plane kernels run every tap over dy's zero border too: a NaN or inf weight would give NaN (inf * 0) in dx
    # where that tap reads no dy, so such weights take the row kernel
    name = family(g, "backward_data", dx.itemsize, workspace_limit)
    if name == "rows" or direct.nonfinite_channels(w.reshape(1, g.K, -1)).any():
        sized(depthwise_backward_data_cpu, g.dense_macs)(dy, w, dx, *geometry_args(g)[:9])
    elif not g.stride_d == g.stride_h == g.stride_w == 1:
        sized(depthwise_wide_classes_cpu, g.dense_macs)(dy, w, dx, *subpixel_classes(g), g.stride_d, g.stride_h,
                                                        g.stride_w, _planes(g.N * g.C))
    else:
        pads = tuple((n - 1) * d - pad for n, d, pad in zip((g.T, g.R, g.S), (g.dil_d, g.dil_h, g.dil_w),
                                                            (g.pad_d, g.pad_h, g.pad_w)))
        plane = (dy, w, np.zeros(1, dx.dtype), False, dx, True, *pads, g.dil_d, g.dil_h, g.dil_w, 1, 1, 1)
        if name == "lanes":
            sized(depthwise_lanes_cpu, g.dense_macs)(*plane, _samples(g.N, g.C))
        else:
            sized(depthwise_wide_cpu, g.dense_macs)(*plane, _planes(g.N * g.C))


def backward_filter(x, dy, dw, g, workspace_limit=None):
    # the plane kernels' dot products also meet x in the columns past each row (dy 0 there): an inf or NaN in x can
    # make NaN (inf * 0) in a tap that never reads it, so a non-finite result is computed again by direct's kernel
    name = family(g, "backward_filter", x.itemsize, workspace_limit)
    if name == "lanes":
        sized(depthwise_lanes_filter_cpu, g.dense_macs)(x, dy, dw, g.pad_d, g.pad_h, g.pad_w, g.dil_d, g.dil_h,
                                                        g.dil_w, g.stride_d, g.stride_h, g.stride_w)
    elif name == "wide":
        sized(depthwise_wide_filter_cpu, g.dense_macs)(x, dy, dw, g.pad_d, g.pad_h, g.pad_w, g.dil_d, g.dil_h,
                                                       g.dil_w)
    if name == "rows" or direct.nonfinite_channels(dw.reshape(1, g.K, -1)).any():
        direct.backward_filter(x, dy, dw, g, workspace_limit)  # (its row kernel: one task per (k, c) = per k here)
