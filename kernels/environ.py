"""Environment variables read on every call (the launch path, check mode, autotuning): from os.environ's own dict
where CPython keeps one, two C calls, where os.environ.get's four Python frames cost ~0.5 us on the dev VM, and ~5 us
a call inside a model, where Python between kernels runs cold."""
import functools
import os


def get(name, default=None):
    """os.environ.get(name, default)."""
    try:
        raw = os.environ._data.get(_key(name))
    except AttributeError:  # (another Python's os.environ)
        return os.environ.get(name, default)
    return default if raw is None else os.environ.decodevalue(raw)


@functools.lru_cache(maxsize=None)
def _key(name):
    """The key os.environ's dict keeps the variable under (bytes on POSIX, upper case on Windows)."""
    return os.environ.encodekey(name)
