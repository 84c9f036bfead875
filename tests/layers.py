"""A test layer (1-D, 2-D or 3-D by its input's shape): random inputs of one dtype, runnable as each primitive
through the public ops and checked against cnnfast.reference (float64)."""
import numpy as np

import cnnfast
from cnnfast import grad, reference

OPS = {"forward": cnnfast.conv2d, "backward_data": grad.conv2d_input, "backward_filter": grad.conv2d_weight}
OP_NAMES = {"forward": "conv2d", "backward_data": "conv2d_input", "backward_filter": "conv2d_weight"}


class Layer:
    def __init__(self, x_shape, w_shape, seed=0, dtype="float64", bias=True, **opts):
        rng = np.random.default_rng(seed)
        self.opts = opts
        self.dtype = dtype
        self.x = rng.standard_normal(x_shape).astype(dtype)
        self.w = rng.standard_normal(w_shape).astype(dtype)
        self.b = rng.standard_normal(w_shape[0]).astype(dtype) if bias else None
        self.dy = rng.standard_normal(reference.conv(self.x, self.w, **opts).shape).astype(dtype)

    def args(self, primitive, move=lambda a: a):
        """The op's positional arguments; `move` takes each array to a device (identity: NumPy)."""
        if primitive == "forward":
            return move(self.x), move(self.w), None if self.b is None else move(self.b)
        if primitive == "backward_data":
            return self.x.shape, move(self.w), move(self.dy)
        return move(self.x), self.w.shape, move(self.dy)

    def op_name(self, primitive):
        """conv{n}d, conv{n}d_input or conv{n}d_weight for this layer's n spatial dimensions."""
        return OP_NAMES[primitive].replace("2d", f"{self.x.ndim - 2}d")

    def run(self, primitive, args=None, **kw):
        name = self.op_name(primitive)
        op = getattr(cnnfast, name) if primitive == "forward" else getattr(grad, name)
        return op(*(args or self.args(primitive)), **self.opts, **kw)

    def explain(self, primitive, **kw):
        return cnnfast.explain(self.op_name(primitive), *self.args(primitive), **self.opts, **kw)

    def expected(self, primitive):
        if primitive == "forward":
            return reference.conv(self.x, self.w, self.b, **self.opts)
        if primitive == "backward_data":
            return reference.conv_input(self.x.shape, self.w, self.dy, **self.opts)
        return reference.conv_weight(self.x, self.w.shape, self.dy, **self.opts)
