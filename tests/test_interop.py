"""Array families in and out: NumPy -> NumPy (CPU); Numba device arrays -> Numba; CuPy -> CuPy on CuPy's current
stream; any other __cuda_array_interface__ object -> CuPy when importable, else Numba; a torch CUDA tensor -> a
torch tensor. The Numba part runs in the CUDA simulator; the CuPy, interface-object and torch parts need a GPU
(the simulator has no device pointers) and skip cleanly without one or without the package."""
import os

import numpy as np
import pytest

import cnnfast
from cnnfast import arrays, compare, grad, reference

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
gpu_only = pytest.mark.skipif(SIM, reason="needs a GPU (the simulator's arrays have no __cuda_array_interface__)")


@pytest.fixture
def problem():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    return x, w, dy


def _all_ops(x, w, dy):
    """(name, result, float64 reference) for the three primitives on arrays x, w, dy of one family."""
    host = [arrays.to_host(a).astype(np.float64) for a in (x, w, dy)]
    return [("conv2d", cnnfast.conv2d(x, w, padding=1), reference.conv(host[0], host[1], padding=1)),
            ("conv2d_input", grad.conv2d_input(host[0].shape, w, dy, padding=1),
             reference.conv_input(host[0].shape, host[1], host[2], padding=1)),
            ("conv2d_weight", grad.conv2d_weight(x, host[1].shape, dy, padding=1),
             reference.conv_weight(host[0], host[1].shape, host[2], padding=1))]


def _check(results, family_type):
    for name, out, expected in results:
        assert isinstance(out, family_type), (name, type(out))
        compare.assert_close(arrays.to_host(out), expected, "float32", name)


def test_numpy_in_numpy_out(problem):
    _check(_all_ops(*problem), np.ndarray)


def test_a_bare_interface_object_is_a_cuda_array():
    class Interface:
        __cuda_array_interface__ = {"data": (0, False), "shape": (2, 3, 6, 6), "typestr": "<f4", "version": 3}

    assert arrays.family_of(Interface()) == "cai"
    assert arrays.family_of(np.zeros(1)) == "numpy" and arrays.family_of([1.0]) is None


def _interface(**entries):
    class Interface:
        __cuda_array_interface__ = {"data": (0, False), "shape": (2, 3, 6, 6), "typestr": "<f4", "version": 3,
                                    **entries}
    return Interface()


@pytest.mark.cuda
@pytest.mark.parametrize("entries, message", [
    (dict(mask=_interface()), r"conv2d: input's __cuda_array_interface__ has a mask; masked arrays are not supported"),
    (dict(typestr="xx"), r"conv2d: input's __cuda_array_interface__ has shape \(2, 3, 6, 6\) and typestr 'xx': "
                         r"expected a tuple of ints and a NumPy type string such as '<f4'"),
    (dict(shape="ab"), r"conv2d: input's __cuda_array_interface__ has shape 'ab' and typestr '<f4'"),
], ids=["mask", "typestr", "shape"])
def test_an_interface_the_kernels_cannot_take_is_refused_by_name(entries, message):
    """Checked before any kernel, in the ops and in explain() (the mask was ignored, a bad entry raised NumPy's own
    TypeError or a KeyError naming neither the op nor the argument)."""
    w = np.ones((4, 3, 3, 3), np.float32)
    for call in (lambda: cnnfast.conv2d(_interface(**entries), w), lambda: cnnfast.explain("conv2d",
                                                                                          _interface(**entries), w)):
        with pytest.raises(TypeError, match=message):
            call()


@pytest.mark.cuda
@pytest.mark.parametrize("info", [{"data": (0, False), "typestr": "<f4", "version": 3}, [2, 3, 6, 6]],
                         ids=["no-shape", "not-a-dict"])
def test_an_interface_without_shape_and_typestr_is_refused_by_name(info):
    class Interface:
        __cuda_array_interface__ = info
    w = np.ones((4, 3, 3, 3), np.float32)
    for call in (lambda: cnnfast.conv2d(Interface(), w), lambda: cnnfast.explain("conv2d", Interface(), w)):
        with pytest.raises(TypeError, match=r"^conv2d: input's __cuda_array_interface__ is not a dict with 'shape' and "
                                            r"'typestr' entries: "):
            call()


@pytest.mark.cuda
def test_explain_takes_the_device_of_its_cuda_arrays():
    """A shape beside a CUDA array stands in on the CUDA device (it defaulted to the CPU: a device mismatch)."""
    cuda = pytest.importorskip("numba.cuda")
    x = cuda.to_device(np.ones((1, 3, 8, 8), np.float32))
    assert cnnfast.explain("conv2d", x, (4, 3, 3, 3)).device == "cuda"
    assert cnnfast.explain("conv2d", np.ones((1, 3, 8, 8), np.float32), (4, 3, 3, 3)).device == "cpu"
    assert cnnfast.explain("conv2d", (1, 3, 8, 8), (4, 3, 3, 3)).device == "cpu"


@pytest.mark.cuda
def test_numba_device_arrays_in_numba_out(problem):
    cuda = pytest.importorskip("numba.cuda")
    x, w, dy = (cuda.to_device(a) for a in problem)
    _check(_all_ops(x, w, dy), type(x))


@pytest.mark.cuda
@pytest.mark.gpu
@gpu_only
def test_cupy_in_cupy_out_on_the_current_stream(problem):
    cp = pytest.importorskip("cupy")
    with cp.cuda.Stream(non_blocking=True) as stream:
        x, w, dy = (cp.asarray(a) for a in problem)
        results = _all_ops(x, w, dy)
        stream.synchronize()
    _check(results, cp.ndarray)


@pytest.mark.cuda
@pytest.mark.gpu
@gpu_only
def test_other_interface_objects_come_back_as_cupy_or_numba(problem):
    from numba import cuda

    class Interface:  # what a third-party GPU array library offers
        def __init__(self, a):
            self.a = a

        @property
        def __cuda_array_interface__(self):
            return self.a.__cuda_array_interface__

    x, w, dy = (Interface(cuda.to_device(a)) for a in problem)
    try:
        import cupy
        expected_type = cupy.ndarray
    except ImportError:
        expected_type = cuda.devicearray.DeviceNDArray
    _check(_all_ops(x, w, dy), expected_type)


@pytest.mark.cuda
@pytest.mark.gpu
@gpu_only
def test_a_numba_array_then_cupy_arrays_run_as_numba(problem):
    """The first array's family (Numba) decides the working arrays: a CuPy weight, bias or grad_output after it is
    taken through its interface (it used to fail with an AttributeError, CuPy having no is_c_contiguous)."""
    cp = pytest.importorskip("cupy")
    from numba import cuda
    x, w, dy = problem
    b = np.arange(4, dtype=np.float32)
    out = cnnfast.conv2d(cuda.to_device(x), cp.asarray(w), cp.asarray(b), padding=1)
    assert isinstance(out, cuda.devicearray.DeviceNDArray)
    expected = reference.conv(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), padding=1)
    compare.assert_close(out.copy_to_host(), expected, "float32", "conv2d")
    dw = grad.conv2d_weight(cuda.to_device(x), w.shape, cp.asarray(dy), padding=1)
    compare.assert_close(dw.copy_to_host(), reference.conv_weight(x.astype(np.float64), w.shape,
                                                                  dy.astype(np.float64), padding=1), "float32", "dw")


@pytest.mark.cuda
def test_a_stream_where_an_array_belongs_gets_a_type_error(problem):
    """Objects of numba.cuda (or cupy) that are not arrays, a stream passed as the bias for instance, are refused
    as any other non-array (they were taken for arrays by their module, then failed on .dtype)."""
    from numba import cuda
    x, w, dy = (cuda.to_device(a) for a in problem)
    with pytest.raises(TypeError, match=r"^conv2d: expected bias to be .* but got numba\.cuda"):
        cnnfast.conv2d(x, w, cuda.stream())
    with pytest.raises(TypeError, match=r"^conv2d_weight: expected grad_output to be .* but got numba\.cuda"):
        grad.conv2d_weight(x, w.shape, cuda.stream())


@pytest.mark.cuda
@pytest.mark.skipif(not SIM, reason="the simulator's refusal")
def test_the_simulator_refuses_interface_objects_by_name(problem):
    class Interface:
        __cuda_array_interface__ = {"data": (1 << 20, False), "shape": (4, 3, 3, 3), "typestr": "<f4", "version": 3}

    from numba import cuda
    with pytest.raises(TypeError, match=r"^conv2d: Numba's CUDA simulator .* cannot take weight as .*Interface"):
        cnnfast.conv2d(cuda.to_device(problem[0]), Interface(), padding=1)


@pytest.mark.cuda
@pytest.mark.gpu
@gpu_only
def test_torch_cuda_tensors_in_torch_out(problem):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    x, w, dy = (torch.as_tensor(a, device="cuda") for a in problem)
    results = _all_ops(x, w, dy)
    torch.cuda.synchronize()
    for name, out, expected in results:
        assert isinstance(out, torch.Tensor) and out.is_cuda, (name, type(out))
        compare.assert_close(out.cpu().numpy(), expected, "float32", name)


def test_cupy_work_for_an_op_runs_on_the_ops_stream(monkeypatch):
    """Given a stream other than CuPy's current one (cnnfast.torch passes torch's), CuPy's own work for the op (pool
    allocations, contiguous copies, the bias add) runs in that stream's context, in order with the
    kernels: checked with a stand-in CuPy that records the stream current at each call (a GPU runs the real one in
    test_torch's side-stream test)."""
    import types

    from cnnfast.kernels.cuda import launch

    current, seen = [0], []

    class Stream:
        def __init__(self, ptr):
            self.ptr = ptr

        def __enter__(self):
            current.append(self.ptr)

        def __exit__(self, *exc):
            current.pop()

    class Array:
        ndim, dtype = 2, np.float32

        def __init__(self, *args):
            seen.append(current[-1])

        def reshape(self, *shape):
            return self

        def __iadd__(self, other):
            seen.append(current[-1])
            return self

    fake = types.SimpleNamespace(
        cuda=types.SimpleNamespace(get_current_stream=lambda: Stream(current[-1]), ExternalStream=Stream),
        empty=Array, zeros=Array, asarray=Array, ascontiguousarray=lambda a: a)
    monkeypatch.setattr(arrays, "_cupy", lambda: fake)
    monkeypatch.setattr(launch, "stream_pointer", lambda stream: 1234)  # the op's stream
    monkeypatch.setattr(launch, "cupy_stream", Stream)  # (the real one: a no-op context for the current stream)
    bias = Array()
    seen.clear()
    dev = arrays.CUDA(stream=0, family="cupy")
    y = dev.empty((2, 3), np.float32)
    dev.zeros((3,), np.float32)
    dev.working(y)
    dev.add_bias(y, bias)
    assert seen == [1234] * 4 and current == [0]


def test_a_cuda_tensor_that_requires_grad_gets_cnnfasts_type_error():
    """torch refuses __cuda_array_interface__ on a CUDA tensor that requires grad (a RuntimeError from the attribute
    itself): cnnfast's TypeError names the argument and the way out (a stand-in object here, no GPU needed)."""
    class Parameter:
        is_cuda, requires_grad = True, True

        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad.")

    with pytest.raises(TypeError, match=r"conv2d: expected weight to be .*, but got .*Parameter that requires grad "
                                        r"\(detach\(\) it, or use cnnfast.torch for autograd\)"):
        cnnfast.conv2d(np.ones((1, 2, 4, 4), np.float32), Parameter())


def test_torch_tensors_are_told_apart_and_read_without_building_their_array_interface():
    """A torch tensor's family, shape and dtype come from the tensor (torch builds __cuda_array_interface__ in Python,
    ~4 us, read twice per array before): a CUDA one is 'cai' as its interface would say, one on the CPU or one that
    requires grad is none (torch refuses their interface); a dtype other than float32 or float64 is
    read from the interface, for the error naming it. Tensors that say they are on a GPU (torch here is a CPU
    build), whose interface fails if read."""
    torch = pytest.importorskip("torch")

    class OnGPU(torch.Tensor):
        is_cuda = property(lambda self: True)

        @property
        def __cuda_array_interface__(self):
            if self.dtype in (torch.float32, torch.float64):
                raise AssertionError("read")
            return {"shape": tuple(self.shape), "typestr": "<f2", "data": (0, False), "version": 2}

    x = torch.zeros(2, 3, 4).as_subclass(OnGPU)
    assert arrays.family_of(x) == "cai" and arrays.interface(x) == ((2, 3, 4), np.dtype(np.float32))
    assert arrays.interface(x.double()) == ((2, 3, 4), np.dtype(np.float64))
    assert arrays.interface(x.half()) == ((2, 3, 4), np.dtype(np.float16))
    assert arrays.family_of(torch.zeros(2)) is None
    assert arrays.family_of(torch.zeros(2).as_subclass(OnGPU).requires_grad_()) is None


def test_cnnfast_torch_without_torch_says_what_to_install():
    """Where PyTorch is not installed, importing the adapter names what is missing and how to get it (was a bare
    ModuleNotFoundError: No module named 'torch')."""
    import subprocess
    import sys
    code = ("import sys\nsys.modules['torch'] = None  # as if not installed\n"
            "try:\n    import cnnfast.torch\nexcept ImportError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("cnnfast.torch needs PyTorch, which is not installed here") and \
        "pip install -e '.[torch]'" in done.stdout


# ---------------------------------------------------------------- several GPUs: the arrays' GPU, as in PyTorch

class _StandInGPUs:
    """numba.cuda.gpus for two GPUs: entering gpus[i] makes i the current GPU until the exit (Numba pushes and pops
    its primary context), recorded in current."""

    def __init__(self):
        self.current = [0]

    def __len__(self):
        return 2

    def __getitem__(self, i):
        gpus = self

        class Enter:
            def __enter__(self):
                gpus.current.append(i)

            def __exit__(self, *exc):
                gpus.current.pop()

        return Enter()


@pytest.fixture
def two_gpus(monkeypatch):
    """Two stand-in GPUs, GPU 0 current, each array on the GPU its `on` entry names (by id); the GPU current at
    each launch in `launches`. The kernels themselves run where Numba runs them (the simulator, or the one GPU)."""
    from cnnfast.kernels.cuda import launch

    gpus, on, launches = _StandInGPUs(), {}, []
    monkeypatch.setattr(arrays, "_gpus", lambda: gpus)
    monkeypatch.setattr(arrays, "_current_gpu", lambda: gpus.current[-1])
    monkeypatch.setattr(arrays, "gpu_of", lambda a: on[id(a)])
    real = launch.dispatch  # (Numba's dispatcher: every launch in the simulator)
    monkeypatch.setattr(launch, "dispatch", lambda *args: (launches.append(gpus.current[-1]), real(*args)))
    monkeypatch.setenv("CNNFAST_CUDA_LAUNCH", "numba")
    return gpus, on, launches


@pytest.mark.cuda
def test_a_call_runs_on_the_gpu_its_arrays_are_on(problem, two_gpus):
    """GPU 0 current, the arrays on GPU 1: the kernels launch on GPU 1 (as torch runs an op on its tensors' device,
    whichever device is current), and GPU 0 is current again after the call."""
    cuda = pytest.importorskip("numba.cuda")
    gpus, on, launches = two_gpus
    x, w, dy = (cuda.to_device(a) for a in problem)
    on.update({id(x): 1, id(w): 1, id(dy): 1})
    _check(_all_ops(x, w, dy), type(x))
    assert launches and set(launches) == {1} and gpus.current == [0]
    launches.clear()
    db = grad.conv_bias(dy)
    compare.assert_close(db.copy_to_host(), problem[2].astype(np.float64).sum((0, 2, 3)), "float32", "conv_bias")
    assert launches and set(launches) == {1} and gpus.current == [0]
    launches.clear()
    on.update({id(x): 0, id(w): 0, id(dy): 0})
    _check(_all_ops(x, w, dy), type(x))
    assert launches and set(launches) == {0} and gpus.current == [0]


@pytest.mark.cuda
def test_arrays_on_two_gpus_are_refused_by_name(problem, two_gpus):
    cuda = pytest.importorskip("numba.cuda")
    gpus, on, launches = two_gpus
    x, w, dy = (cuda.to_device(a) for a in problem)
    b = cuda.to_device(np.zeros(4, np.float32))
    on.update({id(x): 0, id(w): 0, id(dy): 1, id(b): 1})
    with pytest.raises(ValueError, match=r"^conv2d: expected all arrays to be on the same device, but got input on "
                                         r"cuda:0 and bias on cuda:1$"):
        cnnfast.conv2d(x, w, b)
    with pytest.raises(ValueError, match=r"^conv2d_input: .* but got weight on cuda:0 and grad_output on cuda:1$"):
        grad.conv2d_input(problem[0].shape, w, dy, padding=1)
    assert launches == [] and gpus.current == [0]


def test_the_gpu_of_each_family(monkeypatch):
    """A torch tensor's and a CuPy array's own device; a Numba array's and an interface object's from the driver's
    attribute of their data's address (none for an empty one). Stand-ins: no GPU needed."""
    asked = []
    monkeypatch.setattr(arrays, "_pointer_gpu", lambda ptr: asked.append(ptr) or 3)
    torch_like = type("Tensor", (), {"__module__": "torch", "get_device": lambda self: 2})()
    cupy_like = type("ndarray", (), {"__module__": "cupy._core.core",
                                     "device": type("Device", (), {"id": 1})()})()
    numba_like = type("DeviceNDArray", (), {"__module__": "numba.cuda.cudadrv.devicearray",
                                            "device_ctypes_pointer": type("P", (), {"value": 4096})()})()
    assert [arrays.gpu_of(a) for a in (torch_like, cupy_like, numba_like)] == [2, 1, 3]
    assert [arrays.gpu_of(_interface(data=(ptr, False))) for ptr in (8192, 0)] == [3, None]
    assert asked == [4096, 8192]


@pytest.mark.cuda
def test_one_gpu_asks_no_array_where_it_is(problem, monkeypatch):
    cuda = pytest.importorskip("numba.cuda")
    monkeypatch.setattr(arrays, "_gpus", lambda: [None])
    monkeypatch.setattr(arrays, "gpu_of", lambda a: pytest.fail("asked with one GPU"))
    x, w, dy = (cuda.to_device(a) for a in problem)
    _check(_all_ops(x, w, dy), type(x))
