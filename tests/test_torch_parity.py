"""Differential test against PyTorch: random calls near the edge of validity, the same on both sides.

A Hypothesis strategy draws calls of conv{1,2,3}d, conv_transpose{1,2,3}d, torch.nn.grad's conv{n}d_input /
conv{n}d_weight, the transposed ops' gradients (torch.autograd.grad of F.conv_transpose{n}d: cnnfast.grad's
conv_transpose{n}d_input / _weight), torch.nn.Conv{n}d modules (with a padding_mode) and ConvTranspose{n}d modules
(with an output_size), with small, often degenerate arguments: empty batches, channels and spatial axes, kernels
larger than the input, channel counts that do not match the groups, bad bias lengths, output_padding at its limits,
'same' and 'valid' padding, zero or negative strides, dilations and padding, grad_output of the wrong shape.
Each call runs on torch (float64, CPU), on cnnfast with NumPy arrays and, for the forward ones, on cnnfast.torch
with tensors (a module: cnnfast.conv{n}d with its options, and cnnfast.torch's twin module). Wherever torch accepts
a call, cnnfast must return the same shape and values (1e-9); wherever torch raises, cnnfast must raise
ValueError/TypeError. The deliberate differences (README, "API") are named by `deviations` and
checked as such:
    same-strided    padding='same' with a stride > 1: cnnfast pads as TensorFlow does, torch raises;
    no-in-channels  zero input channels: cnnfast gives the bias broadcast over (N, K, ...), torch a shape with 0
                    channels (or, transposed, an error);
    grad-output     torch.nn.grad's functions do not check grad_output against the forward's output shape (they
                    return a result for the wrong batch size, for instance), cnnfast raises;
    negative-pad    a negative padding with a padding_mode: torch's F.pad crops the input, cnnfast raises;
    output-size     nn.ConvTranspose's output_size may exceed the smallest output by up to stride - 1 along an axis,
                    cnnfast's by up to max(stride, dilation) - 1: each output_padding F.conv_transpose takes;
    empty-input     an empty batch or zero input channels: torch skips some argument checks (output_padding,
                    dilation, the output size, grad_output's shape), cnnfast does not.
Profiles: 600 derandomized examples in CI; CNNFAST_PARITY_EXAMPLES=20000 for a long randomized run.
"""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
import cnnfast  # noqa: E402
import cnnfast.torch as cf  # noqa: E402

pytestmark = pytest.mark.torch
F = torch.nn.functional
_LONG = int(os.environ.get("CNNFAST_PARITY_EXAMPLES", "0") or 0)
FORWARDS = ("conv", "conv_transpose", "module", "module_transpose")
TRANSPOSED = ("conv_transpose", "module_transpose", "conv_transpose_input", "conv_transpose_weight")
GRADS = ("conv_input", "conv_weight", "conv_transpose_input", "conv_transpose_weight")


def _forward_shape(nd, x_shape, w_shape, options, transposed=False):
    """torch's forward (or transposed) output shape for these arguments, None where torch refuses them."""
    x, w = (torch.zeros(shape, dtype=torch.float64) for shape in (x_shape, w_shape))
    try:
        return tuple(getattr(F, f"conv_transpose{nd}d" if transposed else f"conv{nd}d")(x, w, **options).shape)
    except (RuntimeError, IndexError):  # (an IndexError from inside torch on some empty weights)
        return None


def _per_axis(draw, nd, lo, hi):
    return draw(st.one_of(st.integers(lo, hi), st.tuples(*[st.integers(lo, hi)] * nd)))


@st.composite
def calls(draw):
    """(kind, nd, input shape, weight shape, bias length or None, options, grad_output shape or None); kind is
    'conv', 'conv_transpose', 'conv_input' or 'conv_weight' (torch.nn.grad's), 'module' (torch.nn.Conv{n}d, whose
    options hold a padding_mode) or 'module_transpose' (torch.nn.ConvTranspose{n}d, sometimes called with an
    output_size, among the options), 'conv_transpose_input' or 'conv_transpose_weight' (autograd's)."""
    kind = draw(st.sampled_from(["conv", "conv", "conv_transpose", "conv_transpose", "conv_input", "conv_weight",
                                 "module", "module_transpose", "conv_transpose_input", "conv_transpose_weight"]))
    nd, groups = draw(st.integers(1, 3)), draw(st.sampled_from([1, 1, 2, 3]))
    tidy = draw(st.booleans())  # half the calls stay away from the edges (most others are invalid somewhere)
    transposed = kind in TRANSPOSED
    low = 1 if tidy else 0
    C = draw(st.integers(low, 3)) * groups + (0 if tidy else draw(st.sampled_from([0, 0, 0, 0, 1])))
    K = draw(st.integers(low, 3)) * groups + (0 if tidy else draw(st.sampled_from([0, 0, 0, 0, 1])))
    batch = draw(st.sampled_from([None, 0, 1, 2]) if kind in FORWARDS else st.sampled_from([0, 1, 2]))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(nd))
    options = dict(stride=_per_axis(draw, nd, 1, 3), dilation=_per_axis(draw, nd, 1, 3), groups=groups,
                   padding=_per_axis(draw, nd, 0, 3))
    dilation = options["dilation"] if isinstance(options["dilation"], tuple) else (options["dilation"],) * nd
    spatial = tuple(draw(st.integers(d * (k - 1) + 1, d * (k - 1) + 5) if tidy else st.integers(0, 7))
                    for k, d in zip(kernel, dilation))  # (tidy: at least the kernel's extent)
    x_shape = ((batch,) if batch is not None else ()) + (C,) + spatial
    w_shape = ((C, K // groups) if transposed else (K, C // groups)) + kernel
    if not tidy and draw(st.integers(0, 9)) == 0:  # the wrong channel count
        w_shape = w_shape[:1] + (w_shape[1] + 1,) + w_shape[2:]
    if kind in ("conv", "module") and draw(st.booleans()):
        options["padding"] = draw(st.sampled_from(["same", "valid"]))
    if kind == "module":
        options["padding_mode"] = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    if transposed:
        options["output_padding"] = _per_axis(draw, nd, 0, 2)
    if kind == "module_transpose" and draw(st.booleans()):  # an output_size near the valid range, either side
        smallest = _forward_shape(nd, x_shape, w_shape, dict(options, output_padding=0), transposed=True)
        sizes = smallest[-nd:] if smallest else tuple(draw(st.integers(1, 9)) for _ in range(nd))
        options["output_size"] = tuple(v + draw(st.integers(-1, 3)) for v in sizes)
    if not tidy and draw(st.integers(0, 9)) == 0:
        options[draw(st.sampled_from(["stride", "dilation", "padding"]))] = draw(st.sampled_from([0, -1]))
    bias = None
    if kind in FORWARDS:
        out_channels = w_shape[1] * groups if transposed else w_shape[0]
        bias = draw(st.sampled_from([None, out_channels] + ([] if tidy else [out_channels + 1])))
    dy_shape = None
    if kind in GRADS:  # the forward's output shape (when valid), sometimes off by one
        dy_shape = _forward_shape(nd, x_shape, w_shape, options, transposed)
        if dy_shape is None:
            dy_shape = x_shape[:1] + (K,) + tuple(draw(st.integers(0, 7)) for _ in range(nd))
        if not tidy and draw(st.integers(0, 1)) == 0:
            axis = draw(st.integers(0, len(dy_shape) - 1))
            dy_shape = dy_shape[:axis] + (dy_shape[axis] + 1,) + dy_shape[axis + 1:]
    return kind, nd, x_shape, w_shape, bias, options, dy_shape


def _run(fn):
    """fn()'s result as a NumPy array, or the exception it raised."""
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 (each side's errors are compared below)
        return e
    return out.detach().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


def _sides(kind, nd, x_shape, w_shape, bias, options, dy_shape):
    """(the bias, torch's outcome, cnnfast's, cnnfast.torch's): arrays or exceptions (None: not called)."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    b = None if bias is None else rng.standard_normal(bias)

    def T(a):
        return None if a is None else torch.from_numpy(a)
    if kind == "module":
        return (b, _run(lambda: _module(torch.nn, nd, x, w, b, options)(T(x))),
                _run(lambda: getattr(cnnfast, f"conv{nd}d")(x, w, b, **options)),
                _run(lambda: _module(cf, nd, x, w, b, options)(T(x))))
    if kind == "module_transpose":
        size = {k: v for k, v in options.items() if k == "output_size"}
        built = {k: v for k, v in options.items() if k != "output_size"}
        return (b, _run(lambda: _module(torch.nn, nd, x, w, b, built, True)(T(x), **size)),
                _run(lambda: getattr(cnnfast, f"conv_transpose{nd}d")(x, w, b, **options)),
                _run(lambda: _module(cf, nd, x, w, b, built, True)(T(x), **size)))
    if kind in ("conv", "conv_transpose"):
        name = f"{kind}{nd}d"
        return (b, _run(lambda: getattr(F, name)(T(x), T(w), T(b), **options)),
                _run(lambda: getattr(cnnfast, name)(x, w, b, **options)),
                _run(lambda: getattr(cf, name)(T(x), T(w), T(b), **options)))
    dy = rng.standard_normal(dy_shape)
    if kind.startswith("conv_transpose"):
        side = kind.rpartition("_")[2]
        return (b, _run(lambda: _transpose_grad(nd, side, T(x), T(w), T(dy), options)),
                _run(lambda: getattr(cnnfast.grad, f"conv_transpose{nd}d_{side}")(
                    x_shape if side == "input" else x, w if side == "input" else w_shape, dy, **options)),
                None)
    name = f"conv{nd}d_{kind[5:]}"
    first, second = (x_shape, w) if kind == "conv_input" else (x, w_shape)
    return (b, _run(lambda: getattr(torch.nn.grad, name)(T(first) if kind == "conv_weight" else first,
                                                      T(second) if kind == "conv_input" else second, T(dy),
                                                      **options)),
            _run(lambda: getattr(cnnfast.grad, name)(first, second, dy, **options)),
            None)


def _transpose_grad(nd, side, x, w, dy, options):
    """The gradient of F.conv_transpose{nd}d(x, w) w.r.t. x (side 'input') or w, given dy: torch's autograd."""
    x, w = x.requires_grad_(side == "input"), w.requires_grad_(side == "weight")
    y = getattr(F, f"conv_transpose{nd}d")(x, w, None, **options)
    return torch.autograd.grad(y, x if side == "input" else w, dy)[0]


def _module(namespace, nd, x, w, b, options, transposed=False):
    """namespace.Conv{nd}d or ConvTranspose{nd}d (torch.nn's or cnnfast.torch's) built for x and holding the weight
    w and bias b."""
    in_channels = x.shape[1 if x.ndim == w.ndim else 0]
    out_channels = w.shape[1] * options["groups"] if transposed else w.shape[0]
    module = getattr(namespace, f"ConvTranspose{nd}d" if transposed else f"Conv{nd}d")(
        in_channels, out_channels, w.shape[2:], bias=b is not None, dtype=torch.float64, **options)
    module.weight = torch.nn.Parameter(torch.from_numpy(w))
    if b is not None:
        module.bias = torch.nn.Parameter(torch.from_numpy(b))
    return module


def _past_the_stride(nd, x_shape, w_shape, options):
    """Whether an output_size exceeds the smallest output ((L - 1)*s - 2p + d*(k - 1) + 1) by stride or more along
    an axis."""
    size = options.get("output_size")
    if size is None:
        return False
    axes = [(v,) * nd if isinstance(v, int) else v for v in (options["stride"], options["padding"],
                                                             options["dilation"])]
    smallest = [(L - 1) * s - 2 * p + d * (k - 1) + 1
                for L, k, s, p, d in zip(x_shape[-nd:], w_shape[2:], *axes)]
    return any(v >= m + s for v, m, s in zip(size, smallest, axes[0]))


def deviations(kind, nd, x_shape, w_shape, options, dy_shape):
    """The documented differences (module docstring) this call falls under."""
    stride, batched, padding = options["stride"], len(x_shape) == len(w_shape), options["padding"]
    wrong_dy = dy_shape is not None and dy_shape != _forward_shape(nd, x_shape, w_shape, options,
                                                                   kind in TRANSPOSED)
    return {name for name, applies in (
        ("negative-pad", options.get("padding_mode", "zeros") != "zeros" and not isinstance(padding, str)
         and min((padding,) if isinstance(padding, int) else padding) < 0),
        ("same-strided", padding == "same" and (stride if isinstance(stride, int) else max(stride)) > 1),
        ("grad-output", wrong_dy),
        ("output-size", _past_the_stride(nd, x_shape, w_shape, options)),
        ("no-in-channels", x_shape[1 if batched else 0] == 0),
        ("empty-input", x_shape[1 if batched else 0] == 0 or batched and x_shape[0] == 0)) if applies}


def _check(call):
    """Compare the three sides of one call; return its deviations."""
    kind, nd, x_shape, w_shape, bias, options, dy_shape = call
    b, theirs, *ours = _sides(*call)
    known = deviations(kind, nd, x_shape, w_shape, options, dy_shape)
    for who, mine in zip(("cnnfast", "cnnfast.torch"), ours):
        if mine is None:
            continue
        if isinstance(mine, Exception) and not isinstance(mine, (ValueError, TypeError)):
            raise AssertionError(f"{who} raised {type(mine).__name__}, not ValueError/TypeError") from mine
        if isinstance(theirs, Exception):
            assert isinstance(mine, Exception) or known & {"same-strided", "no-in-channels", "output-size"}, \
                f"torch raised {theirs!r}; {who} returned {mine.shape}"
        elif isinstance(mine, Exception):
            assert known & {"empty-input", "grad-output", "negative-pad"}, \
                f"torch returned {theirs.shape}; {who} raised {mine!r}"
        elif "no-in-channels" in known:  # a forward: the bias (or 0) over (N, K, ...), where torch has 0 channels
            assert mine.shape[2:] == theirs.shape[2:]
            if kind in FORWARDS and mine.ndim == nd + 2:
                bias_values = np.zeros(mine.shape[1]) if b is None else b
                np.testing.assert_array_equal(mine, np.broadcast_to(bias_values[(...,) + (None,) * nd], mine.shape))
        else:
            assert mine.shape == theirs.shape, f"{who} returned {mine.shape}, torch {theirs.shape}"
            np.testing.assert_allclose(mine, theirs, rtol=1e-9, atol=1e-9, err_msg=who)
    return known


@settings(max_examples=_LONG or 600, derandomize=not _LONG, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(calls())
def test_cnnfast_accepts_and_computes_what_torch_does(call):
    _check(call)


@pytest.mark.parametrize("call, known", [
    (("conv", 2, (1, 2, 5, 5), (3, 2, 3, 3), None, dict(stride=2, dilation=1, groups=1, padding="same"), None),
     {"same-strided"}),
    (("conv", 1, (2, 0, 6), (3, 0, 2), 3, dict(stride=1, dilation=1, groups=1, padding=0), None),
     {"no-in-channels", "empty-input"}),
    (("conv_transpose", 1, (0, 2, 4), (2, 3, 2), None,
      dict(stride=1, dilation=1, groups=1, padding=0, output_padding=1), None), {"empty-input"}),
    (("conv", 2, (1, 1, 6, 0), (2, 1, 1, 3), None, dict(stride=1, dilation=1, groups=1, padding=2), None), set()),
    (("conv", 1, (1, 3, 5), (0, 3, 3), None, dict(stride=1, dilation=1, groups=1, padding=0), None), set()),
    (("module_transpose", 1, (1, 1, 1), (1, 1, 1), None,
      dict(stride=1, dilation=2, groups=1, padding=0, output_padding=0, output_size=(2,)), None), {"output-size"}),
    (("conv_transpose", 2, (1, 1, 6, 5), (1, 0, 1, 3), None,
      dict(stride=1, dilation=1, groups=1, padding=0, output_padding=0), None), set()),
])
def test_each_deviation_and_its_neighbours(call, known):
    """One call of each documented difference, and the empty axes PyTorch refuses (cnnfast refuses them too)."""
    assert _check(call) == known
    if not known:
        assert all(isinstance(side, ValueError) for side in _sides(*call)[2:] if side is not None)
