"""Host memory for large CPU buffers: a pool of blocks that stay mapped (results, the API's padded temporaries,
im2col's and Winograd's scratch of POOLED_FROM bytes or more).

glibc serves an allocation of 32 MiB or more (its largest mmap threshold) from fresh pages of mmap every time and
unmaps it at free, so every call's result was faulted in and zeroed anew: 3.2 of the 6 ms of 96 @112 batch 8's
depthwise input gradient (38.5 MB), as much again as the kernels (bench/RESULTS.md, 2026-12-07). A block goes back
to the pool when the last array viewing it is freed, and the next request of exactly its size takes the most
recently returned one, the likeliest still in cache (taking the least recent, two blocks in turn, made the same
call 4.4 ms rather than 2.5). The pool keeps at most POOL_IDLE_BYTES idle (0: none), the least recently returned
blocks freed first; empty_cache() frees them all, and so does a request that would otherwise fail (MemoryError).
Shapes that keep changing reuse nothing and keep up to POOL_IDLE_BYTES mapped.

Nothing here waits on the lock: the garbage collector can run a lease's __del__ (or any finalizer that calls
cnnfast) inside any allocation, in a thread that holds the lock already, so a request that finds it taken allocates
afresh, and a returned block waits in _returned for whoever holds the lock to settle it on release.
"""
import math
import os
import threading
from collections import OrderedDict, deque

import numpy as np

POOLED_FROM = 32 << 20
POOL_IDLE_BYTES = 1 << 30
_idle = OrderedDict()  # id(block) -> block (a uint8 NumPy array), the least recently returned first
_returned = deque()  # blocks given back, not yet in _idle
_clear = False  # empty_cache() asked for the idle blocks to be freed
_idle_lock = threading.Lock()


class _Lease:
    """A pooled block lent to arrays: the base of each array over it (NumPy takes the memory from
    __array_interface__ and keeps this object alive); the block returns to the pool when this is collected."""

    __slots__ = ("block", "__array_interface__")

    def __init__(self, block, shape, dtype):
        self.block = block
        self.__array_interface__ = {"data": (block.ctypes.data, False), "shape": shape, "typestr": dtype.str,
                                    "version": 3}

    def __reduce__(self, *memo):  # (a copy would carry the address without the block: lent twice)
        raise TypeError("a cnnfast pool lease cannot be copied or pickled; copy the array over it instead")

    __copy__ = __deepcopy__ = __reduce__

    def __del__(self):
        try:
            _returned.append(self.block)
            _drain()
        except Exception:  # (interpreter shutdown: the module's globals may be gone)
            pass


def _settle():
    """Under _idle_lock: the returned blocks into _idle, the idle ones freed if empty_cache() asked, and the least
    recently returned beyond POOL_IDLE_BYTES."""
    global _clear
    while _returned:
        block = _returned.popleft()
        _idle[id(block)] = block
    if _clear:
        _clear = False
        _idle.clear()
    idle = sum(b.nbytes for b in _idle.values())
    while idle > POOL_IDLE_BYTES:
        idle -= _idle.popitem(last=False)[1].nbytes


def _drain():
    """Settle the pool unless its lock is held (the holder drains on release). Never waits."""
    while (_returned or _clear) and _idle_lock.acquire(blocking=False):
        try:
            _settle()
        finally:
            _idle_lock.release()


def pooled_empty(shape, dtype):
    """np.empty(shape, dtype), its memory from the pool when it is POOLED_FROM bytes or more."""
    dtype = np.dtype(dtype)
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    if math.prod(shape) * dtype.itemsize < POOLED_FROM:  # (the common case: ~0.3 us over np.empty's)
        return np.empty(shape, dtype)
    shape = tuple(int(v) for v in shape)  # (NumPy ints would wrap in the size arithmetic)
    nbytes = math.prod(shape) * dtype.itemsize
    block = None
    if _idle_lock.acquire(blocking=False):  # (taken: another thread, or this one's finalizer inside: allocate)
        try:
            _settle()
            key = next((k for k, b in reversed(_idle.items()) if b.nbytes == nbytes), None)
            block = _idle.pop(key, None)
        finally:
            _idle_lock.release()
        _drain()
    if block is None:
        try:
            block = np.empty(nbytes, np.uint8)
        except MemoryError:  # the idle blocks (of other sizes) back to the system first, then once more
            empty_cache()
            block = np.empty(nbytes, np.uint8)
    return np.asarray(_Lease(block, shape, dtype))


def _after_fork():  # (a child forked while another thread held the lock would find it taken forever)
    global _idle_lock
    _idle_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def empty_cache():
    """Free the idle blocks of cnnfast's pool of large CPU buffers (POOLED_FROM bytes or more): their memory goes
    back to the system, and the next large result is faulted in anew (at once, or as soon as another thread using
    the pool lets go of it). Arrays in use are not touched."""
    global _clear
    _clear = True
    _drain()
