"""ConvSpec: one convolution problem, its shape algebra and the validation of its arguments.

Every public op turns its arguments into a ConvSpec here (normalise, then validate with errors that name the
op, the argument, what was expected and what was given, in PyTorch's words where PyTorch has them). A spec
knows its output shape, FLOPs, minimum bytes, parameter counts and the canonical kernel geometry.

Shapes (PyTorch's): input (N, C, *L); conv weight (K, C/groups, *k); transposed weight (C, K/groups, *k).
"""
from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from cnnfast.kernels.contract import PADDING_MODES, ConvGeometry, conv_output_size, make_geometry, pad_indices

DTYPES = ("float32", "float64")
_AXIS = {1: ("width",), 2: ("height", "width"), 3: ("depth", "height", "width")}


# ---------------------------------------------------------------- shape maths (pure, each states its formula)

def transposed_output_size(length, kernel, stride, dilation, pad_lo, pad_hi, output_padding):
    """(L - 1)*s - p_lo - p_hi + d*(k - 1) + output_padding + 1: the input size of the matching conv."""
    return (length - 1) * stride - pad_lo - pad_hi + dilation * (kernel - 1) + output_padding + 1


def same_padding(length, kernel, stride, dilation):
    """'same' (TensorFlow's rule): out = ceil(L/s); total = max((out-1)*s + d*(k-1) + 1 - L, 0), extra on high."""
    out = -(-length // stride)
    total = max((out - 1) * stride + dilation * (kernel - 1) + 1 - length, 0)
    return total // 2, total - total // 2


def _shape_str(shape):
    return "[" + ", ".join(str(s) for s in shape) + "]"


MAX_BYTES = 2**63 - 1  # the most bytes an array can span (NumPy, CuPy and the kernels index with int64)


def _dtype_name(dtype):
    """'float32' for np.float32, np.dtype('f4'), 'float32' and the like; anything NumPy cannot read (None
    included) as given, for the caller to refuse."""
    if dtype is None:
        return None
    try:
        return np.dtype(dtype).name
    except (TypeError, ValueError):  # (ValueError: a malformed spelling, np.dtype(('f4', -1)))
        return dtype


def check_bytes(op, name, shape, dtype):
    """ValueError when an array of this shape and dtype could not exist (its byte count overflows int64)."""
    nbytes = math.prod(shape) * (8 if str(dtype) == "float64" else 4)
    if nbytes > MAX_BYTES:
        raise ValueError(f"{op}: {name} of size {_shape_str(shape)} would span {nbytes:.3e} bytes, more than an "
                         f"array can address (2**63 - 1)")


# ---------------------------------------------------------------- argument normalisation

def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


# The largest stride, padding, dilation or output_padding taken (cuDNN's int arguments): the kernels' index
# arithmetic (output index x stride - padding + tap x dilation, in 64 bits on the CPU) then cannot overflow.
MAX_PARAMETER = 2**31 - 1


def _in_range(op, name, values, given):
    if any(abs(v) > MAX_PARAMETER for v in values):
        raise ValueError(f"{op}: expected {name} values of at most {MAX_PARAMETER} (2^31 - 1), but got "
                         f"{name}={given!r}")
    return values


def int_tuple(op, name, value, nd, limited=True):
    """An int, or a sequence of nd ints (or of one, for every axis, as PyTorch expands it) -> a tuple of nd Python
    ints, each at most MAX_PARAMETER when limited."""
    check = (lambda values: _in_range(op, name, values, value)) if limited else (lambda values: values)
    if _is_int(value):
        return check((int(value),) * nd)
    if isinstance(value, (tuple, list)) and len(value) in (1, nd) and all(_is_int(v) for v in value):
        return check(tuple(int(v) for v in value) * (nd // len(value)))
    raise TypeError(f"{op}: expected {name} to be an int or a tuple of {nd} ints, but got {value!r}")


def padding_pairs(op, padding, nd, spatial, kernel, stride, dilation, transposed=False):
    """int | per-axis ints | per-axis (low, high) pairs | 'valid' | 'same' -> per-axis (low, high) pairs."""
    if isinstance(padding, str):
        if transposed:
            raise ValueError(f"{op}: padding={padding!r} is not supported for transposed convolution; "
                             f"expected an int or a tuple of ints")
        if padding == "valid":
            return ((0, 0),) * nd
        if padding == "same":
            return tuple(same_padding(L, k, s, d) for L, k, s, d in zip(spatial, kernel, stride, dilation))
        raise ValueError(f"{op}: Invalid padding string {padding!r}, should be one of {{'valid', 'same'}}")
    def pair(p):  # one axis: an int (both sides) or a (low, high) pair
        if _is_int(p):
            return int(p), int(p)
        if isinstance(p, (tuple, list)) and len(p) == 2 and all(_is_int(v) for v in p):
            return int(p[0]), int(p[1])
        return None

    if _is_int(padding):
        pairs = (pair(padding),) * nd
    elif isinstance(padding, (tuple, list)) and len(padding) in (1, nd) and None not in map(pair, padding):
        pairs = tuple(map(pair, padding)) * (nd // len(padding))
    else:
        raise TypeError(f"{op}: expected padding to be an int, 'valid', 'same' or a tuple of {nd} entries, each "
                        f"an int or a (low, high) pair, but got {padding!r}")
    if any(v < 0 for p in pairs for v in p):
        raise ValueError(f"{op}: negative padding is not supported, but got padding={padding!r}")
    _in_range(op, "padding", [v for p in pairs for v in p], padding)
    return pairs


# ---------------------------------------------------------------- the spec

@dataclass(frozen=True)
class ConvSpec:
    """One convolution problem (batched shapes; unbatched inputs get N=1 before they reach a spec).

    input_shape is the op's own input: for a transposed convolution that is the transposed op's input.
    padding holds per-axis (low, high) pairs; padding_mode other than 'zeros' is applied as an explicit pad.
    """

    input_shape: tuple
    weight_shape: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int = 1
    transposed: bool = False
    output_padding: tuple = ()
    padding_mode: str = "zeros"
    dtype: str = "float32"
    bias: bool = False

    # ------------------------------------------------------------ construction with validation

    @classmethod
    def create(cls, op, input_shape, weight_shape, *, bias_shape=None, stride=1, padding=0, dilation=1,
               groups=1, transposed=False, output_padding=0, output_size=None, padding_mode="zeros",
               dtype="float32", unbatched=False):
        """Normalise and validate the arguments of `op`; raise ValueError/TypeError naming what is wrong.

        input_shape is batched; unbatched=True: the caller's input had no batch axis (its full output_size is then
        (C_out, *L_out), as torch.nn.ConvTranspose takes it)."""
        input_shape, weight_shape = tuple(input_shape), tuple(weight_shape)
        nd = len(input_shape) - 2
        if nd not in (1, 2, 3):
            raise ValueError(f"{op}: expected a batched input with 1 to 3 spatial dimensions, "
                             f"but got input of size: {_shape_str(input_shape)}")
        if len(weight_shape) != nd + 2:
            raise ValueError(f"{op}: expected {nd + 2}-dimensional weight for {nd + 2}-dimensional input "
                             f"{_shape_str(input_shape)}, but got {len(weight_shape)}-dimensional weight of "
                             f"size {_shape_str(weight_shape)}")
        dtype = _dtype_name(dtype)
        if dtype not in DTYPES:
            raise TypeError(f"{op}: expected dtype float32 or float64, but got {dtype}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"{op}: padding_mode must be one of {{'zeros', 'reflect', 'replicate', 'circular'}}, "
                             f"but got padding_mode={padding_mode!r}")
        if transposed and padding_mode != "zeros":
            raise ValueError(f"{op}: only 'zeros' padding mode is supported for transposed convolution, "
                             f"but got padding_mode={padding_mode!r}")
        stride = int_tuple(op, "stride", stride, nd)
        dilation = int_tuple(op, "dilation", dilation, nd)
        if not _is_int(groups):
            raise TypeError(f"{op}: expected groups to be an int, but got {groups!r}")
        groups = int(groups)
        if any(s <= 0 for s in stride):
            raise ValueError(f"{op}: non-positive stride is not supported, but got stride={stride}")
        if any(d <= 0 for d in dilation):
            raise ValueError(f"{op}: dilation should be greater than zero, but got dilation={dilation}")
        if groups <= 0:
            raise ValueError(f"{op}: non-positive groups is not supported, but got groups={groups}")
        if any(s < 0 for s in input_shape) or any(s < 0 for s in weight_shape):
            raise ValueError(f"{op}: negative sizes are not supported, got input {_shape_str(input_shape)} "
                             f"and weight {_shape_str(weight_shape)}")
        kernel = weight_shape[2:]
        if any(k == 0 for k in kernel):
            raise ValueError(f"{op}: expected a non-empty kernel, but got weight of size {_shape_str(weight_shape)}")
        spatial = input_shape[2:]
        pairs = padding_pairs(op, padding, nd, spatial, kernel, stride, dilation, transposed)
        cls._check_channels(op, input_shape, weight_shape, groups, transposed)
        out_channels = weight_shape[1] * groups if transposed else weight_shape[0]
        if bias_shape is not None and tuple(bias_shape) != (out_channels,):
            raise ValueError(f"{op}: Given weight of size {_shape_str(weight_shape)}, expected bias to be "
                             f"1-dimensional with {out_channels} elements, but got bias of size "
                             f"{_shape_str(bias_shape)} instead")
        if transposed:
            output_padding = cls._transposed_output_padding(op, output_padding, output_size, input_shape,
                                                            kernel, stride, dilation, pairs, unbatched)
        else:
            output_padding = (0,) * nd
        spec = cls(input_shape, weight_shape, stride, pairs, dilation, groups, bool(transposed),
                   output_padding, padding_mode, dtype, bias_shape is not None)
        spec._check_sizes(op)
        if input_shape[0] and input_shape[1] and 0 in spatial:  # (PyTorch's rule and wording)
            raise ValueError(f"{op}: Only zero batch or zero channel inputs are supported, but got input shape: "
                             f"{_shape_str(input_shape)}")
        for name, shape in (("input", input_shape), ("weight", weight_shape), ("output", spec.output_shape)):
            check_bytes(op, name, shape, dtype)
        return spec

    @staticmethod
    def _check_channels(op, input_shape, weight_shape, groups, transposed):
        in_channels = input_shape[1]
        w_in = weight_shape[0] if transposed else weight_shape[1] * groups
        if weight_shape[0] % groups:
            raise ValueError(f"{op}: Given groups={groups}, expected weight to be divisible by {groups} at "
                             f"dimension 0, but got weight of size {_shape_str(weight_shape)} instead")
        if transposed and weight_shape[1] == 0:
            raise ValueError(f"{op}: Given transposed=1, expected weight to be at least 1 at dimension 1 (output "
                             f"channels per group), but got weight of size {_shape_str(weight_shape)} instead")
        if not transposed and weight_shape[0] < groups:  # no output channels
            raise ValueError(f"{op}: Given groups={groups}, expected weight to be at least {groups} at dimension 0, "
                             f"but got weight of size {_shape_str(weight_shape)} instead")
        if in_channels != w_in:
            what = f"groups={groups}, " + ("transposed=1, " if transposed else "")
            raise ValueError(f"{op}: Given {what}weight of size {_shape_str(weight_shape)}, expected input"
                             f"{_shape_str(input_shape)} to have {w_in} channels, but got {in_channels} "
                             f"channels instead")

    @staticmethod
    def _transposed_output_padding(op, output_padding, output_size, input_shape, kernel, stride, dilation, pairs,
                                   unbatched):
        nd = len(kernel)
        full, lead = (nd + 1, "channel size") if unbatched else (nd + 2, "batch and channel sizes")
        output_padding = int_tuple(op, "output_padding", output_padding, nd)
        if any(p < 0 for p in output_padding):
            raise ValueError(f"{op}: negative output_padding is not supported, but got {output_padding}")
        if output_size is not None:
            if getattr(output_size, "ndim", None) == 1 and hasattr(output_size, "tolist"):
                output_size = output_size.tolist()  # a 1-D NumPy array, as torch.nn.ConvTranspose takes it
            if not isinstance(output_size, (tuple, list)):
                raise TypeError(f"{op}: expected output_size to be a tuple of {nd} ints (or {full} with the {lead}), "
                                f"but got {output_size!r}")
            if len(output_size) not in (nd, full):  # (torch.nn.ConvTranspose's rule)
                raise ValueError(f"{op}: expected output_size to have {nd} entries (or {full} with the {lead}) for "
                                 f"a{'n un' if unbatched else ' '}batched input, but got output_size={output_size!r}")
            size = int_tuple(op, "output_size", tuple(output_size)[-nd:], nd, limited=False)
            smallest = [transposed_output_size(L, k, s, d, lo, hi, 0)
                        for L, k, s, d, (lo, hi) in zip(input_shape[2:], kernel, stride, dilation, pairs)]
            largest = [m + max(s, d) - 1 for m, s, d in zip(smallest, stride, dilation)]
            if any(not lo <= v <= hi for v, lo, hi in zip(size, smallest, largest)):
                raise ValueError(f"{op}: requested an output size of {list(size)}, but valid sizes range from "
                                 f"{smallest} to {largest} (for an input of {list(input_shape[2:])})")
            output_padding = tuple(v - m for v, m in zip(size, smallest))
        if any(p >= s and p >= d for p, s, d in zip(output_padding, stride, dilation)):
            raise ValueError(f"{op}: output padding must be smaller than either stride or dilation, but got "
                             f"output_padding={output_padding}, stride={stride}, dilation={dilation}")
        return output_padding

    def _check_sizes(self, op):
        dims = " x ".join
        if self.transposed:
            out = self.output_shape[2:]
            if any(o <= 0 for o in out):
                raise ValueError(f"{op}: Given input size per channel: ({dims(map(str, self.input_shape[2:]))}). "
                                 f"Calculated output size per channel: ({dims(map(str, out))}). "
                                 f"Output size is too small")
            return
        if self.padding_mode == "reflect":
            for axis, (L, (lo, hi)) in enumerate(zip(self.input_shape[2:], self.padding)):
                if lo >= L or hi >= L:
                    raise ValueError(f"{op}: Padding size should be less than the corresponding input dimension "
                                     f"for padding_mode='reflect', but got padding ({lo}, {hi}) at dimension "
                                     f"{axis + 2} of input {_shape_str(self.input_shape)}")
        if self.padding_mode == "circular":
            for axis, (L, (lo, hi)) in enumerate(zip(self.input_shape[2:], self.padding)):
                if lo > L or hi > L:
                    raise ValueError(f"{op}: Padding value causes wrapping around more than once for "
                                     f"padding_mode='circular': padding ({lo}, {hi}) at dimension {axis + 2} "
                                     f"of input {_shape_str(self.input_shape)}")
        padded = [L + lo + hi for L, (lo, hi) in zip(self.input_shape[2:], self.padding)]
        extent = [d * (k - 1) + 1 for k, d in zip(self.weight_shape[2:], self.dilation)]
        if any(p < e for p, e in zip(padded, extent)):
            raise ValueError(f"{op}: Calculated padded input size per channel: ({dims(map(str, padded))}). "
                             f"Kernel size: ({dims(map(str, extent))}). "
                             f"Kernel size can't be greater than actual input size")

    # ------------------------------------------------------------ shapes

    @property
    def nd(self) -> int:
        return len(self.input_shape) - 2

    @cached_property
    def output_shape(self) -> tuple:
        """Shape of the op's result: conv (N, K, *out); transposed (N, K_t = w[1]*groups, *out)."""
        k = self.weight_shape[2:]
        zipped = zip(self.input_shape[2:], k, self.stride, self.dilation, self.padding, self.output_padding)
        if self.transposed:
            out = tuple(transposed_output_size(L, kk, s, d, lo, hi, op)
                        for L, kk, s, d, (lo, hi), op in zipped)
            return (self.input_shape[0], self.weight_shape[1] * self.groups) + out
        out = tuple(conv_output_size(L, kk, s, d, lo, hi) for L, kk, s, d, (lo, hi), _ in zipped)
        return (self.input_shape[0], self.weight_shape[0]) + out

    @property
    def conv_x_shape(self) -> tuple:
        """Shape of the forward convolution's x (the transposed op's output)."""
        return self.output_shape if self.transposed else self.input_shape

    @property
    def conv_y_shape(self) -> tuple:
        """Shape of the forward convolution's y (the transposed op's input)."""
        return self.input_shape if self.transposed else self.output_shape

    @property
    def pre_padded(self) -> bool:
        """True when the padding is applied as an explicit pad of x (every mode but 'zeros')."""
        return self.padding_mode != "zeros"

    @property
    def padded_x_shape(self) -> tuple:
        return self.conv_x_shape[:2] + tuple(L + lo + hi for L, (lo, hi) in zip(self.conv_x_shape[2:], self.padding))

    def pad_tables(self):
        """Per-axis source-index tables of the explicit pad, as three axes (unit axes map to themselves)."""
        tables = [pad_indices(L, lo, hi, self.padding_mode) for L, (lo, hi) in zip(self.conv_x_shape[2:], self.padding)]
        return [[0]] * (3 - self.nd) + tables

    @cached_property
    def views(self) -> dict:
        """The arrays of a call, per role in the canonical convolution ("X", "W", "Y"): (the op-level batched shape,
        its unpadded 5-D view, the 5-D shape the kernels see: X pre-padded when pre_padded). Computed once per spec:
        the plan cache hands the same spec to every repeated call."""
        g = self.geometry
        unit = (1,) * (3 - self.nd)
        shapes = {"X": self.conv_x_shape, "W": self.weight_shape, "Y": self.conv_y_shape}
        canon = {"X": g.x_shape, "W": g.w_shape, "Y": g.y_shape}
        return {role: (s, s[:2] + unit + s[2:], canon[role]) for role, s in shapes.items()}

    @cached_property
    def geometry(self) -> ConvGeometry:
        """The canonical forward geometry the kernels see (x pre-padded, with zero padding, if pre_padded)."""
        if self.pre_padded:
            return make_geometry(self.padded_x_shape, self.weight_shape, self.stride, ((0, 0),) * self.nd,
                                 self.dilation, self.groups)
        # transposed: output_padding extends x on the high side without adding rows of y (hi - op may be < 0)
        pairs = tuple((lo, hi - op) for (lo, hi), op in zip(self.padding, self.output_padding))
        return make_geometry(self.conv_x_shape, self.weight_shape, self.stride, pairs, self.dilation, self.groups)

    # ------------------------------------------------------------ figures

    def _axis_pairs(self):
        """Per axis, the real taps (those that read input) and the distinct (output index, source index) pairs they
        connect: O(kernel) arithmetic per axis, plus a loop over the outputs whose window meets an explicit pad."""
        g = self.geometry
        out = (g.P, g.Q, g.U)[3 - self.nd:]
        pads = self.pad_tables()[3 - self.nd:] if self.pre_padded else [None] * self.nd
        zipped = zip(self.conv_x_shape[2:], self.weight_shape[2:], self.stride, self.dilation, self.padding, out, pads)
        taps, pairs = [], []
        for L, k, s, d, (lo, _), n_out, table in zipped:
            if table is None:  # zero padding: tap r of output o reads o*s + r*d - lo when inside [0, L)
                real = sum(len(range(max(0, -(-(lo - r * d) // s)), min(n_out, (L - 1 + lo - r * d) // s + 1)))
                           for r in range(k))
                taps.append(real)
                pairs.append(real)  # the taps of one output read distinct inputs
                continue
            # an explicit pad (reflect, replicate, circular): every tap reads input, and taps can meet again
            # where a window reaches into the pad; windows inside [lo, lo + L) connect k distinct inputs each
            first, last = -(-lo // s), (lo + L - 1 - (k - 1) * d) // s  # the outputs whose window is inside
            a, b = max(0, first), min(n_out, last + 1)
            if a >= b:  # no window inside: every output is an edge
                a = b = n_out
            edges = itertools.chain(range(a), range(b, n_out))
            taps.append(n_out * k)
            pairs.append((b - a) * k + sum(len({table[o * s + r * d] for r in range(k)}) for o in edges))
        return taps, pairs

    @cached_property
    def macs(self) -> int:
        """Real multiply-adds: taps that read input (zero padding excluded), N * K * C/groups * prod(taps)."""
        g = self.geometry
        return g.N * g.K * (g.C // g.groups) * math.prod(self._axis_pairs()[0])

    @property
    def flops(self) -> int:
        """2 * MACs (the same count for forward, backward-data and backward-filter)."""
        return 2 * self.macs

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 8

    def min_bytes(self, primitive="forward") -> int:
        """Bytes if every tensor the primitive (the op's own: a transposed convolution's forward adds its bias too)
        touches were read or written exactly once."""
        n = math.prod
        x, w, y = n(self.conv_x_shape), n(self.weight_shape), n(self.conv_y_shape)
        b = self.output_shape[1] if (self.bias and primitive == "forward") else 0  # (a transposed weight: (C, K/g))
        return (x + w + y + b) * self.itemsize

    @property
    def params(self) -> int:
        """Weights plus bias."""
        out_channels = self.output_shape[1]
        return math.prod(self.weight_shape) + (out_channels if self.bias else 0)

    @property
    def dense_params(self) -> int:
        """Weights of a fully-connected layer between the same (per-sample) input and output."""
        return math.prod(self.input_shape[1:]) * math.prod(self.output_shape[1:])

    @cached_property
    def connections(self) -> int:
        """Non-zero entries of the equivalent dense matrix (per sample)."""
        g = self.geometry
        return g.K * (g.C // g.groups) * math.prod(self._axis_pairs()[1])

    @property
    def connection_sparsity(self) -> float:
        """Fraction of zero entries in the equivalent dense matrix."""
        dense = self.dense_params
        return 1.0 - self.connections / dense if dense else 0.0

    def describe(self) -> str:
        kind = "transposed convolution" if self.transposed else "convolution"
        lines = [
            f"{self.nd}-D {kind}, {self.dtype}",
            f"  input            {_shape_str(self.input_shape)}",
            f"  weight           {_shape_str(self.weight_shape)}" + (" + bias" if self.bias else ""),
            f"  output           {_shape_str(self.output_shape)}",
            f"  stride {self.stride}, padding {self.padding} ({self.padding_mode}), dilation {self.dilation}, "
            f"groups {self.groups}" + (f", output_padding {self.output_padding}" if self.transposed else ""),
            f"  FLOPs            {self.flops:,} (2 x {self.macs:,} real multiply-adds)",
            f"  minimum bytes    {self.min_bytes():,}",
            f"  parameters       {self.params:,} ({'weights + bias' if self.bias else 'weights, no bias'})",
            f"  dense layer      {self.dense_params:,} weights for the same input and output "
            f"({self.dense_params / max(self.params, 1):,.0f}x more)",
            f"  sparsity         {self.connection_sparsity:.4%} of the dense matrix is zero",
        ]
        return "\n".join(lines)
