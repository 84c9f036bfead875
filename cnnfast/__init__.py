"""cnnfast: hand-written Numba convolution kernels for the CPU and NVIDIA GPUs, with PyTorch's semantics.

    y  = cnnfast.conv2d(x, w, b, stride=2, padding=1)        # NumPy -> CPU kernels, CuPy/Numba -> CUDA
    dx = cnnfast.grad.conv2d_input(x.shape, w, dy, stride=2, padding=1)
    print(cnnfast.explain("conv2d", (8, 64, 56, 56), (64, 64, 3, 3), padding=1))
"""
import os
import sys

__version__ = "0.1.0"

# A source checkout keeps the kernels at its top level (kernels/, installed as cnnfast.kernels): where this package
# is the checkout's own folder (first on sys.path, as `python -m pytest` or a script run in the checkout puts it),
# they are found beside it, whatever is installed.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")) and \
        os.path.isfile(os.path.join(_checkout, "kernels", "__init__.py")):
    __path__.append(_checkout)

# Thread pools that do not fight (README, "CPU threads"; values the user set win). NumPy's OpenBLAS keeps its
# workers spinning ~0.1 s after every GEMM (thread timeout 2**28 cycles), taking the cores from the Numba kernel
# that runs next; it reads the timeout once, as NumPy loads it. Where they spin, cnnfast's GEMMs never wake them
# (kernels/cpu/blas.py). Numba's OpenMP pool is started now, with a short spin, and before torch can be imported:
# a pool started later binds to torch's already loaded (spinning) libgomp (the first CPU kernel then warns), and a
# torch imported later shares this one.
_user_timeout = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
_numpy_loaded = "numpy" in sys.modules  # then OpenBLAS has read its timeout already: the user's, or its default
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
from cnnfast.kernels.cpu import blas as _blas  # noqa: E402
from cnnfast.kernels.cpu import threads as _threads  # noqa: E402

_blas.WORKERS_SPIN = _blas.workers_spin(_user_timeout if _numpy_loaded else os.environ["OPENBLAS_THREAD_TIMEOUT"])
_threads.start()

from cnnfast import grad  # noqa: E402
from cnnfast.api import conv1d, conv2d, conv3d, conv_transpose1d, conv_transpose2d, conv_transpose3d, explain  # noqa: E402
from cnnfast.compare import CheckResult, MismatchError, check, checking  # noqa: E402
from cnnfast.kernels.cpu.memory import empty_cache  # noqa: E402
from cnnfast.spec import ConvSpec  # noqa: E402
from cnnfast.tune import autotune  # noqa: E402


def __getattr__(name):
    """cnnfast.torch (the PyTorch adapter) is imported on first use, so torch stays optional."""
    if name == "torch":
        import importlib
        return importlib.import_module("cnnfast.torch")
    raise AttributeError(f"module 'cnnfast' has no attribute {name!r}")


__all__ = ["conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "grad",
           "explain", "autotune", "empty_cache", "ConvSpec", "MismatchError", "checking", "check", "CheckResult",
           "__version__"]
