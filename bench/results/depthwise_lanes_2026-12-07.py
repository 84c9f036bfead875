"""Depthwise CPU layers, ms per call (min of 7 x 20 calls), algo='auto' (bench/RESULTS.md, 2026-12-07, thirtieth
session).

    PYTHONPATH=<checkout> NUMBA_CACHE_DIR=<its own> python bench/results/depthwise_lanes_2026-12-07.py [NAME...]

Run it from outside the checkouts, once per checkout (the one before the change, then this one, alternating: the
VM's speed drifts), each with its own NUMBA_CACHE_DIR. NAME keeps the rows whose name contains it. Small planes take
the lanes kernels (up to depthwise.LANES_POSITIONS positions; the weight gradient's: LANES_FILTER_POSITIONS, at a
stride LANES_STRIDED_FILTER_POSITIONS), larger ones the wide kernels, the strided input gradient the sub-pixel classes
kernel (thirty-first session: also used for the interleave's loops of a constant count and the new thresholds).
"""
import sys
import timeit
from functools import partial

import numpy as np

import cnnfast
from cnnfast import grad

LAYERS = [  # (batch, channels, plane side, kernel side, stride, channel multiplier)
    (4, 960, 7, 3, 1, 1), (4, 1152, 7, 5, 1, 1), (32, 960, 7, 3, 1, 1), (8, 576, 14, 3, 2, 1), (8, 1280, 4, 3, 1, 1),
    (4, 144, 56, 3, 1, 1), (8, 240, 28, 5, 1, 1), (4, 32, 7, 3, 1, 4), (8, 672, 14, 5, 2, 1),
]
rng = np.random.default_rng(0)
wanted = sys.argv[1:]
for N, C, H, k, s, M in LAYERS:
    x = rng.standard_normal((N, C, H, H)).astype(np.float32)
    w = rng.standard_normal((C * M, 1, k, k)).astype(np.float32)
    options = dict(stride=s, padding=k // 2, groups=C)
    y = cnnfast.conv2d(x, w, **options)
    calls = {"forward": partial(cnnfast.conv2d, x, w, **options),
             "input gradient": partial(grad.conv2d_input, x.shape, w, y, **options),
             "weight gradient": partial(grad.conv2d_weight, x, w.shape, y, **options)}
    for primitive, call in calls.items():
        name = f"{N}x{C}x{H}x{H} {k}x{k} stride {s} multiplier {M} {primitive}"
        if wanted and not any(part in name for part in wanted):
            continue
        call()
        print(f"{name:54s} {min(timeit.repeat(call, number=20, repeat=7)) / 20 * 1e3:8.3f}", flush=True)
