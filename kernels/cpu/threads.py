"""Start Numba's thread pool so that it does not take the cores from NumPy's BLAS.

im2col alternates Numba parallel regions (building the columns) with BLAS GEMMs on OpenBLAS's own threads.
With Numba's OpenMP layer, GNU OpenMP's workers busy-wait after every region (GOMP_SPINCOUNT), holding the
cores the GEMM then needs: on the 2-core dev box one im2col conv2d took 26-31 ms with its two halves
alternating against 15 ms for the same halves timed apart (bench/RESULTS.md). start() launches the pool with
OMP_WAIT_POLICY=PASSIVE in the environment while Numba's libgomp loads (it reads the variable once, at
load), then restores the environment, so other OpenMP runtimes in the process (torch bundles its own
libgomp) are untouched. A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins; other layers ignore it.
cnnfast/__init__.py calls start() on import: a pool started after torch was imported binds to torch's libgomp
(loaded RTLD_GLOBAL, spinning), and an im2col convolution then runs ~1.7x slower.
"""
import os

from numba.np.ufunc import parallel


def start():
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        parallel._launch_threads()  # idempotent; picks the threading layer (NUMBA_THREADING_LAYER) as usual
    finally:
        del os.environ["OMP_WAIT_POLICY"]
