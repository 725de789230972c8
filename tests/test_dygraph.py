import re

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from ema_model import EMAModel, decay_closed_form
from hypothesis import given, settings
from hypothesis import strategies as st
from paddle_helpers import as_numpy, set_weights, snapshot
from processes import rss_bytes

from paddle_ema import (
    ConfigError,
    EMAStateError,
    ExponentialMovingAverage,
    IncompatibleStateError,
    SelectionError,
    kernels,
)


class ConvBN(paddle.nn.Layer):
    """A conv layer with BatchNorm and a classifier: trainable weights and BN statistics."""

    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(1, 4, 3, padding=1)
        self.bn = paddle.nn.BatchNorm2D(4)
        self.fc = paddle.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def train_steps(model, ema, steps, lr=0.05, record=None, seed=0):
    """SGD-with-momentum steps on random 8x8 images; after each step ema.update() and a weight record."""
    rng = np.random.default_rng(seed)
    opt = paddle.optimizer.Momentum(learning_rate=lr, momentum=0.9, parameters=model.parameters())
    model.train()
    for _ in range(steps):
        x = paddle.to_tensor(rng.standard_normal((8, 1, 8, 8)).astype("float32"))
        y = paddle.to_tensor(rng.integers(0, 10, (8,)).astype("int64"))
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.clear_grad()
        ema.update()
        if record is not None:
            record.append(snapshot(model))


def trainable_names(model):
    return [n for n, p in model.named_parameters() if not p.stop_gradient]


def test_seed_tutorial_loop_lenet_adam():
    """The seed tutorial's loop (LeNet, Adam, register/update/apply/restore), checked against the model."""
    model = paddle.vision.models.LeNet()
    ema = ExponentialMovingAverage(model, 0.9998)
    ema.register()
    reference = EMAModel(snapshot(model), lambda t: decay_closed_form("threshold", t, 0.9998))
    optim = paddle.optimizer.Adam(learning_rate=0.001, parameters=model.parameters())
    rng = np.random.default_rng(1)
    for _ in range(6):
        x = paddle.to_tensor(rng.standard_normal((16, 1, 28, 28)).astype("float32"))
        y = paddle.to_tensor(rng.integers(0, 10, (16, 1)).astype("int64"))
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optim.step()
        optim.clear_grad()
        decay = ema.update()
        assert decay == reference.update(snapshot(model))
    raw = snapshot(model)
    ema.apply()
    applied = snapshot(model)
    for name, want in reference.average().items():
        np.testing.assert_allclose(applied[name], want, rtol=1e-5, atol=1e-6)
    assert any(not np.array_equal(applied[n], raw[n]) for n in raw)
    ema.restore()
    for name, value in snapshot(model).items():
        assert np.array_equal(value, raw[name])


def test_bn_statistics_are_skipped_by_default_and_stay_live():
    model = ConvBN()
    ema = ExponentialMovingAverage(model, 0.9, thres_steps=False)
    assert ema.names == trainable_names(model)
    assert "bn._mean" not in ema.names and "bn._variance" not in ema.names
    train_steps(model, ema, 5)
    live_mean, live_var = model.bn._mean.numpy().copy(), model.bn._variance.numpy().copy()
    assert not np.allclose(live_mean, 0.0)  # training moved them, so the check below means something
    with ema.apply():
        assert np.array_equal(model.bn._mean.numpy(), live_mean)
        assert np.array_equal(model.bn._variance.numpy(), live_var)


def test_bn_statistics_are_averaged_when_asked():
    model = ConvBN()
    ema = ExponentialMovingAverage(model, 0.8, thres_steps=False, include_stop_gradient=True)
    assert "bn._mean" in ema.names and "bn._variance" in ema.names
    reference = EMAModel(snapshot(model), lambda t: 0.8)
    history = []
    train_steps(model, ema, 6, record=history)
    for weights in history:
        reference.update(weights)
    for name in ("bn._mean", "bn._variance", "conv.weight"):
        np.testing.assert_allclose(as_numpy(ema.average(name)), reference.average()[name], rtol=1e-5, atol=1e-6)
    with ema.apply():
        np.testing.assert_allclose(model.bn._mean.numpy(), reference.average()["bn._mean"], rtol=1e-5, atol=1e-7)


def test_exclude_by_substring_and_regex_and_unmatched_pattern_is_an_error():
    model = ConvBN()
    ema = ExponentialMovingAverage(model, exclude=["bias", "re:^fc\\."])
    assert ema.names == ["conv.weight", "bn.weight"]
    ema = ExponentialMovingAverage(model, exclude=re.compile(r"bn\.(weight|bias)$"))
    assert ema.names == ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    with pytest.raises(SelectionError, match=r"\['bais'\] match no averaged parameter.*conv\.weight"):
        ExponentialMovingAverage(model, exclude=["bias", "bais"])
    with pytest.raises(SelectionError, match="not a valid regular expression"):
        ExponentialMovingAverage(model, exclude=["re:("])
    with pytest.raises(ConfigError, match="no parameters to average"):
        ExponentialMovingAverage(model, exclude=["re:."])


def weights_sequence(shapes, n, seed):
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(n)]


def drive(layer, ema, sequence, reference=None, steps=None):
    """Set the layer's weights to each element of `sequence` and call update() (and the model's)."""
    for i, weights in enumerate(sequence):
        set_weights(layer, weights)
        step = None if steps is None else steps[i]
        got = ema.update(step=step)
        if reference is not None:
            want = reference.update(snapshot(layer), step=step)
            assert got == want


@settings(max_examples=40, deadline=None)
@given(
    schedule=st.sampled_from(["constant", "threshold", "exponential", "power"]),
    decay=st.floats(0.0, 0.999),
    bias_correction=st.booleans(),
    update_every=st.integers(1, 4),
    start_step=st.integers(0, 5),
    n=st.integers(0, 25),
    seed=st.integers(0, 2**16),
)
def test_matches_float64_model(schedule, decay, bias_correction, update_every, start_step, n, seed):
    layer = paddle.nn.Linear(3, 2)
    options = {"tau": 7.0} if schedule == "exponential" else {}
    ema = ExponentialMovingAverage(
        layer,
        decay,
        schedule=schedule,
        schedule_options=options,
        bias_correction=bias_correction,
        update_every=update_every,
        start_step=start_step,
    )
    reference = EMAModel(
        snapshot(layer),
        lambda t: decay_closed_form(schedule, t, decay, **options),
        bias_correction,
        update_every,
        start_step,
    )
    drive(layer, ema, weights_sequence({"weight": [3, 2], "bias": [2]}, n, seed), reference)
    assert ema.num_updates == reference.updates
    assert ema.decay_product == pytest.approx(reference.product, rel=1e-12)
    for name, want in reference.average().items():
        np.testing.assert_allclose(as_numpy(ema.average(name)), want, rtol=2e-5, atol=2e-6)


def test_constant_weight_stays_exactly_constant():
    layer = paddle.nn.Linear(4, 3)
    constant = {n: np.random.standard_normal(v.shape) for n, v in snapshot(layer).items()}
    set_weights(layer, constant)
    exact = snapshot(layer, np.float32)
    for bias_correction in (False, True):
        ema = ExponentialMovingAverage(layer, 0.999, schedule="power", bias_correction=bias_correction)
        for _ in range(200):
            ema.update()
        for name, value in exact.items():
            assert np.array_equal(ema.average(name).numpy(), value)


def test_bias_correction_divides_by_the_product_of_the_decays_applied():
    # A warm-up schedule, where prod(d_i) and d_last ** t differ a lot.
    layer = paddle.nn.Linear(2, 2)
    ema = ExponentialMovingAverage(layer, 0.99, schedule="exponential", schedule_options={"tau": 5.0}, bias_correction=True)
    n = 10
    sequence = weights_sequence({"weight": [2, 2], "bias": [2]}, n, seed=3)
    drive(layer, ema, sequence)
    decays = [decay_closed_form("exponential", t, 0.99, tau=5.0) for t in range(n)]
    biased = sum(
        (1 - d) * np.prod(decays[t + 1 :]) * seq["weight"] for t, (d, seq) in enumerate(zip(decays, sequence))
    )
    exact = biased / (1 - np.prod(decays))
    wrong = biased / (1 - decays[-1] ** n)  # decay_t ** t: Paddle's static EMA and PaddleDetection
    got = ema.average("weight").numpy()
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-6)
    assert np.abs(got - wrong).max() > 1e-2  # the two corrections really differ here
    assert ema.decay_product == pytest.approx(np.prod(decays), rel=1e-13)


def test_first_bias_corrected_update_takes_the_weights_whole():
    layer = paddle.nn.Linear(2, 2)
    ema = ExponentialMovingAverage(layer, 0.9999, thres_steps=False, bias_correction=True)
    target = weights_sequence({"weight": [2, 2], "bias": [2]}, 1, seed=5)
    drive(layer, ema, target)
    assert np.array_equal(ema.average("weight").numpy(), snapshot(layer, np.float32)["weight"])
    with pytest.raises(ConfigError, match="bias_correction needs decay < 1"):
        ExponentialMovingAverage(layer, 1.0, bias_correction=True)


def test_update_every_and_start_step_keep_counter_and_decay_consistent():
    layer = paddle.nn.Linear(2, 1)
    ema = ExponentialMovingAverage(layer, 0.999, update_every=3, start_step=4)
    sequence = weights_sequence({"weight": [2, 1], "bias": [1]}, 14, seed=9)
    decays = []
    for weights in sequence:
        set_weights(layer, weights)
        decays.append(ema.update())
    # calls 0-3 copy, then every third call from 4 averages, with t = 0, 1, 2, ...
    assert decays == [None] * 4 + [0.1, None, None, 2 / 11, None, None, 3 / 12, None, None, 4 / 13]
    assert ema.num_calls == 14 and ema.num_updates == 4


def test_external_step_counter_drives_the_decay():
    layer = paddle.nn.Linear(2, 1)
    ema = ExponentialMovingAverage(layer, 0.999)
    assert ema.update(step=100) == 101 / 110
    assert ema.num_calls == 101 and ema.update() == 102 / 111
    ema = ExponentialMovingAverage(layer, 0.999, update_every=10)
    assert ema.update(step=25) is None and ema.update(step=30) == 4 / 13
    with pytest.raises(ConfigError, match="step must be an integer >= 0"):
        ema.update(step=-1)


def test_apply_restore_round_trip_is_bit_exact_and_guards_misuse():
    model = ConvBN()
    ema = ExponentialMovingAverage(model, 0.9, thres_steps=False)
    train_steps(model, ema, 4)
    raw = snapshot(model, np.float32)
    with pytest.raises(EMAStateError, match="restore\\(\\) without a matching apply\\(\\)"):
        ema.restore()
    ema.apply()
    assert ema.is_applied
    assert np.array_equal(model.conv.weight.numpy(), ema.average("conv.weight").numpy())
    with pytest.raises(EMAStateError, match="update\\(\\) while EMA weights are applied"):
        ema.update()
    ema.apply()  # a second apply keeps the raw weights saved by the first
    ema.restore()
    assert not ema.is_applied
    for name, value in snapshot(model, np.float32).items():
        assert np.array_equal(value, raw[name]), name
    with pytest.raises(EMAStateError):
        ema.restore()


def test_context_manager_restores_even_when_the_body_raises():
    model = ConvBN()
    ema = ExponentialMovingAverage(model, 0.9, thres_steps=False)
    train_steps(model, ema, 3)
    raw = snapshot(model, np.float32)
    with pytest.raises(ZeroDivisionError):
        with ema.apply() as applied:
            assert applied is ema
            assert np.array_equal(model.fc.weight.numpy(), ema.average("fc.weight").numpy())
            with ema.apply():  # nested: the inner exit must not restore under the outer block
                pass
            assert ema.is_applied
            1 / 0
    assert not ema.is_applied
    for name, value in snapshot(model, np.float32).items():
        assert np.array_equal(value, raw[name]), name


def test_apply_without_restore_leaves_ema_weights_for_export():
    model = ConvBN()
    ema = ExponentialMovingAverage(model, 0.9, thres_steps=False)
    train_steps(model, ema, 3)
    with ema.apply(need_restore=False):
        pass
    assert not ema.is_applied
    assert np.array_equal(model.fc.weight.numpy(), ema.average("fc.weight").numpy())
    with pytest.raises(EMAStateError, match="need_restore=False"):
        ema.restore()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_model_gets_float32_shadows(dtype):
    layer = paddle.nn.Linear(4, 3)
    layer.to(dtype=dtype)
    ema = ExponentialMovingAverage(layer, 0.99, thres_steps=False)
    assert all(ema.average(n).dtype == paddle.float32 for n in ema.names)
    reference = EMAModel(snapshot(layer), lambda t: 0.99)
    sequence = weights_sequence({"weight": [4, 3], "bias": [3]}, 50, seed=4)
    drive(layer, ema, sequence, reference)
    for name, want in reference.average().items():
        # The float32 shadow follows the float64 model of the half-precision values closely;
        # a half-precision shadow would be off by its rounding step (~1e-3 relative).
        np.testing.assert_allclose(as_numpy(ema.average(name)), want, rtol=1e-5, atol=1e-6)
    with ema.apply():
        assert layer.weight.dtype == getattr(paddle, dtype)
        want = kernels.cast(paddle.to_tensor(reference.average()["weight"].astype(np.float32)), dtype)
        assert np.array_equal(as_numpy(layer.weight), as_numpy(want))


def test_shadow_on_another_device():
    layer = paddle.nn.Linear(3, 3)
    ema = ExponentialMovingAverage(layer, 0.9, device="cpu")
    assert all(ema.average(n).place.is_cpu_place() for n in ema.names)
    drive(layer, ema, weights_sequence({"weight": [3, 3], "bias": [3]}, 3, seed=0))
    with pytest.raises(ConfigError, match="device must be"):
        ExponentialMovingAverage(layer, device="tpu:7")


def test_dataparallel_wrapped_model_has_the_same_names_and_state():
    bare = ConvBN()
    wrapped = paddle.DataParallel(bare)
    ema_wrapped = ExponentialMovingAverage(wrapped, 0.9)
    ema_bare = ExponentialMovingAverage(bare, 0.9)
    assert ema_wrapped.names == ema_bare.names == trainable_names(bare)
    train_steps(bare, ema_wrapped, 3)
    ema_bare.set_state_dict(ema_wrapped.state_dict())
    for name in ema_bare.names:
        assert np.array_equal(ema_bare.average(name).numpy(), ema_wrapped.average(name).numpy())
    with ema_wrapped.apply():
        assert np.array_equal(bare.fc.weight.numpy(), ema_bare.average("fc.weight").numpy())


@pytest.mark.parametrize(
    "options",
    [
        {"decay": 0.99},
        {"decay": 0.999, "schedule": "power", "bias_correction": True},
        {"decay": 0.99, "schedule": "exponential", "schedule_options": {"tau": 5.0}, "update_every": 3, "start_step": 4},
    ],
)
def test_resume_is_bitwise_exact(tmp_path, options):
    total, split = 23, 11

    def run(model, ema, steps, seed):
        train_steps(model, ema, steps, seed=seed)

    paddle.seed(7)
    model = ConvBN()
    initial = {k: v.copy() for k, v in snapshot(model, np.float32).items()}
    ema = ExponentialMovingAverage(model, **options)
    run(model, ema, split, seed=1)
    paddle.save({"model": model.state_dict(), "ema": ema.state_dict()}, str(tmp_path / "ckpt.pd"))
    run(model, ema, total - split, seed=2)
    straight = {n: ema.average(n).numpy().copy() for n in ema.names}

    paddle.seed(8)
    fresh = ConvBN()  # other initial weights: everything must come from the checkpoint
    set_weights(fresh, initial)
    fresh_ema = ExponentialMovingAverage(fresh, **options)
    state = paddle.load(str(tmp_path / "ckpt.pd"))
    fresh.set_state_dict(state["model"])
    fresh_ema.set_state_dict(state["ema"])
    run(fresh, fresh_ema, total - split, seed=2)
    for name in ema.names:
        assert np.array_equal(fresh_ema.average(name).numpy(), straight[name]), name
    assert fresh_ema.num_calls == ema.num_calls and fresh_ema.decay_product == ema.decay_product


def test_state_dict_holds_what_resuming_needs():
    model = ConvBN()
    ema = ExponentialMovingAverage(model, 0.99, schedule="exponential", update_every=2)
    train_steps(model, ema, 5)
    state = ema.state_dict()
    assert list(state["shadow"]) == ema.names
    assert state["num_calls"] == 5 and state["num_updates"] == 3
    assert state["decay_product"] == pytest.approx(np.prod([decay_closed_form("exponential", t, 0.99) for t in range(3)]))
    assert state["settings"] == {
        "schedule": {"name": "exponential", "decay": 0.99, "tau": 2000.0},
        "bias_correction": False,
        "update_every": 2,
        "start_step": 0,
    }


def test_incompatible_state_is_a_clear_error_listing_the_differences():
    model = ConvBN()
    ema = ExponentialMovingAverage(model, 0.99)
    state = ema.state_dict()

    other = paddle.nn.Sequential(paddle.nn.Linear(3, 4))
    with pytest.raises(IncompatibleStateError, match=r"missing parameters \['0.weight', '0.bias'\]; unexpected parameters \['conv.weight'"):
        ExponentialMovingAverage(other).set_state_dict(state)

    class Wider(ConvBN):
        def __init__(self):
            super().__init__()
            self.fc = paddle.nn.Linear(4 * 8 * 8, 12)

    with pytest.raises(IncompatibleStateError, match=r"fc.weight: shape \[256, 10\] in the state, \[256, 12\] here"):
        ExponentialMovingAverage(Wider(), 0.99).set_state_dict(state)

    with pytest.raises(IncompatibleStateError, match=r"setting schedule.decay: 0.99 in the state, 0.9 here; setting update_every: 1 in the state, 2 here"):
        ExponentialMovingAverage(model, 0.9, update_every=2).set_state_dict(state)

    with pytest.raises(IncompatibleStateError, match="not a state dict of ExponentialMovingAverage"):
        ema.set_state_dict(model.state_dict())


def test_average_by_name():
    model = ConvBN()
    ema = ExponentialMovingAverage(model, 0.5, thres_steps=False)
    before = model.fc.bias.numpy().astype(np.float64)
    train_steps(model, ema, 1)
    after = model.fc.bias.numpy().astype(np.float64)
    np.testing.assert_allclose(ema.average("fc.bias").numpy(), 0.5 * before + 0.5 * after, rtol=1e-6)
    with pytest.raises(KeyError, match=r"did you mean \['fc.bias', "):
        ema.average("fc.biass")


def test_invalid_options_name_what_is_allowed():
    layer = paddle.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="update_every must be an integer >= 1, got 0"):
        ExponentialMovingAverage(layer, update_every=0)
    with pytest.raises(ConfigError, match="start_step must be an integer >= 0, got -2"):
        ExponentialMovingAverage(layer, start_step=-2)
    with pytest.raises(ConfigError, match="unknown decay schedule 'expo'"):
        ExponentialMovingAverage(layer, schedule="expo")



def test_updates_build_no_graph_and_memory_stays_flat_over_10000_updates():
    model = paddle.vision.models.LeNet()
    ema = ExponentialMovingAverage(model, 0.999)
    loss = model(paddle.rand([2, 1, 28, 28])).mean()
    loss.backward()  # gradients exist: an update that recorded autograd ops would grow the graph
    for _ in range(1000):
        ema.update()
    before = rss_bytes()
    for _ in range(9000):
        ema.update()
    growth = rss_bytes() - before
    assert ema.num_updates == 10000
    assert all(ema.average(n).stop_gradient for n in ema.names)
    # Any per-update allocation that is kept (a graph node, a copy) would add >= 61,706 floats
    # (LeNet's size) * 9,000 updates ~ 2 GB; allow allocator noise of a few MB.
    assert growth < 8 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB over 9,000 updates"


# --- rule= and policy=: the update rule and the step policy as objects ----------------------------

from paddle_ema.schedules import PowerFunction, make_schedule  # noqa: E402
from paddle_ema.step_policy import StepPolicy  # noqa: E402

from paddle_ema import EMARule, StochasticWeightAveraging  # noqa: E402


def _trained(make, steps=7, seed=4):
    paddle.seed(seed)
    model = paddle.nn.Sequential(paddle.nn.Linear(5, 4), paddle.nn.Linear(4, 3))
    ema = make(model)
    rng = np.random.default_rng(seed)
    decays = []
    for _ in range(steps):
        set_weights(model, {n: rng.standard_normal(p.shape) for n, p in model.named_parameters()})
        decays.append(ema.update())
    return ema, decays


def test_rule_and_policy_objects_give_the_keyword_forms_numbers():
    keywords, decays = _trained(lambda m: ExponentialMovingAverage(
        m, 0.9, schedule="exponential", schedule_options={"tau": 3.0}, bias_correction=True, update_every=2,
        start_step=1))
    objects, object_decays = _trained(lambda m: ExponentialMovingAverage(
        m, rule=EMARule(make_schedule("exponential", 0.9, tau=3.0), bias_correction=True),
        policy=StepPolicy(start_step=1, update_every=2)))
    assert object_decays == decays and objects.settings() == keywords.settings()
    for name in keywords.names:
        assert np.array_equal(objects.average(name).numpy().view(np.uint32),
                              keywords.average(name).numpy().view(np.uint32)), name
    swa, _ = _trained(lambda m: StochasticWeightAveraging(m, policy=StepPolicy(start_step=2, update_every=2)))
    plain_swa, _ = _trained(lambda m: StochasticWeightAveraging(m, start_step=2, update_every=2))
    assert swa.settings() == plain_swa.settings() and isinstance(swa.schedule, PowerFunction)
    for name in swa.names:
        assert np.array_equal(swa.average(name).numpy(), plain_swa.average(name).numpy()), name


def test_an_object_and_the_keywords_it_replaces_are_one_config_error():
    model = paddle.nn.Linear(3, 2)
    rule = EMARule(make_schedule("constant", 0.9))
    with pytest.raises(ConfigError, match=r"rule= replaces the keywords .* not both \(also given: decay, "
                                          r"bias_correction\)"):
        ExponentialMovingAverage(model, 0.9, rule=rule, bias_correction=False)
    with pytest.raises(ConfigError, match=r"policy= replaces the keywords \['start_step', 'update_every'\].*"
                                          r"also given: update_every"):
        ExponentialMovingAverage(model, policy=StepPolicy(), update_every=2)
    with pytest.raises(ConfigError, match="rule must be of type EMARule, got 0.9"):
        ExponentialMovingAverage(model, rule=0.9)
    with pytest.raises(ConfigError, match="policy must be of type StepPolicy, got"):
        ExponentialMovingAverage(model, policy={"update_every": 2})
    with pytest.raises(ConfigError, match=r"equal weight; it takes no \['rule'\]"):
        StochasticWeightAveraging(model, rule=rule)
