#!/usr/bin/env python
"""Run every CUDA kernel specialisation of cnnfast under NVIDIA compute-sanitizer (memcheck, racecheck, synccheck).

    python bench/sanitize.py                     # each tool in turn; summary table; exit 1 on any error
    python bench/sanitize.py --check             # only check the prerequisites (a CUDA GPU, compute-sanitizer)
    python bench/sanitize.py --tools memcheck    # a subset of the tools

Exit status: 0 every tool clean; 1 a tool reported errors (or the workload itself failed); 2 a prerequisite is
missing (no CUDA GPU, the Numba CUDA simulator is on, or no compute-sanitizer on PATH / in $CUDA_HOME/bin).

The workload (this script with --child, run as `compute-sanitizer --tool T --error-exitcode 1 python ... --child`)
is ONE small launch of every specialisation the dispatcher can create: cnnfast.validate.validate(device="cuda",
dtypes=("float32", "float64")) over the validation grid (every CUDA algorithm x op kind x case: all tiled-GEMM
specialisations, im2col/col2im, depthwise, pad/fold_pad for the padding modes, add_bias for conv_transpose), plus
the launches its small shapes do not reach: a split-K weight gradient (reduce_splits_kernel), conv_bias
(bias_grad_kernel) and a non-contiguous input (the copy path), in both dtypes.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

TOOLS = ("memcheck", "racecheck", "synccheck")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- prerequisites

def find_sanitizer():
    """Path of compute-sanitizer: on PATH, else in $CUDA_HOME/bin or /usr/local/cuda/bin; None if absent."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidate = os.path.join(home, "bin", "compute-sanitizer")
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
    return None


def gpu_problem():
    """None when a real CUDA GPU is usable through Numba, else a sentence saying why not."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return ("NUMBA_ENABLE_CUDASIM is set: the Numba CUDA simulator runs kernels as Python threads, which "
                "compute-sanitizer cannot inspect (unset it on a GPU machine)")
    if not glob.glob("/dev/nvidia[0-9]*") and not os.path.exists("/dev/dxg"):
        return "no CUDA GPU: no /dev/nvidia* device files (and no WSL2 /dev/dxg)"
    probe = ("from numba import cuda\nimport sys\n"
             "ok = cuda.is_available() and len(cuda.gpus) > 0\n"
             "print(cuda.get_current_device().name if ok else 'unavailable')\nsys.exit(0 if ok else 3)\n")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    try:
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "no usable CUDA GPU: probing it with numba.cuda timed out"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        return f"no usable CUDA GPU: numba.cuda.is_available() is false ({tail[0]})"
    return None


def prerequisites():
    """(sanitizer path or None, [problems])."""
    problems = []
    gpu = gpu_problem()
    if gpu:
        problems.append(gpu)
    sanitizer = find_sanitizer()
    if sanitizer is None:
        problems.append("compute-sanitizer not found on PATH (nor in $CUDA_HOME/bin or /usr/local/cuda/bin): "
                        "install the CUDA toolkit's compute-sanitizer and put it on PATH")
    return sanitizer, problems


# ---------------------------------------------------------------- the workload (under the sanitizer)

def child() -> int:
    """Launch every kernel specialisation once (small shapes); 0 when every result matches the reference."""
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
    sys.path.insert(0, ROOT)
    import numpy as np
    from numba import cuda
    try:  # CuPy's memory pool rounds allocations up and reuses blocks: memcheck would miss accesses inside them
        import cupy
        cupy.cuda.set_allocator(None)
    except ImportError:
        pass

    import cnnfast
    from cnnfast import compare, grad, reference
    from cnnfast.validate import validate

    failures = []
    results = validate(device="cuda", dtypes=("float32", "float64"))
    failures += [f"{r.algorithm} {r.kind} {r.case} {r.dtype}: {r.note}" for r in results if not r.ok]
    ran = sum(1 for r in results if not r.note.startswith("n/a"))

    rng = np.random.default_rng(0)
    for dtype in ("float32", "float64"):
        # split-K weight gradient: N*P*Q = 2*24*24 reduction indices > 2 * direct.MIN_SPLIT -> reduce_splits
        x = rng.standard_normal((2, 3, 24, 24)).astype(dtype)
        dy = rng.standard_normal((2, 4, 24, 24)).astype(dtype)
        for algo in ("direct", "im2col"):
            dw = grad.conv2d_weight(cuda.to_device(x), (4, 3, 3, 3), cuda.to_device(dy), padding=1, algo=algo)
            expected = reference.conv_weight(x, (4, 3, 3, 3), dy, padding=1)
            try:
                compare.assert_close(dw.copy_to_host(), expected, dtype, f"conv2d_weight {algo} split-K")
            except compare.MismatchError as e:
                failures.append(str(e))
        # conv_bias: bias_grad_kernel
        db = grad.conv_bias(cuda.to_device(dy))
        try:
            compare.assert_close(db.copy_to_host(), dy.sum(axis=(0, 2, 3)), dtype, "conv_bias")
        except compare.MismatchError as e:
            failures.append(str(e))
        # a non-contiguous input (a strided device view): the working-copy path
        w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
        xs = cuda.to_device(x)[:, :, ::2, ::2]
        y = cnnfast.conv2d(xs, cuda.to_device(w), padding=1)
        try:
            compare.assert_close(y.copy_to_host(), reference.conv(x[:, :, ::2, ::2], w, padding=1), dtype,
                                 "conv2d strided input")
        except compare.MismatchError as e:
            failures.append(str(e))
        ran += 5
    cuda.synchronize()
    for f in failures:
        print("WORKLOAD FAILURE:", f)
    print(f"WORKLOAD: {ran} calls, {len(failures)} result mismatches")
    return 1 if failures else 0


# ---------------------------------------------------------------- the driver

_SUMMARY = re.compile(r"ERROR SUMMARY:\s*(\d+)\s+error")
_RACE = re.compile(r"RACECHECK SUMMARY:.*?\((\d+)\s+error")


def errors_in(output: str):
    """Errors compute-sanitizer reported (the largest count in its summary lines), or None without a summary."""
    counts = [int(m) for m in _SUMMARY.findall(output) + _RACE.findall(output)]
    return max(counts) if counts else None


def run_tool(sanitizer, tool, log_dir, timeout):
    """One tool over the child workload, its output written straight to the log (a call cut short keeps it); on
    timeout the whole process group is killed (the sanitizer and the Python child under it, which holds the log)."""
    cmd = [sanitizer, "--tool", tool, "--error-exitcode", "1", sys.executable, os.path.abspath(__file__), "--child"]
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    log = os.path.join(log_dir, f"sanitize-{tool}.log")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            f.write(f"\n[timed out after {timeout} s]\n")
            code = "timeout"
    seconds = time.perf_counter() - t0
    with open(log, errors="replace") as f:
        output = f.read()
    workload = re.findall(r"^WORKLOAD: .*$", output, flags=re.M)
    return dict(tool=tool, errors=errors_in(output), code=code, seconds=seconds, log=log,
                workload=workload[-1] if workload else "no workload summary (crashed?)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check the prerequisites; exit 0 or 2")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    ap.add_argument("--log-dir", default=None, help="where the full sanitizer logs go (default: a temp dir)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per tool (default 3600)")
    args = ap.parse_args(argv)
    if args.child:
        return child()

    sanitizer, problems = prerequisites()
    if problems:
        print("sanitize: cannot run compute-sanitizer here:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        print("sanitize: run `python bench/sanitize.py` on a machine with an NVIDIA GPU and the CUDA toolkit "
              "(exit code 2: prerequisites missing)", file=sys.stderr)
        return 2
    if args.check:
        print(f"sanitize: prerequisites OK (compute-sanitizer: {sanitizer})")
        return 0

    log_dir = args.log_dir or tempfile.mkdtemp(prefix="cnnfast-sanitize-")
    os.makedirs(log_dir, exist_ok=True)
    print(f"{'tool':<10} {'errors':>7} {'exit code':>10} {'seconds':>8}  workload", flush=True)
    bad = False
    for tool in args.tools:  # each tool's row as soon as it is done (a call cut short keeps the rows so far)
        r = run_tool(sanitizer, tool, log_dir, args.timeout)
        errors = "?" if r["errors"] is None else str(r["errors"])
        print(f"{r['tool']:<10} {errors:>7} {str(r['code']):>10} {r['seconds']:8.1f}  {r['workload']}", flush=True)
        bad |= r["code"] != 0 or r["errors"] is None or r["errors"] > 0
    print(f"\nfull logs: {log_dir}")
    print("sanitize: FAILED" if bad else "sanitize: all tools clean")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
