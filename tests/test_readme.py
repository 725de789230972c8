"""README's Python examples run as written, each in a fresh process.

A short prelude stands in for what the prose around a snippet assumes: a LeNet `model`, a few
random batches as `loader`, an `evaluate(model)`, digits datasets for the `paddle.Model` example,
and a state dict and step for `ModelEMA.resume`.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

PRELUDE = textwrap.dedent(
    """
    import numpy as np
    import paddle
    from paddle_ema import ExponentialMovingAverage
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(0)
    model = paddle.vision.models.LeNet()
    loader = [(paddle.to_tensor(rng.standard_normal((4, 1, 28, 28)).astype("float32")),
               paddle.to_tensor(rng.integers(0, 10, (4, 1)).astype("int64"))) for _ in range(3)]
    ema = ExponentialMovingAverage(model)

    def evaluate(model):
        return None

    class _Digits(paddle.io.Dataset):
        def __init__(self, part):
            d = load_digits()
            x = np.zeros((len(d.target), 1, 28, 28), "float32")
            x[:, 0, 10:18, 10:18] = d.images / 16.0
            self.x, self.y = x[part], d.target.astype("int64").reshape(-1, 1)[part]
        def __getitem__(self, i):
            return self.x[i], self.y[i]
        def __len__(self):
            return len(self.y)

    train_data, eval_data = _Digits(slice(0, 256)), _Digits(slice(256, 384))
    optimizer = paddle.optimizer.Adam(learning_rate=1e-3, parameters=model.parameters())
    state_dict, step = model.state_dict(), 3
    """
)


def python_blocks():
    text = README.read_text(encoding="utf-8")
    return [textwrap.dedent(block) for block in re.findall(r"```python\n(.*?)```", text, flags=re.S)]


def test_readme_has_the_examples():
    blocks = python_blocks()
    assert len(blocks) >= 7
    assert any("ema.apply(need_restore=False)" in b for b in blocks)
    assert any("paddle_ema.static import ExponentialMovingAverage, clone_for_test" in b for b in blocks)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs(index, tmp_path):
    block = python_blocks()[index]
    script = tmp_path / "example.py"
    script.write_text(PRELUDE + "\n" + block)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, f"README example {index}:\n{block}\n{result.stderr[-3000:]}"
