"""Checkpoint files: atomic writes, path resolution, weight loading errors."""

import os

import numpy as np
import paddle
import pytest

from paddle_ema.engine import run_checkpoints as checkpoint
from paddle_ema.errors import CheckpointError, IncompatibleStateError


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "model_final.pdparams"
    checkpoint.atomic_save({"w": paddle.ones([2])}, str(target))
    real_save = paddle.save

    def failing_save(obj, path):
        real_save(obj, path)  # the temporary file is complete ...
        raise OSError("disk full")  # ... but something fails before the rename

    monkeypatch.setattr(paddle, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_save({"w": paddle.zeros([2])}, str(target))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model_final.pdparams"]  # no temporary file left behind
    assert np.array_equal(paddle.load(str(target))["w"].numpy(), [1.0, 1.0])  # old content intact


def test_checkpoint_stem_and_weight_loading(tmp_path):
    assert checkpoint.checkpoint_stem("out/3.pdopt") == checkpoint.checkpoint_stem("out/3") == "out/3"
    model = paddle.nn.Linear(2, 3)
    checkpoint.save_checkpoint(str(tmp_path / "0"), model.state_dict(), {"weight": paddle.zeros([2, 3]),
                                                                         "bias": paddle.zeros([3])})
    other = paddle.nn.Linear(2, 3)
    assert checkpoint.load_weights(other, str(tmp_path / "0")).endswith("0.pdparams")
    assert np.array_equal(other.weight.numpy(), model.weight.numpy())
    checkpoint.load_weights(other, str(tmp_path / "0.pdema"))  # raw weights, loaded as named
    assert not other.weight.numpy().any()
    with pytest.raises(IncompatibleStateError, match=r"shape mismatches \['weight \[2, 3\] vs \[2, 4\]'"):
        checkpoint.load_weights(paddle.nn.Linear(2, 4), str(tmp_path / "0"))
    with pytest.raises(CheckpointError, match="weights: .*nope.pdparams does not exist"):
        checkpoint.load_weights(other, str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match=r"checkpoint .*/0 has no .pdopt file \(it holds \['.pdema', '.pdparams'\]\)"):
        checkpoint.load_resume_state(str(tmp_path / "0"), use_ema=True)
