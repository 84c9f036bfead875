"""Autotuning (cnnfast.autotune): every candidate timed once per problem, the fastest kept and named by explain(),
results unchanged, winners cached in memory and on disk, switched on and off like cudnn.benchmark."""
import contextlib
import dataclasses
import json
import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from cnnfast.kernels import cpu

import cnnfast
from cnnfast import compare, grad, reference, tune

X, W = (2, 4, 9, 9), (6, 4, 3, 3)


@pytest.fixture
def arrays():
    rng = np.random.default_rng(21)
    return rng.standard_normal(X).astype(np.float32), rng.standard_normal(W).astype(np.float32)


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv("CNNFAST_AUTOTUNE", raising=False)
    monkeypatch.delenv(tune.CACHE_ENV, raising=False)
    tune.clear()
    yield
    tune.clear()


def slowed(monkeypatch, name, delay, counts):
    """Replace the CPU algorithm `name` by one that counts its runs and sleeps `delay` s before each."""
    real = cpu.ALGORITHMS[name]

    def wrap(launcher):
        def run(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            time.sleep(delay)
            return launcher(*args, **kwargs)
        return run

    monkeypatch.setitem(cpu.ALGORITHMS, name, dataclasses.replace(
        real, forward=wrap(real.forward), backward_data=wrap(real.backward_data),
        backward_filter=wrap(real.backward_filter)))


@pytest.mark.parametrize("slow, fast", [("im2col", "direct"), ("direct", "im2col")])
def test_the_fastest_candidate_wins_and_runs_once_tuned(monkeypatch, arrays, slow, fast):
    x, w = arrays
    counts, others = {}, {}
    slowed(monkeypatch, slow, 0.05, counts)
    slowed(monkeypatch, fast, 0.0, counts)
    for name in set(cpu.ALGORITHMS) - {slow, fast}:  # winograd, depthwise (not a candidate here)
        slowed(monkeypatch, name, 0.1, others)
    with cnnfast.autotune():
        y = cnnfast.conv2d(x, w, padding=1)
        assert counts == {slow: 1 + tune.REPEATS, fast: 2 + tune.REPEATS}  # warm-up, timed runs, the call itself
        plan = cnnfast.explain("conv2d", x, w, padding=1)
        assert plan.algorithm == fast and plan.reason.startswith(f"autotuned: {fast} ")
        assert f"< {slow} " in plan.reason  # every candidate's median, fastest first
        again = cnnfast.conv2d(x, w, padding=1)
    assert counts[fast] == 3 + tune.REPEATS and counts[slow] == 1 + tune.REPEATS  # no second tuning
    compare.assert_close(y, reference.conv(x, w, padding=1), "float32", "autotuned conv2d")
    np.testing.assert_array_equal(y, again)


def test_off_by_default_and_only_for_algo_auto(monkeypatch, arrays):
    x, w = arrays
    counts = {}
    slowed(monkeypatch, "im2col", 0.0, counts)
    assert not tune.active()
    cnnfast.conv2d(x, w, padding=1, algo="direct")
    with cnnfast.autotune():
        cnnfast.conv2d(x, w, padding=1, algo="direct")  # an explicit algorithm is never tuned
        assert counts == {}
        with cnnfast.autotune(False):
            assert not tune.active()
        assert tune.active()
        assert "the first call times every candidate" in cnnfast.explain("conv2d", x, w, padding=1).reason
    assert not tune.active()
    monkeypatch.setenv("CNNFAST_AUTOTUNE", "1")
    assert tune.active()
    grad.conv2d_weight(x, W, np.ones((2, 6, 9, 9), np.float32), padding=1)
    assert counts["im2col"] == 1 + tune.REPEATS + (cnnfast.explain(
        "conv2d_weight", x, W, np.ones((2, 6, 9, 9), np.float32), padding=1).algorithm == "im2col")


def test_an_autotune_object_switches_again_each_time_it_is_entered():
    """As torch.set_grad_enabled, autotune(...) switches at the call and its block sets the previous mode back; an
    object entered a second time had left autotuning as it was and then raised on exit (its token used once)."""
    assert not tune.active()
    on = cnnfast.autotune()
    assert tune.active()
    with on:
        assert tune.active()
    assert not tune.active()
    with on:  # again
        assert tune.active()
        with cnnfast.autotune(False) as off:
            assert not tune.active()
        assert tune.active()
    assert not tune.active()
    with off:
        assert not tune.active()
    assert not tune.active()


def test_one_autotune_object_entered_nested_and_in_other_threads():
    """An object kept at module level (as people keep torch.no_grad()) and entered in worker threads: autotuning was
    silently off in the worker's first block, whose exit then raised (a token of another thread); nested in one
    thread, the inner exit turned it off inside the outer block, whose exit raised."""
    import threading

    assert not tune.active()
    shared = cnnfast.autotune()  # (on in this thread from here, as the call form does)
    seen = []

    def worker():
        for _ in range(2):
            with shared:
                seen.append(tune.active())
            seen.append(tune.active())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [True, False, True, False]
    with shared:
        with shared:
            assert tune.active()
        assert tune.active()
    assert not tune.active()  # (the block undid the call's switch too)
    with cnnfast.autotune(False):
        with shared:
            assert tune.active()
        assert not tune.active()
    assert not tune.active()


def test_autotune_blocks_set_back_what_was_there_before_them():
    """(In a context of its own: the objects made here switch it at the call.) An object made earlier and first
    entered inside another block had set back the mode from before it was made; a block that ends while one begun
    after it is still open (a generator's, abandoned) had taken that block's setting."""
    import contextvars

    def body():
        made_earlier = cnnfast.autotune()
        with cnnfast.autotune(False):
            with made_earlier:
                assert tune.active()
            assert not tune.active()  # (was on)

        def paused():
            with cnnfast.autotune(True):
                yield
        with cnnfast.autotune(False):
            inside = paused()
            next(inside)  # its block open, ours ends first
            assert tune.active()
        assert tune.active()  # (still its block's)
        inside.close()
        assert tune._MODE.get() is True  # what was there before our block: made_earlier's switch
    contextvars.copy_context().run(body)
    assert tune._MODE.get() is None


def test_no_thread_takes_the_cache_file_as_read_before_its_winners_are_in(monkeypatch, tmp_path):
    """The path was marked read before its winners were merged: a second thread meanwhile found none and timed the
    problem again (under contention, so it could store a worse winner)."""
    import threading

    monkeypatch.setenv(tune.CACHE_ENV, str(tmp_path / "winners.json"))
    monkeypatch.setattr(tune, "_LOADED", set())
    monkeypatch.setattr(tune, "_WINNERS", {})
    stored = {"a problem": {"winner": "im2col", "ms": {"im2col": 1.0}}}
    reading, go = threading.Event(), threading.Event()

    def entries(path, warn=True):
        reading.set()
        go.wait(10)
        return dict(stored)
    monkeypatch.setattr(tune, "_entries", entries)
    first = threading.Thread(target=tune._load)
    first.start()
    assert reading.wait(10)
    seen = []
    second = threading.Thread(target=lambda: (tune._load(), seen.append(dict(tune._WINNERS))))
    second.start()
    second.join(0.2)  # (it waits for the first's merge)
    go.set()
    first.join(10)
    second.join(10)
    assert seen == [stored]


def test_candidates_respect_the_workspace_limit(monkeypatch, arrays):
    x, w = arrays
    counts = {}
    slowed(monkeypatch, "im2col", 0.0, counts)
    with cnnfast.autotune():
        plan = cnnfast.explain("conv2d", x, w, padding=1, workspace_limit=0)
        cnnfast.conv2d(x, w, padding=1, workspace_limit=0)
        plan = cnnfast.explain("conv2d", x, w, padding=1, workspace_limit=0)
    assert "im2col" not in counts and "im2col" not in plan.reason and plan.workspace_bytes == 0


def test_winners_persist_in_the_disk_cache(monkeypatch, arrays, tmp_path):
    x, w = arrays
    path = tmp_path / "tuned" / "winners.json"
    monkeypatch.setenv(tune.CACHE_ENV, str(path))
    with cnnfast.autotune():
        cnnfast.conv2d(x, w, padding=1)
        first = cnnfast.explain("conv2d", x, w, padding=1)
    assert path.exists() and first.algorithm in path.read_text()
    tune.clear()  # as a new process: nothing in memory
    counts = {}
    for name in cpu.ALGORITHMS:  # every candidate: winograd may be the winner read back
        slowed(monkeypatch, name, 0.0, counts)
    with cnnfast.autotune():
        assert cnnfast.explain("conv2d", x, w, padding=1).reason == first.reason  # read back, not timed
        cnnfast.conv2d(x, w, padding=1)
    assert counts == {first.algorithm: 1}  # only the call itself, by the winner


def test_an_unreadable_cache_file_is_ignored(monkeypatch, arrays, tmp_path):
    x, w = arrays
    bad = tmp_path / "winners.json"
    bad.write_text("{not json")
    monkeypatch.setenv(tune.CACHE_ENV, str(bad))
    with cnnfast.autotune():
        y = cnnfast.conv2d(x, w, padding=1)
    compare.assert_close(y, reference.conv(x, w, padding=1), "float32", "autotuned conv2d")


@pytest.mark.cuda
def test_autotune_on_cuda_arrays(arrays, monkeypatch):
    cuda = pytest.importorskip("numba.cuda")
    monkeypatch.setattr(tune, "REPEATS", 1)  # six candidates (two algorithms x three tiles) in the simulator
    x, w = (a[:1, :2] for a in arrays)  # small: each candidate runs twice, 256 threads a block for 128x128
    with cnnfast.autotune():
        y = cnnfast.conv2d(cuda.to_device(x), cuda.to_device(w), padding=1)
        plan = cnnfast.explain("conv2d", x.shape, w.shape, padding=1, device="cuda")
    timed = set(plan.reason.split())
    assert plan.reason.startswith("autotuned: ") and {f"{a}:{t}" for a in ("direct", "im2col")
                                                     for t in ("32x64", "64x128", "128x128")} <= timed
    compare.assert_close(y.copy_to_host(), reference.conv(x, w, padding=1), "float32", "autotuned conv2d on CUDA")


def test_a_tuned_problem_is_not_planned_again(monkeypatch, arrays):
    """After tuning, a call reuses the winner's plan (make_plan cost ~58 us of host time per call)."""
    from cnnfast import plan as plan_module
    x, w = arrays
    with cnnfast.autotune():
        first = cnnfast.conv2d(x, w, padding=1)
        calls = []
        real = plan_module.make_plan
        monkeypatch.setattr(plan_module, "make_plan", lambda *a, **k: calls.append(a[3:5]) or real(*a, **k))
        again = cnnfast.conv2d(x, w, padding=1)
        assert cnnfast.explain("conv2d", x, w, padding=1).reason.startswith("autotuned: ")
    assert calls == []
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("stored", [
    "[1, 2]",  # not an object
    '{"KEY": "im2col"}',  # an entry that is not an object
    '{"KEY": {"winner": "im2col"}}',  # no medians
    '{"KEY": {"winner": 3, "ms": {"3": 1.0}}}',  # a winner that is not a name
    '{"KEY": {"winner": "im2col", "ms": {"im2col": "fast"}}}',  # a median that is not a number
    '{"KEY": {"winner": "im2col", "ms": {"im2col": 1' + "0" * 400 + '}}}',  # no float holds it (OverflowError)
    '{"KEY": {"winner": "im2col", "ms": {"im2col": NaN}}}',  # Python's json takes NaN
    '{"KEY": {"winner": "reference", "ms": {"reference": 0.1}}}',  # never a candidate
    '{"KEY": {"winner": "depthwise", "ms": {"depthwise": 0.1}}}',  # well formed, but cannot run this layer
], ids=["list", "string-entry", "no-ms", "int-winner", "str-ms", "huge-int-ms", "nan-ms", "reference", "cannot-run"])
def test_a_malformed_disk_cache_entry_is_tuned_again(monkeypatch, arrays, tmp_path, stored):
    x, w = arrays
    with cnnfast.autotune():
        key = tune.key("cpu", cnnfast.explain("conv2d", x, w, padding=1).spec, "forward", None)
    path = tmp_path / "winners.json"
    path.write_text(stored.replace("KEY", key))
    monkeypatch.setenv(tune.CACHE_ENV, str(path))
    tune.clear()
    malformed = "depthwise" not in stored  # the last one is well formed: it is retuned without a warning
    match = "cannot read the autotune cache" if stored.startswith("[") else "malformed autotune cache"
    warns = pytest.warns(RuntimeWarning, match=match) if malformed else contextlib.nullcontext()
    with cnnfast.autotune(), warns:
        y = cnnfast.conv2d(x, w, padding=1)
        plan = cnnfast.explain("conv2d", x, w, padding=1)
    compare.assert_close(y, reference.conv(x, w, padding=1), "float32", "conv2d with a bad cache")
    assert plan.reason.startswith("autotuned: ") and plan.algorithm not in ("reference", "depthwise")


def test_processes_sharing_a_disk_cache_keep_each_others_winners(monkeypatch, arrays, tmp_path):
    """A process writes the file merged with what others wrote since it read it (last writer no longer wins)."""
    x, w = arrays
    path = tmp_path / "winners.json"
    monkeypatch.setenv(tune.CACHE_ENV, str(path))
    with cnnfast.autotune():
        cnnfast.conv2d(x, w, padding=1)  # this process reads the (absent) file, then writes its winner
        other = {"cpu:another machine|forward|float32|()|None": {"winner": "direct", "ms": {"direct": 1.0}}}
        path.write_text(json.dumps({**json.loads(path.read_text()), **other}))  # another process's winner
        cnnfast.conv2d(x[:1], w, padding=1)  # a new problem: tuned, and the file written again
    stored = json.loads(path.read_text())
    assert set(other) <= set(stored) and len(stored) == 3


def test_an_unwritable_disk_cache_warns_once_and_leaves_no_temporary_files(monkeypatch, arrays, tmp_path):
    x, w = arrays
    path = tmp_path / "winners.json"
    monkeypatch.setenv(tune.CACHE_ENV, str(path))
    monkeypatch.setattr(tune.os, "replace", lambda *a: (_ for _ in ()).throw(PermissionError(13, "read-only")))
    with cnnfast.autotune(), pytest.warns(RuntimeWarning, match="cannot write the autotune cache") as caught:
        cnnfast.conv2d(x, w, padding=1)
        cnnfast.conv2d(x[:1], w, padding=1)
    assert len([c for c in caught if "autotune cache" in str(c.message)]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["winners.json.lock"]  # no temporary file left


@pytest.mark.parametrize("stored", ["{not json", "[1, 2]", "[" * 100_000 + "]" * 100_000, None],
                         ids=["corrupt", "not-an-object", "nested-too-deeply", "a-folder"])
def test_a_cache_file_that_cannot_be_read_is_reported_once_and_left_alone(monkeypatch, arrays, tmp_path, stored):
    """Not replaced by this process's winners alone (other processes' would be lost); tuning still works."""
    x, w = arrays
    path = tmp_path / "winners.json"
    path.mkdir() if stored is None else path.write_text(stored)
    monkeypatch.setenv(tune.CACHE_ENV, str(path))
    with cnnfast.autotune(), pytest.warns(RuntimeWarning, match="cannot read the autotune cache") as caught:
        y = cnnfast.conv2d(x, w, padding=1)
        cnnfast.conv2d(x[:1], w, padding=1)
        assert cnnfast.explain("conv2d", x, w, padding=1).reason.startswith("autotuned: ")  # held in memory
    assert len([c for c in caught if "autotune cache" in str(c.message)]) == 1
    assert path.is_dir() if stored is None else path.read_text() == stored
    compare.assert_close(y, reference.conv(x, w, padding=1), "float32", "autotuned conv2d")


def test_the_cache_file_gets_the_usual_mode(monkeypatch, arrays, tmp_path):
    """0o666 less the umask, as any file the user writes (mkstemp's temporary file is 0o600)."""
    x, w = arrays
    path = tmp_path / "winners.json"
    monkeypatch.setenv(tune.CACHE_ENV, str(path))
    with cnnfast.autotune():
        cnnfast.conv2d(x, w, padding=1)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


_WRITER = """
import sys
from cnnfast import tune
for j in range(20):
    tune._WINNERS[f"{sys.argv[1]}-{j}"] = {"winner": "direct", "ms": {"direct": 1.0}}
    tune._save()
"""


def test_processes_writing_the_cache_at_once_keep_every_winner(tmp_path):
    """Four processes, 20 winners each, each written as soon as it is found: all 80 in the file (a lock around
    read-merge-replace; without it, 72-79 of 80 survived)."""
    path = tmp_path / "winners.json"
    env = {**os.environ, tune.CACHE_ENV: str(path)}
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(i)], env=env) for i in range(4)]
    assert [p.wait(timeout=120) for p in writers] == [0] * 4
    assert len(json.loads(path.read_text())) == 80


def test_explain_of_a_cuda_problem_under_autotune_needs_no_gpu(monkeypatch):
    """The winner's key names the GPU; without one (no driver), explain() still shows the heuristic's plan."""
    from numba import cuda

    def no_gpu():
        raise cuda.CudaSupportError("CUDA driver library cannot be found")
    monkeypatch.setattr(cuda, "get_current_device", no_gpu)
    with cnnfast.autotune():
        plan = cnnfast.explain("conv2d", (1, 3, 8, 8), (4, 3, 3, 3), device="cuda")
    assert "autotune is on" in plan.reason


@pytest.mark.parametrize("value, on", [("", False), ("0", False), ("false", False), ("No", False), (" off ", False),
                                       ("1", True), ("yes", True), ("true", True)])
def test_the_environment_switches_read_false_no_and_off_as_off(monkeypatch, value, on):
    monkeypatch.setenv("CNNFAST_AUTOTUNE", value)
    monkeypatch.setenv("CNNFAST_CHECK", value)
    assert tune.active() is on and compare.active() is on


def test_the_environment_switches_are_read_at_every_call(monkeypatch):
    """Unset is off; a value set (or removed) in os.environ between two calls counts at the second (env_flag reads
    os.environ's own dict)."""
    monkeypatch.delenv("CNNFAST_CHECK", raising=False)
    assert compare.active() is False
    monkeypatch.setenv("CNNFAST_CHECK", "1")
    assert compare.active() is True
    monkeypatch.delenv("CNNFAST_CHECK")
    assert compare.active() is False
