import os
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_ema import CheckpointError
from paddle_ema import checkpoint


def _files(value):
    return {".pdparams": {"w": paddle.full([64], value)}, ".pdopt": {"step": int(value)}}


def test_complete_checkpoint_verifies_and_loads(tmp_path):
    stem = str(tmp_path / "3")
    checkpoint.save_checkpoint(stem, _files(3.0))
    checkpoint.verify(stem)
    assert checkpoint.is_complete(stem)
    assert checkpoint.complete_checkpoints(str(tmp_path)) == [stem]
    assert checkpoint.safe_load(stem + ".pdopt") == {"step": 3}
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # no temporary files left behind


def test_interrupted_write_leaves_an_incomplete_stem_and_older_ones_intact(tmp_path, monkeypatch):
    checkpoint.save_checkpoint(str(tmp_path / "0"), _files(0.0))
    checkpoint.save_checkpoint(str(tmp_path / "1"), _files(1.0))
    real = checkpoint.atomic_save
    calls = []

    def dies_on_second_file(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # as if the process died between the two files
        real(obj, path)

    monkeypatch.setattr(checkpoint, "atomic_save", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(str(tmp_path / "1"), _files(9.0))  # rewriting an existing stem
    monkeypatch.setattr(checkpoint, "atomic_save", real)
    with pytest.raises(CheckpointError, match=r"checkpoint .*/1 is incomplete \(the run stopped while writing it: "
                                              r".*1.manifest.json is missing\); complete checkpoints there: 0"):
        checkpoint.verify(str(tmp_path / "1"))
    checkpoint.verify(str(tmp_path / "0"))
    assert checkpoint.complete_checkpoints(str(tmp_path)) == [str(tmp_path / "0")]
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoint.verify(str(tmp_path / "7"))


def test_corrupted_and_truncated_files_are_named(tmp_path):
    stem = str(tmp_path / "5")
    checkpoint.save_checkpoint(stem, _files(5.0))
    data = bytearray(open(stem + ".pdparams", "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(stem + ".pdparams", "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=r"5.pdparams is truncated or corrupted \(its checksum does not match\)"):
        checkpoint.verify(stem)
    checkpoint.verify(stem, [".pdopt"])  # the other file is still fine

    loose = tmp_path / "loose.pdparams"  # a file without a manifest, cut short
    paddle.save({"w": paddle.ones([1000])}, str(loose))
    loose.write_bytes(loose.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"weights: .*loose.pdparams cannot be read: it is truncated, corrupted"):
        checkpoint.safe_load(loose, "weights")
    (tmp_path / "bad.manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest .*bad.manifest.json is unreadable"):
        checkpoint.verify(str(tmp_path / "bad"))


def test_atomic_save_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "x.pdparams"
    checkpoint.atomic_save({"w": paddle.ones([2])}, target)

    def broken(obj, path):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(paddle, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_save({"w": paddle.zeros([2])}, target)
    monkeypatch.undo()
    assert np.array_equal(paddle.load(str(target))["w"].numpy(), [1.0, 1.0])
    assert os.listdir(tmp_path) == ["x.pdparams"]


def test_staged_prefix_publishes_all_files_or_none(tmp_path):
    prefix = tmp_path / "out" / "model"

    def write(staged, value):
        for suffix in (".json", ".pdiparams"):
            Path(staged + suffix).write_text(value)

    with checkpoint.staged_prefix(prefix) as staged:
        write(staged, "first")
    assert sorted(os.listdir(tmp_path / "out")) == ["model.json", "model.pdiparams"]
    with pytest.raises(RuntimeError, match="check failed"):
        with checkpoint.staged_prefix(prefix) as staged:
            write(staged, "second")
            raise RuntimeError("check failed")
    assert sorted(os.listdir(tmp_path / "out")) == ["model.json", "model.pdiparams"]  # no staging left behind
    assert (tmp_path / "out" / "model.json").read_text() == "first"
