"""Public convolution ops with PyTorch's functional semantics, and explain().

Every op runs the same path: check the arrays (family, device, dtype) -> ConvSpec (normalise and
validate) -> Plan (device, algorithm) -> working contiguous arrays (5-D on the CPU, flat on CUDA) -> launcher
-> result in the caller's array family. All six ops are one canonical convolution x (X) * w (W) -> y (Y) seen from
different sides; each op names the primitive it needs and the roles of its arrays:

    op                      arrays (role)                       result   primitive
    conv                    input (X), weight (W)               Y        forward (+ bias)
    conv_input              weight (W), grad_output (Y)         X        backward_data
    conv_weight             input (X), grad_output (Y)          W        backward_filter
    conv_transpose          input (Y), weight (W)               X        backward_data (+ bias)
    conv_transpose_input    weight (W), grad_output (X)         Y        forward
    conv_transpose_weight   input (Y), grad_output (X)          W        backward_filter
"""
from __future__ import annotations

import contextlib
import math
import reprlib
import sys
from functools import lru_cache

import numba
import numpy as np

from cnnfast import arrays, compare, tune
from cnnfast.arrays import _package
from cnnfast.kernels.cpu import blas
from cnnfast.plan import algorithms, kernel_package, make_plan, registry_token
from cnnfast.spec import ConvSpec, _shape_str, check_bytes

# kind -> (primitive, {argument: role}, result role)
_KINDS = {
    "conv": ("forward", {"input": "X", "weight": "W"}, "Y"),
    "conv_input": ("backward_data", {"weight": "W", "grad_output": "Y"}, "X"),
    "conv_weight": ("backward_filter", {"input": "X", "grad_output": "Y"}, "W"),
    "conv_transpose": ("backward_data", {"input": "Y", "weight": "W"}, "X"),
    "conv_transpose_input": ("forward", {"weight": "W", "grad_output": "X"}, "Y"),
    "conv_transpose_weight": ("backward_filter", {"input": "Y", "grad_output": "X"}, "W"),
}


def _size_arg(op, name, size, dtype):
    """input_size / weight_size: a sequence of non-negative ints whose array (of dtype) a process could hold."""
    if (isinstance(size, (tuple, list)) or type(size).__name__ == "Size") and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in size):
        size = tuple(int(v) for v in size)
        check_bytes(op, name, size, dtype)
        return size
    raise TypeError(f"{op}: expected {name} to be a sequence of non-negative ints, but got {size!r}")


def _batched(op, nd, name, shape):
    """True for (N, C, *L), False for unbatched (C, *L); ValueError for any other number of dimensions."""
    if len(shape) == nd + 2:
        return True
    if len(shape) == nd + 1:
        return False
    raise ValueError(f"{op}: Expected {nd + 1}D (unbatched) or {nd + 2}D (batched) {name} to {op}, but got "
                     f"{name} of size: {_shape_str(shape)}")


def run(op, kind, nd, *, input=None, weight=None, grad_output=None, bias=None, size=None, algo="auto",
        workspace_limit=None, stream=None, key=None, **options):
    """The one implementation behind every public op (see the module docstring).

    size: input_size (conv_input, conv_transpose_input) or weight_size (the weight gradients).
    options: stride, padding, dilation, groups and padding_mode / output_padding, output_size for ConvSpec.
    key: a caller's own hashable image of every argument but the arrays' data and stream (cnnfast.torch's: its layer
    string and each tensor's shape, dtype and device), under which the checked spec and plan are kept: a later call
    with an equal key skips the checks and planning (_CALLS). Without one, calls on NumPy, CuPy and Numba arrays are
    kept under their own (_call_key).
    """
    primitive, roles, result_role = _KINDS[kind]
    if isinstance(workspace_limit, np.integer) and not isinstance(workspace_limit, np.bool_):
        workspace_limit = int(workspace_limit)  # a NumPy int8 would overflow in the planners' arithmetic
    given = {"input": input, "weight": weight, "grad_output": grad_output}
    named = {name: given[name] for name in roles}
    tuning = algo == "auto" and tune.active()
    if key is None and not tuning:
        key = _call_key(op, named, bias, size, algo, workspace_limit, options)
    known = _CALLS.get(key) if key is not None and not tuning else None
    if known is not None and known[5] == _token(known[0]):
        device, family, batched, spec, plan, _, programs = known
    else:
        device, family, batched, spec, plan = _checked(op, kind, nd, named, bias, size, algo, workspace_limit,
                                                       options)
        if any(isinstance(a, arrays.ShapeArray) for a in named.values()):  # (explain's: no key)
            return tune.plan(op, spec, primitive, device, workspace_limit, plan) if tuning else plan
        programs = {} if device == "cuda" and key is not None and not tuning and _recordable(plan) else None
        if key is not None and not tuning:
            _remember(_CALLS, key, (device, family, batched, spec, plan, _token(device), programs))

    like = named["grad_output" if "grad_output" in roles else "input"]  # (what the result is like)
    with arrays.on_their_gpu(device, op, **named, bias=bias):
        dev = arrays.device_for(device, family, stream, op, like)
        recorder = None
        place = _program_place(programs)
        if place is not None:  # a CUDA call kept under a key: replayed from its launch program, or recorded
            kept = programs.get(place)
            if kept:
                out = kept.run(dev, (*named.values(), bias))
                if out is not None:
                    return out
            if kept is not False:
                recorder = _package("cnnfast.kernels.cuda.program").Recorder(dev, (*named.values(), bias))
        ins = {roles[n]: a for n, a in named.items()}
        if tuning:
            def timed_run(candidate):
                _execute(dev, spec, candidate, primitive, ins, result_role, bias, kind, workspace_limit)
                dev.synchronize()

            plan = tune.plan(op, spec, primitive, device, workspace_limit, plan, timed_run)
        with recorder or _UNRECORDED:
            out = _execute(recorder.dev if recorder else dev, spec, plan, primitive, ins, result_role, bias, kind,
                           workspace_limit)
        if compare.active():  # check mode: the float64 reference of the same call, on the host
            dev.synchronize()  # (the host copies may run on another stream than the op's)
            host = {n: arrays.to_host(a) for n, a in named.items()}
            host = {n: a if n == "weight" or batched else a[None] for n, a in host.items()}
            host["bias"] = None if bias is None else arrays.to_host(bias)
            seen = (lambda a: a[0]) if not batched and result_role != "W" else (lambda a: a)  # as the caller sees them:
            result, expected = seen(arrays.to_host(out)), seen(compare.expected_result(kind, spec, **host))  # (indices)
            compare.verify(op, plan.algorithm, device, result, expected, spec.dtype,
                           terms=lambda: seen(compare.terms_result(kind, spec, **host)))
        if not batched and result_role != "W":
            out = dev.view(out, out.shape[1:])
        out = dev.result(out, like)
        if recorder is not None:
            made = recorder.program(out)
            if made or kept is None:  # (a program kept unless a new one replaces it: not run on strided inputs)
                programs[place] = made
        return out


_UNRECORDED = contextlib.nullcontext()


def _recordable(plan):
    """Whether a CUDA call planned so may be recorded as a launch program: on one of the package's own algorithms
    (kernels/cuda RECORDABLE; not the reference, not one a user registered, whose launches the recorder may not
    see)."""
    chosen = algorithms("cuda").get(plan.algorithm)
    return any(chosen is own for own in kernel_package("cuda").RECORDABLE)


def _program_place(programs):
    """Where the launch program of a CUDA call kept under a key (programs: its _CALLS entry's, else None: not a kept
    call on a recordable algorithm) is kept: (the current GPU, the raw launch path or not); None where calls are not
    replayed (kernels/cuda/program.py: off; check mode)."""
    if programs is None:
        return None
    raw = _package("cnnfast.kernels.cuda.program").path()
    if raw is None or compare.active():
        return None
    return arrays._current_gpu() if len(arrays._gpus()) > 1 else 0, raw


def _checked(op, kind, nd, named, bias, size, algo, workspace_limit, options):
    """(device, family, batched, spec, plan) of a call: its arrays, sizes and options checked, its plan made (or
    taken from _PLANS)."""
    primitive = _KINDS[kind][0]
    device, family, dtype, shapes = arrays.inspect(op, **named, bias=bias)
    carrier = "grad_output" if "grad_output" in named else "input"
    batched = _batched(op, nd, carrier, shapes[carrier])
    if "input" in shapes and carrier != "input" and len(shapes["input"]) != len(shapes[carrier]):
        raise ValueError(f"{op}: Expected input and grad_output to have the same number of dimensions, but got: "
                         f"{len(shapes['input'])} and {len(shapes[carrier])}")
    add_n = (lambda s: s) if batched else (lambda s: (1,) + s)

    if kind in ("conv_input", "conv_transpose_input"):
        size = _size_arg(op, "input_size", size, dtype)
        _batched(op, nd, "input_size", size)
        if len(size) != len(shapes["grad_output"]):
            raise ValueError(f"{op}: expected input_size with {len(shapes['grad_output'])} entries to "
                             f"match grad_output, but got input_size={list(size)}")
        input_shape, weight_shape = add_n(size), shapes["weight"]
    elif kind in ("conv_weight", "conv_transpose_weight"):
        input_shape, weight_shape = add_n(shapes["input"]), _size_arg(op, "weight_size", size, dtype)
    else:
        input_shape, weight_shape = add_n(shapes["input"]), shapes["weight"]
    bias_shape = shapes.get("bias")
    key = _plan_key(op, kind, device, dtype, batched, input_shape, weight_shape, bias_shape, algo, workspace_limit,
                    options)
    spec, plan = _PLANS.get(key, (None, None))
    if spec is None:
        spec = ConvSpec.create(op, input_shape, weight_shape, bias_shape=bias_shape, unbatched=not batched,
                               transposed=kind.startswith("conv_transpose"), dtype=dtype, **options)
    if "grad_output" in named and add_n(shapes["grad_output"]) != spec.output_shape:
        expected = spec.output_shape if batched else spec.output_shape[1:]
        raise ValueError(f"{op}: expected grad_output of size {_shape_str(expected)} (the output of this "
                         f"convolution), but got grad_output of size {_shape_str(shapes['grad_output'])}")
    if plan is None:
        plan = make_plan(op, spec, primitive, device, algo, workspace_limit)
        _remember(_PLANS, key, (spec, plan))
    return device, family, batched, spec, plan


# ---------------------------------------------------------------- the plan cache

# (arguments) -> (spec, plan) of calls that passed validation: a repeated call skips ConvSpec.create and
# make_plan (about 110 of the 146 us a tiny conv2d cost on the CPU). Keys are type-exact (1, True, 1.0 and
# np.int64(1) differ) and name the registered algorithms, so replacing one invalidates its plans; calls with
# arguments that have no such key (arrays as sizes, ...) are planned afresh every time. Bounded: cleared when full.
_PLANS = {}
PLAN_CACHE_SIZE = 1024


def _frozen(v):
    """A hashable, type-exact image of an option's value; TypeError if it has none."""
    t = type(v)
    if t is int or t is str or v is None:
        return v
    if t is tuple or t is list:
        return t, tuple(map(_frozen, v))
    if isinstance(v, (bool, float, np.integer)):
        return t, v
    raise TypeError(t.__name__)


def _plan_key(op, kind, device, dtype, batched, input_shape, weight_shape, bias_shape, algo, workspace_limit, options):
    """The cache key of a call (None: do not cache it)."""
    try:
        key = (op, kind, device, dtype, batched, input_shape, weight_shape, bias_shape, _frozen(algo),
               _frozen(workspace_limit), tuple(options), tuple(map(_frozen, options.values())), _token(device))
        hash(key)
        return key
    except TypeError:
        return None


def _token(device):
    """What a plan depends on beyond the call: the registered algorithms, and on the CPU OpenBLAS's thread count
    (im2col's chunks) and Numba's, the calling thread's (the per-thread scratch of direct's wide kernels and of
    depthwise's, and so the workspace a plan reports and fits under workspace_limit)."""
    if device == "cpu":
        return registry_token(device), blas.threads(), numba.get_num_threads()
    return registry_token(device), None, None


# A call's key (run's key argument, or _call_key's) -> (device, family, batched, spec, plan, _token(device)) of a
# call that passed the checks: a repeated call skips arrays.inspect, _plan_key and the rest of _checked (cnnfast.torch's
# ~2.5 us a call in a loop, 3-4x that in a model at batch 1, where every Python step after torch's ops on large tensors
# runs cold; a tiny cnnfast.conv2d on NumPy 32 -> 28 us, 2026-12-07). Bounded as _PLANS; a test that clears _PLANS to
# plan calls afresh (after patching a planner's constant) clears it too.
_CALLS = {}


def _call_key(op, named, bias, size, algo, workspace_limit, options):
    """run's key for a call on arrays whose type alone decides their family (NumPy's, CuPy's and Numba's arrays, once
    arrays.family_of has met their type) or on torch tensors (with what decides a tensor's: its device, whether it
    requires grad, its layout): their types, shapes and dtypes and the other arguments, type-exact (_frozen); None
    for any other call (a bare __cuda_array_interface__ object: checked every time)."""
    families = arrays._FAMILIES
    torch = sys.modules.get("torch")
    tensor = torch.Tensor if torch is not None else ()
    try:  # (anything odd, an unhashable shape, a self-containing option: no key, and the checks say what is wrong)
        images = []
        for a in (*named.values(), bias):
            t = type(a)
            if a is None:
                images.append(None)
            elif t in families:
                images.append((t, tuple(a.shape), a.dtype))
            elif isinstance(a, tensor):
                images.append((t, tuple(a.shape), a.dtype, a.is_cuda, a.get_device(), a.requires_grad, a.layout))
            else:
                return None
        key = (op, *images, _frozen(size), _frozen(algo), _frozen(workspace_limit), tuple(options),
               *map(_frozen, options.values()))
        hash(key)
        return key
    except Exception:  # noqa: BLE001
        return None


def _remember(cache, key, value):
    if key is not None:
        if len(cache) >= PLAN_CACHE_SIZE:
            cache.clear()
        cache[key] = value


@lru_cache(maxsize=PLAN_CACHE_SIZE)
def _pad_arrays(spec):
    """spec.pad_tables() as read-only int64 arrays (pre-padded specs)."""
    tables = [np.array(t, dtype=np.int64) for t in spec.pad_tables()]
    for t in tables:
        t.flags.writeable = False  # (kept per spec: the CUDA launchers key its device copy by its bytes, once)
    return tables


def _execute(*args):
    """_run_plan with NumPy's floating-point errors ignored: its BLAS products and bias adds warned about NaN or inf
    data, or raised under np.seterr(all="raise"), where the Numba kernels (and torch) never do. (A new errstate per
    call: NumPy 1.x's decorator form shares one between threads.)"""
    with np.errstate(all="ignore"):
        return _run_plan(*args)


def _run_plan(dev, spec, plan, primitive, ins, result_role, bias, kind, workspace_limit):
    """Run plan on working arrays; return the result (batched, op-level shape) in the device's family."""
    g = spec.geometry
    dtype = np.dtype(spec.dtype)
    views = spec.views  # role -> (shape, unpadded 5-D view, what the kernels see)
    result_shape = views[result_role][0]
    adds_bias = bias is not None and kind in ("conv", "conv_transpose")
    if math.prod(result_shape) == 0:
        return dev.empty(result_shape, dtype)
    if any(math.prod(views[role][0]) == 0 for role in ins):
        out = dev.zeros(result_shape, dtype)  # an empty sum: zero, plus the bias (PyTorch drops K here)
        if adds_bias:
            dev.add_bias(out, dev.working(bias))
        return out

    tables = _pad_arrays(spec) if spec.pre_padded else None
    work = {}
    for role, a in ins.items():
        a = dev.working(a)
        if role == "X" and tables is not None:
            padded = dev.empty(views["X"][2], dtype)
            dev.pad(dev.view(a, views["X"][1]), padded, tables)
            a = padded
        work[role] = dev.view(a, dev.kernel_shape(views[role][2]))
    out = work[result_role] = dev.empty(dev.kernel_shape(views[result_role][2]), dtype)
    bias_w = dev.working(bias) if bias is not None else None
    launch = algorithms(dev.name)[plan.algorithm].launcher(primitive)
    opts = dict(workspace_limit=workspace_limit, **dev.launch_options())
    if plan.tile is not None:
        opts["tile"] = plan.tile
    if primitive == "forward":
        launch(work["X"], work["W"], bias_w if kind == "conv" else None, work["Y"], g, **opts)
    elif primitive == "backward_data":
        launch(work["Y"], work["W"], work["X"], g, **opts)
    else:
        launch(work["X"], work["Y"], work["W"], g, **opts)
    if result_role == "X" and tables is not None:
        folded = dev.empty(views["X"][1], dtype)
        dev.fold_pad(dev.view(out, views["X"][2]), folded, tables)
        out = folded
    out = dev.view(out, result_shape)
    if adds_bias and kind == "conv_transpose":
        dev.add_bias(out, bias_w)
    return out


# ---------------------------------------------------------------- public ops

def _conv_op(nd):
    def conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, padding_mode="zeros",
             algo="auto", workspace_limit=None, stream=None):
        return run(f"conv{nd}d", "conv", nd, input=input, weight=weight, bias=bias, stride=stride,
                   padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode, algo=algo,
                   workspace_limit=workspace_limit, stream=stream)

    conv.__name__ = conv.__qualname__ = f"conv{nd}d"
    conv.__doc__ = f"""{nd}-D convolution, as torch.nn.functional.conv{nd}d.

    input (N, C, *L) or unbatched (C, *L) with {nd} spatial axes; weight (K, C/groups, *k); bias (K,) or None.
    padding: int, per-axis ints, per-axis (low, high) pairs, 'valid' or 'same' (any stride, TensorFlow's rule).
    padding_mode: 'zeros' | 'reflect' | 'replicate' | 'circular' (as torch.nn.Conv{nd}d's).
    algo: 'auto' or an algorithm name (cnnfast.explain shows the choice); workspace_limit: scratch bytes cap;
    stream: CUDA stream (Numba or CuPy; default: CuPy's current stream for CuPy arrays).
    Returns (N, K, *out) in the input's array family and dtype.
    """
    return conv


def _conv_transpose_op(nd):
    def conv_transpose(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1,
                       *, output_size=None, algo="auto", workspace_limit=None, stream=None):
        return run(f"conv_transpose{nd}d", "conv_transpose", nd, input=input, weight=weight, bias=bias,
                   stride=stride, padding=padding, output_padding=output_padding, output_size=output_size,
                   groups=groups, dilation=dilation, algo=algo, workspace_limit=workspace_limit, stream=stream)

    conv_transpose.__name__ = conv_transpose.__qualname__ = f"conv_transpose{nd}d"
    conv_transpose.__doc__ = f"""{nd}-D transposed convolution, as torch.nn.functional.conv_transpose{nd}d.

    input (N, C, *L) or unbatched; weight (C, K/groups, *k); bias (K,) or None. Output length per axis:
    (L - 1)*stride - pad_lo - pad_hi + dilation*(k - 1) + output_padding + 1; output_size (the full or the
    spatial shape) picks output_padding instead. padding: int, per-axis ints or (low, high) pairs.
    """
    return conv_transpose


conv1d, conv2d, conv3d = (_conv_op(nd) for nd in (1, 2, 3))
conv_transpose1d, conv_transpose2d, conv_transpose3d = (_conv_transpose_op(nd) for nd in (1, 2, 3))

# ---------------------------------------------------------------- explain

# op name -> (kind, nd, positions and keyword names of its array arguments)
_OPS = {}
for _nd in (1, 2, 3):
    _OPS[f"conv{_nd}d"] = ("cnnfast.api", (0, 1, 2), ("input", "weight", "bias"))
    _OPS[f"conv_transpose{_nd}d"] = ("cnnfast.api", (0, 1, 2), ("input", "weight", "bias"))
    for _side, _pos, _names in (("input", (1, 2), ("weight", "grad_output")),
                                ("weight", (0, 2), ("input", "grad_output"))):
        _OPS[f"conv{_nd}d_{_side}"] = ("cnnfast.grad", _pos, _names)
        _OPS[f"conv_transpose{_nd}d_{_side}"] = ("cnnfast.grad", _pos, _names)


def _brief(a):
    """repr(a), cut to its first 100 characters (a list of data where a shape belongs)."""
    text = reprlib.repr(a)
    return text if len(text) <= 100 else text[:97] + "..."


def explain(op, *args, device=None, dtype=None, **kwargs):
    """The Plan `op(*args, **kwargs)` would run: device, algorithm, kernels, workspace, determinism, why.

    Array arguments may be arrays or plain shapes: `device` and `dtype` say where and what they all are (the plan
    for a NumPy array's shape on the GPU: device="cuda"); each defaults to the arrays' among the arguments, else the
    CPU and float32:
        cnnfast.explain("conv2d", (1, 3, 32, 32), (6, 3, 5, 5), stride=1)
        cnnfast.explain("conv2d_weight", x, (64, 3, 7, 7), dy, stride=2, padding=3)
    The plan's .spec is the ConvSpec (output shape, FLOPs, parameters, ...). Nothing is computed.
    """
    import importlib

    if not isinstance(op, str):
        raise TypeError(f"explain: expected op to be an op's name such as 'conv2d', but got {type(op).__name__}")
    if op not in _OPS:
        raise ValueError(f"explain: unknown op {op!r}; expected one of {sorted(_OPS)}")
    module, positions, names = _OPS[op]
    fn = getattr(importlib.import_module(module), op)
    given = [(names[positions.index(i)], a) for i, a in enumerate(args) if i in positions] + [
        (k, v) for k, v in kwargs.items() if k in names]
    given = [(name, a) for name, a in given if a is not None and arrays.family_of(a) is not None]  # the arrays
    told = device, dtype  # (given: every argument's, the arrays' too; else each array's own)
    if device is None:  # the arrays' (a shape stands in on the same device), else the CPU
        device = "cuda" if any(arrays.family_of(a) not in ("numpy", None) for _, a in given) else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"explain: expected device 'cpu' or 'cuda', but got {device!r}")
    if dtype is None:
        dtype = next((arrays.dtype_of(a, op, name) for name, a in given), "float32")

    try:
        np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{op}: expected dtype 'float32' or 'float64', but got {dtype!r}") from None

    def stand_in(name, a):
        fam = None if a is None else arrays.family_of(a)
        if (a is None and name == "bias") or isinstance(a, arrays.ShapeArray):
            return a
        if fam is None:
            if not (isinstance(a, (tuple, list)) and all(
                    isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in a)):
                raise TypeError(f"{op}: expected {name} to be an array or a shape (a sequence of non-negative "
                                f"ints), but got {_brief(a)}")
            return arrays.ShapeArray(a, dtype, device)
        return arrays.ShapeArray(arrays.shape_of(a, op, name), told[1] or arrays.dtype_of(a, op, name),
                                 told[0] or ("cpu" if fam == "numpy" else "cuda"))

    args = [stand_in(names[positions.index(i)], a) if i in positions else a for i, a in enumerate(args)]
    kwargs = {k: stand_in(k, v) if k in names else v for k, v in kwargs.items()}
    return fn(*args, **kwargs)
