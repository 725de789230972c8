"""README's Python examples run as written (with a tiny data loader and evaluate())."""

import re
from pathlib import Path

import numpy as np
import paddle

from paddle_ema import SCHEDULES

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    loader = [
        (
            paddle.to_tensor(rng.standard_normal((4, 1, 28, 28)).astype("float32")),
            paddle.to_tensor(rng.integers(0, 10, (4, 1)).astype("int64")),
        )
        for _ in range(3)
    ]
    evaluated = []
    namespace = {"loader": loader, "evaluate": lambda model: evaluated.append(model.training)}
    blocks = python_blocks()
    assert len(blocks) >= 2
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README is ours
    finally:
        SCHEDULES.pop("step_down", None)
    ema = namespace["ema"]
    assert ema.num_updates == 0 and evaluated == [True, True]  # the last block built a fresh EMA
    assert (tmp_path / "model_ema.pdparams").exists() and (tmp_path / "ema.pdstate").exists()
