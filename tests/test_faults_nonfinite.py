"""The non-finite policy (`ema_nonfinite: skip|raise|update`) in the trainer's own steps: a
cycle_epoch restart never copies NaN weights into the average (and keeps the skip count),
ema_update_bn never returns or saves NaN BatchNorm statistics, and ema_impl: ppdet gets the policy.

The ppdet test needs ModelEMA's `nonfinite` keyword (helper i12's change to paddle_ema/ppdet.py);
on a branch without it, build_ema fails with TypeError there."""

import warnings

import numpy as np
import paddle
import pytest

from paddle_ema.config import FIELDS
from paddle_ema.engine import read_config
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


def test_ppdet_impl_honours_ema_nonfinite():  # needs ModelEMA(nonfinite=...), helper i12's change
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
