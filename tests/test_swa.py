import numpy as np
import paddle
import pytest

from ema_model import EMAModel
from paddle_helpers import as_numpy, set_weights, snapshot
from paddle_ema import ConfigError, ExponentialMovingAverage, StochasticWeightAveraging
from paddle_ema.schedules import PowerFunction


def _sequence(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"weight": rng.standard_normal((3, 2)), "bias": rng.standard_normal(2)} for _ in range(n)]


def test_swa_is_the_equal_weight_mean_of_the_averaged_steps():
    layer = paddle.nn.Linear(3, 2)
    swa = StochasticWeightAveraging(layer, start_step=4, update_every=3)
    sequence = _sequence(20)
    stored = []
    for weights in sequence:
        set_weights(layer, weights)
        stored.append(snapshot(layer))
        swa.update()
    averaged_calls = [c for c in range(20) if c >= 4 and (c - 4) % 3 == 0]  # 4, 7, 10, 13, 16, 19
    want = np.mean([stored[c]["weight"] for c in averaged_calls], axis=0)
    np.testing.assert_allclose(as_numpy(swa.average("weight")), want, rtol=1e-6, atol=1e-7)
    assert swa.num_updates == len(averaged_calls)
    assert swa.state_dict()["format"] == "paddle_ema.StochasticWeightAveraging"


def test_power_function_profile_weights_follow_tau_to_the_gamma():
    # After n updates the weight of update tau (1-based) is (1 - d(tau-1)) * prod_{s >= tau} d(s):
    # with d(t) = (t / (t + 1)) ** (gamma + 1) the product telescopes to (tau / n) ** (gamma + 1).
    gamma, n = 2.0, 12
    schedule = PowerFunction(gamma=gamma)
    layer = paddle.nn.Linear(1, 1)
    ema = ExponentialMovingAverage(layer, schedule=schedule)
    reference = EMAModel(snapshot(layer), schedule)
    for weights in _sequence(n, seed=3):
        set_weights(layer, {"weight": weights["weight"][:1, :1], "bias": weights["bias"][:1]})
        assert ema.update() == reference.update(snapshot(layer))
    decays = [schedule(t) for t in range(n)]
    profile = [(1 - decays[tau - 1]) * np.prod(decays[tau:]) for tau in range(1, n + 1)]
    exact = [(tau / n) ** (gamma + 1) - ((tau - 1) / n) ** (gamma + 1) for tau in range(1, n + 1)]
    np.testing.assert_allclose(profile, exact, rtol=1e-12)
    np.testing.assert_allclose(as_numpy(ema.average("weight")), reference.average()["weight"], rtol=1e-6)


def test_swa_takes_no_decay_settings():
    with pytest.raises(ConfigError, match=r"equal weight; it takes no \['decay', 'schedule'\]"):
        StochasticWeightAveraging(paddle.nn.Linear(1, 1), decay=0.9, schedule="power")
