"""CPU benchmarks with pytest-benchmark over cnnfast.benchmark's shape sets.

    pytest bench/test_cpu.py --benchmark-group-by=param:shape          (CNNFAST_BENCH_SHAPES=cpu for the full set)

Each case validates cnnfast's result against the float64 reference before timing it.
"""
import os

import numpy as np
import pytest

from cnnfast import benchmark as harness
from cnnfast import compare

SHAPES = harness.SHAPE_SETS[os.environ.get("CNNFAST_BENCH_SHAPES", "quick")]


@pytest.mark.parametrize("primitive", harness.PRIMITIVES)
@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
@pytest.mark.parametrize("provider", ["cnnfast:auto", "torch"])
def test_cpu(benchmark, shape, primitive, provider):
    spec = harness.spec_of(shape, "float32")
    arrays = harness.inputs(shape, spec, "float32")
    if provider == "torch":
        pytest.importorskip("torch").set_num_threads(os.cpu_count())
        fn = harness.torch_call(shape, primitive, dict(arrays, spec=spec), "cpu")
        if fn is None:
            pytest.skip("torch has no asymmetric padding")
    else:
        fn = harness.cnnfast_call(shape, primitive, arrays, "auto")
        compare.assert_close(np.asarray(fn()), harness.reference_result(shape, primitive, arrays), "float32")
    benchmark.extra_info.update(flops=spec.flops, bytes=spec.min_bytes(primitive))
    benchmark(fn)
