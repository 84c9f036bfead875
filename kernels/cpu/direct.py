"""Direct convolution on the CPU, register/cache blocked, row by row (contract: kernels/contract.py).

x (N, C, D, H, W) * w (K, C/g, T, R, S) -> y (N, K, P, Q, U); 1-D/2-D problems carry unit axes.

forward:         one task per (n, group, block of KB output channels, output row (p, q)); the task keeps a
                 KB x U accumulator and, for each input channel and tap, adds w * x-row into it. The
                 innermost loop runs over the output row u, unit-stride in the accumulator (and in x for
                 stride 1), so LLVM vectorises it; zero padding clips the u-range per tap (no branches), and
                 afterwards the outputs whose NaN or inf weight reads padding are made NaN (w * 0, as in the reference).
backward_data:   the same gather with the roles of x and y swapped: one task per (n, group, block of CB
                 input channels, input row (i, j)); dx row += w * dy-row at l = u*s - pad + s_tap*dil.
backward_filter: one task per (k, c): dw[k, c, :, :, :] sums dy-row . x-row over n, p, q in a fixed order (the
                 padding's zeros skipped, then, in the channels whose dy holds a NaN or inf, 0 * dy added at them:
                 NaN, as in the reference).
No task writes what another task writes, so results are deterministic (no atomics, fixed order).

The launchers run these row kernels only where the wide kernels (wide.py: the batch's padded planes end to end, three
taps a pass) do not: fewer than wide.MIN_CHANNELS destination channels per group, scratch over workspace_limit, or a
non-finite value the wide kernels would not reproduce as the reference has it.
"""
import numba
import numpy as np
from cnnfast.kernels.cpu.threads import njit, parallel, sized

KB = 8  # output channels per forward task (register/cache block)
CB = 8  # input channels per backward-data task
# Floating-point flags: FMA contraction everywhere (one rounding instead of two); the filter kernel's dot
# products may also be reassociated so LLVM vectorises them. Fixed code, so results stay bit-identical.
CONTRACT = {"contract"}
CONTRACT_REASSOC = {"contract", "reassoc"}


@numba.njit(inline="always")
def out_range(pad, offset, stride, length, n_out):
    """[lo, hi) of outputs o with 0 <= o*stride - pad + offset < length (offset = tap * dilation), within
    [0, n_out]: lo <= hi <= n_out, also where no output reads inside (a tap over the padding only)."""
    first = pad - offset
    lo = 0 if first <= 0 else min(n_out, (first + stride - 1) // stride)
    last = length - 1 + pad - offset
    hi = 0 if last < 0 else min(n_out, last // stride + 1)
    return lo, max(lo, hi)


@numba.njit(inline="always")
def tap_output(i, pad, offset, stride, n_out):
    """The output o whose tap (offset = tap * dilation) reads input i, o*stride - pad + offset == i; -1 if none."""
    num = i + pad - offset
    if num < 0 or num % stride != 0 or num // stride >= n_out:
        return -1
    return num // stride


@parallel(fastmath=CONTRACT)
def direct_forward_cpu(x, w, bias, has_bias, y, sd, sh, sw, dd, dh, dw_, pd, ph, pw, groups):
    N, C, D, H, W = x.shape
    K, Cg, T, R, S = w.shape
    _, _, P, Q, U = y.shape
    Kg = K // groups
    nkb = (Kg + KB - 1) // KB
    for task in numba.prange(N * groups * nkb * P * Q):
        q = task % Q
        p = (task // Q) % P
        kb = (task // (P * Q)) % nkb
        g = (task // (P * Q * nkb)) % groups
        n = task // (P * Q * nkb * groups)
        k0 = g * Kg + kb * KB
        nk = min(KB, g * Kg + Kg - k0)
        acc = np.zeros((KB, U), dtype=y.dtype)
        for c in range(Cg):
            ci = g * Cg + c
            for t in range(T):
                di = p * sd - pd + t * dd
                if di < 0 or di >= D:
                    continue
                for r in range(R):
                    hi = q * sh - ph + r * dh
                    if hi < 0 or hi >= H:
                        continue
                    xrow = x[n, ci, di, hi]
                    for s in range(S):
                        u0, u1 = out_range(pw, s * dw_, sw, W, U)
                        base = s * dw_ - pw
                        if sw == 1:  # unit stride: slices and a 0-based loop, which LLVM vectorises (FMA, ymm)
                            xs = xrow[u0 + base:u1 + base]
                            for kk in range(nk):
                                wv = w[k0 + kk, c, t, r, s]
                                a = acc[kk, u0:u1]
                                for i in range(xs.shape[0]):
                                    a[i] += wv * xs[i]
                        else:
                            for kk in range(nk):
                                wv = w[k0 + kk, c, t, r, s]
                                for u in range(u0, u1):
                                    acc[kk, u] += wv * xrow[u * sw + base]
        for kk in range(nk):
            b = bias[k0 + kk] if has_bias else 0.0
            for u in range(U):
                y[n, k0 + kk, p, q, u] = acc[kk, u] + b


@parallel(fastmath=CONTRACT)
def direct_backward_data_cpu(dy, w, dx, sd, sh, sw, dd, dh, dw_, pd, ph, pw, groups):
    N, C, D, H, W = dx.shape
    K, Cg, T, R, S = w.shape
    _, _, P, Q, U = dy.shape
    Kg = K // groups
    ncb = (Cg + CB - 1) // CB
    for task in numba.prange(N * groups * ncb * D * H):
        i_h = task % H
        i_d = (task // H) % D
        cb = (task // (D * H)) % ncb
        g = (task // (D * H * ncb)) % groups
        n = task // (D * H * ncb * groups)
        c0 = cb * CB
        nc = min(CB, Cg - c0)
        acc = np.zeros((CB, W), dtype=dx.dtype)
        for t in range(T):
            p = tap_output(i_d, pd, t * dd, sd, P)
            if p < 0:
                continue
            for r in range(R):
                q = tap_output(i_h, ph, r * dh, sh, Q)
                if q < 0:
                    continue
                for s in range(S):
                    u0, u1 = out_range(pw, s * dw_, sw, W, U)
                    base = s * dw_ - pw
                    for kk in range(Kg):
                        k = g * Kg + kk
                        ds = dy[n, k, p, q, u0:u1]
                        for cc in range(nc):
                            wv = w[k, c0 + cc, t, r, s]
                            if sw == 1:  # vectorised like forward
                                a = acc[cc, u0 + base:u1 + base]
                                for i in range(ds.shape[0]):
                                    a[i] += wv * ds[i]
                            else:
                                for u in range(u0, u1):
                                    acc[cc, u * sw + base] += wv * ds[u - u0]
        for cc in range(nc):
            for l in range(W):
                dx[n, g * Cg + c0 + cc, i_d, i_h, l] = acc[cc, l]


@parallel(fastmath=CONTRACT_REASSOC)
def direct_backward_filter_cpu(x, dy, dw, special, sd, sh, sw, dd, dh, dw_, pd, ph, pw, groups):
    N, C, D, H, W = x.shape
    K, Cg, T, R, S = dw.shape
    _, _, P, Q, U = dy.shape
    Kg = K // groups
    for task in numba.prange(K * Cg):
        c = task % Cg
        k = task // Cg
        ci = (k // Kg) * Cg + c
        acc = np.zeros((T, R, S), dtype=dw.dtype)
        for n in range(N):
            for p in range(P):
                for q in range(Q):
                    for t in range(T):
                        di = p * sd - pd + t * dd
                        if di < 0 or di >= D:
                            continue
                        for r in range(R):
                            hi = q * sh - ph + r * dh
                            if hi < 0 or hi >= H:
                                continue
                            for s in range(S):
                                u0, u1 = out_range(pw, s * dw_, sw, W, U)
                                base = s * dw_ - pw
                                ds = dy[n, k, p, q, u0:u1]
                                total = acc[t, r, s]
                                if sw == 1:
                                    xs = x[n, ci, di, hi, u0 + base:u1 + base]
                                    for i in range(ds.shape[0]):
                                        total += ds[i] * xs[i]
                                else:
                                    for u in range(u0, u1):
                                        total += ds[u - u0] * x[n, ci, di, hi, u * sw + base]
                                acc[t, r, s] = total
        for n in range(N if special[k] else 0):  # the taps that read the padding: 0 * dy, NaN where dy is NaN or
            for p in range(P):                   # inf (the reference's); special[k]: dy[:, k] holds one
                for q in range(Q):
                    for u in range(U):
                        v = dy[n, k, p, q, u]
                        if not np.isfinite(v):
                            for t in range(T):
                                for r in range(R):
                                    for s in range(S):
                                        if not (0 <= p * sd - pd + t * dd < D and 0 <= q * sh - ph + r * dh < H
                                                and 0 <= u * sw - pw + s * dw_ < W):
                                            acc[t, r, s] += v * 0
        for t in range(T):
            for r in range(R):
                for s in range(S):
                    dw[k, c, t, r, s] = acc[t, r, s]


def workspace_bytes(g, primitive, itemsize, workspace_limit):
    """The wide kernels' scratch where they run (wide.fits), else 0: the row kernels need none."""
    fit = wide.fits(g, primitive, itemsize, workspace_limit)
    return wide.workspace_bytes(g, primitive, itemsize, workspace_limit) if fit else 0


def geometry_args(g):
    """The scalar kernel arguments shared by every CPU kernel: strides, dilations, low pads, groups."""
    return (g.stride_d, g.stride_h, g.stride_w, g.dil_d, g.dil_h, g.dil_w, g.pad_d, g.pad_h, g.pad_w, g.groups)


def forward(x, w, bias, y, g, workspace_limit=None):
    if wide.fits(g, "forward", x.itemsize, workspace_limit):  # (the padding's zeros are multiplied)
        wide.forward(x, w, bias, y, g, workspace_limit)
        return
    has_bias = bias is not None
    sized(direct_forward_cpu, g.dense_macs)(x, w, bias if has_bias else np.zeros(1, x.dtype), has_bias, y,
                                            *geometry_args(g))
    nan_where_nonfinite_taps_read_padding(w, y, g)


def nan_where_nonfinite_taps_read_padding(w, y, g):
    """The forward kernels skip the zero padding; torch and the reference multiply it, and a NaN or inf weight times
    0 is NaN: the outputs y[:, k, p, q, u] whose non-finite tap w[k, :, t, r, s] reads padding are made NaN here.
    w (K, C/g, T, R, S), y (N, K, P, Q, U). One pass over w (nonfinite_channels), and only a padded layer's."""
    padded = (g.pad_d or g.pad_h or g.pad_w  # a low pad, or the last output's last tap past the input's end
              or (g.P - 1) * g.stride_d + (g.T - 1) * g.dil_d - g.pad_d >= g.D
              or (g.Q - 1) * g.stride_h + (g.R - 1) * g.dil_h - g.pad_h >= g.H
              or (g.U - 1) * g.stride_w + (g.S - 1) * g.dil_w - g.pad_w >= g.W)
    if not padded or y.size == 0 or not nonfinite_channels(w.reshape(1, g.K, -1)).any():
        return
    def inside(n_out, stride, dil, pad, length, tap):  # outputs whose tap reads inside the input along one axis
        pos = np.arange(n_out) * stride - pad + tap * dil
        return (pos >= 0) & (pos < length)
    for k, t, r, s in zip(*np.nonzero(~np.isfinite(w).all(axis=1))):
        read = (inside(g.P, g.stride_d, g.dil_d, g.pad_d, g.D, t)[:, None, None]
                & inside(g.Q, g.stride_h, g.dil_h, g.pad_h, g.H, r)[None, :, None]
                & inside(g.U, g.stride_w, g.dil_w, g.pad_w, g.W, s)[None, None, :])
        y[:, k][:, ~read] = np.nan


def backward_data(dy, w, dx, g, workspace_limit=None):
    # the wide kernel multiplies dy's zero border too: a NaN or inf weight would give NaN (inf * 0) in dx where that
    # tap reads no dy, so such weights take the row kernel
    if (wide.fits(g, "backward_data", dx.itemsize, workspace_limit)
            and not nonfinite_channels(w.reshape(1, g.K, -1)).any()):
        wide.backward_data(dy, w, dx, g, workspace_limit)
        return
    sized(direct_backward_data_cpu, g.dense_macs)(dy, w, dx, *geometry_args(g))


@njit(fastmath=CONTRACT_REASSOC)
def nonfinite_channels(dy):
    """dy (N, K, L) -> (K,) bools: whether dy[:, k] holds a NaN or an inf. Summed as v - v (0, or NaN for a NaN or an
    inf; reassociation lets LLVM vectorise the sum, and without the no-NaN flag it cannot fold v - v to 0): one pass
    over dy and no temporary as large as it, where NumPy's isfinite made one (and cost ~7 us on a tiny call)."""
    N, K, L = dy.shape
    out = np.zeros(K, np.bool_)
    for k in range(K):
        total = 0.0
        for n in range(N):
            row = dy[n, k]
            for i in range(L):
                total += row[i] - row[i]
        out[k] = total != total
    return out


def backward_filter(x, dy, dw, g, workspace_limit=None):
    # the wide kernel's dot products also meet x at the dropped grid positions (dy 0 there): an inf or NaN in x can
    # make NaN (inf * 0) in a tap that never reads it, so a non-finite result is computed again by the row kernel
    if wide.fits(g, "backward_filter", x.itemsize, workspace_limit):
        wide.backward_filter(x, dy, dw, g, workspace_limit)
        if not nonfinite_channels(dw.reshape(1, g.K, -1)).any():
            return
    special = nonfinite_channels(dy.reshape(g.N, g.K, g.P * g.Q * g.U))  # per output channel: a NaN or inf in its dy
    sized(direct_backward_filter_cpu, g.dense_macs)(x, dy, dw, special, *geometry_args(g))


from cnnfast.kernels.cpu import wide  # noqa: E402  (last: wide.py takes the flags above from this module)
