"""Host time of the raw launch path before the driver (launch._launch_raw with a stand-in for CuPy's
cuLaunchKernel, and the launch's argument kinds), no GPU and no CuPy needed (RESULTS.md, 2026-12-05).

    python bench/results/raw_launch_2026-12-05.py
"""
import sys
import timeit
import types

import numpy as np

driver = types.ModuleType("cupy_backends.cuda.api.driver")
driver.launchKernel = lambda *args: None
for name in ("cupy_backends", "cupy_backends.cuda", "cupy_backends.cuda.api"):
    sys.modules[name] = types.ModuleType(name)
sys.modules["cupy_backends.cuda.api.driver"] = sys.modules["cupy_backends.cuda.api"].driver = driver

from cnnfast.kernels.cuda import launch  # noqa: E402


class CupyArray:  # what the raw path reads of a CuPy array
    class data:
        ptr = 0x7F0000001000
    dtype = np.dtype(np.float32)


function = types.SimpleNamespace(ptr=1)
cases = {"depthwise plane_kernel: 4 arrays, 36 + 1 ints (41 params)": [CupyArray()] * 4 + [tuple(range(36)), 1],
         "tiled GEMM: 5 arrays, 22 + 4 ints (31 params)": [CupyArray()] * 5 + [tuple(range(22)), 0, 1, 64, 0]}
for name, args in cases.items():
    raw = min(timeit.repeat(lambda a=args: launch._launch_raw(function, (4, 2, 3), 256, 0, a),
                            number=20000, repeat=5)) / 20000 * 1e6
    kinds = min(timeit.repeat(lambda a=args: tuple(launch._kind(v) for v in a), number=20000, repeat=5)) / 20000 * 1e6
    print(f"{name:60s} _launch_raw {raw:5.2f} us, argument kinds {kinds:5.2f} us")
