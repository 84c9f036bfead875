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
from cnnfast.kernels.cuda.compile import ZERO, device_constant, numba_dtype
from cnnfast.kernels.cuda.launch import launch, scratch
from numba import cuda, int64, uint64

TARGET_BLOCKS = 264  # 2 blocks per SM on an H100 (132 SMs): enough splits to fill the GPU
MIN_SPLIT = 256  # reduction indices per split at least


# ---------------------------------------------------------------- loaders shared by several GEMMs

@cuda.jit(device=True, inline=True)
def strided_a(a, ra, j, geo, tab):
    """A[m, j] = a[base + j*stride] for ra = (base, stride)."""
    return a[ra[0] + j * ra[1]]


@cuda.jit(device=True, inline=True)
def strided_b(b, cb, j, geo, tab):
    """B[j, col] = b[base + j*stride] for cb = (base, stride, -, -)."""
    return b[cb[0] + j * cb[1]]


@cuda.jit(device=True, inline=True)
def sample_of(j, O):
    """j // O for j, O >= 0, as one unsigned division (a signed // also computes a remainder to floor)."""
    return int64(uint64(j) // uint64(O))


@cuda.jit(device=True, inline=True)
def dy_by_sample_row(dy, ra, j, geo, tab):
    """A[m, j] = dy[n, k, o] for j = n*O + o, with ra = (offset of dy[0, k, 0], O): one division per element."""
    n = sample_of(j, ra[1])
    return dy[ra[0] + j + n * (geo[5] - 1) * ra[1]]


# ---------------------------------------------------------------- forward: A = W_g, B = x-patches
# j = c*TRS + tap (tab row: c*DHW, t*dd, r*dh, s*dw, -), col = n*O + o

@cuda.jit(device=True, inline=True)
def fwd_dims(geo):
    groups = geo[21]
    return geo[5] // groups, geo[1] // groups * geo[6] * geo[7] * geo[8], geo[0] * geo[9] * geo[10] * geo[11]


@cuda.jit(device=True, inline=True)
def fwd_row(g, m, geo, n0):
    """w[k = g*Kg + m, j] = w[k*J + j]"""
    groups = geo[21]
    J = geo[1] // groups * geo[6] * geo[7] * geo[8]
    return (g * (geo[5] // groups) + m) * J, 1


@cuda.jit(device=True, inline=True)
def fwd_col(g, col, geo, n0):
    """(offset of x[n, g*Cg], first input d, h, w read by output o = (p, q, u)) for col = n*O + o."""
    C, D, H, W = geo[1], geo[2], geo[3], geo[4]
    n, _, p, q, u = gemm.split(col, 1, geo[9], geo[10], geo[11])
    return ((n * C + g * (C // geo[21])) * D * H * W, p * geo[12] - geo[18], q * geo[13] - geo[19],
            u * geo[14] - geo[20])


@cuda.jit(device=True, inline=True)
def fwd_load_x(x, cb, j, geo, tab):
    e = j * gemm.TAB
    D, H, W = geo[2], geo[3], geo[4]
    di = cb[1] + tab[e + 1]
    hi = cb[2] + tab[e + 2]
    wi = cb[3] + tab[e + 3]
    if di < 0 or di >= D or hi < 0 or hi >= H or wi < 0 or wi >= W:
        return ZERO
    return x[cb[0] + tab[e] + (di * H + hi) * W + wi]


@cuda.jit(device=True, inline=True)
def fwd_store(y, bias, g, m, col, v, geo, flag, split, n0):
    K = geo[5]
    O = geo[9] * geo[10] * geo[11]
    k = g * (K // geo[21]) + m
    if flag:
        v += bias[k]
    y[((col // O) * K + k) * O + col % O] = v


# ---------------------------------------------------------------- backward data: A = W_g^T, B = dy gathers
# j = kk*TRS + tap (tab row: kk*O, t*dd, r*dh, s*dw, kk*Cg*TRS + tap), col = n*DHW + i

@cuda.jit(device=True, inline=True)
def bwd_dims(geo):
    groups = geo[21]
    return geo[1] // groups, geo[5] // groups * geo[6] * geo[7] * geo[8], geo[0] * geo[2] * geo[3] * geo[4]


@cuda.jit(device=True, inline=True)
def bwd_row(g, m, geo, n0):
    """w[g*Kg + kk, c = m, tap] = w[g*Kg*Cg*TRS + m*TRS + (kk*Cg*TRS + tap)]"""
    groups = geo[21]
    trs = geo[6] * geo[7] * geo[8]
    return (g * (geo[5] // groups) * (geo[1] // groups) + m) * trs, 0


@cuda.jit(device=True, inline=True)
def bwd_load_w(w, ra, j, geo, tab):
    return w[ra[0] + tab[j * gemm.TAB + 4]]


@cuda.jit(device=True, inline=True)
def bwd_col(g, col, geo, n0):
    """(offset of dy[n, g*Kg], padded input position d + pd, h + ph, w + pw) for col = n*DHW + (d*H + h)*W + w."""
    K = geo[5]
    n, _, i_d, ih, iw = gemm.split(col, 1, geo[2], geo[3], geo[4])
    return ((n * K + g * (K // geo[21])) * geo[9] * geo[10] * geo[11], i_d + geo[18], ih + geo[19], iw + geo[20])


@cuda.jit(device=True, inline=True)
def bwd_load_dy(dy, cb, j, geo, tab):
    """dy at the output (p, q, u) whose tap reads this input position; 0 when none does (stride, borders)."""
    e = j * gemm.TAB
    p = cb[1] - tab[e + 1]
    q = cb[2] - tab[e + 2]
    u = cb[3] - tab[e + 3]
    if p < 0 or q < 0 or u < 0:
        return ZERO
    sd, sh, sw = geo[12], geo[13], geo[14]
    if sd != 1 or sh != 1 or sw != 1:
        if p % sd != 0 or q % sh != 0 or u % sw != 0:
            return ZERO
        p //= sd
        q //= sh
        u //= sw
    Q, U = geo[10], geo[11]
    if p >= geo[9] or q >= Q or u >= U:
        return ZERO
    return dy[cb[0] + tab[e] + (p * Q + q) * U + u]


@cuda.jit(device=True, inline=True)
def bwd_store(dx, bias, g, m, col, v, geo, flag, split, n0):
    C = geo[1]
    DHW = geo[2] * geo[3] * geo[4]
    dx[((col // DHW) * C + g * (C // geo[21]) + m) * DHW + col % DHW] = v


# ---------------------------------------------------------------- backward filter: A = dy, B = x-patches^T
# j = n*O + o (tab row per output o: p*sd, q*sh, u*sw, -, -), col = c*TRS + tap

@cuda.jit(device=True, inline=True)
def flt_dims(geo):
    groups = geo[21]
    return geo[5] // groups, geo[0] * geo[9] * geo[10] * geo[11], geo[1] // groups * geo[6] * geo[7] * geo[8]


@cuda.jit(device=True, inline=True)
def flt_row(g, m, geo, n0):
    O = geo[9] * geo[10] * geo[11]
    return (g * (geo[5] // geo[21]) + m) * O, O


@cuda.jit(device=True, inline=True)
def flt_col(g, col, geo, n0):
    """(offset of x[0, g*Cg + c], t*dd - pd, r*dh - ph, s*dw - pw) for col = c*TRS + tap."""
    T, R, S = geo[6], geo[7], geo[8]
    s = col % S
    r = (col // S) % R
    t = (col // (S * R)) % T
    c = col // (S * R * T)
    return ((g * (geo[1] // geo[21]) + c) * geo[2] * geo[3] * geo[4], t * geo[15] - geo[18],
            r * geo[16] - geo[19], s * geo[17] - geo[20])


@cuda.jit(device=True, inline=True)
def flt_load_x(x, cb, j, geo, tab):
    D, H, W = geo[2], geo[3], geo[4]
    O = geo[9] * geo[10] * geo[11]
    n = sample_of(j, O)
    e = (j - n * O) * gemm.TAB
    di = tab[e] + cb[1]
    hi = tab[e + 1] + cb[2]
    wi = tab[e + 2] + cb[3]
    if di < 0 or di >= D or hi < 0 or hi >= H or wi < 0 or wi >= W:
        return ZERO
    return x[n * geo[1] * D * H * W + cb[0] + (di * H + hi) * W + wi]


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
    "forward": (fwd_dims, fwd_row, strided_a, fwd_col, fwd_load_x, fwd_store),
    "backward_data": (bwd_dims, bwd_row, bwd_load_w, bwd_col, bwd_load_dy, bwd_store),
    "backward_filter": (flt_dims, flt_row, dy_by_sample_row, flt_col, flt_load_x, flt_store),
}


def no_table():
    """The table argument of GEMMs whose loaders read none (one zero row)."""
    return device_constant(("no-table",), lambda: np.zeros(gemm.TAB, np.int64))


def reduction_table(g, primitive):
    """The loaders' table (TAB int64 per row, flat) of forward's j = c*TRS + tap: (c*DHW, t*dd, r*dh, s*dw, 0),
    of backward_data's j = kk*TRS + tap: (kk*O, t*dd, r*dh, s*dw, kk*Cg*TRS + tap), or of backward_filter's
    output o = (p*Q + q)*U + u of j = n*O + o: (p*sd, q*sh, u*sw, 0, 0). A device constant: built and uploaded
    once per GPU and table key (a new batch size reuses it)."""
    if primitive == "backward_filter":
        def make_outputs():
            p, q, u = np.unravel_index(np.arange(g.P * g.Q * g.U, dtype=np.int64), (g.P, g.Q, g.U))
            zero = np.zeros_like(p)
            return np.stack([p * g.stride_d, q * g.stride_h, u * g.stride_w, zero, zero], axis=1).ravel()

        key = (g.P, g.Q, g.U, g.stride_d, g.stride_h, g.stride_w)
        return device_constant(("output-table",) + key, make_outputs)

    def make():
        trs = g.T * g.R * g.S
        outer = g.C // g.groups if primitive == "forward" else g.K // g.groups
        c, tap = np.divmod(np.arange(outer * trs, dtype=np.int64), trs)
        t, r, s = tap // (g.R * g.S), (tap // g.S) % g.R, tap % g.S
        if primitive == "forward":
            first, last = c * g.D * g.H * g.W, np.zeros_like(c)
        else:
            first, last = c * g.P * g.Q * g.U, c * (g.C // g.groups) * trs + tap
        return np.stack([first, t * g.dil_d, r * g.dil_h, s * g.dil_w, last], axis=1).ravel()

    # keyed by what the table depends on (not the batch size, so a new batch size reuses it)
    key = (primitive, g.C // g.groups, g.K // g.groups, g.T, g.R, g.S, g.dil_d, g.dil_h, g.dil_w,
           g.D * g.H * g.W if primitive == "forward" else g.P * g.Q * g.U)
    return device_constant(("reduction-table",) + key, make)


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
    tab = reduction_table(g, primitive) if ops is None else no_table()  # im2col's dense loaders read none
    ops = ops or OPS[primitive]
    M, J, NCOL = shape or dims(g, primitive)
    jchunk = -(-J // splits)
    jchunk = -(-jchunk // gemm.BJ) * gemm.BJ
    launch(gemm.tiled_kernel(numba_dtype(out.dtype), ops), gemm.grid(M, NCOL, g.groups, splits), gemm.THREADS,
           stream, a.reshape(a.size), b.reshape(b.size), out.reshape(out.size), bias, tab, tuple(g), flag, splits,
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
