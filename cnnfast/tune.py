"""Autotuning: time every algorithm that can run a problem, once per problem, and keep the fastest (as
torch.backends.cudnn.benchmark does).

    cnnfast.autotune()                       # on for this thread (CNNFAST_AUTOTUNE=1: on by default)
    with cnnfast.autotune():                 # ... or only inside the block; cnnfast.autotune(False): off
        y = cnnfast.conv2d(x, w, padding=1)  # first call of this problem: times the candidates, runs the winner
    cnnfast.explain("conv2d", x, w, padding=1).reason   # 'autotuned: im2col 0.41 ms < direct 0.93 ms'

Only algo="auto" calls are tuned. The candidates are the device's kernel algorithms (not the float64 reference)
that support the problem and fit its workspace limit; each runs once to warm up (its first run compiles), then
REPEATS times with the device synchronised around each run, and its median counts. Winners are kept per
(device and machine, primitive, dtype, geometry including the batch size, workspace limit), in memory and, with
CNNFAST_AUTOTUNE_CACHE=path, in a JSON file that later processes read. An algorithm with tile configurations
(the CUDA GEMMs: Algorithm.tiles) is timed once per tile: 'direct:128x128' is a candidate of its own.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import os
import platform
import statistics
import threading
import time
import warnings

from cnnfast.kernels import environ

REPEATS = 3
CACHE_ENV = "CNNFAST_AUTOTUNE_CACHE"
_MODE = contextvars.ContextVar("cnnfast_autotune", default=None)  # None: follow CNNFAST_AUTOTUNE
_BLOCKS = contextvars.ContextVar("cnnfast_autotune_blocks", default=())  # open blocks: (object, mode before it)
_VERSION = contextvars.ContextVar("cnnfast_autotune_version", default=0)  # changes of the mode (autotune's)
_WINNERS = {}  # key -> {"winner": name, "ms": {name: median ms}}
_LOADED = set()  # cache files read into _WINNERS
_WARNED = set()  # cache files that could not be read or written (warned once)


class autotune:
    """autotune(True) switches autotuning on for this thread or task, autotune(False) off, at the call (as
    torch.set_grad_enabled); as a context manager (`with cnnfast.autotune():`) the previous setting comes back at the
    end of the block. One object may be entered again, nested, and in other threads or tasks (one kept at module
    level): each block switches its own thread or task, and sets back what was there before it (the call's own switch
    too, where the block follows it with nothing set in between)."""

    def __init__(self, enabled=True):
        self._enabled = bool(enabled)
        self._made = _MODE.set(self._enabled)
        self._version = _changed()

    def __enter__(self):
        if self._made is not None and _VERSION.get() == self._version:  # nothing set since the call, here or ...
            try:
                _MODE.reset(self._made)  # ... in another thread or task (ValueError): the block starts from before it
                self._made = None
            except (ValueError, RuntimeError):
                pass
        _BLOCKS.set(_BLOCKS.get() + ((self, _MODE.get()),))
        _MODE.set(self._enabled)
        _changed()
        return self

    def __exit__(self, *exc):
        """Back to what was there before this object's newest block; or, where a block begun after it is still open
        (an abandoned generator's, ended out of order), that block's end sets it back."""
        blocks = _BLOCKS.get()
        i = max((i for i, (owner, _) in enumerate(blocks) if owner is self), default=None)
        if i is None:
            return
        previous = blocks[i][1]
        if i + 1 < len(blocks):
            blocks = blocks[:i] + ((blocks[i + 1][0], previous),) + blocks[i + 2:]
        else:
            blocks = blocks[:i]
            _MODE.set(previous)
        _BLOCKS.set(blocks)
        _changed()


def _changed():
    """Count a change of the mode in this thread or task (autotune's blocks tell whether one came after a call)."""
    version = _VERSION.get() + 1
    _VERSION.set(version)
    return version


def env_flag(name) -> bool:
    """An on/off environment variable: off when unset, empty, 0, false, no or off (any case), else on (read as
    kernels/environ.py reads them: every op reads two flags)."""
    value = environ.get(name)
    return bool(value) and value != "0" and value.strip().lower() not in ("", "0", "false", "no", "off")


def active() -> bool:
    mode = _MODE.get()
    if mode is None:
        return env_flag("CNNFAST_AUTOTUNE")
    return mode


def _machine(device):
    if device == "cpu":
        import numba

        from cnnfast.kernels.cpu import blas
        return f"cpu:{platform.machine()}:{numba.get_num_threads()} threads:{blas.threads()} blas threads"
    from numba import cuda
    try:
        gpu = cuda.get_current_device()
    except Exception:  # noqa: BLE001 (no GPU or driver: explain() of a CUDA problem runs nothing, keys nothing)
        return "cuda:unavailable"
    name = getattr(gpu, "name", "simulator")
    return f"cuda:{name.decode() if isinstance(name, bytes) else name}:{getattr(gpu, 'id', 0)}"


def key(device, spec, primitive, workspace_limit):
    """The winner's key: a string, so that it can be a JSON key."""
    return "|".join(map(str, (_machine(device), primitive, spec.dtype, tuple(spec.geometry), workspace_limit)))


def _cache_path():
    return os.environ.get(CACHE_ENV) or None


def _entries(path, warn=True):
    """The well-formed winners stored in path: {} when there is no file, None when it cannot be read or is not a
    JSON object (warned once: it is then neither read nor replaced); a warning names the entries left out."""
    try:
        with open(path) as f:
            stored = json.load(f)
        if not isinstance(stored, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as e:  # (JSON nested too deeply to parse: RecursionError)
        _warn_once(path, f"cannot read the autotune cache {path} ({type(e).__name__}: {e}); it is left as it is "
                         f"and winners stay in memory")
        return None
    bad = [k for k, v in stored.items() if not _well_formed(v)]
    if bad and warn:
        warnings.warn(f"cnnfast: ignoring {len(bad)} malformed autotune cache entries in {path} "
                      f"(first: {bad[0]!r}); those problems are tuned again", RuntimeWarning, stacklevel=3)
    return {k: v for k, v in stored.items() if k not in bad}


def _warn_once(path, message):
    if path not in _WARNED:
        _WARNED.add(path)
        warnings.warn(f"cnnfast: {message}", RuntimeWarning, stacklevel=4)


@contextlib.contextmanager
def _locked(path):
    """Hold an exclusive lock on path + '.lock' (POSIX; elsewhere no lock): processes sharing the cache merge
    their winners one at a time."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _well_formed(entry):
    """{"winner": a candidate name, "ms": {candidate: median ms (a finite float), the winner's included}}."""
    return (isinstance(entry, dict) and isinstance(entry.get("winner"), str) and isinstance(entry.get("ms"), dict)
            and entry["winner"] in entry["ms"] and not entry["winner"].startswith("reference")
            and all(_finite(v) for v in entry["ms"].values()))


def _finite(v):
    """A JSON number that is a finite float (10**400 is an int JSON takes, that no float holds)."""
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:
        return False


def _load():
    """The cache file's winners into _WINNERS, once per path: marked read once merged (under a lock), so that
    another thread cannot take the path as read while its winners are not there yet (and time them again)."""
    path = _cache_path()
    if path and path not in _LOADED:
        with _LOAD_LOCK:
            if path not in _LOADED:
                for k, v in (_entries(path) or {}).items():
                    _WINNERS.setdefault(k, v)
                _LOADED.add(path)


_LOAD_LOCK = threading.Lock()


def _save():
    """Write the winners to the cache file, merged with what other processes wrote there since it was read."""
    path = _cache_path()
    if not path:
        return
    tmp = None
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        with _locked(path):
            stored = _entries(path, warn=False)
            if stored is None:  # unreadable: left alone (warned)
                return
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"  # (created 0o666 less the umask, as any file the
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w") as f:  # user writes)
                json.dump({**stored, **_WINNERS}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
            tmp = None
    except OSError as e:  # a cache that cannot be written only costs the tuning
        _warn_once(path, f"cannot write the autotune cache {path} ({e}); winners stay in memory")
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def candidates(algos, itemsize):
    """What autotuning times: each kernel algorithm, once per tile configuration of the dtype when it has some
    ('direct:32x64', 'direct:64x128', ...)."""
    return [f"{name}:{tile}" if tile else name for name, a in algos.items() if name != "reference"
            for tile in (a.tiles(itemsize) or (None,))]


# (winner key, op, spec, registry) -> the winner's Plan, built once: rebuilding it with make_plan on every call
# cost ~58 us of host time per autotuned call (a tiny CPU conv2d: 111 -> 169 us). Bounded like api's plan cache.
_TUNED_PLANS = {}


def clear():
    """Forget every winner held in memory (the disk cache is left alone)."""
    _WINNERS.clear()
    _LOADED.clear()
    _WARNED.clear()
    _TUNED_PLANS.clear()


def plan(op, spec, primitive, device, workspace_limit, heuristic, run=None):
    """The autotuned Plan for this problem: the cached winner's, else (with run, a function that executes a Plan
    and waits for it) the fastest candidate's after timing them all, else the heuristic's with a note that the
    first call will tune."""
    from cnnfast.plan import algorithms, make_plan, registry_token

    _load()
    k = key(device, spec, primitive, workspace_limit)
    found = _WINNERS.get(k)
    memo = (k, op, spec, registry_token(device))
    tuned = _TUNED_PLANS.get(memo)
    if found is not None and tuned is not None and tuned[0] is found:
        return tuned[1]
    algos = algorithms(device)
    if found is not None and found["winner"].partition(":")[0] in algos:
        try:
            chosen = make_plan(op, spec, primitive, device, found["winner"], workspace_limit)
        except ValueError:  # a stored winner that cannot run this problem (an edited or foreign cache)
            found = None
    else:
        found = None
    if found is None:
        if run is None:
            return dataclasses.replace(heuristic, reason=heuristic.reason + "; autotune is on: the first call "
                                       "times every candidate algorithm and tile and keeps the fastest")
        ms = {}
        for name in candidates(algos, spec.itemsize):
            try:
                candidate = make_plan(op, spec, primitive, device, name, workspace_limit)
            except ValueError:  # cannot run this problem, or not within the workspace limit
                continue
            if candidate.candidate != name:
                continue
            run(candidate)  # warm-up: compiles on first use
            times = []
            for _ in range(REPEATS):
                start = time.perf_counter()
                run(candidate)
                times.append(time.perf_counter() - start)
            ms[name] = statistics.median(times) * 1e3
        if not ms:
            return heuristic
        found = _WINNERS[k] = {"winner": min(ms, key=ms.get), "ms": ms}
        _save()
        chosen = make_plan(op, spec, primitive, device, found["winner"], workspace_limit)
    ranking = " < ".join(f"{name} {t:.3g} ms" for name, t in sorted(found["ms"].items(), key=lambda kv: kv[1]))
    chosen = dataclasses.replace(chosen, reason=f"autotuned: {ranking}")
    if len(_TUNED_PLANS) >= 1024:
        _TUNED_PLANS.clear()
    _TUNED_PLANS[memo] = found, chosen
    return chosen
