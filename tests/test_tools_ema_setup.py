"""How config keys map onto the trainer's EMA (paddle_ema.ExponentialMovingAverage or ModelEMA)."""

import math

import paddle
import pytest

from paddle_ema.config import FIELDS
from paddle_ema.engine.ema_setup import build_ema, relative_distance
from paddle_ema.errors import SelectionError


class Net(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(1, 2, 3)
        self.bn = paddle.nn.BatchNorm2D(2)
        self.head = paddle.nn.Linear(2, 2)
        self.head.bias.stop_gradient = True  # a frozen parameter


def config(**overrides):
    cfg = {key: spec.default for key, spec in FIELDS.items()}
    cfg.update({"use_ema": True, **overrides})
    return cfg


def test_defaults_average_bn_statistics_like_paddledetection():
    ema = build_ema(config(), Net()).ema
    assert {"bn._mean", "bn._variance", "head.bias"} <= set(ema.names)
    assert ema.schedule.options() == {"name": "threshold", "decay": 0.9998}


def test_filter_no_grad_drops_frozen_parameters_but_keeps_bn_statistics():
    names = build_ema(config(ema_filter_no_grad=True), Net()).ema.names
    assert "head.bias" not in names and {"bn._mean", "bn._variance", "head.weight"} <= set(names)
    # without stop_gradient parameters in the average there is nothing to filter
    names = build_ema(config(ema_filter_no_grad=True, ema_include_stop_gradient=False), Net()).ema.names
    assert set(names) == {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "head.weight"}


def test_schedule_options_and_black_list():
    ema = build_ema(config(ema_decay_type="exponential", ema_tau=50.0, ema_decay=0.99,
                           ema_black_list=["head."]), Net()).ema
    assert ema.schedule(0) == pytest.approx(0.99 * (1 - math.exp(-1 / 50)), rel=1e-15)
    assert not any(name.startswith("head.") for name in ema.names)
    with pytest.raises(SelectionError, match="match no averaged parameter"):
        build_ema(config(ema_black_list=["nothing_like_this"]), Net())
    assert build_ema(config(use_ema=False), Net()) is None


def test_ppdet_impl_and_relative_distance():
    paddle.seed(0)
    model = Net()
    handle = build_ema(config(ema_impl="ppdet", ema_decay=0.9, ema_decay_type="normal"), model)
    handle.update()
    weights = handle.snapshot()  # one update from zeros, corrected by 1 - 0.9: the weights themselves
    raw = model.state_dict()
    assert relative_distance(weights, raw) == pytest.approx(0.0, abs=1e-6)
    doubled = {k: v * 2 for k, v in raw.items()}
    assert relative_distance(doubled, raw) == pytest.approx(1.0, rel=1e-6)
