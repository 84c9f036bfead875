"""Layout kernels on CUDA, twins of kernels/cpu/layout.py (same signatures plus stream).

pad_cuda:       src (N, C, D, H, W) -> dst (N, C, Dp, Hp, Wp); dst[..., a, b, e] = src[..., idx_d[a], idx_h[b],
                idx_w[e]] or 0 where an index is -1. Thread (grid-stride) per dst element.
fold_pad_cuda:  the adjoint, as a gather: dst[..., i, j, l] = sum of src[..., a, b, e] over the padded positions
                that read (i, j, l), using inverse tables built on the host (CSR: starts, items) and added in
                padded order. Thread per dst element; no atomics.
bias_grad_cuda: dy (N, K, P, Q, U) -> db (K,): a block per (k, split of n and space) adds its share in a fixed
                tree, and the splits are added in order (deterministic, no atomics).
copy_cuda:      src of any non-negative strides (a slice, a permutation, an expanded tensor) -> dst C-contiguous:
                thread (grid-stride) per dst element, reading src through its strides (no CPU twin: NumPy copies);
                a negative stride through the host.
Index tables are host int64 arrays from contract.pad_indices; they are uploaded once per GPU and cached.
"""
import functools
import weakref
from functools import lru_cache

import numpy as np
from cnnfast.kernels.cuda import direct
from cnnfast.kernels.cuda.compile import ZERO, device_constant, numba_dtype
from cnnfast.kernels.cuda.indexing import split
from cnnfast.kernels.cuda.launch import DeviceNDArray, flat, launch, launch_numba, scratch
from numba import cuda

BLOCK = 256  # threads per block (a power of two: bias_grad_kernel's tree)
MAX_BLOCKS = 8192
MIN_SPLIT = 4096  # elements of dy per bias_grad block at least


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


@lru_cache(maxsize=None)
def bias_grad_kernel(dtype):
    """The bias-gradient kernel's Python function for a numba dtype:
    partial[s*K + k] = the sum of dy[n, k, l] over e = n*L + l in split s's [s*chunk, (s+1)*chunk).
    Block (k, s) of BLOCK threads: thread t adds e = start + t, start + t + BLOCK, ... (a warp reads consecutive
    l: coalesced), then the block adds its threads in a fixed tree (deterministic, no atomics)."""

    def kernel(dy, partial, N, K, L, chunk):
        k = cuda.blockIdx.x
        s = cuda.blockIdx.y
        t = cuda.threadIdx.x
        sums = cuda.shared.array(BLOCK, dtype)
        end = min(N * L, (s + 1) * chunk)
        e = s * chunk + t
        n = e // L
        l = e - n * L
        total = ZERO
        while e < end:
            total += dy[(n * K + k) * L + l]
            e += BLOCK
            l += BLOCK
            if l >= L:  # into a later sample: a division only when a row ends
                n += l // L
                l %= L
        sums[t] = total
        cuda.syncthreads()
        half = BLOCK // 2
        while half > 0:
            if t < half:
                sums[t] += sums[t + half]
            cuda.syncthreads()
            half //= 2
        if t == 0:
            partial[s * K + k] = sums[0]

    kernel.cache_key = f"{__name__}.bias_grad_kernel[{dtype}]"
    return kernel


def _inverse(table, length):
    """CSR of the padded positions reading each source index: starts (length + 1,), items (each source's positions
    in increasing order, then one 0). O(L log L): a 1-D signal of a million samples takes milliseconds."""
    table = np.asarray(table, np.int64)
    read = np.flatnonzero((table >= 0) & (table < length))  # (-1: a zero of 'zeros' padding reads nothing)
    starts = np.concatenate([[0], np.cumsum(np.bincount(table[read], minlength=length))]).astype(np.int64)
    flat = np.concatenate([read[np.argsort(table[read], kind="stable")], np.zeros(1, np.int64)]).astype(np.int64)
    return starts, flat


def _blocks(n):
    return max(1, min(MAX_BLOCKS, -(-n // BLOCK)))


def _content(table):
    """A host table's device_constant key: its bytes, made once per read-only table array (the public ops pass a
    spec's same read-only arrays each call) and hashed once (a bytes object keeps its hash); made each call for any
    other table (a list, an array that may change). A tuple of the entries, made and hashed each call, cost 7 us at
    230 entries and 0.84 ms at 16,000 (a 1-D signal with reflect padding)."""
    found = _CONTENTS.get(id(table))
    if found is not None and found[0]() is table:
        return found[1]
    key = np.asarray(table, np.int64).tobytes()
    if isinstance(table, np.ndarray) and not table.flags.writeable:
        _CONTENTS[id(table)] = weakref.ref(table, functools.partial(_forget, id(table))), key
    return key


def _forget(key, ref):
    if _CONTENTS.get(key, (None,))[0] is ref:  # (a dead table's entry, not a newer one's under the same id)
        del _CONTENTS[key]


_CONTENTS = {}  # id(table) -> (weak reference to it, its bytes), while the table lives


def pad_cuda(src, dst, idx_d, idx_h, idx_w, stream=0):
    N, C, D, H, W = src.shape
    tables = [device_constant(("pad", _content(t)), lambda t=t: np.asarray(t, np.int64))
              for t in (idx_d, idx_h, idx_w)]
    launch(pad_kernel, _blocks(dst.size), BLOCK, stream, flat(src), flat(dst), *tables, N * C, D, H, W, *dst.shape[2:])


def fold_pad_cuda(src, dst, idx_d, idx_h, idx_w, stream=0):
    N, C, D, H, W = dst.shape
    args = []
    for table, length in zip((idx_d, idx_h, idx_w), (D, H, W)):
        key = (_content(table), length)
        args += [device_constant(("fold-starts",) + key, lambda t=table, n=length: _inverse(t, n)[0]),
                 device_constant(("fold-items",) + key, lambda t=table, n=length: _inverse(t, n)[1])]
    launch(fold_pad_kernel, _blocks(dst.size), BLOCK, stream, flat(src), flat(dst), *args,
           N * C, D, H, W, *src.shape[2:])


def bias_grad_splits(N, K, L):
    """Splits of each channel's N*L sum: enough blocks to fill the GPU, each split at least MIN_SPLIT long."""
    return max(1, min(direct.TARGET_BLOCKS // max(K, 1), N * L // MIN_SPLIT))


def bias_grad_cuda(dy, db, stream=0):
    N, K = dy.shape[:2]
    L = dy.size // max(N * K, 1)
    splits = bias_grad_splits(N, K, L)
    chunk = -(-N * L // splits)
    partial = db if splits == 1 else scratch(splits * K, db.dtype, db, stream)
    launch(bias_grad_kernel(numba_dtype(db.dtype)), (K, splits), BLOCK, stream, flat(dy), partial, N, K, L, chunk)
    if splits > 1:  # the splits added in order
        launch(direct.reduce_splits_kernel, _blocks(K), BLOCK, stream, partial, db, splits, K)


def copy_kernel(src, dst):
    """dst[e] = src[n, c, d, h, w] for e the C-order index of (n, c, d, h, w): src 5-D of any strides (typed 'A'),
    dst flat."""
    C, D, H, W = src.shape[1], src.shape[2], src.shape[3], src.shape[4]
    for e in range(cuda.grid(1), dst.size, cuda.gridsize(1)):
        n, c, d, h, w = split(e, C, D, H, W)
        dst[e] = src[n, c, d, h, w]


def copy_cuda(src, dst, stream=0):
    """dst (C-contiguous, src's shape, 1-5 axes) = src on the device, src of any non-negative strides. With a
    negative stride it goes through the host (_host): Numba's view then holds device memory from its first element
    with an extent clipped to zero (numba-cuda's dummyarray: first to last element, at least empty)."""
    if any(s < 0 for s in src.strides):
        if src.size:
            dst.copy_to_device(np.ascontiguousarray(_host(src, stream)), stream=stream)
        return
    launch_numba(copy_kernel, _blocks(dst.size), BLOCK, stream, _five_axes(src), flat(dst))


def _host(src, stream):
    """src (a negative stride, not empty) on the host. numba-cuda's copy_to_host refuses such a view
    (NotImplementedError; the simulator's takes it): the bytes from its lowest element to its highest are copied, as
    a byte array over its memory from the lowest (its memory pointer starts at its first element), and viewed with
    its strides from the first element's offset among them. (A device-to-host copy into pageable memory, as here,
    has finished when it returns, on a stream too.)"""
    if type(src) is not DeviceNDArray:
        return src.copy_to_host(stream=stream)
    low = sum((n - 1) * s for n, s in zip(src.shape, src.strides) if s < 0)  # the lowest element, from the first
    high = sum((n - 1) * s for n, s in zip(src.shape, src.strides) if s > 0) + src.dtype.itemsize
    span = DeviceNDArray((high - low,), (1,), np.uint8, gpu_data=src.gpu_data.view(low, high))
    return np.ndarray(src.shape, src.dtype, span.copy_to_host(stream=stream), -low, src.strides)


def _five_axes(a):
    """a (1-5 axes, any strides) seen with leading unit axes added to five, without a copy."""
    shape, strides = (1,) * (5 - a.ndim) + tuple(a.shape), (a.dtype.itemsize,) * (5 - a.ndim) + tuple(a.strides)
    if type(a) is DeviceNDArray:  # (None in the simulator) its reshape cannot add axes to a strided array
        return DeviceNDArray(shape, strides, a.dtype, gpu_data=a.gpu_data)
    return a.reshape(shape)
