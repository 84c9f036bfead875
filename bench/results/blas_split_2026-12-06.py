"""cnnfast's GEMMs split over the cores by cnnfast (kernels/cpu/blas.py; bench/RESULTS.md, 2026-12-06).

    OPENBLAS_THREAD_TIMEOUT=4 python bench/results/blas_split_2026-12-06.py gemms
                                                               one stack or GEMM: OpenBLAS's threads vs the split
                                                               (with OpenBLAS's default timeout its workers spin
                                                               after each np.matmul timed here, on the cores the
                                                               split's threads then need)
    python bench/results/blas_split_2026-12-06.py ops          auto on the CPU anchor layers (batch 4), ms
    FIRST=cnnfast python bench/results/blas_split_2026-12-06.py ops                cnnfast imported before NumPy
    PYTHONPATH=/tmp/old NUMBA_CACHE_DIR=/tmp/old-cache python bench/...py ops      the code before (no blas.py)

`ops` imports NumPy first, as most scripts do (OpenBLAS then keeps its default thread timeout, 2**28 cycles:
its workers spin ~0.1 s after each GEMM), unless FIRST=cnnfast (cnnfast then sets OPENBLAS_THREAD_TIMEOUT=4 before
NumPy loads OpenBLAS). Run each version in its own process, alternating: the VM's speed drifts.
"""
import os
import sys
import time

if os.environ.get("FIRST") == "cnnfast":
    import cnnfast  # noqa: F401  (before NumPy: OpenBLAS then reads cnnfast's short thread timeout)
import numpy as np  # noqa: E402

import cnnfast  # noqa: E402
from cnnfast import grad  # noqa: E402


def median_ms(fn, *args, **kwargs):
    """Median of 11 calls of fn(*args, **kwargs), after 2, in ms."""
    fn(*args, **kwargs), fn(*args, **kwargs)
    times = []
    for _ in range(11):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def gemms():
    from cnnfast.kernels.cpu import blas
    rng = np.random.default_rng(0)
    cases = {  # name: (stack, M, K, N, a shared by the stack)
        "winograd 64@56 b4": (36, 64, 64, 784, False), "winograd 128@28 b4": (36, 128, 128, 196, False),
        "winograd 256@14 b8": (36, 256, 256, 128, False), "im2col 64@56 per sample": (4, 64, 576, 3136, True),
        "stem forward": (1, 64, 147, 4 * 12544, True), "256@14 forward": (1, 256, 2304, 784, True),
        "512@7 backward_data": (1, 4608, 512, 196, True),
    }
    lib = blas.openblas()
    print(f"OpenBLAS found: {lib is not None}, {lib.get_num_threads() if lib else '-'} threads; GFLOP/s:")
    for name, (s, m, k, n, shared) in cases.items():
        a = rng.standard_normal((m, k) if shared else (s, m, k), dtype=np.float32)
        b = rng.standard_normal((s, k, n) if s > 1 else (k, n), dtype=np.float32)
        out = np.empty((s, m, n) if s > 1 else (m, n), np.float32)
        gflop = 2 * s * m * k * n / 1e6
        own = median_ms(np.matmul, a, b, out=out)
        split = {}
        for spin in (False, True):  # stacks only (OpenBLAS's workers sleep), every product (they spin)
            blas.WORKERS_SPIN = spin
            split[spin] = median_ms(blas.matmul, a, b, out)
        print(f"  {name:26s} OpenBLAS's threads {gflop / own:5.0f}   blas.matmul: stacks cut "
              f"{gflop / split[False]:5.0f}, every product cut {gflop / split[True]:5.0f}")


def ops():
    rng = np.random.default_rng(0)

    def r(*shape):
        return rng.standard_normal(shape, dtype=np.float32)
    layers = {
        "stem": (r(4, 3, 224, 224), r(64, 3, 7, 7), dict(stride=2, padding=3)),
        "64@56": (r(4, 64, 56, 56), r(64, 64, 3, 3), dict(padding=1)),
        "1x1": (r(4, 256, 56, 56), r(64, 256, 1, 1), {}),
        "128@28": (r(4, 128, 28, 28), r(128, 128, 3, 3), dict(padding=1)),
        "256@14": (r(4, 256, 14, 14), r(256, 256, 3, 3), dict(padding=1)),
        "512@7": (r(4, 512, 7, 7), r(512, 512, 3, 3), dict(padding=1)),
        "wavenet": (r(2, 64, 16000), r(64, 64, 3), dict(padding=8, dilation=8)),
    }
    times, cells = [], []
    for name, (x, w, kw) in layers.items():
        nd = x.ndim - 2
        conv, dx, dw = (getattr(cnnfast, f"conv{nd}d"), getattr(grad, f"conv{nd}d_input"),
                        getattr(grad, f"conv{nd}d_weight"))
        y = conv(x, w, **kw)
        row = (median_ms(conv, x, w, **kw), median_ms(dx, x.shape, w, y, **kw), median_ms(dw, x, w.shape, y, **kw))
        times.append(row)
        cells.append(f"{name} " + " ".join(f"{v:.2f}" for v in row))
    mean = np.exp(np.log(np.array(times)).mean(0))
    print(f"first={os.environ.get('FIRST', 'numpy')}: geometric mean ms (forward, backward_data, backward_filter) "
          + " ".join(f"{v:.2f}" for v in mean) + " | " + " | ".join(cells))


if __name__ == "__main__":
    {"gemms": gemms, "ops": ops}[sys.argv[1] if len(sys.argv) > 1 else "ops"]()
