"""The `cnnfast` command line: info, explain (with the LeNet figures), validate, and its errors."""
import os
import subprocess
import sys

import pytest

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


def test_console_script_is_installed():
    """The `cnnfast` entry point from setup.cfg, next to this interpreter, in a fresh process."""
    script = os.path.join(os.path.dirname(sys.executable), "cnnfast")
    done = subprocess.run([script, "explain", "conv1d", "2x4x100", "8x4x3", "--padding", "same"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "output           [2, 8, 100]" in done.stdout


@pytest.mark.parametrize("bad", [["explain", "conv2d", "1x3xfoo", "6x3x5x5"], ["frobnicate"]])
def test_bad_command_lines_exit_with_usage(bad):
    with pytest.raises(SystemExit) as info:
        main(bad)
    assert info.value.code == 2
