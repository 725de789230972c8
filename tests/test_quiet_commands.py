"""paddle_ema's own commands: which processes count as one (they alone hide Paddle's import notices),
and the fused kernel's first build, which says it is still compiling and for how long."""

import io
import subprocess
import sys
from pathlib import Path

import pytest

from paddle_ema import _require
from paddle_ema.kernels import build

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


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_in_a_log_is_a_line_every_ten_seconds():
    stream = _Stream(tty=False)
    progress = build._BuildProgress(stream)
    for elapsed in (1.0, 9.9, 10.0, 11.0, 19.5, 20.2, 33.0):
        progress.tick(elapsed)
    progress.done(34.4, ok=True)
    assert stream.getvalue().splitlines() == [
        f"paddle_ema: still compiling, 10 s ({build.USUAL_BUILD_TIME})",
        f"paddle_ema: still compiling, 20 s ({build.USUAL_BUILD_TIME})",
        f"paddle_ema: still compiling, 33 s ({build.USUAL_BUILD_TIME})",
        "paddle_ema: compiled in 34 s",
    ]


def test_progress_on_a_terminal_rewrites_one_line():
    stream = _Stream(tty=True)
    progress = build._BuildProgress(stream)
    for elapsed in (0.5, 1.0, 2.0, 2.5, 9.0, 10.0):
        progress.tick(elapsed)
    progress.done(10.6, ok=False)
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    frames = text[:-1].split("\r")[1:]
    shown = [f"paddle_ema: still compiling, {s} s ({build.USUAL_BUILD_TIME})" for s in (1, 2, 9, 10)]
    assert frames[:4] == shown
    # the last frame covers the longer one before it, so nothing of it is left on the line
    assert frames[4] == "paddle_ema: compiling failed after 11 s".ljust(len(shown[-1]))


def test_wait_reports_while_a_process_runs(monkeypatch):
    monkeypatch.setattr(build, "PROGRESS_EVERY_S", 0.2)
    stream = _Stream(tty=False)
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.2)"])
    status = build._wait(process, build._BuildProgress(stream), timeout=60, poll_s=0.1)
    lines = stream.getvalue().splitlines()
    assert status == 0 and lines[-1].startswith("paddle_ema: compiled in ")
    assert len(lines) >= 4 and all(line.startswith("paddle_ema: still compiling, ") for line in lines[:-1])


def test_wait_kills_a_build_past_its_timeout():
    stream = _Stream(tty=False)
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with pytest.raises(build.BuildError, match=r"the compiler did not finish within 0\.5 s"):
        build._wait(process, build._BuildProgress(stream), timeout=0.5, poll_s=0.1)
    assert process.returncode is not None  # killed and reaped, not left running
    assert stream.getvalue().splitlines()[-1].startswith("paddle_ema: compiling failed after ")
