"""Float64 NumPy reference of every convolution primitive (PyTorch functional semantics).

Written for reading more than speed (one einsum per sample and group, which NumPy runs on BLAS: the benchmark
validates every GPU anchor layer against it), and sharing NO code with `cnnfast.kernels` or the rest of cnnfast: it
has its own argument normalisation and output-size formula, so the kernels are checked against an
independent statement of the mathematics. The reference itself is checked against the explicit
convolution matrix, the adjoint identity, finite differences and PyTorch (tests/test_reference.py).

Shapes (batched only; 1, 2 or 3 spatial axes; any float dtype in, float64 out):
    x  (N, C, *L)    w  (K, C/groups, *k)    b  (K,)    y, dy  (N, K, *O)
per spatial axis, with padding (lo, hi), stride s, dilation d:
    y[n, k, o] = b[k] + sum_{c in group(k), r} xp[n, c, o*s + r*d] * w[k, c, r]
    xp = x padded by (lo, hi) with padding_mode, O = floor((L + lo + hi - d*(k-1) - 1) / s) + 1.
Padding is an explicit linear map xp = P x (per axis, a 0/1 matrix P[j, src(j)] built from np.pad's
rule for the mode), so every backward pass folds the padded gradient back with P.T.
"""
import numpy as np

# padding_mode -> np.pad mode: reflect does not repeat the edge (torch 'reflect'), replicate repeats it
# ('edge'), circular wraps ('wrap').
_NP_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
_OUT, _TAP = "xyz", "uvw"  # einsum letters of the output and kernel-tap axes (up to 3 spatial axes)


# ---------------------------------------------------------------- arguments and sizes

def _per_axis(v, nd):
    """int or per-axis sequence -> tuple of nd ints."""
    if np.ndim(v) == 0:
        return (int(v),) * nd
    return tuple(int(a) for a in v)


def _pad_pairs(padding, nd):
    """int, per-axis ints, or per-axis (low, high) pairs -> tuple of nd (low, high) pairs."""
    if np.ndim(padding) == 0:
        return ((int(padding), int(padding)),) * nd
    return tuple((int(p), int(p)) if np.ndim(p) == 0 else (int(p[0]), int(p[1])) for p in padding)


def output_size(length, kernel, stride, dilation, pad_lo, pad_hi):
    """floor((L + lo + hi - d*(k-1) - 1) / s) + 1: outputs of a convolution along one axis."""
    return (length + pad_lo + pad_hi - dilation * (kernel - 1) - 1) // stride + 1


def _f64(a):
    return np.asarray(a, dtype=np.float64)


# ---------------------------------------------------------------- padding: a 0/1 matrix per axis, applied by index

def _pad_source(length, lo, hi, mode):
    """src (lo + length + hi,): padded row j copies x[src[j]] (-1: a zero row). This is the 0/1 matrix
    P[j, src[j]] = 1 with padded = P @ x along one axis, taken from np.pad applied to the indices themselves;
    it is applied by indexing, not multiplication, so a NaN or inf reaches only the rows that copy it."""
    if mode == "zeros":
        return np.concatenate([np.full(lo, -1), np.arange(length), np.full(hi, -1)])
    return np.pad(np.arange(length), (lo, hi), mode=_NP_MODES[mode])


def _pad(x, pads, mode):
    """x (N, C, *L) -> xp (N, C, *(L + lo + hi)), exactly torch's F.pad(x, ..., mode): xp = P x per axis."""
    for i, (L, (lo, hi)) in enumerate(zip(x.shape[2:], pads)):
        src = _pad_source(L, lo, hi, mode)
        rows = np.moveaxis(x, 2 + i, 0)
        padded = rows[np.maximum(src, 0)] if L else np.zeros((len(src),) + rows.shape[1:])
        padded[src < 0] = 0.0
        x = np.moveaxis(padded, 0, 2 + i)
    return x


def _unpad_adjoint(gp, spatial, pads, mode):
    """Adjoint of _pad (P.T per axis): gradient w.r.t. the padded input (N, C, *Lp) -> gradient w.r.t. x
    (N, C, *L); every padded copy of an element adds its gradient to that element."""
    for i, (L, (lo, hi)) in enumerate(zip(spatial, pads)):
        src = _pad_source(L, lo, hi, mode)
        g = np.moveaxis(gp, 2 + i, 0)
        out = np.zeros((L,) + g.shape[1:])
        np.add.at(out, src[src >= 0], g[src >= 0])
        gp = np.moveaxis(out, 0, 2 + i)
    return gp


# ---------------------------------------------------------------- the unpadded convolution and its adjoints

def _windows(xp, ksize, stride, dilation, out):
    """xp (N, C, *Lp) -> read-only view (N, C, *O, *k) with [n, c, o, r] = xp[n, c, o*s + r*d]."""
    nd = len(ksize)
    span = tuple(d * (k - 1) + 1 for k, d in zip(ksize, dilation))
    v = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(2, 2 + nd)))
    index = ((slice(None),) * 2 + tuple(slice(0, (o - 1) * s + 1, s) for o, s in zip(out, stride))
             + tuple(slice(None, None, d) for d in dilation))
    return v[index]


def _grouped(a, groups):
    """(N, C, ...) -> (N, groups, C/groups, ...)."""
    return a.reshape(a.shape[0], groups, a.shape[1] // groups, *a.shape[2:])


def _out_shape(spatial, ksize, stride, dilation, pads):
    sizes = zip(spatial, ksize, stride, dilation, pads)
    return tuple(output_size(L, k, s, d, lo, hi) for L, k, s, d, (lo, hi) in sizes)


def _args(nd, stride, padding, dilation):
    return _per_axis(stride, nd), _pad_pairs(padding, nd), _per_axis(dilation, nd)


# ---------------------------------------------------------------- convolution and its gradients

def conv(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """y (N, K, *O) = bias + cross-correlation of x (N, C, *L) with w (K, C/groups, *k)."""
    x, w = _f64(x), _f64(w)
    nd = x.ndim - 2
    stride, pads, dilation = _args(nd, stride, padding, dilation)
    out = _out_shape(x.shape[2:], w.shape[2:], stride, dilation, pads)
    xw = _grouped(_windows(_pad(x, pads, padding_mode), w.shape[2:], stride, dilation, out), groups)
    wg = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])  # (G, K/G, C/G, *k)
    o, r = _OUT[:nd], _TAP[:nd]
    y = np.empty((x.shape[0], groups, wg.shape[1], *out))
    for n, g in np.ndindex(x.shape[0], groups):  # (one sample and group at a time: einsum then runs on BLAS)
        y[n, g] = np.einsum(f"c{o}{r},kc{r}->k{o}", xw[n, g], wg[g], optimize=True)
    y = y.reshape(x.shape[0], w.shape[0], *out)
    if bias is not None:
        y = y + _f64(bias).reshape((-1,) + (1,) * nd)
    return y


def conv_input(input_shape, w, dy, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """dx (input_shape) = gradient of <conv(x, w), dy> w.r.t. x: the transpose of the convolution matrix."""
    w, dy = _f64(w), _f64(dy)
    nd = len(input_shape) - 2
    stride, pads, dilation = _args(nd, stride, padding, dilation)
    spatial = tuple(input_shape[2:])
    n, c = input_shape[:2]
    out = dy.shape[2:]
    wg = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])  # (G, K/G, C/G, *k)
    dyg = _grouped(dy, groups)  # (N, G, K/G, *O)
    o = _OUT[:nd]
    dxp = np.zeros((n, groups, c // groups) + tuple(L + lo + hi for L, (lo, hi) in zip(spatial, pads)))
    for r in np.ndindex(*w.shape[2:]):
        # tap r reads xp[o*s + r*d]: scatter its contribution to exactly those positions
        taps = tuple(slice(rr * d, rr * d + (oo - 1) * s + 1, s) for rr, d, oo, s in zip(r, dilation, out, stride))
        for g in range(groups):
            dxp[(slice(None), g, slice(None)) + taps] += np.einsum(f"nk{o},kc->nc{o}", dyg[:, g], wg[(g, Ellipsis) + r],
                                                                   optimize=True)
    return _unpad_adjoint(dxp.reshape(n, c, *dxp.shape[3:]), spatial, pads, padding_mode)


def conv_weight(x, weight_shape, dy, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """dw (weight_shape) = gradient of <conv(x, w), dy> w.r.t. w."""
    x, dy = _f64(x), _f64(dy)
    nd = x.ndim - 2
    stride, pads, dilation = _args(nd, stride, padding, dilation)
    xw = _grouped(_windows(_pad(x, pads, padding_mode), weight_shape[2:], stride, dilation, dy.shape[2:]), groups)
    dyg = _grouped(dy, groups)
    o, r = _OUT[:nd], _TAP[:nd]
    dw = np.zeros((groups, weight_shape[0] // groups, *weight_shape[1:]))
    for n, g in np.ndindex(x.shape[0], groups):  # (one sample and group at a time: einsum then runs on BLAS)
        dw[g] += np.einsum(f"c{o}{r},k{o}->kc{r}", xw[n, g], dyg[n, g], optimize=True)
    return dw.reshape(weight_shape)


def conv_bias(dy):
    """db (K,) = dy summed over every axis but 1."""
    dy = _f64(dy)
    return dy.sum(axis=(0,) + tuple(range(2, dy.ndim)))


# ---------------------------------------------------------------- transposed convolution and its gradients

def _transposed_shape(x_shape, w_shape, stride, pads, output_padding, groups, dilation):
    """Output shape (N, C_out, *Lout) of conv_transpose, Lout = (L-1)*s - lo - hi + d*(k-1) + output_padding + 1.
    The matching conv's output on it can be longer than L (output_padding >= s, possible when d > s): conv_input
    and conv_weight then take x (L) as a dy shorter than that output, the positions x does not reach getting
    nothing (not x zero-extended times the weight, which is NaN for a NaN or inf weight, as torch never computes)."""
    nd = len(x_shape) - 2
    opad = _per_axis(output_padding, nd)
    lout = tuple((L - 1) * s - lo - hi + d * (k - 1) + op + 1
                 for L, k, s, d, (lo, hi), op in zip(x_shape[2:], w_shape[2:], stride, dilation, pads, opad))
    return (x_shape[0], w_shape[1] * groups) + lout


def conv_transpose(x, w, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """y (N, C_out, *Lout) = transposed convolution of x (N, C_in, *L) with w (C_in, C_out/groups, *k):
    conv_input of the conv whose weight is w (K = C_in), evaluated at x, with the output's shape as input_shape."""
    x, w = _f64(x), _f64(w)
    nd = x.ndim - 2
    stride, pads, dilation = _args(nd, stride, padding, dilation)
    out_shape = _transposed_shape(x.shape, w.shape, stride, pads, output_padding, groups, dilation)
    y = conv_input(out_shape, w, x, stride, pads, dilation, groups)
    if bias is not None:
        y = y + _f64(bias).reshape((-1,) + (1,) * nd)
    return y


def conv_transpose_input(input_shape, w, dy, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """dx (input_shape) = gradient of <conv_transpose(x, w), dy> w.r.t. x: the forward conv of dy."""
    dx = conv(dy, w, None, stride, padding, dilation, groups)
    return dx[(slice(None), slice(None)) + tuple(slice(0, L) for L in input_shape[2:])]


def conv_transpose_weight(x, weight_shape, dy, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """dw (weight_shape) = gradient of <conv_transpose(x, w), dy> w.r.t. w: conv_weight with the roles of x
    and dy swapped (dy is the conv's input, x its output gradient)."""
    x, dy = _f64(x), _f64(dy)
    nd = x.ndim - 2
    stride, pads, dilation = _args(nd, stride, padding, dilation)
    return conv_weight(dy, weight_shape, x, stride, pads, dilation, groups)
