"""Depthwise plane kernels on the CPU: each tap ONE pass over a whole plane, or over LANES planes at once.

x (N, C, D, H, W) * w (K, 1, T, R, S) -> y (N, K, P, Q, U), K = M*C; depthwise.py picks among them (and the row
kernels) and sizes their scratch. Short rows made the row kernels spend most of their time starting loops (T*R*S
loops of U elements per output row), so each task here pads its source plane once into scratch (pad_plane) and makes
each tap one pass over the plane's wide grid: output (p, q, u) at (p*Hp + q)*Wp + u, the columns past U computed and
dropped (3x3 depthwise 144 @56, batch 4, 2 cores: forward 3.5 -> 1.8 ms).

    depthwise_wide_cpu          forward, and the unit-stride input gradient (the correlation of dy with the
                                mirrored taps); at a stride on the padded plane's stride-phase volumes, every tap
                                reading one of them at unit stride (the row kernel gathered every sw-th input).
    depthwise_wide_classes_cpu  the strided input gradient, by sub-pixel classes of dx positions, each the unit-stride
                                correlation of dy with the taps that reach it (the row kernel scattered into every
                                sw-th dx element).
    depthwise_wide_filter_cpu   the unit-stride weight gradient: a dot product over the plane per tap, into
                                SUM_CHUNK partial sums.
    depthwise_lanes_cpu         on small planes a pass over one plane is mostly loop overhead (~60 multiply-adds on
    depthwise_lanes_classes_cpu 7x7), so these run LANES channels at a time, their planes interleaved element by
    depthwise_lanes_filter_cpu  element in the same padded layout, the weights laid out per lane: each tap is one
                                pass over LANES planes (lane_taps; the weight gradient's at any stride).

Three taps a pass (one load and store of the output for three multiply-adds; 1.1-1.3x faster than a tap a pass,
2026-12-06). Scratch is allocated once per task, and a plane's tap weights are read in order (tap_weights) rather than
each from its index by three integer divisions, which took a third of a 14x14 plane's time. Interleaving took more
time than the taps on 7x7 planes until each element's lanes were copied in one inner loop, in and out, of a constant
count for a whole block, which LLVM vectorises (3x3 depthwise 960 @7, batch 8: 1.55x the wide kernel; the weight
gradient at stride 2, which took direct's kernel, 2-6x faster; 2026-12-07).
"""
import numba
import numpy as np
from cnnfast.kernels.cpu.direct import CONTRACT, CONTRACT_REASSOC
from cnnfast.kernels.cpu.threads import njit, parallel

# The lanes kernels (depthwise_lanes_cpu, _classes_cpu, _filter_cpu) interleave this many planes (a 16-float AVX-512
# vector; LLVM's loop vectorizer takes any multiple) and lay the weights out per lane for LANE_CHUNK positions.
LANES = 16
LANE_CHUNK = 16
# depthwise_wide_filter_cpu sums each tap's products into this many partial sums (64: 2.2x one sum; 32: 1.9x; 128 and
# 256: 1.5-1.8x; three taps over a 56x56 plane, one thread, 2026-12-07).
SUM_CHUNK = 64


@numba.njit(inline="always")
def pad_plane(planes, rows, padded, pd, ph, pw, Hp, Wp, sd, sh, sw, lanes=1):
    """Planes planes[rows[l]] ((D, H, W) each) zero-padded and split into sd*sh*sw phase volumes of (Dp, Hp, Wp)
    (zeros outside the plane): element ((phase*Dp + a)*Hp + b)*Wp + e of plane l's volumes, phase = (fd*sh + fh)*sw
    + fw, is planes[rows[l], a*sd + fd - pd, b*sh + fh - ph, e*sw + fw - pw] where that is inside (unit strides: one
    volume, element (a*Hp + b)*Wp + e is planes[rows[l], a - pd, ...]). With lanes > 1 the volumes hold up to that
    many planes interleaved, element o of plane l at padded[o*lanes + l], each element's lanes copied in one inner
    loop (one plane at a time, the lanes kernels' copies of 7x7 planes took 2.4x as long: mostly starting short
    rows). LANES planes rows[0] + l*step (all but the forward's at a channel multiplier > 1, and a last partial block)
    are copied by a loop of a constant count over planes at a constant distance, which LLVM vectorises: 2.7x faster
    than through rows (2026-12-07). Inlined in Numba's IR: LLVM left this body a call, and the strided input gradient
    of 7x7 dy planes ran 10% slower."""
    _, D, H, W = planes.shape
    Dp = len(padded) // (sd * sh * sw * Hp * Wp * lanes)
    plane = planes[rows[0]]  # the one plane when lanes == 1 (indexed from planes and rows each row: 15% slower)
    first, step = rows[0], rows[1] - rows[0] if len(rows) > 1 else 0
    affine = len(rows) == LANES
    for l in range(len(rows)):
        affine &= rows[l] == first + l * step
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
                        elif affine:
                            for e in range(lo, hi):
                                base, column = np.uint64((at + e) * LANES), e * sw + fw - pw
                                for lane in range(LANES):
                                    padded[base + np.uint64(lane)] = planes[first + lane * step, i_d, i_h, column]
                        else:
                            for e in range(lo, hi):
                                base, column = np.uint64((at + e) * lanes), e * sw + fw - pw
                                for lane in range(len(rows)):
                                    padded[base + np.uint64(lane)] = planes[rows[lane], i_d, i_h, column]


@numba.njit(inline="always")
def move_lanes(wide, at, planes, j0, lanes, Hp, Wp, into_planes):
    """Between the lanes kernels' grid and planes planes[j0 + l] (l < lanes; (P, Q, U) each, any layout): element
    (p, q, u) of plane l is wide[(at + (p*Hp + q)*Wp + u)*LANES + l]; into_planes copies the grid's into the planes,
    else the planes' into the grid. Each element's lanes in one inner loop, as pad_plane's; a whole block's by a loop
    of a constant count (LANES), which LLVM vectorises: 1.5-1.6x faster than through the block's count (2026-12-07)."""
    if lanes == LANES:
        move_count(wide, at, planes, j0, LANES, Hp, Wp, into_planes)
    else:
        move_count(wide, at, planes, j0, lanes, Hp, Wp, into_planes)


@numba.njit(inline="always")
def move_count(wide, at, planes, j0, lanes, Hp, Wp, into_planes):
    _, P, Q, U = planes.shape
    for p in range(P):
        for q in range(Q):
            start = at + (p * Hp + q) * Wp
            for u in range(U):
                base = np.uint64((start + u) * LANES)
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
def plane_taps(wide, at, size, padded, weights, offsets, first, count):
    """Taps first .. first + count - 1 of a one-plane correlation, in order: for each o < size, wide[at + o] +=
    weights[tap] * padded[o + offsets[tap]]; three taps a pass (fewer loads, stores and loop starts: 1.1-1.3x faster
    than a tap a pass, 2026-12-06), the last pass two taps, or four rather than three and one (the strided input
    gradient's classes of 3x3 filters have 4, 2, 2 and 1: 96 @112 stride 2 1.11x, 2026-12-07; 5x5 and 7x7 filters
    within noise; in lane_taps no gain). Every load is indexed by a loop's variable: Numba hoists a load that does
    not depend on the prange index out of the prange loop, even from a branch that would not have run it
    (tests/conftest.py)."""
    at_, last = np.uint64(at), first + count
    tail = count % 3 + (3 if count % 3 == 1 and count > 1 else 0)  # the last pass's taps: 0, 2, 4, or 1 (of 1)
    for tap in range(first, last - tail, 3):
        w0, w1, w2 = weights[tap], weights[tap + 1], weights[tap + 2]
        a0, a1, a2 = np.uint64(offsets[tap]), np.uint64(offsets[tap + 1]), np.uint64(offsets[tap + 2])
        for o in range(size):
            i_ = np.uint64(o)
            acc = wide[at_ + i_]
            acc += w0 * padded[i_ + a0]
            acc += w1 * padded[i_ + a1]
            acc += w2 * padded[i_ + a2]
            wide[at_ + i_] = acc
    for tap in range(last - tail, last - 1, 4):  # one pass of the last two or four taps (tail 2: w2, w3 unused)
        w0, w1, w2, w3 = weights[tap], weights[tap + 1], weights[tap + tail - 2], weights[tap + tail - 1]
        a0, a1 = np.uint64(offsets[tap]), np.uint64(offsets[tap + 1])
        a2, a3 = np.uint64(offsets[tap + tail - 2]), np.uint64(offsets[tap + tail - 1])
        for o in range(size):
            i_ = np.uint64(o)
            acc = wide[at_ + i_]
            acc += w0 * padded[i_ + a0]
            acc += w1 * padded[i_ + a1]
            if tail == 4:
                acc += w2 * padded[i_ + a2]
                acc += w3 * padded[i_ + a3]
            wide[at_ + i_] = acc
    for tap in range(last - tail % 2, last):  # a lone tap (count 1)
        wv, offset = weights[tap], np.uint64(offsets[tap])
        for o in range(size):
            wide[at_ + np.uint64(o)] += wv * padded[np.uint64(o) + offset]


@numba.njit(inline="always")
def three_taps(wide, at, padded, i, e, w0, w1, w2, a0, a1, a2):
    """The lanes correlation's step: wide[at + i] += w0[e]*padded[i + a0], then w1's and w2's taps, in that order."""
    acc = wide[at + i]
    acc += w0[e] * padded[i + a0]
    acc += w1[e] * padded[i + a1]
    acc += w2[e] * padded[i + a2]
    wide[at + i] = acc


@numba.njit(inline="always")
def lane_taps(wide, at, size, padded, weights, offsets, first, count):
    """Taps first .. first + count - 1 of a lanes correlation, in order, three a pass: for each i < size (lanes of
    whole positions), wide[at + i] += weights[tap, i % (LANE_CHUNK*LANES)] * padded[i + offsets[tap]*LANES]. Each
    pass takes two whole chunks a step, then the rest: a loop of a constant count that loads each weight once for
    two positions (5x5 taps on 7x7 planes 1.2x faster, 3x3 1.03x, 2026-12-07; bitwise the same)."""
    chunk = LANE_CHUNK * LANES
    pairs = size // (2 * chunk) * (2 * chunk)
    at_ = np.uint64(at)
    last = first + count
    for tap0 in range(first, last, 3):
        if last - tap0 >= 3:
            w0, w1, w2 = weights[tap0], weights[tap0 + 1], weights[tap0 + 2]
            a0, a1, a2 = (np.uint64(offsets[tap0] * LANES), np.uint64(offsets[tap0 + 1] * LANES),
                          np.uint64(offsets[tap0 + 2] * LANES))
            for o0 in range(0, pairs, 2 * chunk):
                for e in range(chunk):
                    e_ = np.uint64(e)
                    three_taps(wide, at_, padded, np.uint64(o0 + e), e_, w0, w1, w2, a0, a1, a2)
                    three_taps(wide, at_, padded, np.uint64(o0 + chunk + e), e_, w0, w1, w2, a0, a1, a2)
            for o0 in range(pairs, size, chunk):
                for e in range(min(chunk, size - o0)):
                    three_taps(wide, at_, padded, np.uint64(o0 + e), np.uint64(e), w0, w1, w2, a0, a1, a2)
        else:
            for tap in range(tap0, last):
                wv, offset = weights[tap], np.uint64(offsets[tap] * LANES)
                for o0 in range(0, size, chunk):
                    for e in range(min(chunk, size - o0)):
                        i = np.uint64(o0 + e)
                        wide[at_ + i] += wv[np.uint64(e)] * padded[i + offset]


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
                plane_taps(wide, 0, L, padded, weights, offsets, 0, taps)
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
        for n in range(run * samples, min(N, (run + 1) * samples)):
            for o0 in range(0, size, LANE_CHUNK * LANES):
                for e in range(min(LANE_CHUNK * LANES, size - o0)):
                    wide[np.uint64(o0 + e)] = first[np.uint64(e)]
            for m in range(terms):
                for l in range(lanes):
                    sources[l] = (j0 + l) * M + m if flip else (j0 + l) // M
                pad_plane(src[n], sources, padded, pd, ph, pw, Hp, Wp, sd, sh, sw, LANES)
                lane_taps(wide, 0, size, padded, weights[m], offsets, 0, taps)
            move_lanes(wide, 0, dst[n], j0, lanes, Hp, Wp, True)


@parallel(fastmath=CONTRACT)
def depthwise_wide_classes_cpu(dy, w, dx, classes, taps, lows, sd, sh, sw, planes):
    """Strided depthwise input gradient, one task per run of `planes` dx planes (n, c) (their scratch allocated once),
    by sub-pixel classes (depthwise.subpixel_classes): the dx positions a + stride*j of class a = (a_d, a_h, a_w)
    read only the taps whose (a + pad - tap*dil) is a multiple of the stride, each from dy at j + (a + pad - tap*dil)
    // stride.
    Each dy plane (n, c*M + m) is padded once into scratch (lows: its low zero borders and padded extents); per class
    its taps are passes grid[o] += w * padded[o + offset] over the class's grid (J_d, J_h, J_w) laid out on the
    padded rows (columns past J_w computed and dropped, as in depthwise_wide_cpu; three taps a pass, plane_taps), then
    the grids are scattered into dx (a class without taps gives zeros); at sw == 2 each dx row from its two classes'
    grid rows in one pass of interleaved stores, which LLVM vectorises (3x3 192 @28 1.2x faster, 144 @56 1.1x,
    2026-12-07).
    classes rows: (a_d, a_h, a_w, J_d, J_h, J_w, first tap row, tap rows, first grid element); taps rows: (t, r, s,
    offset in the padded volume). Terms m in order, then each class's taps in order."""
    N, K = dy.shape[0], dy.shape[1]
    C, W = dx.shape[1], dx.shape[4]
    M = K // C
    lo_d, lo_h, lo_w, Dp, Hp, Wp = lows[0], lows[1], lows[2], lows[3], lows[4], lows[5]
    size = 0
    for cls in range(len(classes)):
        size = max(size, classes[cls, 8] + classes[cls, 3] * Hp * Wp)
    pairs = sw == 2 and W >= 2  # classes a_w = 0, 1 next to each other in the table
    offsets = taps[:, 3].copy()
    for run in numba.prange(-(-N * C // planes)):
        padded = np.zeros(Dp * Hp * Wp, dx.dtype)  # (pad_plane writes the same elements each plane)
        wide = np.empty(size, dx.dtype)
        weights = np.empty(len(taps), dx.dtype)  # per tap row
        source = np.empty(1, np.int64)  # (pad_plane's rows)
        for plane in range(run * planes, min(N * C, (run + 1) * planes)):
            n, c = plane // C, plane % C
            for o in range(size):
                wide[np.uint64(o)] = 0.0
            for m in range(M):
                k = c * M + m
                source[0] = k
                pad_plane(dy[n], source, padded, lo_d, lo_h, lo_w, Hp, Wp, 1, 1, 1)
                for e in range(len(taps)):
                    weights[e] = w[k, 0, taps[e, 0], taps[e, 1], taps[e, 2]]
                for cls in range(len(classes)):
                    Jd, Jh, Jw, at = classes[cls, 3], classes[cls, 4], classes[cls, 5], classes[cls, 8]
                    if Jd > 0 and Jh > 0 and Jw > 0:
                        L = ((Jd - 1) * Hp + (Jh - 1)) * Wp + Jw
                        plane_taps(wide, at, L, padded, weights, offsets, classes[cls, 6], classes[cls, 7])
            for cls in range(0, len(classes), 2 if pairs else 1):
                a_d, a_h, a_w, Jd, Jh, Jw, at = (classes[cls, 0], classes[cls, 1], classes[cls, 2], classes[cls, 3],
                                                 classes[cls, 4], classes[cls, 5], classes[cls, 8])
                for jd in range(Jd):
                    for jh in range(Jh):
                        line = dx[n, c, a_d + jd * sd, a_h + jh * sh]
                        start = at + (jd * Hp + jh) * Wp
                        if pairs:  # this class's columns (a_w = 0) and the next one's (1) interleaved: one pass
                            other = classes[cls + 1, 8] + (jd * Hp + jh) * Wp
                            for jw in range(W // 2):
                                line[np.uint64(2 * jw)] = wide[np.uint64(start + jw)]
                                line[np.uint64(2 * jw + 1)] = wide[np.uint64(other + jw)]
                            if W % 2:
                                line[np.uint64(W - 1)] = wide[np.uint64(start + W // 2)]
                        else:
                            for jw in range(Jw):
                                line[np.uint64(a_w + jw * sw)] = wide[np.uint64(start + jw)]


@parallel(fastmath=CONTRACT)
def depthwise_lanes_classes_cpu(dy, w, dx, classes, taps, lows, sd, sh, sw, samples):
    """depthwise_wide_classes_cpu on small planes, LANES dx planes at a time: one task per block of LANES channels
    c0.. and run of `samples` samples. Per sample and term m the block's dy planes (n, (c0 + l)*M + m) go interleaved
    into one zero-bordered scratch (pad_plane's layout, lows' borders), so each class's tap is ONE pass

        grid[(at + o)*LANES + l] += w[(c0 + l)*M + m, tap] * padded[(o + offset)*LANES + l]

    over the class's grid, the weights laid out per lane for LANE_CHUNK positions (lane_taps, as depthwise_lanes_cpu);
    then each class's grids are copied into every stride-th dx element of the block's planes. Terms, then each
    class's taps in order, as there. Lanes past the last channel hold zeros and are not written out."""
    N, K = dy.shape[0], dy.shape[1]
    C = dx.shape[1]
    M = K // C
    lo_d, lo_h, lo_w, Dp, Hp, Wp = lows[0], lows[1], lows[2], lows[3], lows[4], lows[5]
    size = 0
    for cls in range(len(classes)):
        size = max(size, classes[cls, 8] + classes[cls, 3] * Hp * Wp)
    offsets = taps[:, 3].copy()
    runs = -(-N // samples)
    for task in numba.prange(-(-C // LANES) * runs):
        c0, run = task // runs * LANES, task % runs
        lanes = min(LANES, C - c0)
        padded = np.zeros(Dp * Hp * Wp * LANES, dx.dtype)
        wide = np.empty(size * LANES, dx.dtype)
        weights = np.zeros((M, len(taps), LANE_CHUNK * LANES), dx.dtype)  # [m, tap row, q*LANES + l]: lane l's
        sources = np.empty(lanes, np.int64)  # (pad_plane's rows)
        for m in range(M):
            for e in range(len(taps)):
                for l in range(lanes):
                    weights[m, e, l] = w[(c0 + l) * M + m, 0, taps[e, 0], taps[e, 1], taps[e, 2]]
                for i in range(LANES, LANE_CHUNK * LANES):  # (copies at a distance of LANES: vectorised)
                    weights[m, e, i] = weights[m, e, i - LANES]
        for n in range(run * samples, min(N, (run + 1) * samples)):
            for i in range(size * LANES):
                wide[np.uint64(i)] = 0.0
            for m in range(M):
                for l in range(lanes):
                    sources[l] = (c0 + l) * M + m
                pad_plane(dy[n], sources, padded, lo_d, lo_h, lo_w, Hp, Wp, 1, 1, 1, LANES)
                for cls in range(len(classes)):
                    Jd, Jh, Jw, at = classes[cls, 3], classes[cls, 4], classes[cls, 5], classes[cls, 8]
                    if Jd > 0 and Jh > 0 and Jw > 0:
                        L = ((Jd - 1) * Hp + (Jh - 1)) * Wp + Jw
                        lane_taps(wide, at * LANES, L * LANES, padded, weights[m], offsets, classes[cls, 6],
                                  classes[cls, 7])
            for cls in range(len(classes)):
                a_d, a_h, a_w, at = classes[cls, 0], classes[cls, 1], classes[cls, 2], classes[cls, 8]
                move_lanes(wide, at, dx[n, :, a_d::sd, a_h::sh, a_w::sw], c0, lanes, Hp, Wp, True)


@parallel(fastmath=CONTRACT_REASSOC)
def depthwise_wide_filter_cpu(x, dy, dw, pd, ph, pw, dd, dh, dw_):
    """Unit-stride depthwise weight gradient, one task per filter k (input channel c = k // M):

        dw[k, 0, t, r, s] = sum over n, then over outputs o of dy[n, k, o] * x[n, c, o + tap offset - padding]

    Per sample, x's plane is padded once and dy's plane spread over the same wide grid (zeros in the dropped
    columns, and up to a whole number of chunks past the last output), so each tap is one dot product over the whole
    plane, three taps a pass (each dy element loaded once for three; the taps padded to a multiple of three with
    dummies reading offset 0). Each dot product goes into SUM_CHUNK partial sums, one per position of a chunk (a loop
    of that constant count, which LLVM vectorises with as many independent additions: one sum per tap waited on each
    addition, 2.2x slower, 2026-12-07), a sample's in the input's dtype, added after each sample into as many float64
    sums (float32 sums carried over the batch overflowed where the result did not; products near float32's largest
    can still overflow a sample's, as in any float32 sum; float64 sums throughout ran 2x slower), and those added up
    at the end; samples in order (fixed code: bit-identical run to run)."""
    N, C, D, H, W = x.shape
    K, _, T, R, S = dw.shape
    _, _, P, Q, U = dy.shape
    M = K // C
    taps = T * R * S
    Dp, Hp, Wp = P + (T - 1) * dd, Q + (R - 1) * dh, U + (S - 1) * dw_
    L = ((P - 1) * Hp + (Q - 1)) * Wp + U
    offsets = np.zeros(-(-taps // 3) * 3, np.int64)
    offsets[:taps] = tap_offsets(T, R, S, dd, dh, dw_, 1, 1, 1, Dp, Hp, Wp)
    chunks = -(-L // SUM_CHUNK) * SUM_CHUNK
    for k in numba.prange(K):
        padded = np.zeros(Dp * Hp * Wp + chunks - L, x.dtype)
        wide = np.zeros(chunks, x.dtype)  # dy[n, k] on the wide grid: zero in the dropped columns and past the end
        sums = np.zeros((len(offsets), SUM_CHUNK), x.dtype)  # a sample's
        totals = np.zeros((taps, SUM_CHUNK))  # the samples', in float64
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
            for tap in range(0, len(offsets), 3):
                s0, s1, s2 = sums[tap], sums[tap + 1], sums[tap + 2]
                a0, a1, a2 = np.uint64(offsets[tap]), np.uint64(offsets[tap + 1]), np.uint64(offsets[tap + 2])
                for o0 in range(0, chunks, SUM_CHUNK):
                    for e in range(SUM_CHUNK):
                        i, e_ = np.uint64(o0 + e), np.uint64(e)
                        v = wide[i]
                        s0[e_] += v * padded[i + a0]
                        s1[e_] += v * padded[i + a1]
                        s2[e_] += v * padded[i + a2]
            for tap in range(taps):
                for e in range(SUM_CHUNK):
                    totals[tap, e] += sums[tap, e]
                    sums[tap, e] = 0.0
        for tap in range(taps):
            total = 0.0
            for e in range(SUM_CHUNK):
                total += totals[tap, e]
            dw[k, 0, tap // (R * S), (tap // S) % R, tap % S] = total


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
            move_lanes(wide, 0, dy[n], k0, lanes, Hp, Wp, False)
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
