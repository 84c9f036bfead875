"""Test-session setup: without a GPU, run the CUDA kernels in Numba's CUDA simulator.

NUMBA_ENABLE_CUDASIM must be set before Numba is first imported, so this runs at conftest import time and
decides from the device files alone (importing Numba to ask would be too late). An explicit
NUMBA_ENABLE_CUDASIM in the environment always wins.
"""
import glob
import os

if "NUMBA_ENABLE_CUDASIM" not in os.environ:
    has_gpu = bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/dxg")  # Linux / WSL2
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0" if has_gpu else "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SIMULATOR = os.environ["NUMBA_ENABLE_CUDASIM"] not in ("", "0")


def pytest_configure(config):
    # here, not in pyproject.toml: naming a Numba warning class there imports Numba before the line above runs
    config.addinivalue_line("filterwarnings", "ignore::numba.core.errors.NumbaPerformanceWarning")


def pytest_report_header(config):
    return f"cnnfast CUDA tests: {'Numba CUDA simulator (no GPU)' if SIMULATOR else 'real GPU'}"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
