"""One writer per run folder: a second training on the same output_dir is refused naming the
holder's PID, a lock left by a killed run is taken over, and the lock file goes when the run ends."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paddle_ema import checkpoint
from paddle_ema.engine.run_folder import LOCK_NAME, OutputError, RunLock

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": ""}


def command(config, *args):
    return [sys.executable, str(REPO / "tools" / "train.py"), "-c", str(config), *args]


def tiny(folder, extra=""):
    path = folder / "tiny.yml"
    path.write_text(f"_BASE_: [{REPO / 'configs' / 'lenet_digits.yml'}]\noutput_dir: {folder / 'output'}\n"
                    "epoch: 3\nlog_iter: 1000\nLeNet: {width: 4, hidden: 16}\nTrainReader: {batch_size: 128}\n" + extra)
    return path


def test_the_lock_in_one_process(tmp_path):
    with RunLock(str(tmp_path)) as lock:
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(OutputError, match=rf"is in use by another training run \(PID {os.getpid()} holds "):
            RunLock(str(tmp_path)).acquire()  # flock: a second open file description conflicts, even here
        assert lock.fd is not None
    assert not (tmp_path / LOCK_NAME).exists()
    RunLock(str(tmp_path)).acquire().release()  # free again


@pytest.mark.timeout(240)
def test_a_second_run_on_the_same_folder_is_refused_and_the_first_finishes_intact(tmp_path):
    config = tiny(tmp_path)
    run_dir = tmp_path / "output" / "tiny"
    # each checkpoint file takes 1.5 s more: a window of about half a minute, long enough for two
    # more processes to start on a loaded machine
    slow = {**ENV, "PADDLE_EMA_FAULT_SAVE_DELAY": "1.5"}
    first = subprocess.Popen(command(config, "--eval"), env=slow, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / LOCK_NAME).exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the second started"
    time.sleep(0.5)  # the lock file exists: give the holder the moment to lock it and write its PID
    second = subprocess.run(command(config, "--eval"), env=ENV, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"error: output_dir: {run_dir} is in use by another training run (PID {first.pid} holds {run_dir / LOCK_NAME}); "
        "wait for it to end, or choose another output_dir"]
    auto = subprocess.run(command(config, "-r", "auto"), env=ENV, capture_output=True, text=True, timeout=120)
    assert auto.returncode == 2 and f"PID {first.pid}" in auto.stderr  # -r auto respects the lock too
    assert first.poll() is None, "the first run ended before the others were refused: the window was too short"
    out, err = first.communicate(timeout=180)
    assert first.returncode == 0, err[-2000:]
    stems = {os.path.basename(s) for s in checkpoint.complete_checkpoints(str(run_dir))}
    assert stems == {"0", "1", "best_model", "model_final"}
    assert not (run_dir / LOCK_NAME).exists() and not list(run_dir.glob(".*.tmp-*"))


@pytest.mark.timeout(240)
def test_a_lock_and_temporary_files_left_by_a_killed_run_are_taken_over(tmp_path):
    config = tiny(tmp_path)
    run_dir = tmp_path / "output" / "tiny"
    slow = {**ENV, "PADDLE_EMA_FAULT_SAVE_DELAY": "1"}
    killed = subprocess.Popen(command(config), env=slow, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(run_dir.glob(".0.pd*.tmp-*")) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert (run_dir / LOCK_NAME).read_text().strip() == str(killed.pid)  # the stale lock names the dead run
    leftovers = [p.name for p in run_dir.glob(".*.tmp-*")]
    assert leftovers and all(re.search(rf"\.tmp-{killed.pid}-\w+$", n) for n in leftovers)
    result = subprocess.run(command(config, "-r", "auto"), env=ENV, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "-r auto: no complete checkpoint" in result.stdout  # killed inside epoch 0's first write
    assert not (run_dir / LOCK_NAME).exists() and not list(run_dir.glob(".*.tmp-*"))
    assert {os.path.basename(s) for s in checkpoint.complete_checkpoints(str(run_dir))} == {"0", "1", "model_final"}


@pytest.mark.timeout(240)
def test_sigterm_ends_a_run_like_sigint_in_one_line_leaving_no_temporary_file(tmp_path):
    config = tiny(tmp_path)
    run_dir = tmp_path / "output" / "tiny"
    slow = {**ENV, "PADDLE_EMA_FAULT_SAVE_DELAY": "1"}
    for sig, status, line in ((signal.SIGTERM, 143, "terminated (SIGTERM)"), (signal.SIGINT, 130, "interrupted")):
        run = subprocess.Popen(command(config, "--eval", "-r", "auto"), env=slow, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not list(run_dir.glob(".*.pd*.tmp-*")) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert run.poll() is None, "the run ended before a checkpoint was half written"
        run.send_signal(sig)
        out, err = run.communicate(timeout=120)
        assert run.returncode == status, err[-3000:]
        lines = err.strip().splitlines()
        assert lines[-1] == line and "Traceback" not in err and "FatalError" not in err, err[-3000:]
        assert all(re.match(r"epoch \d+/\d+ iter ", x) for x in lines[:-1]), err[-3000:]
        assert not list(run_dir.glob(".*.tmp-*")) and not (run_dir / LOCK_NAME).exists()
        for stem in checkpoint.complete_checkpoints(str(run_dir)):
            checkpoint.verify(stem)  # what was committed before the signal stays whole
