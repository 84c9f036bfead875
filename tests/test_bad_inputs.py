"""The bad-input catalogue: every class of invalid input, the error it gets, on the CPU and on CUDA.

CATALOGUE is one list of rows (id, description, build, exception, message regex). `build(A)` makes the call
from an array maker A for the device under test (NumPy arrays on "cpu", numba.cuda.to_device arrays on
"cuda", the simulator without a GPU). Each error row must raise exactly that exception type, with a message
that names the op, the argument, what was expected and what was given, and before any kernel runs (every
kernel entry point is replaced by a tripwire while the row runs). NaN/Inf rows (exception None) must not
raise: build returns (result, float64 reference) and NaN/Inf must land exactly where the reference puts
them, with the finite part matching. README.md's "## Errors" table lists the same ids (test at the end).

Rows that reveal a bug in cnnfast are strict xfails whose reason says what happens now.
"""
import pathlib
import re
import warnings
from typing import Callable, NamedTuple, Optional

import numpy as np
import pytest
from numba import cuda

import cnnfast
from cnnfast import arrays, grad, reference

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BIG = 2**31  # a spatial extent whose square (times the channels) overflows the int64 byte count


class A:
    """Array maker for one device: A(*shape, dtype=...) is an array of ones there; A.put(host) copies."""

    def __init__(self, device):
        self.device = device

    def __call__(self, *shape, dtype="float32"):
        return self.put(np.ones(shape, dtype))

    def put(self, host):
        return host if self.device == "cpu" else cuda.to_device(host)

    @property
    def other(self):
        """The maker of the other array family (NumPy <-> Numba device arrays)."""
        return A("cuda" if self.device == "cpu" else "cpu")


class Row(NamedTuple):
    id: str
    description: str
    build: Callable
    exc: Optional[type]  # None: NaN/Inf row, must not raise
    match: Optional[str]  # regex the message must match (re.search)
    xfail: Optional[str] = None  # a bug in cnnfast: strict xfail with this reason ...
    devices: tuple = ("cpu", "cuda")
    xfail_on: tuple = ("cpu", "cuda")  # ... on these devices


def _x2(A):
    return A(1, 3, 8, 8)


def _w2(A):
    return A(4, 3, 3, 3)


def _data(*shape, seed=0):
    return np.random.default_rng(seed + sum(shape)).uniform(0.5, 1.5, shape).astype(np.float32)


# ---------------------------------------------------------------- NaN / Inf rows: (result, float64 reference)

def _nan_input_conv2d(A):
    x, w = _data(1, 2, 5, 5), _data(3, 2, 3, 3)
    x[0, 1, 2, 4] = np.nan
    return cnnfast.conv2d(A.put(x), A.put(w), padding=1), reference.conv(x, w, padding=1)


def _inf_input_conv2d_im2col(A):
    x, w = _data(1, 2, 5, 5), _data(3, 2, 3, 3)
    x[0, 0, 1, 2], x[0, 1, 4, 1] = np.inf, -np.inf
    return (cnnfast.conv2d(A.put(x), A.put(w), stride=2, padding=1, algo="im2col"),
            reference.conv(x, w, stride=2, padding=1))


def _inf_minus_inf(A):
    x, w = _data(1, 1, 8), _data(2, 1, 3)
    x[0, 0, 2], x[0, 0, 3] = np.inf, -np.inf  # windows holding both give NaN, the others +/-inf
    return cnnfast.conv1d(A.put(x), A.put(w)), reference.conv(x, w)


def _nan_weight_conv1d(A):
    x, w = _data(2, 2, 7), _data(3, 2, 3)
    w[1, 0, 2] = np.nan  # no padding: every output of filter 1 reads that tap
    return cnnfast.conv1d(A.put(x), A.put(w)), reference.conv(x, w)


def _nan_bias(A):
    x, w, b = _data(1, 2, 6), _data(3, 2, 3), _data(3)
    b[2] = np.nan
    return cnnfast.conv1d(A.put(x), A.put(w), A.put(b)), reference.conv(x, w, b)


def _nan_reflect(A):
    x, w = _data(1, 2, 5, 5), _data(2, 2, 3, 3)
    x[0, 0, 1, 0] = np.nan  # reflect padding copies it into the padded border too
    return (cnnfast.conv2d(A.put(x), A.put(w), padding=1, padding_mode="reflect"),
            reference.conv(x, w, padding=1, padding_mode="reflect"))


def _nan_depthwise(A):
    x, w = _data(1, 2, 5, 5), _data(2, 1, 3, 3)
    x[0, 1, 0, 3] = np.nan
    return cnnfast.conv2d(A.put(x), A.put(w), groups=2), reference.conv(x, w, groups=2)


def _inf_conv_transpose2d(A):
    x, w = _data(1, 2, 3, 3), _data(2, 2, 3, 3)
    x[0, 1, 1, 2] = np.inf
    return (cnnfast.conv_transpose2d(A.put(x), A.put(w), stride=2, padding=1),
            reference.conv_transpose(x, w, stride=2, padding=1))


def _nan_conv3d(A):
    x, w = _data(1, 1, 4, 4, 4), _data(2, 1, 2, 2, 2)
    x[0, 0, 3, 0, 1] = np.nan
    return cnnfast.conv3d(A.put(x), A.put(w)), reference.conv(x, w)


def _nan_conv2d_input(A):
    w, dy = _data(2, 3, 3, 3), _data(1, 2, 3, 3)
    dy[0, 1, 0, 2] = np.nan
    return (grad.conv2d_input((1, 3, 5, 5), A.put(w), A.put(dy)),
            reference.conv_input((1, 3, 5, 5), w, dy))


def _nan_conv1d_weight(A):
    x, dy = _data(1, 2, 6), _data(1, 3, 4)
    x[0, 1, 5] = np.nan  # reached only by the last tap of each filter's channel 1
    return grad.conv1d_weight(A.put(x), (3, 2, 3), A.put(dy)), reference.conv_weight(x, (3, 2, 3), dy)


def _nan_conv_bias(A):
    dy = _data(2, 3, 4)
    dy[1, 2, 3] = np.nan
    return grad.conv_bias(A.put(dy)), reference.conv_bias(dy)


def _nan_first_x(algo, groups):
    def build(A):
        x, w = _data(1, 2, 5, 5), _data(2, 2 // groups, 3, 3)
        x[0, 0, 0, 0] = np.nan  # the first element of x: only the outputs whose window holds it are NaN
        return (cnnfast.conv2d(A.put(x), A.put(w), padding=1, groups=groups, algo=algo),
                reference.conv(x, w, padding=1, groups=groups))
    return build


def _nan_first_x_weight_grad_with(algo):
    def build(A):
        x, dy = _data(1, 2, 5, 5), _data(1, 2, 5, 5)
        x[0, 0, 0, 0] = np.nan  # reaches the taps of input channel 0 that read x[0, 0, 0, 0]; padding reads 0
        return (grad.conv2d_weight(A.put(x), (2, 2, 3, 3), A.put(dy), padding=1, algo=algo),
                reference.conv_weight(x, (2, 2, 3, 3), dy, padding=1))
    return build


_nan_first_x_weight_grad = _nan_first_x_weight_grad_with("direct")


def _nan_first_dy_weight_grad(algo, groups):
    def build(A):
        x, dy, ws = _data(1, 2, 5, 5), _data(1, 2, 5, 5), (2, 2 // groups, 3, 3)
        dy[0, 0, 0, 0] = np.nan  # reaches every tap of filter 0: the taps that read the padding multiply it by 0
        return (grad.conv2d_weight(A.put(x), ws, A.put(dy), padding=1, groups=groups, algo=algo),
                reference.conv_weight(x, ws, dy, padding=1, groups=groups))
    return build


def _nan_first_dy(algo, groups):
    def build(A):
        w, dy = _data(2, 2 // groups, 3, 3), _data(1, 2, 3, 3)
        dy[0, 0, 0, 0] = np.nan
        return (grad.conv2d_input((1, 2, 7, 7), A.put(w), A.put(dy), stride=2, groups=groups, algo=algo),
                reference.conv_input((1, 2, 7, 7), w, dy, stride=2, groups=groups))
    return build


def _inf_nan_dy_winograd(A):
    w, dy = _data(3, 2, 3, 3), _data(1, 3, 9, 10)
    dy[0, 0, 1, 6], dy[0, 2, 7, 2] = np.inf, np.nan  # each in one 4x4 tile of dx, not its whole tile
    return (grad.conv2d_input((1, 2, 9, 10), A.put(w), A.put(dy), padding=1, algo="winograd"),
            reference.conv_input((1, 2, 9, 10), w, dy, padding=1))


def _nan_first_dy_reflect(A):
    w, dy = _data(2, 2, 3, 3), _data(1, 2, 5, 5)
    dy[0, 1, 0, 0] = np.nan  # not dy's first element, but it reaches padded dx[0, 0, 0, 0], the fold's src[0]
    return (grad.conv2d_input((1, 2, 5, 5), A.put(w), A.put(dy), padding=1, padding_mode="reflect", algo="direct"),
            reference.conv_input((1, 2, 5, 5), w, dy, padding=1, padding_mode="reflect"))


def _nan_first_conv_bias(A):
    dy = _data(2, 3, 4)
    dy[0, 0, 0] = np.nan
    return grad.conv_bias(A.put(dy)), reference.conv_bias(dy)


def _inf_weight_over_padding(algo, groups, stride):
    def build(A):
        x, w = _data(1, 2, 6, 6), _data(2, 2 // groups, 3, 3)
        w[0, 0, 0, 0] = np.inf  # times the padding's 0: NaN where that tap reads padding, +inf where it reads x
        return (cnnfast.conv2d(A.put(x), A.put(w), padding=1, stride=stride, groups=groups, algo=algo),
                reference.conv(x, w, padding=1, stride=stride, groups=groups))
    return build


def _inf_weight_high_padding(A):
    x, w = _data(1, 2, 8), _data(2, 2, 3)
    w[1, 0, 2] = -np.inf  # its last tap reads the high side's padding in the last two outputs: NaN there
    return (cnnfast.conv1d(A.put(x), A.put(w), padding=((0, 2),), algo="direct"),
            reference.conv(x, w, padding=((0, 2),)))


def _inf_weight_grad_input(algo, groups):
    def build(A):
        w, dy = _data(2, 2 // groups, 3, 3), _data(1, 2, 6, 6)
        w[0, 0, 0, 0] = np.inf  # reaches the dx positions that tap meets in dy: +inf there, finite elsewhere
        return (grad.conv2d_input((1, 2, 6, 6), A.put(w), A.put(dy), padding=1, groups=groups, algo=algo),
                reference.conv_input((1, 2, 6, 6), w, dy, padding=1, groups=groups))
    return build


def _inf_last_x_weight_grad_depthwise(A):
    x, dy = _data(1, 2, 4, 4), _data(1, 2, 2, 2)
    x[0, 0, 0, 3] = np.inf  # read by tap (0, 2) of filter 0 only
    return (grad.conv2d_weight(A.put(x), (2, 1, 3, 3), A.put(dy), groups=2, algo="depthwise"),
            reference.conv_weight(x, (2, 1, 3, 3), dy, groups=2))


def _inf_weight_depth_padding_depthwise(A):
    x, w = _data(1, 2, 3, 3, 4), _data(2, 1, 2, 2, 2)
    w[0, 0, 0, 1, 1] = np.inf  # its depth tap reads the depth padding in the first output depth: NaN there
    return (cnnfast.conv3d(A.put(x), A.put(w), padding=(1, 0, 1), groups=2, algo="depthwise"),
            reference.conv(x, w, padding=(1, 0, 1), groups=2))


def _inf_weight_conv_transpose(algo):
    def build(A):
        x, w = _data(1, 2, 4, 4), _data(2, 2, 3, 3)
        w[0, 1, 0, 0] = np.inf  # scattered from x only: +inf where it lands, finite elsewhere
        return cnnfast.conv_transpose2d(A.put(x), A.put(w), algo=algo), reference.conv_transpose(x, w)
    return build


_CUDA_DEPTH_PADDING = ("CUDA depthwise forward skips a depth tap over the padding (h and w's padding is staged as "
                       "zeros and multiplied): no NaN from a non-finite weight there; multiplying it as well cost the "
                       "generic builds 8-29 registers")
_CUDA_MASKED_DY = ("CUDA direct and depthwise input gradients (and transposed forwards) multiply a non-finite weight "
                   "by the zero they load past dy's border: NaN where the reference (and torch) skip that tap")

# ---------------------------------------------------------------- the catalogue

_SAME_DEVICE = r"expected all arrays to be on the same device, but got {} on (cpu|cuda) \(.+\) and {} on (cpu|cuda)"
_NOT_ARRAY = r"expected {} to be a NumPy array or a CUDA array \(CuPy, Numba device array.*\), but got {}$"

CATALOGUE = [
    # ---- wrong ranks
    Row("input-rank", "conv2d input with 2 dims", lambda A: cnnfast.conv2d(A(3, 8), _w2(A)), ValueError,
        r"^conv2d: Expected 3D \(unbatched\) or 4D \(batched\) input to conv2d, but got input of size: \[3, 8\]$"),
    Row("input-0d", "conv1d input with 0 dims", lambda A: cnnfast.conv1d(A(), A(4, 3, 3)), ValueError,
        r"^conv1d: Expected 2D \(unbatched\) or 3D \(batched\) input to conv1d, but got input of size: \[\]$"),
    Row("weight-rank", "conv3d weight with 4 dims", lambda A: cnnfast.conv3d(A(1, 3, 4, 4, 4), _w2(A)), ValueError,
        r"^conv3d: expected 5-dimensional weight for 5-dimensional input \[1, 3, 4, 4, 4\], but got "
        r"4-dimensional weight of size \[4, 3, 3, 3\]$"),
    Row("transposed-weight-rank", "conv_transpose1d weight with 2 dims",
        lambda A: cnnfast.conv_transpose1d(A(1, 3, 8), A(3, 4)), ValueError,
        r"^conv_transpose1d: expected 3-dimensional weight .*but got 2-dimensional weight of size \[3, 4\]$"),
    Row("bias-rank", "conv2d bias of shape (4, 1)", lambda A: cnnfast.conv2d(_x2(A), _w2(A), A(4, 1)), ValueError,
        r"^conv2d: Given weight of size \[4, 3, 3, 3\], expected bias to be 1-dimensional with 4 elements, "
        r"but got bias of size \[4, 1\] instead$"),
    Row("grad-output-rank", "conv2d_weight grad_output with 6 dims",
        lambda A: grad.conv2d_weight(_x2(A), (4, 3, 3, 3), A(1, 4, 6, 6, 1, 1)), ValueError,
        r"^conv2d_weight: Expected 3D \(unbatched\) or 4D \(batched\) grad_output to conv2d_weight, "
        r"but got grad_output of size: \[1, 4, 6, 6, 1, 1\]$"),
    Row("input-size-rank", "conv1d_input input_size with 4 entries",
        lambda A: grad.conv1d_input((1, 1, 3, 8), A(4, 3, 3), A(1, 4, 6)), ValueError,
        r"^conv1d_input: Expected 2D \(unbatched\) or 3D \(batched\) input_size to conv1d_input, "
        r"but got input_size of size: \[1, 1, 3, 8\]$"),
    Row("input-size-batching", "conv1d_input unbatched input_size with a batched grad_output",
        lambda A: grad.conv1d_input((3, 8), A(4, 3, 3), A(1, 4, 6)), ValueError,
        r"^conv1d_input: expected input_size with 3 entries to match grad_output, but got input_size=\[3, 8\]$"),
    Row("weight-size-rank", "conv1d_weight weight_size with 2 entries",
        lambda A: grad.conv1d_weight(A(1, 3, 8), (4, 3), A(1, 4, 6)), ValueError,
        r"^conv1d_weight: expected 3-dimensional weight for 3-dimensional input \[1, 3, 8\], "
        r"but got 2-dimensional weight of size \[4, 3\]$"),
    Row("grad-input-dims", "conv2d_weight batched input with an unbatched grad_output",
        lambda A: grad.conv2d_weight(_x2(A), (4, 3, 3, 3), A(4, 6, 6)), ValueError,
        r"^conv2d_weight: Expected input and grad_output to have the same number of dimensions, but got: 4 and 3$"),
    Row("conv-bias-rank", "conv_bias grad_output with 1 dim", lambda A: grad.conv_bias(A(4)), ValueError,
        r"^conv_bias: expected a batched grad_output \(N, K, \*L\) with 1 to 3 spatial dimensions, "
        r"but got grad_output of size \[4\]$"),
    # ---- mismatched channels / groups / bias / grad_output
    Row("channels", "conv2d input channels != weight.shape[1] * groups",
        lambda A: cnnfast.conv2d(A(1, 32, 16, 16), A(64, 3, 7, 7)), ValueError,
        r"^conv2d: Given groups=1, weight of size \[64, 3, 7, 7\], expected input\[1, 32, 16, 16\] to have "
        r"3 channels, but got 32 channels instead$"),
    Row("transposed-channels", "conv_transpose1d input channels != weight.shape[0]",
        lambda A: cnnfast.conv_transpose1d(A(1, 3, 8), A(4, 4, 3)), ValueError,
        r"^conv_transpose1d: Given groups=1, transposed=1, weight of size \[4, 4, 3\], expected input\[1, 3, 8\] "
        r"to have 4 channels, but got 3 channels instead$"),
    Row("groups-in-channels", "conv2d in-channels not matching groups",
        lambda A: cnnfast.conv2d(A(1, 3, 8, 8), A(4, 1, 3, 3), groups=2), ValueError,
        r"^conv2d: Given groups=2, weight of size \[4, 1, 3, 3\], expected input\[1, 3, 8, 8\] to have 2 channels, "
        r"but got 3 channels instead$"),
    Row("groups-out-channels", "conv2d out-channels not divisible by groups",
        lambda A: cnnfast.conv2d(A(1, 4, 8, 8), A(3, 2, 3, 3), groups=2), ValueError,
        r"^conv2d: Given groups=2, expected weight to be divisible by 2 at dimension 0, "
        r"but got weight of size \[3, 2, 3, 3\] instead$"),
    Row("transposed-groups", "conv_transpose1d weight.shape[0] not divisible by groups",
        lambda A: cnnfast.conv_transpose1d(A(1, 3, 8), A(3, 4, 3), groups=2), ValueError,
        r"^conv_transpose1d: Given groups=2, expected weight to be divisible by 2 at dimension 0"),
    Row("bias-length", "conv2d bias with the wrong length", lambda A: cnnfast.conv2d(_x2(A), _w2(A), A(5)),
        ValueError, r"^conv2d: Given weight of size \[4, 3, 3, 3\], expected bias to be 1-dimensional with 4 "
                    r"elements, but got bias of size \[5\] instead$"),
    Row("transposed-bias-length", "conv_transpose1d bias sized by weight.shape[0] instead of [1] * groups",
        lambda A: cnnfast.conv_transpose1d(A(1, 3, 8), A(3, 4, 3), A(3)), ValueError,
        r"^conv_transpose1d: Given weight of size \[3, 4, 3\], expected bias to be 1-dimensional with 4 elements, "
        r"but got bias of size \[3\] instead$"),
    Row("weight-size-channels", "conv1d_weight weight_size with the wrong in-channels",
        lambda A: grad.conv1d_weight(A(1, 3, 8), (4, 2, 3), A(1, 4, 6)), ValueError,
        r"^conv1d_weight: Given groups=1, weight of size \[4, 2, 3\], expected input\[1, 3, 8\] to have 2 "
        r"channels, but got 3 channels instead$"),
    Row("grad-output-shape", "conv2d_input grad_output not the forward's output shape",
        lambda A: grad.conv2d_input((1, 3, 8, 8), _w2(A), A(1, 4, 5, 5)), ValueError,
        r"^conv2d_input: expected grad_output of size \[1, 4, 6, 6\] \(the output of this convolution\), "
        r"but got grad_output of size \[1, 4, 5, 5\]$"),
    Row("transposed-grad-output-shape", "conv_transpose2d_weight grad_output not the output shape",
        lambda A: grad.conv_transpose2d_weight(A(1, 3, 4, 4), (3, 2, 3, 3), A(1, 2, 5, 5), stride=2),
        ValueError, r"^conv_transpose2d_weight: expected grad_output of size \[1, 2, 9, 9\] .*"
                    r"but got grad_output of size \[1, 2, 5, 5\]$"),
    # ---- strides / paddings / dilations / groups / output_padding
    Row("stride-zero", "conv2d stride=0", lambda A: cnnfast.conv2d(_x2(A), _w2(A), stride=0), ValueError,
        r"^conv2d: non-positive stride is not supported, but got stride=\(0, 0\)$"),
    Row("stride-negative", "conv_transpose3d stride with a negative entry",
        lambda A: cnnfast.conv_transpose3d(A(1, 2, 3, 3, 3), A(2, 2, 1, 1, 1), stride=(1, -2, 1)), ValueError,
        r"^conv_transpose3d: non-positive stride is not supported, but got stride=\(1, -2, 1\)$"),
    Row("stride-float", "conv2d stride=1.5", lambda A: cnnfast.conv2d(_x2(A), _w2(A), stride=1.5), TypeError,
        r"^conv2d: expected stride to be an int or a tuple of 2 ints, but got 1\.5$"),
    Row("stride-bool", "conv1d stride=True", lambda A: cnnfast.conv1d(A(1, 3, 8), A(4, 3, 3), stride=True),
        TypeError, r"^conv1d: expected stride to be an int or a tuple of 1 ints, but got True$"),
    Row("stride-length", "conv3d stride with 2 entries",
        lambda A: cnnfast.conv3d(A(1, 3, 4, 4, 4), A(4, 3, 1, 1, 1), stride=(1, 1)), TypeError,
        r"^conv3d: expected stride to be an int or a tuple of 3 ints, but got \(1, 1\)$"),
    Row("stride-huge", "conv2d stride=2^63 (past any int64)",
        lambda A: cnnfast.conv2d(_x2(A), _w2(A), stride=2**63), ValueError,
        r"^conv2d: expected stride values of at most 2147483647 \(2\^31 - 1\), but got stride=9223372036854775808$"),
    Row("padding-negative", "conv2d padding=-1", lambda A: cnnfast.conv2d(_x2(A), _w2(A), padding=-1), ValueError,
        r"^conv2d: negative padding is not supported, but got padding=-1$"),
    Row("padding-float", "conv1d padding=1.0", lambda A: cnnfast.conv1d(A(1, 3, 8), A(4, 3, 3), padding=1.0),
        TypeError, r"^conv1d: expected padding to be an int, 'valid', 'same' or a tuple of 1 entries, .*"
                   r"but got 1\.0$"),
    Row("padding-string", "conv2d padding='full'", lambda A: cnnfast.conv2d(_x2(A), _w2(A), padding="full"),
        ValueError, r"^conv2d: Invalid padding string 'full', should be one of \{'valid', 'same'\}$"),
    Row("padding-same-transposed", "conv_transpose2d padding='same'",
        lambda A: cnnfast.conv_transpose2d(A(1, 4, 5, 5), _w2(A), padding="same"), ValueError,
        r"^conv_transpose2d: padding='same' is not supported for transposed convolution; "
        r"expected an int or a tuple of ints$"),
    Row("padding-mode", "conv2d padding_mode='mirror'",
        lambda A: cnnfast.conv2d(_x2(A), _w2(A), padding_mode="mirror"), ValueError,
        r"^conv2d: padding_mode must be one of \{'zeros', 'reflect', 'replicate', 'circular'\}, "
        r"but got padding_mode='mirror'$"),
    Row("padding-mode-transposed", "conv_transpose1d given padding_mode (not a parameter, as in PyTorch)",
        lambda A: cnnfast.conv_transpose1d(A(1, 3, 8), A(3, 4, 3), padding_mode="reflect"), TypeError,
        r"conv_transpose1d\(\) got an unexpected keyword argument 'padding_mode'"),
    Row("reflect-too-large", "conv2d reflect padding >= the input extent",
        lambda A: cnnfast.conv2d(A(1, 3, 3, 8), _w2(A), padding=3, padding_mode="reflect"), ValueError,
        r"^conv2d: Padding size should be less than the corresponding input dimension for padding_mode='reflect', "
        r"but got padding \(3, 3\) at dimension 2 of input \[1, 3, 3, 8\]$"),
    Row("circular-wraps", "conv1d circular padding > the input extent",
        lambda A: cnnfast.conv1d(A(1, 3, 4), A(4, 3, 3), padding=5, padding_mode="circular"), ValueError,
        r"^conv1d: Padding value causes wrapping around more than once for padding_mode='circular': "
        r"padding \(5, 5\) at dimension 2 of input \[1, 3, 4\]$"),
    Row("padding-huge", "conv1d padding of 2^31 on one side",
        lambda A: cnnfast.conv1d(A(1, 3, 8), A(4, 3, 3), padding=((0, 2**31),)), ValueError,
        r"^conv1d: expected padding values of at most 2147483647 \(2\^31 - 1\), "
        r"but got padding=\(\(0, 2147483648\),\)$"),
    Row("dilation-zero", "conv2d dilation with a zero entry",
        lambda A: cnnfast.conv2d(_x2(A), _w2(A), dilation=(1, 0)), ValueError,
        r"^conv2d: dilation should be greater than zero, but got dilation=\(1, 0\)$"),
    Row("dilation-negative", "conv3d dilation=-1",
        lambda A: cnnfast.conv3d(A(1, 3, 4, 4, 4), A(4, 3, 1, 1, 1), dilation=-1), ValueError,
        r"^conv3d: dilation should be greater than zero, but got dilation=\(-1, -1, -1\)$"),
    Row("groups-zero", "conv2d groups=0", lambda A: cnnfast.conv2d(_x2(A), _w2(A), groups=0), ValueError,
        r"^conv2d: non-positive groups is not supported, but got groups=0$"),
    Row("dilation-huge", "conv3d dilation=2^64",
        lambda A: cnnfast.conv3d(A(1, 3, 4, 4, 4), A(4, 3, 1, 1, 1), dilation=2**64), ValueError,
        r"^conv3d: expected dilation values of at most 2147483647 \(2\^31 - 1\), "
        r"but got dilation=18446744073709551616$"),
    Row("groups-float", "conv1d groups=2.0", lambda A: cnnfast.conv1d(A(1, 4, 8), A(4, 2, 3), groups=2.0),
        TypeError, r"^conv1d: expected groups to be an int, but got 2\.0$"),
    Row("output-padding-negative", "conv_transpose2d output_padding=-1",
        lambda A: cnnfast.conv_transpose2d(A(1, 4, 5, 5), _w2(A), stride=2, output_padding=-1), ValueError,
        r"^conv_transpose2d: negative output_padding is not supported, but got \(-1, -1\)$"),
    Row("output-padding-large", "conv_transpose2d output_padding >= stride and >= dilation",
        lambda A: cnnfast.conv_transpose2d(A(1, 4, 5, 5), _w2(A), stride=2, output_padding=2), ValueError,
        r"^conv_transpose2d: output padding must be smaller than either stride or dilation, but got "
        r"output_padding=\(2, 2\), stride=\(2, 2\), dilation=\(1, 1\)$"),
    Row("output-padding-float", "conv_transpose1d output_padding=0.5",
        lambda A: cnnfast.conv_transpose1d(A(1, 3, 8), A(3, 4, 3), stride=2, output_padding=0.5), TypeError,
        r"^conv_transpose1d: expected output_padding to be an int or a tuple of 1 ints, but got 0\.5$"),
    Row("output-size-range", "conv_transpose2d output_size out of the reachable range",
        lambda A: cnnfast.conv_transpose2d(A(1, 4, 5, 5), _w2(A), stride=2, output_size=(20, 20)), ValueError,
        r"^conv_transpose2d: requested an output size of \[20, 20\], but valid sizes range from \[11, 11\] to "
        r"\[12, 12\] \(for an input of \[5, 5\]\)$"),
    Row("output-size-type", "conv_transpose1d output_size='ab'",
        lambda A: cnnfast.conv_transpose1d(A(1, 3, 8), A(3, 4, 3), output_size="ab"), TypeError,
        r"^conv_transpose1d: expected output_size to be a tuple of 1 ints \(or 3 with the batch and channel sizes\), "
        r"but got 'ab'$"),
    Row("output-size-length", "conv_transpose1d output_size (C, L) for a batched input",
        lambda A: cnnfast.conv_transpose1d(A(1, 3, 8), A(3, 4, 3), output_size=(4, 10)), ValueError,
        r"^conv_transpose1d: expected output_size to have 1 entries \(or 3 with the batch and channel sizes\) for "
        r"a batched input, but got output_size=\(4, 10\)$"),
    Row("output-size-length-unbatched", "conv_transpose1d output_size (N, C, L) for an unbatched input",
        lambda A: cnnfast.conv_transpose1d(A(3, 8), A(3, 4, 3), output_size=(1, 4, 10)), ValueError,
        r"^conv_transpose1d: expected output_size to have 1 entries \(or 2 with the channel size\) for an "
        r"unbatched input, but got output_size=\(1, 4, 10\)$"),
    Row("output-too-small", "conv_transpose2d padding that leaves no output",
        lambda A: cnnfast.conv_transpose2d(A(1, 4, 1, 1), _w2(A), padding=2), ValueError,
        r"^conv_transpose2d: Given input size per channel: \(1 x 1\)\. Calculated output size per channel: "
        r"\(-1 x -1\)\. Output size is too small$"),
    # ---- empty dims
    Row("empty-spatial", "conv1d input with a zero-length axis",
        lambda A: cnnfast.conv1d(A(1, 3, 0), A(4, 3, 3)), ValueError,
        r"^conv1d: Calculated padded input size per channel: \(0\)\. Kernel size: \(3\)\. "
        r"Kernel size can't be greater than actual input size$"),
    Row("empty-spatial-padded", "conv2d input with a zero-width axis, padded (PyTorch refuses it too)",
        lambda A: cnnfast.conv2d(A(2, 3, 6, 0), _w2(A), padding=2), ValueError,
        r"^conv2d: Only zero batch or zero channel inputs are supported, but got input shape: \[2, 3, 6, 0\]$"),
    Row("no-out-channels", "conv1d weight with no output channels",
        lambda A: cnnfast.conv1d(A(1, 3, 8), A(0, 3, 3)), ValueError,
        r"^conv1d: Given groups=1, expected weight to be at least 1 at dimension 0, but got weight of size "
        r"\[0, 3, 3\] instead$"),
    Row("transposed-no-out-channels", "conv_transpose2d weight with no output channels",
        lambda A: cnnfast.conv_transpose2d(A(1, 4, 5, 5), A(4, 0, 3, 3)), ValueError,
        r"^conv_transpose2d: Given transposed=1, expected weight to be at least 1 at dimension 1 \(output channels "
        r"per group\), but got weight of size \[4, 0, 3, 3\] instead$"),
    Row("kernel-too-large", "conv2d kernel taller than the padded input",
        lambda A: cnnfast.conv2d(A(1, 3, 2, 8), _w2(A)), ValueError,
        r"^conv2d: Calculated padded input size per channel: \(2 x 8\)\. Kernel size: \(3 x 3\)\. "
        r"Kernel size can't be greater than actual input size$"),
    Row("empty-kernel", "conv1d weight with a zero-length kernel",
        lambda A: cnnfast.conv1d(A(1, 3, 8), A(4, 3, 0)), ValueError,
        r"^conv1d: expected a non-empty kernel, but got weight of size \[4, 3, 0\]$"),
    Row("empty-kernel-weight-size", "conv2d_weight weight_size with a zero-length kernel",
        lambda A: grad.conv2d_weight(_x2(A), (4, 3, 0, 3), A(1, 4, 6, 6)), ValueError,
        r"^conv2d_weight: expected a non-empty kernel, but got weight of size \[4, 3, 0, 3\]$"),
    # ---- dtypes and non-arrays
    Row("dtype-int", "conv2d int32 arrays",
        lambda A: cnnfast.conv2d(A(1, 3, 8, 8, dtype="int32"), A(4, 3, 3, 3, dtype="int32")), TypeError,
        r"^conv2d: expected input to have dtype float32 or float64, but got int32$"),
    Row("dtype-int-grad", "conv_bias int64 grad_output", lambda A: grad.conv_bias(A(1, 4, 3, dtype="int64")),
        TypeError, r"^conv_bias: expected grad_output to have dtype float32 or float64, but got int64$"),
    Row("dtype-complex", "conv1d complex64 arrays",
        lambda A: cnnfast.conv1d(A(1, 3, 8, dtype="complex64"), A(4, 3, 3, dtype="complex64")), TypeError,
        r"^conv1d: expected input to have dtype float32 or float64, but got complex64$"),
    Row("dtype-half", "conv2d float16 input", lambda A: cnnfast.conv2d(A(1, 3, 8, 8, dtype="float16"), _w2(A)),
        TypeError, r"^conv2d: expected input to have dtype float32 or float64, but got float16$"),
    Row("dtype-half-weight", "conv_transpose1d float16 weight",
        lambda A: cnnfast.conv_transpose1d(A(1, 3, 8), A(3, 4, 3, dtype="float16")), TypeError,
        r"^conv_transpose1d: expected weight to have dtype float32 or float64, but got float16$"),
    Row("dtype-byte-order", "conv2d big-endian float32 input",
        lambda A: cnnfast.conv2d(A(1, 3, 8, 8, dtype=">f4"), _w2(A)), TypeError,
        r"^conv2d: expected input to have dtype float32 or float64, but got >f4 \(non-native byte order: "
        r"a\.astype\(a\.dtype\.newbyteorder\('='\)\) converts it\)$"),
    Row("dtype-bool", "conv1d bool input", lambda A: cnnfast.conv1d(A(1, 3, 8, dtype="bool"), A(4, 3, 3)),
        TypeError, r"^conv1d: expected input to have dtype float32 or float64, but got bool$"),
    Row("dtype-mismatch", "conv2d float32 input, float64 weight",
        lambda A: cnnfast.conv2d(_x2(A), A(4, 3, 3, 3, dtype="float64")), TypeError,
        r"^conv2d: expected weight to have the same dtype as input \(float32\), but got float64$"),
    Row("bias-dtype-mismatch", "conv1d float32 arrays, float64 bias",
        lambda A: cnnfast.conv1d(A(1, 3, 8), A(4, 3, 3), A(4, dtype="float64")), TypeError,
        r"^conv1d: expected bias to have the same dtype as input \(float32\), but got float64$"),
    Row("bias-dtype-int", "conv1d int64 bias",
        lambda A: cnnfast.conv1d(A(1, 3, 8), A(4, 3, 3), A(4, dtype="int64")), TypeError,
        r"^conv1d: expected bias to have dtype float32 or float64, but got int64$"),
    Row("not-an-array", "conv2d input given as a nested list",
        lambda A: cnnfast.conv2d(np.ones((1, 3, 8, 8)).tolist(), _w2(A)), TypeError,
        "^conv2d: " + _NOT_ARRAY.format("input", "list")),
    Row("not-an-array-scalar", "conv1d input given as a NumPy scalar",
        lambda A: cnnfast.conv1d(np.float32(1.0), A(4, 3, 3)), TypeError,
        "^conv1d: " + _NOT_ARRAY.format("input", r"numpy\.float32")),
    Row("input-none", "conv2d input=None", lambda A: cnnfast.conv2d(None, _w2(A)), TypeError,
        "^conv2d: " + _NOT_ARRAY.format("input", "NoneType")),
    Row("grad-output-none", "conv2d_input grad_output=None",
        lambda A: grad.conv2d_input((1, 3, 8, 8), _w2(A), None), TypeError,
        "^conv2d_input: " + _NOT_ARRAY.format("grad_output", "NoneType")),
    Row("conv-bias-none", "conv_bias(None)", lambda A: grad.conv_bias(None), TypeError,
        "^conv_bias: " + _NOT_ARRAY.format("grad_output", "NoneType")),
    Row("bias-not-an-array", "conv1d bias given as a list",
        lambda A: cnnfast.conv1d(A(1, 3, 8), A(4, 3, 3), [0.0] * 4), TypeError,
        "^conv1d: " + _NOT_ARRAY.format("bias", "list")),
    # ---- mixed array families / devices
    Row("mixed-input-weight", "conv2d input and weight from different families (NumPy vs Numba device)",
        lambda A: cnnfast.conv2d(_x2(A), _w2(A.other)), TypeError,
        "^conv2d: " + _SAME_DEVICE.format("input", "weight")),
    Row("mixed-bias", "conv1d bias from the other family",
        lambda A: cnnfast.conv1d(A(1, 3, 8), A(4, 3, 3), A.other(4)), TypeError,
        "^conv1d: " + _SAME_DEVICE.format("input", "bias")),
    Row("mixed-grad", "conv2d_input weight and grad_output from different families",
        lambda A: grad.conv2d_input((1, 3, 8, 8), _w2(A), A.other(1, 4, 6, 6)), TypeError,
        "^conv2d_input: " + _SAME_DEVICE.format("weight", "grad_output")),
    # ---- out= (not offered)
    Row("out-not-offered", "out= (read-only or overlapping outputs): cnnfast offers no out= argument",
        lambda A: cnnfast.conv2d(_x2(A), _w2(A), out=A(1, 4, 6, 6)), TypeError,
        r"conv2d\(\) got an unexpected keyword argument 'out'"),
    # ---- sizes (input_size / weight_size / explain shapes)
    Row("input-size-negative", "conv1d_input input_size with a negative entry",
        lambda A: grad.conv1d_input((1, 3, -8), A(4, 3, 3), A(1, 4, 6)), TypeError,
        r"^conv1d_input: expected input_size to be a sequence of non-negative ints, but got \(1, 3, -8\)$"),
    Row("input-size-float", "conv1d_input input_size with a float entry",
        lambda A: grad.conv1d_input((1, 3, 8.0), A(4, 3, 3), A(1, 4, 6)), TypeError,
        r"^conv1d_input: expected input_size to be a sequence of non-negative ints, but got \(1, 3, 8\.0\)$"),
    Row("weight-size-type", "conv2d_weight weight_size given as a string",
        lambda A: grad.conv2d_weight(_x2(A), "4x3x3x3", A(1, 4, 6, 6)), TypeError,
        r"^conv2d_weight: expected weight_size to be a sequence of non-negative ints, but got '4x3x3x3'$"),
    Row("huge-input-size", "conv2d_input input_size (1, 3, 2**31, 2**31): byte count overflows int64",
        lambda A: grad.conv2d_input((1, 3, BIG, BIG), _w2(A), A(1, 4, 1, 1), stride=BIG), (ValueError, MemoryError),
        r"^conv2d_input: .*input_size"),
    Row("huge-input-size-int64", "conv1d_input input_size entry 2**64 (not an int64)",
        lambda A: grad.conv1d_input((1, 3, 2**64), A(4, 3, 3), A(1, 4, 1), stride=2**64),
        (ValueError, MemoryError), r"^conv1d_input: .*input_size"),
    Row("huge-weight-size", "conv2d_weight weight_size (4, 3, 2**31, 2**31): byte count overflows int64",
        lambda A: grad.conv2d_weight(_x2(A), (4, 3, BIG, BIG), A(1, 4, 9, 9), padding=BIG // 2),
        (ValueError, MemoryError), r"^conv2d_weight: .*weight_size"),
    Row("huge-explain", "explain with an input dimension of 2**64 (no int64 array can have it)",
        lambda A: cnnfast.explain("conv1d", (2**64, 3, 8), (4, 3, 3), device=A.device), ValueError,
        r"^conv1d: .*input"),
    Row("explain-shape-float", "explain with a float dimension",
        lambda A: cnnfast.explain("conv1d", (1, 3, 8.5), (4, 3, 3), device=A.device), TypeError,
        r"^conv1d: .*input"),
    Row("explain-shape-str", "explain with a string for a shape",
        lambda A: cnnfast.explain("conv1d", "abc", (4, 3, 3), device=A.device), TypeError,
        r"^conv1d: .*input"),
    Row("explain-dtype", "explain dtype='float16'",
        lambda A: cnnfast.explain("conv1d", (1, 3, 8), (4, 3, 3), device=A.device, dtype="float16"), TypeError,
        r"^conv1d: expected input to have dtype float32 or float64, but got float16$"),
    Row("explain-dtype-unknown", "explain dtype='floaty'",
        lambda A: cnnfast.explain("conv1d", (1, 3, 8), (4, 3, 3), device=A.device, dtype="floaty"), TypeError,
        r"^(explain|conv1d): .*dtype.*floaty"),
    Row("explain-unknown-op", "explain of an op that does not exist",
        lambda A: cnnfast.explain("conv4d", (1, 3, 8), (4, 3, 3), device=A.device), ValueError,
        r"^explain: unknown op 'conv4d'; expected one of \['conv1d', "),
    Row("explain-op-array", "explain with an array where the op's name goes (called like conv2d)",
        lambda A: cnnfast.explain(A(1, 3, 8), (4, 3, 3)), TypeError,
        r"^explain: expected op to be an op's name such as 'conv2d', but got "),
    Row("explain-input-none", "explain with None for the input",
        lambda A: cnnfast.explain("conv2d", None, (4, 3, 3, 3), device=A.device), TypeError,
        r"^conv2d: expected input to be an array or a shape \(a sequence of non-negative ints\), but got None$"),
    Row("explain-device", "explain device='tpu'", lambda A: cnnfast.explain("conv1d", (1, 3, 8), (4, 3, 3),
                                                                           device="tpu"), ValueError,
        r"^explain: expected device 'cpu' or 'cuda', but got 'tpu'$"),
    Row("explain-channels", "explain with mismatched channels (explain validates like the op)",
        lambda A: cnnfast.explain("conv2d", (1, 32, 256, 256), (64, 3, 7, 7), device=A.device), ValueError,
        r"^conv2d: Given groups=1, weight of size \[64, 3, 7, 7\], expected input\[1, 32, 256, 256\] to have "
        r"3 channels, but got 32 channels instead$"),
    # ---- options
    Row("algo-unknown", "conv2d algo='winograd9'", lambda A: cnnfast.conv2d(_x2(A), _w2(A), algo="winograd9"),
        ValueError, r"^conv2d: unknown algo 'winograd9' for device (cpu|cuda); expected 'auto' or one of \["),
    Row("algo-unknown-tile", "conv2d algo='direct:16x16' (a tile no algorithm has)",
        lambda A: cnnfast.conv2d(_x2(A), _w2(A), algo="direct:16x16"), ValueError,
        r"^conv2d: unknown algo 'direct:16x16' for device (cpu|cuda); expected 'auto' or one of \["),
    Row("workspace-limit", "conv2d workspace_limit=-5",
        lambda A: cnnfast.conv2d(_x2(A), _w2(A), workspace_limit=-5), ValueError,
        r"^conv2d: expected workspace_limit to be a non-negative int \(bytes\) or None, but got -5$"),
    Row("stream-type", "conv1d on CUDA with stream='s' (CPU ops ignore stream)",
        lambda A: cnnfast.conv1d(A(1, 3, 8), A(4, 3, 3), stream="s"), TypeError,
        r"^conv1d: expected stream to be a Numba, CuPy or torch stream, or 0, but got str$", devices=("cuda",)),
    Row("stream-int", "conv1d on CUDA with stream=1 (an int other than 0)",
        lambda A: cnnfast.conv1d(A(1, 3, 8), A(4, 3, 3), stream=1), TypeError,
        r"^conv1d: expected stream to be a Numba, CuPy or torch stream, or 0, but got 1$", devices=("cuda",)),
    Row("stream-bool-bias", "conv_bias on CUDA with stream=True",
        lambda A: grad.conv_bias(A(1, 4, 3), stream=True), TypeError,
        r"^conv_bias: expected stream to be a Numba, CuPy or torch stream, or 0, but got True$", devices=("cuda",)),
    # ---- NaN / Inf in data: propagate as PyTorch does, never raise
    Row("nan-input", "conv2d NaN in input (zero padding)", _nan_input_conv2d, None, None),
    Row("inf-input-im2col", "conv2d +inf and -inf in input, stride 2, algo='im2col'", _inf_input_conv2d_im2col,
        None, None),
    Row("inf-minus-inf", "conv1d +inf and -inf in one window give NaN", _inf_minus_inf, None, None),
    Row("nan-weight", "conv1d NaN in one filter's weight", _nan_weight_conv1d, None, None),
    Row("nan-bias", "conv1d NaN in the bias", _nan_bias, None, None),
    Row("nan-reflect", "conv2d NaN at the edge, reflect padding", _nan_reflect, None, None),
    Row("nan-depthwise", "conv2d NaN in input, depthwise (groups=C)", _nan_depthwise, None, None),
    Row("nan-conv3d", "conv3d NaN in input", _nan_conv3d, None, None),
    Row("inf-transposed", "conv_transpose2d +inf in input, stride 2", _inf_conv_transpose2d, None, None),
    Row("nan-grad-input", "conv2d_input NaN in grad_output", _nan_conv2d_input, None, None),
    Row("nan-grad-weight", "conv1d_weight NaN in input", _nan_conv1d_weight, None, None),
    Row("nan-grad-bias", "conv_bias NaN in grad_output", _nan_conv_bias, None, None),
    # NaN as the FIRST element of an array: several CUDA kernels make their zero as `a[0] * 0`, which is NaN then
    Row("nan-first-direct", "conv2d NaN at x[0, 0, 0, 0], padding=1, algo='direct'", _nan_first_x("direct", 1),
        None, None),
    Row("nan-first-im2col", "conv2d NaN at x[0, 0, 0, 0], padding=1, algo='im2col'", _nan_first_x("im2col", 1),
        None, None),
    Row("nan-first-depthwise", "conv2d NaN at x[0, 0, 0, 0], padding=1, algo='depthwise'",
        _nan_first_x("depthwise", 2), None, None),
    Row("nan-first-grad-weight", "conv2d_weight NaN at input[0, 0, 0, 0], padding=1, algo='direct'",
        _nan_first_x_weight_grad, None, None),
    Row("nan-first-grad-direct", "conv2d_input NaN at grad_output[0, 0, 0, 0], stride 2, algo='direct'",
        _nan_first_dy("direct", 1), None, None),
    Row("nan-first-grad-im2col", "conv2d_input NaN at grad_output[0, 0, 0, 0], stride 2, algo='im2col'",
        _nan_first_dy("im2col", 1), None, None),
    Row("nan-first-grad-depthwise", "conv2d_input NaN at grad_output[0, 0, 0, 0], stride 2, algo='depthwise'",
        _nan_first_dy("depthwise", 2), None, None),
    Row("nan-first-fold-pad", "conv2d_input NaN at grad_output[0, 1, 0, 0], reflect padding, algo='direct'",
        _nan_first_dy_reflect, None, None),
    Row("nan-first-conv-bias", "conv_bias NaN at grad_output[0, 0, 0]", _nan_first_conv_bias, None, None),
    Row("nan-dy-grad-weight-direct", "conv2d_weight NaN at grad_output[0, 0, 0, 0], padding=1, algo='direct'",
        _nan_first_dy_weight_grad("direct", 1), None, None),
    Row("nan-dy-grad-weight-im2col", "conv2d_weight NaN at grad_output[0, 0, 0, 0], padding=1, algo='im2col'",
        _nan_first_dy_weight_grad("im2col", 1), None, None),
    Row("nan-dy-grad-weight-depthwise", "conv2d_weight NaN at grad_output[0, 0, 0, 0], padding=1, algo='depthwise'",
        _nan_first_dy_weight_grad("depthwise", 2), None, None),
    # Winograd's transforms spread a non-finite value over a 4x4 tile: such results are recomputed by im2col
    Row("nan-first-winograd", "conv2d NaN at x[0, 0, 0, 0], padding=1, algo='winograd'", _nan_first_x("winograd", 1),
        None, None, devices=("cpu",)),
    Row("inf-grad-winograd", "conv2d_input +inf and NaN in grad_output, padding=1, algo='winograd'",
        _inf_nan_dy_winograd, None, None, devices=("cpu",)),
    Row("nan-first-grad-weight-winograd", "conv2d_weight NaN at input[0, 0, 0, 0], padding=1, algo='winograd'",
        _nan_first_x_weight_grad_with("winograd"), None, None, devices=("cpu",)),
    # a NaN or inf weight: the padding's zeros count in the forward pass (w * 0), dy's border does not in the input
    # gradient; the CPU direct and depthwise row kernels skip padding, the depthwise wide kernels run over it
    *(Row(f"inf-weight-padding-{algo}-s{stride}", f"conv2d +inf weight tap, padding=1, stride {stride}, algo={algo!r}",
          _inf_weight_over_padding(algo, groups, stride), None, None)
      for algo, groups in (("direct", 1), ("im2col", 1), ("depthwise", 2)) for stride in (1, 2)),
    Row("inf-weight-high-padding-direct", "conv1d -inf weight tap, padding (0, 2), algo='direct'",
        _inf_weight_high_padding, None, None),
    *(Row(f"inf-weight-grad-input-{algo}", f"conv2d_input +inf weight tap, padding=1, algo={algo!r}",
          _inf_weight_grad_input(algo, groups), None, None, xfail=_CUDA_MASKED_DY if algo != "im2col" else None,
          xfail_on=("cuda",)) for algo, groups in (("direct", 1), ("im2col", 1), ("depthwise", 2))),
    Row("inf-x-grad-weight-depthwise", "conv2d_weight +inf in the last column of input, algo='depthwise'",
        _inf_last_x_weight_grad_depthwise, None, None),
    Row("inf-weight-depth-padding-depthwise", "conv3d +inf weight tap over the depth padding, algo='depthwise'",
        _inf_weight_depth_padding_depthwise, None, None, xfail=_CUDA_DEPTH_PADDING, xfail_on=("cuda",)),
    *(Row(f"inf-weight-conv-transpose-{algo}", f"conv_transpose2d +inf weight tap, algo={algo!r}",
          _inf_weight_conv_transpose(algo), None, None, xfail=_CUDA_MASKED_DY if algo == "direct" else None,
          xfail_on=("cuda",)) for algo in ("direct", "im2col")),
]


def _params():
    for row in CATALOGUE:
        for device in row.devices:
            marks = [pytest.mark.cuda] if device == "cuda" else []
            if row.xfail and device in row.xfail_on:
                marks.append(pytest.mark.xfail(strict=True, reason=row.xfail))
            yield pytest.param(row, device, marks=marks, id=f"{row.id}-{device}")


class KernelReached(AssertionError):
    pass


@pytest.fixture
def tripwire(monkeypatch):
    """Replace every kernel entry point (convolution launchers, layout and bias kernels) with a tripwire."""
    from cnnfast import api

    def reached(*args, **kwargs):
        raise KernelReached("a kernel was reached before validation failed")

    class Launchers(dict):
        def __missing__(self, name):
            return type("Tripwire", (), {"launcher": staticmethod(lambda primitive: reached)})()

    monkeypatch.setattr(api, "algorithms", lambda device: Launchers())
    for cls in (arrays.CPU, arrays.CUDA):
        monkeypatch.setattr(cls, "kernels", reached)
    monkeypatch.setattr(arrays.CUDA, "add_bias", reached)


def _check_propagation(result, expected):
    got = arrays.to_host(result).astype(np.float64)
    assert got.shape == expected.shape
    nan = np.isnan(expected)
    assert nan.any() or np.isinf(expected).any(), "the row must put NaN or Inf somewhere"
    assert (~nan & np.isfinite(expected)).any(), "the row must leave some outputs finite"
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg="NaN positions differ from the reference")
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(expected), err_msg="+inf positions differ")
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected), err_msg="-inf positions differ")
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("row, device", list(_params()))
def test_bad_input(row, device, request):
    maker = A(device)
    if row.exc is None:  # NaN / Inf: no exception, propagation as in the float64 reference
        with np.errstate(invalid="ignore", over="ignore"):
            result, expected = row.build(maker)
        _check_propagation(result, expected)
        return
    request.getfixturevalue("tripwire")
    with pytest.raises(row.exc) as info:
        row.build(maker)
    assert not isinstance(info.value, KernelReached)
    expected_types = row.exc if isinstance(row.exc, tuple) else (row.exc,)
    assert type(info.value) in expected_types, f"got {type(info.value).__name__}, a subclass"
    assert re.search(row.match, str(info.value)), f"message {str(info.value)!r} does not match {row.match!r}"


def test_catalogue_ids_are_unique_and_cover_the_classes():
    ids = [row.id for row in CATALOGUE]
    assert len(ids) == len(set(ids))
    errors = [row for row in CATALOGUE if row.exc is not None]
    assert len(errors) >= 35 and len(CATALOGUE) - len(errors) >= 5
    for row in errors:
        assert row.match and row.description


def _readme_ids():
    text = README.read_text()
    section = text[text.index("\n## Errors\n"):text.index("\n## How CUDA kernels are validated without a GPU")]
    return re.findall(r"^\| `([^`]+)` \|", section, re.M)


def test_readme_errors_table_lists_the_catalogue():
    assert _readme_ids() == [row.id for row in CATALOGUE]


@pytest.mark.parametrize("algo", ["direct", "im2col", "winograd"])
def test_nonfinite_data_raises_nothing_under_numpy_errstate_raise(algo):
    """NaN/inf data and float32 overflow under np.errstate(all="raise") and warnings as errors: every algorithm
    returns what the Numba kernels return (BLAS products on cnnfast's worker threads and check mode's reference
    included), as torch does."""
    x, w = _data(4, 16, 32, 32), _data(16, 16, 3, 3)
    x[:, 0, 0, 0], x[:, 3, 5, 5], w[2, 0, 1, 1] = np.inf, np.nan, 0.0  # inf * 0 in every sample: every thread
    big = np.full((1, 1, 6, 6), 3e38, np.float32)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        y = cnnfast.conv2d(x, w, padding=1, algo=algo)
        dw = grad.conv2d_weight(x, w.shape, np.ones_like(y), padding=1, algo=algo)
        over = cnnfast.conv2d(big, np.ones((1, 1, 3, 3), np.float32), padding=1, algo=algo)
        with cnnfast.checking():  # and the reference beside it
            cnnfast.conv2d(x, w, padding=1, algo=algo)
    with np.errstate(invalid="ignore"):  # (the reference's einsum warns)
        _check_propagation(y, reference.conv(x, w, padding=1))
        _check_propagation(dw, reference.conv_weight(x, w.shape, np.ones_like(y), padding=1))
    assert np.isposinf(over).all()
