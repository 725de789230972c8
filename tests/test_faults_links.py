"""No write follows a link planted in a run folder: at the lock, at every temporary name the tools
used to predict (`.<name>.tmp-<pid>`) and at the random ones they use now, at every final name
(checkpoint files, manifests, journal, best_model, model_final, curves.png, post-hoc files, the
posthoc and vdl folders), at export and average outputs. Each planted link is refused in one line
or stepped around; its target never changes and no file the tools leave is a link."""

import io
import os
import stat
from pathlib import Path

import paddle
import pytest

from paddle_ema import checkpoint
from paddle_ema.engine import read_config
from paddle_ema.engine.cli import average_main, export_main, train_main
from paddle_ema.engine.run_folder import LOCK_NAME, OutputError, RunLock
from paddle_ema.engine.runs import build_trainer
from paddle_ema.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]
SECRET = b"a file outside the run folder\n"


def _config(folder, extra=""):
    path = folder / "tiny.yml"
    path.write_text(f"_BASE_: [{REPO / 'configs' / 'lenet_digits.yml'}]\noutput_dir: {folder / 'output'}\n"
                    "epoch: 2\nlog_iter: 1000\nLeNet: {width: 4, hidden: 16}\nTrainReader: {batch_size: 256}\n"
                    + extra)
    return path


def _target(folder, name="target"):
    path = folder / name
    path.write_bytes(SECRET)
    return path


def _links_in(folder):
    return sorted(str(p) for p in Path(folder).rglob("*") if p.is_symlink())


def _one_line(capsys, pattern):
    import re

    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]


def test_the_lock_is_never_followed_through_a_link(tmp_path):
    target = _target(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    lock = run / LOCK_NAME
    os.symlink(target, lock)
    with pytest.raises(OutputError, match=r"\.lock is a symbolic link; the run lock is a regular file"):
        RunLock(str(run)).acquire()
    lock.unlink()
    os.symlink(tmp_path / "nothing", lock)  # dangling: O_CREAT would have created the target
    with pytest.raises(OutputError, match=r"\.lock is a symbolic link"):
        RunLock(str(run)).acquire()
    assert not (tmp_path / "nothing").exists()
    lock.unlink()
    os.link(target, lock)  # a hard link: truncating the lock would truncate the target
    with pytest.raises(OutputError, match=r"\.lock is a file with other hard links"):
        RunLock(str(run)).acquire()
    lock.unlink()
    os.mkfifo(lock)
    with pytest.raises(OutputError, match=r"\.lock is not a regular file"):
        RunLock(str(run)).acquire()  # opened without blocking
    assert target.read_bytes() == SECRET and target.stat().st_nlink == 1


def test_a_link_at_the_lock_stops_training_in_one_line(tmp_path, capsys):
    target = _target(tmp_path)
    config = _config(tmp_path)
    (tmp_path / "output" / "tiny").mkdir(parents=True)
    os.symlink(target, tmp_path / "output" / "tiny" / LOCK_NAME)
    assert train_main(["-c", str(config)]) == 2
    _one_line(capsys, r"output_dir: .*/\.lock is a symbolic link")
    assert target.read_bytes() == SECRET and (tmp_path / "output" / "tiny" / LOCK_NAME).is_symlink()


def test_links_at_the_temporary_names_writers_used_to_predict_are_not_followed(tmp_path):
    config = _config(tmp_path, "use_swa: true\nema_posthoc: true\nema_posthoc_every: 3\n")
    run = tmp_path / "output" / "tiny"
    (run / "posthoc").mkdir(parents=True)
    pid = os.getpid()  # the trainer runs in this process
    names = [".write-probe", ".0.pdparams", ".0.pdema", ".0.pdopt", ".0_swa.pdparams", ".0.manifest.json.next",
             ".0.manifest.json", ".model_final.pdparams", ".best_model.pdparams", ".best_model.manifest.json",
             ".curves.png", "posthoc/.posthoc_index.json"]
    targets = {}
    for i, name in enumerate(names):
        targets[name] = _target(tmp_path, f"target{i}")
        os.symlink(targets[name], run / f"{name}.tmp-{pid}")
    build_trainer(read_config(str(config)), "tiny", do_eval=True, stream=io.StringIO()).train()
    assert all(t.read_bytes() == SECRET for t in targets.values())
    planted = {str(run / f"{name}.tmp-{pid}") for name in names}
    assert set(_links_in(run)) == planted  # the planted links are still links; nothing else is one
    assert {os.path.basename(s) for s in checkpoint.complete_checkpoints(str(run))} == {"0", "best_model", "model_final"}


def test_a_link_at_the_random_temporary_name_is_stepped_around(tmp_path, monkeypatch):
    target = _target(tmp_path)
    names = iter(["planted", "free1", "planted", "free2", "free3", "planted", "free4", "free5", "free6"])
    monkeypatch.setattr(checkpoint.secrets, "token_hex", lambda n: next(names))
    pid = os.getpid()
    for name in ("x.pdparams", "1.pdparams", "1.manifest.json.next"):
        os.symlink(target, tmp_path / f".{name}.tmp-{pid}-planted")
    checkpoint.atomic_save({"w": paddle.ones([3])}, tmp_path / "x.pdparams")  # O_EXCL|O_NOFOLLOW: next name
    checkpoint.save_checkpoint(str(tmp_path / "1"), {".pdparams": {"w": paddle.zeros([2])}})
    assert target.read_bytes() == SECRET
    assert checkpoint.safe_load(tmp_path / "x.pdparams")["w"].numpy().tolist() == [1.0, 1.0, 1.0]
    checkpoint.verify(str(tmp_path / "1"))
    assert not (tmp_path / "x.pdparams").is_symlink() and not (tmp_path / "1.pdparams").is_symlink()


# A link (or a FIFO) planted at each name a training run writes: refused before anything trains.
FINAL_NAMES = ["0.pdparams", "0.pdema", "0.pdopt", "0.manifest.json", "0.manifest.json.next", "0_swa.pdparams",
               "best_model.pdparams", "model_final.pdema", "curves.png", "posthoc", "vdl", "posthoc/posthoc_index.json",
               "posthoc/posthoc_0_0000000003.pdparams"]


@pytest.mark.parametrize("name", FINAL_NAMES)
def test_a_link_at_a_name_the_trainer_writes_is_refused_in_one_line(tmp_path, capsys, name):
    config = _config(tmp_path, "use_swa: true\nema_posthoc: true\nema_posthoc_every: 3\n")
    run = tmp_path / "output" / "tiny"
    (run / "posthoc").mkdir(parents=True)
    if name in ("posthoc", "vdl"):
        (run / "posthoc").rmdir()
        target = tmp_path / "elsewhere"
        target.mkdir()
    else:
        target = _target(tmp_path)
    os.symlink(target, run / name)
    assert train_main(["-c", str(config), "--eval"]) == 2
    _one_line(capsys, rf"output_dir: {run / name} is a symbolic link; a run folder holds only the files")
    if target.is_dir():
        assert not list(target.iterdir())
    else:
        assert target.read_bytes() == SECRET
    assert _links_in(run) == [str(run / name)] and not (run / LOCK_NAME).exists()


def test_a_fifo_at_a_checkpoint_name_is_refused_without_blocking(tmp_path, capsys):
    config = _config(tmp_path)
    run = tmp_path / "output" / "tiny"
    run.mkdir(parents=True)
    os.mkfifo(run / "0.pdparams")
    assert train_main(["-c", str(config)]) == 2
    _one_line(capsys, r"0.pdparams is not a regular file; a run folder holds only the files")


def test_writers_refuse_a_link_planted_while_they_run(tmp_path):
    # Planted after the run's start-up check: each writer checks again before it replaces a name.
    target = _target(tmp_path)
    os.symlink(target, tmp_path / "0.pdopt")
    with pytest.raises(CheckpointError, match=r"0.pdopt is a symbolic link; paddle_ema replaces only regular files"):
        checkpoint.save_checkpoint(str(tmp_path / "0"), {".pdparams": {"w": paddle.ones([2])}, ".pdopt": {"s": 1}})
    os.symlink(target, tmp_path / "x.pdparams")
    with pytest.raises(CheckpointError, match=r"x.pdparams is a symbolic link"):
        checkpoint.atomic_save({"w": paddle.ones([2])}, tmp_path / "x.pdparams")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(target, out / "model.pdiparams")
    with pytest.raises(CheckpointError, match=r"model.pdiparams is a symbolic link"):
        with checkpoint.staged_prefix(out / "model") as staged:
            Path(staged + ".json").write_text("{}")
            Path(staged + ".pdiparams").write_text("weights")
    assert sorted(os.listdir(out)) == ["model.pdiparams"]  # all or nothing: model.json not published either
    assert target.read_bytes() == SECRET
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # every temporary removed
    # a hard link at a final name is replaced, its other name keeps its content
    os.link(target, tmp_path / "y.pdparams")
    checkpoint.atomic_save({"w": paddle.ones([2])}, tmp_path / "y.pdparams")
    assert target.read_bytes() == SECRET and target.stat().st_nlink == 1


def test_a_journal_naming_a_planted_link_is_not_committed(tmp_path):
    target = _target(tmp_path)
    checkpoint.save_checkpoint(str(tmp_path / "0"), {".pdparams": {"w": paddle.ones([2])}})
    entry = {"bytes": len(SECRET), "sha256": __import__("hashlib").sha256(SECRET).hexdigest(),
             "staged": f".0.pdparams.tmp-{os.getpid()}-abc"}
    os.symlink(target, tmp_path / entry["staged"])
    (tmp_path / "0.manifest.json.next").write_text(
        '{"format": "paddle_ema.checkpoint/1", "files": {".pdparams": %s}}' % __import__("json").dumps(entry))
    with pytest.raises(CheckpointError, match=r"\.0\.pdparams\.tmp-\d+-abc is a symbolic link; a checkpoint's staged "
                                              r"file is a regular file"):
        checkpoint.recover(str(tmp_path))
    assert not (tmp_path / "0.pdparams").is_symlink() and target.read_bytes() == SECRET


def test_export_and_average_outputs_refuse_links(tmp_path, capsys):
    config = _config(tmp_path)
    build_trainer(read_config(str(config)), "tiny", stream=io.StringIO()).train()
    run = tmp_path / "output" / "tiny"
    target = _target(tmp_path)
    exported = tmp_path / "exported"
    exported.mkdir()
    os.symlink(target, exported / "tiny.pdiparams")
    assert export_main(["-c", str(config), "--output_dir", str(exported)]) == 2
    _one_line(capsys, r"exported/tiny.pdiparams is a symbolic link")
    assert sorted(os.listdir(exported)) == ["tiny.pdiparams"]
    os.symlink(target, tmp_path / "avg.pdparams")
    assert average_main([str(run / "0.pdparams"), str(run / "model_final.pdparams"), "--bn", "average", "--output",
                         str(tmp_path / "avg.pdparams")]) == 2
    _one_line(capsys, r"avg.pdparams is a symbolic link")
    assert target.read_bytes() == SECRET and stat.S_ISLNK(os.lstat(tmp_path / "avg.pdparams").st_mode)
