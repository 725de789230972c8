"""The static EMA's fused update (one paddle_ema_lerp_by_tensor op per shadow dtype) against its
built-in ops (set_kernel('reference')), in PIR and legacy programs.

The parameters are set from feeds (standing in for an optimizer step), so that a test controls
every value the EMA reads, NaN included. Both programs must give the same shadows bit for bit, and
both must match the float64 model of tests/ema_model.py.
"""

import collections

import numpy as np
import paddle
import pytest
from ema_model import EMAModel
from test_static import F32, KINDS, in_program, regression, scope_value, static_programs

from paddle_ema import kernels, program_ops
from paddle_ema.kernels import fused
from paddle_ema.static import ExponentialMovingAverage

# name, shape, dtype: a float32 tensor big enough for the multi-threaded path, half-precision
# parameters (float32 shadows) and a float64 one (its own group).
PARAMETERS = [
    ("w", [7, 5], "float32"),
    ("big", [70_001], "float32"),
    ("h", [6], "float16"),
    ("bf", [9], "bfloat16"),
    ("d", [4], "float64"),
]
DECAY = 0.5  # with thres_steps=True: min(0.5, (1 + t) / (10 + t)), both branches within 20 steps
CUSTOM_OP = {"pir": "custom_op.paddle_ema_lerp_by_tensor_", "legacy": "paddle_ema_lerp_by_tensor"}
CHECK_OP = {"pir": "custom_op.paddle_ema_all_finite", "legacy": "paddle_ema_all_finite"}


@pytest.fixture(autouse=True)
def _fused_built():
    assert fused.available(), fused.failure()
    yield
    kernels.set_kernel(None)


def op_names(program, kind):
    return [op.name() if kind == "pir" else op.type for op in program.global_block().ops]


def isfinite_ops(ops):
    return sum(count for name, count in ops.items() if "isfinite" in name)


def build(kind, mode, **ema_options):
    """Parameters set from feeds, then the EMA update built with kernel `mode`; returns the EMA."""
    for name, shape, dtype in PARAMETERS:
        feed = paddle.static.data(f"feed_{name}", shape, "float64" if dtype == "float64" else "float32")
        param = paddle.static.create_parameter(
            shape, dtype, name=name, default_initializer=paddle.nn.initializer.Constant(0.0)
        )
        paddle.assign(feed if dtype == feed.dtype else paddle.cast(feed, dtype), output=param)
        param.stop_gradient = False
    kernels.set_kernel(mode)
    ema = ExponentialMovingAverage(DECAY, thres_steps=True, **ema_options)
    ema.update()
    kernels.set_kernel(None)
    return ema


def feeds(runs, poisoned=(), seed=0):
    """Slowly drifting weights, as training makes them (a float32 average of wildly different
    numbers would lose digits to cancellation, which is not what is checked here)."""
    rng = np.random.default_rng(seed)
    start = {name: rng.standard_normal(shape) for name, shape, _ in PARAMETERS}
    drift = {name: rng.standard_normal(shape) * 0.05 for name, shape, _ in PARAMETERS}
    out = []
    for run in range(runs):
        feed = {}
        for name, shape, dtype in PARAMETERS:
            value = start[name] + run * drift[name] + 0.01 * rng.standard_normal(shape)
            feed[f"feed_{name}"] = value.astype("float64" if dtype == "float64" else "float32")
        if run in poisoned:  # a diverged step: one parameter holds NaN, another Inf
            feed["feed_h"][2] = np.nan
            feed["feed_big"][-1] = np.inf
        out.append(feed)
    return out


def run(kind, mode, data, **ema_options):
    """Builds and runs the program on `data`; (shadows, parameters after each run, state, ops)."""
    with static_programs(kind) as (main, startup):
        ema = build(kind, mode, **ema_options)
        exe = paddle.static.Executor(paddle.CPUPlace())
        exe.run(startup)
        history, shadows_after = [], []
        for feed in data:
            exe.run(main, feed=feed)
            history.append({n: scope_value(n) for n in ema.names})
            shadows_after.append({n: scope_value(ema.shadow_name(n)) for n in ema.names})
        state = {key: scope_value(name).item() for key, name in ema.state_names().items() if key != "shadows"}
        ops = collections.Counter(op_names(main, kind))
        return ema, history, shadows_after, state, ops


def bits(array):
    return array.view(np.uint64 if array.dtype == np.float64 else np.uint32)


def assert_same_bits(a, b):
    for name in a:
        np.testing.assert_array_equal(bits(a[name]), bits(b[name]), err_msg=name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("every", [1, 3])
def test_fused_equals_builtin_ops_and_the_float64_model(kind, every):
    runs, poisoned = 20, (4, 9)
    data = feeds(runs, poisoned)
    ema, history, fused_shadows, fused_state, fused_ops = run(kind, "fused", data, update_every=every)
    _, _, reference_shadows, reference_state, reference_ops = run(kind, "reference", data, update_every=every)

    # One op per shadow dtype (float32, float64) instead of ~3 ops and a where() per parameter,
    # and one check instead of isfinite + reduce_all per parameter.
    assert fused_ops[CUSTOM_OP[kind]] == 2
    assert reference_ops[CUSTOM_OP[kind]] == 0
    assert fused_ops[CHECK_OP[kind]] == 1 and isfinite_ops(fused_ops) == 0
    assert reference_ops[CHECK_OP[kind]] == 0 and isfinite_ops(reference_ops) == len(PARAMETERS)
    assert sum(fused_ops.values()) < sum(reference_ops.values()) - 3 * len(PARAMETERS)

    for fused_after, reference_after in zip(fused_shadows, reference_shadows):
        assert_same_bits(fused_after, reference_after)
    assert fused_state == reference_state
    assert fused_state["skipped"] == len(poisoned)
    assert fused_state["counter"] == runs

    # A skipped run leaves every shadow as it was, bit for bit.
    for run_index in poisoned:
        assert_same_bits(fused_shadows[run_index], fused_shadows[run_index - 1])
        assert all(np.isfinite(s).all() for s in fused_shadows[run_index].values())

    model = EMAModel(
        {n: np.zeros(1) for n in ema.names},
        lambda t: min(in_program(DECAY), (1.0 + t) / (10.0 + t)),
        bias_correction=True,
        update_every=every,
    )
    for run_index, weights in enumerate(history):
        if run_index not in poisoned:  # the counter still advances on a skipped run
            model.update(weights, step=run_index)
    np.testing.assert_allclose(fused_state["product"], model.product, rtol=1e-12)
    expected = model.average()
    for name in ema.names:
        np.testing.assert_allclose(fused_shadows[-1][name], expected[name], **F32, err_msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_first_update_takes_the_weights_exactly(kind):
    # Bias correction makes the first weight exactly 1: the shadows become the parameters.
    data = feeds(1, seed=3)
    ema, history, shadows, _, _ = run(kind, "fused", data)
    for name in ema.names:
        expected = history[0][name]
        if expected.dtype != np.float64:
            expected = expected.astype(np.float32)
        np.testing.assert_array_equal(bits(shadows[0][name]), bits(expected), err_msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_builtin_ops_off_the_cpu_or_in_reference_mode(kind, monkeypatch):
    for mode, on_cpu in (("fused", False), ("reference", True)):
        monkeypatch.setattr(program_ops, "runs_on_cpu", lambda: on_cpu)
        with static_programs(kind) as (main, _):
            build(kind, mode)
            assert CUSTOM_OP[kind] not in op_names(main, kind)
            assert CHECK_OP[kind] not in op_names(main, kind)


def test_expected_place_is_the_cpu_here():
    assert program_ops.runs_on_cpu()  # conftest sets the device to cpu


def test_legacy_clone_for_test_drops_the_fused_op():
    # Like the built-in update ops, it is marked as an optimizer op, which clone(for_test=True)
    # drops along with the backward.
    with static_programs("legacy") as (main, _):
        regression()
        kernels.set_kernel("fused")
        ExponentialMovingAverage(0.9).update()
        assert CUSTOM_OP["legacy"] in op_names(main, "legacy")
        assert CUSTOM_OP["legacy"] not in op_names(main.clone(for_test=True), "legacy")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("order", ["listed", "reversed"])  # last tensor: float64, then float32
@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_nonfinite_parameter_skips_the_run_like_the_builtin_check(kind, order, position, bad, monkeypatch):
    """The fused check (paddle_ema_all_finite) skips and counts exactly the runs the built-in
    ops do: NaN or Inf in any one parameter, whatever its place in the list and its dtype."""
    parameters = PARAMETERS if order == "listed" else PARAMETERS[::-1]
    monkeypatch.setitem(globals(), "PARAMETERS", parameters)  # read by build() and feeds()
    # The place in the list the op reads (PIR programs list parameters in their own order).
    with static_programs(kind):
        names = build(kind, "fused").names
    name = names[{"first": 0, "middle": len(names) // 2, "last": -1}[position]]
    runs, poisoned = 7, (2, 3, 5)
    data = feeds(runs, seed=11)
    for run_index in poisoned:
        data[run_index][f"feed_{name}"].flat[-1 if run_index != 3 else 0] = bad

    ema, _, fused_shadows, fused_state, fused_ops = run(kind, "fused", data)
    _, _, reference_shadows, reference_state, reference_ops = run(kind, "reference", data)
    assert ema.names == names
    assert fused_ops[CHECK_OP[kind]] == 1 and isfinite_ops(fused_ops) == 0
    assert isfinite_ops(reference_ops) == len(parameters)

    assert fused_state == reference_state
    assert fused_state["skipped"] == len(poisoned) and fused_state["counter"] == runs
    for fused_after, reference_after in zip(fused_shadows, reference_shadows):
        assert_same_bits(fused_after, reference_after)
    for run_index in poisoned:
        assert_same_bits(fused_shadows[run_index], fused_shadows[run_index - 1])
    assert all(np.isfinite(s).all() for s in fused_shadows[-1].values())


@pytest.mark.parametrize("kind", KINDS)
def test_parameters_the_check_cannot_read_keep_the_builtin_check(kind, monkeypatch):
    # A program has no fallback for a value the op refuses: such parameters keep isfinite ops
    # (the update stays fused).
    monkeypatch.setattr(program_ops, "FUSED_ALL_FINITE_DTYPES", ("float32", "float16", "bfloat16"))
    data = feeds(4, poisoned=(2,), seed=12)
    _, _, shadows, state, ops = run(kind, "fused", data)
    assert ops[CHECK_OP[kind]] == 0 and isfinite_ops(ops) == len(PARAMETERS)
    assert ops[CUSTOM_OP[kind]] == 2
    _, _, reference_shadows, reference_state, _ = run(kind, "reference", data)
    assert state == reference_state and state["skipped"] == 1
    for fused_after, reference_after in zip(shadows, reference_shadows):
        assert_same_bits(fused_after, reference_after)


@pytest.mark.parametrize("kind", KINDS)
def test_builtin_ops_keep_the_sign_of_an_underflowing_step_like_the_fused_op(kind):
    # shadow -0, parameter -1.4e-45, weight 0.25: w (x - a) underflows to -0 and -0 + -0 = -0 (the
    # fused op, paddle.lerp); a scale with its default bias of +0 would make the step +0 and the
    # shadow +0. The guard's where() picks the parameter without broadcasting (which adds zeros).
    start = np.array([-0.0, 0.0, -0.0, 1.0], "float32")
    step = np.array([-1.4e-45, 1.4e-45, 0.0, 3.0], "float32")
    results = {}
    for mode in ("fused", "reference"):
        with static_programs(kind) as (main, startup):
            feed = paddle.static.data("x", [4], "float32")
            param = paddle.static.create_parameter([4], "float32", name="p",
                                                   default_initializer=paddle.nn.initializer.Constant(0.0))
            paddle.assign(feed, output=param)
            param.stop_gradient = False
            kernels.set_kernel(mode)
            ema = ExponentialMovingAverage(0.75, bias_correction=False)
            ema.update()
            kernels.set_kernel(None)
            exe = paddle.static.Executor(paddle.CPUPlace())
            exe.run(startup)
            exe.run(main, feed={"x": start})  # the shadow takes the weights (incl. -0) below
            ema.start_from_weights(exe)
            exe.run(main, feed={"x": step})
            results[mode] = scope_value(ema.shadow_name("p")).copy()
    expected = (paddle.lerp(paddle.to_tensor(start), paddle.to_tensor(step), 0.25)).numpy()
    assert list(np.signbit(expected)) == [True, False, False, False]
    for mode, got in results.items():
        np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32), err_msg=mode)
