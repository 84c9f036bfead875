"""The seventeenth session's side-by-side check of the CPU auto rules (bench/RESULTS.md): algo="auto" against
explicit algorithms on the layers a review found auto slow on, interleaved, median of 9, in ms.

    python bench/results/auto_rules_2026-12-06.py
"""
import time

import numpy as np

import cnnfast
from cnnfast import grad

PRIMITIVES = ("forward", "backward_data", "backward_filter")
CASES = [  # (name, input shape, weight shape, options, explicit algorithms timed beside auto)
    ("1d 1->64 k10 s5", (1, 1, 16000), (64, 1, 10), dict(stride=5), ["im2col", "direct"]),
    ("2d 1->64 @256", (1, 1, 256, 256), (64, 1, 3, 3), dict(padding=1), ["im2col", "direct"]),
    ("unet in 1->16 @256 b4", (4, 1, 256, 256), (16, 1, 3, 3), dict(padding=1), ["im2col", "direct"]),
    ("quartznet k33 dw", (8, 256, 400), (256, 1, 33), dict(padding=16, groups=256), ["direct"]),
    ("resnext g32 @56", (1, 128, 56, 56), (128, 4, 3, 3), dict(padding=1, groups=32), ["im2col", "winograd"]),
    ("grouped 1x1 g4", (8, 64, 28, 28), (16, 16, 1, 1), dict(groups=4), ["im2col"]),
    ("vgg conv1_1", (1, 3, 224, 224), (64, 3, 3, 3), dict(padding=1), ["im2col"]),
    ("8->8 @8 b32", (32, 8, 8, 8), (8, 8, 3, 3), dict(padding=1), ["im2col", "winograd"]),
    ("resnext stage2 g32 @28", (1, 256, 28, 28), (256, 8, 3, 3), dict(padding=1, groups=32), ["im2col"]),
]


def ops(nd):
    """primitive -> (public function, op name for explain)."""
    return {"forward": (getattr(cnnfast, f"conv{nd}d"), f"conv{nd}d"),
            "backward_data": (getattr(grad, f"conv{nd}d_input"), f"conv{nd}d_input"),
            "backward_filter": (getattr(grad, f"conv{nd}d_weight"), f"conv{nd}d_weight")}


def run(rng, name, xs, ws, primitive, algos, **kw):
    fns = ops(len(xs) - 2)
    x, w = (rng.standard_normal(s).astype(np.float32) for s in (xs, ws))
    dy = rng.standard_normal(fns["forward"][0](x, w, **kw).shape).astype(np.float32)
    fn, op = fns[primitive]
    args = {"forward": (x, w), "backward_data": (xs, w, dy), "backward_filter": (x, ws, dy)}[primitive]
    picked = cnnfast.explain(op, *args, **kw).algorithm
    candidates = ["auto", *algos]
    for algo in candidates * 2:  # warm-up (compilation)
        fn(*args, algo=algo, **kw)
    times = {algo: [] for algo in candidates}
    for _ in range(9):
        for algo in candidates:
            start = time.perf_counter()
            fn(*args, algo=algo, **kw)
            times[algo].append(time.perf_counter() - start)
    medians = " ".join(f"{algo}={np.median(t) * 1e3:.2f}" for algo, t in times.items())
    print(f"{name:24s} {primitive:15s} auto={picked:9s} {medians}", flush=True)


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    for name, xs, ws, kw, algos in CASES:
        for primitive in PRIMITIVES:
            run(rng, name, xs, ws, primitive, algos, **kw)
