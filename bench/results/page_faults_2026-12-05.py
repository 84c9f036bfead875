"""Scratch page-faulted again at every call (bench/RESULTS.md, 2026-12-05, twelfth session): one op called in a loop
in a fresh process, as a training script would, with the minor page faults per call (MB) and the median time.

    python bench/results/page_faults_2026-12-05.py
    PYTHONPATH=/tmp/old NUMBA_CACHE_DIR=/tmp/old-cache python bench/results/page_faults_2026-12-05.py   (before)

Winograd allocated its transform buffers apart (2 or 4 arrays); glibc trims its heap when the freed space at its
top exceeds twice its latest mmap threshold, so they went back to the system after each call and were faulted in
at the next. How much shows depends on the process's allocation history: in pytest-benchmark's process the same
calls faulted nothing.
"""
import resource
import time

import numpy as np

import cnnfast
from cnnfast import grad


def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn, calls=15):
    """fn's median time over `calls` calls after two, ms, and the minor page faults per call (each result freed
    before the next call; bench/results/result_pool_2026-12-07.py takes it too)."""
    fn(), fn()
    times, before = [], faults()
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3), (faults() - before) / calls


def measure(fn, calls=15):
    ms, per_call = timed(fn, calls)
    return ms, per_call * resource.getpagesize() / 1e6


def layer(n, c, hw, algo):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    w = rng.standard_normal((c, c, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    return [measure(lambda: cnnfast.conv2d(x, w, padding=1, algo=algo)),
            measure(lambda: grad.conv2d_input(x.shape, w, dy, padding=1, algo=algo)),
            measure(lambda: grad.conv2d_weight(x, w.shape, dy, padding=1, algo=algo))]


if __name__ == "__main__":
    for n, c, hw in ((4, 64, 56), (4, 128, 28), (8, 256, 14)):
        for algo in ("winograd", "im2col"):
            cells = " | ".join(f"{ms:6.2f} ms, {mb:4.1f} MB faulted" for ms, mb in layer(n, c, hw, algo))
            print(f"3x3 {c}@{hw} batch {n} {algo:8s} forward / backward_data / backward_filter: {cells}", flush=True)
