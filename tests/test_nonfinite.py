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
