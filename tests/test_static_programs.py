"""The old class's public programs: exe.run(ema.apply_program) / exe.run(ema.restore_program).

Paddle's `paddle.static.ExponentialMovingAverage` exposed both, and static training scripts run
them directly. Checked bitwise in PIR and legacy programs, next to the context-manager path, and
the pattern of Paddle's own test/legacy_test/test_ema.py (train, apply, compare with a numpy EMA
divided by 1 - decay**t) with paddle_ema's class.
"""

import numpy as np
import paddle
import pytest
from test_static import KINDS, batches, fc, regression_ema, scope_value, static_programs, train

from paddle_ema.static import ExponentialMovingAverage, clone_for_test


@pytest.mark.parametrize("kind", KINDS)
def test_apply_program_and_restore_program_round_trip_bitwise(kind):
    with static_programs(kind) as (main, startup):
        ema, exe = regression_ema(startup, 0.9)
        assert isinstance(ema.apply_program, type(main)) and isinstance(ema.restore_program, type(main))
        train(exe, main, batches(7), [])
        raw = {n: scope_value(n) for n in ema.names}
        averages = {n: scope_value(ema.shadow_name(n)) for n in ema.names}
        assert not np.array_equal(raw["fc.w"], averages["fc.w"])

        with ema.apply(exe):  # the context manager's weights
            managed = {n: scope_value(n) for n in ema.names}
        exe.run(ema.apply_program)
        for n in ema.names:
            np.testing.assert_array_equal(scope_value(n), averages[n])
            np.testing.assert_array_equal(scope_value(n), managed[n])
        exe.run(ema.restore_program)
        for n in ema.names:
            np.testing.assert_array_equal(scope_value(n), raw[n])
        # the old way round: run apply_program, then the method restore()
        exe.run(ema.apply_program)
        ema.restore(exe)
        for n in ema.names:
            np.testing.assert_array_equal(scope_value(n), raw[n])
        # training goes on from the raw weights and the next apply_program has the new averages
        train(exe, main, batches(3, seed=4), [])
        exe.run(ema.apply_program)
        for n in ema.names:
            np.testing.assert_array_equal(scope_value(n), scope_value(ema.shadow_name(n)))
        exe.run(ema.restore_program)


@pytest.mark.parametrize("kind", KINDS)
def test_restore_program_alone_after_a_fresh_start_is_refused_by_restore(kind):
    from paddle_ema.errors import EMAStateError

    with static_programs(kind) as (main, startup):
        ema, exe = regression_ema(startup, 0.9)
        with pytest.raises(EMAStateError, match="before any apply"):
            ema.restore(exe)


@pytest.mark.parametrize("kind", KINDS)
def test_paddles_own_ema_test_pattern(kind):
    # Paddle's test: fc(5 -> 10) with a named weight, a test program cloned before minimize, Adam,
    # 2 x 3 runs, then the test program under apply(); the applied weight equals the numpy EMA
    # of the six weights divided by 1 - decay**6.
    decay = 0.999
    with static_programs(kind) as (main, startup):
        x = paddle.static.data("x", [-1, 5], "float32")
        hidden = paddle.static.nn.fc(x, 10, weight_attr=paddle.ParamAttr(name="fc.weight"))
        cost = paddle.mean(hidden)
        if kind == "legacy":
            test_program, fetch = main.clone(for_test=True), [hidden.name]
        else:
            test_program, fetch = clone_for_test(main, [hidden])
        paddle.optimizer.Adam(learning_rate=0.001).minimize(cost)
        ema = ExponentialMovingAverage(decay)
        ema.update()
        exe = paddle.static.Executor(paddle.CPUPlace())
        exe.run(startup)
        rng = np.random.default_rng(0)
        params = []
        for _ in range(6):
            exe.run(main, feed={"x": rng.random((10, 5)).astype("float32")})
            params.append(scope_value("fc.weight"))
        with ema.apply(exe):
            final = scope_value("fc.weight")
            exe.run(test_program, feed={"x": rng.random((10, 5)).astype("float32")}, fetch_list=fetch)
        manual = np.zeros_like(final, dtype=np.float64)
        for p in params:
            manual = decay * manual + (1 - decay) * p
        # the program's decay is float32(0.999) (op attributes are float32)
        np.testing.assert_allclose(final, manual / (1.0 - decay ** len(params)), rtol=1e-5)
        np.testing.assert_array_equal(scope_value("fc.weight"), params[-1])


@pytest.mark.parametrize("kind", KINDS)
def test_skipped_runs_are_counted_and_warned_at_apply(kind):
    place = paddle.CPUPlace()
    with static_programs(kind) as (main, startup):
        ema, exe = regression_ema(startup, 0.9, place=place)
        assert ema.num_nonfinite_skipped() == 0
        data = batches(4)
        train(exe, main, data[:2], [])
        with ema.apply(exe):  # nothing skipped: no warning
            pass
        clean = {n: scope_value(n) for n in ema.names}
        bad = clean["fc.w"].copy()
        bad[0, 0] = np.nan
        paddle.static.global_scope().find_var("fc.w").get_tensor().set(bad, place)
        exe.run(main, feed={"x": data[2][0], "y": data[2][1]})
        for n, value in clean.items():
            paddle.static.global_scope().find_var(n).get_tensor().set(value, place)
        assert ema.num_nonfinite_skipped() == 1
        with pytest.warns(RuntimeWarning, match="skipped 1 update run"):
            with ema.apply(exe):
                pass
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the same count is not warned twice
            with ema.apply(exe):
                pass
