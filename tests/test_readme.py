"""The README's examples run as written: the NumPy usage block, the PyTorch adapter block (their results checked
against the reference and torch), and the NumPy-only training example, which learns (its loss falls far below
chance)."""
import pathlib
import re

import numpy as np
import pytest

from cnnfast import compare, reference

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _block(heading, index=0):
    """The index-th ```python block of the README's section under heading, run in a fresh scope."""
    text = README.read_text()
    section = text[text.index(heading):]
    section = section[:section.find("\n## ", 1)]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[index]
    scope = {}
    exec(compile(code, f"README.md ({heading.strip('# ')} example)", "exec"), scope)
    return scope


def test_usage_example(capsys):
    s = _block("## Usage")
    assert s["y"].shape == (8, 16, 16, 16) and s["y"].dtype == np.float32
    x, w, y = s["x"], s["w"], s["y"]
    same = ((0, 1), (0, 1))  # 'same' at stride 2 (TensorFlow's rule): 32 -> 16 outputs, (16 - 1)*2 + 3 - 32 = 1 pad
    compare.assert_close(y, reference.conv(x, w, stride=2, padding=same), np.float32, "usage y")
    compare.assert_close(s["dx"], reference.conv_input(x.shape, w, y, stride=2, padding=same), np.float32, "usage dx")
    assert "algorithm" in capsys.readouterr().out


def test_torch_adapter_example():
    torch = pytest.importorskip("torch")
    s = _block("## PyTorch adapter")
    F = torch.nn.functional
    assert torch.allclose(s["y"], F.conv2d(s["x"], s["w"], s["b"], stride=2, padding=1), rtol=1e-4, atol=1e-4)
    assert type(s["model"][0]).__module__ == "cnnfast.torch"
    per_sample = s["per_sample"]
    for name, p in s["model"].named_parameters():
        assert per_sample[name].shape == (8, *p.shape)
    first = torch.func.grad(s["loss"])(s["params"], s["x"][0], s["targets"][0])  # one sample's, on its own
    assert all(torch.allclose(per_sample[k][0], first[k], rtol=1e-4, atol=1e-5) for k in first)


def test_numpy_training_example(capsys):
    scope = _block("## Training a CNN with NumPy only")
    losses = scope["losses"]
    assert len(losses) == 150 and abs(losses[0] - np.log(2)) < 0.1
    assert np.mean(losses[-10:]) < 0.1 * np.log(2)
    assert "loss" in capsys.readouterr().out
