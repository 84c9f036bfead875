"""CPU benchmarks with pytest-benchmark over cnnfast.benchmark's shape sets, and a whole model (torch).

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


@pytest.mark.parametrize("provider", ["cnnfast", "torch"])
def test_cpu_host_cost(benchmark, provider):
    """The cost of one call on a problem too small to matter (1x1x8x8 by one 3x3 filter): checks, planning
    (a cached plan after the first call), launch and result."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 1, 8, 8)).astype(np.float32), rng.standard_normal((1, 1, 3, 3)).astype(np.float32)
    if provider == "torch":
        torch = pytest.importorskip("torch")
        xt, wt = torch.from_numpy(x), torch.from_numpy(w)
        fn = lambda: torch.nn.functional.conv2d(xt, wt, padding=1)  # noqa: E731
    else:
        import cnnfast
        from cnnfast import reference
        fn = lambda: cnnfast.conv2d(x, w, padding=1)  # noqa: E731
        compare.assert_close(fn(), reference.conv(x.astype(np.float64), w.astype(np.float64), padding=1), "float32")
    benchmark(fn)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("provider", ["cnnfast", "torch"])
def test_cpu_model(benchmark, provider, batch):
    """MobileNetV2's inference (bench/models.py) with torch's convolutions or cnnfast's (cnnfast.torch.replace_convs),
    its output first checked against the same model in float64 on torch's convolutions."""
    torch = pytest.importorskip("torch")
    import models

    import cnnfast.torch as cf
    model = models.mobilenetv2()
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    if provider == "cnnfast":
        model = cf.replace_convs(model)
    with torch.no_grad():
        expected = models.mobilenetv2().double()(x.double())  # (a fresh model: the same weights)
        compare.assert_close(model(x).numpy(), expected.numpy(), "float32")
        benchmark(model, x)


@pytest.mark.parametrize("provider", ["cnnfast", "torch"])
def test_cpu_model_training_step(benchmark, provider):
    """A training step of MobileNetV2 (bench/models.py, batch 8: forward, loss, backward through every convolution's
    input and weight gradients, batch-norm on the batch's statistics) with torch's convolutions or cnnfast's. cnnfast's
    convolutions' weight gradients are first checked in float64 against the same step on torch's (a whole network's
    float32 gradients are ~1e-3 from its float64 ones on either's convolutions: no check at float32's tolerance; some
    batch-norm gradients are zero up to rounding); the float32 step is timed."""
    torch = pytest.importorskip("torch")
    import models

    import cnnfast.torch as cf
    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def network(dtype, ours):
        model = models.mobilenetv2().to(dtype).train()
        return cf.replace_convs(model) if ours else model

    def step(model, x):
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    if provider == "cnnfast":
        ours, theirs = network(torch.float64, True), network(torch.float64, False)
        step(ours, x.double())
        step(theirs, x.double())
        convolutions = [(name, p, q) for (name, p), q in zip(ours.named_parameters(), theirs.parameters())
                        if p.dim() == 4]
        assert len(convolutions) == 52
        for name, p, q in convolutions:
            compare.assert_close(p.grad.numpy(), q.grad.numpy(), "float64", name)
    benchmark(step, network(torch.float32, provider == "cnnfast"), x)
