"""MobileNetV2's training step (bench/models.py, batch 8, float32, batch-norm on the batch's statistics: forward, loss,
backward) on torch's convolutions and on cnnfast's, ms (min of 5 steps after 2; bench/RESULTS.md, 2026-12-07,
thirty-first session). bench/test_cpu.py::test_cpu_model_training_step times the same step with pytest-benchmark.

    PYTHONPATH=<checkout> NUMBA_CACHE_DIR=<its own> python bench/results/training_step_2026-12-07.py

Run it from outside the checkouts, once per checkout, alternating, each with its own NUMBA_CACHE_DIR.
"""
import os  # noqa: I001 (cnnfast before torch: it starts Numba's thread pool first)
import sys
import timeit

import cnnfast.torch as cf
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import models  # noqa: E402

x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def step(model):
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


for name, model in (("torch", models.mobilenetv2().train()),
                    ("cnnfast", cf.replace_convs(models.mobilenetv2().train()))):
    for _ in range(2):
        step(model)
    print(f"{name:8s} {min(timeit.repeat(lambda m=model: step(m), number=1, repeat=5)) * 1e3:8.1f} ms", flush=True)
