"""PyTorch adapter: cnnfast's kernels behind torch tensors, with autograd (torch is optional; import this module
only when you have it).

    import cnnfast.torch as cf
    y = cf.conv2d(x, w, b, stride=2, padding=1)      # torch.nn.functional.conv2d's signature; differentiable
    conv = cf.Conv2d(3, 16, 3, padding=1)            # torch.nn.Conv2d's constructor, parameters and state_dict
    model = cf.replace_convs(model)                  # every torch.nn conv module of a model -> its cnnfast twin

Forward and both backward passes run cnnfast's own kernels: the forward op, grad.conv*_input (backward-data),
grad.conv*_weight (backward-filter) and grad.conv_bias. CPU tensors reach the CPU kernels as NumPy views (a result
comes back with torch.from_numpy); CUDA tensors reach the CUDA kernels as views of their memory on torch's current
stream and come back as torch tensors on the same device, in torch's memory (its caching allocator); a contiguous
tensor is not copied (a strided one is made contiguous first). Each call is a torch.library custom op (torch.compile
and torch.export see one op, no graph break; under torch.func's transforms and forward-mode AD an autograd.Function,
a graph break there; where nothing would see the op, as in inference, the op's Python function, without torch's
dispatcher); the gradients are custom ops differentiable in turn: gradients of gradients (a Hessian, a gradient
penalty, torch.autograd.gradgradcheck) run cnnfast's kernels too, to any order, and so do torch.func's transforms
(grad, vmap, jvp, jacrev, jacfwd, hessian: per-sample gradients, model ensembles) and forward-mode AD: vmap runs a
batch of problems as one (the batch axis folded into N, or into the channels as groups where the weights differ).
This module holds the public functions and modules; the ops, their derivatives and vmap rules are in
cnnfast/_torch_ops.py.
"""
from __future__ import annotations

import operator

try:
    import torch
except ImportError as e:
    raise ImportError(f"cnnfast.torch needs PyTorch, which is not installed here ({e}): pip install torch, or "
                      f"cnnfast's 'torch' extra (pip install -e '.[torch]')") from e

if not hasattr(torch.library, "custom_op"):
    raise ImportError(f"cnnfast.torch needs torch >= 2.4 (torch.library.custom_op); this is torch {torch.__version__}")

from cnnfast import api
from cnnfast._torch_ops import _conv_op, _plain
from cnnfast.spec import ConvSpec

__all__ = ["conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
           "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "replace_convs"]


# ---------------------------------------------------------------- the public functions

def _tensors(op, **given):
    """TypeError naming the argument when a required one (or a bias given) is not a tensor (or torch.fx's Proxy of
    one: torch.fx.symbolic_trace records each call as one _conv_call node)."""
    for name, t in given.items():
        if not (isinstance(t, (torch.Tensor, torch.fx.Proxy)) or (t is None and name == "bias")):
            raise TypeError(f"{op}: expected {name} to be a torch.Tensor, but got {type(t).__name__}")


_LOW = (torch.float16, torch.bfloat16)
# Whether autocast is on for any device (torch >= 2.4's C function; else always yes): the calls below cost ~25 us of a
# conv's time inside a model at batch 1, where each torch function's first call after a large tensor op runs cold.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast(*tensors):
    """Under torch.autocast the kernels take float32, as torch.amp.custom_fwd(cast_inputs=torch.float32) gives an op
    without a low-precision path: float16 and bfloat16 tensors are cast up (differentiably); others pass as they are.
    (Not on devices autocast does not know, such as meta.)"""
    if not torch.compiler.is_compiling() and not _any_autocast():  # (one C call, where torch.compile does not trace)
        return tensors
    device = next((t.device.type for t in tensors if isinstance(t, torch.Tensor)), None)
    if (device is None or not getattr(torch.amp, "is_autocast_available", lambda d: True)(device)
            or not torch.is_autocast_enabled(device)):
        return tensors
    return [t.float() if isinstance(t, torch.Tensor) and t.dtype in _LOW else t for t in tensors]


def _conv_call(x, w, b, layer):
    """The public functions' call of the forward op (autocast's float32, then _conv_op), a leaf of torch.fx's traces
    (torch.fx.wrap below): a traced model calls it as the model did, under any transform or autocast. Outside
    autocast, float16 or bfloat16 tensors (all of one dtype, as torch requires) run the float32 kernels and the result
    is rounded back to their dtype, as torch's CPU convolutions return them (module.half(), model.bfloat16())."""
    x, w, b = _autocast(x, w, b)
    low = isinstance(x, torch.Tensor) and x.dtype in _LOW and all(t is None or t.dtype == x.dtype for t in (w, b))
    if not low:
        return _conv_op(x, w, b, layer)
    return _conv_op(x.float(), w.float(), None if b is None else b.float(), layer).to(x.dtype)


torch.fx.wrap("_conv_call")


def _conv_fn(nd):
    def conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, padding_mode="zeros",
             algo="auto"):
        _tensors(f"conv{nd}d", input=input, weight=weight, bias=bias)
        layer = f"conv{nd}d:{_plain((stride, padding, dilation, groups, padding_mode, algo))!r}"
        return _conv_call(input, weight, bias, layer)

    conv.__name__ = conv.__qualname__ = f"conv{nd}d"
    conv.__doc__ = (f"torch.nn.functional.conv{nd}d on cnnfast's kernels (differentiable); also padding_mode and "
                    f"algo as in cnnfast.conv{nd}d.")
    return conv


def _conv_transpose_fn(nd):
    def conv_transpose(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                       output_size=None, algo="auto"):
        _tensors(f"conv_transpose{nd}d", input=input, weight=weight, bias=bias)
        options = (stride, padding, output_padding, groups, dilation, algo)
        if output_size is not None:
            return _conv_transpose_sized(input, weight, bias, nd, options, output_size)
        return _conv_call(input, weight, bias, f"conv_transpose{nd}d:{_plain(options)!r}")

    conv_transpose.__name__ = conv_transpose.__qualname__ = f"conv_transpose{nd}d"
    conv_transpose.__doc__ = (f"torch.nn.functional.conv_transpose{nd}d on cnnfast's kernels (differentiable); "
                              f"also output_size and algo as in cnnfast.conv_transpose{nd}d.")
    return conv_transpose


def _ints(sizes):
    """Sizes as Python ints: torch.jit.trace's tensors and torch.compile's symbolic sizes included, specialised
    (torch.compile makes a constant of operator.index(size), not of int(size), nor of a size tested by isinstance or
    drawn by iterating)."""
    return [operator.index(sizes[i]) for i in range(len(sizes))]


def _conv_transpose_sized(input, weight, bias, nd, options, output_size):
    """A transposed convolution given output_size, resolved here to output_padding (so that the backward ops get the
    same layer) from the spatial sizes as ints: the batch may stay symbolic (torch.export's dynamic batch) and the
    layer's string is a constant. A leaf of torch.fx's traces (torch.fx.wrap below), where output_size may be a
    Proxy (skip.shape[-2:])."""
    stride, padding, output_padding, groups, dilation, algo = options
    op = f"conv_transpose{nd}d"
    if input.dim() not in (nd + 1, nd + 2) or weight.dim() != nd + 2:
        api.explain(op, tuple(input.shape), tuple(weight.shape))  # raises the op's own error
    shape = (1, weight.shape[0], *input.shape[-nd:])  # any batch; the weight's channels (a mismatch: the op's error)
    try:
        output_size = _ints(output_size)
    except (TypeError, LookupError):  # not a sequence of ints: ConvSpec names it
        pass
    output_padding, error = _output_padding(op, tuple(_ints(shape)), tuple(_ints(weight.shape)), stride, padding,
                                            output_padding, groups, dilation, output_size, input.dim() == nd + 1)
    if error is not None:
        raise _ERRORS[error](output_padding)
    layer = f"{op}:{_plain((stride, padding, output_padding, groups, dilation, algo))!r}"
    return _conv_call(input, weight, bias, layer)


torch.fx.wrap("_conv_transpose_sized")
_ERRORS = {"ValueError": ValueError, "TypeError": TypeError}


@torch.compiler.assume_constant_result  # torch.compile runs it while tracing, on ints: a constant (fullgraph)
def _output_padding(op, input_shape, weight_shape, stride, padding, output_padding, groups, dilation, output_size,
                    unbatched):
    """(output_padding, None), or (the message, 'ValueError' or 'TypeError') for the caller to raise: raised in here,
    while torch.compile traces, it would reach the user as torch's InternalTorchDynamoError."""
    try:
        return ConvSpec.create(op, input_shape, weight_shape, stride=stride, padding=padding, dilation=dilation,
                               groups=groups, transposed=True, output_padding=output_padding,
                               output_size=output_size, unbatched=unbatched).output_padding, None
    except (ValueError, TypeError) as e:
        return str(e), type(e).__name__


conv1d, conv2d, conv3d = (_conv_fn(nd) for nd in (1, 2, 3))
conv_transpose1d, conv_transpose2d, conv_transpose3d = (_conv_transpose_fn(nd) for nd in (1, 2, 3))


# ---------------------------------------------------------------- modules

def _not_scriptable(module):
    raise TypeError(f"torch.jit.script: cnnfast.torch.{type(module).__name__} runs cnnfast's Python kernels, which "
                    f"TorchScript cannot compile; use torch.jit.trace, torch.compile or torch.export (or "
                    f"torch.nn.{_torch_base(module).__name__} for a scripted model)")


def _torch_base(module):
    """torch.nn's conv class that module's twin class (parametrized or not) stands for."""
    from torch.nn.utils import parametrize
    base = parametrize.type_before_parametrizations(module)
    return next(b for b in base.__mro__ if b in _TWINS)


class _CnnfastConv:
    """Mixin for the torch.nn conv modules: same constructor, parameters, buffers and state_dict; forward runs
    cnnfast. `algo` (class default "auto") may be set per module."""

    algo = "auto"
    __prepare_scriptable__ = _not_scriptable  # torch.jit.script asks every module for it first: a clear error

    def forward(self, input):
        nd = len(self.kernel_size)
        weight, bias = self.weight, self.bias  # (once: a parametrized weight is computed at each access)
        _tensors(f"conv{nd}d", input=input, weight=weight, bias=bias)
        options = (self.stride, self.padding, self.dilation, self.groups, self.padding_mode, self.algo)
        return _conv_call(input, weight, bias, _module_layer(self, f"conv{nd}d", options))


class _CnnfastConvTranspose:
    algo = "auto"
    __prepare_scriptable__ = _not_scriptable

    def forward(self, input, output_size=None):
        nd = len(self.kernel_size)
        if self.padding_mode != "zeros":
            raise ValueError(f"Only 'zeros' padding mode is supported for {type(self).__name__}")
        if output_size is not None:
            return _conv_transpose_fn_of[nd](input, self.weight, self.bias, self.stride, self.padding,
                                             self.output_padding, self.groups, self.dilation,
                                             output_size=output_size, algo=self.algo)
        weight, bias = self.weight, self.bias
        _tensors(f"conv_transpose{nd}d", input=input, weight=weight, bias=bias)
        options = (self.stride, self.padding, self.output_padding, self.groups, self.dilation, self.algo)
        return _conv_call(input, weight, bias, _module_layer(self, f"conv_transpose{nd}d", options))


def _module_layer(module, op, options):
    """f"{op}:{_plain(options)!r}", the layer string of a module's call (its options: the same values as conv{nd}d's
    arguments), remembered in the module while its options are the same objects, where they are immutable (ints,
    strings, tuples of them: a list or a tensor could change in place): ~3.5 us a call of Python, ~10 us inside a
    model at batch 1, where Python between kernels runs slower. Not while torch.compile traces (no side effects
    there)."""
    if torch.compiler.is_compiling():
        return f"{op}:{_plain(options)!r}"
    known = module.__dict__.get("_cnnfast_layer")
    if known is not None and len(known[0]) == len(options) and all(map(operator.is_, known[0], options)):
        return known[1]
    layer = f"{op}:{_plain(options)!r}"
    if _immutable(options):
        module.__dict__["_cnnfast_layer"] = options, layer
    return layer


def _immutable(value):
    return type(value) in (int, bool, float, str, type(None)) or type(value) is tuple and all(map(_immutable, value))


_conv_transpose_fn_of = {1: conv_transpose1d, 2: conv_transpose2d, 3: conv_transpose3d}


def _new_twin_class(base, mixin):
    cls = type(base.__name__, (mixin, base), {
        "__module__": __name__,
        "__doc__": f"torch.nn.{base.__name__} running on cnnfast's kernels (same constructor and state_dict).",
    })
    return cls


Conv1d, Conv2d, Conv3d = (_new_twin_class(b, _CnnfastConv) for b in (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))
ConvTranspose1d, ConvTranspose2d, ConvTranspose3d = (
    _new_twin_class(b, _CnnfastConvTranspose)
    for b in (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d))
_TWINS = {torch.nn.Conv1d: Conv1d, torch.nn.Conv2d: Conv2d, torch.nn.Conv3d: Conv3d,
          torch.nn.ConvTranspose1d: ConvTranspose1d, torch.nn.ConvTranspose2d: ConvTranspose2d,
          torch.nn.ConvTranspose3d: ConvTranspose3d}


def _twin_class(module):
    """The cnnfast twin class for module's class, or None: torch.nn's conv classes exactly (a user's subclass is left
    alone), also parametrized (torch.nn.utils.parametrize gives the module a class of its own, whose properties the
    twin's class keeps: weight_norm, spectral_norm, ...)."""
    from torch.nn.utils import parametrize
    base = parametrize.type_before_parametrizations(module)
    twin = _TWINS.get(base)
    if twin is None or type(module) is base:
        return twin
    made = type(module)  # torch's Parametrized<Conv> class
    return type(made.__name__, (twin,), {k: v for k, v in vars(made).items() if k not in ("__dict__", "__weakref__")})


def _twin(module, cls, algo):
    twin = cls.__new__(cls)
    twin.__dict__.update(module.__dict__)  # the same Parameter objects, buffers, hooks and options: nothing copied
    if algo != "auto":
        twin.algo = algo
    return twin


def replace_convs(model, *, algo="auto", _twins=None):
    """Swap every torch.nn.Conv{1,2,3}d / ConvTranspose{1,2,3}d in model (exactly those classes, parametrized or
    not; a user's subclass is left alone) for its cnnfast twin, keeping the same parameters (a conv registered
    under several names gets one twin); returns the model (or the twin, when model itself is such a conv). A lazy
    conv (torch.nn.LazyConv2d, ...) becomes the twin when it is first run. The twin shares the original's
    parameter, buffer and hook containers: use the returned model, not the original module."""
    twins = {} if _twins is None else _twins  # id(conv) -> its twin
    cls = _twin_class(model)
    if cls is not None:
        if id(model) not in twins:
            twins[id(model)] = _twin(model, cls, algo)
        return twins[id(model)]
    if isinstance(model, torch.nn.modules.lazy.LazyModuleMixin) and getattr(model, "cls_to_become", None) in _TWINS:
        model.cls_to_become = _TWINS[model.cls_to_become]
        if algo != "auto":
            model.algo = algo
        return model
    for name, child in list(model._modules.items()):  # (each name, a module registered twice included)
        if child is not None:
            replaced = replace_convs(child, algo=algo, _twins=twins)
            if replaced is not child:
                model._modules[name] = replaced
    return model
