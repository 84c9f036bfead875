"""Compare a result with the float64 reference using one dtype-keyed tolerance table.

The error measure is max|result - expected| / max|expected| (relative to the largest reference value, so
cancellation near zero does not produce false alarms); a comparison fails above TOLERANCE[dtype].
"""
from __future__ import annotations

import numpy as np

# float32: sums of up to ~10^4 products accumulate ~sqrt(n) * 6e-8 relative error; 1e-4 leaves headroom for
# reordered sums (GEMM blocking, split reductions) while catching any wrong tap (errors of order 1).
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}


class MismatchError(AssertionError):
    """A result differs from the reference by more than the dtype's tolerance."""


def relative_error(result, expected) -> tuple:
    """(max|r - e| / max|e|, index of the worst element); exact zeros compare absolutely."""
    r = np.asarray(result, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if r.shape != e.shape:
        raise MismatchError(f"shape {r.shape} differs from the reference's {e.shape}")
    if r.size == 0:
        return 0.0, None
    if not np.all(np.isfinite(r)):
        worst = np.unravel_index(int(np.argmax(~np.isfinite(r))), r.shape)
        return float("inf"), tuple(int(i) for i in worst)
    diff = np.abs(r - e)
    worst = np.unravel_index(int(np.argmax(diff)), r.shape)
    scale = float(np.max(np.abs(e))) or 1.0
    return float(diff[worst]) / scale, tuple(int(i) for i in worst)


def assert_close(result, expected, dtype, what="result"):
    """Raise MismatchError naming the worst element when the relative error exceeds TOLERANCE[dtype]."""
    dtype = np.dtype(dtype).name
    err, worst = relative_error(result, expected)
    tol = TOLERANCE[dtype]
    if not err <= tol:
        r = np.asarray(result)[worst]
        e = np.asarray(expected)[worst]
        raise MismatchError(f"{what}: relative error {err:.3e} > {tol:.0e} ({dtype}); worst at index {worst}: "
                            f"got {r!r}, reference {e!r}")
    return err
