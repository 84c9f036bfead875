"""Launch programs: a repeated CUDA call replayed as its allocations and kernel launches alone.

A call's launchers spend ~20 us of Python before the first kernel starts (views of Numba device arrays, tables
and grids looked up, scratch sized), the same every time for the same arguments. So the first call of a key
(api.run's _CALLS) runs as always, recorded; a later call with that key allocates the same buffers and starts the
same kernels on its own arrays' addresses:

    buffers   the call's arrays (api.run's order, bias last), then each allocation in order: the result,
              temporaries (a padded input) and the launchers' scratch
    launches  (kernel, grid, block, parameters): each parameter an int or a tuple of ints as recorded, or an array
              as (buffer, byte offset, elements), or a device constant (compile.device_constant's key)

A program is kept only when everything the call did on the GPU went through those: a call that copies an input
(not C-contiguous, a negative torch view), adds a bias with CuPy, or launches a kernel typed on strided arrays
(launch.launch_numba) runs in full every time; and it is replayed only on C-contiguous inputs. Two executors: the
raw path (cuLaunchKernel on the addresses, launch.py), and Numba's dispatcher on slices of the buffers (the
simulator's; the tests check replayed results bitwise against full calls in both).

Calls are replayed on the raw path, where the launch itself is cheap enough for the rest to matter, unless
CNNFAST_CUDA_REPLAY=0; on Numba's dispatcher (and in its CUDA simulator) only where DISPATCHER is set (the tests').
"""
import math
import weakref

import numpy as np
from cnnfast.kernels import environ
from cnnfast.kernels.cuda import compile, launch

ENV = "CNNFAST_CUDA_REPLAY"
DISPATCHER = False  # replay on Numba's dispatcher too (the simulator's): the tests set it


def path():
    """Whether calls kept under a key are recorded and replayed now (see the module docstring): None where not, else
    whether on the raw launch path."""
    raw = launch.raw_enabled()
    return raw if DISPATCHER or (raw and environ.get(ENV) != "0") else None


def address(a):
    """The device address of a CUDA array: a torch tensor's, a Numba or CuPy array's (launch._address), or in the
    simulator the host address of the NumPy array behind the simulator's."""
    get = _ADDRESS.get(type(a))
    if get is None:
        get = _ADDRESS[type(a)] = (_simulated_address if compile.simulating() else
                                   getattr(type(a), "data_ptr", launch._address))  # (torch's tensors: data_ptr)
    return get(a)


_ADDRESS = {}  # array type -> the function that gives such an array's address


def _simulated_address(a):
    return a._ary.__array_interface__["data"][0]


def _contiguous(a):
    """Whether a caller's array is C-contiguous memory of its own values (as a recorded call's inputs were)."""
    is_contiguous = getattr(a, "is_contiguous", None)  # torch (is_neg: negated values stored un-negated)
    if is_contiguous is not None:
        return is_contiguous() and not a.is_neg()
    is_c_contiguous = getattr(a, "is_c_contiguous", None)  # Numba's (the simulator's too)
    return is_c_contiguous() if is_c_contiguous is not None else a.flags.c_contiguous  # (CuPy's)


class Program:
    """A recorded call: run(dev, arrays) replays it (see the module docstring)."""

    def __init__(self, raw, inputs, allocations, constants, result, launches):
        self.raw = raw  # executor: raw pointers (cuLaunchKernel) or Numba's dispatcher
        self.first_constant = inputs + len(allocations)  # (buffers: the call's arrays, allocations, constants)
        self.allocations = allocations  # (shape, dtype, zero) each; the result's in the caller's shape
        self.constants = constants  # compile.device_constant's full keys of the constants the kernels read
        self.result = result  # buffer index of the result
        self.launches = launches  # (raw Function or pyfunc, grid, block, parameters: ints, tuples, _Slots)
        if raw:  # each launch as launch.launch_parameters takes it: its values with the addresses left 0, and slots
            self.raw_launches = []
            for function, grid, block, parameters in launches:
                values, slots = [], []
                for p in parameters:
                    if type(p) is _Slot:
                        slots.append((len(values), p.buffer, p.offset))
                    values.extend(p if type(p) is tuple else (0 if type(p) is _Slot else p,))
                self.raw_launches.append((function.handle, launch.dimensions(grid, block),
                                          np.array(values, np.int64), tuple(slots)))
            self.used = sorted({b for *_, slots in self.raw_launches for _, b, _ in slots})
            self._constants = {}  # buffer index of a constant -> (a weak reference to its array, its address)

    def run(self, dev, arrays):
        """The call's result on arrays (the caller's, in api.run's order) and dev's stream, or None where the
        program cannot run them (an input not C-contiguous, a device constant dropped since)."""
        for a in arrays:
            if a is not None and not _contiguous(a):
                return None
        constants = []
        for key in self.constants:
            constants.append(compile.constant(key))
            if constants[-1] is None:  # (dropped from device_constant's cache: the full call uploads it again)
                return None
        if dev.torch is not None:
            buffers = [*arrays, *dev.torch.tensors(self.allocations), *constants]
        else:
            buffers = [*arrays, *((dev.zeros if zero else dev.empty)(shape, dtype)
                                  for shape, dtype, zero in self.allocations), *constants]
        if self.raw:
            addresses = [0] * len(buffers)
            for i in self.used:
                b = buffers[i]
                if i >= self.first_constant:  # a constant: its address as at the last replay while it is the same array
                    seen = self._constants.get(i)
                    addresses[i] = seen[1] if seen is not None and seen[0]() is b else self._remember(i, b)
                else:
                    addresses[i] = address(b)
            for handle, dims, values, slots in self.raw_launches:
                launch.launch_parameters(handle, dims, dev.stream, values, slots, addresses)
        else:
            self._launch_numba(dev.stream, buffers)
        return buffers[self.result]

    def _remember(self, i, constant):
        self._constants[i] = weakref.ref(constant), address(constant)  # (not kept alive here once dropped)
        return self._constants[i][1]

    def _launch_numba(self, stream, buffers):
        for pyfunc, grid, block, parameters in self.launches:
            args = []
            for p in parameters:
                if type(p) is _Slot:
                    start = p.offset // p.itemsize
                    args.append(launch.flat(buffers[p.buffer])[start:start + p.size])
                else:
                    args.append(p)
            launch.dispatch(pyfunc, grid, block, stream, args)


class _Slot:
    """An array parameter: `size` elements of `itemsize` bytes from byte `offset` of buffer `buffer` (the call's
    arrays, its allocations, then the program's constants)."""
    __slots__ = ("buffer", "offset", "size", "itemsize")

    def __init__(self, buffer, offset, size, itemsize):
        self.buffer, self.offset, self.size, self.itemsize = buffer, offset, size, itemsize


class Recorder:
    """Records one call (see the module docstring): the device it is given (device()) notes the call's arrays and
    allocations, launch.py's hooks the launches and scratch; program(result) is the Program, or None with `refused`
    saying why not."""

    def __init__(self, dev, arrays):
        self.arrays = arrays
        self.allocations = []
        self.spans = []  # (first byte, end, dtype, buffer index) of each buffer seen
        self.launches = []
        self.constants = []  # compile.device_constant's full keys
        self.refused, self.again = None, False
        self.raw = launch.raw_enabled()
        self.dev = _RecordingDevice(dev, self)

    def __enter__(self):
        launch.RECORDING.recorder = self
        return self

    def __exit__(self, *exc):
        launch.RECORDING.recorder = None

    def refuse(self, why, again=False):
        """No program of this call: why; again: a later call may make one (this call's inputs stopped it). The first
        refusal decides: those after it may follow from it (an input's copy is neither allocated nor launched here)."""
        if self.refused is None:
            self.refused, self.again = why, again

    def _span(self, a, buffer):
        start = address(a)
        self.spans.append((start, start + a.nbytes, a.dtype, buffer))

    def working(self, a, working):
        """The working array of the call's array a: a itself, or a view of the same memory (torch's)."""
        index = next((i for i, b in enumerate(self.arrays) if b is a), None)
        start = address(working)
        if index is None or start != address(a) or working.nbytes != a.nbytes:
            self.refuse("an input was copied (not C-contiguous, or a negative view)", again=True)
        elif any(first < start + working.nbytes and start < end for first, end, _, _ in self.spans):
            self.refuse("two of the call's arrays share memory (a kernel's address would name either)", again=True)
        else:
            self._span(working, index)

    def allocated(self, a, shape, dtype, zero):
        self.allocations.append((tuple(shape), dtype, zero))
        self._span(a, len(self.arrays) + len(self.allocations) - 1)

    def launch(self, pyfunc, function, grid, block, args):
        if self.raw and function is None:
            self.refuse(f"{compile.kernel_key(pyfunc)} has no raw launch")
        parameters, constants = [], None
        for a in args:
            if isinstance(a, launch._INTEGERS):
                parameters.append(int(a))
            elif isinstance(a, tuple):
                parameters.append(tuple(int(v) for v in a))
            else:
                if constants is None:  # (the device constants kept now, as spans: once per launch)
                    constants = [(address(c), address(c) + c.nbytes, c.dtype, key) for key, c in compile.constants()]
                parameters.append(self._parameter(a, constants))
        self.launches.append((function if self.raw else pyfunc, grid, block, tuple(parameters)))

    def _parameter(self, a, constants):
        """The _Slot of array argument a: in a device constant (those kept now are alive, so a's if its address is
        theirs), else in the latest buffer seen whose memory holds it (an earlier one may have been freed and its
        memory handed out again)."""
        start, itemsize = address(a), a.dtype.itemsize
        for spans, is_constant in ((constants, True), (reversed(self.spans), False)):
            for first, end, dtype, buffer in spans:
                if first <= start and start + a.nbytes <= end and a.dtype == dtype and (start - first) % itemsize == 0:
                    if is_constant:  # (buffer: the constant's key; its slot numbered from -1 down until program())
                        if buffer not in self.constants:
                            self.constants.append(buffer)
                        buffer = -1 - self.constants.index(buffer)
                    return _Slot(buffer, start - first, a.size, itemsize)
        self.refuse("a kernel was given an array the recorder did not see allocated")
        return None

    def program(self, result):
        """The Program of the recorded call whose result (in the caller's family and shape) is `result`; None where
        a later call may make one, False where none will."""
        start = address(result) if math.prod(result.shape) else None
        found = [i for first, end, _, i in self.spans
                 if first == start and end - first == result.nbytes and i >= len(self.arrays)]
        if not found:
            self.refuse("the result is not one allocation")
        if self.refused is not None:
            return None if self.again else False
        allocations = list(self.allocations)
        index = found[-1] - len(self.arrays)
        _, dtype, zero = allocations[index]
        allocations[index] = (tuple(result.shape), dtype, zero)
        buffers = len(self.arrays) + len(allocations)
        launches = tuple((f, grid, block, tuple(_Slot(buffers + (-1 - p.buffer), p.offset, p.size, p.itemsize)
                                                if type(p) is _Slot and p.buffer < 0 else p for p in parameters))
                         for f, grid, block, parameters in self.launches)  # (constants after the buffers)
        return Program(self.raw, len(self.arrays), tuple(allocations), tuple(self.constants), found[-1], launches)


class _RecordingDevice:
    """The device of a recorded call (arrays.CUDA): its working arrays and allocations noted by the recorder."""

    def __init__(self, dev, recorder):
        self._dev, self._recorder = dev, recorder

    def __getattr__(self, name):
        return getattr(self._dev, name)

    def working(self, a):
        if not _contiguous(a):  # (before the copy, whose own work the recorder would refuse for good)
            self._recorder.refuse("an input is not C-contiguous memory of its own values", again=True)
        out = self._dev.working(a)
        self._recorder.working(a, out)
        return out

    def empty(self, shape, dtype):
        out = self._dev.empty(shape, dtype)
        self._recorder.allocated(out, shape, dtype, False)
        return out

    def zeros(self, shape, dtype):
        out = self._dev.zeros(shape, dtype)
        self._recorder.allocated(out, shape, dtype, True)
        return out

    def add_bias(self, y, bias):
        if self._dev.cp is not None:
            self._recorder.refuse("CuPy adds the bias")
        self._dev.add_bias(y, bias)
