"""paddle_ema's own commands: which processes count as one (they alone hide Paddle's import notices)."""

import sys
from pathlib import Path

import pytest

from paddle_ema import _require

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, module", [
    (["python", "-m", "paddle_ema.kernels", "--rebuild"], "paddle_ema.kernels"),
    (["python", "-X", "importtime", "-W", "error", "-mpaddle_ema.kernels"], "paddle_ema.kernels"),
    (["python", "-I", "-m", "pytest", "-m", "paddle_ema.kernels"], "pytest"),
    (["python", "-c", "import x", "-m", "paddle_ema.kernels"], None),
    (["python", "script.py", "-m", "paddle_ema.kernels"], None),
    (["python", "-m"], None),
])
def test_module_of_a_python_m_command_line(argv, module):
    assert _require._module_run_by_python_m(argv) == module


@pytest.mark.parametrize("argv0, orig_argv, ours", [
    ("/venv/bin/paddle-ema-train", ["/venv/bin/python", "/venv/bin/paddle-ema-train"], True),
    (str(ROOT / "tools" / "train.py"), ["python", "tools/train.py"], True),
    ("-m", ["python", "-m", "paddle_ema.kernels"], True),
    ("-m", ["python", "-m", "my_package.tool"], False),  # a user's module that imports paddle_ema
    ("/home/me/train.py", ["python", "/home/me/train.py"], False),
    (str(ROOT / "tests" / "train.py"), [], False),
    ("-c", ["python", "-c", "import paddle_ema"], False),
    ("", [], False),
])
def test_own_command(monkeypatch, argv0, orig_argv, ours):
    monkeypatch.setattr(sys, "argv", [argv0])
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    assert _require.own_command() is ours
