"""Depthwise convolution on the CPU: groups == C, K = M*C (channel multiplier M >= 1).

x (N, C, D, H, W) * w (K, 1, T, R, S) -> y (N, K, P, Q, U); output channel k reads input channel k // M.
Memory-bound (T*R*S multiply-adds per output), so each task streams whole planes once:

    forward:         one task per (n, k) plane; each output row accumulates its taps into a U-long row.
    backward_data:   one task per (n, c) plane; dx row gathers dy rows of the M filters of channel c.
    backward_filter: direct's kernel (one task per k when C/groups == 1), a fixed-order sum over n, p, q.
"""
import numba
import numpy as np
from cnnfast.kernels.cpu.direct import CONTRACT, direct_backward_filter_cpu, geometry_args, out_range, tap_output


@numba.njit(cache=True)
def tap_ranges(S, pw, dw_, sw, W, U):
    """(lo, hi): per tap s, the outputs u in [lo[s], hi[s]) whose tap reads inside a W-long input row."""
    lo, hi = np.empty(S, np.int64), np.empty(S, np.int64)
    for s in range(S):
        lo[s], hi[s] = out_range(pw, s * dw_, sw, W, U)
    return lo, hi


@numba.njit(parallel=True, cache=True, fastmath=CONTRACT)
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


@numba.njit(parallel=True, cache=True, fastmath=CONTRACT)
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


def supports(g, primitive):
    return None if g.is_depthwise else (f"depthwise needs groups == in_channels and out_channels a multiple "
                                        f"of them, got groups={g.groups}, C={g.C}, K={g.K}")


def forward(x, w, bias, y, g, workspace_limit=None):
    has_bias = bias is not None
    depthwise_forward_cpu(x, w, bias if has_bias else np.zeros(1, x.dtype), has_bias, y, *geometry_args(g)[:9])


def backward_data(dy, w, dx, g, workspace_limit=None):
    depthwise_backward_data_cpu(dy, w, dx, *geometry_args(g)[:9])


def backward_filter(x, dy, dw, g, workspace_limit=None):
    # direct's filter kernel already runs one task per (k, c) = per k here, streaming x and dy once each
    direct_backward_filter_cpu(x, dy, dw, *geometry_args(g))
