"""Gradients of the convolutions, as torch.nn.grad (plus the transposed ones and the bias gradient).

    conv{n}d_input(input_size, weight, grad_output, ...)     d<conv(x, w), dy>/dx, shape input_size
    conv{n}d_weight(input, weight_size, grad_output, ...)    d<conv(x, w), dy>/dw, shape weight_size
    conv_transpose{n}d_input / _weight                        the same for conv_transpose{n}d
    conv_bias(grad_output)                                    sum of dy over every axis but 1

The conv gradients take padding_mode (gradients of reflect/replicate/circular padding fold back into the
input); every argument is validated as in the forward op, and grad_output must have the forward's output shape.
"""
from __future__ import annotations

import numpy as np

from cnnfast import arrays, compare, reference
from cnnfast.api import run


def _conv_grad(nd, side):
    op = f"conv{nd}d_{side}"

    def conv_input(input_size, weight, grad_output, stride=1, padding=0, dilation=1, groups=1, *,
                   padding_mode="zeros", algo="auto", workspace_limit=None, stream=None):
        return run(op, "conv_input", nd, weight=weight, grad_output=grad_output, size=input_size, stride=stride,
                   padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode, algo=algo,
                   workspace_limit=workspace_limit, stream=stream)

    def conv_weight(input, weight_size, grad_output, stride=1, padding=0, dilation=1, groups=1, *,
                    padding_mode="zeros", algo="auto", workspace_limit=None, stream=None):
        return run(op, "conv_weight", nd, input=input, grad_output=grad_output, size=weight_size, stride=stride,
                   padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode, algo=algo,
                   workspace_limit=workspace_limit, stream=stream)

    return _named(conv_input if side == "input" else conv_weight, op, nd, side, transposed=False)


def _conv_transpose_grad(nd, side):
    op = f"conv_transpose{nd}d_{side}"

    def conv_transpose_input(input_size, weight, grad_output, stride=1, padding=0, output_padding=0, groups=1,
                             dilation=1, *, algo="auto", workspace_limit=None, stream=None):
        return run(op, "conv_transpose_input", nd, weight=weight, grad_output=grad_output, size=input_size,
                   stride=stride, padding=padding, output_padding=output_padding, groups=groups, dilation=dilation,
                   algo=algo, workspace_limit=workspace_limit, stream=stream)

    def conv_transpose_weight(input, weight_size, grad_output, stride=1, padding=0, output_padding=0, groups=1,
                              dilation=1, *, algo="auto", workspace_limit=None, stream=None):
        return run(op, "conv_transpose_weight", nd, input=input, grad_output=grad_output, size=weight_size,
                   stride=stride, padding=padding, output_padding=output_padding, groups=groups, dilation=dilation,
                   algo=algo, workspace_limit=workspace_limit, stream=stream)

    return _named(conv_transpose_input if side == "input" else conv_transpose_weight, op, nd, side, transposed=True)


def _named(fn, name, nd, side, transposed):
    fn.__name__ = fn.__qualname__ = name
    forward = f"conv_transpose{nd}d" if transposed else f"conv{nd}d"
    if side == "input":
        fn.__doc__ = (f"Gradient of cnnfast.{forward} w.r.t. its input: {name}(input_size, weight, grad_output, "
                      f"...) -> array of shape input_size (same options as {forward}).")
    else:
        fn.__doc__ = (f"Gradient of cnnfast.{forward} w.r.t. its weight: {name}(input, weight_size, grad_output, "
                      f"...) -> array of shape weight_size (same options as {forward}).")
    return fn


conv1d_input, conv2d_input, conv3d_input = (_conv_grad(nd, "input") for nd in (1, 2, 3))
conv1d_weight, conv2d_weight, conv3d_weight = (_conv_grad(nd, "weight") for nd in (1, 2, 3))
conv_transpose1d_input, conv_transpose2d_input, conv_transpose3d_input = (
    _conv_transpose_grad(nd, "input") for nd in (1, 2, 3))
conv_transpose1d_weight, conv_transpose2d_weight, conv_transpose3d_weight = (
    _conv_transpose_grad(nd, "weight") for nd in (1, 2, 3))


def conv_bias(grad_output, *, stream=None):
    """Gradient w.r.t. the bias of any conv or conv_transpose: grad_output (N, K, *L) summed to (K,)."""
    op = "conv_bias"
    device, family, dtype, shapes = arrays.inspect(op, grad_output=grad_output)
    shape = shapes["grad_output"]
    if len(shape) not in (3, 4, 5):
        raise ValueError(f"{op}: expected a batched grad_output (N, K, *L) with 1 to 3 spatial dimensions, "
                         f"but got grad_output of size {list(shape)}")
    with arrays.on_their_gpu(device, op, grad_output=grad_output):
        dev = arrays.device_for(device, family, stream, op, grad_output)
        if 0 in shape:
            db = dev.zeros(shape[1:2], dtype)
        else:
            dy = dev.working(grad_output)
            spatial = 1
            for s in shape[2:]:
                spatial *= s
            db = dev.empty(shape[1:2], dtype)
            dev.bias_grad(dev.view(dy, shape[:2] + (1, 1, spatial)), db)
        if compare.active():
            dev.synchronize()  # (the host copies may run on another stream than the op's)
            host = arrays.to_host(grad_output)
            compare.verify(op, "bias_grad", device, arrays.to_host(db), reference.conv_bias(host), dtype,
                           terms=lambda: reference.conv_bias(np.abs(host)))
        return dev.result(db, like=grad_output)
