"""im2col + BLAS on the CPU (contract: kernels/contract.py).

x (N, C, D, H, W) * w (K, C/g, T, R, S) -> y (N, K, P, Q, U). Per sample n and group g, with
O = P*Q*U output positions and the column matrix cols (C/g*T*R*S, O):

    forward:          y[n, g] (K/g, O)       = W_g (K/g, CTRS) @ cols
    backward_data:    dcols (CTRS, O)        = W_g^T @ dy[n, g]; dx = col2im(dcols) as a gather (no races)
    backward_filter:  dW_g (K/g, CTRS)      += dy[n, g] @ cols^T, summed over n in order (deterministic)

The columns of one sample are built for a block of B output positions at a time, B chosen so that the
scratch (cols, and the GEMM result block) stays under workspace_limit (default 256 MiB); GEMMs are NumPy's
BLAS. im2col_cpu: one task per column-matrix row (c, t, r, s); col2im_cpu: one task per (c, input row).
"""
import numba
import numpy as np
from cnnfast.kernels.cpu.direct import geometry_args, out_range, tap_output

DEFAULT_WORKSPACE_LIMIT = 256 << 20


@numba.njit(parallel=True, cache=True)
def im2col_cpu(x, n, c0, cols, taps, o0, sd, sh, sw, dd, dh, dw_, pd, ph, pw, Q, U):
    """cols[row, j] for row = ((c*T + t)*R + r)*S + s and output position o = o0 + j = (p*Q + q)*U + u:
    x[n, c0 + c, p*sd - pd + t*dd, q*sh - ph + r*dh, u*sw - pw + s*dw], or 0 outside x.
    taps = (T, R, S). One task per row; each output-row segment is a zero / copy / zero run."""
    _, _, D, H, W = x.shape
    T, R, S = taps[0], taps[1], taps[2]
    rows, B = cols.shape
    for row in numba.prange(rows):
        s = row % S
        r = (row // S) % R
        t = (row // (S * R)) % T
        c = row // (S * R * T)
        u_lo, u_hi = out_range(pw, s * dw_, sw, W, U)
        base = s * dw_ - pw
        j = 0
        while j < B:
            o = o0 + j
            u0 = o % U
            q = (o // U) % Q
            p = o // (U * Q)
            seg = min(U - u0, B - j)
            di = p * sd - pd + t * dd
            hi = q * sh - ph + r * dh
            if di < 0 or di >= D or hi < 0 or hi >= H:
                cols[row, j:j + seg] = 0.0
            else:
                xrow = x[n, c0 + c, di, hi]
                a = min(max(u_lo, u0), u0 + seg)
                b = max(min(u_hi, u0 + seg), a)
                cols[row, j:j + a - u0] = 0.0
                if sw == 1:
                    for u in range(a, b):
                        cols[row, j + u - u0] = xrow[u + base]
                else:
                    for u in range(a, b):
                        cols[row, j + u - u0] = xrow[u * sw + base]
                cols[row, j + b - u0:j + seg] = 0.0
            j += seg


@numba.njit(parallel=True, cache=True)
def col2im_cpu(dcols, dx, n, c0, taps, o0, sd, sh, sw, dd, dh, dw_, pd, ph, pw, P, Q, U):
    """dx[n, c0 + c, i, j, l] += sum over taps (t, r, s) that read (i, j, l) from an output o = (p*Q + q)*U + u
    in this block [o0, o0 + B) of dcols[((c*T + t)*R + r)*S + s, o - o0]: a gather, one task per (c, i, j)."""
    _, _, D, H, W = dx.shape
    T, R, S = taps[0], taps[1], taps[2]
    Cg = dcols.shape[0] // (T * R * S)
    o1 = o0 + dcols.shape[1]
    for task in numba.prange(Cg * D * H):
        ih = task % H
        i_d = (task // H) % D
        c = task // (H * D)
        for l in range(W):
            total = dx[n, c0 + c, i_d, ih, l]
            for t in range(T):
                p = tap_output(i_d, pd, t * dd, sd, P)
                if p < 0:
                    continue
                for r in range(R):
                    q = tap_output(ih, ph, r * dh, sh, Q)
                    if q < 0:
                        continue
                    for s in range(S):
                        u = tap_output(l, pw, s * dw_, sw, U)
                        if u < 0:
                            continue
                        o = (p * Q + q) * U + u
                        if o0 <= o < o1:
                            total += dcols[((c * T + t) * R + r) * S + s, o - o0]
            dx[n, c0 + c, i_d, ih, l] = total


def _scratch(g, primitive, itemsize, B):
    """Bytes of scratch for column blocks of B positions: cols/dcols (CTRS, B), plus the GEMM temporaries
    (forward: a (K/g, B) block unless B covers the whole row; backward_filter: the (K/g, CTRS) product)."""
    rows, Kg, O = (g.C // g.groups) * g.T * g.R * g.S, g.K // g.groups, g.P * g.Q * g.U
    extra = {"forward": Kg * B if B < O else 0, "backward_data": 0, "backward_filter": Kg * rows}[primitive]
    return (rows * B + extra) * itemsize


def _block(g, primitive, itemsize, workspace_limit):
    """The largest block of output positions whose scratch fits workspace_limit (at least 1)."""
    limit = DEFAULT_WORKSPACE_LIMIT if workspace_limit is None else workspace_limit
    O = g.P * g.Q * g.U
    if _scratch(g, primitive, itemsize, O) <= limit:
        return O
    rows, Kg = (g.C // g.groups) * g.T * g.R * g.S, g.K // g.groups
    fixed = _scratch(g, primitive, itemsize, 0) if primitive == "backward_filter" else 0
    per = (rows + (Kg if primitive == "forward" else 0)) * itemsize
    return int(max(1, min(O, (limit - fixed) // per)))


def workspace_bytes(g, primitive, itemsize, workspace_limit):
    return _scratch(g, primitive, itemsize, _block(g, primitive, itemsize, workspace_limit))


def _blocks(g, primitive, itemsize, workspace_limit):
    B = _block(g, primitive, itemsize, workspace_limit)
    O = g.P * g.Q * g.U
    return [(o0, min(B, O - o0)) for o0 in range(0, O, B)], (g.C // g.groups) * g.T * g.R * g.S


def forward(x, w, bias, y, g, workspace_limit=None):
    Kg, Cg, O = g.K // g.groups, g.C // g.groups, g.P * g.Q * g.U
    blocks, rows = _blocks(g, "forward", x.itemsize, workspace_limit)
    cols_buf = np.empty(rows * blocks[0][1], x.dtype)
    taps = np.array([g.T, g.R, g.S], np.int64)
    w2 = w.reshape(g.groups, Kg, rows)
    y2 = y.reshape(g.N, g.groups, Kg, O)
    sd, sh, sw, dd, dh, dw_, pd, ph, pw, _ = geometry_args(g)
    for n in range(g.N):
        for grp in range(g.groups):
            for o0, B in blocks:
                cols = cols_buf[:rows * B].reshape(rows, B)
                im2col_cpu(x, n, grp * Cg, cols, taps, o0, sd, sh, sw, dd, dh, dw_, pd, ph, pw, g.Q, g.U)
                if B == O:
                    np.matmul(w2[grp], cols, out=y2[n, grp])
                else:
                    y2[n, grp, :, o0:o0 + B] = w2[grp] @ cols
    if bias is not None:
        y += bias.reshape(1, -1, 1, 1, 1)


def backward_data(dy, w, dx, g, workspace_limit=None):
    Kg, Cg, O = g.K // g.groups, g.C // g.groups, g.P * g.Q * g.U
    blocks, rows = _blocks(g, "backward_data", dx.itemsize, workspace_limit)
    dcols_buf = np.empty(rows * blocks[0][1], dx.dtype)
    taps = np.array([g.T, g.R, g.S], np.int64)
    w2t = w.reshape(g.groups, Kg, rows).transpose(0, 2, 1)
    dy2 = dy.reshape(g.N, g.groups, Kg, O)
    dx[...] = 0
    sd, sh, sw, dd, dh, dw_, pd, ph, pw, _ = geometry_args(g)
    for n in range(g.N):
        for grp in range(g.groups):
            for o0, B in blocks:
                dcols = dcols_buf[:rows * B].reshape(rows, B)
                np.matmul(w2t[grp], dy2[n, grp, :, o0:o0 + B], out=dcols)
                col2im_cpu(dcols, dx, n, grp * Cg, taps, o0, sd, sh, sw, dd, dh, dw_, pd, ph, pw, g.P, g.Q, g.U)


def backward_filter(x, dy, dw, g, workspace_limit=None):
    Kg, Cg, O = g.K // g.groups, g.C // g.groups, g.P * g.Q * g.U
    blocks, rows = _blocks(g, "backward_filter", x.itemsize, workspace_limit)
    cols_buf = np.empty(rows * blocks[0][1], x.dtype)
    taps = np.array([g.T, g.R, g.S], np.int64)
    dw2 = dw.reshape(g.groups, Kg, rows)
    dw2[...] = 0
    dy2 = dy.reshape(g.N, g.groups, Kg, O)
    sd, sh, sw, dd, dh, dw_, pd, ph, pw, _ = geometry_args(g)
    for n in range(g.N):
        for grp in range(g.groups):
            for o0, B in blocks:
                cols = cols_buf[:rows * B].reshape(rows, B)
                im2col_cpu(x, n, grp * Cg, cols, taps, o0, sd, sh, sw, dd, dh, dw_, pd, ph, pw, g.Q, g.U)
                dw2[grp] += dy2[n, grp, :, o0:o0 + B] @ cols.T
