"""Bad input is rejected before any kernel runs, with the op, the argument, expected and given values;
edge cases that are valid (empty batch, zero channels, unbatched, non-contiguous) give correct results."""
import inspect

import numpy as np
import pytest

import cnnfast
from cnnfast import grad, reference
from cnnfast.spec import ConvSpec


def a(*shape, dtype="float32"):
    return np.ones(shape, dtype=dtype)


x4, w4 = a(1, 3, 8, 8), a(4, 3, 3, 3)

BAD = [
    # (id, call, exception type, message fragment)
    ("input-ndim", lambda: cnnfast.conv2d(a(3, 8), w4), ValueError,
     "conv2d: Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: [3, 8]"),
    ("weight-ndim", lambda: cnnfast.conv2d(x4, a(4, 3, 3)), ValueError, "expected 4-dimensional weight"),
    ("bias-length", lambda: cnnfast.conv2d(x4, w4, a(5)), ValueError,
     "expected bias to be 1-dimensional with 4 elements, but got bias of size [5]"),
    ("bias-ndim", lambda: cnnfast.conv2d(x4, w4, a(4, 1)), ValueError, "but got bias of size [4, 1]"),
    ("channels", lambda: cnnfast.conv2d(a(1, 32, 256, 256), a(64, 3, 7, 7)), ValueError,
     "Given groups=1, weight of size [64, 3, 7, 7], expected input[1, 32, 256, 256] to have 3 channels, "
     "but got 32 channels instead"),
    ("in-channels-groups", lambda: cnnfast.conv2d(a(1, 3, 8, 8), a(4, 1, 3, 3), groups=2), ValueError,
     "to have 2 channels, but got 3 channels instead"),
    ("out-channels-groups", lambda: cnnfast.conv2d(a(1, 4, 8, 8), a(3, 2, 3, 3), groups=2), ValueError,
     "expected weight to be divisible by 2 at dimension 0"),
    ("stride-zero", lambda: cnnfast.conv2d(x4, w4, stride=0), ValueError, "non-positive stride is not supported"),
    ("stride-type", lambda: cnnfast.conv2d(x4, w4, stride=1.5), TypeError, "expected stride to be an int"),
    ("dilation-zero", lambda: cnnfast.conv2d(x4, w4, dilation=(1, 0)), ValueError,
     "dilation should be greater than zero"),
    ("groups-zero", lambda: cnnfast.conv2d(x4, w4, groups=0), ValueError, "non-positive groups is not supported"),
    ("padding-negative", lambda: cnnfast.conv2d(x4, w4, padding=-1), ValueError,
     "negative padding is not supported"),
    ("padding-string", lambda: cnnfast.conv2d(x4, w4, padding="full"), ValueError,
     "Invalid padding string 'full'"),
    ("same-transposed", lambda: cnnfast.conv_transpose2d(a(1, 4, 5, 5), w4, padding="same"), ValueError,
     "padding='same' is not supported for transposed convolution"),
    ("output-padding-negative", lambda: cnnfast.conv_transpose2d(a(1, 4, 5, 5), w4, stride=2, output_padding=-1),
     ValueError, "negative output_padding is not supported"),
    ("output-padding-large", lambda: cnnfast.conv_transpose2d(a(1, 4, 5, 5), w4, stride=2, output_padding=2),
     ValueError, "output padding must be smaller than either stride or dilation"),
    ("output-size-range", lambda: cnnfast.conv_transpose2d(a(1, 4, 5, 5), w4, stride=2, output_size=(20, 20)),
     ValueError, "requested an output size of [20, 20], but valid sizes range from [11, 11] to [12, 12]"),
    ("reflect-too-large", lambda: cnnfast.conv2d(a(1, 3, 3, 8), w4, padding=3, padding_mode="reflect"),
     ValueError, "Padding size should be less than the corresponding input dimension"),
    ("padding-mode", lambda: cnnfast.conv2d(x4, w4, padding_mode="mirror"), ValueError,
     "padding_mode must be one of"),
    ("kernel-too-large", lambda: cnnfast.conv2d(a(1, 3, 2, 8), w4), ValueError,
     "Kernel size can't be greater than actual input size"),
    ("output-too-small", lambda: cnnfast.conv_transpose2d(a(1, 4, 1, 1), w4, padding=2), ValueError,
     "Output size is too small"),
    ("dtype-int", lambda: cnnfast.conv2d(x4.astype(np.int32), w4.astype(np.int32)), TypeError,
     "expected input to have dtype float32 or float64, but got int32"),
    ("dtype-half", lambda: cnnfast.conv2d(x4.astype(np.float16), w4), TypeError, "but got float16"),
    ("dtype-object", lambda: cnnfast.conv2d(x4.astype(object), w4), TypeError, "but got object"),
    ("dtype-mismatch", lambda: cnnfast.conv2d(x4, w4.astype(np.float64)), TypeError,
     "expected weight to have the same dtype as input (float32), but got float64"),
    ("not-an-array", lambda: cnnfast.conv2d(x4.tolist(), w4), TypeError,
     "expected input to be a NumPy array or a CUDA array"),
    ("unknown-algo", lambda: cnnfast.conv2d(x4, w4, algo="winograd9"), ValueError, "unknown algo 'winograd9'"),
    ("grad-output-shape", lambda: grad.conv2d_input((1, 3, 8, 8), w4, a(1, 4, 5, 5)), ValueError,
     "expected grad_output of size [1, 4, 6, 6]"),
    ("weight-size-type", lambda: grad.conv2d_weight(x4, "4x3x3x3", a(1, 4, 6, 6)), TypeError,
     "expected weight_size to be a sequence of non-negative ints"),
    ("workspace-limit", lambda: cnnfast.conv2d(x4, w4, workspace_limit=-5), ValueError,
     "expected workspace_limit to be a non-negative int"),
]


@pytest.mark.parametrize("call, kind, fragment", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_rejected_with_a_clear_message(call, kind, fragment):
    with pytest.raises(kind) as info:
        call()
    assert fragment in str(info.value)
    assert type(info.value) is kind


def test_arrays_on_different_devices_are_rejected():
    from numba import cuda  # the simulator when there is no GPU (tests/conftest.py)
    w_dev = cuda.to_device(w4)
    with pytest.raises(TypeError, match="expected all arrays to be on the same device, but got input on cpu"):
        cnnfast.conv2d(x4, w_dev)


def test_explain_rejects_the_same_bad_input():
    with pytest.raises(ValueError, match="to have 3 channels, but got 32 channels instead"):
        cnnfast.explain("conv2d", (1, 32, 256, 256), (64, 3, 7, 7))


# ---------------------------------------------------------------- valid edge cases


def test_empty_batch_returns_an_empty_result():
    y = cnnfast.conv2d(a(0, 3, 8, 8), w4, a(4), padding=1)
    assert y.shape == (0, 4, 8, 8) and y.dtype == np.float32
    dw = grad.conv2d_weight(a(0, 3, 8, 8), w4.shape, a(0, 4, 6, 6))
    assert dw.shape == w4.shape and not dw.any()


def test_zero_input_channels_give_the_bias_over_the_full_output_shape():
    """PyTorch returns (N, 0, ...) here; the sum over no channels is zero, so y = bias everywhere."""
    bias = np.array([1.0, -2.0, 3.0], np.float32)
    y = cnnfast.conv2d(a(2, 0, 5, 5), a(3, 0, 3, 3), bias)
    assert y.shape == (2, 3, 3, 3)
    np.testing.assert_array_equal(y, np.broadcast_to(bias[None, :, None, None], y.shape))
    yt = cnnfast.conv_transpose1d(a(2, 0, 5), a(0, 3, 3), bias)
    assert yt.shape == (2, 3, 7)
    np.testing.assert_array_equal(yt, np.broadcast_to(bias[None, :, None], yt.shape))


def test_unbatched_input(rng):
    x = rng.standard_normal((3, 9, 7)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    y = cnnfast.conv2d(x, w, padding=1, stride=2)
    expected = reference.conv(x[None], w, padding=1, stride=2)[0]
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    dx = grad.conv2d_input(x.shape, w, y, padding=1, stride=2)
    np.testing.assert_allclose(dx, reference.conv_input((1,) + x.shape, w, y[None], padding=1, stride=2)[0],
                               rtol=1e-4, atol=1e-4)


def test_non_contiguous_and_negatively_strided_inputs(rng):
    base = rng.standard_normal((2, 6, 10, 12))
    x = base[:, ::2, ::-1, 1::2]  # every other channel, flipped rows, odd columns
    w = rng.standard_normal((3, 4, 3, 3)).transpose(1, 0, 2, 3)[:, :, :, ::-1]  # (4, 3, 3, 3), negative strides
    assert not x.flags.c_contiguous and not w.flags.c_contiguous
    y = cnnfast.conv2d(x, w, padding=(1, 0))
    np.testing.assert_allclose(y, reference.conv(np.ascontiguousarray(x), np.ascontiguousarray(w), padding=(1, 0)),
                               rtol=1e-10, atol=1e-10)


def test_explain_lenet_plan():
    plan = cnnfast.explain("conv2d", (1, 3, 32, 32), (6, 3, 5, 5), (6,))
    assert plan.spec.output_shape == (1, 6, 28, 28)
    assert plan.spec.params == 456 and plan.spec.dense_params == 14_450_688
    assert plan.device == "cpu" and plan.algorithm in cnnfast.plan.algorithms("cpu")
    assert plan.deterministic and plan.reason


@pytest.mark.parametrize("padding", [((0, -1),), ((-1, 0),), ((2, 1), (1, -1))], ids=["high", "low", "2d-high"])
def test_a_negative_side_of_a_padding_pair_is_refused(padding):
    """Catches a negativity check that looks at one side of a (low, high) pair only (a negative high pad silently
    crops the output instead of raising)."""
    nd = len(padding)
    x, w = a(1, 1, *(6,) * nd), a(1, 1, *(3,) * nd)
    with pytest.raises(ValueError, match="negative padding is not supported"):
        getattr(cnnfast, f"conv{nd}d")(x, w, padding=padding)


def test_reflect_refuses_a_high_pad_as_long_as_the_axis():
    """Catches reflect's 'pad < L' check applied to the low side only: torch's F.pad(mode='reflect') refuses a pad
    of L on either side; a high pad of 3 on 3 elements would otherwise reflect twice without an error."""
    with pytest.raises(ValueError, match="Padding size should be less than the corresponding input dimension"):
        cnnfast.conv1d(a(1, 1, 3), a(1, 1, 1), padding=((0, 3),), padding_mode="reflect")
    with pytest.raises(ValueError, match="Padding size should be less than the corresponding input dimension"):
        cnnfast.conv1d(a(1, 1, 3), a(1, 1, 1), padding=((3, 0),), padding_mode="reflect")


def test_circular_takes_a_pad_as_long_as_the_axis():
    """Catches circular's 'wraps more than once' check refusing pad == L (torch accepts it: the axis wraps exactly
    once): x = [1, 2, 3] padded by 3 each side and read by a 1-tap filter is x three times over."""
    spec = ConvSpec.create("conv1d", (1, 1, 3), (1, 1, 1), padding=3, padding_mode="circular")
    assert list(spec.pad_tables()[-1]) == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    y = cnnfast.conv1d(np.array([[[1.0, 2.0, 3.0]]]), np.ones((1, 1, 1)), padding=3, padding_mode="circular")
    np.testing.assert_array_equal(y, [[[1, 2, 3, 1, 2, 3, 1, 2, 3]]])
    with pytest.raises(ValueError, match="wrapping around more than once"):
        cnnfast.conv1d(np.ones((1, 1, 3)), np.ones((1, 1, 1)), padding=((0, 4),), padding_mode="circular")


# the public ops' positional order: PyTorch's (torch.nn.functional; torch.nn.grad for the gradients)
_CONV = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
_CONV_T = ["input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"]
_GRAD = ["stride", "padding", "dilation", "groups"]          # torch.nn.grad.conv{n}d_input / _weight
_GRAD_T = ["stride", "padding", "output_padding", "groups", "dilation"]  # F.conv_transpose{n}d's order


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_positional_parameters_follow_pytorch(nd):
    """Catches two positional parameters swapped in a public op (groups/dilation of conv_transpose{n}d or of the
    gradients): a caller porting F.conv_transpose2d(x, w, b, s, p, op, groups, dilation) positionally would get
    the dilation as groups. Orders as documented for torch.nn.functional and torch.nn.grad."""
    def positional(fn):
        return [p.name for p in inspect.signature(fn).parameters.values()
                if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional(getattr(cnnfast, f"conv{nd}d")) == _CONV
    assert positional(getattr(cnnfast, f"conv_transpose{nd}d")) == _CONV_T
    assert positional(getattr(grad, f"conv{nd}d_input")) == ["input_size", "weight", "grad_output"] + _GRAD
    assert positional(getattr(grad, f"conv{nd}d_weight")) == ["input", "weight_size", "grad_output"] + _GRAD
    assert positional(getattr(grad, f"conv_transpose{nd}d_input")) == ["input_size", "weight", "grad_output"] + _GRAD_T
    assert positional(getattr(grad, f"conv_transpose{nd}d_weight")) == ["input", "weight_size", "grad_output"] + _GRAD_T


def test_a_positional_transposed_call_reads_groups_before_dilation():
    """Catches the same swap by behaviour: conv_transpose1d(x, w, None, 2, 1, 1, 2, 3) is groups=2, dilation=3."""
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((1, 4, 5)), rng.standard_normal((4, 1, 3))
    want = reference.conv_transpose(x, w, stride=2, padding=1, output_padding=1, groups=2, dilation=3)
    np.testing.assert_allclose(cnnfast.conv_transpose1d(x, w, None, 2, 1, 1, 2, 3), want, rtol=1e-12, atol=1e-12)
