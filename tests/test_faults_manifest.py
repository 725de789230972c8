"""Manifests of every wrong shape, and checkpoints that are not what they claim, are refused with one
clear line by every reader: -r (the trainer), eval.py (-o weights=), export_model.py, average_checkpoints.py."""


import os
import shutil
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_ema import checkpoint
from paddle_ema.engine import read_config
from paddle_ema.engine.run_checkpoints import load_resume_state, load_state_dict
from paddle_ema.engine.cli import average_main, eval_main, export_main
from paddle_ema.engine.runs import build_trainer
from paddle_ema.errors import CheckpointError, IncompatibleStateError, PaddleEMAError

REPO = Path(__file__).resolve().parents[1]
GOOD_SHA = "0" * 64

# (manifest text, what the one-line error says)
WRONG_SHAPES = [
    ("[]", r"malformed: it holds a JSON list, not an object"),
    ('"text"', r"malformed: it holds a JSON str"),
    ("3", r"malformed: it holds a JSON int"),
    ("null", r"malformed: it holds a JSON NoneType"),
    ("{}", r"malformed: format is 'None'"),
    ('{"format": "other/2", "files": {}}', r"malformed: format is 'other/2'"),
    ('{"format": "paddle_ema.checkpoint/1"}', r"'files' is not a non-empty object"),
    ('{"format": "paddle_ema.checkpoint/1", "files": []}', r"'files' is not a non-empty object"),
    ('{"format": "paddle_ema.checkpoint/1", "files": {}}', r"'files' is not a non-empty object"),
    ('{"format": "paddle_ema.checkpoint/1", "files": {".pdparams": [1, 2]}}', r"files\['.pdparams'\] is a JSON list"),
    ('{"format": "paddle_ema.checkpoint/1", "files": {".pdparams": "abc"}}', r"files\['.pdparams'\] is a JSON str"),
    ('{"format": "paddle_ema.checkpoint/1", "files": {".pdparams": null}}', r"is a JSON NoneType"),
    ('{"format": "paddle_ema.checkpoint/1", "files": {".pdparams": {"sha256": "%s"}}}' % GOOD_SHA,
     r"\.bytes is not an integer >= 0"),
    ('{"format": "paddle_ema.checkpoint/1", "files": {".pdparams": {"bytes": -1, "sha256": "%s"}}}' % GOOD_SHA,
     r"\.bytes is not an integer >= 0"),
    ('{"format": "paddle_ema.checkpoint/1", "files": {".pdparams": {"bytes": true, "sha256": "%s"}}}' % GOOD_SHA,
     r"\.bytes is not an integer >= 0"),
    ('{"format": "paddle_ema.checkpoint/1", "files": {".pdparams": {"bytes": 1.5, "sha256": "%s"}}}' % GOOD_SHA,
     r"\.bytes is not an integer >= 0"),
    ('{"format": "paddle_ema.checkpoint/1", "files": {".pdparams": {"bytes": 1, "sha256": "xyz"}}}',
     r"\.sha256 is not 64 hexadecimal digits"),
    ('{"format": "paddle_ema.checkpoint/1", "files": {".pdparams": {"bytes": 1, "sha256": 7}}}',
     r"\.sha256 is not 64 hexadecimal digits"),
    ('{"format": "paddle_ema.checkpoint/1", "files": {"/../../etc/passwd": {"bytes": 1, "sha256": "%s"}}}' % GOOD_SHA,
     r"is not a plain file-name suffix"),
    ('{"format": "paddle_ema.checkpoint/1", "files": {".pdparams": {"bytes": 1, "sha256": "%s", "staged": "../x"}}}'
     % GOOD_SHA, r"\.staged is not a temporary file name"),
    ("{not json", r"unreadable \(not JSON"),
    ('{"format": "paddle_ema.checkpoint/1", "files": ' + "[" * 100_000 + "]" * 100_000 + "}", r"unreadable \(not JSON: nested"),
    (b"\xff\xfe{\x00}\x00", r"unreadable \(not JSON"),
    ("", r"unreadable \(not JSON"),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny epoch trained in this process: a complete checkpoint `0`... `model_final`."""
    folder = tmp_path_factory.mktemp("manifest_run")
    config = folder / "tiny.yml"
    config.write_text(f"_BASE_: [{REPO / 'configs' / 'lenet_digits.yml'}]\noutput_dir: {folder / 'output'}\n"
                      "epoch: 2\nLeNet: {width: 4, hidden: 16}\nTrainReader: {batch_size: 128}\n")
    cfg = read_config(str(config))
    import io

    build_trainer(cfg, "tiny", stream=io.StringIO()).train()
    return {"config": config, "out": folder / "output" / "tiny", "cfg": cfg}


def _copy_checkpoint(run, target, stem="model_final"):
    target.mkdir(exist_ok=True)
    for path in run["out"].glob(f"{stem}.*"):
        shutil.copy(path, target / path.name)
    return target / stem


def _one_line(capsys, pattern):
    import re

    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.mark.parametrize("text, pattern", WRONG_SHAPES, ids=[f"shape{i}" for i in range(len(WRONG_SHAPES))])
def test_every_wrong_manifest_shape_is_refused_by_every_reader(run, tmp_path, capsys, text, pattern):
    stem = _copy_checkpoint(run, tmp_path / "ck")
    manifest = Path(str(stem) + checkpoint.MANIFEST_SUFFIX)
    manifest.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    with pytest.raises(CheckpointError, match=pattern):
        checkpoint.verify(str(stem))
    with pytest.raises(CheckpointError, match=pattern):
        load_resume_state(str(stem), use_ema=True)  # -r
    with pytest.raises(CheckpointError, match=pattern):
        load_state_dict(str(stem) + ".pdparams", "weights")
    if WRONG_SHAPES.index((text, pattern)) % 3:
        return  # the tools' front-ends, on every third shape (each builds the data and model: ~1 s)
    config = str(run["config"])
    assert eval_main(["-c", config, "-o", f"weights={stem}.pdparams"]) == 2
    _one_line(capsys, pattern)
    assert export_main(["-c", config, "-o", f"weights={stem}.pdparams", "--output_dir", str(tmp_path / "exp")]) == 2
    _one_line(capsys, pattern)
    assert average_main([f"{stem}.pdparams", f"{stem}.pdema", "--bn", "average", "--output",
                         str(tmp_path / "avg.pdparams")]) == 2
    _one_line(capsys, pattern)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before  # nothing touched
    assert not (tmp_path / "avg.pdparams").exists() and not list((tmp_path / "exp").glob("*"))


def test_manifest_too_large_and_a_folder_in_its_place(run, tmp_path):
    stem = _copy_checkpoint(run, tmp_path / "ck")
    manifest = Path(str(stem) + checkpoint.MANIFEST_SUFFIX)
    manifest.write_text(" " * (checkpoint.MANIFEST_MAX_BYTES + 1))
    with pytest.raises(CheckpointError, match=r"malformed: \d+ bytes, a manifest is at most 1048576"):
        checkpoint.verify(str(stem))
    manifest.unlink()
    manifest.mkdir()
    with pytest.raises(CheckpointError, match=r"unreadable \(Is a directory\)"):
        checkpoint.verify(str(stem))


def test_flipped_and_truncated_files_under_a_manifest_are_refused_by_every_reader(run, tmp_path, capsys):
    for suffix in (".pdparams", ".pdema", ".pdopt"):
        stem = _copy_checkpoint(run, tmp_path / suffix.strip("."))
        path = Path(str(stem) + suffix)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data) if suffix != ".pdema" else bytes(data[: len(data) // 3]))
        pattern = rf"{suffix} is truncated or corrupted \(its checksum does not match\)"
        with pytest.raises(CheckpointError, match=pattern):
            checkpoint.verify(str(stem))
        if suffix != ".pdparams":  # what -r reads (with EMA: the raw weights and the training state)
            with pytest.raises(CheckpointError, match=pattern):
                load_resume_state(str(stem), use_ema=True)
        if suffix != ".pdopt":
            assert eval_main(["-c", str(run["config"]), "-o", f"weights={path}"]) == 2
            _one_line(capsys, pattern)
            assert average_main([str(path), str(path), "--bn", "first", "--output", str(tmp_path / "a.pdparams")]) == 2
            _one_line(capsys, pattern)


def test_foreign_training_state_under_a_valid_manifest_is_refused(run, tmp_path):
    cfg = run["cfg"]
    import io

    def resume_with(pdopt_state, pattern, error=PaddleEMAError):
        folder = tmp_path / f"foreign{len(os.listdir(tmp_path))}"
        stem = _copy_checkpoint(run, folder, "0")
        weights = {k: paddle.load(str(stem) + k) for k in (".pdparams", ".pdema")}
        checkpoint.save_checkpoint(str(stem), {**weights, ".pdopt": pdopt_state})  # a valid manifest over it
        with pytest.raises(error, match=pattern):
            build_trainer(cfg, "tiny", resume=str(stem), stream=io.StringIO())

    good = paddle.load(str(run["out"] / "0.pdopt"))
    resume_with({"x": 1}, r"its \.pdopt is not a training state of tools/train.py \('optimizer' holds nothing",
                CheckpointError)
    resume_with([1, 2], r"its \.pdopt holds a list, not the training state", CheckpointError)
    resume_with({**good, "global_step": "7"}, r"'global_step' holds a str, expected a int", CheckpointError)
    resume_with({**good, "optimizer": {"LR_Scheduler": {"nonsense": 1}}}, r"the checkpoint's optimizer state does not fit",
                IncompatibleStateError)
    resume_with({**good, "ema": {"impl": "paddle_ema", "ema": {"junk": 1}, "snapshots": 0}},
                r"-r .*EMA|EMA state|shadow|does not fit|incompatible", PaddleEMAError)
    resume_with({**good, "ema": {"impl": "ppdet", "ema": {}}}, r"ema_impl 'ppdet', this config uses 'paddle_ema'")
    resume_with({**good, "run": "not a dict"}, r"records no valid run identity", CheckpointError)
    resume_with({**good, "rng": "not an rng"}, r"the checkpoint's RNG state does not fit", IncompatibleStateError)
    resume_with({**good, "best": [1]}, r"records a best model of the wrong kind", IncompatibleStateError)


def test_weights_that_are_not_a_state_dict_are_refused(run, tmp_path, capsys):
    for i, obj in enumerate([[1, 2, 3], {"w": "text"}, {1: paddle.ones([2])}, {}]):
        path = tmp_path / f"odd{i}.pdparams"
        paddle.save(obj, str(path))
        assert eval_main(["-c", str(run["config"]), "-o", f"weights={path}"]) == 2
        _one_line(capsys, r"not a state dict of weights")
    (tmp_path / "folder.pdparams").mkdir()
    assert eval_main(["-c", str(run["config"]), "-o", f"weights={tmp_path / 'folder.pdparams'}"]) == 2
    _one_line(capsys, r"folder.pdparams is a folder, not a file")


def test_average_output_has_a_manifest_that_later_readers_check(run, tmp_path, capsys):
    a, b = run["out"] / "0.pdparams", run["out"] / "model_final.pdparams"
    output = tmp_path / "avg.pdparams"
    assert average_main([str(a), str(b), "--bn", "average", "--output", str(output)]) == 0
    capsys.readouterr()
    checkpoint.verify(str(tmp_path / "avg"))
    data = bytearray(output.read_bytes())
    data[-10] ^= 0x40
    output.write_bytes(bytes(data))
    assert eval_main(["-c", str(run["config"]), "-o", f"weights={output}"]) == 2
    _one_line(capsys, r"avg.pdparams is truncated or corrupted")


def test_stray_temporaries_and_a_copied_journal_never_stop_a_run(tmp_path):
    import subprocess
    import sys

    def train(*args):  # separate processes: a resume needs the parameter names a fresh process gives
        return subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), "-c", str(config), *args], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": ""}, capture_output=True, text=True, timeout=240)

    config = tmp_path / "tiny.yml"
    config.write_text(f"_BASE_: [{REPO / 'configs' / 'lenet_digits.yml'}]\noutput_dir: {tmp_path / 'output'}\n"
                      "epoch: 1\nLeNet: {width: 4, hidden: 16}\nTrainReader: {batch_size: 256}\n")
    assert train().returncode == 0
    out = tmp_path / "output" / "tiny"
    (out / ".x.tmp-99999999999999999999").write_bytes(b"?")  # a PID no process can have
    (out / "model_final.manifest.json.next").write_bytes((out / "model_final.manifest.json").read_bytes())  # no `staged`
    result = train("-o", "epoch=2", "-r", "auto")
    assert result.returncode == 0 and "resumed from" in result.stdout, result.stderr[-2000:]
    assert not (out / ".x.tmp-99999999999999999999").exists() and not (out / "model_final.manifest.json.next").exists()
    checkpoint.verify(str(out / "model_final"))


def test_average_never_writes_over_a_training_checkpoint(run, tmp_path, capsys):
    out = run["out"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    inputs = [str(out / "0.pdparams"), str(out / "model_final.pdparams"), "--bn", "average"]
    for output, pattern in [
        (out / "0.pdparams", rf"--output: {out / '0.pdparams'} is a file of the checkpoint {out / '0'}; a "
                             r"checkpoint's files are never written over, choose another name"),
        (out / "model_final.pdparams", r"is a file of the checkpoint .*model_final; a checkpoint's files are never"),
        (out / "model_final.pdema", r"model_final.pdema is not a .pdparams file name; the output is a .pdparams"),
        (out / "0.manifest.json", r"0.manifest.json is not a .pdparams file name"),
        ("", r"--output: an empty path; give the .pdparams file to write"),
        ("   ", r"--output: an empty path"),
    ]:
        assert average_main([*inputs, "--output", str(output)]) == 2
        _one_line(capsys, pattern)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    load_resume_state(str(out / "0"), use_ema=True)  # -r 0 still works
    checkpoint.verify(str(out / "model_final"))
    # its own output it may write again
    assert average_main([*inputs, "--output", str(tmp_path / "avg.pdparams")]) == 0
    assert average_main([*inputs, "--output", str(tmp_path / "avg.pdparams")]) == 0
    capsys.readouterr()


def test_huge_average_weights_give_the_mean(run, tmp_path, capsys):
    a, b = str(run["out"] / "0.pdparams"), str(run["out"] / "model_final.pdparams")
    for weights, name in ((None, "uniform"), (["1e308", "1e308"], "huge"), (["3e-320", "3e-320"], "tiny")):
        args = [a, b, "--bn", "average", "--output", str(tmp_path / f"{name}.pdparams")]
        assert average_main(args + (["--weights", *weights] if weights else [])) == 0
    capsys.readouterr()
    uniform = {k: v.numpy() for k, v in checkpoint.safe_load(tmp_path / "uniform.pdparams").items()}
    expected = {k: (v.numpy() + paddle.load(b)[k].numpy()) / 2 for k, v in paddle.load(a).items()}
    for name in ("huge", "tiny"):  # scaled by a power of two: the same bits as weights 1 1
        for key, value in checkpoint.safe_load(tmp_path / f"{name}.pdparams").items():
            assert value.numpy().tobytes() == uniform[key].tobytes(), (name, key)
    for key, value in uniform.items():
        if value.dtype.kind == "f":
            np.testing.assert_allclose(value, expected[key], rtol=1e-6, atol=1e-7)
    assert average_main([a, b, "--bn", "average", "--weights", "1e308", "inf", "--output", str(tmp_path / "x.pdparams")]) == 2
    _one_line(capsys, r"--weights must be finite, >= 0 and not all 0")


def test_export_refuses_an_empty_output_dir(run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert export_main(["-c", str(run["config"]), "--output_dir", ""]) == 2
    _one_line(capsys, r"--output_dir: an empty path; give the folder to export into")
    assert not os.listdir(tmp_path)
