"""Depthwise convolution on CUDA: groups == C, K = M*C (channel multiplier M); memory-bound.

x (N, C, D, H, W) * w (K, 1, T, R, S) -> y (N, K, P, Q, U); output channel k reads input channel k // M.
    forward_kernel:       thread (grid-stride) per output y[n, k, o]: T*R*S taps from x, weights from w.
    backward_data_kernel: thread per input dx[n, c, i]: gathers dy of the M filters of c over the taps that
                          read i (no atomics).
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
    K, T, R, S = geo[5], geo[6], geo[7], geo[8]
    O = geo[9] * geo[10] * geo[11]
    trs = T * R * S
    M = K // geo[1]
    for e in range(cuda.grid(1), geo[0] * K * O, cuda.gridsize(1)):
        o = e % O
        k = (e // O) % K
        n = e // (O * K)
        total = bias[k] if has_bias else ZERO
        for tap in range(trs):
            total += w[k * trs + tap] * gemm.x_patch(x, k // M, tap, n, o, geo)
        y[e] = total


def backward_data_kernel(dy, w, dx, geo):
    C, K, T, R, S = geo[1], geo[5], geo[6], geo[7], geo[8]
    DHW = geo[2] * geo[3] * geo[4]
    trs = T * R * S
    M = K // C
    for e in range(cuda.grid(1), geo[0] * C * DHW, cuda.gridsize(1)):
        i = e % DHW
        c = (e // DHW) % C
        n = e // (DHW * C)
        total = ZERO
        for m in range(M):
            for tap in range(trs):
                # group c holds filters c*M .. c*M + M - 1; dy_gather's reduction index is (m, tap)
                total += w[(c * M + m) * trs + tap] * gemm.dy_gather(dy, c, m * trs + tap, n, i, geo)
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
