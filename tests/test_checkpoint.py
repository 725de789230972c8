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


def _values(stem):
    return float(paddle.load(stem + ".pdparams")["w"].numpy()[0]), paddle.load(stem + ".pdopt")["step"]


def _dies_on_second_file(monkeypatch, leave_files=False):
    real = paddle.save
    calls = []

    def save(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # as if the process died between the two files
        real(obj, path)

    monkeypatch.setattr(paddle, "save", save)
    if leave_files:  # a SIGKILL runs no clean-up: the first file stays under its temporary name
        monkeypatch.setattr(checkpoint, "_remove_quietly", lambda path: None)


def test_interrupted_write_leaves_an_incomplete_stem_and_older_ones_intact(tmp_path, monkeypatch):
    checkpoint.save_checkpoint(str(tmp_path / "0"), _files(0.0))
    checkpoint.save_checkpoint(str(tmp_path / "1"), _files(1.0))
    _dies_on_second_file(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(str(tmp_path / "1"), _files(9.0))  # rewriting an existing stem
    monkeypatch.undo()
    # The old checkpoint is replaced only once its successor is complete: stem 1 is still the old one.
    checkpoint.verify(str(tmp_path / "1"))
    assert _values(str(tmp_path / "1")) == (1.0, 1)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n or n.endswith(checkpoint.JOURNAL_SUFFIX)]

    _dies_on_second_file(monkeypatch, leave_files=True)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(str(tmp_path / "2"), _files(2.0))  # a new stem, killed half way
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"checkpoint .*/2 is incomplete \(the run stopped while writing it: "
                                              r".*2.manifest.json is missing\); complete checkpoints there: 0, 1"):
        checkpoint.verify(str(tmp_path / "2"))
    checkpoint.verify(str(tmp_path / "0"))
    assert checkpoint.complete_checkpoints(str(tmp_path)) == [str(tmp_path / "0"), str(tmp_path / "1")]
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoint.verify(str(tmp_path / "7"))


def test_a_commit_killed_after_its_journal_is_read_as_the_new_checkpoint_and_finished(tmp_path, monkeypatch):
    stem = str(tmp_path / "1")
    checkpoint.save_checkpoint(stem, _files(1.0))
    real_replace = os.replace
    renames = []

    def dies_after_one_rename(src, dst):
        if os.path.basename(os.fspath(src)).startswith(".1.pd"):
            renames.append(dst)
            if len(renames) == 2:
                raise KeyboardInterrupt("killed between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_after_one_rename)
    monkeypatch.setattr(checkpoint, "_remove_quietly", lambda path: None)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(stem, _files(9.0))
    monkeypatch.undo()
    # .pdparams is renamed already, .pdopt is still under its temporary name, the old manifest is stale:
    assert os.path.exists(stem + checkpoint.JOURNAL_SUFFIX)
    paths = checkpoint.resolve(stem)
    assert paths[".pdparams"] == stem + ".pdparams" and ".tmp-" in paths[".pdopt"]
    assert paddle.load(paths[".pdopt"]) == {"step": 9}  # readers see the committed new checkpoint
    checkpoint.recover(str(tmp_path))  # what the next run does first, holding the run lock
    assert sorted(os.listdir(tmp_path)) == ["1.manifest.json", "1.pdopt", "1.pdparams"]
    checkpoint.verify(stem)
    assert _values(stem) == (9.0, 9)


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    checkpoint.save_checkpoint(str(tmp_path / "0"), _files(0.0))
    dead = 2**22 + 12345  # above the default pid_max: no such process
    (tmp_path / f".0.pdopt.tmp-{dead}").write_bytes(b"partial")
    (tmp_path / f".best_model.pdparams.tmp-{dead}").write_bytes(b"partial")
    (tmp_path / f".model.tmp-{dead}-abc123").mkdir()  # a staged_prefix folder
    alive = tmp_path / f".1.pdopt.tmp-{os.getpid()}"  # a live writer's file stays
    alive.write_bytes(b"in progress")
    checkpoint.recover(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(["0.manifest.json", "0.pdopt", "0.pdparams", alive.name])


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

    def broken(obj, file):
        file.write(b"partial")  # paddle.save writes into the file paddle_ema opened, then fails
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
