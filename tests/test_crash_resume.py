"""Exact resume after a hard kill: SIGKILL at random moments and during a checkpoint write.

The default training runs in a subprocess; it is killed several times (once while a checkpoint is
half written, found by polling for checkpoint files without their manifest; the other times at a
random moment after the run has made progress, i.e. committed a new checkpoint), resumed each time with -r from the last complete checkpoint, and finally allowed
to finish. Its final raw and EMA weights must be bitwise equal to an uninterrupted run's.
Determinism: CPU, fixed seed, the data order drawn from (seed, epoch), the RNG state in .pdopt.
"""

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

from paddle_ema.checkpoint import MANIFEST_SUFFIX, complete_checkpoints

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 8
OVERRIDES = [f"epoch={EPOCHS}", "snapshot_epoch=1"]


def _command(output_dir, resume=None):
    cmd = [sys.executable, str(REPO / "tools" / "train.py"), "-c", str(REPO / "configs" / "lenet_digits.yml"),
           "-o", *OVERRIDES, f"output_dir={output_dir}"]
    return cmd + (["-r", resume] if resume else [])


def _latest_complete(run_dir):
    epochs = [s for s in complete_checkpoints(str(run_dir)) if re.fullmatch(r"\d+", os.path.basename(s))]
    return max(epochs, key=lambda s: int(os.path.basename(s)), default=None)


def _half_written(run_dir):
    """A checkpoint write in progress: its files still under their temporary names
    (`.<stem><suffix>.tmp-<pid>-<random>`), not yet committed by a manifest."""
    if not run_dir.is_dir():
        return False
    return any(re.fullmatch(r"\.\w+\.(pdparams|pdema|pdopt)\.tmp-\d+-\w+", p.name) for p in run_dir.iterdir())


def _weights(path):
    return {k: v.numpy() for k, v in paddle.load(str(path)).items()}


@pytest.mark.timeout(300)
def test_kill_9_and_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": ""}
    reference = tmp_path / "reference"
    subprocess.run(_command(reference), env=env, check=True, capture_output=True, timeout=240)

    crashed = tmp_path / "crashed"
    run_dir = crashed / "lenet_digits"
    rng = random.Random(7)
    kills = ["during-write", "random", "random"]
    for how in kills:
        resume = _latest_complete(run_dir)
        slow = {**env, "PADDLE_EMA_FAULT_SAVE_DELAY": "0.3"} if how == "during-write" else env
        process = subprocess.Popen(_command(crashed, resume), env=slow, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        if how == "during-write":
            while not _half_written(run_dir) and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _half_written(run_dir), "no checkpoint write was caught in progress"
        else:
            # A random moment once this run has made progress (a newer complete checkpoint).
            while _latest_complete(run_dir) == resume and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.25))
        assert process.poll() is None, "the run finished before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        assert process.returncode == -signal.SIGKILL
    assert _latest_complete(run_dir) is not None

    resume = _latest_complete(run_dir)
    finished = subprocess.run(_command(crashed, resume), env=env, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"resumed from {resume}" in finished.stdout

    for suffix in (".pdparams", ".pdema"):  # EMA weights and raw weights
        want = _weights(reference / "lenet_digits" / f"model_final{suffix}")
        got = _weights(run_dir / f"model_final{suffix}")
        assert want.keys() == got.keys()
        for name in want:
            assert np.array_equal(got[name], want[name]), (suffix, name)
    ema_want = paddle.load(str(reference / "lenet_digits" / "model_final.pdopt"))["ema"]["ema"]
    ema_got = paddle.load(str(run_dir / "model_final.pdopt"))["ema"]["ema"]
    assert ema_got["num_updates"] == ema_want["num_updates"] and ema_got["decay_product"] == ema_want["decay_product"]


def test_resume_from_a_half_written_checkpoint_is_refused_without_touching_files(tmp_path):
    run_dir = tmp_path / "lenet_digits"
    env = {**os.environ, "PYTHONPATH": ""}
    subprocess.run(_command(tmp_path) + ["-o", "epoch=2"], env=env, check=True, capture_output=True, timeout=240)
    (run_dir / f"0{MANIFEST_SUFFIX}").unlink()  # as if the run died before committing epoch 0
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    result = subprocess.run(_command(tmp_path, str(run_dir / "0")) + ["-o", "epoch=2"], env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert re.search(r"error: checkpoint .*/0 is incomplete \(the run stopped while writing it", lines[0])
    assert "complete checkpoints there: model_final" in lines[0]
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert after == before
