"""engine/average_protocol.py: every average the trainer keeps behind one protocol, and the one swap of a
state dict into a model (weights_loaded)."""

import numpy as np
import paddle
import pytest

from paddle_ema.config import FIELDS
from paddle_ema.engine.averages import EvaluatedAverage, TrainerAverage, weights_loaded
from paddle_ema.engine.distributed import Parallel
from paddle_ema.engine.ema_setup import build_ema
from paddle_ema.engine.extra_averages import TrainerSWA


class Net(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.fc = paddle.nn.Linear(3, 2)
        self.bn = paddle.nn.BatchNorm1D(2)


def config(**overrides):
    cfg = {key: spec.default for key, spec in FIELDS.items()}
    cfg.update({"use_ema": True, "ema_decay": 0.5, "ema_decay_type": "normal", **overrides})
    return cfg


def arrays(state):
    return {k: v.numpy().copy() for k, v in state.items()}


def set_weight(model, value):
    with paddle.no_grad():
        model.fc.weight.set_value(paddle.full([3, 2], value))


def test_weights_loaded_swaps_in_and_restores_bit_for_bit_with_the_mode():
    paddle.seed(0)
    model = Net()
    model.train()
    raw = arrays(model.state_dict())
    other = {k: paddle.full_like(v, 0.25) for k, v in model.state_dict().items()}
    with weights_loaded(model, other):
        assert all(np.all(v.numpy() == 0.25) for v in model.state_dict().values())
        model.eval()  # what an evaluation does inside
    after = arrays(model.state_dict())
    assert all(np.array_equal(after[k], raw[k]) for k in raw) and model.training


@pytest.mark.parametrize("impl", ["paddle_ema", "ppdet"])
def test_each_ema_adapter_swaps_in_its_snapshot_weights_and_a_swap_is_not_a_snapshot(impl):
    # Decay 0.5 from weights 1 then 3 (paddle_ema: initialised from the weights, no correction):
    # a = 1 -> 1 + 0.5 * (3 - 1) = 2. ModelEMA starts from zero with its 1 - d**t correction:
    # s = 0.5 * 1 = 0.5 -> 0.25 + 1.5 = 1.75, corrected by 1 - 0.25: 7/3.
    paddle.seed(0)
    model = Net()
    set_weight(model, 1.0)
    handle = build_ema(config(ema_impl=impl, cycle_epoch=1), model)
    assert isinstance(handle, EvaluatedAverage) and isinstance(handle, TrainerAverage)
    if impl == "ppdet":
        handle.update(0)
    set_weight(model, 3.0)
    handle.update(1)
    expected = 2.0 if impl == "paddle_ema" else np.float32(1.75) / np.float32(0.75)
    raw = arrays(model.state_dict())
    for _ in range(2):  # with cycle_epoch 1 a snapshot would restart the average; swaps do not
        with handle.swapped():
            np.testing.assert_array_equal(model.fc.weight.numpy(), np.full([3, 2], expected, np.float32))
        assert all(np.array_equal(v, raw[k]) for k, v in arrays(model.state_dict()).items())
    assert handle.last_decay == 0.5
    weights = handle.snapshot()
    np.testing.assert_array_equal(weights["fc.weight"].numpy(), np.full([3, 2], expected, np.float32))


def test_the_swa_adapter_averages_from_its_start_and_round_trips_its_state():
    paddle.seed(0)
    model = Net()
    cfg = config(use_swa=True, epoch=4, swa_start_epoch=1, swa_every_epochs=1)
    swa = TrainerSWA(cfg, model, steps_per_epoch=2)  # averages after steps 3, 5, 7 (epoch ends from epoch 1)
    assert isinstance(swa, EvaluatedAverage) and swa.last_decay is None
    for step in range(8):
        set_weight(model, float(step))
        swa.update(step)
    with swa.swapped():
        np.testing.assert_allclose(model.fc.weight.numpy(), np.full([3, 2], (3 + 5 + 7) / 3), rtol=1e-7)
    restored = TrainerSWA(cfg, model, steps_per_epoch=2)
    restored.set_state_dict(swa.state_dict())
    np.testing.assert_array_equal(restored.snapshot()["fc.weight"].numpy(), swa.snapshot()["fc.weight"].numpy())


def test_the_running_statistics_synchronised_over_ranks_are_exactly_the_batchnorm_statistics(monkeypatch):
    import paddle.distributed as dist

    reduced = []
    monkeypatch.setattr(dist, "all_reduce", lambda t: reduced.append(int(t.numel())))
    parallel = Parallel.__new__(Parallel)
    parallel.world_size = 2
    model = paddle.nn.Sequential(paddle.nn.Conv2D(1, 3, 1), paddle.nn.BatchNorm2D(3), paddle.nn.LayerNorm(3),
                                 paddle.nn.BatchNorm1D(5))
    parallel.sync_running_stats(model)
    assert reduced == [2 * 3 + 2 * 5]  # BatchNorm2D's and BatchNorm1D's mean and variance, float32, one call


def test_the_static_adapter_records_its_settings_and_refuses_a_state_made_with_others(tmp_path):
    from pathlib import Path

    from paddle_ema.engine import read_config
    from paddle_ema.engine.runs import check_config
    from paddle_ema.errors import IncompatibleStateError

    config_file = Path(__file__).resolve().parents[1] / "configs" / "lenet_digits.yml"
    cfg = read_config(str(config_file), ["epoch=1", f"output_dir={tmp_path}", "LeNet.width=4", "LeNet.hidden=8",
                                         "mode=static", "ema_decay=0.9"])
    adapter = check_config(cfg, do_eval=False).ema
    assert isinstance(adapter, EvaluatedAverage)
    state = adapter.state_dict()
    assert state["ema"]["settings"] == {"schedule": {"name": "threshold", "decay": 0.9}, "bias_correction": False,
                                        "update_every": 1}
    adapter.set_state_dict(state)  # its own state fits
    state["ema"]["settings"]["update_every"] = 2
    with pytest.raises(IncompatibleStateError, match=r"setting update_every: 2 in the state, 1 here"):
        adapter.set_state_dict(state)
    del state["ema"]["settings"]  # a checkpoint from before settings were recorded still loads
    adapter.set_state_dict(state)
    assert paddle.in_dynamic_mode()
