"""The torch.library custom ops behind cnnfast.torch, their derivatives and their vmap rules (needs torch >= 2.4;
cnnfast.torch checks it and imports this module).

Four ops: cnnfast::conv (any forward op), conv_input (backward-data), conv_weight (backward-filter) and bias_grad,
each running cnnfast's kernels on torch tensors (CPU tensors as NumPy views, CUDA tensors as Numba views of their
memory on torch's current stream, the results in torch's memory), each with a fake (its output's shape, for
torch.compile and torch.export), backward and jvp formulas (which are cnnfast ops again: gradients to any order) and
a vmap rule (a batch of problems as one cnnfast call). The formulas and cnnfast.torch call them through _conv_op,
_conv_input_op, ... (_dispatch): the custom op, or under torch.func's transforms and forward-mode AD an
autograd.Function of its own.
"""
from __future__ import annotations

import ast
import contextlib
import numbers
import operator
from functools import lru_cache
from typing import Optional

import numpy as np
import torch
from torch._prims_common import suggest_memory_format
from torch.autograd import forward_ad

from cnnfast import api, compare, grad, spec, tune
from cnnfast.kernels.contract import conv_output_size

# ---------------------------------------------------------------- tensors <-> cnnfast arrays

def _array(t, op, name):
    """A torch tensor as an array cnnfast takes: a NumPy view (CPU) or the tensor itself (CUDA, whose memory cnnfast
    views; made contiguous by torch first, by its own copy on the device: autograd's gradients
    are often strided, such as the expanded ones of y.sum().backward(), and cnnfast's own copy is a Numba launch,
    through the host for a negative stride); None (no bias) and shapes pass as they are (the public
    functions check the tensor arguments first, _tensors; the ops' schemas check them again)."""
    if not isinstance(t, torch.Tensor):  # no bias; a shape
        return t
    if t.is_cuda:  # (a negative bit is torch's own: the memory holds the data as stored)
        return (t.resolve_neg() if t.is_neg() else t).detach().contiguous()
    if not t.is_cpu:
        raise TypeError(f"{op}: expected {name} on a CPU or CUDA device, but got a tensor on {t.device}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: expected {name} to have dtype float32 or float64, but got {t.dtype}")
    if t.requires_grad:
        t = t.detach()
    return (t.resolve_neg() if t.is_neg() else t).numpy()  # (a real tensor has no conjugate bit)


def _tensor(a, like):
    """cnnfast's result as a torch tensor on like's device (no copy)."""
    if isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    return torch.as_tensor(a, device=like.device)


# ---------------------------------------------------------------- the ops (torch.library custom ops)
#
# Four custom ops, so that torch.compile and torch.export see each call as one opaque op (a fake implementation
# gives its output's shape) and autograd runs cnnfast's backward kernels: conv (the forward op), conv_input
# (backward-data), conv_weight (backward-filter), bias_grad. The forward op's derivatives are conv_input and
# conv_weight, and theirs are conv and each other (the three are the partial derivatives of one trilinear form
# <F(x, w), dy>), so gradients of gradients (a Hessian, a gradient penalty) run cnnfast's kernels to any order.
# A layer travels as a string: its op name and option values, written by an f-string (which torch.compile traces)
# and read back by _layer.

_OPTIONS = {"conv": ("stride", "padding", "dilation", "groups", "padding_mode", "algo"),
            "conv_transpose": ("stride", "padding", "output_padding", "groups", "dilation", "algo")}
# each op (name suffix) -> its positional arguments, named for the errors, and as api.run takes them
_ROLES = {"": (("input", "weight", "bias"), ("input", "weight", "bias")),
          "_input": (("input_size", "weight", "grad_output"), ("size", "weight", "grad_output")),
          "_weight": (("input", "weight_size", "grad_output"), ("input", "size", "grad_output"))}


def _plain(value):
    """An option as a Python literal for the layer string: NumPy ints and 0-d integer tensors (torch's int
    arguments take them) as ints, sequences as tuples."""
    if isinstance(value, int):  # (ints and strings first: numbers.Integral's check costs ~0.3 us a value)
        return value if isinstance(value, bool) else int(value)
    if isinstance(value, str):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype in _INTEGER_DTYPES:
        return operator.index(value)
    return int(value) if isinstance(value, numbers.Integral) else value  # (NumPy ints)


_INTEGER_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}


@lru_cache(maxsize=1024)
def _layer(layer):
    """'conv2d:(stride, padding, ...)' -> ('conv2d', {'stride': ..., ...})."""
    name, values = layer.split(":", 1)
    try:
        values = ast.literal_eval(values)
    except (ValueError, SyntaxError):
        keys = ", ".join(_OPTIONS[name.rstrip("123d")])
        raise TypeError(f"{name}: expected ints, tuples of ints and strings for ({keys}), but got {values}") from None
    return name, dict(zip(_OPTIONS[name.rstrip("123d")], values))


def _run(layer, suffix, *args, like):
    """cnnfast's op (the layer's name + suffix) on torch tensors (and shapes), as a tensor like `like` (on a GPU:
    torch's memory, on torch's current stream there). api.run keeps the checked call under the layer and each
    tensor's shape, dtype and device (its key)."""
    name, options = _layer(layer)
    roles, params = _ROLES[suffix]
    op = name + suffix
    _same_low_dtype(op, args, roles)
    key = (layer, suffix, *((a.shape, a.dtype, a.is_cuda, a.get_device()) if isinstance(a, torch.Tensor) else a
                            for a in args))  # (a tensor's device, without making a torch.device)
    if any(type(a) is tuple and not all(type(v) is int for v in a) for a in args):
        key = None  # (a size of other than ints: 1, True and 1.0 are one key, which only its own checks tell apart)
    arrays = {param: _array(a, op, role) for a, role, param in zip(args, roles, params)}
    kind = ("conv_transpose" if name.startswith("conv_transpose") else "conv") + suffix
    return _tensor(api.run(op, kind, int(name[-2]), key=key, **arrays, **options), like)


def _same_low_dtype(op, args, roles):
    """A float16 or bfloat16 tensor beside one of another dtype (outside autocast: a bfloat16 batch into a float32
    model) is refused naming both dtypes, as torch does, rather than as a dtype the kernels do not take (the public
    functions run a float16 or bfloat16 call of one dtype as float32)."""
    given = [(role, a.dtype) for a, role in zip(args, roles) if isinstance(a, torch.Tensor)]
    if any(dtype in (torch.float16, torch.bfloat16) for _, dtype in given):
        first, dtype = given[0]
        for role, other in given[1:]:
            if other != dtype:
                raise TypeError(f"{op}: expected {role} to have the same dtype as {first} ({dtype}), but got {other}")


def _conv_eager(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], layer: str) -> torch.Tensor:
    return _in_format(_run(layer, "", x, w, b, like=x), x, w)


_conv = torch.library.custom_op("cnnfast::conv", _conv_eager, mutates_args=())


def _in_format(t, x, w):
    """t (contiguous) in the memory format torch's convolutions give their result and both gradients for input x and
    weight w: channels-last (channels_last_3d) for a 2-D (3-D) one where either has channels-last strides (torch's
    suggest_memory_format: a (N, 1, H, W) input counts; an unbatched 2-D input as its batch of one, whose result and
    input gradient are then squeezed), except a float64 3-D one on the CPU (torch's slow_conv3d); else
    contiguous. A channels-last t is a copy with that format's strides (the kernels compute contiguous), also where
    both layouts fit (an (N, K, 1, 1) result). Under torch.func's transforms t stays as it is (contiguous: a vmapped
    tensor has no layout of its own to convert)."""
    last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(w.dim())
    if last is None or torch._C._are_functorch_transforms_active():
        return t
    if x.dim() < w.dim():  # unbatched: as its batch of one, unsqueezed (the batch's stride C times C's: torch's view)
        if last == torch.channels_last_3d:
            return t  # (torch's slow_conv3d takes a batch of one)
        x_last = suggest_memory_format(x.unsqueeze(0)) == last
    else:
        x_last = _suggests(x, last)
    slow_conv3d = last == torch.channels_last_3d and x.dtype == torch.float64 and not x.is_cuda
    if slow_conv3d or not (x_last or _suggests(w, last)):
        return t
    return t.to(memory_format=last) if t.dim() == w.dim() else t.unsqueeze(0).to(memory_format=last).squeeze(0)


def _suggests(t, last):
    """suggest_memory_format(t) == last: told by the two contiguity flags (C++, ~0.1 us each) unless both or neither
    hold (a one-channel or 1x1 tensor, or other strides: then by the strides' order, ~2 us in Python, remembered
    per shape and strides for a plain tensor, whose sizes are ints: a 1x1 layer's weight asks on every call)."""
    standard, channels_last = t.is_contiguous(), t.is_contiguous(memory_format=last)
    if standard != channels_last:
        return channels_last
    if type(t) in _PLAIN and t.layout is torch.strided:
        return _strides_suggest(tuple(t.shape), t.stride(), last)
    return suggest_memory_format(t) == last


@lru_cache(maxsize=1024)
def _strides_suggest(shape, strides, last):
    """suggest_memory_format(t) == last for a strided tensor t of this shape and strides (asked of a meta tensor)."""
    return suggest_memory_format(torch.empty_strided(shape, strides, device="meta")) == last


def _conv_input_eager(dy: torch.Tensor, w: torch.Tensor, x_shape: list[int], layer: str) -> torch.Tensor:
    return _run(layer, "_input", tuple(x_shape), w, dy, like=dy)


def _conv_weight_eager(x: torch.Tensor, dy: torch.Tensor, w_shape: list[int], layer: str) -> torch.Tensor:
    return _run(layer, "_weight", x, tuple(w_shape), dy, like=dy)


def _bias_grad_eager(dy: torch.Tensor, unbatched: bool) -> torch.Tensor:
    """dy summed over all but its channel axis (an unbatched dy as a batch of one)."""
    return _tensor(grad.conv_bias(_array(dy[None] if unbatched else dy, "conv_bias", "grad_output")), dy)


_conv_input = torch.library.custom_op("cnnfast::conv_input", _conv_input_eager, mutates_args=())
_conv_weight = torch.library.custom_op("cnnfast::conv_weight", _conv_weight_eager, mutates_args=())
_bias_grad = torch.library.custom_op("cnnfast::bias_grad", _bias_grad_eager, mutates_args=())


def _concrete(*tensors):
    """Whether the tensors' sizes are all ints (not torch.compile's symbolic sizes)."""
    return all(type(size) is int for t in tensors for size in t.shape)


@_conv.register_fake
def _(x, w, b, layer):
    """The output's shape by ConvSpec's formulas, which also take torch.compile's symbolic sizes. Where the sizes
    are ints (the meta device, torch.export and torch.compile with static shapes), the call is first checked as the
    real op checks it, so that they raise cnnfast's error naming the argument where the real op would."""
    if _concrete(x, w):
        _check(layer, "", x, tuple(x.shape), tuple(w.shape), None if b is None else tuple(b.shape))
    return _in_format(x.new_empty(_fake_shape(x, w, layer)), x, w)


def _fake_shape(x, w, layer):
    name, options = _layer(layer)
    nd, groups = w.dim() - 2, options["groups"]
    spatial, kernel = x.shape[x.dim() - nd:], w.shape[2:]
    stride, dilation = (spec.int_tuple(name, key, options[key], nd) for key in ("stride", "dilation"))
    if options["padding"] == "same":
        out = [-(-length // s) for length, s in zip(spatial, stride)]
    else:
        pads = spec.padding_pairs(name, options["padding"], nd, spatial, kernel, stride, dilation)
        if name.startswith("conv_transpose"):
            extra = spec.int_tuple(name, "output_padding", options["output_padding"], nd)
            out = [spec.transposed_output_size(*a, lo, hi, e) for *a, (lo, hi), e in
                   zip(spatial, kernel, stride, dilation, pads, extra)]
        else:
            out = [conv_output_size(*a, lo, hi) for *a, (lo, hi) in zip(spatial, kernel, stride, dilation, pads)]
    channels = w.shape[1] * groups if name.startswith("conv_transpose") else w.shape[0]
    return x.shape[:x.dim() - nd - 1] + (channels, *out)


@_conv_input.register_fake
def _(dy, w, x_shape, layer):
    if _concrete(dy, w) and all(type(size) is int for size in x_shape):  # (checked as the real op checks it)
        _check(layer, "_input", dy, tuple(x_shape), tuple(w.shape), tuple(dy.shape))
    return dy.new_empty(x_shape)


@_conv_weight.register_fake
def _(x, dy, w_shape, layer):
    if _concrete(x, dy) and all(type(size) is int for size in w_shape):
        _check(layer, "_weight", dy, tuple(x.shape), tuple(w_shape), tuple(dy.shape))
    return dy.new_empty(w_shape)


@_bias_grad.register_fake
def _(dy, unbatched):
    return dy.new_empty(dy.shape[0 if unbatched else 1])


# ---------------------------------------------------------------- derivatives
#
# Each op is linear in each of its tensor arguments, so its derivatives are cnnfast ops again: the backward
# formulas (vector-Jacobian products) and the forward ones (Jacobian-vector products, jvp) below. They call the
# ops through _conv_op, _conv_input_op, ... (the dispatch further down), so that they are differentiable in turn
# under whichever transform runs them.

def _keep_conv(ctx, inputs, output):
    x, w, b, ctx.layer = inputs
    ctx.has_bias, ctx.shape = b is not None, output.shape
    return x, w


def _conv_backward(ctx, dy):
    x, w = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx = _in_format(_conv_input_op(dy, w, list(x.shape), ctx.layer), x, w) if need[0] else None
    dw = _in_format(_conv_weight_op(x, dy, list(w.shape), ctx.layer), x, w) if need[1] else None
    db = _bias_grad_op(dy, x.dim() < w.dim()) if ctx.has_bias and need[2] else None
    return dx, dw, db, None


def _conv_jvp(ctx, tx, tw, tb, _):  # d conv(x, w, b) = conv(dx, w) + conv(x, dw) + db
    x, w = ctx.saved_tensors
    channel_axis = 0 if x.dim() < w.dim() else 1
    terms = [_conv_op(tx, w, None, ctx.layer) if tx is not None else None,
             _conv_op(x, tw, None, ctx.layer) if tw is not None else None,
             tb.reshape([-1 if axis == channel_axis else 1 for axis in range(x.dim())]).expand(ctx.shape)
             if tb is not None else None]
    return _sum(terms)


def _keep_both(ctx, inputs, output):  # a gradient op keeps its two tensor arguments and its result's shape
    a, b, ctx.size, ctx.layer = inputs
    return a, b


def _conv_input_backward(ctx, ddx):  # <ddx, dx> = <F(ddx, w), dy>
    dy, w = ctx.saved_tensors
    need = ctx.needs_input_grad
    return (_conv_op(ddx, w, None, ctx.layer) if need[0] else None,
            _conv_weight_op(ddx, dy, list(w.shape), ctx.layer) if need[1] else None, None, None)


def _conv_input_jvp(ctx, tdy, tw, _, __):
    dy, w = ctx.saved_tensors
    return _sum([_conv_input_op(tdy, w, ctx.size, ctx.layer) if tdy is not None else None,
                 _conv_input_op(dy, tw, ctx.size, ctx.layer) if tw is not None else None])


def _conv_weight_backward(ctx, ddw):  # <ddw, dw> = <F(x, ddw), dy>
    x, dy = ctx.saved_tensors
    need = ctx.needs_input_grad
    return (_conv_input_op(dy, ddw, list(x.shape), ctx.layer) if need[0] else None,
            _conv_op(x, ddw, None, ctx.layer) if need[1] else None, None, None)


def _conv_weight_jvp(ctx, tx, tdy, _, __):
    x, dy = ctx.saved_tensors
    return _sum([_conv_weight_op(tx, dy, ctx.size, ctx.layer) if tx is not None else None,
                 _conv_weight_op(x, tdy, ctx.size, ctx.layer) if tdy is not None else None])


def _keep_shape(ctx, inputs, output):
    dy, ctx.unbatched = inputs
    ctx.shape = dy.shape
    return ()


def _bias_grad_backward(ctx, ddb):  # ddb broadcast over dy's batch and positions
    view = [1] * len(ctx.shape)
    view[0 if ctx.unbatched else 1] = -1
    return ddb.reshape(view).expand(ctx.shape), None


def _bias_grad_jvp(ctx, tdy, _):
    return _bias_grad_op(tdy, ctx.unbatched)


def _sum(terms):
    """The sum of the terms that are not None (a jvp's, one per argument with a tangent)."""
    terms = [t for t in terms if t is not None]
    return sum(terms[1:], terms[0])


# ---------------------------------------------------------------- torch.func transforms and forward-mode AD
#
# torch's autograd for custom ops (register_autograd) runs none of torch.func's transforms (grad, jacrev, ...
# raise) nor forward-mode AD (its tangents come back as None or zero). Under those, the ops run through
# autograd.Functions of their own instead, with the same backward formulas, the jvp formulas above and a vmap rule
# torch generates from the ops' own (below): a batch of problems is one problem of cnnfast's, its batch axis folded
# into N, or into the channels as groups where the weights differ (into the output channels alone where they share
# one input and groups == 1), as torch's own batching rule for convolution does.

def _dispatch(op, eager, keep, backward, jvp):
    """op as the formulas and the public functions call it: its Python function (eager) where nothing would see the
    op itself (_eager), the custom op, or under torch.func transforms and forward-mode AD an autograd.Function
    running it (with keep as its setup_context, the backward and jvp formulas)."""
    def save(ctx, inputs, output):  # keep returns the tensors the formulas need
        ctx.modes = _modes()
        ctx.save_for_backward(*keep(ctx, inputs, output))

    def save_both(ctx, inputs, output):  # for the backward formula and the jvp
        ctx.modes = _modes()
        tensors = keep(ctx, inputs, output)
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)

    def run_backward(ctx, *grads):
        with _modes_of(ctx):
            return backward(ctx, *grads)

    def forward(*args):
        return op(*(list(a) if isinstance(a, _Size) else a for a in args))

    op.register_autograd(run_backward, setup_context=save)
    function = type(op._name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(save_both),
        "backward": staticmethod(run_backward), "jvp": staticmethod(jvp), "generate_vmap_rule": True})

    apply = torch.compiler.disable(function.apply)  # torch.compile does not trace it: a graph break

    def call(*args):
        if _eager(args):
            return eager(*args)
        if torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
            return apply(*(_Size(a) if isinstance(a, list) else a for a in args))
        return op(*args)
    return call


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager(args):
    """Whether a call of an op on args may run as the op's Python function, skipping torch's dispatcher (~20 us a
    call alone, 60-130 us in a model at batch 1 on the 2-core VM: inference, and backward passes): where nothing
    would see the op itself, that is no gradient to record, no torch.func transform or forward-mode AD, no
    torch.compile, torch.jit.trace, dispatch or function mode (FakeTensorMode, FlopCounterMode, ...), no profiler,
    and every tensor a plain strided CPU or CUDA one (not a subclass, meta or sparse). (An ExecutionTraceObserver
    without the profiler, which nothing here can see, records such calls as the torch ops they make.)"""
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN or a.layout is not torch.strided
                                            or not (a.is_cpu or a.is_cuda) or (grad and a.requires_grad)):
            return False
    return not (torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0
                or torch.compiler.is_compiling() or torch._C._is_tracing() or torch._C._len_torch_dispatch_stack()
                or torch._C._is_torch_function_mode_enabled() or torch._C._autograd._profiler_enabled())


# Check mode and autotuning are set per thread (contextvars), but torch's autograd runs the backward pass of CUDA
# tensors on a thread of its own, where neither is set: a backward formula runs under the modes its forward op ran
# under, unless the thread running it set its own (on the CPU, the thread that called backward()).
_MODES = (compare._MODE, tune._MODE)


def _modes():
    """The check and autotune modes set now (None: not set; cnnfast.check's collecting list is not carried on)."""
    return tuple(mode if isinstance(mode, bool) else None for mode in (var.get() for var in _MODES))


@contextlib.contextmanager
def _modes_of(ctx):
    """Within the block, the modes ctx's forward op ran under, where this thread has not set its own."""
    tokens = [(var, var.set(mode)) for var, mode in zip(_MODES, ctx.modes) if mode is not None and var.get() is None]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class _Size(tuple):
    """A shape argument on its way through an autograd.Function: one leaf to torch.func's pytrees (a list's ints
    are leaves of their own, which vmap's rule for a jvp miscounts against the tangents)."""


_conv_op = _dispatch(_conv, _conv_eager, _keep_conv, _conv_backward, _conv_jvp)
_conv_input_op = _dispatch(_conv_input, _conv_input_eager, _keep_both, _conv_input_backward, _conv_input_jvp)
_conv_weight_op = _dispatch(_conv_weight, _conv_weight_eager, _keep_both, _conv_weight_backward, _conv_weight_jvp)
_bias_grad_op = _dispatch(_bias_grad, _bias_grad_eager, _keep_shape, _bias_grad_backward, _bias_grad_jvp)


def _regrouped(layer, times):
    """The layer with `times` as many groups (a batch of `times` problems side by side along the channels)."""
    name, options = _layer(layer)
    options = dict(options, groups=options["groups"] * times)
    return f"{name}:{_plain(tuple(options[key] for key in _OPTIONS[name.rstrip('123d')]))!r}"


def _front(t, dim, size):
    """t with its vmapped axis first (t repeated size times when it has none)."""
    return t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)


def _side_by_side(t, batched):
    """t (B, [N,] A, ...) as one problem with the B problems side by side along the channels: (N, B*A, ...), or
    (B*A, ...) when unbatched."""
    return t.movedim(0, 1).flatten(1, 2) if batched else t.flatten(0, 1)


def _shape(t, dim):
    """The shape of each problem's t: t's without its vmapped axis (None: no tensor)."""
    return None if t is None else tuple(t.shape) if dim is None else t.shape[:dim] + t.shape[dim + 1:]


def _check(layer, suffix, like, *shapes):
    """One problem of a vmapped batch checked as cnnfast checks a call, before the batch runs as one problem: the
    error names the user's arguments (not the merged problem's)."""
    name, options = _layer(layer)
    dtype = {torch.float32: "float32", torch.float64: "float64"}.get(like.dtype)
    api.explain(name + suffix, *shapes, device="cuda" if like.is_cuda else "cpu", dtype=dtype, **options)


# vmap rules: each gets (info, in_dims, *args), the tensors with their vmapped axes at in_dims (None: the same
# for every problem of the batch), and returns (result, the result's vmapped axis).

@_conv.register_vmap
def _(info, in_dims, x, w, b, layer):
    B, (bx, bw, bb, _) = info.batch_size, in_dims
    _check(layer, "", x, _shape(x, bx), _shape(w, bw), _shape(b, bb))
    batched = len(_shape(x, bx)) == len(_shape(w, bw))  # each problem's input has a batch axis N
    bias = None if bb is not None else b
    if bw is None and bx is None:  # only the bias differs
        y, out_dim = _front(_conv(x, w, None, layer), None, B), 0
    elif bw is None:  # one weight: the problems' samples as one batch
        x = x.movedim(bx, 0)
        y = _conv(x.flatten(0, 1) if batched else x, w, bias, layer)
        y, out_dim = (y.unflatten(0, (B, -1)) if batched else y), 0
    elif bx is None and _layer(layer)[1]["groups"] == 1:  # one input, B weights: their output channels side by side
        w = w.movedim(bw, 0)  # (B, K, C, *k), or a transposed layer's (B, C, K, *k) -> (C, B*K, *k)
        w = w.transpose(0, 1).flatten(1, 2) if layer.startswith("conv_transpose") else w.flatten(0, 1)
        y = _conv(x, w, None if bias is None else bias.repeat(B), layer)
        y, out_dim = y.unflatten(int(batched), (B, -1)), int(batched)
    else:  # B weights: the problems side by side as groups
        y = _conv(_side_by_side(_front(x, bx, B), batched), w.movedim(bw, 0).flatten(0, 1),
                  None if bias is None else bias.repeat(B), _regrouped(layer, B))
        y, out_dim = y.unflatten(1 if batched else 0, (B, -1)), 1 if batched else 0
    if bb is not None:  # each problem's bias along its channel axis (1 batched, 0 not; after the vmapped axis)
        view = [1] * y.dim()
        view[out_dim], view[1 + batched] = B, -1
        y = y + b.movedim(bb, 0).reshape(view)
    return y, out_dim


@_conv_input.register_vmap
def _(info, in_dims, dy, w, x_shape, layer):
    B, (bdy, bw, _, _) = info.batch_size, in_dims
    _check(layer, "_input", dy, tuple(x_shape), _shape(w, bw), _shape(dy, bdy))
    batched = len(x_shape) == len(_shape(w, bw))
    if bw is None:  # one weight: the problems' samples as one batch
        dy = dy.movedim(bdy, 0)
        if not batched:
            return _conv_input(dy, w, [B, *x_shape], layer), 0
        return _conv_input(dy.flatten(0, 1), w, [B * x_shape[0], *x_shape[1:]], layer).unflatten(0, (B, -1)), 0
    channel = 1 if batched else 0
    size = list(x_shape)
    size[channel] *= B
    dx = _conv_input(_side_by_side(_front(dy, bdy, B), batched), w.movedim(bw, 0).flatten(0, 1), size,
                     _regrouped(layer, B))
    return dx.unflatten(channel, (B, -1)), channel


@_conv_weight.register_vmap
def _(info, in_dims, x, dy, w_shape, layer):
    B, (bx, bdy, _, _) = info.batch_size, in_dims
    _check(layer, "_weight", x, _shape(x, bx), tuple(w_shape), _shape(dy, bdy))
    batched = len(_shape(x, bx)) == len(w_shape)
    dw = _conv_weight(_side_by_side(_front(x, bx, B), batched), _side_by_side(_front(dy, bdy, B), batched),
                      [B * w_shape[0], *w_shape[1:]], _regrouped(layer, B))
    return dw.unflatten(0, (B, -1)), 0


@_bias_grad.register_vmap
def _(info, in_dims, dy, unbatched):
    B = info.batch_size
    return _bias_grad(_side_by_side(dy.movedim(in_dims[0], 0), not unbatched), unbatched).unflatten(0, (B, -1)), 0
