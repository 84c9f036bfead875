"""Test-session setup: without a GPU, run the CUDA kernels in Numba's CUDA simulator.

NUMBA_ENABLE_CUDASIM must be set before Numba is first imported, so this runs at conftest import time and
decides from the device files alone (importing Numba to ask would be too late). An explicit
NUMBA_ENABLE_CUDASIM in the environment always wins.
"""
import glob
import os
import subprocess
import sys
import tempfile

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


# ---------------------------------------------------------------- the PTX report, compiled in the background

_PTX_REPORT = None  # (Popen, stdout file, stderr file) of `python -m cnnfast.kernels.cuda.ptx --json`


def _start_ptx_report(jobs):
    global _PTX_REPORT
    files = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "cnnfast.kernels.cuda.ptx", "--json", "--jobs", str(jobs)],
                            env=dict(os.environ, NUMBA_ENABLE_CUDASIM="0"), stdout=files[0], stderr=files[1],
                            text=True)  # compile_ptx needs the NVVM wheels, not a GPU: the simulator off
    _PTX_REPORT = (proc,) + files


def pytest_collection_modifyitems(session, config, items):
    """When a selected test needs the PTX report (one to two CPU-minutes), start it now on one core, so it compiles
    while the tests before it run; the ptx_report fixture collects it."""
    if _PTX_REPORT is None and any("ptx_report" in getattr(item, "fixturenames", ()) for item in items):
        _start_ptx_report(jobs=1)


@pytest.fixture(scope="session")
def ptx_report():
    """The finished PTX report run, a CompletedProcess (stdout: the JSON table of every specialisation)."""
    if _PTX_REPORT is None:
        _start_ptx_report(jobs=os.cpu_count() or 1)
    proc, out, err = _PTX_REPORT
    proc.wait(timeout=1200)
    out.seek(0)
    err.seek(0)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
