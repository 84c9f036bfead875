"""Choose the algorithm and kernels for one problem on one device, and say why.

Registries: the CPU algorithms are `cnnfast.kernels.cpu.ALGORITHMS`, the CUDA ones
`cnnfast.kernels.cuda.ALGORITHMS` (imported only when a CUDA array is seen); each kernel package also
exports `choose(geometry, primitive) -> (name, reason)`, its documented cost model for algo="auto".
Both devices also offer "reference": the float64 NumPy reference cast to the working dtype (on CUDA a
host round trip), the ground truth and the fallback while a device has no kernels.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import numpy as np

from cnnfast import reference
from cnnfast.arrays import to_host
from cnnfast.kernels.contract import DEFAULT_WORKSPACE_LIMIT, Algorithm, ConvGeometry

# ---------------------------------------------------------------- the reference as an algorithm


def _store(dst, value, stream=0):
    """dst[...] = value (float64 host values cast to dst's dtype), for any working array family."""
    module = type(dst).__module__
    value = np.ascontiguousarray(value, dtype=dst.dtype).reshape(dst.shape)  # (CUDA launchers take flat arrays)
    if module.startswith("cupy"):
        dst.set(value)
    elif module.startswith("numba.cuda"):
        dst.copy_to_device(value, stream=stream)
    else:
        dst[...] = value


def _reference_args(g: ConvGeometry):
    """Reference keyword arguments for geometry g, with the high padding that makes at least (P, Q, U) outputs
    (more when x has unused rows: the forward keeps the first (P, Q, U); the gradients take a dy of (P, Q, U) as it
    is, the positions past it getting nothing)."""
    axes = ((g.D, g.T, g.P, g.stride_d, g.dil_d, g.pad_d), (g.H, g.R, g.Q, g.stride_h, g.dil_h, g.pad_h),
            (g.W, g.S, g.U, g.stride_w, g.dil_w, g.pad_w))
    pads = tuple((lo, max(0, (n_out - 1) * s + d * (k - 1) + 1 - L - lo)) for L, k, n_out, s, d, lo in axes)
    return dict(stride=(g.stride_d, g.stride_h, g.stride_w), padding=pads, dilation=(g.dil_d, g.dil_h, g.dil_w),
                groups=g.groups)


def _ref_forward(x, w, bias, y, g, stream=0, **_):
    kw = _reference_args(g)
    b = None if bias is None else to_host(bias)
    out = reference.conv(to_host(x).reshape(g.x_shape), to_host(w).reshape(g.w_shape), b, **kw)
    _store(y, out[:, :, :g.P, :g.Q, :g.U], stream)


def _ref_backward_data(dy, w, dx, g, stream=0, **_):
    kw = _reference_args(g)
    _store(dx, reference.conv_input(g.x_shape, to_host(w).reshape(g.w_shape), to_host(dy).reshape(g.y_shape), **kw),
           stream)


def _ref_backward_filter(x, dy, dw, g, stream=0, **_):
    kw = _reference_args(g)
    _store(dw, reference.conv_weight(to_host(x).reshape(g.x_shape), g.w_shape, to_host(dy).reshape(g.y_shape), **kw),
           stream)


REFERENCE = Algorithm(
    name="reference", forward=_ref_forward, backward_data=_ref_backward_data,
    backward_filter=_ref_backward_filter, workspace_bytes=lambda *a: 0,
    kernels=lambda g, primitive, dtype: (f"cnnfast.reference.{_REF_NAMES[primitive]} (float64 NumPy)",),
    doc="the float64 NumPy reference, cast to the working dtype (on CUDA: a host round trip)")
_REF_NAMES = {"forward": "conv", "backward_data": "conv_input", "backward_filter": "conv_weight"}

# ---------------------------------------------------------------- registries

_PACKAGES = {"cpu": "cnnfast.kernels.cpu", "cuda": "cnnfast.kernels.cuda"}


def kernel_package(device: str):
    return sys.modules.get(_PACKAGES[device]) or importlib.import_module(_PACKAGES[device])


def algorithms(device: str) -> dict:
    """name -> Algorithm available on `device` (its kernel package's, then 'reference')."""
    algos = dict(getattr(kernel_package(device), "ALGORITHMS", {}))
    algos["reference"] = REFERENCE
    return algos


def registry_token(device: str) -> tuple:
    """Identifies what make_plan reads from the registry (the algorithms and choose); changes when one is replaced.
    It holds the objects themselves (hashed by identity): a replaced one's id could otherwise be reused by the next
    replacement while plans made under it are still cached."""
    package = kernel_package(device)
    return getattr(package, "choose", None), tuple(getattr(package, "ALGORITHMS", {}).items())


@dataclass(frozen=True)
class Plan:
    """What would run (or ran) for one call: returned by cnnfast.explain()."""

    op: str
    device: str
    algorithm: str
    primitive: str
    kernels: tuple
    workspace_bytes: int
    workspace_limit: object
    deterministic: bool
    reason: str
    spec: object = None
    tile: str = None  # the tile configuration the launcher runs, for algorithms with tiles (Algorithm.tiles)

    @property
    def candidate(self):
        """The algorithm and tile as algo= takes them: 'direct:128x128', or the name alone without tiles."""
        return self.algorithm if self.tile is None else f"{self.algorithm}:{self.tile}"

    def __str__(self):
        limit = (f"{DEFAULT_WORKSPACE_LIMIT:,} bytes, the default" if self.workspace_limit is None
                 else f"{self.workspace_limit:,} bytes")
        tile = "" if self.tile is None else f", tile {self.tile}"
        return "\n".join([
            f"plan for {self.op} on {self.device}",
            f"  algorithm        {self.algorithm} ({self.primitive} primitive{tile})",
            f"  kernels          {', '.join(self.kernels) if self.kernels else '-'}",
            f"  workspace        {self.workspace_bytes:,} bytes (limit: {limit})",
            f"  deterministic    {'yes' if self.deterministic else 'no'}",
            f"  why              {self.reason}",
        ])


def make_plan(op, spec, primitive, device, algo="auto", workspace_limit=None) -> Plan:
    """Pick the algorithm (and tile) for (spec, primitive) on device; ValueError for an unknown or unsuitable algo.
    algo: 'auto', an algorithm's name, or 'name:tile' for one of its tile configurations (Algorithm.tiles)."""
    algos = algorithms(device)
    g = spec.geometry
    name, colon, tile = algo.partition(":") if isinstance(algo, str) else (algo, "", "")
    alias = isinstance(name, str) and getattr(kernel_package(device), "ALIASES", {}).get(name)
    if alias:  # another name of one of the device's algorithms (the CUDA 'direct' is the implicit GEMM)
        name, note = alias, f" (the {device} algorithm {alias!r})"
    else:
        note = ""
    if name == "auto" and not colon:
        choose = getattr(kernel_package(device), "choose", None)
        if choose is None or len(algos) == 1:
            name, reason = "reference", f"no {device} kernels are registered yet"
        else:
            name, reason = choose(g, primitive)
    elif (not isinstance(name, str) or name not in algos
          or (colon and tile not in algos[name].tiles(spec.itemsize))):  # ('im2col:' names no tile)
        tiles = sorted(f"{n}:{t}" for n, a in algos.items() for t in a.tiles(spec.itemsize))
        if name in algos and tile and any(tile in algos[name].tiles(size) for size in (4, 8)):  # another dtype's
            raise ValueError(f"{op}: algo {algo!r} has no {spec.dtype} build on {device} (a tile of the other "
                             f"dtype's); {spec.dtype}'s tiles: {', '.join(tiles)}")
        raise ValueError(f"{op}: unknown algo {algo!r} for device {device}; expected 'auto' or one of "
                         f"{sorted(algos)}" + (f" (or with a tile: {', '.join(tiles)})" if tiles else ""))
    else:
        reason = "requested with algo=" + repr(algo) + note
    chosen = algos[name]
    why_not = chosen.supports(g, primitive)
    if why_not is not None:
        raise ValueError(f"{op}: algo={name!r} cannot run this problem on {device}: {why_not}")
    if workspace_limit is not None and (not isinstance(workspace_limit, (int, np.integer))
                                        or isinstance(workspace_limit, bool) or workspace_limit < 0):
        raise ValueError(f"{op}: expected workspace_limit to be a non-negative int (bytes) or None, "
                         f"but got {workspace_limit!r}")

    def workspace_of(algorithm, tile):
        extra = {"tile": tile} if tile else {}
        return int(algorithm.workspace_bytes(g, primitive, spec.itemsize, workspace_limit, **extra))

    def tile_of(algorithm):
        return algorithm.tile(g, primitive, spec.itemsize, workspace_limit) if algorithm.tile else None

    tile = tile or tile_of(chosen)
    workspace = workspace_of(chosen, tile)
    limit = DEFAULT_WORKSPACE_LIMIT if workspace_limit is None else workspace_limit
    if workspace > limit:  # an algorithm that cannot split its scratch finer than this problem needs
        shown = f"workspace_limit={limit:,}" + (" (the default)" if workspace_limit is None else "")
        if algo != "auto":
            raise ValueError(f"{op}: algo={name!r} needs at least {workspace:,} bytes of workspace, more than "
                             f"{shown}; raise the limit or use algo='direct'")
        # Winograd's GEMMs are im2col's in the transformed domain, and im2col's blocks shrink to almost any limit;
        # direct needs the least workspace of all
        for fallback in ("im2col", "direct") if name == "winograd" else ("direct",):
            why_not = algos[fallback].supports(g, primitive)
            if why_not is None:
                fallback_tile = tile_of(algos[fallback])
                if fallback == "direct" or workspace_of(algos[fallback], fallback_tile) <= limit:
                    break
        if why_not is not None:
            raise ValueError(f"{op}: algo={name!r} needs at least {workspace:,} bytes of workspace, more than "
                             f"{shown}, and algo='direct' cannot run this problem on {device}: {why_not}")
        name, chosen, tile = fallback, algos[fallback], fallback_tile
        workspace = workspace_of(chosen, tile)
        reason += f"; its workspace exceeds {shown}, so {fallback}"
    kernels = tuple(chosen.kernels(g, primitive, spec.dtype)) if chosen.kernels else ()
    return Plan(op, device, name, primitive, kernels, workspace, workspace_limit, chosen.deterministic,
                reason, spec, tile)
