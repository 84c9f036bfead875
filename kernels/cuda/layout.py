"""Layout kernels on CUDA, twins of kernels/cpu/layout.py (same signatures plus stream).

pad_cuda:       src (N, C, D, H, W) -> dst (N, C, Dp, Hp, Wp); dst[..., a, b, e] = src[..., idx_d[a], idx_h[b],
                idx_w[e]] or 0 where an index is -1. Thread (grid-stride) per dst element.
fold_pad_cuda:  the adjoint, as a gather: dst[..., i, j, l] = sum of src[..., a, b, e] over the padded positions
                that read (i, j, l), using inverse tables built on the host (CSR: starts, items) and added in
                padded order. Thread per dst element; no atomics.
bias_grad_cuda: dy (N, K, P, Q, U) -> db (K,): thread per k sums over n and space in order (deterministic).
Index tables are host int64 arrays from contract.pad_indices; they are uploaded once per GPU and cached.
"""
import numpy as np
from cnnfast.kernels.cuda.compile import ZERO, device_constant
from cnnfast.kernels.cuda.launch import launch
from numba import cuda

BLOCK = 256
MAX_BLOCKS = 8192


def pad_kernel(src, dst, idx_d, idx_h, idx_w, NC, D, H, W, Dp, Hp, Wp):
    for e in range(cuda.grid(1), NC * Dp * Hp * Wp, cuda.gridsize(1)):
        b_e = e % Wp
        b_h = (e // Wp) % Hp
        b_d = (e // (Wp * Hp)) % Dp
        nc = e // (Wp * Hp * Dp)
        i, j, l = idx_d[b_d], idx_h[b_h], idx_w[b_e]
        if i >= 0 and j >= 0 and l >= 0:
            dst[e] = src[((nc * D + i) * H + j) * W + l]
        else:
            dst[e] = 0


def fold_pad_kernel(src, dst, start_d, items_d, start_h, items_h, start_w, items_w, NC, D, H, W, Dp, Hp, Wp):
    for e in range(cuda.grid(1), NC * D * H * W, cuda.gridsize(1)):
        l = e % W
        j = (e // W) % H
        i = (e // (W * H)) % D
        nc = e // (W * H * D)
        total = ZERO
        for ia in range(start_d[i], start_d[i + 1]):
            for ib in range(start_h[j], start_h[j + 1]):
                for ie in range(start_w[l], start_w[l + 1]):
                    total += src[((nc * Dp + items_d[ia]) * Hp + items_h[ib]) * Wp + items_w[ie]]
        dst[e] = total


def bias_grad_kernel(dy, db, N, K, L):
    for k in range(cuda.grid(1), K, cuda.gridsize(1)):
        total = ZERO
        for n in range(N):
            for l in range(L):
                total += dy[(n * K + k) * L + l]
        db[k] = total


def _inverse(table, length):
    """CSR of the padded positions reading each source index: starts (length + 1,), items."""
    table = np.asarray(table, np.int64)
    items = [np.flatnonzero(table == i) for i in range(length)]
    starts = np.concatenate([[0], np.cumsum([len(it) for it in items])]).astype(np.int64)
    flat = np.concatenate(items + [np.zeros(1, np.int64)]).astype(np.int64)
    return starts, flat


def _blocks(n):
    return max(1, min(MAX_BLOCKS, -(-n // BLOCK)))


def pad_cuda(src, dst, idx_d, idx_h, idx_w, stream=0):
    N, C, D, H, W = src.shape
    tables = [device_constant(("pad", tuple(t)), lambda t=t: np.asarray(t, np.int64))
              for t in (idx_d, idx_h, idx_w)]
    launch(pad_kernel, _blocks(dst.size), BLOCK, stream, src.reshape(src.size), dst.reshape(dst.size), *tables,
           N * C, D, H, W, *dst.shape[2:])


def fold_pad_cuda(src, dst, idx_d, idx_h, idx_w, stream=0):
    N, C, D, H, W = dst.shape
    args = []
    for table, length in zip((idx_d, idx_h, idx_w), (D, H, W)):
        key = (tuple(table), length)
        args += [device_constant(("fold-starts",) + key, lambda t=table, n=length: _inverse(t, n)[0]),
                 device_constant(("fold-items",) + key, lambda t=table, n=length: _inverse(t, n)[1])]
    launch(fold_pad_kernel, _blocks(dst.size), BLOCK, stream, src.reshape(src.size), dst.reshape(dst.size), *args,
           N * C, D, H, W, *src.shape[2:])


def bias_grad_cuda(dy, db, stream=0):
    N, K = dy.shape[:2]
    L = dy.size // max(N * K, 1)
    launch(bias_grad_kernel, _blocks(K), BLOCK, stream, dy.reshape(dy.size), db, N, K, L)


def copy_cuda(src, dst, stream=0):
    """dst (C-contiguous) = src of any strides. Numba device arrays with arbitrary strides cannot be viewed
    flat, so this goes through the host (correct; a strided-copy kernel is future work)."""
    dst.copy_to_device(np.ascontiguousarray(src.copy_to_host(stream=stream)), stream=stream)
