"""Bad input to the tools: exit status 2, one line on stderr naming the problem, no traceback."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(name, *args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": ""}, capture_output=True, text=True, timeout=timeout)


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


def one_error_line(result):
    """The single `error: ...` line of a tool that stopped on bad input (exit 2, no traceback)."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def in_process(main, *args, capsys):
    """A tool's main run in this process (fast: no Paddle import per call) with the exit status and
    its one error line, checked like one_error_line."""
    status = main(list(args))
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_unknown_config_name_suggests_the_closest_and_lists_the_packaged_ones(capsys):
    from paddle_ema.engine.cli import eval_main, train_main

    shipped = ", ".join(sorted(name[:-4] for name in os.listdir(os.path.join(REPO, "configs"))
                               if name.endswith(".yml")))
    line = one_error_line(run_tool("train.py", "-c", "lenet_digit"))
    assert line == ("error: -c lenet_digit: no such file, and no packaged config of that name; did you mean "
                    f"lenet_digits? packaged configs: {shipped} (or give the path of a YAML config)")
    line = in_process(train_main, "-c", "configs/lenet_digit.yml", capsys=capsys)
    assert line.startswith("error: -c configs/lenet_digit.yml: no such file, and no packaged config of that name; "
                           "did you mean lenet_digits? packaged configs: ")
    line = in_process(eval_main, "-c", "zzzz", capsys=capsys)
    assert line == f"error: -c zzzz: no such file, and no packaged config of that name; packaged configs: {shipped} " \
                   "(or give the path of a YAML config)"  # nothing close: no guess


def test_eval_and_export_before_training_say_to_train_first(tmp_path, capsys):
    from paddle_ema.engine.cli import export_main

    weights = tmp_path / "lenet_digits" / "model_final.pdparams"
    line = one_error_line(run_tool("eval.py", "-c", "configs/lenet_digits.yml", "-o", f"output_dir={tmp_path}"))
    assert line == (f"error: {weights} does not exist: train first (python {os.path.join(REPO, 'tools', 'train.py')} "
                    f"-c configs/lenet_digits.yml -o output_dir={tmp_path}), or point -o weights=PATH at a .pdparams "
                    "file")
    config = os.path.join(REPO, "configs", "lenet_digits.yml")
    line = in_process(export_main, "-c", config, "-o", f"output_dir={tmp_path}", "--output_dir",
                      str(tmp_path / "inference"), capsys=capsys)
    assert line == (f"error: {weights} does not exist: train first (python tools/train.py -c {config} -o "
                    f"output_dir={tmp_path}), or point -o weights=PATH at a .pdparams file")
    assert not os.listdir(tmp_path)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """Two epochs of the default config with ema_decay 0.9, in a folder of their own."""
    out = tmp_path_factory.mktemp("short")
    # The first run that trains may build the fused kernel (minutes on a busy machine).
    result = run_tool("train.py", "-c", "configs/lenet_digits.yml", "-o", "epoch=2", "ema_decay=0.9",
                      f"output_dir={out}", timeout=900)
    assert result.returncode == 0, result.stderr
    return out


def test_resume_from_a_file_or_folder_that_is_no_checkpoint(short_run, capsys):
    from paddle_ema.engine.cli import train_main

    run = short_run / "lenet_digits"
    options = ["-c", os.path.join(REPO, "configs", "lenet_digits.yml"), "-o", "epoch=2", "ema_decay=0.9",
               f"output_dir={short_run}"]
    expected = ("error: -r {given}: {given} is {kind}, not a checkpoint: give a checkpoint's path without suffix, "
                f"like {run / 'model_final'}, or -r auto for this run's newest; complete checkpoints in {run}: 0, "
                "model_final")
    line = one_error_line(run_tool("train.py", *options, "-r", "README.md"))
    assert line == expected.format(given="README.md", kind="a file")
    for folder in (run, short_run):
        line = in_process(train_main, *options, "-r", str(folder), capsys=capsys)
        assert line == expected.format(given=folder, kind="a folder")


def test_resume_with_other_ema_settings_names_the_override_that_resumes(short_run):
    stem = short_run / "lenet_digits" / "0"
    common = ["-c", "configs/lenet_digits.yml", "-o", "epoch=2", f"output_dir={short_run}", "-r", str(stem)]
    line = one_error_line(run_tool("train.py", *common))
    assert line == (f"error: -r {stem}: the EMA state does not fit this EMA: setting schedule.decay: 0.9 in the "
                    "state, 0.99 here; the checkpoint was trained with ema_decay: 0.9 (0.99 here): resume it with "
                    "-o ema_decay=0.9, or train the new settings into another output_dir (-o output_dir=...)")
    resumed = run_tool("train.py", *common[:3], "ema_decay=0.9", *common[3:])  # what the line says to do
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {stem}: epoch 1, step 85" in resumed.stdout


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
