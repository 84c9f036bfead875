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
copies. Gradients are first order (a second backward raises, as for any once-differentiable function).
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
    Numba launch, through the host for a negative stride); anything else is passed on for cnnfast's own checks to
    reject by name."""
    if not isinstance(t, torch.Tensor):
        return t
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

class _Conv(torch.autograd.Function):
    """y = conv{nd}d or conv_transpose{nd}d(x, w, b): forward, backward-data, backward-filter and the bias
    gradient are all cnnfast ops; options are the op's keyword arguments (output_size already resolved)."""

    @staticmethod
    def forward(ctx, x, w, b, nd, transposed, options):
        name = f"conv_transpose{nd}d" if transposed else f"conv{nd}d"
        stream = _stream(x)
        y = getattr(api, name)(_array(x, name, "input"), _array(w, name, "weight"), _array(b, name, "bias"),
                               stream=stream, **options)
        ctx.save_for_backward(x, w)
        ctx.name, ctx.has_bias, ctx.options = name, b is not None, options
        return _tensor(y, x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        options = ctx.options
        stream, g = _stream(dy), _array(dy, ctx.name, "grad_output")
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _tensor(getattr(grad, ctx.name + "_input")(tuple(x.shape), _array(w, ctx.name, "weight"), g,
                                                            stream=stream, **options), dy)
        if ctx.needs_input_grad[1]:
            dw = _tensor(getattr(grad, ctx.name + "_weight")(_array(x, ctx.name, "input"), tuple(w.shape), g,
                                                             stream=stream, **options), dy)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = _tensor(grad.conv_bias(g if x.dim() == w.dim() else g[None], stream=stream), dy)  # unbatched: N=1
        return dx, dw, db, None, None, None


def _conv_fn(nd):
    def conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, padding_mode="zeros",
             algo="auto"):
        return _Conv.apply(input, weight, bias, nd, False,
                           dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                                padding_mode=padding_mode, algo=algo))

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
        return _Conv.apply(input, weight, bias, nd, True, dict(options, algo=algo))

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


def replace_convs(model, *, algo="auto"):
    """Swap every torch.nn.Conv{1,2,3}d / ConvTranspose{1,2,3}d in model (exactly those classes; subclasses with
    their own forward are left alone) for its cnnfast twin, keeping the same parameters; returns the model (or
    the twin, when model itself is such a conv)."""
    if type(model) in _TWINS:
        return _twin(model, algo)
    for name, child in model.named_children():
        replaced = replace_convs(child, algo=algo)
        if replaced is not child:
            setattr(model, name, replaced)
    return model
