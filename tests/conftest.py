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


# Numba's parfor pass hoists a statement whose operands do not change across a prange loop out of it, a load of an
# array element too, even from a branch or inner loop that would not have run it (Numba 0.68): the load then runs
# once before the loop, out of bounds where the branch was the guard (the thirty-second session's plane_taps read
# offsets[taps] for 3x3 filters; under NUMBA_BOUNDSCHECK an IndexError escaped as "returned a result with an
# exception set"). Where it happens depends on the build, so every parallel CPU kernel compiled in the session is
# checked at its end: a hoisted load at a variable index fails the run. Builds loaded from the disk cache carry no
# diagnostics.
_hoisting = None  # (parallel builds checked, [(kernel, line, statement)]) once the session has ended


def _hoisted_loads():
    import sys

    import numba
    from numba.core import ir, types
    checked, found = 0, []
    for module in [m for name, m in list(sys.modules.items()) if name.startswith("cnnfast.kernels.cpu.")]:
        for name, f in sorted(vars(module).items()):
            if not isinstance(f, numba.core.dispatcher.Dispatcher) or not f.targetoptions.get("parallel"):
                continue
            for cres in list(f.overloads.values()):
                diagnostics = (cres.metadata or {}).get("parfor_diagnostics")
                if diagnostics is None:
                    continue
                checked += 1
                typemap = cres.type_annotation.typemap
                for loop in diagnostics.hoist_info.values():
                    for assign in loop["hoisted"]:
                        e = assign.value
                        if (isinstance(e, ir.Expr) and e.op == "getitem"  # (static_getitem: taps[0] of (T, R, S))
                                and isinstance(typemap.get(e.value.name), types.Array)):
                            found.append((name, assign.loc.line, str(assign)))
    return checked, found


@pytest.hookimpl(tryfirst=True)  # before the terminal summary reports it
def pytest_sessionfinish(session, exitstatus):
    global _hoisting
    _hoisting = _hoisted_loads()
    if _hoisting[1] and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _hoisting and (_hoisting[0] or _hoisting[1]):
        checked, found = _hoisting
        terminalreporter.write_line(f"parfor hoisting: {checked} parallel CPU kernel builds checked, "
                                    f"{len(found)} array loads hoisted out of a prange loop")
        for kernel, line, statement in found:
            terminalreporter.write_line(f"  FAILED {kernel} (line {line}): {statement}", red=True)


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
