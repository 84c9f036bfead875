"""The depthwise layers of MobileNetV2 and EfficientNet-B0 (224 x 224 inputs), ms per call (min of 5 x 10 calls),
algo='auto', float32, each layer's forward, input gradient and weight gradient, and their sums (bench/RESULTS.md,
2026-12-07, thirty-first session).

    PYTHONPATH=<checkout> NUMBA_CACHE_DIR=<its own> python bench/results/depthwise_models_2026-12-07.py [BATCH]

Run it from outside the checkouts, once per checkout, alternating (the VM's speed drifts), each with its own
NUMBA_CACHE_DIR. BATCH defaults to 8.
"""
import sys
import timeit
from functools import partial

import numpy as np

import cnnfast
from cnnfast import grad

LAYERS = [  # (model, channels, input side, kernel side, stride)
    ("MobileNetV2", 32, 112, 3, 1), ("MobileNetV2", 96, 112, 3, 2), ("MobileNetV2", 144, 56, 3, 1),
    ("MobileNetV2", 144, 56, 3, 2), ("MobileNetV2", 192, 28, 3, 1), ("MobileNetV2", 192, 28, 3, 2),
    ("MobileNetV2", 384, 14, 3, 1), ("MobileNetV2", 576, 14, 3, 1), ("MobileNetV2", 576, 14, 3, 2),
    ("MobileNetV2", 960, 7, 3, 1),
    ("EfficientNet-B0", 32, 112, 3, 1), ("EfficientNet-B0", 96, 112, 3, 2), ("EfficientNet-B0", 144, 56, 3, 1),
    ("EfficientNet-B0", 144, 56, 5, 2), ("EfficientNet-B0", 240, 28, 5, 1), ("EfficientNet-B0", 240, 28, 3, 2),
    ("EfficientNet-B0", 480, 14, 3, 1), ("EfficientNet-B0", 480, 14, 5, 1), ("EfficientNet-B0", 672, 14, 5, 1),
    ("EfficientNet-B0", 672, 14, 5, 2), ("EfficientNet-B0", 1152, 7, 5, 1), ("EfficientNet-B0", 1152, 7, 3, 1),
]
N = int(sys.argv[1]) if len(sys.argv) > 1 else 8
rng = np.random.default_rng(0)
sums = {}
for model, C, H, k, s in LAYERS:
    x = rng.standard_normal((N, C, H, H)).astype(np.float32)
    w = rng.standard_normal((C, 1, k, k)).astype(np.float32)
    options = dict(stride=s, padding=k // 2, groups=C)
    y = cnnfast.conv2d(x, w, **options)
    calls = {"forward": partial(cnnfast.conv2d, x, w, **options),
             "input gradient": partial(grad.conv2d_input, x.shape, w, y, **options),
             "weight gradient": partial(grad.conv2d_weight, x, w.shape, y, **options)}
    times = []
    for primitive, call in calls.items():
        call()
        ms = min(timeit.repeat(call, number=10, repeat=5)) / 10 * 1e3
        sums[model, primitive] = sums.get((model, primitive), 0.0) + ms
        times.append(ms)
    print(f"{model:16s} {N}x{C}x{H}x{H} {k}x{k} stride {s}: " + " / ".join(f"{t:7.3f}" for t in times), flush=True)
for (model, primitive), ms in sums.items():
    print(f"{model:16s} sum {primitive:16s} {ms:8.3f}")
