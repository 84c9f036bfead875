"""Winograd's scratch from the pool (bench/RESULTS.md, 2026-12-07, thirty-third session): 3x3 weight gradients whose
one scratch buffer is 32 MiB or more (256 @14, batch 16 and 32), with a forward and a 128 @28 one (under 32 MiB)
beside, float32, median of 15 calls in a loop (ms) and the minor page faults per call.

    PYTHONPATH=<checkout> NUMBA_CACHE_DIR=<its own> python bench/results/scratch_pool_2026-12-07.py
"""
import importlib.util
from functools import partial
from pathlib import Path

import numpy as np

import cnnfast
from cnnfast import grad

_spec = importlib.util.spec_from_file_location("page_faults", Path(__file__).with_name("page_faults_2026-12-05.py"))
page_faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(page_faults)
rng = np.random.default_rng(0)
for n, c, hw, primitive in ((16, 256, 14, "weight"), (32, 256, 14, "weight"), (32, 256, 14, "forward"),
                            (32, 128, 28, "weight")):
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    w = rng.standard_normal((c, c, 3, 3)).astype(np.float32)
    op, name, args = ((cnnfast.conv2d, "conv2d", (x, w)) if primitive == "forward"
                      else (grad.conv2d_weight, "conv2d_weight", (x, w.shape, x)))
    plan = cnnfast.explain(name, *args, padding=1)
    call = partial(op, *args, padding=1)
    ms, faults = page_faults.timed(call)
    print(f"3x3 {c} @{hw} batch {n} {primitive} [{plan.algorithm}, scratch {plan.workspace_bytes / 2**20:.1f} MiB]: "
          f"{ms:6.2f} ms, {faults:5.0f} faults a call", flush=True)
