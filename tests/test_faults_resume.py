"""`-r auto` after kill -9 at random moments, including while best_model is written: a preemptible
job restarted with the same command ends with final weights, best_model and the recorded `best`
bitwise equal to an uninterrupted run's. Also: `-r ''` is refused, `-r auto` starts fresh in an
empty folder, and the complete checkpoints are listed in step order."""

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_ema import checkpoint
from paddle_ema.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": ""}
EPOCHS = 6


def tiny(folder, output):
    path = folder / "tiny.yml"
    path.write_text(f"_BASE_: [{REPO / 'configs' / 'lenet_digits.yml'}]\noutput_dir: {output}\n"
                    f"epoch: {EPOCHS}\nlog_iter: 1000\nLeNet: {{width: 4, hidden: 16}}\nTrainReader: {{batch_size: 64}}\n")
    return path


def command(config):
    return [sys.executable, str(REPO / "tools" / "train.py"), "-c", str(config), "--eval", "-r", "auto"]


def staged(run_dir, stem):
    return run_dir.is_dir() and any(re.fullmatch(rf"\.{stem}\.(pdparams|pdema|pdopt)\.tmp-\d+-\w+", p.name)
                                    for p in run_dir.iterdir())


def newest(run_dir):
    stems = checkpoint.complete_checkpoints(str(run_dir), ".pdopt")
    return stems[-1] if stems else None


def tensors(path):
    return {k: v.numpy() for k, v in paddle.load(str(path)).items()}


@pytest.mark.timeout(420)
def test_r_auto_after_kill_9_at_random_moments_and_during_the_best_model_write_is_exact(tmp_path):
    reference = tmp_path / "reference"
    done = subprocess.run(command(tiny(tmp_path, reference)), env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "-r auto: no complete checkpoint" in done.stdout  # an empty folder: a fresh start

    crashed = tmp_path / "crashed"
    config = tiny(tmp_path, crashed)
    run_dir = crashed / "tiny"
    slow = {**ENV, "PADDLE_EMA_FAULT_SAVE_DELAY": "0.15"}  # widens the writes, so random kills land in them too
    rng = random.Random(int(os.environ.get("PADDLE_EMA_CRASH_SEED", "13")))
    kills = []
    for how in ("best_model", "checkpoint", "random", "random", "random"):
        before = newest(run_dir)
        process = subprocess.Popen(command(config), env=slow, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        if how in ("best_model", "checkpoint"):
            stem = "best_model" if how == "best_model" else r"\d+"
            while not staged(run_dir, stem) and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            assert process.poll() is None and staged(run_dir, stem), f"no {how} write was caught in progress"
        else:
            while newest(run_dir) == before and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.5))
        if process.poll() is not None:  # finished before the random moment came: nothing left to kill
            break
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        kills.append(how)
    assert kills[:2] == ["best_model", "checkpoint"]
    print(f"kills: {kills}")  # for the attack table (pytest -s)

    finished = subprocess.run(command(config), env=ENV, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-2000:]
    for name in ("model_final.pdparams", "model_final.pdema", "best_model.pdparams", "best_model.pdema"):
        want, got = tensors(reference / "tiny" / name), tensors(run_dir / name)
        assert want.keys() == got.keys()
        for key in want:
            assert np.array_equal(got[key], want[key]), (name, key)
    want, got = paddle.load(str(reference / "tiny" / "model_final.pdopt")), paddle.load(str(run_dir / "model_final.pdopt"))
    assert got["best"] == want["best"] and got["history"] == want["history"]
    assert checkpoint.checkpoint_info(str(run_dir / "best_model")) == checkpoint.checkpoint_info(
        str(reference / "tiny" / "best_model"))
    assert not list(run_dir.glob(".*"))  # no lock, journal or temporary file of a killed writer is left
    order = [os.path.basename(s) for s in checkpoint.complete_checkpoints(str(run_dir), ".pdopt")]
    assert order == [*map(str, range(EPOCHS - 1)), "model_final"]  # step order, best_model (no .pdopt) apart


def test_empty_resume_path_is_refused_before_anything(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), "-c", str(tiny(tmp_path, tmp_path / "o")),
                             "-r", ""], env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and not (tmp_path / "o").exists()
    assert result.stderr.strip().splitlines() == [
        "error: -r: an empty checkpoint path; give a checkpoint (path without suffix), or -r auto for the newest "
        "complete checkpoint of this run (./auto for a checkpoint named auto)"]


def test_complete_checkpoints_are_listed_in_step_order_in_messages(tmp_path):
    for stem, step in (("10", 110), ("2", 30), ("model_final", 120), ("best_model", 30)):
        files = {".pdparams": {"w": paddle.ones([1])}}
        if stem != "best_model":
            files[".pdopt"] = {"global_step": step}
        checkpoint.save_checkpoint(str(tmp_path / stem), files, info={"global_step": step})
    os.utime(tmp_path / "2.manifest.json", (1e9, 2e9))  # mtime order would differ: the step decides
    with pytest.raises(CheckpointError, match=r"complete checkpoints there: 2, 10, model_final, best_model$"):
        checkpoint.verify(str(tmp_path / "3"))
