"""im2col's chunks side by side (kernels/cpu/im2col.py, FUSED_ROWS; bench/RESULTS.md, 2026-12-06, fourteenth session).

    python bench/results/chunks_2026-12-06.py [batch]     forward and weight gradient, algo='im2col', ms:
                                                           column blocks (FUSED_ROWS = 0) against chunks
                                                           (FUSED_ROWS = 4096, every layer here), alternating

Each layer is timed three times each way, alternating in one process; the best of the three medians is printed,
since the VM's speed drifts. With batch 1 (default 4) the chunks hold fewer positions (two per thread at least).
"""
import sys
import time

import numpy as np
from cnnfast.kernels.cpu import im2col

import cnnfast
from cnnfast import grad

LAYERS = {  # name: (input shape without the batch, weight shape, options); rows = C/g*T*R*S
    "stem 7x7 s2 3->64 @224": ((3, 224, 224), (64, 3, 7, 7), dict(stride=2, padding=3)),
    "3x3 16->32 @112": ((16, 112, 112), (32, 16, 3, 3), dict(padding=1)),
    "WaveNet k3 d8 64 @16000": ((64, 16000), (64, 64, 3), dict(padding=8, dilation=8)),
    "1x1 s2 256->512 @56": ((256, 56, 56), (512, 256, 1, 1), dict(stride=2)),
    "3x3 s2 32->64 @112": ((32, 112, 112), (64, 32, 3, 3), dict(stride=2, padding=1)),
    "3x3 32->32 @112": ((32, 112, 112), (32, 32, 3, 3), dict(padding=1)),
    "5x5 16->32 @56": ((16, 56, 56), (32, 16, 5, 5), dict(padding=2)),
    "3x3 48->48 @56": ((48, 56, 56), (48, 48, 3, 3), dict(padding=1)),
    "3x3 64->64 @56": ((64, 56, 56), (64, 64, 3, 3), dict(padding=1)),
    "3x3 s2 64->128 @56": ((64, 56, 56), (128, 64, 3, 3), dict(stride=2, padding=1)),
    "1-D k3 256 @2000": ((256, 2000), (256, 256, 3), dict(padding=1)),
    "3x3 96->96 @56": ((96, 56, 56), (96, 96, 3, 3), dict(padding=1)),
    "3x3 128->128 @28": ((128, 28, 28), (128, 128, 3, 3), dict(padding=1)),
    "3x3 256->256 @14": ((256, 14, 14), (256, 256, 3, 3), dict(padding=1)),
}


def median_ms(fn):
    """Median of 11 calls of fn(), after 2, in ms."""
    fn(), fn()
    times = []
    for _ in range(11):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def compare(x, w, opts):
    """{(primitive, FUSED_ROWS): best median ms} for column blocks (0) and chunks (4096)."""
    nd = x.ndim - 2
    conv, weight_grad = getattr(cnnfast, f"conv{nd}d"), getattr(grad, f"conv{nd}d_weight")
    dy = np.random.default_rng(1).standard_normal(conv(x, w, **opts).shape, dtype=np.float32)
    calls = {"forward": lambda: conv(x, w, algo="im2col", **opts),
             "weight grad": lambda: weight_grad(x, w.shape, dy, algo="im2col", **opts)}
    best = {}
    for _ in range(3):
        for rows in (0, 4096):
            im2col.FUSED_ROWS = rows
            for primitive, call in calls.items():
                best[primitive, rows] = min(best.get((primitive, rows), np.inf), median_ms(call))
    return best


def main(batch):
    rng = np.random.default_rng(0)
    print(f"batch {batch}; ms, column blocks -> chunks (blocks / chunks: > 1 the chunks are faster)")
    for name, (x_shape, w_shape, opts) in LAYERS.items():
        x = rng.standard_normal((batch,) + x_shape, dtype=np.float32)
        best = compare(x, rng.standard_normal(w_shape, dtype=np.float32), opts)
        line = "   ".join(f"{p} {best[p, 0]:6.2f} -> {best[p, 4096]:6.2f} ({best[p, 0] / best[p, 4096]:.2f}x)"
                          for p in ("forward", "weight grad"))
        print(f"  {name:26s} rows {int(np.prod(w_shape[1:])):5d}   {line}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
