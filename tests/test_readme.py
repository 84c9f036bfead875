"""The README's NumPy-only training example runs as written and learns (its loss falls far below chance)."""
import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_numpy_training_example(capsys):
    text = README.read_text()
    section = text[text.index("## Training a CNN with NumPy only"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md (NumPy training example)", "exec"), scope)
    losses = scope["losses"]
    assert len(losses) == 150 and abs(losses[0] - np.log(2)) < 0.1
    assert np.mean(losses[-10:]) < 0.1 * np.log(2)
    assert "loss" in capsys.readouterr().out
