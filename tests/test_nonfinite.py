import warnings

import numpy as np
import paddle
import pytest

from ema_model import EMAModel
from paddle_helpers import as_numpy, set_weights, snapshot
from paddle_ema import ConfigError, ExponentialMovingAverage, NonFiniteError


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
