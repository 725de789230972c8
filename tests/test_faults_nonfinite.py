"""The non-finite policy (`ema_nonfinite: skip|raise|update`) in the trainer's own steps: a
cycle_epoch restart never copies NaN weights into the average (and keeps the skip count),
ema_update_bn never returns or saves NaN BatchNorm statistics, and ema_impl: ppdet gets the policy.

No run exits 0 with a NaN average (each in dygraph, ema_impl: ppdet and mode: static): settings
under which the average never moves are refused before training (a decay of 1), a
diverging run stops before it writes NaN weights, a .pdopt whose EMA shadow is NaN or of another
shape is refused by -r; each is one line, exit 2, and the run's files stay byte for byte."""

import os
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import paddle
import pytest

from paddle_ema import checkpoint
from paddle_ema.config import FIELDS
from paddle_ema.engine import read_config
from paddle_ema.engine.cli import average_main, export_main, train_main
from paddle_ema.engine.ema_setup import build_ema
from paddle_ema.engine.runs import check_config
from paddle_ema.errors import NonFiniteError

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Net(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.fc = paddle.nn.Linear(3, 2)


def config(**overrides):
    cfg = {key: spec.default for key, spec in FIELDS.items()}
    cfg.update({"use_ema": True, "ema_decay": 0.5, "ema_decay_type": "normal", **overrides})
    return cfg


def shadow(handle):
    return {k: v.numpy().copy() for k, v in handle.ema.state_dict()["shadow"].items()}


def _step(model, value):
    with paddle.no_grad():
        model.fc.weight.set_value(paddle.full([3, 2], value))


def test_a_cycle_restart_on_nan_weights_keeps_the_average_and_warns():
    paddle.seed(1)
    model = Net()
    handle = build_ema(config(cycle_epoch=1), model)  # restart after every snapshot
    _step(model, 1.0)
    handle.update()
    _step(model, float("nan"))
    handle.update()  # skipped: counted
    before = shadow(handle)
    with pytest.warns(RuntimeWarning, match=r"cycle_epoch restart would copy parameter 'fc.weight', which holds NaN"):
        handle.snapshot()
    after = shadow(handle)
    assert all(np.array_equal(before[k], after[k]) for k in before) and np.isfinite(after["fc.weight"]).all()
    assert handle.ema.num_nonfinite_skipped == 1
    # a finite restart starts the average from the weights, and keeps the run's skip count
    _step(model, 3.0)
    handle.snapshot()
    assert np.array_equal(shadow(handle)["fc.weight"], np.full([3, 2], 3.0, "float32"))
    assert handle.ema.num_nonfinite_skipped == 1 and handle.ema.num_updates == 0


def test_a_cycle_restart_on_nan_weights_raises_or_copies_as_told():
    model = Net()
    handle = build_ema(config(cycle_epoch=1, ema_nonfinite="raise"), model)
    _step(model, float("inf"))
    with pytest.raises(NonFiniteError, match="cycle_epoch restart would copy parameter 'fc.weight'"):
        handle.snapshot()
    handle = build_ema(config(cycle_epoch=1, ema_nonfinite="update"), model)  # PaddleDetection's behaviour
    handle.snapshot()
    assert np.isinf(shadow(handle)["fc.weight"]).all()


@pytest.fixture(scope="module")
def bn_trainer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bn")
    cfg = read_config(str(REPO / "configs" / "lenet_digits.yml"),
                      ["epoch=1", f"output_dir={folder}", "LeNet.width=4", "LeNet.hidden=8", "ema_update_bn=true",
                       "EvalReader.batch_size=512"])
    return check_config(cfg, do_eval=False)


def test_ema_update_bn_refuses_a_recalibration_that_overflows(bn_trainer):
    weights = {k: v.clone() for k, v in bn_trainer.model.state_dict().items()}
    recalibrated = bn_trainer._recalibrated(weights)  # finite weights: new, finite statistics
    assert not np.array_equal(recalibrated["features.1._variance"].numpy(), weights["features.1._variance"].numpy())
    huge = dict(weights, **{"features.0.weight": paddle.full_like(weights["features.0.weight"], 1e30)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = bn_trainer._recalibrated(huge)
    assert any("recalibrated BatchNorm statistic 'features.1._" in str(w.message) and "holds NaN or Inf" in str(w.message)
               for w in caught), [str(w.message) for w in caught]
    assert kept is huge  # the averaged statistics are what gets evaluated and saved
    assert all(np.isfinite(v.numpy()).all() for k, v in kept.items() if k.endswith(("_mean", "_variance")))
    bn_trainer.cfg["ema_nonfinite"] = "raise"
    try:
        with pytest.raises(NonFiniteError, match=r"ema_update_bn: .* holds NaN or Inf .*\(ema_nonfinite: raise\)"):
            bn_trainer._recalibrated(huge)
    finally:
        bn_trainer.cfg["ema_nonfinite"] = "skip"


def test_ppdet_impl_honours_ema_nonfinite():
    model = Net()
    _step(model, 1.0)
    handle = build_ema(config(ema_impl="ppdet", ema_nonfinite="raise"), model)
    handle.update()
    _step(model, float("nan"))
    with pytest.raises(NonFiniteError):
        handle.update()
    skipping = build_ema(config(ema_impl="ppdet", ema_nonfinite="skip"), model)
    _step(model, 2.0)
    skipping.update()
    before = skipping.snapshot()
    _step(model, float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skipping.update()
    after = skipping.snapshot()
    assert before.keys() == after.keys() and all(np.isfinite(v.numpy()).all() for v in after.values())


def test_a_static_cycle_restart_on_nan_weights_keeps_the_average(tmp_path):
    cfg = read_config(str(REPO / "configs" / "lenet_digits.yml"),
                      ["epoch=1", f"output_dir={tmp_path}", "LeNet.width=4", "LeNet.hidden=8", "mode=static",
                       "cycle_epoch=1"])
    trainer = check_config(cfg, do_eval=False)
    state = trainer.ema
    shadows = {n: state.vars.read(v).copy() for n, v in state.shadows.items()}
    name = "features.0.weight"
    weight = state.vars.read(state.structured[name])
    state.vars.write(state.structured[name], np.full_like(weight, np.nan))
    with pytest.warns(RuntimeWarning, match=rf"cycle_epoch restart would copy parameter '{name}', which holds NaN"):
        state.snapshot()
    after = {n: state.vars.read(v) for n, v in state.shadows.items()}
    assert all(np.array_equal(shadows[n], after[n]) for n in shadows)  # the average was not restarted from NaN
    state.vars.write(state.structured[name], weight)
    state.snapshot()  # finite: the restart copies the weights
    assert np.array_equal(state.vars.read(state.shadows[name]), weight)
    assert paddle.in_dynamic_mode()


# -- whole runs: no exit 0 with a NaN average -------------------------------------------------------

def test_the_never_moving_ppdet_average_is_refused_before_training(tmp_path):
    """The command that trained, saved NaN weights everywhere and exited 0."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), "-c", str(REPO / "configs" / "lenet_digits.yml"),
                             "--eval", "-o", "ema_impl=ppdet", "ema_decay_type=normal", "ema_decay=1.0",
                             f"output_dir={out}"], cwd=REPO, env={**os.environ, "PYTHONPATH": ""}, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "error: the constant schedule (decay=1.0) has decay 1 from its first update on: the average would never move "
        "from where it starts (one started from zero stays 0, and its bias correction divides by 1 - 1**t = 0); use "
        "a decay below 1"]
    assert not out.exists()  # refused before the run folder was made


MODES = {"paddle_ema": "", "ppdet": "ema_impl: ppdet\n", "static": "mode: static\n"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished two-epoch run of each EMA implementation (0 and model_final checkpoints)."""
    made = {}
    for mode, extra in MODES.items():
        folder = tmp_path_factory.mktemp(mode)
        config = folder / "tiny.yml"
        config.write_text(f"_BASE_: [{REPO / 'configs' / 'lenet_digits.yml'}]\noutput_dir: {folder / 'out'}\n"
                          "epoch: 2\nlog_iter: 1000\nLeNet: {width: 4, hidden: 8}\nTrainReader: {batch_size: 64}\n"
                          + extra)
        assert train_main(["-c", str(config)]) == 0
        made[mode] = {"config": config, "run_dir": folder / "out" / "tiny", "folder": folder}
    return made


def copy_run(run, dest):
    shutil.copytree(run["run_dir"], dest / "tiny")
    return dest / "tiny"


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def one_line(capsys, code, pattern):
    """Exit 2 and one error line (after the progress lines of the steps that ran), no traceback."""
    out, err = capsys.readouterr()
    lines = [line for line in err.strip().splitlines() if not line.startswith("epoch ")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (code, err)
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("mode", list(MODES))
def test_a_diverging_average_stops_the_run_before_it_is_written(runs, tmp_path, capsys, mode):
    """Resumed from epoch 0 with a learning rate that overflows the weights and ema_nonfinite: update
    (NaN weights averaged in): the epoch-2 snapshot is refused and every file stays as it was."""
    run_dir = copy_run(runs[mode], tmp_path)
    before = files(run_dir)
    capsys.readouterr()
    code = train_main(["-c", str(runs[mode]["config"]), "-r", str(run_dir / "0"), "-o", f"output_dir={tmp_path}",
                       "base_lr=1e30", "ema_nonfinite=update"])
    one_line(capsys, code, r"error: the EMA weights at step 44 \(epoch 2\): '[\w.]+' holds NaN or Inf; nothing is "
                           r"written \(the files already on disk are kept\)")
    assert files(run_dir) == before


def _nan_shadow(state):
    shadow = state["ema"]["ema"]["shadow"]
    shadow["features.0.weight"] = paddle.full_like(shadow["features.0.weight"], float("nan"))


def _turned_shadow(state):
    shadow = state["ema"]["ema"]["shadow"]
    shadow["features.0.weight"] = shadow["features.0.weight"].reshape([1, 4, 3, 3])  # same size, another shape


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("change, pattern", [
    (_nan_shadow, r"'shadow' holds NaN or Inf in 'features.0.weight'; a saved average must be finite"),
    (_turned_shadow, r"features.0.weight: shape \[1, 4, 3, 3\] in the state, \[4, 1, 3, 3\] here"),
], ids=["NaN shadow", "other shape"])
def test_resuming_a_bad_ema_shadow_is_one_line(runs, tmp_path, capsys, mode, change, pattern):
    """A .pdopt edited under a valid manifest (whoever can write the folder can rewrite both)."""
    run_dir = copy_run(runs[mode], tmp_path)
    stem = str(run_dir / "0")
    state = paddle.load(stem + ".pdopt")
    change(state)
    weights = {suffix: paddle.load(stem + suffix) for suffix in (".pdparams", ".pdema")}
    checkpoint.save_checkpoint(stem, {**weights, ".pdopt": state})
    before = files(run_dir)
    capsys.readouterr()
    code = train_main(["-c", str(runs[mode]["config"]), "-r", stem, "-o", f"output_dir={tmp_path}"])
    one_line(capsys, code, pattern)
    assert files(run_dir) == before


def test_the_swa_weights_are_checked_like_the_ema_weights(runs, tmp_path):
    cfg = read_config(str(runs["paddle_ema"]["config"]), [f"output_dir={tmp_path}", "use_swa=true"])
    trainer = check_config(cfg, do_eval=False)
    raw = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    swa = {**raw, "classifier.3.bias": paddle.full([10], float("inf"))}
    trainer._snapshot_weights = lambda: (raw, raw, swa)
    trainer.global_step = 7
    with pytest.raises(NonFiniteError, match=r"the SWA weights at step 7 \(epoch 1\): 'classifier.3.bias' holds NaN or "
                                             r"Inf; nothing is written"):
        trainer._snapshot(0, final=False)
    assert not list(tmp_path.iterdir())


def test_average_and_export_refuse_nan_weights(runs, tmp_path, capsys):
    run_dir = copy_run(runs["paddle_ema"], tmp_path)
    state = paddle.load(str(run_dir / "0.pdparams"))
    state["classifier.3.bias"] = paddle.full([10], float("nan"))
    checkpoint.save_checkpoint(str(run_dir / "0"), {".pdparams": state, **{s: paddle.load(str(run_dir / ("0" + s)))
                                                                        for s in (".pdema", ".pdopt")}})
    before = files(run_dir)
    capsys.readouterr()
    code = average_main([str(run_dir / "0.pdparams"), str(run_dir / "model_final.pdparams"), "--bn", "average",
                         "--output", str(tmp_path / "avg.pdparams")])
    one_line(capsys, code, r"checkpoint to average .*/0.pdparams: 'classifier.3.bias' holds NaN or Inf; nothing is "
                           r"written")
    assert not (tmp_path / "avg.pdparams").exists()
    code = export_main(["-c", str(runs["paddle_ema"]["config"]), "-o", f"weights={run_dir / '0.pdparams'}",
                        "--output_dir", str(tmp_path / "export")])
    one_line(capsys, code, r"the weights .*/0.pdparams: 'classifier.3.bias' holds NaN or Inf; nothing is written")
    assert not list((tmp_path / "export").glob("*")) if (tmp_path / "export").exists() else True
    assert files(run_dir) == before
