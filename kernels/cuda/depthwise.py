"""Depthwise convolution on CUDA: groups == C, K = M*C (channel multiplier M); memory-bound.

x (N, C, D, H, W) * w (K, 1, T, R, S) -> y (N, K, P, Q, U); output channel k reads input channel k // M.
    forward_kernel:       thread (grid-stride) per output y[n, k, o]: T*R*S taps from x, weights from w.
    backward_data_kernel: thread per input dx[n, c, i]: gathers dy of the M filters of c over the taps that
                          read i (no atomics).
Each thread splits its flat index into coordinates once; the tap loops then need no integer division
(backward_data: only to test divisibility by a stride > 1).
    backward_filter:      direct's split-reduction kernel (deterministic partial sums).
Consecutive threads own consecutive o (or i), so x/dy/y accesses are coalesced along the row.
"""
from cnnfast.kernels.cuda import direct, gemm
from cnnfast.kernels.cuda.compile import ZERO
from cnnfast.kernels.cuda.launch import launch
from numba import cuda

BLOCK = 256
MAX_BLOCKS = 8192


def forward_kernel(x, w, bias, y, geo, has_bias):
    """Thread (grid-stride) per output y[n, k, p, q, u]: the window's first input (d0, h0, w0) is found once,
    then the taps walk it in (t, r, s) order with no division (padding reads as 0)."""
    C, D, H, W, K, T, R, S = geo[1], geo[2], geo[3], geo[4], geo[5], geo[6], geo[7], geo[8]
    P, Q, U = geo[9], geo[10], geo[11]
    O = P * Q * U
    M = K // C
    for e in range(cuda.grid(1), geo[0] * K * O, cuda.gridsize(1)):
        n, k, p, q, u = gemm.split(e, K, P, Q, U)
        d0 = p * geo[12] - geo[18]
        h0 = q * geo[13] - geo[19]
        w0 = u * geo[14] - geo[20]
        plane = (n * C + k // M) * D * H * W
        tap = k * T * R * S
        total = bias[k] if has_bias else ZERO
        for t in range(T):
            di = d0 + t * geo[15]
            for r in range(R):
                hi = h0 + r * geo[16]
                inside = di >= 0 and di < D and hi >= 0 and hi < H
                row = plane + (di * H + hi) * W
                for s in range(S):
                    wi = w0 + s * geo[17]
                    v = x[row + wi] if inside and wi >= 0 and wi < W else ZERO
                    total += w[tap] * v
                    tap += 1
        y[e] = total


def backward_data_kernel(dy, w, dx, geo):
    """Thread (grid-stride) per input dx[n, c, i_d, ih, iw]: for each filter m of channel c and tap (t, r, s),
    the output that reads it (gemm.output_of: a division only when the stride is > 1), in (m, t, r, s) order."""
    C, D, H, W, K, T, R, S = geo[1], geo[2], geo[3], geo[4], geo[5], geo[6], geo[7], geo[8]
    P, Q, U = geo[9], geo[10], geo[11]
    O = P * Q * U
    DHW = D * H * W
    M = K // C
    for e in range(cuda.grid(1), geo[0] * C * DHW, cuda.gridsize(1)):
        n, c, i_d, ih, iw = gemm.split(e, C, D, H, W)
        total = ZERO
        for m in range(M):
            k = c * M + m
            plane = (n * K + k) * O
            tap = k * T * R * S
            for t in range(T):
                p = gemm.output_of(i_d + geo[18] - t * geo[15], geo[12], P)
                for r in range(R):
                    q = gemm.output_of(ih + geo[19] - r * geo[16], geo[13], Q)
                    for s in range(S):
                        u = gemm.output_of(iw + geo[20] - s * geo[17], geo[14], U)
                        v = dy[plane + (p * Q + q) * U + u] if p >= 0 and q >= 0 and u >= 0 else ZERO
                        total += w[tap] * v
                        tap += 1
        dx[e] = total


def supports(g, primitive):
    return None if g.is_depthwise else (f"depthwise needs groups == in_channels and out_channels a multiple "
                                        f"of them, got groups={g.groups}, C={g.C}, K={g.K}")


def _blocks(n):
    return max(1, min(MAX_BLOCKS, -(-n // BLOCK)))


def forward(x, w, bias, y, g, workspace_limit=None, stream=0):
    bias, flag = direct._bias_arg(bias, y)
    launch(forward_kernel, _blocks(y.size), BLOCK, stream, x.reshape(x.size), w.reshape(w.size), bias,
           y.reshape(y.size), tuple(g), flag)


def backward_data(dy, w, dx, g, workspace_limit=None, stream=0):
    launch(backward_data_kernel, _blocks(dx.size), BLOCK, stream, dy.reshape(dy.size), w.reshape(w.size),
           dx.reshape(dx.size), tuple(g))


backward_filter = direct.backward_filter
workspace_bytes = direct.workspace_bytes
