"""The contract between cnnfast's planner and every kernel family (cpu/, cuda/).

Every problem reaches a kernel as ONE canonical forward-convolution geometry over three spatial axes
(1-D and 2-D problems carry unit axes):

    x (N, C, D, H, W)  *  w (K, C/groups, T, R, S)  ->  y (N, K, P, Q, U)
    y[n, k, p, q, u] = bias[k] + sum_{c in group(k), t, r, s}
        w[k, c, t, r, s] * x[n, g(k)*C/groups + c, p*stride_d - pad_d + t*dil_d, q*.. , u*..]

with out-of-range x reading as zero (only zero padding reaches kernels; other padding modes are applied
by the caller as an explicit pad of x and the adjoint fold of dx). The three primitives share it:

    forward(x, w, bias, y, g, ...)          y  = conv(x, w) + bias      (bias: (K,) array or None)
    backward_data(dy, w, dx, g, ...)        dx = conv(., w)^T dy        (also conv_transpose's forward)
    backward_filter(x, dy, dw, g, ...)      dw = d<y, dy>/dw            (no bias: callers sum dy)

Arrays are C-contiguous, all of one dtype (float32 or float64): 5-D for the CPU launchers; flat (1-D, the same
elements) from the public ops to the CUDA launchers, whose kernels index 1-D buffers (they also take the 5-D
arrays; a Numba reshape costs ~3 us of host time). Outputs are preallocated and fully overwritten by the
launcher. The high-side padding is implied by P, Q, U.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import numpy as np

PRIMITIVES = ("forward", "backward_data", "backward_filter")
DEFAULT_WORKSPACE_LIMIT = 256 << 20  # scratch bytes an algorithm may use when the caller gives no workspace_limit


class ConvGeometry(NamedTuple):
    """Canonical 3-D forward-convolution geometry (see the module docstring). All fields are ints."""

    N: int
    C: int
    D: int
    H: int
    W: int
    K: int
    T: int
    R: int
    S: int
    P: int
    Q: int
    U: int
    stride_d: int
    stride_h: int
    stride_w: int
    dil_d: int
    dil_h: int
    dil_w: int
    pad_d: int
    pad_h: int
    pad_w: int
    groups: int

    @property
    def x_shape(self):
        return (self.N, self.C, self.D, self.H, self.W)

    @property
    def w_shape(self):
        return (self.K, self.C // self.groups, self.T, self.R, self.S)

    @property
    def y_shape(self):
        return (self.N, self.K, self.P, self.Q, self.U)

    @property
    def dense_macs(self) -> int:
        """N*K*(C/groups)*T*R*S*P*Q*U: multiply-adds with the padding's taps counted (ConvSpec.macs leaves them
        out); what a direct kernel's loops cover at most, for sizing work."""
        return self.N * self.K * (self.C // self.groups) * self.T * self.R * self.S * self.P * self.Q * self.U

    @property
    def is_depthwise(self) -> bool:
        """groups == C == in-channels, each group with K/C >= 1 filters (channel multiplier)."""
        return self.groups == self.C and self.C > 0 and self.K % self.C == 0

    @property
    def covers_input(self) -> bool:
        """The kernel covers the whole unpadded input (a DCGAN generator's first layer as a transposed convolution of
        a 1x1 input, a discriminator's last): one output position per sample, whose column matrix is the sample
        itself; over the batch the layer is one GEMM per group, a fully connected one. A kernel as long as an axis
        of more than one element must have unit dilation there: a dilated one reaches past the input, into high
        padding (a (low, high) pair, 'same' at a stride), and reads only some of the input's elements."""
        return ((self.T, self.R, self.S) == (self.D, self.H, self.W) and (self.P, self.Q, self.U) == (1, 1, 1)
                and (self.pad_d, self.pad_h, self.pad_w) == (0, 0, 0)
                and all(taps == 1 or dilation == 1 for taps, dilation in
                        ((self.T, self.dil_d), (self.R, self.dil_h), (self.S, self.dil_w))))

    @property
    def is_pointwise(self) -> bool:
        """1x1x1 kernel, unit stride, no padding, output positions == input positions (no extra rows from a
        transposed convolution's output_padding): per sample and group, the convolution is a plain GEMM."""
        return ((self.T, self.R, self.S) == (1, 1, 1) and (self.stride_d, self.stride_h, self.stride_w) == (1, 1, 1)
                and (self.pad_d, self.pad_h, self.pad_w) == (0, 0, 0)
                and (self.P, self.Q, self.U) == (self.D, self.H, self.W))


@dataclass(frozen=True, eq=False)
class Algorithm:
    """One algorithm of one kernel family: its three launchers and what it can do. Compared and hashed by identity
    (plan.registry_token: a replaced entry is another algorithm).

    forward(x, w, bias, y, g, **opts); backward_data(dy, w, dx, g, **opts); backward_filter(x, dy, dw, g, **opts)
    opts: ``workspace_limit`` (bytes) for every family, ``stream`` for CUDA, ``tile`` for algorithms with tiles.
    supports(g, primitive) -> str | None: None if the algorithm handles the problem, else why not.
    workspace_bytes(g, primitive, itemsize, workspace_limit[, tile]) -> bytes of scratch the launcher allocates.
    kernels(g, primitive, dtype) -> names of the kernels a launch runs (for explain()).
    tiles(itemsize) -> names of the tile configurations its launchers take as tile= for that dtype (autotuning
    times each); tile(g, primitive, itemsize, workspace_limit) -> the one a launcher runs without tile=.
    """

    name: str
    forward: Callable
    backward_data: Callable
    backward_filter: Callable
    supports: Callable = lambda g, primitive: None
    workspace_bytes: Callable = lambda g, primitive, itemsize, workspace_limit: 0
    kernels: Optional[Callable] = None
    tiles: Callable = lambda itemsize: ()
    tile: Optional[Callable] = None
    deterministic: bool = True
    doc: str = ""

    def launcher(self, primitive: str) -> Callable:
        return getattr(self, primitive)


def conv_output_size(length: int, kernel: int, stride: int, dilation: int, pad_lo: int, pad_hi: int) -> int:
    """floor((L + p_lo + p_hi - d*(k-1) - 1) / s) + 1 (may be <= 0: the caller rejects that)."""
    return (length + pad_lo + pad_hi - dilation * (kernel - 1) - 1) // stride + 1


def make_geometry(x_shape, w_shape, stride, padding, dilation, groups: int) -> ConvGeometry:
    """Canonical geometry of a forward convolution with 1, 2 or 3 spatial axes.

    x_shape (N, C, *L), w_shape (K, C/groups, *k); stride, dilation: per-axis ints; padding: per-axis
    (low, high) pairs of zero padding. Missing leading spatial axes become unit axes.
    """
    nd = len(x_shape) - 2
    unit = 3 - nd
    spatial = (1,) * unit + tuple(x_shape[2:])
    kernel = (1,) * unit + tuple(w_shape[2:])
    stride = (1,) * unit + tuple(stride)
    dilation = (1,) * unit + tuple(dilation)
    padding = ((0, 0),) * unit + tuple(tuple(p) for p in padding)
    out = tuple(conv_output_size(L, k, s, d, lo, hi)
                for L, k, s, d, (lo, hi) in zip(spatial, kernel, stride, dilation, padding))
    return ConvGeometry(x_shape[0], x_shape[1], *spatial, w_shape[0], *kernel, *out,
                        *stride, *dilation, *(lo for lo, _ in padding), groups)


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def pad_indices(length: int, pad_lo: int, pad_hi: int, mode: str):
    """Source index in [0, L) for each of the L + lo + hi positions of a padded axis (-1: a zero), as int64.

    reflect (edge not repeated, needs pad < L): ... x2 x1 | x0 x1 .. x_{L-1} | x_{L-2} ...
    replicate: x0 .. x0 | x | x_{L-1} ..;  circular: x_{L-lo} .. | x | .. x_{hi-1};  zeros: -1.
    """
    j = np.arange(-pad_lo, length + pad_hi, dtype=np.int64)  # (NumPy: a pad of 2**31 took minutes as a list)
    if mode == "zeros":
        return np.where((j >= 0) & (j < length), j, -1)
    if mode == "replicate":
        return np.clip(j, 0, max(length - 1, 0))
    if mode == "circular":
        return j % length
    if mode == "reflect":
        period = 2 * (length - 1)
        m = np.abs(j) % period if period else np.zeros_like(j)
        return np.where(m < length, m, period - m)
    raise ValueError(f"pad_indices: unknown padding mode {mode!r}")
