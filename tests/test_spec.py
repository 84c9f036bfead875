"""ConvSpec shape algebra and figures, checked against formulas and independent counts."""
import math

import numpy as np
import pytest
from cnnfast.kernels.contract import conv_output_size
from hypothesis import given, settings
from hypothesis import strategies as st

import cnnfast
from cnnfast import reference
from cnnfast.spec import ConvSpec, same_padding, transposed_output_size


def test_lenet_example_figures():
    """32x32x3 input, six 5x5 filters with bias, no padding: 28x28x6 output, 456 vs 14,450,688 weights."""
    spec = ConvSpec.create("conv2d", (1, 3, 32, 32), (6, 3, 5, 5), bias_shape=(6,))
    assert spec.output_shape == (1, 6, 28, 28)
    assert spec.params == 6 * 3 * 5 * 5 + 6 == 456
    assert spec.dense_params == (3 * 32 * 32) * (6 * 28 * 28) == 14_450_688
    assert spec.flops == 2 * 6 * 28 * 28 * 3 * 5 * 5
    assert spec.connection_sparsity == pytest.approx(1 - 6 * 28 * 28 * 3 * 25 / 14_450_688)
    text = spec.describe()
    assert "456" in text and "14,450,688" in text and "[1, 6, 28, 28]" in text


axis = st.tuples(st.integers(1, 40), st.integers(1, 6), st.integers(1, 4), st.integers(1, 3),
                 st.integers(0, 4), st.integers(0, 4))


@settings(max_examples=300, deadline=None)
@given(axis)
def test_output_size_is_the_largest_fitting_count(a):
    """out windows fit inside the padded input and one more would not."""
    L, k, s, d, lo, hi = a
    out = conv_output_size(L, k, s, d, lo, hi)
    extent = d * (k - 1) + 1
    if L + lo + hi < extent:
        assert out <= 0
        return
    assert (out - 1) * s + extent <= L + lo + hi < out * s + extent


@settings(max_examples=300, deadline=None)
@given(axis)
def test_transposed_conv_round_trip(a):
    """conv_transpose with output_padding = the conv's leftover rows restores the conv's input length."""
    L, k, s, d, lo, hi = a
    out = conv_output_size(L, k, s, d, lo, hi)
    if out <= 0:
        return
    leftover = (L + lo + hi - d * (k - 1) - 1) % s
    assert leftover < s
    assert transposed_output_size(out, k, s, d, lo, hi, leftover) == L
    spec = ConvSpec.create("conv_transpose1d", (1, 2, out), (2, 3, k), stride=s, dilation=d, transposed=True,
                           padding=((lo, hi),), output_padding=leftover) if leftover < max(s, d) else None
    if spec is not None and spec.output_shape[2] > 0:
        assert spec.output_shape == (1, 3, L)
        assert spec.geometry.y_shape[-1] == out  # the kernels see the original conv


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 50), st.integers(1, 7), st.integers(1, 4), st.integers(1, 3))
def test_same_padding_gives_ceil_l_over_s(L, k, s, d):
    lo, hi = same_padding(L, k, s, d)
    assert 0 <= hi - lo <= 1
    assert conv_output_size(L, k, s, d, lo, hi) == math.ceil(L / s)
    spec = ConvSpec.create("conv1d", (1, 1, L), (1, 1, k), stride=s, dilation=d, padding="same")
    assert spec.output_shape[2] == math.ceil(L / s)


@pytest.mark.parametrize("shape_x, shape_w, opts", [
    ((2, 3, 9), (4, 3, 3), dict(padding=2, stride=2)),
    ((1, 4, 7, 6), (6, 2, 3, 3), dict(padding=((2, 0), (1, 3)), groups=2, dilation=(1, 2))),
    ((1, 2, 5, 4, 6), (2, 2, 3, 2, 3), dict(padding=(1, 1, 2), stride=(2, 1, 3))),
])
def test_macs_count_only_real_taps(shape_x, shape_w, opts):
    """MACs == sum of conv(ones, ones) from the reference: each output sums its in-range taps."""
    spec = ConvSpec.create("conv", shape_x, shape_w, **opts)
    ones = reference.conv(np.ones(shape_x), np.ones(shape_w), stride=spec.stride, padding=spec.padding,
                          dilation=spec.dilation, groups=spec.groups)
    assert spec.macs == int(round(ones.sum()))
    assert spec.output_shape == ones.shape


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("x_shape, w_shape, opts", [
    ((1, 2, 5, 4), (4, 1, 3, 2), dict(padding=(2, 1), groups=2)),
    ((1, 1, 4), (1, 1, 3), dict(padding=3, dilation=2)),  # windows that reach into both pads
    ((1, 1, 7), (1, 1, 4), dict(padding=((3, 2),), stride=2)),
    ((1, 1, 3, 5), (1, 1, 3, 3), dict(padding=(2, 3), stride=(1, 3), dilation=(1, 2))),
], ids=["2d-groups", "1d-dilated", "1d-strided", "2d-mixed"])
def test_connections_equal_nonzeros_of_the_dense_matrix(mode, x_shape, w_shape, opts):
    """Non-zeros of the explicit matrix (reference applied to basis vectors, all-ones weights)."""
    try:
        spec = ConvSpec.create("conv", x_shape, w_shape, padding_mode=mode, **opts)
    except ValueError:  # (padding past what reflect or circular can take)
        assert mode in ("reflect", "circular")
        return
    n_in = math.prod(spec.input_shape[1:])
    columns = []
    for j in range(n_in):
        e = np.zeros(n_in)
        e[j] = 1
        columns.append(reference.conv(e.reshape(spec.input_shape), np.ones(spec.weight_shape), stride=spec.stride,
                                      padding=spec.padding, dilation=spec.dilation, groups=spec.groups,
                                      padding_mode=mode).ravel())
    dense = np.stack(columns, axis=1)
    assert dense.size == spec.dense_params
    assert np.count_nonzero(dense) == spec.connections
    assert spec.connection_sparsity == pytest.approx(1 - np.count_nonzero(dense) / dense.size)


def test_min_bytes_and_params():
    spec = ConvSpec.create("conv2d", (8, 16, 10, 10), (32, 16, 3, 3), bias_shape=(32,), padding=1,
                           dtype="float64")
    x, w, y = 8 * 16 * 100, 32 * 16 * 9, 8 * 32 * 100
    assert spec.min_bytes("forward") == 8 * (x + w + y + 32)
    assert spec.min_bytes("backward_data") == 8 * (x + w + y)
    assert spec.params == w + 32
    # transposed: weight (C, K/groups, 3, 3); the bias has K = 3 elements, not C = 8
    spec = ConvSpec.create("conv_transpose2d", (1, 8, 5, 5), (8, 3, 3, 3), bias_shape=(3,), transposed=True)
    x, w, y = 8 * 25, 8 * 3 * 9, 3 * 7 * 7
    assert spec.min_bytes("forward") == 4 * (x + w + y + 3) and spec.params == w + 3


def test_transposed_spec_matches_pytorch_shapes():
    """PyTorch's documented conv_transpose output length, including output_padding and output_size."""
    spec = ConvSpec.create("conv_transpose2d", (2, 8, 5, 7), (8, 3, 4, 3), stride=(2, 3), padding=(1, 0),
                           transposed=True, output_padding=(1, 2), dilation=(1, 2), groups=2)
    H = (5 - 1) * 2 - 2 * 1 + 1 * (4 - 1) + 1 + 1
    W = (7 - 1) * 3 - 0 + 2 * (3 - 1) + 2 + 1
    assert spec.output_shape == (2, 6, H, W)
    same = ConvSpec.create("conv_transpose2d", (2, 8, 5, 7), (8, 3, 4, 3), stride=(2, 3), padding=(1, 0),
                           transposed=True, dilation=(1, 2), groups=2, output_size=(H, W))
    assert same.output_padding == (1, 2)
    as_array = ConvSpec.create("conv_transpose2d", (2, 8, 5, 7), (8, 3, 4, 3), stride=(2, 3), padding=(1, 0),
                               transposed=True, dilation=(1, 2), groups=2, output_size=np.array([H, W]))
    assert as_array == same  # a 1-D NumPy array, as torch.nn.ConvTranspose2d takes it
    g = spec.geometry
    assert (g.P, g.Q, g.U) == (1, 5, 7) and (g.D, g.H, g.W) == (1, H, W)


def test_one_entry_sequences_apply_to_every_axis_as_in_pytorch():
    """F.conv2d(x, w, stride=(2,), padding=[1]) is stride 2 and padding 1 on both axes (ATen expands them)."""
    ones = ConvSpec.create("conv2d", (2, 3, 9, 8), (4, 3, 3, 3), stride=(2,), padding=[1], dilation=(2,))
    assert ones == ConvSpec.create("conv2d", (2, 3, 9, 8), (4, 3, 3, 3), stride=2, padding=1, dilation=2)
    pairs = ConvSpec.create("conv3d", (1, 2, 5, 6, 7), (2, 2, 1, 1, 1), padding=((0, 2),))
    assert pairs.padding == ((0, 2),) * 3
    t = ConvSpec.create("conv_transpose2d", (1, 4, 5, 5), (4, 2, 3, 3), stride=(2,), output_padding=(1,),
                        transposed=True)
    assert t.output_shape == (1, 2, 12, 12) and t.output_padding == (1, 1)


def test_explain_shapes_take_the_dtype_of_the_arrays_given_with_them():
    import cnnfast
    x, w = np.ones((2, 4, 8, 8)), np.ones((6, 4, 3, 3))  # float64
    assert cnnfast.explain("conv2d", x, w, (6,)).spec.dtype == "float64"  # the bias given as a shape
    assert cnnfast.explain("conv2d_weight", x.astype(np.float32), w.shape, (2, 6, 6, 6)).spec.dtype == "float32"
    assert cnnfast.explain("conv2d", x.shape, w.shape).spec.dtype == "float32"  # no array: the default
    assert cnnfast.explain("conv2d", x.shape, w.shape, dtype="float64").spec.dtype == "float64"


def test_explain_device_and_dtype_say_what_arrays_stand_for_too():
    """device= and dtype=, when given, say where and what every argument is, arrays too (the GPU's plan for a NumPy
    array's shape); else each array is its own device and dtype (a mismatch among them is the op's error)."""
    import cnnfast
    x, w = np.ones((2, 4, 8, 8), np.float32), np.ones((6, 4, 3, 3), np.float32)
    plan = cnnfast.explain("conv2d", x, w, padding=1, device="cuda", dtype="float64")
    assert plan.device == "cuda" and plan.spec.dtype == "float64"
    assert plan.kernels == cnnfast.explain("conv2d", x.shape, w.shape, padding=1, device="cuda", dtype="f8").kernels
    assert cnnfast.explain("conv2d", x, w.shape, dtype="float64").spec.dtype == "float64"  # (was weight's error)
    assert cnnfast.explain("conv2d", x, w).device == "cpu"
    with pytest.raises(TypeError, match="conv2d: expected weight to have the same dtype as input"):
        cnnfast.explain("conv2d", x, w.astype(np.float64))


@pytest.mark.parametrize("dtype", [np.float64, np.dtype("f8"), "float64", "f8"])
def test_create_takes_any_numpy_spelling_of_the_dtype(dtype):
    spec = ConvSpec.create("conv2d", (1, 3, 8, 8), (4, 3, 3, 3), dtype=dtype)
    assert spec.dtype == "float64" and spec.itemsize == 8


@pytest.mark.parametrize("dtype", [None, np.float16, "int32", "bogus", ("f4", -1)])
def test_create_refuses_other_dtypes_by_name(dtype):
    with pytest.raises(TypeError, match=r"conv2d: expected dtype float32 or float64, but got "
                                        r"(None|float16|int32|bog|\('f4', -1\))"):
        ConvSpec.create("conv2d", (1, 3, 8, 8), (4, 3, 3, 3), dtype=dtype)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(input_shape=(2, 3, 4, 4, 4, 4), weight_shape=(4, 3, 3, 3, 3, 3)), ValueError,
     r"^conv4d: expected a batched input with 1 to 3 spatial dimensions, but got input of size: \[2, 3, 4, 4, 4, 4\]$"),
    (dict(input_shape=(2, 3), weight_shape=(4, 3)), ValueError,
     r"^conv4d: expected a batched input with 1 to 3 spatial dimensions, but got input of size: \[2, 3\]$"),
    (dict(input_shape=(1, 4, 5, 5), weight_shape=(4, 2, 3, 3), transposed=True, padding_mode="reflect"), ValueError,
     r"^conv4d: only 'zeros' padding mode is supported for transposed convolution, but got padding_mode='reflect'$"),
    (dict(input_shape=(1, 3, -8, 8), weight_shape=(4, 3, 3, 3)), ValueError,
     r"^conv4d: negative sizes are not supported, got input \[1, 3, -8, 8\] and weight \[4, 3, 3, 3\]$"),
    (dict(input_shape=(1, 3, 8, 8), weight_shape=(4, 3, -3, 3)), ValueError,
     r"^conv4d: negative sizes are not supported, got input \[1, 3, 8, 8\] and weight \[4, 3, -3, 3\]$"),
])
def test_create_refuses_what_the_public_ops_never_pass_it(kwargs, error, message):
    """ConvSpec is public (cnnfast.ConvSpec): its own checks of what the ops catch before it (rank, sizes, a
    transposed padding_mode) name the problem too."""
    kwargs = dict(kwargs)
    with pytest.raises(error, match=message):
        ConvSpec.create("conv4d", kwargs.pop("input_shape"), kwargs.pop("weight_shape"), **kwargs)


def test_output_size_ranges_up_to_max_stride_dilation_minus_one():
    """Catches output_size's upper bound taken from the stride alone: with stride 1 and dilation 3 the valid
    output_padding is 0..2 (torch: 'smaller than either stride or dilation'), so output_size may exceed the smallest
    output by 2. Smallest: (4 - 1)*1 + 3*(3 - 1) + 1 = 10."""
    create = dict(transposed=True, stride=1, dilation=3)
    spec = ConvSpec.create("conv_transpose1d", (1, 2, 4), (2, 1, 3), output_size=(12,), **create)
    assert spec.output_padding == (2,) and spec.output_shape == (1, 1, 12)
    with pytest.raises(ValueError, match=r"valid sizes range from \[10\] to \[12\]"):
        ConvSpec.create("conv_transpose1d", (1, 2, 4), (2, 1, 3), output_size=(13,), **create)
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 2, 4)), rng.standard_normal((2, 1, 3))
    y = cnnfast.conv_transpose1d(x, w, dilation=3, output_size=(12,))
    np.testing.assert_allclose(y, reference.conv_transpose(x, w, dilation=3, output_padding=2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("unbatched", [False, True])
def test_a_full_output_size_is_read_from_its_last_entries(unbatched):
    """Catches output_size (N, C, H, W) / (C, H, W) read from its first nd entries instead of its last (torch's
    ConvTranspose takes output_size[-nd:]). Stride 2, 3x3, 5x5 input: sizes 11 to 12 per axis."""
    size = ((3,) if unbatched else (2, 3)) + (12, 11)
    spec = ConvSpec.create("conv_transpose2d", (2, 4, 5, 5), (4, 3, 3, 3), stride=2, transposed=True,
                           output_size=size, unbatched=unbatched)
    assert spec.output_padding == (1, 0) and spec.output_shape == (2, 3, 12, 11)
