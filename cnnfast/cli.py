"""`cnnfast info | explain | validate | bench`.

    cnnfast info                                          versions, Numba CUDA target, GPU, algorithms
    cnnfast explain conv2d 1x3x32x32 6x3x5x5 --bias       ConvSpec figures, dense-layer comparison, plan
    cnnfast explain conv2d_weight 8x64x56x56 64x64x3x3 8x64x56x56 --padding 1 --device cuda
    cnnfast validate [--device cpu|cuda] [--algo NAME]    every algorithm vs the float64 reference
    cnnfast bench [...]                                   validated benchmark (cnnfast bench --help)
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import re
import sys


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info(args) -> int:
    from cnnfast import __version__
    from cnnfast.arrays import simulator_enabled

    print(f"cnnfast {__version__}, Python {platform.python_version()} on {platform.machine()}")
    for dist in ("numpy", "numba", "numba-cuda", "cupy-cuda12x", "cupy-cuda13x", "torch"):
        print(f"  {dist:14s} {_version(dist)}")
    from numba import cuda
    if simulator_enabled():
        target, gpu = "simulator (NUMBA_ENABLE_CUDASIM=1)", "simulated device"
    else:
        target = "CUDA driver"
        try:
            gpu = cuda.get_current_device() if cuda.is_available() else None
            gpu = f"{gpu.name.decode() if isinstance(gpu.name, bytes) else gpu.name}, compute capability " \
                  f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}" if gpu else "no GPU"
        except Exception as e:  # a broken driver is reported, not raised
            gpu = f"no GPU ({type(e).__name__}: {e})"
    print(f"Numba CUDA target: {target}; GPU: {gpu}")
    from cnnfast.plan import algorithms
    for device in ("cpu", "cuda"):
        try:
            names = ", ".join(algorithms(device))
        except Exception as e:
            names = f"unavailable ({type(e).__name__}: {e})"
        print(f"algorithms on {device}: {names}")
    return 0


def _shape(text):
    try:
        return tuple(int(v) for v in text.replace(",", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 1x3x32x32, but got {text!r}") from None


def _ints(text):
    """'2' -> 2; '2,1' -> (2, 1); 'same'/'valid' kept; '1:2,0:1' -> ((1, 2), (0, 1)) (low:high pairs)."""
    if text in ("same", "valid"):
        return text
    parts = text.split(",")
    try:
        values = [tuple(int(v) for v in p.split(":")) if ":" in p else int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, ints separated by commas or low:high pairs, "
                                         f"but got {text!r}") from None
    return values[0] if len(values) == 1 and not isinstance(values[0], tuple) else tuple(values)  # (1:2,): every axis


def explain(args) -> int:
    import cnnfast

    kw = {k: getattr(args, k) for k in ("stride", "padding", "dilation", "groups") if getattr(args, k) is not None}
    transposed = args.op.startswith("conv_transpose")
    forward = re.fullmatch(r"conv(_transpose)?[123]d", args.op)
    for flag, given, takes in (("--padding-mode", args.padding_mode not in (None, "zeros"), not transposed),
                               ("--output-padding", args.output_padding is not None, transposed),
                               ("--bias", args.bias, forward)):
        if given and not takes:
            print(f"error: {args.op}: {flag} does not apply to it", file=sys.stderr)
            return 2
    if args.padding_mode and not transposed:
        kw["padding_mode"] = args.padding_mode
    if args.output_padding is not None:
        kw["output_padding"] = args.output_padding
    from cnnfast.api import _OPS
    if args.op not in _OPS:
        print(f"error: unknown op {args.op!r}; expected one of {sorted(_OPS)}", file=sys.stderr)
        return 2
    shapes = list(args.shapes)
    expected = ((2,) if args.bias else (2, 3)) if forward else (3,)  # input, weight (, bias); a gradient's three
    if len(shapes) not in expected:
        print(f"error: {args.op}: expected {' or '.join(map(str, expected))} shapes (in PyTorch's argument order), "
              f"but got {len(shapes)}", file=sys.stderr)
        return 2
    if args.bias and forward and len(shapes[1]) >= 2:  # (a malformed weight: the API's rank check reports it)
        channels = shapes[1][1] * (kw.get("groups") or 1) if transposed else shapes[1][0]
        shapes.append((channels,))
    try:
        plan = cnnfast.explain(args.op, *shapes, device=args.device, dtype=args.dtype, algo=args.algo,
                               workspace_limit=args.workspace_limit, **kw)
    except (TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.spec.describe())
    print(plan)
    return 0


def validate(args) -> int:
    from cnnfast.validate import validate as run

    def progress(r):
        status = "ok" if r.ok else "FAIL"
        print(f"  {r.device:4s} {r.build:8s} {r.algorithm:10s} {r.kind:22s} {r.case:16s} {r.dtype:7s} "
              f"{'n/a' if r.error != r.error else f'{r.error:.1e}':>8s} {status}", flush=True)

    if args.device == "cuda":
        from cnnfast.arrays import cuda_missing
        missing = cuda_missing()
        if missing:
            print(f"error: --device cuda: {missing}", file=sys.stderr)
            return 2
    if args.algo is not None:
        from cnnfast.plan import algorithms, kernel_package
        algos = algorithms(args.device)
        name, colon, tile = args.algo.partition(":")
        name = getattr(kernel_package(args.device), "ALIASES", {}).get(name, name)
        sizes = [4 if dtype == "float32" else 8 for dtype in args.dtype]  # a tile every dtype asked for has
        tiles = [t for t in (algos[name].tiles(4) or ()) if all(t in algos[name].tiles(s) for s in sizes)] \
            if name in algos else []  # (float64's GEMM tiles are fewer)
        if name not in algos or colon and tile not in tiles:  # ('direct:' names no tile, as in make_plan)
            print(f"error: unknown algo {args.algo!r} for device {args.device}; expected one of {sorted(algos)}"
                  + (f" (tiles of {name}: {', '.join(tiles)})" if tiles else ""), file=sys.stderr)
            return 2
    results = run(args.device, algos=args.algo and [args.algo], dtypes=args.dtype, progress=progress)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"FAIL {r.algorithm} {r.kind} {r.case} {r.dtype} {r.build}: {r.note}")
    skipped = sum(r.note.startswith("n/a") for r in results)  # problems the algorithm does not take
    print(f"{len(results) - skipped - len(failed)} of {len(results) - skipped} checks passed on {args.device}"
          + (f" ({skipped} not applicable to the algorithm)" if skipped else ""))
    return 1 if failed else 0


def bench(argv) -> int:
    from cnnfast import benchmark
    return benchmark.main(argv)


def main(argv=None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `cnnfast info | head -1`: the reader has gone; stop quietly, as a Unix tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the flush at exit would raise again)
        return 128 + 13  # (killed by SIGPIPE)


def _main(argv):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    parser = argparse.ArgumentParser(prog="cnnfast", description="cnnfast's command line: info, explain, validate, "
                                     "bench (each with --help).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, CUDA target, GPU and algorithms")
    ex = sub.add_parser("explain", help="shape figures and the plan for one op")
    ex.add_argument("op", help="conv2d, conv_transpose2d, conv2d_input, conv2d_weight, ... (1d/2d/3d)")
    ex.add_argument("shapes", nargs="+", type=_shape,
                    help="the op's array arguments as shapes in PyTorch's order, e.g. 1x3x32x32 6x3x5x5")
    ex.add_argument("--bias", action="store_true", help="the op has a bias (conv / conv_transpose)")
    for name in ("stride", "padding", "dilation", "output-padding"):
        ex.add_argument(f"--{name}", type=_ints, metavar="N[,N...]",
                        help=f"{name.replace('-', '_')} as an int (every axis) or one per axis, e.g. 2 or 2,1"
                        + ("; also same, valid, or low:high pairs such as 1:2,0:1" if name == "padding" else ""))
    ex.add_argument("--groups", type=int)
    ex.add_argument("--padding-mode", choices=("zeros", "reflect", "replicate", "circular"))
    ex.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ex.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ex.add_argument("--algo", default="auto")
    ex.add_argument("--workspace-limit", type=int, help="bytes")
    va = sub.add_parser("validate", help="every algorithm against the float64 reference")
    va.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    va.add_argument("--algo", help="one algorithm (default: every registered one)")
    va.add_argument("--dtype", nargs="+", default=["float32", "float64"], choices=("float32", "float64"))
    sub.add_parser("bench", help="validated benchmark; see cnnfast bench --help")
    args = parser.parse_args(argv)
    return {"info": info, "explain": explain, "validate": validate}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
