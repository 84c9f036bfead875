"""A race and barrier detector for Numba's CUDA simulator, which runs kernels without detecting either.

`with watching() as seen:` patches the simulator for the block (nothing in cnnfast) and records, in seen.problems:
- shared race: two threads of a block touch one element of a cuda.shared.array between the same two barriers, at
  least one writing (per element: the barrier epoch, i.e. how many syncthreads its thread has passed, who wrote it,
  who read it; a thread cannot pass a barrier before every thread reaches it, so older epochs are done);
- uninitialised shared read: an element no thread of this block has written (the simulator hands the next block the
  same array, so it reads the last block's values; a GPU reads garbage);
- divergent barrier: the threads of a block pass different sequences of syncthreads (some skip one, or return
  before it): undefined on a GPU, often a hang;
- global conflict: within one launch, two threads write one element of a kernel argument, or one reads what another
  writes (the order of threads in a launch is undefined; only a later launch sees a write).
Threads only append their accesses to a log (list.append is atomic under the GIL); the log is read in order when a
block (shared memory) or a launch (kernel arguments) ends: a lock around each access made it 7x slower.
seen.counts counts what it saw (launches, blocks, barriers, accesses): a test checks them too, so that a simulator
change that bypasses a patch fails instead of passing silently. tests/test_races.py runs it on toy kernels with one
bug each and on cnnfast's kernels that use shared memory.
"""
import collections
import contextlib
import sys
import threading

import numpy as np


class Seen:
    def __init__(self):
        self.problems = {}  # (kind, where) -> an example
        self.counts = collections.Counter()
        self.global_log = []  # this launch's accesses to kernel arguments: (address, thread, write, line)

    def report(self, kind, where, **example):
        self.problems.setdefault((kind, where), example)

    def kinds(self):
        return {kind for kind, _ in self.problems}


class Record:
    """Who touched one element since its last epoch: the writer and the first reader (many: a second one too)."""
    __slots__ = ("epoch", "writer", "reader", "many", "line")

    def __init__(self, epoch):
        self.epoch, self.writer, self.reader, self.many, self.line = epoch, None, None, False, None

    def touch(self, seen, who, write, line, what):
        """Record an access by `who`; report a conflict with another thread's."""
        if self.writer is not None and self.writer != who:
            seen.report(f"{what} (written by one thread, {'written' if write else 'read'} by another)",
                        (self.line, line), threads=(self.writer, who))
        if write:
            other_reader = self.many or (self.reader is not None and self.reader != who)
            if other_reader:
                seen.report(f"{what} (read by one thread, written by another)", line, threads=(self.reader, who))
            self.writer, self.line = who, line
        elif self.reader is None:
            self.reader = who
        elif self.reader != who:
            self.many = True


def _line(depth):
    frame = sys._getframe(depth)
    return f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}"


def _flat(index, shape):
    index = index if isinstance(index, tuple) else (index,)
    return int(np.ravel_multi_index(tuple(int(i) for i in index), shape))  # (out of range: ValueError)


class Shared:
    """A block's cuda.shared.array whose accesses are logged on the block: (array, barrier epoch, element, thread,
    write, line)."""

    def __init__(self, array, line):
        self._array, self._line = array, line
        self.shape, self.dtype = array.shape, array.dtype

    def _access(self, index, write):
        thread = threading.current_thread()
        thread._manager.shared_log.append((self._line, len(thread.barriers), _flat(index, self._array.shape),
                                           thread.thread_id, write, _line(3)))

    def __getitem__(self, index):
        self._access(index, False)
        return self._array[index]

    def __setitem__(self, index, value):
        self._access(index, True)
        self._array[index] = value

    def __len__(self):
        return len(self._array)


def _shared_problems(seen, log):
    """One block's shared accesses, in the order they ran."""
    records, written = {}, set()
    for array, epoch, flat, thread, write, line in log:
        seen.counts["shared writes" if write else "shared reads"] += 1
        record = records.get((array, flat))
        if record is None or record.epoch != epoch:  # (an older epoch is over: every thread has passed its barrier)
            record = records[array, flat] = Record(epoch)
        if not write and (array, flat) not in written:
            seen.report("uninitialised shared read", (array, line), thread=thread)
        record.touch(seen, thread, write, line, f"shared race on {array}")
        if write:
            written.add((array, flat))


def _global_problems(seen, log):
    """One launch's accesses to its arguments, in the order they ran."""
    records = {}
    for address, thread, write, line in log:
        seen.counts["global writes" if write else "global reads"] += 1
        records.setdefault(address, Record(0)).touch(seen, thread, write, line, "global conflict")


def _global_access(seen, item, index, write):
    """A kernel argument's element, by address (views of one buffer share them)."""
    array = getattr(item, "_ary", None)
    if array is None or not isinstance(index, (tuple, int, np.integer)):
        return  # (a field name or a slice: cnnfast's kernels use neither)
    index = index if isinstance(index, tuple) else (index,)
    if len(index) != array.ndim or not all(0 <= int(i) < n for i, n in zip(index, array.shape)):
        return  # (the access itself raises IndexError)
    address = array.__array_interface__["data"][0] + sum(int(i) * s for i, s in zip(index, array.strides))
    thread = threading.current_thread()
    seen.global_log.append((address, (tuple(thread.blockIdx), tuple(thread.threadIdx)), write, _line(3)))


@contextlib.contextmanager
def watching():
    from numba.cuda import types
    from numba.cuda.np import numpy_support
    from numba.cuda.simulator import kernel
    from numba.cuda.simulator.cudadrv.devicearray import FakeWithinKernelCUDAArray
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    seen = Seen()
    patched = {}

    def patch(owner, name, make):
        patched[owner, name] = original = owner.__dict__[name]
        setattr(owner, name, make(original))

    def shared_array(original):  # as kernels/cuda/launch.py's: one array per kernel line, made atomically; tracked
        def array(self, shape, dtype, alignment=None):
            if shape == 0 or alignment is not None:
                return original(self, shape, dtype, alignment)
            frame = sys._getframe(1)
            key = frame.f_code.co_filename, frame.f_lineno
            found = self._allocations.get(key)
            if found is None:
                dtype = numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else dtype
                found = self._allocations.setdefault(key, Shared(np.empty(shape, dtype), _line(2)))
            return found
        return array

    def thread_init(original):
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            self.barriers = []
            self._manager.threads.append(self)
        return __init__

    def syncthreads(original):
        def barrier(self):
            self.barriers.append(_line(3))
            seen.counts["barriers"] += 1
            return original(self)
        return barrier

    def block_run(original):
        def run(self, grid_point, *args):
            self.threads, self.shared_log = [], []
            original(self, grid_point, *args)
            seen.counts["blocks"] += 1
            _shared_problems(seen, self.shared_log)
            sequences = collections.Counter(tuple(t.barriers) for t in self.threads)
            if len(sequences) > 1:
                (most, _), (other, _) = sequences.most_common(2)
                seen.report("divergent barrier", getattr(self._f, "__qualname__", "?"), block=grid_point,
                            barriers=(len(most), len(other)), first_difference=next(
                                (a, b) for a, b in zip(most + ("end",), other + ("end",)) if a != b))
        return run

    def launch(original):
        def call(self, *args):
            if self._device or kernel._kernel_context:  # a device function inside a kernel
                return original(self, *args)
            seen.global_log = []
            seen.counts["launches"] += 1
            try:
                return original(self, *args)
            finally:
                _global_problems(seen, seen.global_log)
        return call

    def element(original, write):
        def access(self, index, *value):
            _global_access(seen, self.__dict__["_item"], index, write)
            return original(self, index, *value)
        return access

    try:
        patch(FakeCUDAShared, "array", shared_array)
        patch(kernel.BlockThread, "__init__", thread_init)
        patch(kernel.BlockThread, "syncthreads", syncthreads)
        patch(kernel.BlockManager, "run", block_run)
        patch(kernel.FakeCUDAKernel, "__call__", launch)
        patch(FakeWithinKernelCUDAArray, "__getitem__", lambda original: element(original, False))
        patch(FakeWithinKernelCUDAArray, "__setitem__", lambda original: element(original, True))
        yield seen
    finally:
        for (owner, name), original in patched.items():
            setattr(owner, name, original)
