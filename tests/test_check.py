"""Check mode: cnnfast.checking(), CNNFAST_CHECK=1 and cnnfast.check() compare every op with the float64
reference; a deliberately broken kernel must be caught and named, a correct one must pass silently."""
import dataclasses

import cnnfast.kernels.cpu as cpu_kernels  # noqa: I001
import numpy as np
import pytest

import cnnfast
from cnnfast import compare, reference
from cnnfast.compare import TOLERANCE, relative_error


@pytest.fixture
def broken_direct(monkeypatch):
    """The CPU direct forward kernel with one output element off by one."""
    good = cpu_kernels.ALGORITHMS["direct"]

    def forward(x, w, bias, y, g, **kw):
        good.forward(x, w, bias, y, g, **kw)
        y[0, 1, 0, 2, 3] += 1.0

    monkeypatch.setitem(cpu_kernels.ALGORITHMS, "direct", dataclasses.replace(good, forward=forward))


def _layer(dtype="float32"):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((2, 3, 6, 6)).astype(dtype), rng.standard_normal((4, 3, 3, 3)).astype(dtype),
            rng.standard_normal(4).astype(dtype))


def test_checking_raises_a_named_mismatch(broken_direct):
    x, w, b = _layer()
    cnnfast.conv2d(x, w, b, padding=1, algo="direct")  # check mode off: the wrong result goes unnoticed
    with cnnfast.checking(), pytest.raises(cnnfast.MismatchError) as info:
        cnnfast.conv2d(x, w, b, padding=1, algo="direct")
    e = info.value
    assert e.index == (0, 1, 2, 3) and e.tolerance == TOLERANCE["float32"] and e.error > 0.01
    assert e.actual == pytest.approx(e.expected + 1.0, rel=1e-5)
    for part in ("conv2d", "'direct'", "cpu", "(0, 1, 2, 3)", "float32", "> 0.0001 "):
        assert part in str(e)


def test_environment_variable_and_override(broken_direct, monkeypatch):
    x, w, b = _layer()
    monkeypatch.setenv("CNNFAST_CHECK", "1")
    with pytest.raises(cnnfast.MismatchError):
        cnnfast.conv2d(x, w, b, padding=1, algo="direct")
    expected = reference.conv(x, w, b, padding=1)
    with cnnfast.checking(False):  # off for the block: the broken value comes back unchecked
        y = cnnfast.conv2d(x, w, b, padding=1, algo="direct")
    assert y[0, 1, 2, 3] == pytest.approx(expected[0, 1, 2, 3] + 1.0, rel=1e-5)
    monkeypatch.setenv("CNNFAST_CHECK", "0")
    y = cnnfast.conv2d(x, w, b, padding=1, algo="direct")
    assert y[0, 1, 2, 3] == pytest.approx(expected[0, 1, 2, 3] + 1.0, rel=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_op_passes_in_check_mode(dtype, monkeypatch):
    """All 18 ops plus conv_bias, batched and unbatched, run clean with checking on (they compare themselves): each
    call compares its result with the reference once."""
    x, w, b = _layer(dtype)
    compared = []
    real = compare.verify
    monkeypatch.setattr(compare, "verify", lambda op, *a, **k: (compared.append(op), real(op, *a, **k))[1])
    with cnnfast.checking():
        y = cnnfast.conv2d(x, w, b, stride=2, padding="same", padding_mode="reflect")
        cnnfast.grad.conv2d_input(x.shape, w, y, stride=2, padding="same", padding_mode="reflect")
        cnnfast.grad.conv2d_weight(x, w.shape, y, stride=2, padding="same", padding_mode="reflect")
        cnnfast.grad.conv_bias(y)
        t = cnnfast.conv_transpose2d(y, w, b[:3], stride=2, output_padding=1)
        cnnfast.grad.conv_transpose2d_input(y.shape, w, t, stride=2, output_padding=1)
        cnnfast.grad.conv_transpose2d_weight(y, w.shape, t, stride=2, output_padding=1)
        cnnfast.conv1d(x[0, :, 0], w[:, :, 0], b)  # unbatched (C, L)
        cnnfast.conv3d(x[:, :, None], w[:, :, None], b, padding=(0, 1, 1))
    assert compared == ["conv2d", "conv2d_input", "conv2d_weight", "conv_bias", "conv_transpose2d",
                        "conv_transpose2d_input", "conv_transpose2d_weight", "conv1d", "conv3d"]


def test_check_returns_the_figures(broken_direct):
    x, w, b = _layer("float64")
    good = cnnfast.check("conv2d", x, w, b, padding=1, algo="im2col")
    assert good.ok and good.op == "conv2d" and good.algorithm == "im2col" and good.device == "cpu"
    assert good.error <= TOLERANCE["float64"] and good.result.shape == (2, 4, 6, 6)
    bad = cnnfast.check(cnnfast.conv2d, x, w, b, padding=1, algo="direct")  # never raises: figures instead
    assert not bad.ok and bad.index == (0, 1, 2, 3) and bad.error > 0.01 and bad.dtype == "float64"
    assert bad.actual - bad.expected == pytest.approx(1.0)
    unbatched = cnnfast.check(cnnfast.conv2d, x[0], w, b, padding=1, algo="direct")  # (C, H, W)
    assert not unbatched.ok and unbatched.index == (1, 2, 3) and unbatched.result.shape == (4, 6, 6)
    bias = cnnfast.check("conv_bias", good.result)
    assert bias.ok and bias.op == "conv_bias" and bias.result.shape == (4,)
    assert repr(good).startswith("CheckResult(op='conv2d', algorithm='im2col', device='cpu', dtype='float64', ")
    assert repr(good).endswith(", ok=True, result=<ndarray (2, 4, 6, 6) float64>)")  # not the result's values
    with pytest.raises(ValueError, match="check: unknown op 'conv4d'"):
        cnnfast.check("conv4d", x, w)


def _cancelling(dtype="float32"):
    """A flat image, filters and a dy of zero sum: every forward output, weight-gradient and bias-gradient element
    is ~0 against the products summed into it, so rounding alone exceeds TOLERANCE relative to max|reference|."""
    rng = np.random.default_rng(1)
    x = np.full((2, 16, 12, 12), 0.7, dtype)
    w = rng.standard_normal((8, 16, 3, 3)).astype(dtype)
    dy = rng.standard_normal((2, 8, 10, 10)).astype(dtype)
    return x, w - w.mean(axis=(1, 2, 3), keepdims=True), dy - dy.mean(axis=(0, 2, 3), keepdims=True)


@pytest.mark.parametrize("algo", ["direct", "im2col", "winograd"])
def test_a_cancelling_result_is_judged_by_its_terms(algo):
    """Correct results that cancel to ~0 pass (they raised MismatchError before the terms' measure): their error
    relative to max|reference| is past TOLERANCE, but each element is within TERMS_TOLERANCE of its terms."""
    x, w, dy = _cancelling()
    calls = [("conv2d", (x, w)), ("conv2d_weight", (x, w.shape, dy))]
    calls += [("conv_bias", (_cancelling("float64")[2],))] * (algo == "direct")  # (float32's is summed in float64)
    for op, args in calls:
        figures = cnnfast.check(op, *args, **({} if op == "conv_bias" else {"algo": algo}))
        assert figures.error > TOLERANCE[figures.dtype] and figures.ok, (op, figures.error)
        with cnnfast.checking():
            getattr(cnnfast.grad, op, cnnfast.conv2d)(*args)  # (conv2d is cnnfast's, the gradients grad's)


def test_a_wrong_element_of_a_cancelling_result_still_fails(broken_direct):
    x, w, _ = _cancelling()
    with cnnfast.checking(), pytest.raises(cnnfast.MismatchError) as info:
        cnnfast.conv2d(x, w, padding=1, algo="direct")  # one element off by 1.0 (of terms ~50)
    assert info.value.index == (0, 1, 2, 3)
    assert not cnnfast.check("conv2d", x[0], w, padding=1, algo="direct").ok  # (unbatched: the same element)


def test_within_terms_flags_each_element_past_both_measures():
    e = np.array([1.0, 1e-9, -2.0])
    magnitude = np.array([3.0, 100.0, 2.0])
    assert compare.within_terms(e + [0, 5e-4, 0], e, magnitude, "float32")  # past 1e-4 * 2 only: within 1e-5 * 100
    assert not compare.within_terms(e + [0, 5e-3, 0], e, magnitude, "float32")  # past both
    assert compare.within_terms(e + [1e-4, 0, 0], e, [0.0] * 3, "float32")  # within 1e-4 * max|e| = 2e-4
    assert not compare.within_terms(e + [0, 5e-4, 0], e, [3.0, np.nan, 2.0], "float32")  # no magnitude: past
    assert compare.compare(e + [0, 5e-4, 0], e, "float32")["ok"] is False  # (no terms given: the first measure)
    # the terms' measure only where the result cancels as a whole (max|e| < CANCELLED * the largest magnitude)
    assert compare.compare(e + [0, 5e-4, 0], e, "float32", lambda: magnitude)["ok"] is False
    small = e * 1e-3
    assert compare.compare(small + [0, 5e-4, 0], small, "float32", lambda: magnitude)["ok"] is True
    assert compare.compare(small + [0, 5e-3, 0], small, "float32", lambda: magnitude)["ok"] is False


def test_a_long_reduction_off_by_one_product_fails_on_ordinary_data(monkeypatch):
    """On random data the terms' measure is the looser one (an element's terms ~0.64n against max|reference| ~
    4 sqrt(n)): a float32 weight gradient over 2.6e5 positions with one element off by 1.0 (a product of two
    standard normals) is within 1e-5 of its terms, but past TOLERANCE relative to max|reference|: a mismatch, since
    the result does not cancel."""
    good = cpu_kernels.ALGORITHMS["im2col"]

    def backward_filter(x, dy, dw, g, **kw):
        good.backward_filter(x, dy, dw, g, **kw)
        dw[0, 0, 0, 1, 1] += 1.0

    monkeypatch.setitem(cpu_kernels.ALGORITHMS, "im2col", dataclasses.replace(good, backward_filter=backward_filter))
    rng = np.random.default_rng(1)
    x, dy = (rng.standard_normal(s).astype(np.float32) for s in ((4, 1, 258, 258), (4, 1, 256, 256)))
    figures = cnnfast.check("conv2d_weight", x, (1, 1, 3, 3), dy, algo="im2col")
    assert figures.index == (0, 0, 1, 1) and figures.error > TOLERANCE["float32"] and not figures.ok
    terms = reference.conv_weight(np.abs(x), (1, 1, 3, 3), np.abs(dy))
    assert compare.within_terms(figures.result, reference.conv_weight(x, (1, 1, 3, 3), dy), terms, "float32")


def test_check_refuses_a_callable_that_runs_no_op_or_several():
    """cnnfast.check takes one op: a function that runs none, or two, is named with the count, not half-checked."""
    x, w, b = _layer("float64")

    def numpy_only(x):
        return x * 2

    def two_ops(x, w):
        return cnnfast.grad.conv_bias(cnnfast.conv2d(x, w, padding=1))
    with pytest.raises(ValueError, match=r"^check: expected a cnnfast op, but 'numpy_only' ran 0 ops$"):
        cnnfast.check(numpy_only, x)
    with pytest.raises(ValueError, match=r"^check: expected a cnnfast op, but 'two_ops' ran 2 ops$"):
        cnnfast.check(two_ops, x, w)
    assert not compare.active()  # check mode ends with the call, raised or not


def test_nan_and_inf_propagate_without_false_alarms():
    """NaN/Inf in the data propagate as in PyTorch (no error) and check mode agrees with the reference on them."""
    x, w, b = _layer()
    x[0, 0, 2, 2] = np.nan
    x[1, 1, 0, 0] = np.inf
    with cnnfast.checking():
        y = cnnfast.conv2d(x, w, b, padding=1)
    assert np.isnan(y[0, :, 1:4, 1:4]).all() and np.isfinite(y[0, :, 5, 5]).all()
    assert not np.isfinite(y[1, :, 0, 0]).any()


def test_relative_error_treats_special_values_exactly():
    e = np.array([1.0, np.nan, np.inf, 2.0])
    assert relative_error(e.copy(), e) == (0.0, (0,))
    assert relative_error(np.array([1.0, 0.0, np.inf, 2.0]), e)[0] == np.inf
    assert relative_error(np.array([1.0, np.nan, -np.inf, 2.0]), e) == (np.inf, (2,))


def test_a_float32_overflow_matches_the_reference_that_overflows_float32():
    """2e38 + 2e38 is inf in float32 (as torch gives it) and 4e38 in the float64 reference: a match in float32,
    a mismatch where the dtype is not said, and a finite result there is still wrong."""
    x, w = np.full((1, 1, 4, 4), 2e38, np.float32), np.ones((1, 1, 1, 2), np.float32)
    with np.errstate(over="ignore"), cnnfast.checking():
        y = cnnfast.conv2d(x, w)
    assert np.isposinf(y).all()
    e = np.array([4e38, 1.0])
    assert relative_error(np.array([np.inf, 1.0]), e, "float32") == (0.0, (0,))
    assert relative_error(np.array([np.inf, 1.0]), e)[0] == np.inf
    assert relative_error(np.array([3e38, 1.0]), e, "float32")[0] == np.inf


@pytest.fixture
def short_direct(monkeypatch):
    """The CPU direct forward kernel's result of the wrong shape (its last column cut off)."""
    from cnnfast import api
    real = api._execute

    def execute(*args, **kwargs):
        out = real(*args, **kwargs)
        return out[..., :-1]
    monkeypatch.setattr(api, "_execute", execute)


def test_a_result_of_the_wrong_shape_is_a_named_mismatch(short_direct):
    """Check mode names the op and both shapes; cnnfast.check and validate record a failure (error inf) instead of
    raising from their own comparison."""
    from cnnfast import validate
    x, w, b = _layer()
    with pytest.raises(cnnfast.MismatchError, match=r"^conv2d \(algorithm 'im2col' on cpu\): a result of shape "
                                                    r"\(2, 4, 4, 3\), where the reference's is \(2, 4, 4, 4\)"):
        with cnnfast.checking():
            cnnfast.conv2d(x, w, b, algo="im2col")
    figures = cnnfast.check("conv2d", x, w, b, algo="im2col")
    assert not figures.ok and figures.error == np.inf and figures.index is None
    result = validate._check("cpu", "", "im2col", "conv", validate.CASES[0], "float32", validate.device_mover("cpu"))
    assert not result.ok and result.error == np.inf and "a result of shape" in result.note


def test_conv_bias_of_an_empty_batch_is_checked_too():
    figures = cnnfast.check("conv_bias", np.zeros((0, 4, 5, 5), np.float32))
    assert figures.ok and figures.op == "conv_bias" and np.array_equal(figures.result, np.zeros(4, np.float32))


def test_the_tolerance_is_printed_as_set(broken_direct, monkeypatch):
    import cnnfast.compare as compare
    monkeypatch.setitem(compare.TOLERANCE, "float32", 2.5e-4)
    x, w, b = _layer()
    with pytest.raises(cnnfast.MismatchError, match=r"> 0\.00025 \(float32\)"), cnnfast.checking():
        cnnfast.conv2d(x, w, b, algo="direct")


@pytest.fixture
def broken_weight_grad(monkeypatch):
    """The CPU direct weight gradient with one element of filter 1 (not filter 0) off by one."""
    good = cpu_kernels.ALGORITHMS["direct"]

    def backward_filter(x, dy, dw, g, **kw):
        good.backward_filter(x, dy, dw, g, **kw)
        dw[1, 0, 0, 0, 0] += 1.0

    monkeypatch.setitem(cpu_kernels.ALGORITHMS, "direct", dataclasses.replace(good, backward_filter=backward_filter))


def test_check_mode_compares_all_of_an_unbatched_weight_gradient(broken_weight_grad):
    """Catches check mode dropping the first axis of an unbatched call's result for the weight gradient too (whose
    first axis is the filters, not a batch): it would then compare filter 0 only and pass a wrong filter 1."""
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((3, 6, 6)).astype(np.float32), rng.standard_normal((4, 4, 4)).astype(np.float32)
    figures = cnnfast.check("conv2d_weight", x, (4, 3, 3, 3), dy, algo="direct")
    assert not figures.ok and figures.index == (1, 0, 0, 0) and figures.result.shape == (4, 3, 3, 3)


def test_float64_results_are_held_to_the_float64_tolerance():
    """Catches the tolerance looked up for the wrong dtype: a float64 result off by 1e-6 (relative) is wrong in
    float64 (a correct one is within ~1e-15), though within float32's rounding."""
    expected = np.array([1.0, -2.0, 0.5])
    result = expected * (1 + 1e-6)
    compare.assert_close(result.astype(np.float32), expected, "float32")
    assert not compare.compare(result, expected, "float64")["ok"]
    with pytest.raises(compare.MismatchError):
        compare.assert_close(result, expected, "float64")


def test_relative_error_is_relative_to_the_reference():
    """Catches the error's scale taken from the result instead of the reference: |3 - 1| / max|[1, 0.5]| = 2."""
    err, index = compare.relative_error(np.array([3.0, 0.5]), np.array([1.0, 0.5]))
    assert err == 2.0 and index == (0,)
