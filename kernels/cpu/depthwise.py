"""Depthwise convolution on the CPU: groups == C, K = M*C (channel multiplier M >= 1).

x (N, C, D, H, W) * w (K, 1, T, R, S) -> y (N, K, P, Q, U); output channel k reads input channel k // M.
Memory-bound (T*R*S multiply-adds per output), so each task streams whole planes once. Three kernel families, the
first of takes(g, primitive) whose scratch for every thread fits workspace_limit running (family):

    lanes: LANES channels of small planes per pass (depthwise_planes.py): grids of at most LANES_POSITIONS positions
           (the weight gradient: LANES_FILTER_POSITIONS, at a stride LANES_STRIDED_FILTER_POSITIONS; the input
           gradient at a stride: dx planes of LANES_STRIDED_DATA_POSITIONS, by sub-pixel classes), a block of
           channels for every thread.
    wide:  one plane per pass (depthwise_planes.py): at unit stride; at a stride the forward of planes of at least
           STRIDED_WIDE_POSITIONS outputs (on stride-phase volumes) and the input gradient of at most MAX_CLASSES
           sub-pixel classes (subpixel_classes).
    rows:  the row kernels here, an output row at a time:
           forward:         one task per (n, k) plane; each output row accumulates its taps into a U-long row.
           backward_data:   one task per (n, c) plane; dx row gathers dy rows of the M filters of channel c.
           backward_filter: direct's kernels (one task per k when C/groups == 1), a fixed-order sum over n, p, q.

The plane kernels' scratch (_scratch: about two planes per thread, LANES planes deep for the lanes kernels) counts
against workspace_limit. Non-finite values as the reference has them: the wide input gradient also multiplies dy's
zero border, so a NaN or inf weight takes the row kernel; the wide weight gradient also meets x past each row (dy 0
there), so a result that is not finite is computed again by direct's kernel; the row forward skips the padding, whose
products with a non-finite weight are then set to NaN (direct.nan_where_nonfinite_taps_read_padding).
"""
import math
from functools import lru_cache

import numba
import numpy as np
from cnnfast.kernels.contract import DEFAULT_WORKSPACE_LIMIT
from cnnfast.kernels.cpu import direct
from cnnfast.kernels.cpu.depthwise_planes import (
    LANE_CHUNK,
    LANES,
    SUM_CHUNK,
    depthwise_lanes_classes_cpu,
    depthwise_lanes_cpu,
    depthwise_lanes_filter_cpu,
    depthwise_wide_classes_cpu,
    depthwise_wide_cpu,
    depthwise_wide_filter_cpu,
)
from cnnfast.kernels.cpu.direct import CONTRACT, geometry_args, out_range, tap_output
from cnnfast.kernels.cpu.threads import DEFAULT_SERIAL_WORK, njit, parallel, sized


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
    grids); the lanes kernels' are LANES planes deep, beside their weights (or sums) laid out per lane; the wide
    weight gradient's grid is whole chunks long, its padded volume as many elements longer, beside its partial sums
    (a sample's, and in float64 the batch's); and each kernel's int64 tap offsets and source rows."""
    if primitive == "backward_data" and not g.stride_d == g.stride_h == g.stride_w == 1:
        classes, taps, lows = subpixel_classes(g)
        grids = max(int((classes[:, 8] + classes[:, 3] * lows[4] * lows[5]).max()), 1)
        if family == "wide":
            return (int(np.prod(lows[3:])) + grids) * itemsize + 8
        weights = g.K // g.C * len(taps) * LANE_CHUNK
        return (int(np.prod(lows[3:])) + grids + weights) * LANES * itemsize + (len(taps) + LANES) * 8
    P, Q, U = (g.D, g.H, g.W) if primitive == "backward_data" else (g.P, g.Q, g.U)
    strided = primitive == "forward" or primitive == "backward_filter" and family == "lanes"
    sd, sh, sw = (g.stride_d, g.stride_h, g.stride_w) if strided else (1, 1, 1)
    Dp, Hp, Wp = P + (g.T - 1) * g.dil_d // sd, Q + (g.R - 1) * g.dil_h // sh, U + (g.S - 1) * g.dil_w // sw
    wide = ((P - 1) * Hp + (Q - 1)) * Wp + U
    taps = g.T * g.R * g.S
    if family == "wide" and primitive == "backward_filter":
        chunks = -(-wide // SUM_CHUNK) * SUM_CHUNK
        threes = -(-taps // 3) * 3
        return (Dp * Hp * Wp + 2 * chunks - wide + threes * SUM_CHUNK) * itemsize + (taps * SUM_CHUNK + threes + 1) * 8
    if family == "wide":
        return (sd * sh * sw * Dp * Hp * Wp + wide + taps) * itemsize + (taps + 1) * 8
    weights = (taps if primitive == "backward_filter" else (g.K // g.C if primitive == "backward_data" else 1) * taps
               + 1) * LANE_CHUNK
    return (sd * sh * sw * Dp * Hp * Wp + wide + weights) * LANES * itemsize + (taps + LANES) * 8


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


# The lanes kernels run the forward (at any stride) and the unit-stride input gradient on grids (the output plane, the
# dx plane) of at most this many positions: ms lanes / wide kernel, batch 8, ~47,000 positions x channels a sample,
# 2 threads (2026-12-07, after the interleave's loops of a constant count; earlier figures in bench/RESULTS.md):
# forward, input gradient 3x3 7x7 0.26 / 0.41, 0.29 / 0.44; 10x10 0.24 / 0.28, 0.26 / 0.30; 12x12 0.22 / 0.23; 14x14
# 0.25 / 0.22; 5x5 7x7 0.44 / 0.69; 10x10 0.39 / 0.47; 12x12 0.37 / 0.39; 14x14 0.39 / 0.39; the forward at stride 2,
# 3x3 outputs 9x9 0.48 / 0.54, 12x12 0.49 / 0.51, 14x14 0.51 / 0.48; 5x5 9x9 0.66 / 0.74, 14x14 0.68 / 0.65.
LANES_POSITIONS = 100
# ... the unit-stride weight gradient on grids of at most this many (lanes / wide, after the wide kernel's partial sums:
# 3x3 7x7 0.31 / 0.55, 10x10 0.27 / 0.39, 14x14 0.25 / 0.30, 16x16 0.26 / 0.25; 5x5 7x7 0.65 / 1.49, 14x14 0.45 /
# 0.68, 16x16 0.44 / 0.57, 20x20 0.58 / 0.44)
LANES_FILTER_POSITIONS = 256
# ... and the weight gradient at a stride, which has no wide kernel (direct's kernel, one task per filter, otherwise),
# on output planes of at most this many: ms lanes / direct, stride 2, 3x3 outputs 14x14 0.53 / 1.98; 28x28 0.50 /
# 1.27; 56x56 (4 x 96 channels) 1.48 / 3.02, (2 x 48) 0.63 / 0.80; 64x64 (4 x 64) 1.62 / 2.34; 80x80 (1 x 32) 0.48 /
# 0.46; 112x112 (2 x 32) 2.42 / 1.79; 5x5 28x28 0.72 / 3.04, 56x56 (1 x 96) 0.63 / 1.89.
LANES_STRIDED_FILTER_POSITIONS = 3136
# ... and the input gradient at a stride on dx planes of at most this many (its sub-pixel classes' grids LANES channels
# at a time): ms lanes / wide classes kernel, stride 2, batch 8, ~47,000 dx positions x channels a sample, into a
# preallocated dx (2026-12-07, after the wide kernel's paired scatter; `sweep` of
# bench/results/strided_input_gradient_2026-12-07.py): 3x3 7x7 0.23 / 0.47, 10x10 0.19 / 0.32, 14x14 0.18 / 0.26,
# 20x20 0.17 / 0.18, 24x24 0.17 / 0.15, 28x28 0.19 / 0.16, 40x40 0.21 / 0.12; 5x5 7x7 0.33 / 0.75, 14x14 0.21 / 0.32,
# 20x20 0.18 / 0.22, 24x24 0.19 / 0.23, 28x28 0.24 / 0.22, 40x40 0.25 / 0.19.
LANES_STRIDED_DATA_POSITIONS = 400


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
    LANES_STRIDED_FILTER_POSITIONS; the input gradient at a stride: LANES_STRIDED_DATA_POSITIONS dx positions, of at
    most MAX_CLASSES classes) with a task for every thread that runs it (a
    block of LANES channels; in the forward and input gradient, of one sample: on two threads one block of 16 filters
    ran a 56x56 strided weight gradient at 0.67x direct's kernel's speed; a call small enough for the serial build has
    one); "wide" at unit stride, or at a stride the forward of a plane of at least STRIDED_WIDE_POSITIONS outputs
    and the input gradient of at most MAX_CLASSES classes (depthwise_wide_classes_cpu: 1.4-4x faster than the row
    kernel from 4x4 to 56x56 dy planes, 2026-12-06)."""
    unit = g.stride_d == g.stride_h == g.stride_w == 1
    positions = g.D * g.H * g.W if primitive == "backward_data" else g.P * g.Q * g.U
    most = LANES_POSITIONS if unit or primitive == "forward" else LANES_STRIDED_DATA_POSITIONS
    if primitive == "backward_filter":
        most = LANES_FILTER_POSITIONS if unit else LANES_STRIDED_FILTER_POSITIONS
    blocks = -(-(g.C if primitive == "backward_data" else g.K) // LANES)
    tasks = blocks if primitive == "backward_filter" else blocks * g.N
    threads = 1 if g.dense_macs < DEFAULT_SERIAL_WORK else _threads()
    classes = primitive == "backward_data" and class_count(g) <= MAX_CLASSES
    lanes = (unit or classes or primitive != "backward_data") and positions <= most and tasks >= threads
    wide = unit or classes or primitive == "forward" and g.P * g.Q * g.U >= STRIDED_WIDE_POSITIONS
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
    """Samples per task of depthwise_lanes_cpu and depthwise_lanes_classes_cpu: all of them, unless their blocks of
    LANES channels are fewer than four tasks a thread."""
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
        strides = (g.stride_d, g.stride_h, g.stride_w)
        if name == "lanes":
            sized(depthwise_lanes_classes_cpu, g.dense_macs)(dy, w, dx, *subpixel_classes(g), *strides,
                                                             _samples(g.N, g.C))
        else:
            sized(depthwise_wide_classes_cpu, g.dense_macs)(dy, w, dx, *subpixel_classes(g), *strides,
                                                            _planes(g.N * g.C))
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
