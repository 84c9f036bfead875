"""Large CPU results from a pool of mapped blocks (bench/RESULTS.md, 2026-12-07, thirty-third session): ops whose
result is 32 MiB or more, called in a loop as a training script calls them, with the minor page faults per call and
the median time (ms, 15 calls after two; float32; torch's functional op beside, on as many threads, if installed).

    PYTHONPATH=<checkout> NUMBA_CACHE_DIR=<its own> python bench/results/result_pool_2026-12-07.py

Before the pool, glibc served each such result from fresh mmap pages (its largest mmap threshold is 32 MiB) and
unmapped it at free, so every call faulted in and zeroed its result again; torch's CPU tensors still are.
"""
import importlib.util
from functools import partial
from pathlib import Path

import numba
import numpy as np

import cnnfast
from cnnfast import grad

_spec = importlib.util.spec_from_file_location("page_faults", Path(__file__).with_name("page_faults_2026-12-05.py"))
page_faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(page_faults)
measure = page_faults.timed  # (ms, minor page faults per call)
rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


N = 8
x96, w96, dy96 = f32(N, 96, 112, 112), f32(96, 1, 3, 3), f32(N, 96, 56, 56)
x16, w16 = f32(N, 16, 112, 112), f32(96, 16, 1, 1)
x3, w3 = f32(32, 3, 224, 224), f32(64, 3, 7, 7)
CASES = [  # name, result MB, cnnfast call, torch call (on tensors of the same arrays)
    ("depthwise 3x3 96 @112 forward", x96.nbytes, lambda: cnnfast.conv2d(x96, w96, padding=1, groups=96),
     lambda t: t.nn.functional.conv2d(t.from_numpy(x96), t.from_numpy(w96), padding=1, groups=96)),
    ("depthwise 3x3 96 @112 stride 2 input gradient", x96.nbytes,
     lambda: grad.conv2d_input(x96.shape, w96, dy96, stride=2, padding=1, groups=96),
     lambda t: t.ops.aten.convolution_backward(t.from_numpy(dy96), t.from_numpy(x96), t.from_numpy(w96), None,
                                               [2, 2], [1, 1], [1, 1], False, [0, 0], 96, [True, False, False])[0]),
    ("1x1 16 -> 96 @112 forward", x96.nbytes, lambda: cnnfast.conv2d(x16, w16),
     lambda t: t.nn.functional.conv2d(t.from_numpy(x16), t.from_numpy(w16))),
    ("stem 7x7 stride 2 3 -> 64 @224 batch 32 forward", 32 * 64 * 112 * 112 * 4,
     lambda: cnnfast.conv2d(x3, w3, stride=2, padding=3),
     lambda t: t.nn.functional.conv2d(t.from_numpy(x3), t.from_numpy(w3), stride=2, padding=3)),
]

try:
    import torch
    torch.set_num_threads(numba.get_num_threads())
except ImportError:
    torch = None
for name, nbytes, ours, theirs in CASES:
    ms, minflt = measure(ours)
    row = f"{name} (batch {N} unless named, result {nbytes / 1e6:.1f} MB): cnnfast {ms:7.2f} ms, {minflt:6.0f} faults"
    if torch is not None:
        with torch.no_grad():
            ms, minflt = measure(partial(theirs, torch))
        row += f"; torch {ms:7.2f} ms, {minflt:6.0f} faults"
    print(row, flush=True)
