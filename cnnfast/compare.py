"""Compare results with the float64 reference: one dtype-keyed tolerance table, check mode, cnnfast.check.

The error measure is max|result - expected| / max|expected| (relative to the largest reference value, so
cancellation near zero does not produce false alarms); a comparison fails above TOLERANCE[dtype]. Where the whole
result cancels (a zero-sum filter on a flat image: every reference value tiny against the products summed into it),
rounding alone exceeds that: check mode then also measures each element against its terms (TERMS_TOLERANCE).

Check mode (a debugging and CI aid, costly by design: every op also runs the float64 reference):

    with cnnfast.checking():            # or CNNFAST_CHECK=1 in the environment
        y = cnnfast.conv2d(x, w)        # MismatchError names op, algorithm, device, worst index, values, tolerance
    figures = cnnfast.check("conv2d", x, w, padding=1)   # one call; returns the figures instead of raising
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
from typing import NamedTuple

import numpy as np

from cnnfast import reference
from cnnfast.tune import env_flag

# float32: sums of up to ~10^4 products accumulate ~sqrt(n) * 6e-8 relative error; 1e-4 leaves headroom for
# reordered sums (GEMM blocking, split reductions) while catching any wrong tap (errors of order 1).
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
# A result beyond TOLERANCE is still correct where every element past it is within this fraction of its terms'
# magnitude (the same op on |x|, |w|, |dy| and |bias|: the sum of the absolute values of the products summed into it;
# rounding gives ~1e-7 of it in float32): only cancellation makes such a result fail the first measure, and a wrong
# term is at least 1e-5 of its element's magnitude up to 10^5 terms.
TERMS_TOLERANCE = {"float32": 1e-5, "float64": 1e-13}
# ... but only where the result cancels as a whole: max|expected| below this fraction of the largest magnitude. On
# ordinary data of n terms max|expected| is ~7/sqrt(n) of it (above 1e-3 up to n ~ 5*10^7), and there the terms'
# measure is the looser one past n ~ 10^3 (1e-5 * 0.64n against 1e-4 * 4 sqrt(n)): a float32 weight gradient over
# 2.6*10^5 positions would pass an element off by a whole product, which the first measure catches.
CANCELLED = 1e-3


class MismatchError(AssertionError):
    """A result differs from the reference by more than the dtype's tolerance.

    Attributes (None when not known): error, tolerance, dtype, index (of the worst element), actual, expected.
    """

    def __init__(self, message, *, error=None, tolerance=None, dtype=None, index=None, actual=None,
                 expected=None):
        super().__init__(message)
        self.error, self.tolerance, self.dtype = error, tolerance, dtype
        self.index, self.actual, self.expected = index, actual, expected


def relative_error(result, expected, dtype=None) -> tuple:
    """(max|r - e| / max|e|, index of the worst element). Non-finite values must match exactly (NaN where the
    reference has NaN, inf of the same sign; with dtype, also where the reference overflows it: a float32 result of
    inf where the float64 reference is 4e38), else the error is inf at the first differing element. A result of
    another shape raises MismatchError (error inf)."""
    r = np.asarray(result, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if r.shape != e.shape:
        raise MismatchError(f"shape {r.shape} differs from the reference's {e.shape}", error=float("inf"))
    if r.size == 0:
        return 0.0, None
    rounded = e  # the reference's value in dtype where it overflows dtype (copied only then: 4e38 is inf in float32)
    if dtype is not None and np.dtype(dtype).itemsize < 8:
        top = float(np.finfo(dtype).max)
        big = (e > top) | (e < -top)
        if big.any():
            rounded = e.copy()
            with np.errstate(over="ignore"):
                rounded[big] = e[big].astype(dtype)
    special = ~np.isfinite(r) | ~np.isfinite(rounded)
    if special.any():
        differs = special & ~((r == rounded) | (np.isnan(r) & np.isnan(rounded)))
        if differs.any():
            return float("inf"), tuple(int(i) for i in np.unravel_index(int(np.argmax(differs)), r.shape))
    with np.errstate(invalid="ignore"):  # inf - inf at the special elements, masked out
        diff = np.where(special, 0.0, np.abs(r - e))
    worst = np.unravel_index(int(np.argmax(diff)), r.shape)
    scale = float(np.max(np.where(special, 0.0, np.abs(e)))) or 1.0
    return float(diff[worst]) / scale, tuple(int(i) for i in worst)


def compare(result, expected, dtype, terms=None) -> dict:
    """The figures of result against expected: error, tolerance, dtype, index, actual, expected (a result of
    another shape: error inf, no index or values) and ok: error <= tolerance, or (terms: a function returning the
    magnitude of each element's terms, called only then) the result cancels (CANCELLED) and every element past the
    tolerance is within_terms."""
    dtype = np.dtype(dtype).name
    try:
        err, worst = relative_error(result, expected, dtype)
    except MismatchError:
        err, worst = float("inf"), None
    ok = err <= TOLERANCE[dtype]
    if not ok and terms is not None and err != float("inf"):
        magnitude = terms()
        ok = cancels(expected, magnitude) and within_terms(result, expected, magnitude, dtype)
    values = (None, None) if worst is None else (np.asarray(result)[worst].item(), np.asarray(expected)[worst].item())
    return dict(error=err, tolerance=TOLERANCE[dtype], dtype=dtype, index=worst, actual=values[0],
                expected=values[1], ok=bool(ok))


def cancels(expected, magnitude):
    """Whether the result cancels as a whole: max|expected| < CANCELLED * max(magnitude) (finite values only)."""
    e, m = (np.asarray(a, dtype=np.float64) for a in (expected, magnitude))
    top = float(np.max(np.where(np.isfinite(m), m, 0.0), initial=0.0))
    return float(np.max(np.where(np.isfinite(e), np.abs(e), 0.0), initial=0.0)) < CANCELLED * top


def within_terms(result, expected, magnitude, dtype):
    """Whether every element whose error exceeds TOLERANCE[dtype] relative to max|expected| is within
    TERMS_TOLERANCE[dtype] of its terms' magnitude (same shape as expected; the non-finite values match: checked
    first by relative_error)."""
    r, e, m = (np.asarray(a, dtype=np.float64) for a in (result, expected, magnitude))
    finite = np.isfinite(r) & np.isfinite(e)
    with np.errstate(invalid="ignore"):
        diff = np.where(finite, np.abs(r - e), 0.0)
    scale = float(np.max(np.where(finite, np.abs(e), 0.0))) or 1.0
    past = (diff > TOLERANCE[dtype] * scale) & ~(diff <= TERMS_TOLERANCE[dtype] * m)  # (NaN magnitude: past)
    return not past.any()


def assert_close(result, expected, dtype, what="result"):
    """Raise MismatchError naming the worst element when the relative error exceeds TOLERANCE[dtype]."""
    f = compare(result, expected, dtype)
    if not f["ok"]:
        _mismatch(what, f, np.shape(result), np.shape(expected))
    return f["error"]


def _mismatch(what, f, shape, expected_shape):
    f = {k: v for k, v in f.items() if k != "ok"}
    if shape != expected_shape:
        raise MismatchError(f"{what}: a result of shape {shape}, where the reference's is {expected_shape} "
                            f"({f['dtype']})", **f)
    raise MismatchError(f"{what}: relative error {f['error']:.3e} > {f['tolerance']:.3g} ({f['dtype']}); "
                        f"worst at index {f['index']}: got {f['actual']!r}, reference {f['expected']!r}", **f)


def terms_result(kind, spec, **arrays):
    """Each element's terms' magnitude (within_terms): expected_result of the arrays' absolute values."""
    return expected_result(kind, spec, **{k: None if a is None else np.abs(a) for k, a in arrays.items()})


def expected_result(kind, spec, input=None, weight=None, grad_output=None, bias=None):
    """The float64 reference result of op `kind` (see api._KINDS) for spec, from batched host arrays."""
    opts = dict(stride=spec.stride, padding=spec.padding, dilation=spec.dilation, groups=spec.groups)
    if spec.transposed:
        opts["output_padding"] = spec.output_padding
    else:
        opts["padding_mode"] = spec.padding_mode
    fn = getattr(reference, kind)
    with np.errstate(all="ignore"):  # NaN/inf data as in the op itself (cnnfast.api): no warning, no raise
        if kind in ("conv", "conv_transpose"):
            return fn(input, weight, bias, **opts)
        if kind.endswith("_input"):
            return fn(spec.input_shape, weight, grad_output, **opts)
        return fn(input, spec.weight_shape, grad_output, **opts)


# ---------------------------------------------------------------- check mode

class CheckResult(NamedTuple):
    """What cnnfast.check returns: the figures of one op's result against the float64 reference."""

    op: str
    algorithm: str
    device: str
    dtype: str
    error: float        # max relative error (see relative_error)
    tolerance: float    # TOLERANCE[dtype]
    index: tuple        # of the worst element (None for an empty result)
    actual: float       # the result's value there
    expected: float     # the reference's value there
    ok: bool            # error <= tolerance, or where the result cancels, each element within its terms' rounding
    result: object      # the op's result, in the caller's array family

    def __repr__(self):  # the result by its type, shape and dtype, not its values
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields[:-1])
        r = self.result
        return f"CheckResult({fields}, result=<{type(r).__name__} {tuple(r.shape)} {r.dtype}>)"


# None: follow CNNFAST_CHECK; True/False: checking() said so; a list: cnnfast.check collects figures into it
_MODE = contextvars.ContextVar("cnnfast_check_mode", default=None)


def _mode():
    mode = _MODE.get()
    if mode is None:
        return env_flag("CNNFAST_CHECK")
    return mode


def active() -> bool:
    """Whether ops compare their results with the reference now (checking(), cnnfast.check or CNNFAST_CHECK)."""
    mode = _mode()
    return mode is not False


@contextlib.contextmanager
def checking(enabled=True):
    """Within the block (this thread / task, and cnnfast.torch's backward passes of the ops run in it), every op
    checks its result against the float64 reference and raises MismatchError on a mismatch; checking(False)
    switches it off, whatever CNNFAST_CHECK says."""
    token = _MODE.set(bool(enabled))
    try:
        yield
    finally:
        _MODE.reset(token)


def verify(op, algorithm, device, result, expected, dtype, terms=None):
    """Check mode's comparison of one op's host result with its float64 reference (the ops call this when
    active(); terms as in compare): raise MismatchError naming op, algorithm and device, or, under cnnfast.check,
    record the figures."""
    f = compare(result, expected, dtype, terms)
    mode = _mode()
    if isinstance(mode, list):
        mode.append(dict(op=op, algorithm=algorithm, device=device, **f))
    elif not f["ok"]:
        _mismatch(f"{op} (algorithm {algorithm!r} on {device})", f, np.shape(result), np.shape(expected))


def check(op, *args, **kwargs) -> CheckResult:
    """Run one op (a name such as "conv2d" / "conv2d_weight", or the function) and return its figures against
    the float64 reference; never raises MismatchError (see CheckResult.ok)."""
    if isinstance(op, str):
        from cnnfast.api import _OPS
        modules = {name: entry[0] for name, entry in _OPS.items()} | {"conv_bias": "cnnfast.grad"}
        if op not in modules:
            raise ValueError(f"check: unknown op {op!r}; expected one of {sorted(modules)}")
        op = getattr(importlib.import_module(modules[op]), op)
    collected = []
    token = _MODE.set(collected)
    try:
        result = op(*args, **kwargs)
    finally:
        _MODE.reset(token)
    if len(collected) != 1:
        raise ValueError(f"check: expected a cnnfast op, but {getattr(op, '__name__', op)!r} ran "
                         f"{len(collected)} ops")
    return CheckResult(result=result, **collected[0])
