"""Validated benchmark: `cnnfast bench` (and the shape sets bench/ uses with pytest-benchmark).

For each shape x primitive x provider (cnnfast algo=auto, each applicable cnnfast algorithm, PyTorch when installed,
the NumPy reference where affordable): every cnnfast result is first checked against the float64 reference
(cnnfast.compare tolerances) and only then timed; warm-up calls (compilation) are excluded; the figure is the median
of --repeats timed calls (CPU: time.perf_counter; CUDA: events on the stream, one call per event pair, the L2 cache
flushed before each unless --warm-l2), the providers of one row timed round-robin so that drift in the machine's
speed falls on all of them alike. FLOPs = 2 x real multiply-adds (ConvSpec.flops), bytes = each tensor read or
written once (ConvSpec.min_bytes). "vs torch" = torch's median / this median (> 1: faster than torch); on CUDA
"torch" is cuDNN in strict fp32 (allow_tf32 = False) and "torch-tf32" PyTorch's default TF32 ("vs tf32").

The ceilings are measured in the same run (cnnfast.roofline: SGEMM and a device copy), and each row reports its
roofline fraction: achieved GFLOP/s over min(SGEMM peak, bytes-per-flop bound at the copy bandwidth).
`--plot FILE.png` draws the roofline (needs matplotlib: the `plot` extra).
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import statistics
import sys
import time
from typing import NamedTuple

import numpy as np

from cnnfast import compare, grad, reference
from cnnfast.arrays import cuda_missing, simulator_enabled
from cnnfast.roofline import machine, measure_ceilings, plot_roofline, roofline
from cnnfast.spec import ConvSpec

PRIMITIVES = ("forward", "backward_data", "backward_filter")


class Shape(NamedTuple):
    name: str
    kind: str  # "conv" | "conv_transpose"
    x: tuple  # the op's input (N, C, *L)
    w: tuple  # the op's weight
    options: dict


def _s(name, x, w, kind="conv", **options):
    return Shape(name, kind, x, w, options)


def resnet_like(batch, batch_1d, extra=()):
    b = batch
    return [
        _s("resnet50-stem-7x7s2-3-64@224", (b, 3, 224, 224), (64, 3, 7, 7), stride=2, padding=3),
        _s("3x3-64-64@56", (b, 64, 56, 56), (64, 64, 3, 3), padding=1),
        _s("1x1-256-64@56", (b, 256, 56, 56), (64, 256, 1, 1)),
        _s("3x3-128-128@28", (b, 128, 28, 28), (128, 128, 3, 3), padding=1),
        _s("3x3-256-256@14", (b, 256, 14, 14), (256, 256, 3, 3), padding=1),
        *extra,
        _s("3x3-512-512@7", (b, 512, 7, 7), (512, 512, 3, 3), padding=1),
        _s("depthwise-3x3-144@56", (b, 144, 56, 56), (144, 1, 3, 3), padding=1, groups=144),
        _s("wavenet-1d-k3-d8-64@16000", (batch_1d, 64, 16000), (64, 64, 3), padding=8, dilation=8),
        _s("dcgan-transposed-4x4s2-256-128@16", (b, 256, 16, 16), (256, 128, 4, 4), kind="conv_transpose",
           stride=2, padding=1),
    ]


SHAPE_SETS = {
    "cpu": resnet_like(4, 2) + [
        _s("mobilenetv2-depthwise-3x3-960@7", (4, 960, 7, 7), (960, 1, 3, 3), padding=1, groups=960),
        _s("efficientnet-depthwise-5x5-1152@7", (4, 1152, 7, 7), (1152, 1, 5, 5), padding=2, groups=1152),
        _s("c3d-3x3x3-64-64@8x28x28", (2, 64, 8, 28, 28), (64, 64, 3, 3, 3), padding=1),
    ],
    "gpu": resnet_like(32, 16, extra=[_s("1x1-1024-256@14", (32, 1024, 14, 14), (256, 1024, 1, 1))]) + [
        _s("mobilenetv2-depthwise-3x3-960@7", (32, 960, 7, 7), (960, 1, 3, 3), padding=1, groups=960),
        _s("c3d-3x3x3-64-64@16x56x56", (8, 64, 16, 56, 56), (64, 64, 3, 3, 3), padding=1),
    ],
    "quick": [
        _s("3x3-16-16@32", (2, 16, 32, 32), (16, 16, 3, 3), padding=1),
        _s("1x1-64-32@16", (2, 64, 16, 16), (32, 64, 1, 1)),
        _s("depthwise-3x3-32@32", (2, 32, 32, 32), (32, 1, 3, 3), padding=1, groups=32),
        _s("1d-k3-d4-16@2000", (2, 16, 2000), (16, 16, 3), padding=4, dilation=4),
        _s("transposed-4x4s2-32-16@8", (2, 32, 8, 8), (32, 16, 4, 4), kind="conv_transpose", stride=2, padding=1),
    ],
}
REFERENCE_FLOP_LIMIT = 3e9  # time the NumPy reference only below this (it runs at ~1-2 GFLOP/s)


# ---------------------------------------------------------------- calls

def spec_of(shape, dtype):
    return ConvSpec.create(shape.name, shape.x, shape.w, transposed=shape.kind == "conv_transpose",
                           dtype=dtype, **shape.options)


def inputs(shape, spec, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal(shape.x).astype(dtype), "w": rng.standard_normal(shape.w).astype(dtype),
            "dy": rng.standard_normal(spec.output_shape).astype(dtype)}


def cnnfast_call(shape, primitive, arrays, algo):
    """A zero-argument callable running the public op of (shape, primitive) with algo on the given arrays."""
    import cnnfast

    nd = len(shape.x) - 2
    x, w, dy, opts = arrays["x"], arrays["w"], arrays["dy"], shape.options
    prefix = "conv_transpose" if shape.kind == "conv_transpose" else "conv"
    if primitive == "forward":
        fn = getattr(cnnfast, f"{prefix}{nd}d")
        return lambda: fn(x, w, **opts, algo=algo)
    if primitive == "backward_data":
        fn = getattr(grad, f"{prefix}{nd}d_input")
        return lambda: fn(shape.x, w, dy, **opts, algo=algo)
    fn = getattr(grad, f"{prefix}{nd}d_weight")
    return lambda: fn(x, shape.w, dy, **opts, algo=algo)


def reference_result(shape, primitive, arrays):
    x, w, dy = (arrays[k].astype(np.float64) for k in ("x", "w", "dy"))
    kind = shape.kind
    if primitive == "forward":
        return getattr(reference, kind)(x, w, **shape.options)
    if primitive == "backward_data":
        return getattr(reference, f"{kind}_input")(shape.x, w, dy, **shape.options)
    return getattr(reference, f"{kind}_weight")(x, shape.w, dy, **shape.options)


def torch_call(shape, primitive, arrays, device):
    """torch.nn.functional for forward, aten.convolution_backward for the gradients (None without torch, or on cuda
    without a torch that sees the GPU: in Numba's simulator); its .backend names torch's kernel family ('Cudnn',
    'CudaDepthwise2d', 'Mkldnn', ...; None where torch does not say)."""
    try:
        import torch
    except ImportError:
        return None
    dev = "cuda" if device == "cuda" else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        return None
    x, w, dy = (torch.from_numpy(arrays[k]).to(dev) for k in ("x", "w", "dy"))
    spec = arrays["spec"]
    transposed = shape.kind == "conv_transpose"
    if any(lo != hi for lo, hi in spec.padding):  # torch has symmetric padding only
        return None
    padding = [lo for lo, _ in spec.padding]
    nd = spec.nd
    output_padding = list(spec.output_padding) if transposed else [0] * nd
    if primitive == "forward":
        fn = getattr(torch.nn.functional, f"conv_transpose{nd}d" if transposed else f"conv{nd}d")
        kw = dict(stride=spec.stride, padding=padding, dilation=spec.dilation, groups=spec.groups)
        if transposed:
            kw["output_padding"] = spec.output_padding

        def call():
            return fn(x, w, **kw)
    else:
        mask = [primitive == "backward_data", primitive == "backward_filter", False]

        def call():
            return torch.ops.aten.convolution_backward(dy, x, w, None, list(spec.stride), padding, list(spec.dilation),
                                                       transposed, output_padding, spec.groups, mask)
    try:  # which of torch's kernels runs it (float32 NCHW depthwise layers on CUDA: ATen's own, not cuDNN)
        chosen = torch._C._select_conv_backend(x, w, None, list(spec.stride), padding, list(spec.dilation),
                                               transposed, output_padding, spec.groups, None)
        call.backend = str(chosen).rpartition(".")[2]  # ('_ConvBackend.Cudnn' -> 'Cudnn')
        if not call.backend.isidentifier():  # (a kernel its Python binding does not name: '???')
            call.backend = None
    except Exception:  # noqa: BLE001 (a private function: absent or changed in another torch)
        call.backend = None
    return call


def _torch_result(out):
    """A torch call's result on the host: the tensor, or the one gradient convolution_backward computed."""
    if isinstance(out, (tuple, list)):
        out = next(t for t in out if t is not None)
    return out.detach().cpu().numpy()


def _torch_sees_gpu():
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# ---------------------------------------------------------------- timing

def time_cpu(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_cuda(fn, flush=None, calls=1):
    """Seconds per call: CUDA events on the default stream around `calls` calls, after flush() (l2_flush) where
    given."""
    from numba import cuda

    if flush:
        flush()
    start, end = cuda.event(), cuda.event()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls  # (elapsed_time: ms)


def time_torch_cuda(fn, flush=None, calls=1):
    import torch

    if flush:
        flush()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def l2_flush():
    """A function that leaves none of the last call's data in the GPU's L2 cache: it writes a buffer of twice the
    L2's size and waits for the GPU, so a timed call reads its operands from memory, as a layer does after a larger
    one (nvbench's default: a layer of a few MB, the 7x7 ones, would otherwise be timed from the H100's 50 MB L2 that
    its last run filled, its GB/s not the memory's), and still starts on an idle GPU (host time included as before)."""
    from numba import cuda
    from numba.cuda.cudadrv.driver import device_memset

    size = 2 * cuda.get_current_device().L2_CACHE_SIZE
    buffer = cuda.device_array(size, np.uint8)

    def flush():
        device_memset(buffer, 0, size)
        cuda.synchronize()

    flush.bytes = size
    return flush


def torch_tf32(fn):
    """fn with PyTorch's default TF32 for cuDNN's convolutions switched on for the call (strict fp32 after it;
    matmul's TF32 flag, which no convolution reads, stays off)."""
    import torch

    def call():
        torch.backends.cudnn.allow_tf32 = True
        try:
            return fn()
        finally:
            torch.backends.cudnn.allow_tf32 = False

    return call


def time_interleaved(calls, repeats, warmup=2):
    """Median seconds of each (fn, timer) in calls, timed round-robin (one call of each per round, the order turned
    by one each round) so that drift in the machine's speed (shared or throttled cores, other processes) and what
    the last call left in the caches fall on every provider alike."""
    for fn, _ in calls:
        for _ in range(warmup):
            fn()
    times = [[] for _ in calls]
    for round_ in range(repeats):  # each round starts one provider later: none always follows the same one
        for k in range(len(calls)):
            j = (round_ + k) % len(calls)
            fn, timer = calls[j]
            times[j].append(timer(fn))
    return [statistics.median(t) for t in times]


# ---------------------------------------------------------------- the run

def detect_device():
    """cuda where a GPU runs the CUDA kernels, else cpu (the simulator is for tests, not timings)."""
    return "cpu" if simulator_enabled() or cuda_missing() else "cuda"


def to_device(a, device):
    if device == "cpu":
        return a
    from cnnfast.validate import device_mover
    return device_mover("cuda")(a)


def run(shapes, device, primitives, algos, dtype, repeats, progress=None, ceilings=None, tiles=False, on_job=None,
        flush=None, deadline=None):
    """Rows of every (shape, primitive, provider); tiles: each algorithm once per tile configuration
    ('cnnfast:direct:64x128', ...) instead of with the tile its launcher would choose. on_job(rows) gets each
    (shape, primitive)'s rows as soon as they are measured. An error in one provider (a CUDA error, out of memory)
    is its row's status, not the run's end. flush: called before each timed CUDA call (l2_flush). deadline (a
    time.perf_counter() value): no job is started that the longest one so far would carry past it."""
    from cnnfast.plan import algorithms
    from cnnfast.tune import candidates
    from cnnfast.validate import to_host

    rows = []
    plan_algos = algorithms(device)
    jobs = [(s, p) for s in shapes for p in primitives]
    longest = 0.0
    for i, (shape, primitive) in enumerate(jobs):
        started = time.perf_counter()
        if deadline is not None and started + longest > deadline:
            break
        spec = spec_of(shape, dtype)
        host = inputs(shape, spec, dtype)
        dev = {k: to_device(v, device) for k, v in host.items()}
        expected = reference_result(shape, primitive, host)
        base = dict(shape=shape.name, primitive=primitive, device=device, dtype=dtype, flops=spec.flops,
                    bytes=spec.min_bytes(primitive))
        names = [a for a in (algos or plan_algos) if a not in ("reference", "auto")]
        if tiles:
            names = candidates({a: plan_algos[a] for a in names if a in plan_algos}, spec.itemsize) + \
                [a for a in names if a not in plan_algos]  # an unknown name: its row says so
        names = ["auto"] + names
        job, timed = [], []  # this job's rows; (row, fn, timer): validated calls, timed together below
        timer, torch_timer = (time_cpu, time_cpu) if device != "cuda" else \
            (functools.partial(time_cuda, flush=flush), functools.partial(time_torch_cuda, flush=flush))
        for algo in names:
            if progress:
                progress(i, len(jobs), shape.name, primitive, algo)
            row = dict(base, provider=f"cnnfast:{algo}")
            try:
                fn = cnnfast_call(shape, primitive, dev, algo)
                # on CUDA twice: the second call is the one timed, replayed on the raw path from the first's launches
                row["error"] = max(compare.assert_close(to_host(fn()), expected, dtype, f"{shape.name} {primitive}")
                                   for _ in range(2 if device == "cuda" else 1))
            except ValueError as e:
                if "bytes of workspace, more than" in str(e):  # it takes the problem, not within the workspace limit
                    job.append(dict(row, status="n/a", note=str(e)))
                elif "cannot run this problem" not in str(e):
                    job.append(dict(row, status="ERROR", note=str(e)))
                continue
            except compare.MismatchError as e:
                job.append(dict(row, status="FAIL", note=str(e)))
                continue
            except Exception as e:  # noqa: BLE001 (a CUDA or driver error, out of memory: this row's)
                job.append(dict(row, status="ERROR", note=f"{type(e).__name__}: {e}"))
                continue
            timed.append((dict(row, status="ok"), fn, timer))
        tfn = torch_call(shape, primitive, dict(host, spec=spec), device)
        if tfn is not None:
            baselines = [("torch", tfn, torch_timer)]
            if device == "cuda":
                baselines.append(("torch-tf32", torch_tf32(tfn), torch_timer))
            backend = {"backend": tfn.backend} if tfn.backend else {}
            for provider, fn, baseline_timer in baselines:
                try:  # (an extra warm-up call) an error here is this row's; its result's error recorded, not judged
                    error = compare.relative_error(_torch_result(fn()), expected, dtype)[0]
                except Exception as e:  # noqa: BLE001
                    job.append(dict(base, provider=provider, status="ERROR", note=f"{type(e).__name__}: {e}"))
                    continue
                timed.append((dict(base, provider=provider, status="ok", error=error, **backend), fn, baseline_timer))
        if progress:
            progress(i, len(jobs), shape.name, primitive, "timing")
        try:
            seconds = time_interleaved([(fn, t) for _, fn, t in timed], repeats)
        except Exception as e:  # noqa: BLE001
            job += [dict(row, status="ERROR", note=f"timing: {type(e).__name__}: {e}") for row, _, _ in timed]
        else:
            for (row, fn, t), sec in zip(timed, seconds):
                row = dict(row, seconds=sec)
                try:  # (an error here leaves the row its median)
                    row.update(_burst(fn, t, device))
                except Exception as e:  # noqa: BLE001
                    row["note"] = f"b2b: {type(e).__name__}: {e}"
                job.append(row)
        if spec.flops <= REFERENCE_FLOP_LIMIT:
            ref = lambda s=shape, p=primitive, h=host: reference_result(s, p, h)  # noqa: E731
            job.append(dict(base, provider="reference", status="ok", seconds=time_cpu(ref)))
        _derive(job, ceilings)
        rows += job
        longest = max(longest, time.perf_counter() - started)
        if on_job:
            on_job(job)
    return rows


BURST_CALLS, BURSTS = 20, 3


def _burst(fn, timer, device):
    """CUDA: {'burst_seconds': the median over BURSTS event pairs of the time per call of BURST_CALLS calls back to
    back} (after one flush: the host queues calls ahead of the GPU where it can, so this is the GPU's time where the
    host keeps up, its own where not; the L2 warm after the first call); {} on the CPU."""
    if device != "cuda":
        return {}
    return {"burst_seconds": statistics.median(timer(fn, calls=BURST_CALLS) for _ in range(BURSTS))}


def _derive(job, ceilings):
    """GFLOP/s, GB/s, the ratios to torch's rows and the roofline fraction of one (shape, primitive)'s rows."""
    timed = {r["provider"]: r for r in job if "seconds" in r}
    for row in timed.values():
        row["gflops"] = row["flops"] / row["seconds"] / 1e9
        row["gbytes"] = row["bytes"] / row["seconds"] / 1e9
        for provider, key in (("torch", "vs_torch"), ("torch-tf32", "vs_tf32")):
            if provider in timed:
                row[key] = timed[provider]["seconds"] / row["seconds"]
        if "burst_seconds" in row and "burst_seconds" in timed.get("torch", {}):
            row["burst_vs_torch"] = timed["torch"]["burst_seconds"] / row["burst_seconds"]
        fraction = roofline(row, ceilings) if row["provider"] != "reference" else None  # (one call, on the host)
        if fraction is not None:
            row["roofline"] = fraction


def table(rows):
    tf32, burst = any("vs_tf32" in r for r in rows), any("burst_seconds" in r for r in rows)
    return "\n".join([table_header(tf32, burst)] + [table_line(r, tf32, burst) for r in rows])


def table_header(tf32, burst=False):
    """The columns; burst (CUDA): 'b2b ms', the time per call of calls back to back (_burst)."""
    return (f"{'shape':36s} {'primitive':15s} {'provider':18s} {'median ms':>10s} " + (f"{'b2b ms':>9s} " if burst
            else "") + f"{'TFLOP/s':>9s} {'GB/s':>7s} {'% roof':>6s} {'vs torch':>8s}"
            + (f" {'vs tf32':>8s}" if tf32 else "") + "  status")


def table_line(r, tf32, burst=False):
    if "seconds" in r:
        ratios = [f"{r[k]:.2f}x" if k in r else "-" for k in ("vs_torch", "vs_tf32")[:1 + tf32]]
        roof = f"{100 * r['roofline']:.0f}" if "roofline" in r else "-"
        b2b = (f"{r['burst_seconds'] * 1e3:9.4g} " if "burst_seconds" in r else f"{'-':>9s} ") if burst else ""
        return (f"{r['shape']:36s} {r['primitive']:15s} {r['provider']:18s} {r['seconds'] * 1e3:10.4g} {b2b}"
                f"{r['gflops'] / 1e3:9.3g} {r['gbytes']:7.4g} {roof:>6s} " + " ".join(f"{v:>8s}" for v in ratios)
                + f"  {r['status']}" + (f" ({r['backend']})" if r.get("backend") else ""))
    return (f"{r['shape']:36s} {r['primitive']:15s} {r['provider']:18s} {'-':>10s} " + (f"{'-':>9s} " if burst
            else "") + f"{'-':>9s} {'-':>7s} {'-':>6s} {'-':>8s}" + (f" {'-':>8s}" if tf32 else "")
            + f"  {r['status']}: {r.get('note', '')[:120]}")


def geomean_vs_torch(rows, provider="cnnfast:auto", key="vs_torch"):
    """{primitive: (geometric mean, worst)} of provider's ratio `key` (vs_torch, or vs_tf32 on CUDA)."""
    out = {}
    for primitive in PRIMITIVES:
        ratios = [r[key] for r in rows if r["provider"] == provider and r["primitive"] == primitive and key in r]
        if ratios:
            out[primitive] = (float(np.exp(np.mean(np.log(ratios)))), min(ratios))
    return out


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, but got {text}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cnnfast bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--shapes", default=None, choices=sorted(SHAPE_SETS),
                        help="shape set (default: quick on cpu, gpu on cuda)")
    parser.add_argument("--shape", action="append", help="only shapes whose name contains this (repeatable)")
    parser.add_argument("--primitive", nargs="+", default=list(PRIMITIVES), choices=PRIMITIVES)
    parser.add_argument("--algo", nargs="+", help="cnnfast algorithms besides auto (default: all registered)")
    parser.add_argument("--tiles", action="store_true", help="time each tile configuration of the CUDA GEMM "
                        "algorithms (direct:32x64, direct:64x128, ...)")
    parser.add_argument("--repeats", type=_positive, default=None, help="timed calls per provider (default: 9 on "
                        "cpu, 30 on cuda)")
    parser.add_argument("--warm-l2", action="store_true", help="CUDA: leave in the L2 cache what the last calls left "
                        "(default: flushed before each timed call, so operands come from memory)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--json", default="bench-results.json", help="where to write the rows (default: "
                        "bench-results.json in the current folder)")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the roofline (needs matplotlib)")
    parser.add_argument("--deadline", type=_positive, metavar="SECONDS", help="start no layer that would end past "
                        "this many seconds from the start (judged by the longest so far); the summary, JSON and "
                        "plot cover what was measured")
    args = parser.parse_args(argv)
    for path in (args.json, args.plot):  # before the run, not after it: an unwritable path would lose the rows
        if path and (os.path.isdir(path) or not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK)):
            parser.error(f"cannot write {path}: it is a folder, or its folder does not exist or is not writable")
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # (said at the end, it came after the run)
        parser.error("--plot needs matplotlib, which is not installed (pip install matplotlib, the 'plot' extra)")
    device = detect_device() if args.device == "auto" else args.device
    missing = cuda_missing() if device == "cuda" else None
    if missing:
        parser.error(f"--device cuda: {missing}")
    if device == "cuda" and simulator_enabled():
        parser.error("--device cuda: NUMBA_ENABLE_CUDASIM=1 runs the CUDA kernels in Numba's simulator, which has "
                     "no times to measure (unset it where there is a GPU)")
    from cnnfast.plan import algorithms, kernel_package
    algos, aliases = algorithms(device), getattr(kernel_package(device), "ALIASES", {})
    known = set(algos) | set(aliases) | {"auto"}
    itemsize = np.dtype(args.dtype).itemsize

    def is_known(algo):  # a name, or name:tile for one of its tiles (as make_plan takes them: 'im2col:' names none)
        name, colon, tile = algo.partition(":")
        if not colon:
            return name in known
        name = aliases.get(name, name)
        return name in algos and tile in algos[name].tiles(itemsize)
    unknown = [a for a in args.algo or () if not is_known(a)]
    if unknown:
        parser.error(f"unknown --algo {' '.join(unknown)} for device {device}; expected some of {sorted(known)} "
                     f"(a CUDA GEMM algorithm may name a tile: direct:64x128)")
    if device == "cuda":
        try:
            import torch
            torch.backends.cudnn.allow_tf32 = False  # cuDNN strict fp32 baseline
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.benchmark = True  # its fastest algorithm per layer (the warm-up calls search)
        except ImportError:
            pass
    else:
        try:
            import torch
            torch.set_num_threads(os.cpu_count())
        except ImportError:
            pass
    args.repeats = args.repeats or (30 if device == "cuda" else 9)
    shapes = SHAPE_SETS[args.shapes or ("gpu" if device == "cuda" else "quick")]
    if args.shape:
        names = [s.name for s in shapes]
        shapes = [s for s in shapes if any(k in s.name for k in args.shape)]
        if not shapes:
            sys.stderr.write(f"cnnfast bench: no shape of the {args.shapes or 'default'} set matches --shape "
                             f"{' '.join(args.shape)}; its shapes: {', '.join(names)}\n")
            return 2

    tty = sys.stderr.isatty()

    def progress(i, n, name, primitive, provider):  # one line rewritten in place; in a log, a line per timing
        if tty:
            sys.stderr.write(f"\r[{i + 1:3d}/{n}] {name[:34]:34s} {primitive:15s} {provider:10s}")
        elif provider == "timing":
            sys.stderr.write(f"[{i + 1:3d}/{n}] {name} {primitive}\n")
        sys.stderr.flush()

    t0 = time.perf_counter()
    info = machine(device)
    flush = l2_flush() if device == "cuda" and not args.warm_l2 else None
    if device == "cuda":
        info["l2"] = f"flushed before each timed call ({flush.bytes >> 20} MiB written)" if flush else "warm"
    ceilings = measure_ceilings(device)
    where = info.get("gpu", info["cpu"]) + (f", driver {info['cuda_driver']}, {info['launch']} launches"
                                            if device == "cuda" else f", {info['cpus']} CPUs")
    print(f"cnnfast bench on {device} ({where}), {args.dtype}, median of {args.repeats}; validated against the "
          f"float64 reference before timing; baseline torch {info.get('torch', '(not installed)')}"
          + (" (cuDNN strict fp32, cudnn.benchmark on; torch-tf32 = PyTorch's default TF32; the status column names "
             "torch's kernel where it says)" if device == "cuda" else "")
          + "; FLOP/s count 2 per multiply-add with an input element (padding taps excluded)"
          + (f", one call per CUDA event pair (host time included where the GPU waits for it), L2 {info['l2']}; "
             f"b2b: {BURST_CALLS} calls back to back per event pair, median of {BURSTS}" if device == "cuda" else ""))
    if ceilings:
        tf32 = f", TF32 GEMM {ceilings['tf32_gflops']:.0f} GFLOP/s" if ceilings.get("tf32_gflops") else ""
        print(f"ceilings measured now: SGEMM {ceilings['sgemm_gflops']:.0f} GFLOP/s{tf32}, copy "
              f"{ceilings['copy_gbytes']:.1f} GB/s ({ceilings['how']})")
    with_tf32 = device == "cuda" and _torch_sees_gpu()  # (the torch-tf32 column)
    print(table_header(with_tf32, device == "cuda"), flush=True)
    rows, unmeasured = [], []

    def write_json(complete):  # after every job too: a run cut short keeps the rows measured so far
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump({"device": device, "dtype": args.dtype, "repeats": args.repeats, "machine": info,
                       "ceilings": ceilings, "complete": complete, "rows": rows, "unmeasured": unmeasured,
                       "seconds": time.perf_counter() - t0}, f, indent=1)
        os.replace(tmp, args.json)

    def on_job(job):
        rows.extend(job)
        sys.stderr.write("\r" + " " * 80 + "\r" if tty else "")
        print("\n".join(table_line(r, with_tf32, device == "cuda") for r in job), flush=True)
        write_json(False)

    run(shapes, device, args.primitive, args.algo, args.dtype, args.repeats, progress, ceilings, args.tiles,
        on_job=on_job, flush=flush, deadline=args.deadline and t0 + args.deadline)
    measured = {(r["shape"], r["primitive"]) for r in rows}
    unmeasured = [f"{s.name} {p}" for s in shapes for p in args.primitive if (s.name, p) not in measured]
    if unmeasured:
        print(f"--deadline {args.deadline}: {len(unmeasured)} of {len(shapes) * len(args.primitive)} layer "
              f"primitives not measured: {', '.join(unmeasured)}")
    if device == "cuda" and info["launch"] == "raw":
        from cnnfast.kernels.cuda.launch import raw_fallbacks
        if raw_fallbacks():  # timed on Numba's dispatcher after all: said, here and in the JSON
            info["launch"] = f"raw (Numba's dispatcher for {', '.join(raw_fallbacks())}: their PTX did not load)"
            print(f"launches: {info['launch']}")
    compared = False
    for key, name in (("vs_torch", "torch" + (" (cuDNN fp32)" if device == "cuda" else "")),
                      ("vs_tf32", "torch-tf32"), ("burst_vs_torch", "torch (cuDNN fp32), calls back to back")):
        for primitive, (geo, worst) in geomean_vs_torch(rows, key=key).items():
            print(f"cnnfast:auto vs {name}, {primitive}: geometric mean {geo:.2f}x, worst {worst:.2f}x")
            compared = True
    if not compared:  # said at the end too, where the summary would be
        print("cnnfast:auto vs torch: no baseline ("
              + ("torch is not installed: pip install -e '.[torch]'" if "torch" not in info else
                 "no torch row was timed") + ")")
    write_json(not unmeasured)
    print(f"wrote {args.json} ({time.perf_counter() - t0:.0f} s)")
    if args.plot and ceilings:
        plot_roofline(rows, ceilings, args.plot, f"cnnfast {device}: {where} ({info['date']})")
        print(f"wrote {args.plot}")
    elif args.plot:
        print("--plot: not drawn, no ceilings were measured (on cuda they need torch)", file=sys.stderr)
    return 1 if any(r["status"] not in ("ok", "n/a") for r in rows) else 0
