"""The PyTorch adapter (cnnfast.torch): autograd against torch's own convolutions and gradcheck, the modules'
state_dict, replace_convs on a ResNet-style model, and LeNet-5 trained twice (torch.nn convs vs cnnfast).

CUDA tensors are tested when torch sees a GPU (the simulator cannot take torch CUDA tensors).
"""
import contextlib
import copy
import dataclasses
import math
import re
import threading
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import cnnfast  # noqa: E402
import cnnfast.torch as cf  # noqa: E402
from cnnfast import _torch_ops as ops  # noqa: E402
from cnnfast import tune  # noqa: E402
from cnnfast.plan import algorithms  # noqa: E402

pytestmark = pytest.mark.torch
F = torch.nn.functional

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _strict_fp32_cudnn(monkeypatch):
    """torch's own CUDA convolutions, the references here, in strict fp32 (cuDNN's default is TF32, ~3e-4 off)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)

# (name, nd, transposed, input shape, weight shape, options): every option the functional ops take
CASES = [
    ("1d-s2-d2-g2", 1, False, (2, 4, 11), (4, 2, 3), dict(stride=2, dilation=2, groups=2, padding=2)),
    ("2d", 2, False, (2, 3, 6, 5), (4, 3, 3, 2), dict(padding=1)),
    ("2d-same-s2", 2, False, (1, 2, 7, 6), (3, 2, 3, 3), dict(stride=2, padding="same")),
    ("2d-reflect", 2, False, (1, 2, 5, 6), (3, 2, 3, 3), dict(padding=(2, 1), padding_mode="reflect")),
    ("2d-replicate", 2, False, (2, 2, 5, 4), (2, 2, 2, 3), dict(padding=1, padding_mode="replicate")),
    ("2d-circular", 2, False, (1, 3, 4, 5), (2, 3, 3, 3), dict(stride=2, padding=(1, 2), padding_mode="circular")),
    ("2d-depthwise-x2", 2, False, (2, 3, 5, 5), (6, 1, 3, 3), dict(padding=1, groups=3)),
    ("2d-unbatched", 2, False, (3, 5, 5), (2, 3, 3, 3), dict(padding=1)),
    ("3d", 3, False, (1, 2, 4, 4, 3), (2, 2, 2, 3, 2), dict(stride=(1, 2, 1), padding=(1, 1, 0))),
    ("t1d-op", 1, True, (2, 4, 5), (4, 3, 3), dict(stride=2, padding=1, output_padding=1)),
    ("t2d-g2-d2", 2, True, (1, 4, 4, 3), (4, 1, 3, 2), dict(stride=(2, 1), padding=1, groups=2, dilation=2)),
    ("t2d-size", 2, True, (2, 3, 3, 3), (3, 2, 4, 4), dict(stride=2, padding=1, output_size=(7, 6))),
    ("t2d-unbatched", 2, True, (3, 3, 3), (3, 2, 3, 3), dict(stride=2)),
    ("t2d-unbatched-size", 2, True, (3, 3, 3), (3, 2, 3, 3), dict(stride=2, output_size=(2, 8, 7))),
    ("t3d", 3, True, (1, 2, 3, 2, 3), (2, 2, 2, 2, 2), dict(stride=2, padding=(0, 1, 0))),
]


def _torch_op(nd, transposed, options):
    """The same call on torch's own convolutions (padding modes as nn.Conv does them: F.pad, then conv)."""
    options = dict(options)
    mode = options.pop("padding_mode", "zeros")
    if transposed:
        size = options.pop("output_size", None)
        fn = getattr(F, f"conv_transpose{nd}d")
        if size is not None:
            def call(x, w, b):  # nn.ConvTranspose's rule for output_size (no module: vmap refuses its random init)
                args = (options.get(k, d) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1)))
                stride, padding, dilation = ((v,) * nd if isinstance(v, int) else v for v in args)
                pad = torch.nn.modules.conv._ConvTransposeNd._output_padding(
                    None, x, size, stride, padding, w.shape[2:], nd, dilation)
                return fn(x, w, b, output_padding=pad, **options)
            return call
        return lambda x, w, b: fn(x, w, b, **options)
    fn = getattr(F, f"conv{nd}d")

    def call(x, w, b):  # pad explicitly (torch has no strided 'same'), then a valid convolution
        pad = options.get("padding", 0)
        stride = options.get("stride", 1)
        dil = options.get("dilation", 1)
        pairs = []
        for axis in range(nd):
            L, k = x.shape[x.dim() - nd + axis], w.shape[2 + axis]
            s, d = [v if isinstance(v, int) else v[axis] for v in (stride, dil)]
            if pad == "same":  # TensorFlow's rule: out = ceil(L / s), the odd pixel on the high side
                total = max((-(-L // s) - 1) * s + d * (k - 1) + 1 - L, 0)
                pairs.append((total // 2, total - total // 2))
            else:
                p = pad if isinstance(pad, int) else pad[axis]
                pairs.append((p, p) if isinstance(p, int) else tuple(p))
        flat = [v for pair in reversed(pairs) for v in pair]
        xp = F.pad(x, flat, mode="constant" if mode == "zeros" else mode)
        return fn(xp, w, b, **{k: v for k, v in options.items() if k != "padding"})
    return call


def _bias_len(w_shape, transposed, options):
    return w_shape[1] * options.get("groups", 1) if transposed else w_shape[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, nd, transposed, in_shape, w_shape, options", CASES, ids=[c[0] for c in CASES])
def test_forward_and_gradients_match_torch(name, nd, transposed, in_shape, w_shape, options, device):
    """y, dx, dw and db from cnnfast's kernels equal torch's autograd through its own convolutions (float32)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(in_shape, generator=g, device="cpu").to(device)
    w = torch.randn(w_shape, generator=g).to(device)
    b = torch.randn(_bias_len(w_shape, transposed, options), generator=g).to(device)
    ours = getattr(cf, f"conv_transpose{nd}d" if transposed else f"conv{nd}d")
    results = []
    for fn in (lambda x, w, b: ours(x, w, b, **options), _torch_op(nd, transposed, options)):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = fn(*leaves)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device)
        y.backward(dy)
        results.append([y.detach()] + [t.grad for t in leaves])
    for what, a, e in zip(("output", "grad input", "grad weight", "grad bias"), *results):
        assert a.shape == e.shape and a.dtype == e.dtype and a.device == e.device, what
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()), msg=f"{name}: {what}")


@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck], ids=["grad", "gradgrad"])
@pytest.mark.parametrize("name, nd, transposed, in_shape, w_shape, options", CASES, ids=[c[0] for c in CASES])
def test_gradcheck(name, nd, transposed, in_shape, w_shape, options, check):
    """torch.autograd.gradcheck and gradgradcheck (float64): cnnfast's backward kernels are the derivative of its
    forward, and the gradients (cnnfast ops in turn) are differentiable as well."""
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_()
              for s in (in_shape, w_shape, (_bias_len(w_shape, transposed, options),))]
    op = getattr(cf, f"conv_transpose{nd}d" if transposed else f"conv{nd}d")
    assert check(lambda x, w, b: op(x, w, b, **options), leaves)


def test_hessian_and_gradient_penalty_match_torch():
    """What second-order users run: a Hessian, a gradient penalty (WGAN-GP style)."""
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((2, 3, 6, 5), (4, 3, 3, 3), (4,)))
    results = []
    for conv in (cf.conv2d, F.conv2d):
        def loss(x, w, b, conv=conv):
            return torch.tanh(conv(x, w, b, stride=2, padding=1)).pow(2).sum()
        hessian = torch.autograd.functional.hessian(lambda a: loss(a, w, b), x)
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        out = loss(*leaves)
        gx, = torch.autograd.grad(out, leaves[0], create_graph=True)
        (out + gx.pow(2).sum()).backward()
        results.append([hessian] + [t.grad for t in leaves])
    assert results[1][0].abs().max() > 1  # a Hessian that is not zero
    for what, a, e in zip(("hessian", "penalty dx", "penalty dw", "penalty db"), *results):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10 * float(e.abs().max()), msg=what)


def test_hessian_in_input_weight_and_bias_matches_torch():
    """torch.func.hessian (jacfwd of jacrev) in all three arguments: the forward-mode derivatives of the input
    gradient (in dy and in w) and of the bias gradient run too, as cnnfast ops."""
    g = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((2, 3, 5, 5), (4, 3, 3, 3), (4,)))
    results = []
    for conv in (cf.conv2d, F.conv2d):
        def loss(x, w, b, conv=conv):
            return torch.sin(conv(x, w, b, stride=2, padding=1)).sum()
        results.append(torch.utils._pytree.tree_leaves(torch.func.hessian(loss, argnums=(0, 1, 2))(x, w, b)))
    assert len(results[0]) == 9 and results[1][0].abs().max() > 0.1  # every block; d2/dx2 is not zero (sin)
    for i, (a, e) in enumerate(zip(*results)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10 * float(e.abs().max()), msg=f"hessian block {i}")


@pytest.mark.parametrize("unbatched", [False, True])
def test_vmap_over_the_bias_alone_and_input_gradients_over_weights(unbatched):
    """vmap rules not reached by the recipes above: a batch of biases with one input and one weight, and input
    gradients with a batch of weights (an ensemble's dx: the weights side by side as groups), against torch's."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn((3, 5, 5) if unbatched else (2, 3, 5, 5), generator=g, dtype=torch.float64)
    w, Bs, Ws = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((4, 3, 3, 3), (6, 4), (6, 4, 3, 3, 3)))
    results = []
    for conv in (cf.conv2d, F.conv2d):
        def loss(x, w, conv=conv):
            return torch.sin(conv(x, w, stride=2, padding=1)).sum()
        results.append([torch.func.vmap(lambda b, conv=conv: conv(x, w, b, padding=1))(Bs),
                        torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(x, Ws)])
    assert results[0][0].shape == (6, *x.shape[:-3], 4, 5, 5) and results[0][1].shape == (6, *x.shape)
    for what, a, e in zip(("vmap over the bias", "dx over the weights"), *results):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10 * float(e.abs().max()), msg=what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, nd, transposed, in_shape, w_shape, options", CASES, ids=[c[0] for c in CASES])
def test_torch_func_transforms_match_torch(name, nd, transposed, in_shape, w_shape, options, device):
    """torch.func on cnnfast's ops equals torch.func on torch's (float64): per-sample gradients (vmap of grad: the
    problems' weight gradients run as one grouped problem), a batch of weights and biases (vmap: groups), forward
    mode (jvp, and forward_ad's dual tensors) and a Hessian (jacfwd of jacrev)."""
    g = torch.Generator().manual_seed(0)
    blen = _bias_len(w_shape, transposed, options)
    x, w, b, tx, tw, tb = (torch.randn(s, generator=g, dtype=torch.float64).to(device)
                           for s in (in_shape, w_shape, (blen,)) * 2)
    X, W, Bs = (torch.randn((3, *s), generator=g, dtype=torch.float64).to(device)
                for s in (in_shape, w_shape, (blen,)))
    ours = getattr(cf, f"conv_transpose{nd}d" if transposed else f"conv{nd}d")
    results = []
    for conv in (lambda x, w, b: ours(x, w, b, **options), _torch_op(nd, transposed, options)):
        def loss(x, w, b, conv=conv):
            return torch.sin(conv(x, w, b)).sum()
        forward_ad = torch.autograd.forward_ad
        with forward_ad.dual_level():
            dual = forward_ad.unpack_dual(conv(*(forward_ad.make_dual(p, t) for p, t in ((x, tx), (w, tw), (b, tb)))))
        results.append([
            *torch.func.vmap(torch.func.grad(loss, argnums=(0, 1, 2)), in_dims=(0, None, None))(X, w, b),
            torch.func.vmap(conv, in_dims=(None, 0, 0))(x, W, Bs),
            torch.func.vmap(conv, in_dims=(1, 0, None))(X.movedim(0, 1), W, b),
            *torch.func.jvp(conv, (x, w, b), (tx, tw, tb)), dual.tangent,
            torch.func.hessian(loss, argnums=1)(x, w, b)])
    whats = ("per-sample dx", "per-sample dw", "per-sample db", "vmap over w and b", "vmap over x (axis 1) and w",
             "jvp output", "jvp tangent", "forward_ad tangent", "hessian in w")
    for what, a, e in zip(whats, *results):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10 * float(e.abs().max()), msg=f"{name}: {what}")


def test_per_sample_gradients_and_an_ensemble_of_a_model():
    """The torch.func recipes on a model of cnnfast convs, against the same model on torch's: per-sample gradients
    (functional_call, vmap of grad over the batch) and an ensemble of 3 models (stack_module_state, vmap over the
    stacked parameters)."""
    torch.manual_seed(0)

    def net():
        return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Tanh(),
                                   torch.nn.ConvTranspose2d(4, 2, 2, stride=2), torch.nn.Flatten(),
                                   torch.nn.Linear(128, 3))
    models = [net().double() for _ in range(3)]
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    results = []
    for convert in (lambda m: m, lambda m: cf.replace_convs(copy.deepcopy(m))):
        ensemble = [convert(m) for m in models]
        params = {k: v.detach() for k, v in ensemble[0].named_parameters()}

        def loss(params, xi, model=ensemble[0]):
            return torch.func.functional_call(model, params, (xi[None],)).square().sum()

        def outputs(params, model=ensemble[0]):
            return torch.func.functional_call(model, params, (x,))
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
        stacked, _ = torch.func.stack_module_state(ensemble)
        outputs = torch.func.vmap(outputs)(stacked)
        results.append([*per_sample.values(), outputs])
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10 * float(e.abs().max()))


def test_torch_fx_symbolic_trace_records_each_conv_as_one_node():
    """A traced model calls each conv as the model does: autograd, torch.func and autocast work on it as well."""
    torch.manual_seed(0)
    ours = cf.replace_convs(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                                torch.nn.ConvTranspose2d(4, 2, 2, stride=2)))
    traced = torch.fx.symbolic_trace(ours)
    assert [n.target for n in traced.graph.nodes if n.op == "call_function"] == [cf._conv_call] * 2
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    torch.testing.assert_close(traced(x), ours(x))
    traced(x).square().sum().backward()
    assert x.grad.shape == x.shape
    params = {k: v.detach() for k, v in ours.named_parameters()}
    grads = [torch.func.grad(lambda p, m=m: torch.func.functional_call(m, p, (x,)).square().sum())(params)
             for m in (ours, traced)]
    for k in params:
        torch.testing.assert_close(grads[1][k], grads[0][k])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert traced(x.bfloat16()).dtype == torch.float32


def test_torch_func_under_torch_compile():
    """A compiled function that runs a transform: jvp and forward_ad give the true tangent (not zero), grad runs
    (the transformed call is a graph break: cnnfast's autograd.Functions are not traced)."""
    g = torch.Generator().manual_seed(0)
    x, w, t = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((1, 2, 5, 5), (3, 2, 3, 3), (3, 2, 3, 3)))
    fa = torch.autograd.forward_ad

    def dual(conv):
        with fa.dual_level():
            return fa.unpack_dual(conv(x, fa.make_dual(w, t), padding=1)).tangent
    for fn in (lambda conv: torch.func.jvp(lambda w: conv(x, w, padding=1), (w,), (t,))[1], dual,
               lambda conv: torch.func.grad(lambda w: torch.sin(conv(x, w, padding=1)).sum())(w)):
        expected = fn(F.conv2d)
        torch.testing.assert_close(torch.compile(fn, backend="aot_eager")(cf.conv2d), expected, rtol=1e-10,
                                   atol=1e-10 * float(expected.abs().max()))


def test_bad_inputs_under_vmap_get_cnnfast_errors_about_each_problem():
    """vmap checks one problem of the batch as a plain call would be checked, before the batch runs as one
    (grouped) problem: the message names the user's arguments."""
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    vmap = torch.func.vmap
    with pytest.raises(ValueError, match=r"conv2d: Expected 3D \(unbatched\) or 4D \(batched\) input to conv2d, "
                                         r"but got input of size: \[6, 6\]"):
        vmap(lambda xi: cf.conv2d(xi, w))(torch.randn(3, 6, 6))
    with pytest.raises(ValueError, match=r"conv2d: .*expected bias to be 1-dimensional with 4 elements, but got "
                                         r"bias of size \[4, 1\]"):
        vmap(lambda b: cf.conv2d(x, w, b))(torch.randn(5, 4, 1))
    with pytest.raises(TypeError, match="conv2d: expected groups to be an int, but got True"):
        vmap(lambda wi: cf.conv2d(x, wi, groups=True))(torch.randn(5, 4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"conv_transpose2d: .*weight of size \[4, 3, 3, 3\].*input\[2, 5, 6, 6\]"):
        vmap(lambda xi, wi: cf.conv_transpose2d(xi, wi), in_dims=(1, 0))(torch.randn(2, 7, 5, 6, 6),
                                                                          torch.randn(7, 4, 3, 3, 3))


def test_the_custom_ops_pass_torch_library_opcheck():
    """Schema, fake (meta) implementation, autograd registration and dispatch of the four ops, as torch checks them."""
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
               for s in ((2, 3, 6, 5), (4, 3, 3, 2), (4,)))
    layer = "conv2d:" + repr((2, "same", 1, 1, "reflect", "auto"))
    dy = torch.randn(ops._conv(x, w, b, layer).shape, dtype=torch.float64)
    for op, args in ((ops._conv, (x, w, b, layer)), (ops._conv_input, (dy, w, list(x.shape), layer)),
                     (ops._conv_weight, (x, dy, list(w.shape), layer)), (ops._bias_grad, (dy, False))):
        torch.library.opcheck(op, args)



class _Recording(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops torch dispatches (as FlopCounterMode and torch.compile's tracers see them)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_calls_skip_torchs_dispatcher_only_where_nothing_would_see_the_op(monkeypatch):
    """Inference and backward passes (without create_graph) run the ops' Python functions; with a gradient to
    record, under a dispatch mode, the profiler or torch.jit.trace, and on the meta device, the custom ops run
    (torch.compile and torch.func: tested above), which those see. Each way gives the same bits."""
    seen = []
    eager = ops._eager
    monkeypatch.setattr(ops, "_eager", lambda args: seen.append(eager(args)) or seen[-1])
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=g) for s in ((2, 3, 6, 5), (4, 3, 3, 3), (4,)))

    def run(*tensors):
        seen.clear()
        return cf.conv2d(*(tensors or (x, w, b)), padding=1)
    with torch.no_grad():
        y = run()
        assert seen == [True]
        with _Recording() as recording:
            assert torch.equal(run(), y) and seen == [False] and "cnnfast.conv.default" in recording.ops
        with torch.profiler.profile() as profile:
            assert torch.equal(run(), y) and seen == [False]
        assert "cnnfast::conv" in {event.name for event in profile.events()}
        traced = torch.jit.trace(lambda t: cf.conv2d(t, w, b, padding=1), x)
        assert "cnnfast::conv" in str(traced.graph) and torch.equal(traced(x), y)
        assert run(x.to("meta"), w.to("meta"), b.to("meta")).shape == y.shape and seen == [False]

    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = run(*leaves)
    assert seen == [False] and y.requires_grad
    seen.clear()
    first = torch.autograd.grad(y.square().sum(), leaves, create_graph=True)
    assert seen == [False] * 3  # conv_input, conv_weight and bias_grad, recorded for the second derivative
    again = torch.autograd.grad(run(*leaves).square().sum(), leaves)
    assert seen == [False] + [True] * 3  # the forward op recorded; the backward's ops on their own
    for a, e in zip(again, first):
        assert torch.equal(a, e)

def test_torch_compile_and_export_take_each_conv_as_one_op():
    """torch.compile(fullgraph=True): no graph break in a model of cnnfast convs (forward and backward);
    torch.export: one cnnfast.conv node per conv."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), torch.nn.ReLU(),
                                torch.nn.ConvTranspose2d(4, 2, 2, stride=2))
    ours = cf.replace_convs(copy.deepcopy(model))
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 5, 5)
    results = []
    for net in (model, compiled):
        leaf = x.clone().requires_grad_()
        y = net(leaf)
        y.square().sum().backward()
        results.append((y.detach(), leaf.grad))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
    exported = torch.export.export(ours, (x,))
    ops = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert ops.count("cnnfast.conv.default") == 2, ops
    torch.testing.assert_close(exported.module()(x), results[0][0], rtol=1e-4, atol=1e-5)


class _UpToSkip(torch.nn.Module):
    """U-Net's decoder step: a transposed conv upsampled to the skip connection's size (output_size)."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.ConvTranspose2d(3, 3, 3, stride=2, padding=1)

    def forward(self, x, skip):
        return self.up(x, output_size=skip.shape[-2:]) + skip


def test_output_size_under_tracing_compile_and_export():
    """output_size is resolved from the spatial sizes as ints (a dynamic batch stays dynamic): torch.jit.trace's
    tensor sizes, torch.fx's Proxy (one leaf call), torch.compile's symbolic sizes (fullgraph, dynamic) and
    torch.export with a dynamic batch, as torch.nn.ConvTranspose2d takes them. All raised TypeError or Unsupported."""
    torch.manual_seed(0)
    model = _UpToSkip()
    ours = cf.replace_convs(copy.deepcopy(model))
    x, skip = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8)
    expected = model(x, skip)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the sizes are baked into the trace, as torch's are
        traced = torch.jit.trace(ours, (x, skip))
    fx = torch.fx.symbolic_trace(ours)
    assert cf._conv_transpose_sized in [n.target for n in fx.graph.nodes if n.op == "call_function"]
    compiled = torch.compile(ours, fullgraph=True, dynamic=True, backend="eager")
    batch = torch.export.Dim("batch")
    exported = torch.export.export(ours, (x, skip), dynamic_shapes=({0: batch}, {0: batch})).module()
    for run in (ours, traced, fx, compiled, exported):
        torch.testing.assert_close(run(x, skip), expected, rtol=1e-4, atol=1e-5)
    x3 = torch.randn(3, 3, 4, 4)
    for skip3 in (torch.randn(3, 3, 8, 8), torch.randn(3, 3, 7, 7)):  # another batch; output_padding 1, then 0
        for run in (compiled, exported) if skip3.shape[-1] == 8 else (compiled,):  # (export: one skip size)
            torch.testing.assert_close(run(x3, skip3), model(x3, skip3), rtol=1e-4, atol=1e-5)
    # a size out of reach: cnnfast's ValueError under torch.compile too, as torch's own (not InternalTorchDynamoError)
    with pytest.raises(ValueError, match=r"conv_transpose2d: requested an output size of \[13, 8\]"):
        torch.compile(ours, backend="eager")(x, torch.randn(2, 3, 13, 8))


@pytest.mark.parametrize("algo", [a for a in algorithms("cpu") if a != "reference"])
def test_gradcheck_each_cpu_algorithm(algo):
    depthwise = algo == "depthwise"
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8 if depthwise else 5, 1 if depthwise else 4, 3, 3, dtype=torch.float64, requires_grad=True)
    groups = 4 if depthwise else 1
    stride = 1 if algo == "winograd" else 2  # F(4x4, 3x3) needs unit stride
    assert torch.autograd.gradcheck(lambda x, w: cf.conv2d(x, w, stride=stride, padding=1, groups=groups, algo=algo),
                                    (x, w))


def test_a_call_remembered_by_its_layer_follows_a_replaced_algorithm_and_check_mode(monkeypatch):
    """cnnfast.torch's calls skip the checks under the key of a call checked before (api.run's key): a replaced
    algorithm still runs at the next call, and check mode still checks it; another shape is checked afresh."""
    from cnnfast.kernels.cpu import ALGORITHMS
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    first = cf.conv2d(x, w, algo="direct")
    calls, real = [], ALGORITHMS["direct"]
    monkeypatch.setitem(ALGORITHMS, "direct", dataclasses.replace(
        real, forward=lambda *a, **k: calls.append(1) or real.forward(*a, **k)))
    assert torch.equal(cf.conv2d(x, w, algo="direct"), first) and calls == [1]
    checked = []
    with cnnfast.checking():
        monkeypatch.setattr(cnnfast.compare, "verify", lambda op, *a, **k: checked.append(op))
        cf.conv2d(x, w, algo="direct")
    assert checked == ["conv2d"]
    with pytest.raises(ValueError, match=r"^conv2d: Expected 3D \(unbatched\) or 4D \(batched\) input"):
        cf.conv2d(x[0, 0], w, algo="direct")
    dy, layer = torch.randn(1, 3, 4, 4), "conv2d:(1, 0, 1, 1, 'zeros', 'auto')"
    ops._conv_input_eager(dy, w, [1, 2, 6, 6], layer)
    with pytest.raises(TypeError, match=r"^conv2d_input: expected input_size to be a sequence of non-negative ints"):
        ops._conv_input_eager(dy, w, [True, 2, 6, 6], layer)  # (equal to the size above, as a key)


def test_only_needed_gradients_are_computed(monkeypatch):
    calls = []
    run, conv_bias = cnnfast.api.run, cnnfast.grad.conv_bias
    monkeypatch.setattr(cnnfast.api, "run", lambda op, *a, **k: calls.append(op) or run(op, *a, **k))
    monkeypatch.setattr(cnnfast.grad, "conv_bias", lambda *a, **k: calls.append("conv_bias") or conv_bias(*a, **k))
    x = torch.randn(1, 2, 5, 5)  # an image: no gradient wanted
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    cf.conv2d(x, w, torch.zeros(3), padding=1).sum().backward()
    assert calls == ["conv2d", "conv2d_weight"] and w.grad is not None


def test_autocast_runs_the_kernels_in_float32():
    """Under torch.autocast (a bfloat16 Linear before the conv) the conv takes float32, as custom_fwd(cast_inputs=
    torch.float32) would give it; the gradient reaches the bfloat16 input."""
    torch.manual_seed(0)
    model = cf.replace_convs(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Unflatten(1, (2, 2, 2)),
                                                 torch.nn.Conv2d(2, 3, 2)))
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model[1](model[0](x))
        y = model[2](hidden)
    assert hidden.dtype == torch.bfloat16 and y.dtype == torch.float32
    torch.testing.assert_close(y, F.conv2d(hidden.float(), model[2].weight, model[2].bias), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad is not None and model[2].weight.grad.dtype == torch.float32
    with pytest.raises(TypeError, match=r"^conv2d: expected weight to have the same dtype as input "
                                        r"\(torch\.bfloat16\), but got torch\.float32$"):
        cf.conv2d(torch.ones(1, 2, 3, 3, dtype=torch.bfloat16), torch.ones(1, 2, 2, 2))  # not under autocast
    with pytest.raises(TypeError, match=r"^conv_transpose2d: expected bias to have the same dtype as input "
                                        r"\(torch\.float16\), but got torch\.float32$"):
        cf.conv_transpose2d(torch.ones(1, 2, 3, 3).half(), torch.ones(2, 1, 2, 2).half(), torch.ones(1))


def test_errors_name_the_op():
    with pytest.raises(TypeError, match=r"conv2d: expected input to have dtype float32 or float64, but got "
                                        r"torch\.int64"):
        cf.conv2d(torch.ones(1, 1, 3, 3, dtype=torch.int64), torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"conv2d: .*channels"):
        cf.conv2d(torch.ones(1, 2, 3, 3), torch.ones(1, 3, 2, 2))
    x, w = torch.ones(1, 2, 5, 5), torch.ones(3, 2, 3, 3)
    torch.testing.assert_close(cf.conv2d(x, w, stride=np.int64(2), padding=(np.int32(1), 1)),
                               F.conv2d(x, w, stride=2, padding=1))  # NumPy ints, as cnnfast.conv2d takes them
    torch.testing.assert_close(cf.conv2d(x, w, stride=torch.tensor(2), padding=(torch.tensor(1), 1)),
                               F.conv2d(x, w, stride=torch.tensor(2), padding=(torch.tensor(1), 1)))  # as F takes them
    with pytest.raises(TypeError, match=r"^conv2d: expected ints, tuples of ints and strings for \(stride, padding, "
                                        r"dilation, groups, padding_mode, algo\), but got \(tensor\(\[2, 2\]\), "):
        cf.conv2d(x, w, stride=torch.tensor([2, 2]))  # (F.conv2d refuses it too)
    with pytest.raises(TypeError, match=r"^conv_transpose1d: expected weight to be a torch\.Tensor, but got list$"):
        cf.conv_transpose1d(torch.ones(1, 2, 3), [[[1.0]], [[1.0]]])


def test_torch_compile_and_the_meta_device_report_a_bad_layer_by_name():
    """A stride of 0 and a kernel larger than the input made the shape formulas of torch.compile's fake tensors fail
    first (ZeroDivisionError; "Trying to create tensor with negative dimension -1"): cnnfast's errors instead, naming
    the argument, as torch's own convs report theirs under torch.compile."""
    bad = [(dict(stride=0), (1, 2, 8, 8), (1, 2, 2, 2), r"conv2d: non-positive stride is not supported, but got "
                                                          r"stride=\(0, 0\)"),
           ({}, (1, 2, 3, 3), (1, 2, 5, 5), r"conv2d: Calculated padded input size per channel: \(3 x 3\)\. "
                                            r"Kernel size: \(5 x 5\)\. Kernel size can't be greater than actual "
                                            r"input size"),
           ({}, (1, 2, 4, 4), (1, 2, 5, 5), r"conv2d: Calculated padded input size per channel: \(4 x 4\)\. "
                                            r"Kernel size: \(5 x 5\)"),  # (an output of 0 x 0: no negative size)
           (dict(dilation=2), (1, 2, 4, 4), (1, 2, 3, 3), r"conv2d: Calculated padded input size per channel: "
                                                          r"\(4 x 4\)\. Kernel size: \(5 x 5\)")]
    for kwargs, x_shape, w_shape, message in bad:
        torch._dynamo.reset()
        with pytest.raises(RuntimeError, match=message):  # torch.compile's TorchRuntimeError, as for F.conv2d
            compiled = torch.compile(lambda x, w, kwargs=kwargs: cf.conv2d(x, w, **kwargs))
            compiled(torch.ones(x_shape), torch.ones(w_shape))
        with pytest.raises(ValueError, match=message):
            cf.conv2d(torch.ones(x_shape, device="meta"), torch.ones(w_shape, device="meta"), **kwargs)
    with pytest.raises(ValueError, match=r"^conv_transpose2d: Given input size per channel: \(1 x 1\)\. Calculated "
                                         r"output size per channel: \(0 x 0\)\. Output size is too small$"):
        cf.conv_transpose2d(torch.ones(1, 2, 1, 1, device="meta"), torch.ones(2, 1, 2, 2, device="meta"), padding=1)
    torch._dynamo.reset()


def test_the_meta_device_and_torch_export_refuse_what_the_op_refuses():
    """The ops' fake implementations check a call of int sizes as the real op does (they had only computed the
    output's shape: a channel mismatch, a weight of the wrong rank or a bad grad_output passed on the meta device
    and in torch.export), raising the same error."""
    bad = [(cf.conv2d, (2, 5, 8, 8), (6, 4, 3, 3), {}),  # 5 input channels for a weight of 4
           (cf.conv2d, (2, 4, 8, 8), (6, 4, 3), {}),
           (cf.conv2d, (2, 4, 8, 8), (6, 4, 3, 3), dict(groups=4)),
           (cf.conv_transpose2d, (2, 4, 8, 8), (4, 3, 3, 3), dict(padding="same")),
           (cf.Conv2d(4, 6, 3, padding=8, padding_mode="reflect").forward, (2, 4, 8, 8), None, {})]
    for fn, x_shape, w_shape, kwargs in bad:
        args = [torch.ones(x_shape)] + ([] if w_shape is None else [torch.ones(w_shape)])
        with pytest.raises((ValueError, TypeError)) as real:
            fn(*args, **kwargs)
        with pytest.raises(real.type, match=f"^{re.escape(str(real.value))}$"):
            fn(*(a.to("meta") for a in args), **kwargs)
    layer = f"conv2d:{(1, 0, 1, 1, 'zeros', 'auto')!r}"
    meta = {name: torch.ones(shape, device="meta") for name, shape in
            dict(x=(2, 4, 8, 8), w=(6, 4, 3, 3), dy=(2, 6, 5, 5)).items()}  # dy: the output is 6 x 6
    with pytest.raises(ValueError, match=r"^conv2d_input: expected grad_output of size \[2, 6, 6, 6\]"):
        torch.ops.cnnfast.conv_input(meta["dy"], meta["w"], [2, 4, 8, 8], layer)
    with pytest.raises(ValueError, match=r"^conv2d_weight: expected grad_output of size \[2, 6, 6, 6\]"):
        torch.ops.cnnfast.conv_weight(meta["x"], meta["dy"], [6, 4, 3, 3], layer)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = cf.Conv2d(4, 6, 3)

        def forward(self, x):
            return self.conv(x)
    with pytest.raises(ValueError, match=r"expected input\[2, 5, 8, 8\] to have 4 channels, but got 5 channels"):
        torch.export.export(Net(), (torch.ones(2, 5, 8, 8),))
    assert torch.export.export(Net(), (torch.ones(2, 4, 8, 8),)).module()(torch.ones(2, 4, 8, 8)).shape == (2, 6, 6, 6)


def test_torch_jit_script_refuses_the_twins_by_name():
    """torch.jit.script cannot compile the twins (README): it says so, naming the module and what does take it,
    rather than TorchScript's "python value of type 'dict' cannot be used as a value" from inside forward."""
    from torch.nn.utils.parametrizations import weight_norm
    for model, name in ((cf.replace_convs(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())), "Conv2d"),
                        (cf.ConvTranspose1d(2, 2, 3), "ConvTranspose1d"),
                        (cf.replace_convs(weight_norm(torch.nn.Conv3d(1, 1, 1))), "ParametrizedConv3d")):
        with pytest.raises(TypeError, match=rf"^torch\.jit\.script: cnnfast\.torch\.{name} runs cnnfast's Python "
                                            r"kernels, .*use torch\.jit\.trace, torch\.compile or torch\.export"):
            torch.jit.script(model)


def test_check_mode_passes_a_conv_with_bias_before_batchnorm():
    """A conv with a bias followed by BatchNorm (a common layer) has a bias gradient that is zero but for rounding:
    check mode must not call that a mismatch (it raised MismatchError in the first backward pass of such a model)."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        model = cf.replace_convs(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                                     torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))).to(dtype)
        with cnnfast.checking():
            model(torch.randn(4, 3, 12, 12, dtype=dtype)).square().mean().backward()
        assert model[0].bias.grad.abs().max() < 1e-4 * model[0].weight.grad.abs().max()


def _backward_on_a_thread_of_its_own(loss, *modes):
    """loss.backward() as torch runs a CUDA graph's backward pass: on a thread where no contextvar is set (besides
    `modes`, context managers entered there first); returns what it raised, or None."""
    raised = []

    def run():
        try:
            with contextlib.ExitStack() as stack:
                for mode in modes:
                    stack.enter_context(mode)
                loss.backward()
        except Exception as e:  # noqa: BLE001 (handed to the test)
            raised.append(e)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return raised[0] if raised else None


def test_backward_passes_run_under_the_modes_their_forward_ran_under(monkeypatch):
    """checking() and autotune() are per thread, and torch runs CUDA backward passes on threads of its own: the
    backward formulas take the forward op's modes there, unless that thread set its own."""
    algorithms = cnnfast.kernels.cpu.ALGORITHMS
    good = algorithms["direct"]

    def backward_data(dy, w, dx, g, **kw):  # one element of the input gradient off by one
        good.backward_data(dy, w, dx, g, **kw)
        dx.reshape(-1)[5] += 1.0
    monkeypatch.setitem(algorithms, "direct", dataclasses.replace(good, backward_data=backward_data))
    conv = cf.Conv2d(2, 3, 3, padding=1)
    conv.algo = "direct"

    def loss(*modes):
        x = torch.randn(2, 2, 6, 6, requires_grad=True)
        with contextlib.ExitStack() as stack:
            for mode in modes:
                stack.enter_context(mode)
            return conv(x).square().sum()
    assert _backward_on_a_thread_of_its_own(loss()) is None  # unchecked: the wrong gradient goes unnoticed
    raised = _backward_on_a_thread_of_its_own(loss(cnnfast.checking()))
    assert isinstance(raised, cnnfast.MismatchError) and "conv2d_input (algorithm 'direct' on cpu)" in str(raised)
    assert _backward_on_a_thread_of_its_own(loss(cnnfast.checking()), cnnfast.checking(False)) is None

    monkeypatch.setattr(tune, "_WINNERS", {})
    _backward_on_a_thread_of_its_own(loss(cnnfast.autotune()))
    assert not tune._WINNERS  # algo="direct" is not tuned
    conv.algo = "auto"
    _backward_on_a_thread_of_its_own(loss(cnnfast.autotune()))
    assert sorted(key.split("|")[1] for key in tune._WINNERS) == ["backward_data", "backward_filter", "forward"]


def test_conv_transpose_output_size_errors_are_cnnfasts():
    """With output_size, the arguments are checked before output_padding is worked out: a wrong rank gets the op's
    own error, an output_size that is not ints ConvSpec's (torch raises RuntimeError or TypeError of its own)."""
    x, w = torch.ones(1, 4, 5, 5), torch.ones(4, 2, 3, 3)
    with pytest.raises(ValueError, match=r"^conv_transpose2d: Expected 3D \(unbatched\) or 4D \(batched\) input to "
                                         r"conv_transpose2d, but got input of size: \[4, 5\]$"):
        cf.conv_transpose2d(torch.ones(4, 5), w, stride=2, output_size=(10, 10))
    with pytest.raises(ValueError, match=r"^conv_transpose2d: expected 4-dimensional weight for 4-dimensional input "):
        cf.conv_transpose2d(x, torch.ones(4, 2, 3), stride=2, output_size=(10, 10))
    with pytest.raises(TypeError, match=r"^conv_transpose2d: expected output_size to be an int or a tuple of 2 ints, "
                                        r"but got \(10\.5, 10\)$"):
        cf.conv_transpose2d(x, w, stride=2, output_size=(10.5, 10))
    with pytest.raises(TypeError, match=r"^conv_transpose2d: expected output_size to be a tuple of 2 ints \(or 4 with "
                                        r"the batch and channel sizes\), but got 10$"):
        cf.conv_transpose2d(x, w, stride=2, output_size=10)
    torch.testing.assert_close(cf.conv_transpose2d(x, w, stride=2, output_size=(12, 12)),
                               F.conv_transpose2d(x, w, stride=2, output_padding=1))  # (4 * 2 + 3 = 11, + 1)


def test_the_package_gives_cnnfast_torch_as_an_attribute():
    """cnnfast.torch is imported on first use of the attribute (torch stays optional for `import cnnfast`)."""
    import subprocess
    import sys
    probe = ("import sys, cnnfast; assert 'cnnfast.torch' not in sys.modules; m = cnnfast.torch; "
             "print(m.__name__, m.conv2d.__module__)\n"
             "try:\n    cnnfast.nosuch\nexcept AttributeError as e:\n    print(e)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["cnnfast.torch cnnfast.torch", "module 'cnnfast' has no attribute 'nosuch'"]


# ---------------------------------------------------------------- modules

MODULES = [
    ("Conv1d", dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2), (2, 4, 9)),
    ("Conv2d", dict(in_channels=3, out_channels=4, kernel_size=(3, 2), padding="same", padding_mode="circular"),
     (2, 3, 6, 7)),
    ("Conv2d", dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, bias=False, padding_mode="reflect"),
     (1, 3, 5, 5)),
    ("Conv3d", dict(in_channels=2, out_channels=3, kernel_size=2, dilation=(1, 2, 1)), (1, 2, 4, 5, 4)),
    ("ConvTranspose1d", dict(in_channels=4, out_channels=2, kernel_size=4, stride=2, padding=1), (2, 4, 5)),
    ("ConvTranspose2d", dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, output_padding=1, groups=2),
     (1, 4, 3, 4)),
    ("ConvTranspose3d", dict(in_channels=2, out_channels=2, kernel_size=2, stride=2), (1, 2, 2, 3, 2)),
]


@pytest.mark.parametrize("cls, kwargs, in_shape", MODULES, ids=[f"{m[0]}-{i}" for i, m in enumerate(MODULES)])
def test_module_state_dict_round_trip(cls, kwargs, in_shape):
    """Same constructor and state_dict as torch.nn's: weights load both ways and the outputs agree."""
    torch.manual_seed(0)
    theirs = getattr(torch.nn, cls)(**kwargs)
    ours = getattr(cf, cls)(**kwargs)
    assert isinstance(ours, getattr(torch.nn, cls)) and repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(in_shape)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
    again = getattr(torch.nn, cls)(**kwargs)
    again.load_state_dict(ours.state_dict())
    torch.testing.assert_close(again(x), theirs(x), rtol=0, atol=0)


def test_conv_transpose_module_output_size():
    torch.manual_seed(0)
    theirs = torch.nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1)
    ours = cf.replace_convs(copy.deepcopy(theirs))
    x = torch.randn(1, 3, 4, 4)
    for size in ([7, 7], [8, 8], [1, 2, 8, 7]):
        torch.testing.assert_close(ours(x, output_size=size), theirs(x, output_size=size), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", ["Conv2d", "ConvTranspose2d"])
def test_a_module_runs_its_options_as_they_are_at_each_call(cls):
    """A module remembers its layer string while its options are the same objects: options set after a call (its
    stride, padding, algo) run at the next call, and values torch would refuse are refused as on the first call."""
    torch.manual_seed(0)
    theirs = getattr(torch.nn, cls)(4, 4, 3)
    ours = cf.replace_convs(copy.deepcopy(theirs))
    x = torch.randn(1, 4, 9, 9)
    for changes in ({}, {"stride": (2, 2)}, {"padding": (1, 0)}, {"dilation": (2, 1)}, {"groups": 2}, {}):
        for module in (theirs, ours):
            for name, value in changes.items():
                setattr(module, name, value)
            if "groups" in changes:  # (out, in / groups, ...) or, transposed, (in, out / groups, ...)
                module.weight.data = module.weight.data[:, :2]
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
    ours.algo = "no-such-algorithm"
    with pytest.raises(ValueError, match=r"unknown algo 'no-such-algorithm'"):
        ours(x)
    ours.algo, ours.stride = "auto", (1.0, 1)
    with pytest.raises(TypeError, match=r"expected stride to be an int or a tuple of 2 ints, but got \(1\.0, 1\)"):
        ours(x)
    if cls == "Conv2d":  # (torch's ConvTranspose2d asserts a tuple)
        theirs.stride = ours.stride = (1, 1)
        theirs.padding, ours.padding = [0, 0], [0, 0]  # a list: changed in place, the same object
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
        theirs.padding[0] = ours.padding[0] = 1
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


class _BasicBlock(torch.nn.Module):
    """torchvision's ResNet BasicBlock, written out: two 3x3 convs with batch norm, a 1x1 stride-2 downsample."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.downsample = None if stride == 1 and cin == cout else torch.nn.Sequential(
            torch.nn.Conv2d(cin, cout, 1, stride, bias=False), torch.nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


def _resnet_ish():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 7, 2, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.MaxPool2d(3, 2, 1), _BasicBlock(8, 8, 1), _BasicBlock(8, 16, 2),
        torch.nn.ConvTranspose2d(16, 4, 4, stride=2, padding=1),  # a decoder head, to cover the transposed twin
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5))


def test_replace_convs_on_a_resnet_style_model():
    torch.manual_seed(0)
    theirs = _resnet_ish()
    ours = cf.replace_convs(copy.deepcopy(theirs))
    convs = [m for m in ours.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert len(convs) == 7 and all(type(m).__module__ == "cnnfast.torch" for m in convs)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    x = torch.randn(2, 3, 32, 32)
    outs = []
    for model in (ours, theirs):
        model.zero_grad()
        y = model(x)
        y.square().sum().backward()
        outs.append((y.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-4)
    for (name, _), a, e in zip(theirs.named_parameters(), outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-3 * float(e.abs().max()), msg=name)


def test_replace_convs_gives_a_shared_conv_one_twin():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, padding=1))
            self.again = self.seq[0]  # the same module under a second name

        def forward(self, x):
            return self.again(self.seq(x))
    model = Shared()
    x = torch.randn(1, 2, 5, 5)
    expected = model(x)
    model = cf.replace_convs(model)
    assert model.again is model.seq[0] and isinstance(model.again, cf.Conv2d)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_replace_convs_keeps_the_parameter_objects():
    conv = torch.nn.Conv2d(2, 3, 3)
    model = torch.nn.Sequential(conv, torch.nn.ReLU())
    weight = conv.weight
    cf.replace_convs(model, algo="im2col")
    assert isinstance(model[0], cf.Conv2d) and model[0].weight is weight and model[0].algo == "im2col"
    assert type(cf.replace_convs(torch.nn.Conv1d(1, 1, 1))) is cf.Conv1d


def test_replace_convs_takes_a_conv_registered_twice_under_one_parent():
    """named_children() yields a module once: the second name used to keep torch's conv."""
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    model = cf.replace_convs(torch.nn.Sequential(conv, torch.nn.ReLU(), conv))
    assert isinstance(model[0], cf.Conv2d) and model[2] is model[0]


@pytest.mark.parametrize("parametrize", ["weight_norm", "spectral_norm", "orthogonal"])
def test_replace_convs_takes_parametrized_convs(parametrize):
    """torch.nn.utils.parametrizations give a conv a class of its own (ParametrizedConv2d): replaced, with the
    parametrization kept (the same values and gradients), and removing it leaves cnnfast's Conv2d."""
    from torch.nn.utils import parametrizations
    from torch.nn.utils import parametrize as P
    torch.manual_seed(0)
    theirs = getattr(parametrizations, parametrize)(torch.nn.Conv2d(3, 3, 3, padding=1).double())
    ours = cf.replace_convs(copy.deepcopy(torch.nn.Sequential(theirs)))[0]
    assert isinstance(ours, cf.Conv2d) and P.is_parametrized(ours, "weight")
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    for model in (theirs, ours):
        model.zero_grad()
        model(x).square().sum().backward()
    torch.testing.assert_close(ours(x), theirs(x))
    for (name, a), b in zip(theirs.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    P.remove_parametrizations(ours, "weight")
    assert type(ours) is cf.Conv2d


def test_replace_convs_makes_a_lazy_conv_a_twin_when_it_is_first_run():
    model = cf.replace_convs(torch.nn.Sequential(torch.nn.LazyConv2d(4, 3)), algo="im2col")
    model(torch.randn(1, 3, 6, 6))
    assert type(model[0]) is cf.Conv2d and model[0].algo == "im2col" and model[0].in_channels == 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_and_bfloat16_modules_run_the_float32_kernels_and_return_their_dtype(dtype):
    """module.half() / .bfloat16() outside autocast: torch's CPU convolutions return the dtype; so does cnnfast,
    rounding its float32 result, and the gradients come back in it too."""
    torch.manual_seed(0)
    theirs = torch.nn.Conv2d(3, 4, 3, padding=1).to(dtype)
    ours = cf.replace_convs(copy.deepcopy(theirs))
    x = torch.randn(2, 3, 6, 6).to(dtype).requires_grad_()
    y = ours(x)
    assert y.dtype == dtype
    exact = F.conv2d(x.float(), theirs.weight.float(), theirs.bias.float(), padding=1)
    torch.testing.assert_close(y, exact.to(dtype))  # the float32 result, rounded once
    torch.testing.assert_close(y, theirs(x))
    y.float().sum().backward()
    assert x.grad.dtype == ours.weight.grad.dtype == dtype


def test_modules_run_on_the_meta_device():
    """Shape inference on meta tensors (deferred initialisation): autocast has no meta device to ask about."""
    x = torch.empty(2, 3, 6, 6, device="meta")
    assert cf.Conv2d(3, 4, 3, device="meta")(x).shape == (2, 4, 4, 4)
    assert cf.ConvTranspose2d(3, 4, 3, stride=2, device="meta")(x, output_size=(14, 14)).shape == (2, 4, 14, 14)


# ---------------------------------------------------------------- end to end: LeNet-5 trains on cnnfast

def _bars(n, rng):
    """28x28 images of a noisy bar: horizontal, vertical, diagonal or anti-diagonal (the label), random offset."""
    labels = rng.integers(0, 4, n)
    images = 0.3 * rng.standard_normal((n, 1, 28, 28)).astype(np.float32)
    i = np.arange(28)
    for k, (label, off) in enumerate(zip(labels, rng.integers(-8, 9, n))):
        c = np.clip(14 + off, 2, 25)
        mask = [np.add.outer(np.abs(i - c) <= 1, 0 * i), np.add.outer(0 * i, np.abs(i - c) <= 1),
                np.abs(np.subtract.outer(i, i) - off) <= 1, np.abs(np.add.outer(i, i) - 27 - off) <= 1][label]
        images[k, 0][mask.astype(bool)] += 1.0
    return torch.from_numpy(images), torch.from_numpy(labels)


def _lenet():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 16, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))


def _train(model, images, labels, steps, batch):
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for step in range(steps):
        sl = slice((step * batch) % len(images), (step * batch) % len(images) + batch)
        loss = F.cross_entropy(model(images[sl]), labels[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses)


def test_lenet_trains_the_same_on_cnnfast():
    """300 SGD steps from the same weights and data order: torch.nn convs vs replace_convs. The loss curves
    agree and fall far below chance (ln 4)."""
    images, labels = _bars(2048, np.random.default_rng(0))
    torch.manual_seed(0)
    reference_model = _lenet()
    ours = cf.replace_convs(copy.deepcopy(reference_model))
    assert sum(isinstance(m, cf.Conv2d) for m in ours.modules()) == 2
    theirs_losses = _train(reference_model, images, labels, steps=300, batch=32)
    our_losses = _train(ours, images, labels, steps=300, batch=32)
    chance = math.log(4)
    assert our_losses[:10].mean() > 0.8 * chance
    assert our_losses[-20:].mean() < 0.15 * chance
    np.testing.assert_allclose(our_losses, theirs_losses, rtol=2e-3, atol=2e-3)


def test_strided_cuda_tensors_reach_cnnfast_contiguous():
    """The adapter has torch make a strided CUDA tensor contiguous on the device (autograd's gradients are often
    strided: y.sum().backward() gives an expanded one), rather than leave it to cnnfast's copy (a Numba launch)."""
    class OnGPU(torch.Tensor):  # stands in for a CUDA tensor on this CPU-only build: the adapter asks is_cuda
        is_cuda = property(lambda self: True)

    expanded = torch.arange(5.0).expand(2, 3, 4, 5).as_subclass(OnGPU)
    assert not expanded.is_contiguous()
    a = ops._array(expanded, "conv2d", "grad_output")
    assert a.is_cuda and a.is_contiguous() and torch.equal(a, torch.arange(5.0).expand(2, 3, 4, 5))
    dense = torch.ones(2, 3).as_subclass(OnGPU)
    assert ops._array(dense, "conv2d", "input").data_ptr() == dense.data_ptr()  # no copy of a contiguous tensor
    # a negative view's data is stored un-negated, as __cuda_array_interface__ hands it over: resolved first
    negative = torch._neg_view(torch.arange(6.0).reshape(2, 3)).as_subclass(OnGPU)
    assert negative.is_neg() and negative.is_contiguous() and negative.contiguous().is_neg()
    a = ops._array(negative, "conv2d", "input")
    assert not a.is_neg() and torch.equal(a, -torch.arange(6.0).reshape(2, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with a GPU")
def test_a_side_stream_orders_cnnfast_work_with_torch_work():
    """Under torch.cuda.stream(side) (non-blocking, no implicit order with the default stream), every part of a call
    (CuPy's allocations and bias add when CuPy is here, the padding, the kernels) runs on that stream: results as
    torch's, forward and backward, repeated so that a race would show."""
    torch.manual_seed(0)
    x, w, b = torch.randn(8, 16, 33, 35, device="cuda"), torch.randn(16, 8, 4, 4, device="cuda"), torch.randn(8,
                                                                                                            device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(5):
            leaves = [t.clone().requires_grad_() for t in (x, w, b)]
            y = cf.conv_transpose2d(leaves[0], leaves[1], leaves[2], stride=2, padding=1)
            y.square().sum().backward()
            z = cf.conv2d(leaves[0], w.transpose(0, 1), padding=2, padding_mode="reflect")
            expected = F.conv_transpose2d(x, w, b, stride=2, padding=1)
            torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
            torch.testing.assert_close(z, F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), w.transpose(0, 1)),
                                       rtol=1e-4, atol=1e-3)
            assert leaves[2].grad is not None
    torch.cuda.synchronize()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with a GPU")
def test_cuda_results_are_torchs_memory_and_workspace_goes_back_to_its_pool():
    """On a GPU a call on torch tensors (cnnfast.torch's, and cnnfast's own function) takes its memory from torch's
    caching allocator, whether or not CuPy is installed: torch.cuda.memory_allocated() counts the result while it
    lives, and nothing more once it is freed (the workspace, im2col's columns here, went back to torch's pool);
    values as torch's, also for a negative view."""
    torch.manual_seed(0)
    x, w = torch.randn(4, 16, 32, 32, device="cuda"), torch.randn(32, 16, 3, 3, device="cuda")
    expected = F.conv2d(x, w, padding=1)
    for call in (lambda: cf.conv2d(x, w, padding=1), lambda: cnnfast.conv2d(x, w, padding=1, algo="im2col"),
                 lambda: cnnfast.conv2d(x, w, padding=1, algo="im2col", stream=torch.cuda.Stream())):
        call()  # (a problem's first call uploads its tables: Numba's memory, kept)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        y = call()
        assert torch.cuda.memory_allocated() - before >= y.numel() * y.element_size()
        torch.cuda.synchronize()
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
        del y
        assert torch.cuda.memory_allocated() == before
    empty = cf.conv2d(x[:0], w, padding=1)  # (a result of size 0 has no memory: a new empty tensor)
    assert empty.is_cuda and empty.shape == (0, 32, 32, 32) and empty.dtype == torch.float32
    negative = cnnfast.conv2d(torch._neg_view(x), w, padding=1)  # (its memory holds x: read resolved)
    torch.testing.assert_close(negative, -expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with a GPU")
def test_cnnfast_torch_layers_replay_from_a_cuda_graph():
    """After warm-up calls (kernels compiled, the problem's index tables uploaded), cnnfast.torch layers are captured
    in a CUDA graph (torch.cuda.graph: their memory from the graph's pool, torch's allocator being theirs) and each
    replay on new data in the static input gives torch's results: a dense layer with a bias, then a depthwise one
    with reflect padding (its pad kernel)."""
    torch.manual_seed(0)
    x, w, b = (torch.randn(4, 8, 16, 16, device="cuda"), torch.randn(16, 8, 3, 3, device="cuda"),
               torch.randn(16, device="cuda"))
    d = torch.randn(16, 1, 3, 3, device="cuda")

    def layers(x):
        return cf.conv2d(cf.conv2d(x, w, b, padding=1), d, padding=1, groups=16, padding_mode="reflect")

    def expected(x):
        return F.conv2d(F.pad(F.conv2d(x, w, b, padding=1), (1, 1, 1, 1), mode="reflect"), d, groups=16)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # (warm-up on a side stream, as torch.cuda.graph's documentation does it)
        for _ in range(2):
            layers(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layers(x)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        want = expected(x)
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nd", [2, 3])
def test_channels_last_outputs_and_gradients_as_in_torch(nd, dtype):
    """A batched 2-D (3-D) convolution's output and both gradients are channels-last (channels_last_3d) when its
    input or weight has such strides (torch's rule on the CPU: a one-channel input counts, a float64 3-D one does not),
    and an unbatched one as its batch of one. (Where both layouts fit, a (K, 1, 3, 3)
    weight gradient, torch's strides differ between its own kernels: the layouts are compared.)"""
    torch.manual_seed(0)
    drop = (...,) + (0,) * (3 - nd)
    x, w = torch.randn(2, 3, 6, 5, 4, dtype=dtype)[drop], torch.randn(4, 3, 3, 3, 2, dtype=dtype)[drop]
    last = dict(memory_format=torch.channels_last if nd == 2 else torch.channels_last_3d)
    conv, conv_transpose = getattr(F, f"conv{nd}d"), getattr(F, f"conv_transpose{nd}d")
    ours, ours_transpose = getattr(cf, f"conv{nd}d"), getattr(cf, f"conv_transpose{nd}d")
    gray = x[:, :1].to(**last)  # (N, 1, ...): is_contiguous() in both layouts, channels-last strides
    cases = [(x.to(**last), w), (x, w.to(**last)), (x, w), (gray, w[:, :1]),
             (x[..., :2, :2].to(**last), w[..., :2, :2])]
    if nd == 3:
        cases.append((x[0].to(memory_format=torch.channels_last), w))
    # unbatched: as torch, its batch of one (unsqueezed): a channels-last weight's layout for the result and both
    # gradients in 2-D, squeezed; an input whose unsqueezed view suggests channels-last (only a 1x1 one: its batch
    # stride is C times C's); in 3-D a batch of one is torch's slow_conv3d's: contiguous
    cases += [(x[0], w.to(**last)), (x[0].unsqueeze(0).to(**last)[0], w),
              (x[0, :, :1, :1].unsqueeze(0).to(**last)[0], w)]
    for xi, wi in cases:
        for f, g, options in ((ours, conv, dict(padding=1)), (ours_transpose, conv_transpose, {})):
            wt = wi if f is ours else wi.transpose(0, 1)
            results = []
            for fn in (f, g):
                xg, wg = (t.detach().clone().requires_grad_() for t in (xi, wt))
                y = fn(xg, wg, **options)
                results.append((y, *torch.autograd.grad(y, (xg, wg), torch.ones_like(y))))
            for a, e in zip(*results):
                layouts = [[(t if t.dim() == nd + 2 else t[None]).is_contiguous(memory_format=m)
                            for m in (torch.contiguous_format, last["memory_format"])] for t in (a, e)]
                assert layouts[0] == layouts[1], (xi.shape, xi.stride(), f.__name__, a.stride(), e.stride())
                torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    # per-sample weight gradients of a channels-last weight (torch.func: vmapped tensors are left as they are)
    per_sample = [torch.func.vmap(torch.func.grad(lambda w_, x_, fn=fn: fn(x_[None], w_).sum()), in_dims=(None, 0))(
        w.to(**last), x) for fn in (ours, conv)]
    torch.testing.assert_close(*per_sample, rtol=1e-4, atol=1e-4)


def test_the_remembered_layout_answers_as_suggest_memory_format():
    """_suggests remembers the answer for a plain tensor's shape and strides where both layouts' contiguity flags
    hold (a 1x1 weight, one channel, a batch of one): the same answer as torch's suggest_memory_format, asked again."""
    from torch._prims_common import suggest_memory_format
    g = torch.Generator().manual_seed(0)
    for nd, last in ((2, torch.channels_last), (3, torch.channels_last_3d)):
        for _ in range(300):
            shape = [int(torch.randint(1, 4, (), generator=g)) for _ in range(nd + 2)]
            t = torch.randn(shape, generator=g)
            if torch.rand((), generator=g) < 0.5:
                t = t.to(memory_format=last)
            if torch.rand((), generator=g) < 0.3:
                t = t.transpose(0, 1)
            for _ in range(2):  # (the second from what _suggests remembered)
                assert ops._suggests(t, last) == (suggest_memory_format(t) == last), (t.shape, t.stride())


def test_an_old_torch_gets_a_clear_import_error():
    import subprocess
    import sys
    probe = "import torch; del torch.library.custom_op; import cnnfast.torch"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "cnnfast.torch needs torch >= 2.4" in done.stderr, done.stderr[-2000:]
