"""CUDA kernels (numba-cuda): the algorithms, the auto heuristic, the layout twins.

Importing this package applies kernels/_compat.py first (numpy >= 2.5 row_stack alias for numba-cuda 0.30.4).
Launchers take C-contiguous device arrays, flat or 5-D (Numba device arrays, the simulator's, or CuPy), a ConvGeometry,
workspace_limit= and stream=; they never synchronise, and start every kernel through launch.launch (Numba's
dispatcher, or the raw-pointer path, cuLaunchKernel through cuda-bindings with no CuPy needed: launch.py).

choose(g, primitive), the heuristic behind algo="auto" (to be tuned on a GPU, issue 5):
  depthwise layers -> depthwise (all three primitives; as a dense layer where its 32-bit row tests cannot take it,
  depthwise.supports); pointwise layers (1x1, unit stride, no padding) ->
  im2col, whose GEMM then reads the tensors in place; everything else -> direct (implicit GEMM, no workspace
  except the deterministic split-K partials of backward_filter), or im2col where direct's indexing cannot take the
  layer (direct.supports: a weight gradient of more than 2**28 output positions per sample); im2col is offered
  explicitly too (algo="im2col"). Each algorithm's supports() refuses what its index arithmetic cannot take.
"""
from cnnfast.kernels import _compat  # noqa: F401  (must precede numba.cuda's first compile)
from cnnfast.kernels.contract import Algorithm
from cnnfast.kernels.cuda import depthwise, direct, gemm, im2col
from cnnfast.kernels.cuda.bias import add_bias_cuda
from cnnfast.kernels.cuda.launch import view
from cnnfast.kernels.cuda.layout import bias_grad_cuda, copy_cuda, fold_pad_cuda, pad_cuda

__all__ = ["ALGORITHMS", "ALIASES", "RECORDABLE", "choose", "pad_cuda", "fold_pad_cuda", "bias_grad_cuda", "copy_cuda",
           "add_bias_cuda", "view"]

_KERNELS = {
    "direct": {"forward": ("tiled implicit-GEMM (fwd_* loaders)",),
               "backward_data": ("tiled implicit-GEMM (bwd_* loaders), every sub-pixel class in one launch",),
               "backward_filter": ("tiled implicit-GEMM (flt_* loaders), split-K", "reduce_splits_kernel")},
    "im2col": {"forward": ("im2col_kernel", "tiled GEMM (f_* loaders)"),
               "backward_data": ("tiled GEMM (d_* loaders)", "col2im_kernel"),
               "backward_filter": ("im2col_kernel", "tiled GEMM (w_* loaders)")},
}


def _kernels(name):
    def kernels(g, primitive, dtype):
        names = _KERNELS[name][primitive]
        if name == "im2col" and g.is_pointwise:
            names = ("tiled GEMM (pointwise loaders: x and dy in place, no columns)",)
        return tuple(f"{k} [{dtype}]" for k in names)
    return kernels


ALGORITHMS = {
    "direct": Algorithm("direct", direct.forward, direct.backward_data, direct.backward_filter,
                        supports=direct.supports, workspace_bytes=direct.workspace_bytes, kernels=_kernels("direct"),
                        tiles=direct.tile_names, tile=direct.tile_for,
                        doc="implicit GEMM: 8x64 (2x4 per thread) to 128x128 (8x8) block tiles, shared-memory "
                            "staging; strided backward_data by sub-pixel classes"),
    "im2col": Algorithm("im2col", im2col.forward, im2col.backward_data, im2col.backward_filter,
                        supports=im2col.supports, workspace_bytes=im2col.workspace_bytes, kernels=_kernels("im2col"),
                        tiles=gemm.tile_names, tile=im2col.tile_for,
                        doc="explicit column matrix (batch-chunked under workspace_limit) + the tiled GEMM"),
    "depthwise": Algorithm("depthwise", depthwise.forward, depthwise.backward_data, depthwise.backward_filter,
                           supports=depthwise.supports, workspace_bytes=depthwise.workspace_bytes,
                           kernels=depthwise.kernels,
                           doc="groups == channels: shared-memory halo tiles; weight gradient in registers, split"),
}

# The algorithms above, whose launchers start every kernel through launch.launch and take their workspace from
# launch.scratch: a call planned on one of them may be recorded and replayed as a launch program (program.py). One
# added to ALGORITHMS, or put in one's place, runs in full on every call.
RECORDABLE = tuple(ALGORITHMS.values())


# other names users know an algorithm by (issue 5, cuDNN's IMPLICIT_GEMM): algo= takes them as the algorithm's own
ALIASES = {"implicit_gemm": "direct"}


def choose(g, primitive):
    """(algorithm name, reason) for algo="auto"; see the module docstring."""
    refused = ""
    if g.is_depthwise:
        why_not = depthwise.supports(g, primitive)
        if why_not is None:
            return "depthwise", "depthwise layer (groups == in_channels): memory-bound, halo tiles in shared memory"
        refused = f"depthwise cannot index this layer ({why_not}); "
    if g.is_pointwise:
        return "im2col", refused + "1x1 unit-stride layer: a plain GEMM on x and dy in place (no columns or table)"
    why_not = direct.supports(g, primitive)
    if why_not is not None:
        return "im2col", refused + f"direct cannot index this layer ({why_not})"
    return "direct", refused + "implicit GEMM: no column matrix, register-tiled (a heuristic not yet tuned on a GPU)"
