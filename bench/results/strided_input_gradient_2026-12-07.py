"""The strided depthwise input gradient on the CPU (bench/RESULTS.md, 2026-12-07, thirty-second session), float32.

    PYTHONPATH=<checkout> NUMBA_CACHE_DIR=<its own> \
        python bench/results/strided_input_gradient_2026-12-07.py [sweep | C@H]

Two tables, ms per call (min of 7 x 20 calls):
  layers: the stride-2 depthwise layers of MobileNetV2 and EfficientNet-B0 (224 x 224 inputs, batch 8): cnnfast's
          kernels (depthwise.backward_data into a preallocated dx), its grad.conv2d_input (algo='auto': the kernels
          and a fresh result's page faults) and, where torch is installed, torch.ops.aten.convolution_backward's input
          gradient on as many threads (each validated against the other first); C@H (e.g. 144@56) keeps the layers
          of C channels at H x H. Run each layer in a process of its own: in one process torch's time for a layer
          depended on the layers before it (8 x 144 x 56 x 56 3x3: 1.4 ms first, 8.5 ms after 96 @112; glibc's
          malloc raises its threshold for fresh pages after large frees), and so did cnnfast's 96 @112 (3.3-7 ms);
  sweep:  (argument `sweep`) the two plane kernels into a preallocated dx, lanes (depthwise_lanes_classes_cpu) /
          wide (depthwise_wide_classes_cpu), stride 2, batch 8, ~47,000 dx positions x channels a sample, the
          evidence for depthwise.LANES_STRIDED_DATA_POSITIONS.
Run it from outside the checkout, with nothing else running (the VM's speed drifts).
"""
import sys
import timeit
from functools import partial

import numba
import numpy as np
from cnnfast.kernels.contract import make_geometry
from cnnfast.kernels.cpu import depthwise

from cnnfast import grad

LAYERS = [(96, 112, 3), (144, 56, 3), (144, 56, 5), (192, 28, 3), (240, 28, 3), (576, 14, 3), (672, 14, 5)]
N = 8
rng = np.random.default_rng(0)


def ms(call):
    call()
    return min(timeit.repeat(call, number=20, repeat=7)) / 20 * 1e3


def layers(wanted):
    try:
        import torch
        torch.set_num_threads(numba.get_num_threads())
    except ImportError:
        torch = None
    for C, H, k in LAYERS:
        if wanted and f"{C}@{H}" not in wanted:
            continue
        P = (H + 2 * (k // 2) - k) // 2 + 1
        w = rng.standard_normal((C, 1, k, k)).astype(np.float32)
        dy = rng.standard_normal((N, C, P, P)).astype(np.float32)
        ours = partial(grad.conv2d_input, (N, C, H, H), w, dy, stride=2, padding=k // 2, groups=C)
        g = make_geometry((N, C, 1, H, H), (C, 1, 1, k, k), (1, 2, 2), ((0, 0), (k // 2,) * 2, (k // 2,) * 2),
                          (1, 1, 1), C)
        dx = np.empty((N, C, 1, H, H), np.float32)
        kernels = partial(depthwise.backward_data, dy[:, :, None], w[:, :, None], dx, g)
        kernels()
        assert np.array_equal(dx[:, :, 0], ours())
        row = (f"{N} x {C} x {H} x {H} {k}x{k} stride 2 [{depthwise.family(g, 'backward_data', 4, None)}]: kernels "
               f"{ms(kernels):7.3f}  cnnfast {ms(ours):7.3f}")
        if torch is not None:
            x, wt, dyt = torch.empty(N, C, H, H), torch.from_numpy(w), torch.from_numpy(dy)
            theirs = partial(torch.ops.aten.convolution_backward, dyt, x, wt, None, [2, 2], [k // 2] * 2, [1, 1], False,
                             [0, 0], C, [True, False, False])
            assert np.allclose(ours(), theirs()[0].numpy(), rtol=1e-4, atol=1e-4)
            row += f"  torch {ms(theirs):7.3f}"
        print(row, flush=True)


def sweep():
    for k in (3, 5):
        for H in (7, 10, 14, 20, 24, 28, 40, 56):
            C = max(32, round(47000 / (H * H) / 16) * 16)
            P = (H + 2 * (k // 2) - k) // 2 + 1
            dy = rng.standard_normal((N, C, 1, P, P)).astype(np.float32)
            w = rng.standard_normal((C, 1, 1, k, k)).astype(np.float32)
            g = make_geometry((N, C, 1, H, H), w.shape, (1, 2, 2), ((0, 0), (k // 2,) * 2, (k // 2,) * 2), (1, 1, 1), C)
            dx = np.empty((N, C, 1, H, H), np.float32)
            times = []
            for most in (10 ** 9, 0):  # lanes, then wide
                depthwise.LANES_STRIDED_DATA_POSITIONS = most
                times.append(ms(partial(depthwise.backward_data, dy, w, dx, g)))
            print(f"{k}x{k} stride 2, {C} channels, dx {H} x {H}: lanes {times[0]:.3f} / wide {times[1]:.3f}",
                  flush=True)


sweep() if sys.argv[1:] == ["sweep"] else layers(sys.argv[1:])
