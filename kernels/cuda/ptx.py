"""Compile every CUDA specialisation to PTX for sm_90 and report registers and spills, with no GPU.

    python -m cnnfast.kernels.cuda.ptx [--json]      (needs NUMBA_ENABLE_CUDASIM unset or 0)
    python -m cnnfast.kernels.cuda.ptx --warm        (only fills the raw launch path's PTX cache: warm_all)

For each entry of compile.specialisations() (every kernel x dtype x typing the launchers can create):
compile.compile_ptx(..., cc=(9, 0)) gives the PTX (its .version, .target, number of kernel parameters and calls are
reported: PTX 9.0 loads on driver 580; no call is left, NVVM inlines every device function), and that PTX linked by
cuda.core's Linker (nvJitLink) with `ptxas -v` gives registers, spill stores and spill loads of the sm_90 code, as
the driver builds it from the same PTX when a kernel is loaded. For the kernels with shared-memory steps (the tiled
GEMMs, the depthwise halo tiles and weight gradient) it also counts the 64-bit divisions left in the main loop
(loop_divisions), and for every kernel the instructions, FMAs and conditional branches of the innermost loop
holding FMAs (inner_loop: a tiled GEMM's whole step, its staging and its multiply-adds; their share of what the SM
issues). With nvdisasm installed (on PATH, or the `nvidia-cuda-nvdisasm` wheel, 13.2 or later, which reads sm_90
cubins from the 13.0 linker) it also reports the same loop in the SASS the GPU runs (sass_loop: instructions,
FFMA/DFMA, branches): 64-bit index arithmetic there costs two to three instructions per PTX one. Entries compile in
parallel (--jobs, default: one process per CPU). Exit status 1 if any entry fails to compile, calls or spills.
"""
import argparse
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ARCH = "sm_90"
CC = (9, 0)


def ptx_facts(ptx):
    from cnnfast.kernels.cuda.compile import entry_name, parameter_count

    version = re.search(r"^\s*\.version\s+(\S+)", ptx, re.M)
    target = re.search(r"^\s*\.target\s+(\S+)", ptx, re.M)
    bounds = re.search(r"^\s*\.maxntid\s+(\d+)", ptx, re.M)  # launch bounds: most threads per block
    return {"ptx_version": version and version.group(1), "target": target and target.group(1),
            "entry": entry_name(ptx), "params": parameter_count(ptx), "calls": len(re.findall(r"^\s+call", ptx, re.M)),
            "loop_divisions": loop_divisions(ptx),
            "inner_loop": inner_loop(ptx), "max_threads": bounds and int(bounds.group(1))}


PTX = dict(label=r"(\$L__BB\d+_\d+):", branch=r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+);", fma=r"\s+fma\.",
           instruction=r"\s+[a-z@]", conditional=r"\s+@!?%p\d+\s+bra")
SASS = dict(label=r"\s*(\.L_x_\d+):", branch=r"\bBRA\b[^;]*?(\.L_x_\d+)", fma=r".*\*/\s+(?:@!?U?P\w+\s+)?[FD]FMA\b",
            instruction=r"\s+/\*[0-9a-f]{4,}\*/", conditional=r".*\*/\s+@!?U?P\w+\s+BRA\b")


def loops(lines, end=None, syntax=PTX):
    """[(start, stop)]: the loops of lines[:end], a label at line start and a later branch back to it at stop."""
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(syntax["label"], line))}
    out = []
    for i, line in enumerate(lines[:end]):
        m = re.search(syntax["branch"], line)
        if m and labels.get(m.group(1), i) < i:
            out.append((labels[m.group(1)], i))
    return out


def _fma_loops(lines, syntax):
    """The loops around the first fma of lines, innermost first."""
    first = next((i for i, line in enumerate(lines) if re.match(syntax["fma"], line)), None)
    around = [loop for loop in loops(lines, syntax=syntax) if first is not None and loop[0] <= first <= loop[1]]
    return sorted(around, key=lambda loop: (-loop[0], loop[1]))


def _count(lines, start, stop, syntax):
    body = [line for line in lines[start:stop + 1] if re.match(syntax["instruction"], line)]
    return [len(body), sum(1 for line in body if re.match(syntax["fma"], line)),
            sum(1 for line in body if re.match(syntax["conditional"], line))]


def inner_loop(code, syntax=PTX):
    """[instructions, FMAs, conditional branches] of the innermost loop around the first fma of PTX (or SASS)
    code: from the nearest label above it that a branch below it jumps back to, to the first such branch (static
    instructions, each issued once per trip; a tiled GEMM's whole step, gemm.multiply_step); None when no loop
    holds an fma."""
    lines = code.splitlines()
    around = _fma_loops(lines, syntax)
    return _count(lines, *around[0], syntax) if around else None


def nvdisasm():
    """The nvdisasm executable: on PATH, else the nvidia-cuda-nvdisasm wheel's; None when neither is there."""
    found = shutil.which("nvdisasm")
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        return None
    wheel = [Path(p) / "cu13" / "bin" / "nvdisasm" for p in nvidia.__path__]
    return next((str(p) for p in wheel if p.is_file() and os.access(p, os.X_OK)), None)


def sass(cubin):
    """The cubin's SASS, or None without an nvdisasm that reads it (optional: never fails a row)."""
    tool = nvdisasm()
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        try:
            done = subprocess.run([tool, "-c", str(path)], capture_output=True, text=True, check=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return None
    return done.stdout


def loop_divisions(ptx):
    """64-bit integer divisions and remainders (each dozens of SASS instructions) inside a shared-memory kernel's
    main loops: the loops (a label to a later branch back to it) that hold a bar.sync, or that end before the
    first one (the accumulation of a kernel that reduces once); not the epilogue's. Branches placed after the
    kernel's last ret belong to out-of-line blocks, not loops. Static instructions: each unrolled copy counts.
    None for kernels without shared-memory steps."""
    lines = ptx.splitlines()
    bars = [i for i, line in enumerate(lines) if "bar.sync" in line]
    if not bars:
        return None
    end = max((i for i, line in enumerate(lines) if re.match(r"\s+ret;", line)), default=len(lines))
    main = set()
    for start, stop in loops(lines, end):
        if stop < bars[0] or any(start <= b <= stop for b in bars):
            main.update(range(start, stop + 1))
    return sum(1 for i in main if re.match(r"\s+(div|rem)\.[su]64", lines[i]))


def link_report(ptx):
    """Registers and spills of the PTX assembled for sm_90 (ptxas -v info log)."""
    from cuda.core import Linker, LinkerOptions, ObjectCode

    linker = Linker(ObjectCode.from_ptx(ptx.encode()), options=LinkerOptions(arch=ARCH, ptxas_options="-v"))
    cubin = linker.link("cubin")
    log = linker.get_info_log()
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    code = sass(cubin.code)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(stores.group(1)) if stores else None,
            "spill_loads": int(loads.group(1)) if loads else None,
            "sass_loop": code and inner_loop(code, SASS)}


def check(index):
    """The report row of specialisations()[index] (run in a worker process: kernels are not picklable)."""
    from cnnfast.kernels.cuda.compile import compile_ptx, specialisations

    name, pyfunc, argtypes, typing = specialisations()[index]
    row = {"name": name, "typing": typing}
    try:
        ptx = compile_ptx(pyfunc, argtypes, CC)
        row.update(ptx_facts(ptx))
        row.update(link_report(ptx))
        row["ok"] = (row["spill_stores"] == 0 and row["calls"] == 0 and row["ptx_version"] == "9.0"
                     and row["target"] == ARCH)
    except Exception as e:  # report every failure, keep going
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:500]}")
    return row


def warm(index):
    """Compile specialisations()[index] through compile.ptx, into the disk cache that the raw launch path reads
    (launch.py): a GPU session fills it on all its cores at once instead of compiling kernel by kernel on first
    use (~2 s each for a tiled GEMM)."""
    from cnnfast.kernels.cuda.compile import ptx, specialisations

    ptx(*specialisations()[index][1:3], CC)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl():
    """libc's prctl on Linux (None elsewhere), looked up before a fork: the forked child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None).prctl


def _die_with(parent, prctl=None):
    """Have this process killed when its parent (pid `parent`) ends, however it ends (Linux; elsewhere nothing):
    compiling processes must not outlive the run that wanted their table, they would compile on for minutes."""
    prctl = prctl or _prctl()
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # it ended before the line above took effect
            os._exit(1)


def _pool(jobs):
    """Compiling processes, each ending with this one."""
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with,
                               initargs=(os.getpid(),))


def start_background(argv, **popen):
    """Start `python -m cnnfast.kernels.cuda.ptx *argv` at the lowest priority, in a process group of its own (stop it
    with os.killpg(job.pid, SIGKILL), its compiling processes too), ending with the caller even when the caller is
    killed (a timeout, SIGKILL), as its compiling processes end with it."""
    caller, prctl = os.getpid(), _prctl()

    def prepare():  # in the forked child, before it runs Python: system calls only
        if hasattr(os, "nice"):
            os.nice(19)
        _die_with(caller, prctl)

    return subprocess.Popen([sys.executable, "-m", "cnnfast.kernels.cuda.ptx", *argv], preexec_fn=prepare,
                            start_new_session=True, **popen)


def warm_all(jobs=None):
    """warm every raw-pointer specialisation (sm_90)."""
    from cnnfast.kernels.cuda.compile import specialisations

    indices = [i for i, s in enumerate(specialisations()) if s[3] == "pointer"]
    jobs = max(1, jobs or os.cpu_count() or 1)
    with _pool(jobs) as pool:
        list(pool.map(warm, indices))
    return len(indices)


def check_all(jobs=None):
    from cnnfast.kernels.cuda.compile import specialisations

    count = len(specialisations())
    jobs = max(1, min(jobs or os.cpu_count() or 1, count))
    if jobs == 1:
        return [check(i) for i in range(count)]
    with _pool(jobs) as pool:
        return list(pool.map(check, range(count)))


def _toolchain_missing():
    """Why NVVM cannot compile here (the first specialisation, compiled once in this process), or None: without the
    toolchain every worker would report the same error, one kernel after another."""
    from cnnfast.kernels.cuda.compile import compile_ptx, specialisations

    _, pyfunc, argtypes, _ = specialisations()[0]
    try:
        compile_ptx(pyfunc, argtypes, CC)
    except Exception as e:  # noqa: BLE001 (NVVM or NVRTC not found, most often)
        return f"{type(e).__name__}: {str(e)[:300]}"
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cnnfast.kernels.cuda.ptx", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.add_argument("--jobs", type=int, help="compiling processes (default: one per CPU)")
    parser.add_argument("--warm", action="store_true",
                        help="only fill the PTX disk cache of the raw launch path (CNNFAST_CUDA_LAUNCH=raw)")
    args = parser.parse_args(argv)
    missing = _toolchain_missing()
    if missing:
        print(f"ptx: the first kernel does not compile here ({missing}); without a CUDA toolkit, install NVVM and "
              f"NVRTC as wheels: pip install -e '.[cuda-toolchain]'", file=sys.stderr)
        return 2
    if args.warm:
        from cnnfast.kernels.cuda.compile import cache_dir

        print(f"{warm_all(args.jobs)} raw-pointer specialisations compiled into {cache_dir()}")
        return 0
    rows = check_all(args.jobs)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'kernel':58s} {'PTX':>4s} {'target':>7s} {'regs':>5s} {'spill st/ld':>12s} {'loop div':>8s} "
              f"{'inner loop (FMA)':>16s} {'SASS loop (FMA)':>15s}")
        for r in rows:
            if "error" in r:
                print(f"{r['name']:58s} ERROR {r['error']}")
            else:
                loop, code = ('%d (%d)' % tuple(r[k][:2]) if r[k] else '-' for k in ("inner_loop", "sass_loop"))
                print(f"{r['name']:58s} {r['ptx_version']:>4s} {r['target']:>7s} {r['registers']!s:>5s} "
                      f"{r['spill_stores']!s:>6s}/{r['spill_loads']!s:<5s} {r['loop_divisions']!s:>8s} "
                      f"{loop:>16s} {code:>15s}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
