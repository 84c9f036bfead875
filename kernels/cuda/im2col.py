"""im2col + tiled GEMM on CUDA (the GEMM is gemm.py's kernel with dense loaders).

x (N, C, D, H, W) * w (K, C/g, T, R, S) -> y (N, K, P, Q, U); O = P*Q*U, TRS = T*R*S. The batch is processed
in chunks of nb samples so the column matrix cols (C*TRS, nb*O) stays under workspace_limit (default 256 MiB;
a single sample needing more is refused by the planner, and algo='auto' falls back to direct):

    forward          cols = im2col(x chunk);   y[n0:n0+nb] (per group)  = W_g (K/g, C/g*TRS) @ cols_g
    backward_data    dcols_g = W_g^T @ dy chunk;  dx chunk = col2im(dcols)   (a gather: no atomics)
    backward_filter  cols = im2col(x chunk);   dW_g += dy_g chunk @ cols_g^T, chunks added in order

A pointwise problem (1x1 kernel, unit stride, no padding: g.is_pointwise) needs no columns: one GEMM per group
reads x and dy in place (POINTWISE loaders), as the CPU twin does, with no workspace.
Inside the GEMMs the geometry tuple carries N = nb (the chunk) and n0 is the chunk's first sample.
im2col_kernel: thread (grid-stride) per element of cols; col2im_kernel: thread per element of the dx chunk.
"""
from cnnfast.kernels.contract import DEFAULT_WORKSPACE_LIMIT
from cnnfast.kernels.cuda import direct, gemm, indexing
from cnnfast.kernels.cuda.compile import helper
from cnnfast.kernels.cuda.direct import _bias_arg, launch_tiled
from cnnfast.kernels.cuda.launch import flat, launch, scratch
from numba import cuda

BLOCK = 256
MAX_BLOCKS = 4096


def im2col_kernel(x, cols, geo, n0, nb):
    """cols[c*TRS + tap, j*O + o] = x-patch of sample n0 + j (0 in the padding); c over all C channels."""
    C, T, R, S = geo[1], geo[6], geo[7], geo[8]
    O = geo[9] * geo[10] * geo[11]
    Cg = C // geo[21]
    trs = T * R * S
    ncol = nb * O
    for e in range(cuda.grid(1), C * trs * ncol, cuda.gridsize(1)):
        row = e // ncol
        col = e % ncol
        c = row // trs
        cols[e] = indexing.x_patch(x, c // Cg, (c % Cg) * trs + row % trs, n0 + col // O, col % O, geo)


def col2im_kernel(dcols, dx, geo, n0, nb):
    """dx[n0 + j, c, i] = sum over taps (t, r, s), in order, of dcols[c*TRS + tap, j*O + o] for the output o
    that reads input i (indexing.transposed_gather: no division per tap)."""
    C, D, H, W = geo[1], geo[2], geo[3], geo[4]
    O = geo[9] * geo[10] * geo[11]
    DHW = D * H * W
    for e in range(cuda.grid(1), nb * C * DHW, cuda.gridsize(1)):
        j, c, i_d, ih, iw = indexing.split(e, C, D, H, W)
        row = c * geo[6] * geo[7] * geo[8] * nb * O + j * O  # dcols[c*TRS + tap, j*O + o] = dcols[row + tap*nb*O + o]
        dx[(n0 + j) * C * DHW + e - j * C * DHW] = indexing.transposed_gather(dcols, row, nb * O, dcols, 0, False,
                                                                              i_d, ih, iw, geo)


# ---------------------------------------------------------------- GEMM operand loaders (geo[0] = nb here)
# Dense operands: A and B are read at base + j*stride (direct.strided_a / strided_b), except backward_filter's
# dy (direct.by_sample); the row/column functions give the bases.

@helper
def _sizes(geo):
    """(Kg, Cg*TRS, O, nb*O)"""
    O = geo[9] * geo[10] * geo[11]
    return geo[5] // geo[21], geo[1] // geo[21] * geo[6] * geo[7] * geo[8], O, geo[0] * O


@helper
def f_dims(geo):
    Kg, J, O, ncol = _sizes(geo)
    return Kg, J, ncol


@helper
def f_col(g, col, geo, n0):
    """cols[(g*J + j)*ncol + col]"""
    Kg, J, O, ncol = _sizes(geo)
    return g * J * ncol + col, ncol, 0, 0


@helper
def f_store(y, bias, g, m, col, v, geo, flag, split, n0):
    Kg, J, O, ncol = _sizes(geo)
    k = g * Kg + m
    if flag:
        v += bias[k]
    y[((n0 + col // O) * geo[5] + k) * O + col % O] = v


@helper
def d_dims(geo):
    Kg, J, O, ncol = _sizes(geo)
    return J, Kg, ncol


@helper
def d_row(g, m, geo, n0):
    """w[(g*Kg + j)*J + m]"""
    Kg, J, O, ncol = _sizes(geo)
    return g * Kg * J + m, J


@helper
def d_col(g, col, geo, n0):
    """dy[((n0 + col // O)*K + g*Kg + j)*O + col % O]"""
    Kg, J, O, ncol = _sizes(geo)
    n = col // O
    return ((n0 + n) * geo[5] + g * Kg) * O + col - n * O, O, 0, 0


@helper
def d_store(dcols, bias, g, m, col, v, geo, flag, split, n0):
    Kg, J, O, ncol = _sizes(geo)
    dcols[(g * J + m) * ncol + col] = v


@helper
def w_dims(geo):
    Kg, J, _, _ = _sizes(geo)
    return Kg, geo[0] * direct.sample_span(geo), J  # the reduction over samples padded to a span each


@helper
def w_row(g, m, geo, n0):
    """dy[((n0 + n)*K + g*Kg + m)*O + o] at j = n*span + o: direct.by_sample from sample n0"""
    Kg, J, O, ncol = _sizes(geo)
    return (n0 * geo[5] + g * Kg + m) * O, geo[5] * O


@helper
def w_col(g, col, geo, n0):
    """cols[(g*J + col)*ncol + n*O + o] at j = n*span + o (direct.by_sample)"""
    Kg, J, O, ncol = _sizes(geo)
    return (g * J + col) * ncol, O


@helper
def w_store(dw, bias, g, m, col, v, geo, flag, split, n0):
    """dw (K, C/g*TRS); flag: add to what earlier chunks stored (fixed chunk order)."""
    Kg, J, O, ncol = _sizes(geo)
    i = (g * Kg + m) * J + col
    dw[i] = dw[i] + v if flag else v


OPS = {"forward": gemm.Ops(f_dims, direct.fwd_row, direct.strided_a, f_col, direct.strided_b, f_store, a_along_j=True),
       "backward_data": gemm.Ops(d_dims, d_row, direct.strided_a, d_col, direct.strided_b, d_store),
       "backward_filter": gemm.Ops(w_dims, w_row, direct.by_sample, w_col, direct.by_sample, w_store,
                                   seek=direct.sample_seek, step=direct.sample_step, a_along_j=True,
                                   b_along_j=True)}


# ---------------------------------------------------------------- pointwise: x itself is the column matrix
# A 1x1 unit-stride layer (g.is_pointwise, O = DHW, J = Cg) needs no im2col/col2im: per group, y = W_g @ x,
# dx = W_g^T @ dy, dW_g = dy @ x^T, read and written in place by these loaders (whole batch, n0 = 0).

@helper
def p_col(g, col, geo, n0):
    """x[((col // O)*C + g*Cg + j)*O + col % O] (forward's B)"""
    O = geo[9] * geo[10] * geo[11]
    n = col // O
    return (n * geo[1] + g * (geo[1] // geo[21])) * O + col - n * O, O, 0, 0


@helper
def p_store_dx(dx, bias, g, m, col, v, geo, flag, split, n0):
    """dx[((col // O)*C + g*Cg + m)*O + col % O]"""
    O = geo[9] * geo[10] * geo[11]
    n = col // O
    dx[(n * geo[1] + g * (geo[1] // geo[21]) + m) * O + col - n * O] = v


@helper
def p_wcol(g, col, geo, n0):
    """x[n, g*Cg + col, o] at j = n*span + o (backward_filter's B, read by direct.by_sample)"""
    O = geo[9] * geo[10] * geo[11]
    return (g * (geo[1] // geo[21]) + col) * O, geo[1] * O


POINTWISE = {"forward": gemm.Ops(f_dims, direct.fwd_row, direct.strided_a, p_col, direct.strided_b, f_store,
                                  a_along_j=True),
             "backward_data": gemm.Ops(d_dims, d_row, direct.strided_a, d_col, direct.strided_b, p_store_dx),
             "backward_filter": gemm.Ops(w_dims, w_row, direct.by_sample, p_wcol, direct.by_sample, w_store,
                                         seek=direct.sample_seek, step=direct.sample_step, a_along_j=True,
                                   b_along_j=True)}


def chunk(g, itemsize, workspace_limit):
    """Samples per chunk: cols (C*TRS, nb*O) under the limit (at least one sample); pointwise: the batch."""
    if g.is_pointwise:
        return g.N
    limit = DEFAULT_WORKSPACE_LIMIT if workspace_limit is None else workspace_limit
    per_sample = g.C * g.T * g.R * g.S * g.P * g.Q * g.U * itemsize
    return max(1, min(g.N, limit // max(per_sample, 1)))


def workspace_bytes(g, primitive, itemsize, workspace_limit, tile=None):
    """The column matrix of one chunk (whatever the GEMM's tile); none for a pointwise problem."""
    if g.is_pointwise:
        return 0
    return chunk(g, itemsize, workspace_limit) * g.C * g.T * g.R * g.S * g.P * g.Q * g.U * itemsize


def _shape(g, primitive, nb):
    """(M, J, NCOL) of the GEMM of a chunk of nb samples."""
    Kg, J, O = g.K // g.groups, g.C // g.groups * g.T * g.R * g.S, g.P * g.Q * g.U
    return {"forward": (Kg, J, nb * O), "backward_data": (J, Kg, nb * O),
            "backward_filter": (Kg, nb * direct.span(g), J)}[primitive]


def supports(g, primitive):
    """None when im2col's kernels can index the problem, else why not (its index arithmetic is 64-bit, but for the
    GEMM's row blocks and the weight gradient's cursor)."""
    return (direct.beyond_cursor(g) if primitive == "backward_filter" else None) or \
        gemm.beyond_grid(_shape(g, primitive, 1)[0])


def tile_for(g, primitive, itemsize=4, workspace_limit=None):
    """The tile of the GEMMs without an explicit tile= (gemm.choose_tile on a full chunk)."""
    M, _, NCOL = _shape(g, primitive, chunk(g, itemsize, workspace_limit))
    return gemm.choose_tile(M, NCOL, g.groups, itemsize=itemsize)


def _run(primitive, g, a, b, out, bias, flag_first, workspace_limit, stream, tile):
    """Per chunk: im2col (forward, filter) / GEMM / col2im (data); pointwise: one GEMM on the tensors."""
    tile = tile or tile_for(g, primitive, out.dtype.itemsize, workspace_limit)
    if g.is_pointwise:
        launch_tiled(POINTWISE[primitive], a, b, out, bias, direct.no_table(), tuple(g), _shape(g, primitive, g.N),
                     g.groups, flag_first, 1, stream, tile=tile)
        return
    nb = chunk(g, out.dtype.itemsize, workspace_limit)
    rows, O = g.C * g.T * g.R * g.S, g.P * g.Q * g.U
    cols = scratch(rows * nb * O, out.dtype, out, stream)
    for n0 in range(0, g.N, nb):
        cur = min(nb, g.N - n0)
        gc = g._replace(N=cur)
        blocks = max(1, min(MAX_BLOCKS, -(-rows * cur * O // BLOCK)))
        if primitive != "backward_data":
            launch(im2col_kernel, blocks, BLOCK, stream, flat(b), cols, tuple(g), n0, cur)
        source = cols if primitive != "backward_data" else b
        target = cols if primitive == "backward_data" else out
        flag = flag_first if (primitive != "backward_filter" or n0 == 0) else 1
        launch_tiled(OPS[primitive], a, source, target, bias, direct.no_table(), tuple(gc), _shape(g, primitive, cur),
                     g.groups, flag, 1, stream, n0=n0, tile=tile)
        if primitive == "backward_data":
            blocks = max(1, min(MAX_BLOCKS, -(-cur * g.C * g.D * g.H * g.W // BLOCK)))
            launch(col2im_kernel, blocks, BLOCK, stream, cols, flat(out), tuple(gc), n0, cur)


def forward(x, w, bias, y, g, workspace_limit=None, stream=0, tile=None):
    bias, flag = _bias_arg(bias, y)
    _run("forward", g, w, x, y, bias, flag, workspace_limit, stream, tile)


def backward_data(dy, w, dx, g, workspace_limit=None, stream=0, tile=None):
    bias, _ = _bias_arg(None, dx)
    _run("backward_data", g, w, dy, dx, bias, 0, workspace_limit, stream, tile)


def backward_filter(x, dy, dw, g, workspace_limit=None, stream=0, tile=None):
    bias, _ = _bias_arg(None, dw)
    _run("backward_filter", g, dy, x, dw, bias, 0, workspace_limit, stream, tile)


__all__ = ["forward", "backward_data", "backward_filter", "workspace_bytes", "supports"]
