"""NaN and Inf in the weights: the dygraph EMA's skip/raise/update policy, named and counted; the
one NonfinitePolicy every front-end and the engine decide with (its cadence, restarts, refusals);
the guard through the fused one-pass update; and the policy in the trainer's own steps (cycle
restarts, BatchNorm recalibration, ema_impl: ppdet, mode: static).

No run exits 0 with a NaN average (each in dygraph, ema_impl: ppdet and mode: static): settings
under which the average never moves are refused before training (a decay of 1), a diverging run
stops before it writes NaN weights, a .pdopt whose EMA shadow is NaN or of another shape is
refused by -r; each is one line, exit 2, and the run's files stay byte for byte."""

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import paddle
import pytest

from ema_model import EMAModel
from paddle_helpers import as_numpy, set_weights, snapshot
from paddle_ema import ConfigError, ExponentialMovingAverage, NonFiniteError, checkpoint
from paddle_ema.config import FIELDS
from paddle_ema.engine import read_config
from paddle_ema.engine.cli import average_main, export_main, train_main
from paddle_ema.engine.ema_setup import build_ema
from paddle_ema.engine.runs import check_config


def _steps(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"0.weight": rng.standard_normal((4, 3)), "0.bias": rng.standard_normal(3), "2.weight": rng.standard_normal((3, 2))} for _ in range(n)]


def _model():
    return paddle.nn.Sequential(paddle.nn.Linear(4, 3), paddle.nn.ReLU(), paddle.nn.Linear(3, 2))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_weights_are_skipped_counted_and_named(bad):
    model = _model()
    ema = ExponentialMovingAverage(model, 0.9, thres_steps=False)
    reference = EMAModel(snapshot(model), lambda t: 0.9)
    poisoned_calls = {3, 4, 7}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for call, weights in enumerate(_steps(10)):
            if call in poisoned_calls:
                weights = {**weights, "2.weight": weights["2.weight"].copy()}
                weights["2.weight"][1, 0] = bad
            set_weights(model, weights)
            got = ema.update()
            if call in poisoned_calls:
                assert got is None
            else:
                # the decay follows the call counter; the float64 model sees only the clean calls
                assert got == reference.update(snapshot(model))
    assert ema.num_nonfinite_skipped == 3 and ema.num_updates == 7
    for name in ema.names:
        value = as_numpy(ema.average(name))
        assert np.isfinite(value).all()
        np.testing.assert_allclose(value, reference.average()[name], rtol=1e-5, atol=1e-6)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1  # warned at the first skip only (then at 10, 100, every 1000)
    assert "EMA update at call 3 skipped: parameter '2.weight' holds NaN or Inf (1 update(s) skipped" in messages[0]
    assert ema.state_dict()["num_nonfinite_skipped"] == 3


def test_raise_policy_and_update_policy():
    model = _model()
    ema = ExponentialMovingAverage(model, 0.9, nonfinite="raise")
    weights = _steps(1)[0]
    weights["0.bias"][2] = np.nan
    set_weights(model, weights)
    with pytest.raises(NonFiniteError, match="update\\(\\) at call 0: parameter '0.bias' holds NaN or Inf"):
        ema.update()
    unchecked = ExponentialMovingAverage(model, 0.9, nonfinite="update")
    unchecked.update()
    assert np.isnan(unchecked.average("0.bias").numpy()[2])
    with pytest.raises(ConfigError, match=r"nonfinite must be one of \['skip', 'raise', 'update'\], got 'ignore'"):
        ExponentialMovingAverage(model, nonfinite="ignore")


def test_copy_phase_is_guarded_too():
    model = _model()
    ema = ExponentialMovingAverage(model, 0.9, start_step=5)
    clean = snapshot(model, np.float32)
    weights = _steps(1)[0]
    weights["0.weight"][0, 0] = np.inf
    set_weights(model, weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ema.update() is None
    assert np.array_equal(ema.average("0.weight").numpy(), clean["0.weight"])


# --- NonfinitePolicy, the one object every front-end and the engine decide with -----------------

from paddle_ema.core.nonfinite import NonfinitePolicy  # noqa: E402


def test_policy_warns_at_1_10_100_and_every_1000_and_counts_every_skip():
    policy = NonfinitePolicy("skip")
    assert policy.checks
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3001):
            policy.skip("raised", "skipped")
    assert policy.skipped == 3001
    counts = [int(str(w.message).split("(")[1].split()[0]) for w in caught]
    assert counts == [1, 10, 100, 1000, 2000, 3000]
    assert all(w.filename == __file__ for w in caught)  # the caller's line, not the package's
    assert str(caught[1].message) == ("skipped (10 update(s) skipped so far; warnings repeat at 10, 100 and "
                                      "every 1000)")
    policy.reset()
    assert policy.skipped == 0


def test_policy_raise_update_and_the_modes_a_front_end_offers():
    with pytest.raises(NonFiniteError, match="^raised here$"):
        NonfinitePolicy("raise").skip("raised here", "not this")
    assert not NonfinitePolicy("update").checks
    with pytest.raises(ConfigError, match=r"nonfinite must be one of \['update', 'skip'\], got 'raise'"):
        NonfinitePolicy("raise", modes=("update", "skip"))
    with pytest.raises(ConfigError, match="^only skip, got 'update'$"):
        NonfinitePolicy("update", modes=("skip",), refused="only skip, got {mode!r}")


def test_policy_restart_copy_and_refusal():
    assert NonfinitePolicy("update").allow_copy("m", skip_note="; n")
    with pytest.raises(NonFiniteError, match="^m$"):
        NonfinitePolicy("raise").allow_copy("m", skip_note="; n")
    with pytest.warns(RuntimeWarning, match="^m; n$"):
        assert NonfinitePolicy("skip").allow_copy("m", skip_note="; n") is False
    with pytest.raises(NonFiniteError, match="^m \\(raise\\)$"):
        NonfinitePolicy("raise").refuse("m", raise_note=" (raise)", skip_note="; kept")
    for mode in ("skip", "update"):
        with pytest.warns(RuntimeWarning, match="^m; kept$"):
            NonfinitePolicy(mode).refuse("m", raise_note=" (raise)", skip_note="; kept")


def test_policy_reports_a_total_counted_elsewhere_when_it_grew():
    policy = NonfinitePolicy("skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for total in (0, 2, 2, 5, 5, 4):
            policy.report_total(total, lambda count: f"{count} so far")
    assert [str(w.message) for w in caught] == ["2 so far", "5 so far"]


def test_ema_takes_a_policy_object_and_shares_its_count():
    model = _model()
    policy = NonfinitePolicy("skip")
    ema = ExponentialMovingAverage(model, 0.9, nonfinite=policy)
    assert ema.nonfinite_policy is policy and ema.nonfinite == "skip"
    weights = _steps(1)[0]
    weights["0.weight"][0, 0] = np.nan
    set_weights(model, weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ema.update()
    assert policy.skipped == ema.num_nonfinite_skipped == 1
    ema.num_nonfinite_skipped = 7  # the engine carries the count across a restart
    assert policy.skipped == 7


# --- the EMA's guard through the fused one-pass update (kernel-level tests: test_guard_fused.py) --

from paddle_ema.kernels import fused  # noqa: E402

needs_fused = pytest.mark.skipif(not fused.available(), reason="the fused extension cannot be built here")


def _guard_model():
    paddle.seed(0)
    return paddle.nn.Sequential(paddle.nn.Linear(200, 400), paddle.nn.ReLU(), paddle.nn.Linear(400, 300))


def _guarded_run(nonfinite, poisoned=()):
    model = _guard_model()
    ema = ExponentialMovingAverage(model, 0.99, nonfinite=nonfinite)
    rng = np.random.default_rng(0)
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for call in range(8):
            with paddle.no_grad():
                for p in model.parameters():
                    p.set_value(p + paddle.to_tensor(rng.standard_normal(p.shape).astype("float32") * 0.01))
                saved = None
                if call in poisoned:
                    saved = model[2].weight.numpy().copy()
                    bad = saved.copy()
                    bad[7, 11] = np.nan
                    model[2].weight.set_value(bad)
            results.append(ema.update())
            if saved is not None:
                with paddle.no_grad():
                    model[2].weight.set_value(saved)
    return ema, results


@needs_fused
def test_ema_shadows_bit_identical_with_guard_on_and_off_on_a_finite_run():
    on, decays_on = _guarded_run("skip")
    off, decays_off = _guarded_run("update")
    raised, decays_raise = _guarded_run("raise")
    assert decays_on == decays_off == decays_raise
    for name in on.names:
        a = on.average(name).numpy().view(np.uint32)
        assert np.array_equal(a, off.average(name).numpy().view(np.uint32)), name
        assert np.array_equal(a, raised.average(name).numpy().view(np.uint32)), name


def _large_guard_model():
    paddle.seed(0)
    return paddle.nn.Sequential(paddle.nn.Linear(1500, 1500), paddle.nn.Linear(1500, 10))  # 9 MB


@needs_fused
def test_ema_guarded_update_uses_apply_spares_and_swaps_stay_exact():
    model = _large_guard_model()
    ema = ExponentialMovingAverage(model, 0.9)
    plain = ExponentialMovingAverage(_large_guard_model(), 0.9, nonfinite="update")
    rng = np.random.default_rng(3)
    for step in range(5):
        with paddle.no_grad():
            for p, q in zip(model.parameters(), plain._model.parameters()):
                v = paddle.to_tensor(rng.standard_normal(p.shape).astype("float32"))
                p.set_value(v)
                q.set_value(v)
        raw = [p.numpy().copy() for p in model.parameters()]
        ema.update()
        plain.update()
        # the update's second buffers are apply()'s spares: one extra copy in all
        assert ema._kernel.spares is not None and ema._kernel.scratch_like(ema._params) is ema._kernel.spares
        if step == 0:  # the two sets of buffers, which the averages alternate between
            buffers = {0: [s.data_ptr() for s in ema._shadows], 1: [s.data_ptr() for s in ema._kernel.spares]}
        assert [a.data_ptr() for a in ema._shadows] == buffers[step % 2]
        state = ema.state_dict()["shadow"]
        with ema.apply():
            for name, p in zip(ema.names, model.parameters()):
                assert np.array_equal(p.numpy(), plain.average(name).numpy())
                assert np.array_equal(state[name].numpy(), plain.average(name).numpy())
        for p, r in zip(model.parameters(), raw):
            assert np.array_equal(p.numpy(), r)
    for name in ema.names:
        assert np.array_equal(ema.average(name).numpy().view(np.uint32), plain.average(name).numpy().view(np.uint32))


@needs_fused
def test_ema_skip_and_raise_policies_through_the_fused_guard():
    skipped, decays = _guarded_run("skip", poisoned={2, 5})
    assert decays[2] is None and decays[5] is None and skipped.num_nonfinite_skipped == 2
    assert skipped.num_updates == 6
    assert all(np.isfinite(skipped.average(n).numpy()).all() for n in skipped.names)
    with pytest.raises(NonFiniteError, match="update\\(\\) at call 2: parameter '2.weight' holds NaN or Inf"):
        _guarded_run("raise", poisoned={2})
    unchecked, _ = _guarded_run("update", poisoned={2})
    assert np.isnan(unchecked.average("2.weight").numpy()[7, 11])


# --- the policy in the trainer's own steps, and no NaN average written by a run --------------------

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
