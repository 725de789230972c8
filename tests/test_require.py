"""Importing paddle_ema without PaddlePaddle says how to install it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_with(paddle_stub):
    code = f"import sys; {paddle_stub}; import paddle_ema"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_missing_paddle_names_both_builds():
    result = _import_with("sys.modules['paddle'] = None")  # makes `import paddle` raise ImportError
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: paddle_ema needs PaddlePaddle, which is not installed")
    assert "paddle_ema[cpu]" in last and "paddlepaddle-gpu" in last
