"""Direct (implicit-GEMM) convolution on CUDA: the tiled kernel of gemm.py reading the tensors in place.

x (N, C, D, H, W) * w (K, C/g, T, R, S) -> y (N, K, P, Q, U); O = P*Q*U, TRS = T*R*S, per group g:

    forward          y[n, k, o]      = sum_{(c, tap)} w[k, c, tap] * x-patch     M = K/g, J = C/g*TRS, NCOL = N*O
    backward_data    dx[n, c, i]     = sum_{(k, tap)} w[k, c, tap] * dy-gather   M = C/g, J = K/g*TRS, NCOL = N*DHW
    backward_filter  dw[k, (c, tap)] = sum_{(n, o)} dy[n, k, o] * x-patch        M = K/g, J = N*O,     NCOL = C/g*TRS

Each thread owns a 4x4 register tile of outputs (4 output channels x 4 pixels for forward); the weight and
input tiles of each 8-deep reduction step are staged in shared memory (gemm.py). backward_filter splits its
long reduction (N*O) over `splits` blocks writing partial sums to scratch, then `reduce_splits` adds them in
split order: deterministic, no atomics.
"""
import numpy as np
from cnnfast.kernels.contract import DEFAULT_WORKSPACE_LIMIT
from cnnfast.kernels.cuda import gemm
from cnnfast.kernels.cuda.compile import device_constant, numba_dtype
from cnnfast.kernels.cuda.launch import launch, scratch
from numba import cuda

TARGET_BLOCKS = 264  # 2 blocks per SM on an H100 (132 SMs): enough splits to fill the GPU
MIN_SPLIT = 256  # reduction indices per split at least


# ---------------------------------------------------------------- forward

@cuda.jit(device=True, inline=True)
def fwd_dims(geo):
    groups = geo[21]
    return geo[5] // groups, geo[1] // groups * geo[6] * geo[7] * geo[8], geo[0] * geo[9] * geo[10] * geo[11]


@cuda.jit(device=True, inline=True)
def fwd_load_w(w, g, m, j, geo, n0):
    Kg = geo[5] // geo[21]
    J = geo[1] // geo[21] * geo[6] * geo[7] * geo[8]
    return w[(g * Kg + m) * J + j]


@cuda.jit(device=True, inline=True)
def fwd_load_x(x, g, j, col, geo, n0):
    O = geo[9] * geo[10] * geo[11]
    return gemm.x_patch(x, g, j, col // O, col % O, geo)


@cuda.jit(device=True, inline=True)
def fwd_store(y, bias, g, m, col, v, geo, flag, split, n0):
    K = geo[5]
    O = geo[9] * geo[10] * geo[11]
    k = g * (K // geo[21]) + m
    if flag:
        v += bias[k]
    y[((col // O) * K + k) * O + col % O] = v


# ---------------------------------------------------------------- backward data

@cuda.jit(device=True, inline=True)
def bwd_dims(geo):
    groups = geo[21]
    return geo[1] // groups, geo[5] // groups * geo[6] * geo[7] * geo[8], geo[0] * geo[2] * geo[3] * geo[4]


@cuda.jit(device=True, inline=True)
def bwd_load_w(w, g, m, j, geo, n0):
    Cg = geo[1] // geo[21]
    Kg = geo[5] // geo[21]
    trs = geo[6] * geo[7] * geo[8]
    return w[((g * Kg + j // trs) * Cg + m) * trs + j % trs]


@cuda.jit(device=True, inline=True)
def bwd_load_dy(dy, g, j, col, geo, n0):
    DHW = geo[2] * geo[3] * geo[4]
    return gemm.dy_gather(dy, g, j, col // DHW, col % DHW, geo)


@cuda.jit(device=True, inline=True)
def bwd_store(dx, bias, g, m, col, v, geo, flag, split, n0):
    C = geo[1]
    DHW = geo[2] * geo[3] * geo[4]
    dx[((col // DHW) * C + g * (C // geo[21]) + m) * DHW + col % DHW] = v


# ---------------------------------------------------------------- backward filter

@cuda.jit(device=True, inline=True)
def flt_dims(geo):
    groups = geo[21]
    return geo[5] // groups, geo[0] * geo[9] * geo[10] * geo[11], geo[1] // groups * geo[6] * geo[7] * geo[8]


@cuda.jit(device=True, inline=True)
def flt_load_dy(dy, g, m, j, geo, n0):
    K = geo[5]
    O = geo[9] * geo[10] * geo[11]
    return dy[((j // O) * K + g * (K // geo[21]) + m) * O + j % O]


@cuda.jit(device=True, inline=True)
def flt_load_x(x, g, j, col, geo, n0):
    O = geo[9] * geo[10] * geo[11]
    return gemm.x_patch(x, g, col, j // O, j % O, geo)


@cuda.jit(device=True, inline=True)
def flt_store(partial, bias, g, m, col, v, geo, flag, split, n0):
    """partial (splits, K, C/g*TRS): split s's sum; with one split this is dw itself."""
    K = geo[5]
    ncol = geo[1] // geo[21] * geo[6] * geo[7] * geo[8]
    partial[(split * K + g * (K // geo[21]) + m) * ncol + col] = v


def reduce_splits_kernel(partial, out, splits, size):
    """out[i] = sum over s of partial[s*size + i], s in order. Thread i (grid-stride) owns out[i]."""
    for i in range(cuda.grid(1), size, cuda.gridsize(1)):
        total = partial[i]
        for s in range(1, splits):
            total += partial[s * size + i]
        out[i] = total


OPS = {
    "forward": (fwd_dims, fwd_load_w, fwd_load_x, fwd_store),
    "backward_data": (bwd_dims, bwd_load_w, bwd_load_dy, bwd_store),
    "backward_filter": (flt_dims, flt_load_dy, flt_load_x, flt_store),
}


def dims(g, primitive):
    Kg, Cg, O, TRS = g.K // g.groups, g.C // g.groups, g.P * g.Q * g.U, g.T * g.R * g.S
    return {"forward": (Kg, Cg * TRS, g.N * O), "backward_data": (Cg, Kg * TRS, g.N * g.D * g.H * g.W),
            "backward_filter": (Kg, g.N * O, Cg * TRS)}[primitive]


def filter_splits(g, itemsize, workspace_limit):
    """Splits of backward_filter's reduction: enough blocks to fill the GPU, each split >= MIN_SPLIT long,
    and the partial sums (splits x K x C/g*TRS) under workspace_limit."""
    M, J, NCOL = dims(g, "backward_filter")
    blocks = -(-NCOL // gemm.BN) * -(-M // gemm.BM) * g.groups
    splits = max(1, min(TARGET_BLOCKS // blocks, J // MIN_SPLIT))
    limit = DEFAULT_WORKSPACE_LIMIT if workspace_limit is None else workspace_limit
    per_split = g.K * NCOL * itemsize
    while splits > 1 and splits * per_split > limit:
        splits -= 1
    return splits


def workspace_bytes(g, primitive, itemsize, workspace_limit):
    if primitive != "backward_filter":
        return 0
    splits = filter_splits(g, itemsize, workspace_limit)
    return splits * g.K * dims(g, primitive)[2] * itemsize if splits > 1 else 0


def launch_tiled(primitive, a, b, out, bias, g, flag, splits, stream, ops=None, n0=0, shape=None):
    """Launch the tiled kernel of `primitive` (or of explicit `ops`); arrays are flattened to 1-D."""
    ops = ops or OPS[primitive]
    M, J, NCOL = shape or dims(g, primitive)
    jchunk = -(-J // splits)
    jchunk = -(-jchunk // gemm.BJ) * gemm.BJ
    launch(gemm.tiled_kernel(numba_dtype(out.dtype), ops), gemm.grid(M, NCOL, g.groups, splits), gemm.THREADS,
           stream, a.reshape(a.size), b.reshape(b.size), out.reshape(out.size), bias, tuple(g), flag, splits,
           jchunk, n0)


def _bias_arg(bias, like):
    if bias is not None:
        return bias, 1
    return device_constant(("zero", like.dtype.str), lambda: np.zeros(1, like.dtype)), 0


def forward(x, w, bias, y, g, workspace_limit=None, stream=0):
    bias, flag = _bias_arg(bias, y)
    launch_tiled("forward", w, x, y, bias, g, flag, 1, stream)


def backward_data(dy, w, dx, g, workspace_limit=None, stream=0):
    bias, _ = _bias_arg(None, dx)
    launch_tiled("backward_data", w, dy, dx, bias, g, 0, 1, stream)


def backward_filter(x, dy, dw, g, workspace_limit=None, stream=0):
    splits = filter_splits(g, dw.dtype.itemsize, workspace_limit)
    bias, _ = _bias_arg(None, dw)
    if splits == 1:
        launch_tiled("backward_filter", dy, x, dw, bias, g, 0, 1, stream)
        return
    partial = scratch(splits * dw.size, dw.dtype, dw, stream)
    launch_tiled("backward_filter", dy, x, partial, bias, g, 0, splits, stream)
    blocks = max(1, min(-(-dw.size // 256), 1024))
    launch(reduce_splits_kernel, blocks, 256, stream, partial, dw.reshape(dw.size), splits, dw.size)
