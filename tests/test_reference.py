"""cnnfast.reference against independent oracles: the explicit convolution matrix (tests/oracles.py), the
adjoint identity, finite differences, 1x1 conv == matmul, circular translation equivariance, the
transposed-convolution identities, and PyTorch (float64 on both sides) when it is installed.
Nothing here compares the reference with output captured from itself."""
import itertools

import numpy as np
import pytest
from oracles import conv_matrix, pattern_matrices

from cnnfast import reference as ref

MODES = ("zeros", "reflect", "replicate", "circular")
RTOL = 1e-10  # float64 on both sides; errors are measured relative to the largest expected value


def assert_close(got, want, rtol=RTOL):
    """Shape, then dtype (the reference returns float64), then the worst element relative to max|want|."""
    got, want = np.asarray(got), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != expected {want.shape}"
    assert got.dtype == np.float64, f"dtype {got.dtype} != float64"
    scale = max(float(np.abs(want).max(initial=0.0)), 1e-300)
    err = np.abs(got - want)
    worst = np.unravel_index(np.argmax(err), err.shape) if err.size else ()
    assert err.max(initial=0.0) <= rtol * scale, \
        f"max error {err.max():.3e} (relative {err.max() / scale:.3e}) at {worst}: got {got[worst]}, want {want[worst]}"


# ---------------------------------------------------------------- 1. the explicit matrix

# (C, K, L, kernel, stride, (low, high) pads, dilation, groups); every pad < L so that reflect is defined
MATRIX_CASES = [
    (2, 3, (7,), (3,), (1,), ((1, 1),), (1,), 1),
    (2, 2, (8,), (3,), (2,), ((2, 0),), (1,), 2),
    (1, 2, (9,), (2,), (3,), ((2, 3),), (2,), 1),
    (4, 4, (6,), (1,), (1,), ((0, 2),), (1,), 4),
    (2, 4, (5, 6), (3, 2), (2, 1), ((1, 0), (2, 1)), (1, 2), 2),
    (3, 2, (4, 5), (2, 3), (1, 2), ((0, 1), (1, 1)), (2, 1), 1),
    (2, 2, (3, 4, 3), (2, 3, 2), (1, 2, 1), ((1, 0), (1, 1), (0, 2)), (1, 1, 2), 2),
    (1, 2, (4, 3, 4), (3, 1, 2), (2, 1, 3), ((2, 1), (0, 0), (1, 2)), (1, 1, 1), 1),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", MATRIX_CASES, ids=lambda c: f"{len(c[2])}d-{c[2]}-k{c[3]}-s{c[4]}-g{c[7]}")
def test_against_explicit_matrix(case, mode):
    C, K, L, ksize, stride, pads, dilation, groups = case
    rng = np.random.default_rng(7)
    n = 2
    x = rng.standard_normal((n, C) + L)
    w = rng.standard_normal((K, C // groups) + ksize)
    b = rng.standard_normal(K)
    E, out = pattern_matrices(x.shape, w.shape, stride, pads, dilation, groups, mode)
    M = conv_matrix(w, E)
    dy = rng.standard_normal((n, K) + out)
    xf, dyf = x.reshape(n, -1), dy.reshape(n, -1)
    kw = dict(stride=stride, padding=pads, dilation=dilation, groups=groups, padding_mode=mode)

    want_y = (xf @ M.T).reshape(dy.shape) + b.reshape((K,) + (1,) * len(L))
    assert_close(ref.conv(x, w, b, **kw), want_y)
    assert_close(ref.conv_input(x.shape, w, dy, **kw), (dyf @ M).reshape(x.shape))  # M.T @ dy per sample
    # dM/dw[k,c,r] = E[k,c,r], so dw[k,c,r] = sum_n dy_n . (E[k,c,r] @ x_n)
    want_dw = np.einsum("nr,...rc,nc->...", dyf, E, xf)
    assert_close(ref.conv_weight(x, w.shape, dy, **kw), want_dw)
    assert_close(ref.conv_bias(dy), dy.sum(axis=tuple(i for i in range(dy.ndim) if i != 1)))


def test_matrix_oracle_counts_parameter_sharing():
    """The oracle itself: a 32x32x3 input with six 5x5 filters is a 3072 x 4704 matrix built from 456 weights."""
    E, out = pattern_matrices((1, 3, 8, 8), (6, 3, 5, 5), (1, 1), ((0, 0), (0, 0)), (1, 1), 1, "zeros")
    assert out == (4, 4) and E.shape[-2:] == (6 * 16, 3 * 64)
    assert (E.sum(axis=(-1, -2)) == 16).all()  # each weight is used once per output position, 4x4 of them


# ---------------------------------------------------------------- random valid problems


def random_problem(seed, mode="zeros"):
    """A random valid (x shape, w shape, kwargs): 1-3 axes, stride 1-3, dilation 1-2, groups, asymmetric pads."""
    rng = np.random.default_rng(seed)
    nd = int(rng.integers(1, 4))
    groups = int(rng.choice([1, 2, 3]))
    C, K = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 3))
    L = tuple(int(v) for v in rng.integers(3, 9 if nd < 3 else 6, nd))
    ksize = tuple(int(rng.integers(1, min(4, l_) + 1)) for l_ in L)
    stride = tuple(int(v) for v in rng.integers(1, 4, nd))
    dilation = tuple(1 if k == 1 or rng.random() < 0.5 else 2 for k in ksize)
    pads = tuple((int(rng.integers(0, min(3, l_))), int(rng.integers(0, min(3, l_)))) for l_ in L)
    # shrink what does not fit: the dilated kernel must fit in the padded input
    dilation = tuple(d if lo + l_ + hi >= d * (k - 1) + 1 else 1
                     for d, k, l_, (lo, hi) in zip(dilation, ksize, L, pads))
    kw = dict(stride=stride, padding=pads, dilation=dilation, groups=groups, padding_mode=mode)
    return (int(rng.integers(1, 3)), C) + L, (K, C // groups) + ksize, kw, rng


def out_shape(x_shape, w_shape, kw):
    """(N, K, *O) from the definition: O = floor((L + lo + hi - d*(k-1) - 1)/s) + 1, written out again here."""
    sizes = [(L + lo + hi - d * (k - 1) - 1) // s + 1 for L, k, s, d, (lo, hi)
             in zip(x_shape[2:], w_shape[2:], kw["stride"], kw["dilation"], kw["padding"])]
    return (x_shape[0], w_shape[0]) + tuple(sizes)


# ---------------------------------------------------------------- 2. adjoint identity, 3. finite differences


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(6))
def test_adjoint_identity(seed, mode):
    x_shape, w_shape, kw, rng = random_problem(seed, mode)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    y = rng.standard_normal(out_shape(x_shape, w_shape, kw))
    lhs = np.vdot(ref.conv(x, w, **kw), y)
    rhs = np.vdot(x, ref.conv_input(x_shape, w, y, **kw))
    assert abs(lhs - rhs) <= 1e-12 * np.abs(x).sum() * np.abs(w).sum() * np.abs(y).max()
    assert abs(lhs) > 0  # a non-trivial pairing


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(3))
def test_conv_weight_finite_differences(seed, mode):
    x_shape, w_shape, kw, rng = random_problem(100 + seed, mode)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    dy = rng.standard_normal(out_shape(x_shape, w_shape, kw))
    dw = ref.conv_weight(x, w_shape, dy, **kw)
    h = 1e-3
    for flat in rng.choice(w.size, size=min(4, w.size), replace=False):
        e = np.zeros(w.size)
        e[flat] = h
        e = e.reshape(w_shape)
        fd = (np.vdot(ref.conv(x, w + e, **kw), dy) - np.vdot(ref.conv(x, w - e, **kw), dy)) / (2 * h)
        assert abs(fd - dw.flat[flat]) <= 1e-8 * max(1.0, abs(fd)), (flat, fd, dw.flat[flat])


# ---------------------------------------------------------------- 4. 1x1 conv == matmul, 5. equivariance


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_pointwise_conv_is_channel_matmul(nd, groups):
    rng = np.random.default_rng(nd * 10 + groups)
    C, K = 4, 8
    x = rng.standard_normal((2, C) + (5, 4, 3)[:nd])
    w = rng.standard_normal((K, C // groups) + (1,) * nd)
    want = np.zeros((2, K) + x.shape[2:])
    for k in range(K):  # y[:, k] = sum over its group's channels of w[k, c] * x[:, c]
        g = k // (K // groups)
        for c in range(C // groups):
            want[:, k] += w[(k, c) + (0,) * nd] * x[:, g * (C // groups) + c]
    assert_close(ref.conv(x, w, groups=groups), want)


@pytest.mark.parametrize("nd,stride,kernel,dilation,shift", [
    (1, 1, 3, 1, 2), (1, 2, 3, 2, 2), (1, 3, 2, 1, 3),
    (2, 2, 3, 1, (2, 4)), (3, 1, 3, 1, (1, 2, 1)), (3, 2, 2, 2, (2, 0, 4)),
])
def test_circular_translation_equivariance(nd, stride, kernel, dilation, shift):
    """Rolling x by m*s along each axis rolls y by m when L = O*s (lo + hi = d*(k-1), s divides L)."""
    rng = np.random.default_rng(3)
    L = (6, 6, 6)[:nd] if stride != 1 else (7, 5, 6)[:nd]
    shift = (shift,) * nd if np.ndim(shift) == 0 else shift
    total = dilation * (kernel - 1)
    pads = ((total // 3, total - total // 3),) * nd  # asymmetric on purpose
    x = rng.standard_normal((2, 3) + L)
    w = rng.standard_normal((4, 3) + (kernel,) * nd)
    kw = dict(stride=stride, padding=pads, dilation=dilation, padding_mode="circular")
    y = ref.conv(x, w, **kw)
    assert y.shape[2:] == tuple(l_ // stride for l_ in L)
    axes = tuple(range(2, 2 + nd))
    y_rolled = ref.conv(np.roll(x, shift, axis=axes), w, **kw)
    assert_close(y_rolled, np.roll(y, tuple(m // stride for m in shift), axis=axes))


# ---------------------------------------------------------------- 6. transposed convolution identities

# (C_in, C_out, L, kernel, stride, padding, output_padding, dilation, groups)
TRANSPOSE_CASES = [
    (3, 2, (6,), (3,), 2, 1, 1, 1, 1),
    (4, 6, (5,), (2,), 1, 0, 1, 2, 2),  # output_padding >= stride (allowed: < dilation)
    (2, 4, (4, 5), (3, 2), (2, 3), ((1, 0), (0, 1)), (1, 2), (1, 1), 2),
    (4, 8, (3, 4, 3), (2, 3, 2), (2, 1, 1), (0, 1, 0), (1, 0, 0), (1, 1, 2), 4),
]


@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=lambda c: f"{len(c[2])}d-s{c[4]}-op{c[6]}-g{c[8]}")
def test_conv_transpose_identities(case):
    cin, cout, L, ksize, stride, padding, opad, dilation, groups = case
    nd = len(L)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, cin) + L)
    w = rng.standard_normal((cin, cout // groups) + ksize)
    b = rng.standard_normal(cout)
    per = lambda v: (v,) * nd if np.ndim(v) == 0 else tuple(v)  # noqa: E731
    pads = [(p, p) if np.ndim(p) == 0 else p for p in per(padding)]
    lout = tuple((l_ - 1) * s - lo - hi + d * (k - 1) + op + 1
                 for l_, k, s, d, (lo, hi), op in zip(L, ksize, per(stride), per(dilation), pads, per(opad)))
    kw = dict(stride=stride, padding=padding, output_padding=opad, groups=groups, dilation=dilation)
    ckw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    y = ref.conv_transpose(x, w, b, **kw)
    y_shape = (2, cout) + lout
    assert y.shape == y_shape
    # the forward conv on y's shape has >= L outputs; x sits in its first L rows, the rest are zero
    conv_out = ref.conv(np.zeros(y_shape), w, **ckw).shape
    x_ext = np.zeros(conv_out)
    x_ext[(slice(None),) * 2 + tuple(slice(0, l_) for l_ in L)] = x
    bias = b.reshape((-1,) + (1,) * nd)
    assert_close(y, ref.conv_input(y_shape, w, x_ext, **ckw) + bias)
    # gradients of conv_transpose: forward conv of dy, and conv_weight with x and dy swapped
    dy = rng.standard_normal(y_shape)
    crop = (slice(None),) * 2 + tuple(slice(0, l_) for l_ in L)
    assert_close(ref.conv_transpose_input(x.shape, w, dy, **kw), ref.conv(dy, w, **ckw)[crop])
    assert_close(ref.conv_transpose_weight(x, w.shape, dy, **kw), ref.conv_weight(dy, w.shape, x_ext, **ckw))
    # and they are its adjoints: <conv_transpose(x), dy> == <x, conv_transpose_input(dy)>
    y0 = ref.conv_transpose(x, w, **kw)
    assert np.isclose(np.vdot(y0, dy), np.vdot(x, ref.conv_transpose_input(x.shape, w, dy, **kw)), rtol=1e-12)
    assert np.isclose(np.vdot(y0, dy), np.vdot(w, ref.conv_transpose_weight(x, w.shape, dy, **kw)), rtol=1e-12)


def test_accepts_any_float_dtype_and_returns_float64():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 2, 5, 5)), rng.standard_normal((3, 2, 3, 3))
    y32 = ref.conv(x.astype(np.float32), w.astype(np.float16), padding=1)
    assert y32.dtype == np.float64
    assert_close(y32, ref.conv(x.astype(np.float32).astype(np.float64), w.astype(np.float16).astype(np.float64),
                               padding=1))


# ---------------------------------------------------------------- 7. PyTorch


def torch_pad(pads):
    """per-axis (low, high) pairs -> F.pad's flat list, last axis first."""
    return [p for lo_hi in reversed(pads) for p in lo_hi]


def torch_conv_cases():
    """(nd, N, C, K, L, kernel, stride, dilation, padding pairs, groups, mode) over the grid in the brief."""
    spatial = {1: (9,), 2: (7, 6), 3: (5, 4, 5)}
    for nd in (1, 2, 3):
        L = spatial[nd]
        k3, one = (3,) * nd, (1,) * nd
        sym = lambda p, nd=nd: ((p, p),) * nd  # noqa: E731
        variants = [  # (C, K, kernel, stride, dilation, pads, groups)
            (4, 6, k3, 1, 1, sym(1), 1),
            (4, 6, k3, 2, 1, sym(0), 1),
            (4, 6, k3, 3, 2, sym(2), 1),
            (4, 6, k3, 2, 2, sym(1), 2),
            (4, 8, k3, 1, 1, sym(1), 4),  # depthwise, channel multiplier 2
            (3, 4, (3, 2, 1)[:nd] if nd > 1 else (2,), 1, 1, ((2, 0), (0, 1), (1, 2))[:nd], 1),  # asymmetric
            (4, 4, one, 2, 1, sym(0), 1),  # 1x1, stride 2
            (2, 3, L, 1, 1, sym(0), 1),  # input-sized kernel
            (2, 4, L, 1, 1, sym(1), 2),  # input-sized kernel, padded
        ]
        for (C, K, ksize, s, d, pads, g), mode in itertools.product(variants, MODES):
            yield (nd, 2, C, K, L, ksize, (s,) * nd, (d,) * nd, pads, g, mode)


def _case_id(c):
    nd, _, C, K, L, k, s, d, pads, g, mode = c
    return f"{nd}d-C{C}K{K}-k{'x'.join(map(str, k))}-s{s[0]}d{d[0]}-p{pads[0][0]}{pads[0][1]}-g{g}-{mode}"


@pytest.mark.torch
@pytest.mark.parametrize("case", list(torch_conv_cases()), ids=_case_id)
def test_conv_and_gradients_match_torch(case):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    nd, n, C, K, L, ksize, stride, dilation, pads, groups, mode = case
    rng = np.random.default_rng(5)
    x, w, b = rng.standard_normal((n, C) + L), rng.standard_normal((K, C // groups) + ksize), rng.standard_normal(K)
    kw = dict(stride=stride, padding=pads, dilation=dilation, groups=groups, padding_mode=mode)
    y = ref.conv(x, w, b, **kw)
    dy = rng.standard_normal(y.shape)

    # torch.nn.ConvNd's way: an explicit F.pad, then an unpadded conv; gradients by autograd in float64
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    xp = F.pad(tx, torch_pad(pads), mode="constant" if mode == "zeros" else mode)
    conv = getattr(F, f"conv{nd}d")
    ty = conv(xp, tw, torch.tensor(b), stride=stride, padding=0, dilation=dilation, groups=groups)
    ty.backward(torch.tensor(dy))
    assert_close(y, ty.detach().numpy())
    assert_close(ref.conv_input(x.shape, w, dy, **kw), tx.grad.numpy())
    assert_close(ref.conv_weight(x, w.shape, dy, **kw), tw.grad.numpy())
    assert_close(ref.conv_bias(dy), dy.sum(axis=(0,) + tuple(range(2, 2 + nd))))

    if mode == "zeros" and all(lo == hi for lo, hi in pads):  # torch's own gradient functions take symmetric pads
        p = tuple(lo for lo, _ in pads)
        grad = torch.nn.grad
        t_dx = getattr(grad, f"conv{nd}d_input")(x.shape, torch.tensor(w), torch.tensor(dy), stride, p, dilation,
                                                 groups)
        t_dw = getattr(grad, f"conv{nd}d_weight")(torch.tensor(x), w.shape, torch.tensor(dy), stride, p, dilation,
                                                  groups)
        assert_close(ref.conv_input(x.shape, w, dy, **kw), t_dx.numpy())
        assert_close(ref.conv_weight(x, w.shape, dy, **kw), t_dw.numpy())


def torch_transpose_cases():
    """(nd, C_in, C_out, L, kernel, stride, padding, output_padding, dilation, groups)."""
    spatial = {1: (7,), 2: (5, 4), 3: (3, 4, 3)}
    for nd in (1, 2, 3):
        L, k3 = spatial[nd], (3,) * nd
        per = lambda v, nd=nd: (v,) * nd  # noqa: E731
        yield (nd, 4, 6, L, k3, per(1), per(0), per(0), per(1), 1)
        yield (nd, 4, 6, L, k3, per(2), per(1), per(1), per(1), 2)
        yield (nd, 3, 2, L, k3, per(3), per(2), per(2), per(2), 1)
        yield (nd, 4, 4, L, k3, per(1), per(1), per(1), per(2), 2)  # output_padding >= stride (< dilation)
        yield (nd, 4, 8, L, k3, per(2), per(1), per(0), per(1), 4)  # depthwise, channel multiplier 2
        yield (nd, 4, 2, L, (1,) * nd, per(2), per(0), per(1), per(1), 1)  # 1x1
        yield (nd, 2, 3, L, L, per(1), per(1), per(0), per(1), 1)  # input-sized kernel


@pytest.mark.torch
@pytest.mark.parametrize("case", list(torch_transpose_cases()),
                         ids=lambda c: f"{c[0]}d-s{c[5][0]}p{c[6][0]}op{c[7][0]}d{c[8][0]}-g{c[9]}-k{c[4][0]}")
def test_conv_transpose_and_gradients_match_torch(case):
    torch = pytest.importorskip("torch")
    nd, cin, cout, L, ksize, stride, padding, opad, dilation, groups = case
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, cin) + L)
    w, b = rng.standard_normal((cin, cout // groups) + ksize), rng.standard_normal(cout)
    kw = dict(stride=stride, padding=padding, output_padding=opad, groups=groups, dilation=dilation)
    y = ref.conv_transpose(x, w, b, **kw)
    dy = rng.standard_normal(y.shape)
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    ty = getattr(torch.nn.functional, f"conv_transpose{nd}d")(tx, tw, torch.tensor(b), **kw)
    ty.backward(torch.tensor(dy))
    assert_close(y, ty.detach().numpy())
    assert_close(ref.conv_transpose_input(x.shape, w, dy, **kw), tx.grad.numpy())
    assert_close(ref.conv_transpose_weight(x, w.shape, dy, **kw), tw.grad.numpy())


@pytest.mark.torch
@pytest.mark.parametrize("nd,pads,opad", [
    (1, ((2, 0),), 1), (2, ((0, 1), (2, 1)), 0), (3, ((1, 0), (0, 0), (0, 2)), 1),
])
def test_conv_transpose_asymmetric_padding_matches_cropped_torch(nd, pads, opad):
    """torch has no asymmetric padding: its padding=0 output cropped by lo at the start and hi at the end."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((2, 4) + (5, 4, 3)[:nd]), rng.standard_normal((4, 3) + (3,) * nd)
    y = ref.conv_transpose(x, w, stride=2, padding=pads, output_padding=opad, groups=1, dilation=1)
    full = getattr(torch.nn.functional, f"conv_transpose{nd}d")(torch.tensor(x), torch.tensor(w), stride=2,
                                                                output_padding=opad).numpy()
    crop = (slice(None),) * 2 + tuple(slice(lo, n - hi) for (lo, hi), n in zip(pads, full.shape[2:]))
    assert_close(y, full[crop])


def test_conv_transpose_past_its_stride_multiplies_only_x():
    """output_padding >= stride (dilation 2 > stride 1): the output runs past what x reaches, and those positions
    get nothing, not the weight times a zero (NaN for a NaN weight). By hand: y[2t] = x[0] * w[t], dw[t] = dy[2t]."""
    x, w = np.array([[[1.0]]]), np.array([[[np.nan, 1.0]]])
    np.testing.assert_array_equal(ref.conv_transpose(x, w, output_padding=1, dilation=2), [[[np.nan, 0.0, 1.0, 0.0]]])
    dy = np.array([[[1.0, np.nan, 3.0, 4.0]]])
    np.testing.assert_array_equal(ref.conv_transpose_weight(x, (1, 1, 2), dy, output_padding=1, dilation=2),
                                  [[[1.0, 3.0]]])
    import cnnfast
    with cnnfast.checking():  # the kernels agree (check mode raised a false MismatchError before)
        y = cnnfast.conv_transpose1d(x.astype(np.float32), w.astype(np.float32), output_padding=1, dilation=2)
    np.testing.assert_array_equal(y, [[[np.nan, 0.0, 1.0, 0.0]]])


@pytest.mark.parametrize("op", ["conv_transpose1d", "conv_transpose1d_weight"])
def test_reference_algorithm_past_the_stride_matches_direct(op):
    """algo='reference' (the reference behind the kernel interface) on the same layer, output_padding 2 >= stride 1
    at dilation 3, with an inf in w or in dy's last position: finite where x does not reach, as direct and torch.
    It zero-extended dy to the reference's longer output before: NaN there."""
    import cnnfast
    from cnnfast import grad
    x = np.arange(1.0, 6.0).reshape(1, 1, 5)
    opts = dict(stride=1, dilation=3, output_padding=2)
    if op == "conv_transpose1d":
        w = np.array([[[1.0, np.inf, 1.0]]])
        run = lambda algo: cnnfast.conv_transpose1d(x, w, algo=algo, **opts)  # noqa: E731
    else:
        dy = np.ones((1, 1, 13))
        dy[..., -1] = np.inf
        run = lambda algo: grad.conv_transpose1d_weight(x, (1, 1, 3), dy, algo=algo, **opts)  # noqa: E731
    got, direct = run("reference"), run("direct")
    np.testing.assert_array_equal(got, direct)
    assert np.isfinite(got[..., -3:]).all()
