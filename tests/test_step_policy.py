"""The step policy against a second, independent path: simulating the calls one by one."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paddle_ema.errors import ConfigError
from paddle_ema.step_policy import AVERAGE, COPY, SKIP, StepPolicy


def simulate(start_step, update_every, calls):
    """Walk the calls with counters (no modular arithmetic): the reference the policy must match."""
    actions, t, since = [], 0, None
    for call in range(calls):
        if call < start_step:
            actions.append((COPY, None))
            continue
        since = 0 if since is None else since + 1
        if since == update_every:
            since = 0
        if since == 0:
            actions.append((AVERAGE, t))
            t += 1
        else:
            actions.append((SKIP, None))
    return actions


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 30), st.integers(1, 9), st.integers(0, 80))
def test_action_matches_a_call_by_call_walk(start_step, update_every, calls):
    policy = StepPolicy(start_step=start_step, update_every=update_every)
    expected = simulate(start_step, update_every, calls)
    assert [tuple(policy.action(c)) for c in range(calls)] == expected
    averaged = [t for kind, t in expected if kind == AVERAGE]
    assert policy.num_updates(calls) == len(averaged)
    assert policy.last_step(calls) == (averaged[-1] if averaged else None)


def test_examples_from_the_docstring():
    policy = StepPolicy(start_step=100, update_every=4)
    assert tuple(policy.action(99)) == (COPY, None)
    assert tuple(policy.action(100)) == (AVERAGE, 0)
    assert tuple(policy.action(101)) == (SKIP, None)
    assert tuple(policy.action(104)) == (AVERAGE, 1)


def test_restarts():
    assert [StepPolicy(restart_every=3).restarts_after(n) for n in range(1, 8)] == [
        False, False, True, False, False, True, False]
    assert not any(StepPolicy().restarts_after(n) for n in range(1, 20))


@pytest.mark.parametrize("field,value", [("start_step", -1), ("update_every", 0), ("update_every", True),
                                         ("restart_every", 1.5), ("start_step", "3")])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        StepPolicy(**{field: value})


def test_tensor_step_agrees_with_action():
    import paddle

    policy = StepPolicy(update_every=3)
    calls = paddle.arange(0, 20, dtype="int64")
    averages, t = policy.tensor_step(calls)
    for c in range(20):
        kind, step = policy.action(c)
        assert bool(averages[c]) == (kind == AVERAGE)
        if kind == AVERAGE:
            assert float(t[c]) == step


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 6), st.integers(1, 4), st.lists(st.integers(0, 3), min_size=1, max_size=12))
def test_dygraph_ema_follows_the_policy(start_step, update_every, jumps):
    """Each update(step=c) of the dygraph EMA copies, skips or averages with the decay of the
    policy's t, also when an external step jumps (the walk above gives the policy's answers)."""
    import paddle

    from paddle_ema import ExponentialMovingAverage

    paddle.seed(0)
    layer = paddle.nn.Linear(2, 2)
    ema = ExponentialMovingAverage(layer, decay=0.9, start_step=start_step, update_every=update_every,
                                   nonfinite="update")
    assert ema.policy == StepPolicy(start_step=start_step, update_every=update_every)
    calls, call = [], -1
    for jump in jumps:
        call += 1 + jump
        calls.append(call)
    walk = simulate(start_step, update_every, calls[-1] + 1)
    for c in calls:
        kind, t = walk[c]
        decay = ema.update(step=c)
        if kind == AVERAGE:
            assert decay == min(0.9, (1.0 + t) / (10.0 + t))
        else:
            assert decay is None
        if kind == COPY:
            assert ema.num_updates == 0
