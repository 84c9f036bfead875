"""PyTorch adapter: cnnfast's kernels behind torch tensors, with autograd (torch is optional; import this module
only when you have it).

    import cnnfast.torch as cf
    y = cf.conv2d(x, w, b, stride=2, padding=1)      # torch.nn.functional.conv2d's signature; differentiable
    conv = cf.Conv2d(3, 16, 3, padding=1)            # torch.nn.Conv2d's constructor, parameters and state_dict
    model = cf.replace_convs(model)                  # every torch.nn conv module of a model -> its cnnfast twin

Forward and both backward passes run cnnfast's own kernels: the forward op, grad.conv*_input (backward-data),
grad.conv*_weight (backward-filter) and grad.conv_bias. CPU tensors reach the CPU kernels as NumPy views (no
copy; a result comes back with torch.from_numpy); CUDA tensors reach the CUDA kernels through
__cuda_array_interface__ on torch's current stream and come back as torch tensors on the same device, without
copies. The gradients are cnnfast ops that are differentiable in turn: gradients of gradients (a Hessian, a
gradient penalty, torch.autograd.gradgradcheck) run cnnfast's kernels too, to any order. torch.func.grad works;
vmap and forward-mode AD do not (torch would need a batching rule and a jvp for the kernels).
"""
from __future__ import annotations

import numpy as np
import torch

from cnnfast import api, grad

__all__ = ["conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
           "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "replace_convs"]


# ---------------------------------------------------------------- tensors <-> cnnfast arrays

def _array(t, op, name):
    """A torch tensor as an array cnnfast takes: a NumPy view (CPU) or the tensor itself (CUDA, via its
    __cuda_array_interface__; made contiguous by torch first, by its own copy on the device: autograd's gradients
    are often strided, such as the expanded ones of y.sum().backward(), and without CuPy cnnfast's own copy is a
    Numba launch, through the host for a negative stride); None (no bias) and shapes pass as they are."""
    if (t is None and name == "bias") or name.endswith("_size"):  # no bias; a shape
        return t
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: expected {name} to be a torch.Tensor, but got {type(t).__name__}")
    t = t.detach()
    if t.is_cuda:
        return t.contiguous()
    if t.device.type != "cpu":
        raise TypeError(f"{op}: expected {name} on a CPU or CUDA device, but got a tensor on {t.device}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: expected {name} to have dtype float32 or float64, but got {t.dtype}")
    return t.resolve_conj().resolve_neg().numpy()


def _tensor(a, like):
    """cnnfast's result as a torch tensor on like's device (no copy)."""
    if isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    return torch.as_tensor(a, device=like.device)


def _stream(t):
    """torch's current stream for a CUDA tensor, as the Numba stream cnnfast launches on; None on the CPU."""
    if not (isinstance(t, torch.Tensor) and t.is_cuda):
        return None
    from numba import cuda
    handle = torch.cuda.current_stream(t.device).cuda_stream
    return cuda.external_stream(handle) if handle else 0


# ---------------------------------------------------------------- autograd

class _Layer:
    """One layer's op name (conv{nd}d or conv_transpose{nd}d) and keyword options (output_size resolved)."""

    # the op (its name + suffix) -> the module that has it and its positional arguments, named for the errors
    OPS = {"": (api, ("input", "weight", "bias")), "_input": (grad, ("input_size", "weight", "grad_output")),
           "_weight": (grad, ("input", "weight_size", "grad_output"))}

    def __init__(self, nd, transposed, options):
        self.name, self.options = f"conv_transpose{nd}d" if transposed else f"conv{nd}d", options

    def run(self, suffix, *args, like):
        """cnnfast's op name + suffix on torch tensors (and shapes), on like's stream; its result as a tensor."""
        module, roles = self.OPS[suffix]
        name = self.name + suffix
        arrays = [_array(a, name, role) for a, role in zip(args, roles)]
        return _tensor(getattr(module, name)(*arrays, stream=_stream(like), **self.options), like)


class _Conv(torch.autograd.Function):
    """y = F(x, w) + b, F the layer's conv or conv_transpose, on cnnfast's kernels. dx, dw and db are _ConvInput,
    _ConvWeight and _BiasGrad: cnnfast's backward-data, backward-filter and bias-gradient ops, differentiable in
    turn (F, dx and dw are the partial derivatives of one trilinear form <F(x, w), dy>, so each one's derivatives
    are the others), hence gradients of gradients (a Hessian, a gradient penalty) to any order."""

    @staticmethod
    def forward(x, w, b, layer):
        return layer.run("", x, w, b, like=x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, ctx.layer = inputs
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx = _ConvInput.apply(dy, w, ctx.layer, tuple(x.shape)) if need[0] else None
        dw = _ConvWeight.apply(x, dy, ctx.layer, tuple(w.shape)) if need[1] else None
        db = _BiasGrad.apply(dy, x.dim() < w.dim()) if ctx.has_bias and need[2] else None
        return dx, dw, db, None


class _Gradient(torch.autograd.Function):
    """A gradient op of the layer, linear in each of its two tensor arguments, which it keeps for its derivatives."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b, ctx.layer, _ = inputs
        ctx.save_for_backward(a, b)


class _ConvInput(_Gradient):
    """dx = the layer's input gradient of dy through w (cnnfast.grad's *_input)."""

    @staticmethod
    def forward(dy, w, layer, x_shape):
        return layer.run("_input", x_shape, w, dy, like=dy)

    @staticmethod
    def backward(ctx, ddx):  # <ddx, dx> = <F(ddx, w), dy>
        dy, w = ctx.saved_tensors
        d_dy = _Conv.apply(ddx, w, None, ctx.layer) if ctx.needs_input_grad[0] else None
        d_w = _ConvWeight.apply(ddx, dy, ctx.layer, tuple(w.shape)) if ctx.needs_input_grad[1] else None
        return d_dy, d_w, None, None


class _ConvWeight(_Gradient):
    """dw = the layer's weight gradient of x and dy (cnnfast.grad's *_weight)."""

    @staticmethod
    def forward(x, dy, layer, w_shape):
        return layer.run("_weight", x, w_shape, dy, like=dy)

    @staticmethod
    def backward(ctx, ddw):  # <ddw, dw> = <F(x, ddw), dy>
        x, dy = ctx.saved_tensors
        d_x = _ConvInput.apply(dy, ddw, ctx.layer, tuple(x.shape)) if ctx.needs_input_grad[0] else None
        d_dy = _Conv.apply(x, ddw, None, ctx.layer) if ctx.needs_input_grad[1] else None
        return d_x, d_dy, None, None


class _BiasGrad(torch.autograd.Function):
    """db = dy summed over all but its channel axis (cnnfast.grad.conv_bias; an unbatched dy as a batch of one)."""

    @staticmethod
    def forward(dy, unbatched):
        return _tensor(grad.conv_bias(_array(dy[None] if unbatched else dy, "conv_bias", "grad_output"),
                                      stream=_stream(dy)), dy)

    @staticmethod
    def setup_context(ctx, inputs, output):
        dy, ctx.unbatched = inputs
        ctx.shape = dy.shape

    @staticmethod
    def backward(ctx, ddb):  # ddb broadcast over dy's batch and positions
        channel_axis = 0 if ctx.unbatched else 1
        view = [1] * len(ctx.shape)
        view[channel_axis] = -1
        return ddb.reshape(view).expand(ctx.shape), None


def _autocast(*tensors):
    """Under torch.autocast the kernels take float32, as torch.amp.custom_fwd(cast_inputs=torch.float32) gives an op
    without a low-precision path: float16 and bfloat16 tensors are cast up (differentiably); others pass as they are."""
    device = next((t.device.type for t in tensors if isinstance(t, torch.Tensor)), None)
    if device is None or not torch.is_autocast_enabled(device):
        return tensors
    return [t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t
            for t in tensors]


def _conv_fn(nd):
    def conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, padding_mode="zeros",
             algo="auto"):
        return _Conv.apply(*_autocast(input, weight, bias), _Layer(nd, False, dict(
            stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode, algo=algo)))

    conv.__name__ = conv.__qualname__ = f"conv{nd}d"
    conv.__doc__ = (f"torch.nn.functional.conv{nd}d on cnnfast's kernels (differentiable); also padding_mode and "
                    f"algo as in cnnfast.conv{nd}d.")
    return conv


def _conv_transpose_fn(nd):
    def conv_transpose(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                       output_size=None, algo="auto"):
        options = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups,
                       dilation=dilation)
        if output_size is not None:  # resolve it to output_padding once, so the backward ops get the same layer
            spec = api.explain(f"conv_transpose{nd}d", tuple(input.shape), tuple(weight.shape),
                               output_size=output_size, **options).spec
            options["output_padding"] = spec.output_padding
        return _Conv.apply(*_autocast(input, weight, bias), _Layer(nd, True, dict(options, algo=algo)))

    conv_transpose.__name__ = conv_transpose.__qualname__ = f"conv_transpose{nd}d"
    conv_transpose.__doc__ = (f"torch.nn.functional.conv_transpose{nd}d on cnnfast's kernels (differentiable); "
                              f"also output_size and algo as in cnnfast.conv_transpose{nd}d.")
    return conv_transpose


conv1d, conv2d, conv3d = (_conv_fn(nd) for nd in (1, 2, 3))
conv_transpose1d, conv_transpose2d, conv_transpose3d = (_conv_transpose_fn(nd) for nd in (1, 2, 3))


# ---------------------------------------------------------------- modules

class _CnnfastConv:
    """Mixin for the torch.nn conv modules: same constructor, parameters, buffers and state_dict; forward runs
    cnnfast. `algo` (class default "auto") may be set per module."""

    algo = "auto"

    def forward(self, input):
        nd = len(self.kernel_size)
        return _conv_fn_of[nd](input, self.weight, self.bias, self.stride, self.padding, self.dilation,
                               self.groups, padding_mode=self.padding_mode, algo=self.algo)


class _CnnfastConvTranspose:
    algo = "auto"

    def forward(self, input, output_size=None):
        nd = len(self.kernel_size)
        if self.padding_mode != "zeros":
            raise ValueError(f"Only 'zeros' padding mode is supported for {type(self).__name__}")
        return _conv_transpose_fn_of[nd](input, self.weight, self.bias, self.stride, self.padding,
                                         self.output_padding, self.groups, self.dilation,
                                         output_size=output_size, algo=self.algo)


_conv_fn_of = {1: conv1d, 2: conv2d, 3: conv3d}
_conv_transpose_fn_of = {1: conv_transpose1d, 2: conv_transpose2d, 3: conv_transpose3d}


def _twin_class(base, mixin):
    cls = type(base.__name__, (mixin, base), {
        "__module__": __name__,
        "__doc__": f"torch.nn.{base.__name__} running on cnnfast's kernels (same constructor and state_dict).",
    })
    return cls


Conv1d, Conv2d, Conv3d = (_twin_class(b, _CnnfastConv) for b in (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))
ConvTranspose1d, ConvTranspose2d, ConvTranspose3d = (
    _twin_class(b, _CnnfastConvTranspose)
    for b in (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d))
_TWINS = {torch.nn.Conv1d: Conv1d, torch.nn.Conv2d: Conv2d, torch.nn.Conv3d: Conv3d,
          torch.nn.ConvTranspose1d: ConvTranspose1d, torch.nn.ConvTranspose2d: ConvTranspose2d,
          torch.nn.ConvTranspose3d: ConvTranspose3d}


def _twin(module, algo):
    cls = _TWINS[type(module)]
    twin = cls.__new__(cls)
    twin.__dict__.update(module.__dict__)  # the same Parameter objects, buffers, hooks and options: nothing copied
    if algo != "auto":
        twin.algo = algo
    return twin


def replace_convs(model, *, algo="auto", _twins=None):
    """Swap every torch.nn.Conv{1,2,3}d / ConvTranspose{1,2,3}d in model (exactly those classes; subclasses with
    their own forward are left alone) for its cnnfast twin, keeping the same parameters (a conv registered under
    two names gets one twin); returns the model (or the twin, when model itself is such a conv)."""
    twins = {} if _twins is None else _twins  # id(conv) -> its twin
    if type(model) in _TWINS:
        if id(model) not in twins:
            twins[id(model)] = _twin(model, algo)
        return twins[id(model)]
    for name, child in model.named_children():
        replaced = replace_convs(child, algo=algo, _twins=twins)
        if replaced is not child:
            setattr(model, name, replaced)
    return model
