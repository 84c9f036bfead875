"""Bias broadcast add on CUDA: y (N, K, *L) += bias (K,), in place.

Used by the public ops for conv_transpose's bias on Numba device arrays (CuPy arrays broadcast natively).
Thread i (grid-stride) owns element i of the flattened y; its channel is (i // L) % K.
"""
from cnnfast.kernels.cuda.launch import flat, launch
from numba import cuda

BLOCK = 256


def add_bias_kernel(y, bias, K, L, size):
    """y: 1-D view of the contiguous (N, K, L) output (size elements); bias: (K,)."""
    for i in range(cuda.grid(1), size, cuda.gridsize(1)):
        y[i] += bias[(i // L) % K]


def add_bias_cuda(y, bias, stream=0):
    """y: C-contiguous device array (N, K, ...); bias: device array (K,) of y's dtype."""
    K = y.shape[1]
    L = y.size // (y.shape[0] * K) if y.size else 1
    blocks = max(1, min(-(-y.size // BLOCK), 1024))
    launch(add_bias_kernel, blocks, BLOCK, stream, flat(y), bias, K, L, y.size)
