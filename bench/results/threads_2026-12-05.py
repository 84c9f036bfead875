"""The thread-pool figures of RESULTS.md (2026-12-05): torch and cnnfast calls in one process that imported cnnfast
first (so torch uses the OpenMP runtime cnnfast started), microseconds per call, best of 7 repeats.

    python bench/results/threads_2026-12-05.py                     cnnfast's defaults
    GOMP_SPINCOUNT=10000 python bench/results/threads_2026-12-05.py  another spin count (the user's value wins)
    OMP_WAIT_POLICY=PASSIVE python bench/results/threads_2026-12-05.py  the runtime as cnnfast started it before
"""
import os
import timeit

import numpy as np

# isort: off
import cnnfast  # first: it starts Numba's OpenMP runtime, which torch then shares
import torch
import torch.nn.functional as F
# isort: on

rng = np.random.default_rng(0)
x, w = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 3, 3)
a, b = torch.randn(1 << 20), torch.randn(1 << 20)
X, W = rng.standard_normal((8, 64, 56, 56)).astype(np.float32), rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
X2, W2 = (rng.standard_normal((4, 128, 28, 28)).astype(np.float32),
          rng.standard_normal((128, 128, 3, 3)).astype(np.float32))
Xd, Wd = (rng.standard_normal((8, 144, 56, 56)).astype(np.float32),
          rng.standard_normal((144, 1, 3, 3)).astype(np.float32))
xs, ws = x.numpy(), w.numpy()
cases = {
    "torch conv2d 1x1x8x8": (lambda: F.conv2d(x, w, padding=1), 2000),
    "torch add 1M": (lambda: a + b, 500),
    "torch conv2d 8x64@56 3x3": (lambda: F.conv2d(torch.from_numpy(X), torch.from_numpy(W), padding=1), 5),
    "cnnfast conv2d 1x1x8x8": (lambda: cnnfast.conv2d(xs, ws, padding=1), 2000),
    "cnnfast im2col conv2d 8x64@56": (lambda: cnnfast.conv2d(X, W, padding=1, algo="im2col"), 5),
    "cnnfast im2col conv2d_input 4x128@28": (
        lambda: cnnfast.grad.conv2d_input(X2.shape, W2, X2, padding=1, algo="im2col"), 5),
    "cnnfast depthwise conv2d 8x144@56": (lambda: cnnfast.conv2d(Xd, Wd, padding=1, groups=144), 10),
}
setting = os.environ.get("GOMP_SPINCOUNT") or os.environ.get("OMP_WAIT_POLICY") or "cnnfast's defaults"
for name, (fn, number) in cases.items():
    fn()
    best = min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6
    print(f"{setting:18s} {name:38s} {best:9.1f} us", flush=True)
