"""The `cnnfast` command line: info, explain (with the LeNet figures), validate, and its errors."""
import os
import re
import subprocess
import sys

import pytest

from cnnfast.benchmark import SHAPE_SETS
from cnnfast.cli import main


def test_explain_prints_the_lenet_figures(capsys):
    assert main(["explain", "conv2d", "1x3x32x32", "6x3x5x5", "--bias"]) == 0
    out = capsys.readouterr().out
    assert "output           [1, 6, 28, 28]" in out
    assert "456 (weights + bias)" in out and "14,450,688 weights" in out
    assert "plan for conv2d on cpu" in out and "algorithm" in out


def test_explain_transposed_gradient_on_cuda(capsys):
    args = ["explain", "conv_transpose2d_weight", "2x8x5x5", "8x4x3x3", "2x4x11x11", "--stride", "2",
            "--device", "cuda", "--dtype", "float64"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "plan for conv_transpose2d_weight on cuda" in out and "backward_filter primitive" in out


def test_explain_reports_bad_input(capsys):
    assert main(["explain", "conv2d", "1x32x256x256", "64x3x7x7"]) == 2
    assert "expected input[1, 32, 256, 256] to have 3 channels, but got 32 channels instead" in capsys.readouterr().err


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numba-cuda" in out and "algorithms on cpu:" in out and "Numba CUDA target:" in out


def test_validate_reference_on_cpu(capsys):
    assert main(["validate", "--algo", "reference", "--dtype", "float64"]) == 0
    assert "checks passed on cpu" in capsys.readouterr().out


def test_validate_counts_the_problems_an_algorithm_does_not_take_apart(capsys):
    assert main(["validate", "--algo", "winograd", "--dtype", "float64"]) == 0
    summary = capsys.readouterr().out.splitlines()[-1]
    passed, total, skipped = map(int, re.fullmatch(
        r"(\d+) of (\d+) checks passed on cpu \((\d+) not applicable to the algorithm\)", summary).groups())
    assert passed == total and skipped > total > 0  # Winograd takes only the 3x3 unit-stride cases (2-D and 3-D)


@pytest.mark.cuda
def test_validate_takes_an_algorithm_by_its_other_name(capsys):
    assert main(["validate", "--device", "cuda", "--algo", "implicit_gemm", "--dtype", "float32"]) == 0
    assert "checks passed on cuda" in capsys.readouterr().out


def test_validate_reports_a_kernel_error_as_a_failed_check(monkeypatch, capsys):
    """An exception other than 'cannot run this problem' fails that check (listed, exit 1); the run goes on."""
    import cnnfast.api

    def broken(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(cnnfast.api, "conv1d", broken)
    assert main(["validate", "--algo", "reference", "--dtype", "float64"]) == 1
    out = capsys.readouterr().out
    assert "FAIL reference conv 1d float64" in out and "RuntimeError: boom" in out
    assert re.search(r"(\d+) of (\d+) checks passed on cpu", out.splitlines()[-1])


@pytest.mark.parametrize("command", [["validate"], ["bench", "--json", "/tmp/unused.json"]])
def test_cuda_commands_without_a_gpu_exit_2_with_a_message(command, monkeypatch, capsys):
    import numba.cuda

    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "0")
    monkeypatch.setattr(numba.cuda, "is_available", lambda: False)
    try:
        assert main(command + ["--device", "cuda"]) == 2
    except SystemExit as exit:  # bench's argparse
        assert exit.code == 2
    assert "--device cuda: no CUDA GPU found" in capsys.readouterr().err


def test_a_reader_that_leaves_early_ends_the_command_quietly():
    """`cnnfast info | head -1`: the pipe closes under the command; no traceback, the exit status of SIGPIPE."""
    import subprocess
    import sys
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first line
    done = subprocess.run([sys.executable, "-m", "cnnfast.cli", "info"], stdout=write, stderr=subprocess.PIPE,
                          text=True, timeout=300)
    os.close(write)
    assert done.returncode == 141 and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_console_script_is_installed():
    """The `cnnfast` entry point from setup.cfg, next to this interpreter, in a fresh process."""
    script = os.path.join(os.path.dirname(sys.executable), "cnnfast")
    done = subprocess.run([script, "explain", "conv1d", "2x4x100", "8x4x3", "--padding", "same"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "output           [2, 8, 100]" in done.stdout


def test_a_checkout_finds_its_own_kernels_whatever_is_installed():
    """Run in a source checkout (its folder first on sys.path, as `python -m pytest` there puts it), cnnfast is the
    checkout's and its kernels (the top-level kernels/, which an install maps to cnnfast.kernels) are found beside
    it: checked without the editable install's import hooks, as with a wheel installed or none (a wheel user's
    `python -m pytest` in the checkout failed with No module named 'cnnfast.kernels')."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
            "sys.path_hooks[:] = [h for h in sys.path_hooks if 'editable' not in repr(h).lower()]\n"
            "sys.path_importer_cache.clear()\n"
            "import numpy as np, cnnfast, cnnfast.kernels\n"
            "print(cnnfast.kernels.__file__, cnnfast.conv1d(np.ones((1, 1, 5)), np.ones((1, 1, 3))).sum())\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [os.path.join(root, "kernels", "__init__.py"), "9.0"] or \
        os.path.isdir(os.path.join(root, "cnnfast", "kernels"))  # (a checkout with them linked there)


@pytest.mark.parametrize("bad", [["explain", "conv2d", "1x3xfoo", "6x3x5x5"], ["frobnicate"],
                                 ["explain", "conv2d", "1x3x8x8", "4x3x3x3", "--stride", "2.5"],
                                 ["explain", "conv2d", "1x3x8x8", "4x3x3x3", "--padding", "1:x"]])
def test_bad_command_lines_exit_with_usage(bad):
    with pytest.raises(SystemExit) as info:
        main(bad)
    assert info.value.code == 2


def test_bench_validates_times_and_reports_against_measured_ceilings(tmp_path, capsys):
    """The README's main job on one small shape: each kernel validated then timed, the ceilings measured in the
    same run, a roofline fraction per row, the machine in the JSON (and the roofline PNG when matplotlib is here)."""
    import importlib.util
    import json

    out, png = tmp_path / "bench.json", tmp_path / "roofline.png"
    plot = importlib.util.find_spec("matplotlib") is not None
    args = ["bench", "--device", "cpu", "--shape", "3x3-16-16", "--primitive", "forward", "backward_filter",
            "--repeats", "3", "--json", str(out)] + ["--plot", str(png)] * plot
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "validated against the float64 reference before timing" in text and "ceilings measured now" in text
    result = json.loads(out.read_text())
    assert result["machine"]["cpus"] == os.cpu_count() and result["machine"]["date"]
    assert result["ceilings"]["sgemm_gflops"] > 1 and result["ceilings"]["copy_gbytes"] > 0.5
    cnnfast_rows = [r for r in result["rows"] if r["provider"].startswith("cnnfast:")]
    assert {r["primitive"] for r in cnnfast_rows} == {"forward", "backward_filter"}
    for r in cnnfast_rows:
        assert r["status"] == "ok" and r["error"] < 1e-3 and r["seconds"] > 0 and r["roofline"] > 0
        bound = min(result["ceilings"]["sgemm_gflops"], r["flops"] / r["bytes"] * result["ceilings"]["copy_gbytes"])
        assert abs(r["roofline"] - r["gflops"] / bound) < 1e-9
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_a_shape_filter_that_matches_nothing(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--shape", "resnet50-stem", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no shape of the default set matches --shape resnet50-stem" in err and "3x3-16-16@32" in err
    assert not out.exists()


def test_bench_progress_in_a_log_is_a_line_per_timing_step(tmp_path, capsys):
    assert main(["bench", "--device", "cpu", "--shape", "1x1-64-32", "--primitive", "forward", "--algo", "im2col",
                 "--repeats", "2", "--json", str(tmp_path / "bench.json")]) == 0
    err = capsys.readouterr().err  # not a terminal here: no carriage returns
    assert "\r" not in err and "[  1/1] 1x1-64-32@16 forward" in err


def test_bench_keeps_going_past_a_provider_error_and_writes_the_rows_after_every_job(tmp_path, capsys,
                                                                                       monkeypatch):
    """A GPU run has one try: an unexpected error in one provider (a CUDA error, out of memory) is that row's
    ERROR, every other row is still timed; each job's rows are printed and the JSON rewritten as they come, so a
    run cut short (the device's time limit) keeps what it measured."""
    import json

    from cnnfast import benchmark

    real = benchmark.cnnfast_call

    def flaky(shape, primitive, arrays, algo):
        if algo == "im2col" and primitive == "backward_filter":
            raise RuntimeError("CUDA_ERROR_OUT_OF_MEMORY (a stand-in)")
        return real(shape, primitive, arrays, algo)
    monkeypatch.setattr(benchmark, "cnnfast_call", flaky)
    out = tmp_path / "bench.json"
    written = []
    real_run = benchmark.run

    def run(*args, on_job, **kw):  # the JSON as it stands after each job
        return real_run(*args, on_job=lambda job: (on_job(job), written.append(json.loads(out.read_text()))), **kw)
    monkeypatch.setattr(benchmark, "run", run)
    args = ["bench", "--device", "cpu", "--shape", "1x1-64-32", "--primitive", "forward", "backward_filter",
            "--algo", "direct", "im2col", "--repeats", "2", "--json", str(out)]
    assert main(args) == 1  # a row that is not ok
    rows = json.loads(out.read_text())["rows"]
    bad = [r for r in rows if r["status"] != "ok"]
    assert [(r["provider"], r["primitive"], r["status"]) for r in bad] == [("cnnfast:im2col", "backward_filter",
                                                                            "ERROR")]
    assert "RuntimeError: CUDA_ERROR_OUT_OF_MEMORY" in bad[0]["note"]
    assert all("seconds" in r for r in rows if r["status"] == "ok") and len(rows) > len(bad) + 4
    assert [(w["complete"], len(w["rows"])) for w in written] == [(False, len(written[0]["rows"])),
                                                                  (False, len(rows))]
    assert json.loads(out.read_text())["complete"] is True
    text = capsys.readouterr().out
    assert text.index("1x1-64-32@16") < text.index("cnnfast:auto vs torch")  # rows before the summary


def test_bench_deadline_starts_no_layer_the_longest_so_far_would_carry_past_it(tmp_path, capsys, monkeypatch):
    """--deadline: a GPU call has a hard limit, and a run killed there loses its summary and plot. Here each clock
    reading is 0.4 s later (no ceilings measured: they read it too): the first layer takes seconds, so the second
    (which would end past 1 s) is not started, and the summary and the JSON say what was not measured."""
    import itertools
    import json
    import types

    from cnnfast import benchmark

    clock = itertools.count(step=0.4)
    monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(benchmark, "measure_ceilings", lambda device: None)  # (its readings of the clock)
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--shape", "1x1-64-32", "--primitive", "forward", "backward_filter",
                 "--algo", "direct", "--repeats", "2", "--deadline", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "--deadline 1: 1 of 2 layer primitives not measured: 1x1-64-32@16 backward_filter" in text
    assert "backward_filter:" not in text and "cnnfast:auto vs torch" in text  # (the summary, torch or not)
    written = json.loads(out.read_text())
    assert written["complete"] is False and written["unmeasured"] == ["1x1-64-32@16 backward_filter"]
    assert {r["primitive"] for r in written["rows"]} == {"forward"}


@pytest.mark.parametrize("args, message", [
    (["explain", "conv2d", "1x3x32x32", "--bias"], "conv2d: expected 2 shapes"),
    (["explain", "conv2d", "1x3x8x8", "6x3x3x3", "6", "--bias"], "conv2d: expected 2 shapes"),
    (["explain", "conv2d_weight", "1x3x8x8", "6x3x3x3"], "conv2d_weight: expected 3 shapes"),
    (["validate", "--algo", "nosuch"], "unknown algo 'nosuch' for device cpu"),
    (["explain", "conv9d", "1x3x8", "4x3x3"], "unknown op 'conv9d'"),
    (["validate", "--algo", "direct:99x99"], "unknown algo 'direct:99x99' for device cpu"),
    (["validate", "--algo", "im2col:"], "unknown algo 'im2col:' for device cpu"),  # names no tile, as in the API
    (["explain", "conv_transpose2d", "1x3x8x8", "3", "--bias"], "expected 4-dimensional weight"),
    (["explain", "conv_transpose2d", "1x4x8x8", "4x2x3x3", "--padding-mode", "reflect"],
     "conv_transpose2d: --padding-mode does not apply to it"),
    (["explain", "conv2d_input", "1x4x8x8", "4x4x3x3", "1x4x6x6", "--bias"], "conv2d_input: --bias does not apply"),
    (["explain", "conv2d", "1x4x8x8", "4x4x3x3", "--output-padding", "1"], "conv2d: --output-padding does not"),
])
def test_command_line_mistakes_exit_2_with_a_message(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--repeats", "0"], ["--repeats", "-2"], ["--json", "/nonexistent-folder/b.json"],
                                  ["--json", "."], ["--algo", "im2col", "nosuch"]])
def test_bench_refuses_bad_options_before_running(args):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--device", "cpu"] + args)
    assert info.value.code == 2


def test_bench_plot_without_matplotlib_is_refused_before_running(tmp_path, monkeypatch, capsys):
    """(It was said after the whole run, which then exited 0 without the PNG.)"""
    import importlib.util

    from cnnfast import benchmark
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "matplotlib" else
                        find_spec(name, *args))
    monkeypatch.setattr(benchmark, "run", lambda *args, **kwargs: pytest.fail("ran"))
    with pytest.raises(SystemExit) as info:
        main(["bench", "--device", "cpu", "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "r.png")])
    assert info.value.code == 2 and "--plot needs matplotlib, which is not installed" in capsys.readouterr().err


@pytest.mark.parametrize("padding, expected", [("1:2", "((1, 2), (1, 2))"), ("1:2,0:1", "((1, 2), (0, 1))"),
                                               ("1,2", "((1, 1), (2, 2))"), ("1", "((1, 1), (1, 1))")])
def test_explain_reads_one_low_high_pair_as_every_axis(padding, expected, capsys):
    assert main(["explain", "conv2d", "1x3x8x8", "4x3x3x3", "--padding", padding]) == 0
    assert f"padding {expected}" in capsys.readouterr().out


@pytest.mark.cuda
def test_bench_harness_cuda_path_validates_and_times_every_algorithm(monkeypatch):
    """The harness's CUDA path on a tiny problem: device arrays, each algorithm validated against the reference,
    then timed with CUDA events, each timed call (and each run of calls back to back) after the flush of the L2
    cache (in the simulator those times mean nothing and torch has no GPU baseline; on a GPU the same code gives the
    figures). Runs of 2 calls back to back, not 20: in the simulator each call takes ~70 ms (98 s -> ~15 s)."""
    from cnnfast import benchmark

    monkeypatch.setattr(benchmark, "BURST_CALLS", 2)
    shape = benchmark._s("tiny", (1, 2, 5, 5), (3, 2, 3, 3), padding=1)
    flushes = []
    rows = benchmark.run([shape], "cuda", list(benchmark.PRIMITIVES), None, "float32", 2,
                         flush=lambda: flushes.append(1))
    ours = [r for r in rows if r["provider"].startswith("cnnfast:")]
    for primitive in benchmark.PRIMITIVES:
        assert {r["provider"] for r in ours if r["primitive"] == primitive} == {
            "cnnfast:auto", "cnnfast:direct", "cnnfast:im2col"}  # depthwise does not take it
    assert all(r["status"] == "ok" and r["error"] < 1e-4 and "seconds" in r and "burst_seconds" in r for r in ours)
    assert "cnnfast:im2col" in benchmark.table(rows) and "b2b ms" in benchmark.table(rows)
    assert len(flushes) == (2 + benchmark.BURSTS) * len(ours)  # (not before the warm-up calls)


def test_bench_refuses_to_time_the_cuda_simulator(monkeypatch, capsys):
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    with pytest.raises(SystemExit) as info:
        main(["bench", "--device", "cuda", "--json", "/tmp/unused.json"])
    assert info.value.code == 2 and "Numba's simulator, which has no times to measure" in capsys.readouterr().err


def test_roofline_bounds_torch_tf32_rows_by_the_tf32_ceiling():
    """PyTorch's TF32 rows run on tensor cores: their fraction is of the TF32 GEMM ceiling measured in the same
    run (they exceeded 100% of the strict fp32 one); every other row's is of the SGEMM ceiling and copy roof."""
    from cnnfast.roofline import roofline
    ceilings = {"sgemm_gflops": 50_000.0, "tf32_gflops": 400_000.0, "copy_gbytes": 3_000.0}
    row = dict(flops=2e12, bytes=1e9, gflops=100_000.0)  # intensity 2000 FLOP/B: compute-bound
    assert roofline(dict(row, provider="torch-tf32"), ceilings) == pytest.approx(0.25)
    assert roofline(dict(row, provider="torch"), ceilings) == pytest.approx(2.0)
    assert roofline(dict(row, provider="cnnfast:auto"), ceilings) == pytest.approx(2.0)
    no_tf32 = {k: v for k, v in ceilings.items() if k != "tf32_gflops"}
    assert roofline(dict(row, provider="torch-tf32"), no_tf32) == pytest.approx(2.0)
    memory_bound = dict(flops=1e9, bytes=1e9, gflops=1_500.0, provider="torch-tf32")  # 1 FLOP/B: 3,000 GFLOP/s roof
    assert roofline(memory_bound, ceilings) == pytest.approx(0.5)


def test_validate_refuses_a_tile_one_of_its_dtypes_does_not_have(monkeypatch, capsys):
    """float64 has only the small GEMM tile: 'direct:64x128' with float64 among the dtypes is refused before running,
    naming the tiles every dtype asked for has (the runs would fail in make_plan, one by one)."""
    from cnnfast import arrays, validate
    monkeypatch.setattr(arrays, "cuda_missing", lambda: None)
    monkeypatch.setattr(validate, "validate", lambda *a, **k: pytest.fail("the run started"))
    assert main(["validate", "--device", "cuda", "--algo", "direct:64x128", "--dtype", "float32", "float64"]) == 2
    err = capsys.readouterr().err
    assert "unknown algo 'direct:64x128' for device cuda" in err and "64x128" not in err.partition("tiles of")[2]


@pytest.mark.parametrize("algo", ["direct:64x128", "im2col:", "winograd:32x64"])
def test_bench_refuses_a_tile_the_device_does_not_have_before_running(algo, tmp_path, monkeypatch, capsys):
    """The CPU algorithms have no tiles, and 'im2col:' names none: refused with the usage error, like an unknown
    name, before the ceilings are measured (not an ERROR row per job after them)."""
    from cnnfast import benchmark
    monkeypatch.setattr(benchmark, "measure_ceilings", lambda device: pytest.fail("the run started"))
    with pytest.raises(SystemExit) as info:
        main(["bench", "--device", "cpu", "--algo", algo, "--json", str(tmp_path / "bench.json")])
    assert info.value.code == 2 and f"unknown --algo {algo} for device cpu" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_explain_takes_padding_mode_and_output_padding(capsys):
    assert main(["explain", "conv2d", "1x2x8x8", "3x2x3x3", "--padding", "2", "--padding-mode", "reflect"]) == 0
    out = capsys.readouterr().out
    assert "output           [1, 3, 10, 10]" in out and "padding ((2, 2), (2, 2)) (reflect)" in out
    assert main(["explain", "conv_transpose2d", "1x4x5x5", "4x2x3x3", "--stride", "2", "--output-padding", "1"]) == 0
    out = capsys.readouterr().out  # (5 - 1) * 2 + (3 - 1) + 1 + 1 = 12
    assert "output           [1, 2, 12, 12]" in out and "output_padding (1, 1)" in out
    assert main(["explain", "conv_transpose2d", "1x4x5x5", "4x2x3x3", "--output-padding", "1"]) == 2
    assert "output padding must be smaller than either stride or dilation" in capsys.readouterr().err


def _tiny_bench_shape():
    from cnnfast import benchmark
    return benchmark._s("tiny", (1, 4, 6, 6), (8, 4, 3, 3), padding=1)


def test_bench_rows_of_a_wrong_result_and_of_a_refused_call_are_not_timed(monkeypatch):
    """A provider whose result differs from the reference is FAIL (the error in its note) and one that raises a
    ValueError other than 'cannot run this problem' is ERROR, neither timed; an algorithm that cannot run the problem
    (depthwise here) has no row, one that needs more workspace than the limit an n/a row (not a failure: the
    anchor set's run had ended with exit status 1 for C3D's im2col); the others are validated and timed as usual."""
    from cnnfast import benchmark
    real = benchmark.cnnfast_call

    def call(shape, primitive, arrays, algo):
        fn = real(shape, primitive, arrays, algo)
        if algo == "direct":
            return lambda: fn() + 1.0
        if algo == "im2col":
            def refuse():
                raise ValueError("conv2d: a stand-in refusal")
            return refuse
        if algo == "winograd":  # (C3D's im2col at batch 8 on the GPU: 346,816,512 bytes)
            raise ValueError("conv2d: algo='winograd' needs at least 999 bytes of workspace, more than "
                             "workspace_limit=99 (the default); raise the limit or use algo='direct'")
        return fn
    monkeypatch.setattr(benchmark, "cnnfast_call", call)
    rows = benchmark.run([_tiny_bench_shape()], "cpu", ["forward"], ["direct", "im2col", "depthwise", "winograd"],
                         "float32", 1)
    by = {r["provider"]: r for r in rows}
    assert "cnnfast:depthwise" not in by
    assert by["cnnfast:winograd"]["status"] == "n/a" and "needs at least 999 bytes" in by["cnnfast:winograd"]["note"]
    assert by["cnnfast:direct"]["status"] == "FAIL" and "seconds" not in by["cnnfast:direct"]
    assert re.match(r"tiny forward: relative error \S+ > 0\.0001 \(float32\)", by["cnnfast:direct"]["note"])
    assert by["cnnfast:im2col"]["status"] == "ERROR" and by["cnnfast:im2col"]["note"] == "conv2d: a stand-in refusal"
    assert "seconds" not in by["cnnfast:im2col"]
    auto = by["cnnfast:auto"]
    assert auto["status"] == "ok" and auto["error"] < 1e-4 and auto["seconds"] > 0
    lines = benchmark.table(rows).splitlines()
    assert any(line.startswith("tiny") and "cnnfast:direct" in line and "FAIL: tiny forward: relative error" in line
               for line in lines)


def test_bench_times_the_providers_in_an_order_turned_each_round():
    """Round-robin with the order turned by one each round: no provider always follows the same one (what the
    last call left in the caches), and each gets its own median."""
    from cnnfast import benchmark
    order = []
    calls = [(lambda k=k: order.append(k), lambda fn, k=k: fn() or float(k)) for k in range(3)]
    assert benchmark.time_interleaved(calls, repeats=3, warmup=0) == [0.0, 1.0, 2.0]
    assert order == [0, 1, 2, 1, 2, 0, 2, 0, 1]


def test_bench_torch_rows_name_torchs_kernel(tmp_path):
    """Each torch row says which of torch's kernel families ran it where torch says (on CUDA, float32 NCHW depthwise
    layers run ATen's own kernel, not cuDNN: the rows are not cuDNN's there); the table shows it. Its result's error
    against the reference is recorded too (a TF32 row's is ~1e-3: strict fp32 shows in it)."""
    pytest.importorskip("torch")
    from cnnfast import benchmark
    rows = benchmark.run([_tiny_bench_shape()], "cpu", ["forward"], ["direct"], "float32", 1)
    torch_row = next(r for r in rows if r["provider"] == "torch")
    assert isinstance(torch_row.get("backend"), str) and torch_row["backend"]
    assert 0 <= torch_row["error"] < 1e-5  # its result against the reference, recorded (strict fp32 shows there)
    assert f"ok ({torch_row['backend']})" in benchmark.table_line(torch_row, False)


def test_bench_a_timing_error_is_the_error_of_each_timed_row(monkeypatch):
    from cnnfast import benchmark

    def broken(calls, repeats, warmup=2):
        raise RuntimeError("event record failed (a stand-in)")
    monkeypatch.setattr(benchmark, "time_interleaved", broken)
    rows = benchmark.run([_tiny_bench_shape()], "cpu", ["forward"], ["direct"], "float32", 1)
    timed = [r for r in rows if r["provider"] != "reference"]  # (the reference is timed apart, by time_cpu)
    assert {r["provider"] for r in timed} >= {"cnnfast:auto", "cnnfast:direct"}
    for r in timed:
        assert r["status"] == "ERROR" and r["note"] == "timing: RuntimeError: event record failed (a stand-in)"
        assert "seconds" not in r


@pytest.mark.torch
@pytest.mark.parametrize("name", [s.name for s in SHAPE_SETS["quick"]])
def test_bench_torch_baseline_computes_the_same_problem(name):
    """'vs torch' compares like with like: torch's call for each primitive (F.conv*/conv_transpose*, aten's
    convolution_backward) gives the float64 reference's result for the quick set (transposed shape included)."""
    pytest.importorskip("torch")
    from cnnfast import benchmark, compare
    shape = next(s for s in benchmark.SHAPE_SETS["quick"] if s.name == name)
    spec = benchmark.spec_of(shape, "float64")
    host = benchmark.inputs(shape, spec, "float64")
    for primitive in benchmark.PRIMITIVES:
        out = benchmark.torch_call(shape, primitive, dict(host, spec=spec), "cpu")()
        if primitive != "forward":  # (grad_input, grad_weight, grad_bias)
            out = out[0 if primitive == "backward_data" else 1]
        compare.assert_close(out.numpy(), benchmark.reference_result(shape, primitive, host), "float64",
                             f"torch {name} {primitive}")


def test_bench_torch_baseline_is_skipped_for_asymmetric_padding():
    pytest.importorskip("torch")
    from cnnfast import benchmark
    shape = benchmark._s("asym", (1, 2, 7, 7), (3, 2, 3, 3), padding=((1, 0), 1))
    spec = benchmark.spec_of(shape, "float32")
    assert benchmark.torch_call(shape, "forward", dict(benchmark.inputs(shape, spec, "float32"), spec=spec),
                                "cpu") is None


@pytest.mark.cuda
def test_bench_tiles_times_each_tile_configuration_of_the_cuda_gemms(monkeypatch):
    """--tiles: each CUDA GEMM algorithm once per tile of the dtype (float64: 32x64, and direct's 8x64), each validated
    against the reference before it is timed; depthwise cannot run the layer (no row)."""
    from cnnfast import benchmark
    monkeypatch.setattr(benchmark, "BURST_CALLS", 2)  # (simulated calls back to back: as in the test above)
    shape = benchmark._s("tiny", (1, 2, 5, 5), (3, 2, 3, 3), padding=1)
    rows = benchmark.run([shape], "cuda", ["forward"], ["direct", "im2col", "depthwise"], "float64", 1, tiles=True)
    ours = [r for r in rows if r["provider"].startswith("cnnfast:")]
    assert {r["provider"] for r in ours} == {"cnnfast:auto", "cnnfast:direct:32x64", "cnnfast:direct:8x64",
                                             "cnnfast:im2col:32x64"}
    assert all(r["status"] == "ok" and r["error"] < 1e-10 and "seconds" in r for r in ours)  # (simulated: no times)
