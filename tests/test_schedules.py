import math
from dataclasses import dataclass

import numpy as np
import paddle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ema_model import decay_closed_form
from paddle_ema import ConfigError, ExponentialMovingAverage
from paddle_ema.schedules import SCHEDULES, Constant, Exponential, Power, Schedule, Threshold, make_schedule, register_schedule


def test_closed_form_values():
    assert Constant(0.99)(0) == 0.99 and Constant(0.99)(10**6) == 0.99
    # (1 + t) / (10 + t): 0.1 at t=0, 0.5 at t=8, then capped by decay.
    assert Threshold(0.9998)(0) == pytest.approx(0.1, abs=0)
    assert Threshold(0.9998)(8) == 0.5
    assert Threshold(0.9)(80) == 0.9  # 81/90 = 0.9 exactly reaches the cap
    assert Threshold(0.9)(10**4) == 0.9
    assert Exponential(0.9998)(0) == 0.9998 * (1.0 - math.exp(-1.0 / 2000.0))
    assert Exponential(0.5, tau=1.0)(1) == 0.5 * (1.0 - math.exp(-2.0))
    # 1 - (1 + 7) ** (-2/3) = 1 - 1/4
    assert Power(0.9999)(7) == pytest.approx(0.75, abs=1e-15)
    assert Power(0.9999)(0) == 0.0
    assert Power(0.9999, min_decay=0.3)(0) == 0.3
    assert Power(0.9, inv_gamma=1.0, power=1.0)(10**6) == 0.9


@pytest.mark.parametrize("name", ["constant", "threshold", "exponential", "power"])
def test_tensor_formula_matches_host_formula(name):
    schedule = make_schedule(name, 0.999, **({"tau": 50.0} if name == "exponential" else {}))
    steps = np.array([0, 1, 2, 5, 17, 100, 999, 12345], np.float32)
    got = schedule.tensor(paddle.to_tensor(steps)).numpy()
    want = np.array([schedule(int(t)) for t in steps])
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(["constant", "threshold", "exponential", "power"]),
    decay=st.floats(0.0, 1.0),
    t=st.integers(0, 10**7),
)
def test_schedules_match_independent_formulas_and_stay_in_range(name, decay, t):
    schedule = make_schedule(name, decay)
    d = schedule(t)
    assert d == pytest.approx(decay_closed_form(name, t, decay), rel=1e-12, abs=1e-15)
    assert 0.0 <= d <= decay
    if name != "constant":
        assert schedule(t + 1) >= d  # warm-ups only ever grow towards decay


def test_make_schedule_errors_name_what_is_allowed():
    with pytest.raises(ConfigError, match=r"unknown decay schedule 'expo'; allowed: .*exponential"):
        make_schedule("expo", 0.99)
    with pytest.raises(ConfigError, match=r"decay must be a number in \[0, 1\], got 1.5"):
        make_schedule("threshold", 1.5)
    with pytest.raises(ConfigError, match="tau must be a number > 0"):
        make_schedule("exponential", 0.99, tau=0)
    with pytest.raises(ConfigError, match="min_decay .* must not exceed decay"):
        Power(0.5, min_decay=0.6)
    with pytest.raises(ConfigError, match=r"takes the options .*not \['tau'\]"):
        make_schedule("power", 0.99, tau=3)
    with pytest.raises(ConfigError, match="either a Schedule instance or"):
        make_schedule(Constant(0.9), 0.8)


def test_registry_is_extensible_from_user_code():
    @register_schedule("test_step_down")
    @dataclass(frozen=True)
    class StepDown(Schedule):
        """0.5 for ten updates, then decay."""

        def formula(self, t, m):
            return 0.5 if t < 10 else self.decay

    try:
        assert SCHEDULES["test_step_down"] is StepDown
        model = paddle.nn.Linear(2, 1)
        ema = ExponentialMovingAverage(model, 0.9, schedule="test_step_down")
        decays = [ema.update() for _ in range(12)]
        assert decays == [0.5] * 10 + [0.9, 0.9]
        with pytest.raises(ConfigError, match="already registered"):
            register_schedule("threshold")(StepDown)
    finally:
        SCHEDULES.pop("test_step_down", None)


def test_schedule_for_decay_type_maps_paddledetection_names():
    from paddle_ema.schedules import schedule_for_decay_type

    # PaddleDetection's three: 'exponential' with its hard-coded tau = 2000, 'normal' a constant.
    exponential = schedule_for_decay_type("exponential", 0.9998)
    assert exponential(0) == 0.9998 * (1.0 - math.exp(-1.0 / 2000.0))
    assert schedule_for_decay_type("exponential", 0.5, tau=1.0)(1) == 0.5 * (1.0 - math.exp(-2.0))
    assert schedule_for_decay_type("normal", 0.99)(10**6) == 0.99
    assert schedule_for_decay_type("threshold", 0.9998)(8) == 0.5
    # Options go only to the schedule that takes them (a config carries all of them).
    assert schedule_for_decay_type("threshold", 0.9, tau=5.0, power=1.0) == Threshold(0.9)
    assert schedule_for_decay_type("power", 0.9, inv_gamma=1.0, power=1.0, tau=5.0)(10**6) == 0.9
    assert schedule_for_decay_type("power", 0.9999, min_decay=0.3)(0) == 0.3
    with pytest.raises(ConfigError, match=r"ema_decay_type 'expo' is not allowed; allowed: .*exponential"):
        schedule_for_decay_type("expo", 0.99)
