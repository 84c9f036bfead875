"""CPU im2col timings behind bench/RESULTS.md (2026-12-05, twelfth session): the column kernels alone, then whole
im2col ops. Run it on two versions back to back for a before/after (the VM's speed drifts by up to 2x within
minutes), e.g. an older commit from a `git archive` laid out as a package:

    python bench/results/im2col_2026-12-05.py [kernels|ops]
    PYTHONPATH=/tmp/old NUMBA_CACHE_DIR=/tmp/old-cache python bench/results/im2col_2026-12-05.py [kernels|ops]
"""
import sys
import time

import numpy as np
from cnnfast.kernels.cpu import im2col

import cnnfast
from cnnfast import grad


def median_ms(fn, repeats=15):
    fn(), fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


# name: (x shape, w shape, stride, padding, dilation); batch 4 as in `cnnfast bench --shapes cpu` (WaveNet 2)
LAYERS = {"stem 7x7 s2 3->64 @224": ((4, 3, 224, 224), (64, 3, 7, 7), 2, 3, 1),
          "3x3 64@56": ((4, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1),
          "3x3 128@28": ((4, 128, 28, 28), (128, 128, 3, 3), 1, 1, 1),
          "3x3 256@14": ((4, 256, 14, 14), (256, 256, 3, 3), 1, 1, 1),
          "3x3 512@7": ((4, 512, 7, 7), (512, 512, 3, 3), 1, 1, 1),
          "1-D k3 d8 64@16000": ((2, 64, 16000), (64, 64, 3), 1, 8, 8)}


def kernels():
    """im2col_cpu and col2im_cpu on the whole batch as one block (every sample, every position)."""
    for name, layer in LAYERS.items():
        megabytes, forward, back = _kernel_times(*layer)
        print(f"{name:22s} columns {megabytes:5.1f} MB: im2col_cpu {forward:6.2f} ms, col2im_cpu {back:6.2f} ms")


def _kernel_times(xs, ws, s, p, d):
    rng = np.random.default_rng(0)
    g = cnnfast.ConvSpec.create(f"conv{len(xs) - 2}d", xs, ws, stride=s, padding=p, dilation=d).geometry
    x = rng.standard_normal((g.N, g.C, g.D, g.H, g.W)).astype(np.float32)
    taps, O = np.array([g.T, g.R, g.S], np.int64), g.P * g.Q * g.U
    cols = np.empty((g.C * g.T * g.R * g.S, g.N, O), np.float32)
    args = (g.stride_d, g.stride_h, g.stride_w, g.dil_d, g.dil_h, g.dil_w, g.pad_d, g.pad_h, g.pad_w)
    forward = median_ms(lambda: im2col.im2col_cpu(x, 0, 0, cols, taps, 0, *args, g.Q, g.U))
    dcols = rng.standard_normal(cols.shape).astype(np.float32)
    dx = np.zeros_like(x)
    flag = (True,) if im2col.col2im_cpu.py_func.__code__.co_argcount == 19 else ()  # by_plane, since 2026-12-05
    back = median_ms(lambda: im2col.col2im_cpu(dcols, dx, 0, 0, taps, 0, *args, g.P, g.Q, g.U, *flag))
    return cols.nbytes / 1e6, forward, back


def ops():
    """The three primitives with algo='im2col' (float32)."""
    for name, layer in LAYERS.items():
        forward, back, weight = _op_times(*layer)
        print(f"{name:22s} forward {forward:6.2f} ms, backward_data {back:6.2f} ms, backward_filter {weight:6.2f} ms")


def _op_times(xs, ws, s, p, d):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(xs).astype(np.float32), rng.standard_normal(ws).astype(np.float32)
    nd = f"conv{len(xs) - 2}d"
    conv, conv_input, conv_weight = getattr(cnnfast, nd), getattr(grad, f"{nd}_input"), getattr(grad, f"{nd}_weight")
    opts = dict(stride=s, padding=p, dilation=d, algo="im2col")
    dy = rng.standard_normal(conv(x, w, **opts).shape).astype(np.float32)
    return (median_ms(lambda: conv(x, w, **opts)), median_ms(lambda: conv_input(x.shape, w, dy, **opts)),
            median_ms(lambda: conv_weight(x, w.shape, dy, **opts)))


if __name__ == "__main__":
    {"kernels": kernels, "ops": ops}[sys.argv[1] if len(sys.argv) > 1 else "kernels"]()
