"""Bad input to the tools: exit status 2, one line on stderr naming the problem, no traceback."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(name, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": ""}, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "body, overrides, message",
    [
        ("ema_decya: 0.9\n", [], r"bad\.yml: unknown key 'ema_decya'; did you mean 'ema_decay'\?"),
        ("ema_decay: 1.5\n", [], r"bad\.yml: ema_decay: 1\.5 is not allowed; expected a number in \[0, 1\]"),
        ("", ["ema_decay_type=expo"], r"-o: ema_decay_type: 'expo' is not allowed; expected one of constant, "
                                      r"exponential, normal, power, power_function, threshold"),
        ("dataset: ImageFolder\nImageFolder: {train_root: /no/such/folder}\n", [],
         r"ImageFolder\.train_root: '/no/such/folder' does not exist"),
        ("mode: static\nema_start_step: 3\n", [], r"ema_start_step: 3 is not available with mode: static; "
                                                  r"use ema_start_step: 0, or mode: dygraph"),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path, body, overrides, message):
    import re

    config = tmp_path / "bad.yml"
    config.write_text(f"_BASE_: [{os.path.join(REPO, 'configs', 'lenet_digits.yml')}]\n"
                      f"output_dir: {tmp_path}\nepoch: 1\n" + body)
    result = run_tool("train.py", "-c", str(config), *(["-o", *overrides] if overrides else []))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "bad")


def test_base_cycle_and_missing_weights(tmp_path):
    (tmp_path / "a.yml").write_text("_BASE_: [b.yml]\n")
    (tmp_path / "b.yml").write_text("_BASE_: [a.yml]\n")
    result = run_tool("eval.py", "-c", str(tmp_path / "a.yml"))
    assert result.returncode == 2 and "_BASE_ cycle:" in result.stderr and "Traceback" not in result.stderr
    result = run_tool("eval.py", "-c", os.path.join(REPO, "configs", "lenet_digits.yml"),
                      "-o", f"weights={tmp_path / 'nope.pdparams'}")
    assert result.returncode == 2 and f"weights: {tmp_path / 'nope.pdparams'} does not exist" in result.stderr


@pytest.mark.parametrize(
    "variable, value, allowed",
    [
        ("PADDLE_EMA_NUM_THREADS", "2147483648", "a whole number from 1 to 1024"),
        ("PADDLE_EMA_NUM_THREADS", "abc", "a whole number from 1 to 1024"),
        ("PADDLE_EMA_NUM_THREADS", "0", "a whole number from 1 to 1024"),
        ("PADDLE_EMA_NUM_THREADS", "\u0664", "a whole number from 1 to 1024"),  # an Arabic-Indic 4: int() takes it
        ("PADDLE_EMA_FAULT_SAVE_DELAY", "abc", "seconds, a number from 0 to 3600"),
        ("PADDLE_EMA_FAULT_SAVE_DELAY", "nan", "seconds, a number from 0 to 3600"),
        ("PADDLE_EMA_FAULT_SAVE_DELAY", "-1", "seconds, a number from 0 to 3600"),
        ("PADDLE_EMA_KERNEL", "xyz", "auto, fused or reference"),
        ("PADDLE_EMA_REBUILD", "maybe", "0 or 1"),
        ("PADDLE_EMA_CACHE_DIR", __file__, "a folder (or a path where one can be made)"),
    ],
)
def test_a_bad_environment_variable_is_one_line_naming_it(monkeypatch, capsys, variable, value, allowed):
    from paddle_ema.engine.cli import eval_main

    monkeypatch.setenv(variable, value)
    assert eval_main(["-c", os.path.join(REPO, "configs", "lenet_digits.yml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: ${variable} must be {allowed}, got ") and err.count("\n") == 1, err


def test_a_huge_thread_count_is_one_line_not_a_traceback_of_every_tensor(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "train.py"), "-c",
                             os.path.join(REPO, "configs", "lenet_digits.yml"), "-o", f"output_dir={tmp_path}"],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": "", "PADDLE_EMA_NUM_THREADS": "2147483648"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: $PADDLE_EMA_NUM_THREADS must be a whole number from 1 to 1024, got '2147483648'"]
    assert not os.listdir(tmp_path)  # refused before anything is built or written


def test_the_library_refuses_a_huge_thread_count_too(monkeypatch):
    from paddle_ema.errors import ConfigError
    from paddle_ema.kernels import fused

    monkeypatch.setenv("PADDLE_EMA_NUM_THREADS", "2147483648")
    with pytest.raises(ConfigError, match=r"PADDLE_EMA_NUM_THREADS must be a whole number from 1 to 1024"):
        fused.num_threads()
