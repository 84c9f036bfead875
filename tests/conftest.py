"""Test-session setup: without a GPU, run the CUDA kernels in Numba's CUDA simulator.

NUMBA_ENABLE_CUDASIM must be set before Numba is first imported, so this runs at conftest import time and
decides from the device files alone (importing Numba to ask would be too late). An explicit
NUMBA_ENABLE_CUDASIM in the environment always wins.
"""
import glob
import os
import signal
import subprocess
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


# ptx.py's table: every CUDA specialisation compiled for sm_90 (minutes of CPU, no GPU needed). It is started at
# collection in a background process, one compiling process per core at the lowest priority, and the tests that read
# it run last: it compiles on the CPU time the rest of the suite leaves (the simulated kernels keep one core busy,
# the CPU kernels' threads every core now and then). With one process it outlasted the rest of the suite by ~5 min.
PTX_ARGS = ["--json", "--jobs", str(os.cpu_count() or 1)]
_ptx_job = None  # (Popen, stdout file, stderr file) while it runs


def _start_ptx_table():
    global _ptx_job
    from cnnfast.kernels.cuda import ptx

    out, err = (tempfile.TemporaryFile("w+") for _ in range(2))  # files, not pipes: the JSON outgrows a pipe
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")  # compile_ptx needs the NVVM wheels, not a GPU
    # its own process group, so that an early exit stops its compiling processes too; they also stop when this
    # process is killed (start_background)
    _ptx_job = ptx.start_background(PTX_ARGS, env=env, stdout=out, stderr=err, text=True), out, err


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: no table for a run without the tests that read it
def pytest_collection_modifyitems(session, config, items):
    later = [item for item in items if "ptx_table" in getattr(item, "fixturenames", ())]
    if later:
        items[:] = [item for item in items if item not in later] + later
        if not config.option.collectonly:
            _start_ptx_table()


def pytest_unconfigure(config):
    if _ptx_job is not None and _ptx_job[0].poll() is None:
        os.killpg(_ptx_job[0].pid, signal.SIGKILL)  # ptx.py and its compiling processes


@pytest.fixture(scope="session")
def ptx_table():
    """The background ptx.py run, finished: a CompletedProcess (stdout: the JSON table)."""
    global _ptx_job
    if _ptx_job is None:
        _start_ptx_table()
    job, out, err = _ptx_job
    job.wait(timeout=1800)
    _ptx_job = None
    out.seek(0), err.seek(0)
    return subprocess.CompletedProcess(job.args, job.returncode, out.read(), err.read())


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
