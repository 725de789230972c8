"""Saved states and settings the averages refuse, through the library's own loaders and constructors.

Every loader (ExponentialMovingAverage.set_state_dict, ModelEMA.load_ema_state / resume,
SimpleModelEMA.resume, PostHocEMA.set_state_dict) checks the whole state before it changes
anything: a bad entry is one IncompatibleStateError naming it, and afterwards the average, its
counters and the model are bit for bit what they were. Also: a parameter reshaped after
register(), thres_steps that is not a bool, a string black list, and decay settings under which
an average never moves (PaddleDetection's own arithmetic, tests/ppdet_oracle.py, turns those into
NaN)."""

import copy
import math
import re
import warnings

import numpy as np
import paddle
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from ppdet_oracle import ModelEMAOracle
from paddle_ema import ExponentialMovingAverage, kernels
from paddle_ema.errors import ConfigError, EMAStateError, IncompatibleStateError, SelectionError
from paddle_ema.posthoc import PostHocEMA
from paddle_ema.ppdet import ModelEMA, SimpleModelEMA


def net():
    return paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.ReLU(), paddle.nn.Linear(4, 2))


def perturb(model, rng):
    with paddle.no_grad():
        for p in model.parameters():
            p.set_value(p.numpy() + rng.standard_normal(p.shape).astype("float32"))


def bits(value):
    if isinstance(value, paddle.Tensor):
        value = value.numpy()
    if isinstance(value, np.ndarray):
        return value.dtype.str, value.shape, value.tobytes()
    if isinstance(value, dict):
        return {k: bits(v) for k, v in value.items()}
    return value


def ema_snapshot(ema):
    """Everything set_state_dict may change, bitwise."""
    return bits({**ema.state_dict(), "shadow": {n: ema.average(n) for n in ema.names}})


@pytest.fixture
def trained():
    """An EMA after a few updates, its state (copied) and a second EMA of another history."""
    paddle.seed(3)
    model, rng = net(), np.random.default_rng(0)
    ema = ExponentialMovingAverage(model, 0.9, bias_correction=True)
    for _ in range(4):
        perturb(model, rng)
        ema.update()
    state = ema.state_dict()
    state = {**state, "shadow": {k: v.clone() for k, v in state["shadow"].items()}}
    other = ExponentialMovingAverage(model, 0.9, bias_correction=True)
    perturb(model, rng)
    other.update()
    return model, state, other


NAME = "0.weight"
SHAPE = [3, 4]
BAD_ENTRIES = [
    ("num_calls", "abc", r"'num_calls' must be an integer >= 0, got 'abc'"),
    ("num_calls", -1, r"'num_calls' must be an integer >= 0, got -1"),
    ("num_updates", 2.0, r"'num_updates' must be an integer >= 0, got 2.0"),
    ("num_updates", True, r"'num_updates' must be an integer >= 0, got True"),
    ("num_nonfinite_skipped", -3, r"'num_nonfinite_skipped' must be an integer >= 0"),
    ("decay_product", 1.5, r"'decay_product' must be a number in \[0, 1\], got 1.5"),
    ("decay_product", float("nan"), r"'decay_product' must be a number in \[0, 1\], got nan"),
    ("decay_product", "0.5", r"'decay_product' must be a number in \[0, 1\], got '0.5'"),
    ("last_decay", -0.1, r"'last_decay' must be a number in \[0, 1\] or None, got -0.1"),
    ("settings", "x", r"'settings' must be a dict, got a str"),
    ("shadow", [1, 2], r"'shadow' must be a dict, got a list"),
]
BAD_SHADOWS = [
    (paddle.ones(SHAPE, "int64"), rf"'shadow' holds '{NAME}', which is int64; it must be floating point"),
    (np.ones(SHAPE, np.int32), rf"'shadow' holds '{NAME}', which is int32; it must be floating point"),
    (paddle.full(SHAPE, float("nan")), rf"'shadow' holds NaN or Inf in '{NAME}'"),
    (np.full(SHAPE, -np.inf, np.float32), rf"'shadow' holds NaN or Inf in '{NAME}'"),
    ("weights", rf"'shadow' holds '{NAME}', which is a str, not a tensor"),
    (paddle.ones([4, 3]), rf"{NAME}: shape \[4, 3\] in the state, \[3, 4\] here"),  # same size, never reshaped
    (paddle.ones([1, 4]), rf"{NAME}: shape \[1, 4\] in the state, \[3, 4\] here"),  # would broadcast
]


@pytest.mark.parametrize("key, value, message", BAD_ENTRIES, ids=[f"{k}={v!r}" for k, v, _ in BAD_ENTRIES])
def test_set_state_dict_refuses_a_bad_entry_and_changes_nothing(trained, key, value, message):
    _, state, other = trained
    before = ema_snapshot(other)
    with pytest.raises(IncompatibleStateError, match="the EMA state does not fit this EMA: .*" + message):
        other.set_state_dict({**state, key: value})
    assert ema_snapshot(other) == before


@pytest.mark.parametrize("value, message", BAD_SHADOWS, ids=lambda v: type(v).__name__ if not isinstance(v, str) else v[:20])
def test_set_state_dict_refuses_a_bad_shadow_and_changes_nothing(trained, value, message):
    _, state, other = trained
    before = ema_snapshot(other)
    with pytest.raises(IncompatibleStateError, match=message):
        other.set_state_dict({**state, "shadow": {**state["shadow"], NAME: value}})
    assert ema_snapshot(other) == before


def test_a_valid_state_still_loads_exactly(trained):
    _, state, other = trained
    other.set_state_dict(state)
    assert ema_snapshot(other) == bits({**state, "shadow": state["shadow"]})
    # float64 numpy shadows of a float32 EMA are cast, as before
    other.set_state_dict({**state, "shadow": {k: v.numpy().astype(np.float64) for k, v in state["shadow"].items()}})
    assert ema_snapshot(other) == bits(state)


# Values a corrupted or hand-edited state may hold where a counter, a fraction or a shadow belongs.
GARBAGE = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from([paddle.ones([3, 4], "int64"), paddle.full([3, 4], float("inf")), paddle.ones([12]),
                     np.zeros([3, 4], np.float16), paddle.ones([3, 4], "float64")]),
)


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(["num_calls", "num_updates", "decay_product", "last_decay", "num_nonfinite_skipped",
                            "settings", "shadow", f"shadow/{NAME}", "shadow/2.bias"]),
       value=GARBAGE)
def test_any_corrupted_entry_loads_whole_or_not_at_all(key, value):
    paddle.seed(1)
    model, rng = net(), np.random.default_rng(1)
    source = ExponentialMovingAverage(model, 0.9)
    perturb(model, rng)
    source.update()
    state = source.state_dict()
    if key.startswith("shadow/"):
        state = {**state, "shadow": {**state["shadow"], key[len("shadow/"):]: value}}
    else:
        state = {**state, key: value}
    target = ExponentialMovingAverage(model, 0.9)
    before = ema_snapshot(target)
    try:
        target.set_state_dict(state)
    except IncompatibleStateError as exc:
        assert "\n" not in str(exc)
        assert ema_snapshot(target) == before
        event("refused, nothing changed")
        return
    event("loaded")
    # Loaded: then every entry was one the loader may take, and the numbers are the state's.
    assert ema_snapshot(target) == bits({**state, "shadow": {n: target.average(n) for n in target.names},
                                         "num_nonfinite_skipped": state.get("num_nonfinite_skipped", 0)})
    for name, saved in state["shadow"].items():
        want = saved.numpy() if isinstance(saved, paddle.Tensor) else np.asarray(saved)
        assert np.isfinite(want).all()
        np.testing.assert_array_equal(target.average(name).numpy(), want.astype(np.float32))


def test_posthoc_set_state_dict_loads_every_profile_or_none(tmp_path):
    model = net()
    source = PostHocEMA(model, tmp_path / "a", sigma_rels=(0.05, 0.1), snapshot_every=100)
    rng = np.random.default_rng(2)
    for _ in range(3):
        perturb(model, rng)
        source.update()
    state = source.state_dict()
    target = PostHocEMA(model, tmp_path / "b", sigma_rels=(0.05, 0.1), snapshot_every=100)
    before = [ema_snapshot(e) for e in target.emas]
    broken = copy.deepcopy(state)
    broken["emas"][1]["num_calls"] = -1  # the second profile's state is bad: the first must not load either
    with pytest.raises(IncompatibleStateError, match=r"profile 1.*'num_calls' must be an integer >= 0, got -1"):
        target.set_state_dict(broken)
    assert [ema_snapshot(e) for e in target.emas] == before
    for bad, message in (({**state, "emas": state["emas"][:1]}, r"2 profiles, the state has 1"),
                         ({**state, "emas": "x"}, r"'emas' must be a list"), ("x", r"not a state dict")):
        with pytest.raises(IncompatibleStateError, match=message):
            target.set_state_dict(bad)
        assert [ema_snapshot(e) for e in target.emas] == before
    target.set_state_dict(state)
    assert [ema_snapshot(e) for e in target.emas] == [ema_snapshot(e) for e in source.emas]


# -- ModelEMA ----------------------------------------------------------------------------------------

def model_ema_snapshot(ema):
    return bits({"state": dict(ema.state_dict), "step": ema.step, "epoch": ema.epoch, "decay": ema.last_decay})


@pytest.fixture
def ppdet():
    paddle.seed(4)
    model, rng = net(), np.random.default_rng(3)
    ema = ModelEMA(model, 0.9, "threshold")
    for _ in range(3):
        perturb(model, rng)
        ema.update()
    state = ema.ema_state()
    state = {**state, "shadow": {k: v.clone() for k, v in state["shadow"].items()}}
    other = ModelEMA(model, 0.9, "threshold")
    perturb(model, rng)
    other.update()
    return model, state, other


@pytest.mark.parametrize("change, message", [
    ({"shadow/0.weight": paddle.ones([4, 3])}, r"0.weight: shape \[4, 3\] in the state, \[3, 4\] here"),
    ({"shadow/0.weight": paddle.ones([2, 6])}, r"0.weight: shape \[2, 6\] in the state, \[3, 4\] here"),
    ({"shadow/0.weight": paddle.ones([3, 4], "int64")}, r"'shadow' holds '0.weight', which is int64"),
    ({"shadow/2.bias": paddle.full([2], float("nan"))}, r"'shadow' holds NaN or Inf in '2.bias'"),
    ({"shadow/extra": paddle.ones([1])}, r"unexpected parameters \['extra'\]"),
    ({"step": -1}, r"'step' must be an integer >= 0, got -1"),
    ({"step": 2.5}, r"'step' must be an integer >= 0, got 2.5"),
    ({"epoch": "1"}, r"'epoch' must be an integer >= 0, got '1'"),
    ({"last_decay": None}, r"'last_decay' must be a number in \[0, 1\), got None"),  # after 3 updates
    ({"last_decay": 1.0}, r"'last_decay' must be a number in \[0, 1\), got 1.0"),  # apply() would divide by 0
])
def test_load_ema_state_refuses_a_bad_entry_and_changes_nothing(ppdet, change, message):
    _, state, other = ppdet
    state = {**state, "shadow": dict(state["shadow"])}
    for key, value in change.items():
        if key.startswith("shadow/"):
            state["shadow"][key[len("shadow/"):]] = value
        else:
            state[key] = value
    before = model_ema_snapshot(other)
    with pytest.raises(IncompatibleStateError, match=message):
        other.load_ema_state(state)
    assert model_ema_snapshot(other) == before


def test_load_ema_state_still_resumes_exactly(ppdet):
    model, state, other = ppdet
    other.load_ema_state(state)
    assert bits(other.ema_state()) == bits(state)


@pytest.mark.parametrize("kind", ["ModelEMA", "SimpleModelEMA"])
def test_resume_checks_every_entry_and_the_step_before_changing_anything(kind):
    paddle.seed(5)
    model = net()
    ema = ModelEMA(model, 0.9, "normal") if kind == "ModelEMA" else SimpleModelEMA(model, 0.9)
    ema.update() if kind == "ModelEMA" else ema.update(model)

    def snapshot():
        if kind == "ModelEMA":
            return model_ema_snapshot(ema)
        return bits({**ema.model.state_dict(), "step": getattr(ema, "step", None)})

    good = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    before = snapshot()
    for state, step, error, message in [
        ({**good, "2.bias": paddle.full([2], float("inf"))}, 1, IncompatibleStateError, r"'2.bias' holds NaN or Inf"),
        ({**good, "0.weight": paddle.ones([4, 3])}, 1, IncompatibleStateError, r"'0.weight' has shape \[4, 3\], \[3, 4\] here"),
        ({**good, "0.bias": paddle.ones([4], "int64")}, 1, IncompatibleStateError, r"'0.bias' is int64"),
        ({**good, "0.bias": "x"}, 1, IncompatibleStateError, r"'0.bias' is a str, not a tensor"),
        (good, -1, ConfigError, r"step must be an integer >= 0, got -1"),
        (good, 1.5, ConfigError, r"step must be an integer >= 0, got 1.5"),
        ([1], 1, IncompatibleStateError, r"the state is a list, not a dict"),
    ]:
        with pytest.raises(error, match=f"{kind}.resume: {message}"):
            ema.resume(state, step)
        assert snapshot() == before
    if kind == "SimpleModelEMA":
        with pytest.raises(IncompatibleStateError, match=r"SimpleModelEMA.resume: the state lacks \['2.bias'\]"):
            ema.resume({k: v for k, v in good.items() if k != "2.bias"}, 1)
        assert snapshot() == before
    ema.resume(good, 2)
    if kind == "ModelEMA":
        assert ema.step == 2 and ema.last_decay == 0.9
        shadows = {k: ema.state_dict[k] for k in ema.averaged}
    else:
        shadows = ema.model.state_dict()
    for name, value in good.items():
        np.testing.assert_array_equal(shadows[name].numpy(), value.numpy())


# -- shapes changed after register() ------------------------------------------------------------

@pytest.mark.parametrize("kernel", ["fused", "reference"])
@pytest.mark.parametrize("shape", [[4, 3], [2, 6], [3, 1]], ids=str)  # the same size in another shape; another size
@pytest.mark.parametrize("nonfinite", ["skip", "update"])
def test_a_parameter_reshaped_after_register_is_refused_at_update_and_apply(kernel, shape, nonfinite):
    paddle.seed(6)
    model = net()
    ema = ExponentialMovingAverage(model, 0.9, nonfinite=nonfinite)
    ema.update()
    with ema.apply():  # makes the spare buffers the guarded update writes into
        pass
    before = ema_snapshot(ema)
    weight = model[0].weight
    with paddle.no_grad():  # in place, as layer surgery does: the EMA holds the same parameter object
        if int(np.prod(shape)) == 12:
            weight.reshape_(shape)
        else:
            weight.copy_(paddle.ones(shape), False)  # Tensor.copy_ resizes its target
    assert list(weight.shape) == shape
    kernels.set_kernel(kernel)
    try:
        for where, call in (("update()", ema.update), ("update()", lambda: ema.update(step=7)), ("apply()", ema.apply)):
            with pytest.raises(EMAStateError, match=re.escape(
                    f"{where}: parameter '0.weight' has shape {shape}, its average [3, 4]: it was reshaped after "
                    "register(); nothing was changed")):
                call()
            assert ema_snapshot(ema) == before and not ema.is_applied
    finally:
        kernels.set_kernel(None)
    ema.register()  # the way on: a new average from the new shape
    ema.update()
    assert list(ema.average("0.weight").shape) == shape


# -- settings that are not what they look like --------------------------------------------------

@pytest.mark.parametrize("value", [0, 1, 0.0, "yes", None])
def test_thres_steps_must_be_a_bool(value):
    with pytest.raises(ConfigError, match=rf"thres_steps must be True \(the threshold warm-up\) or False \(a constant "
                                          rf"decay\), got {value!r}"):
        ExponentialMovingAverage(net(), 0.9, thres_steps=value)
    assert ExponentialMovingAverage(net(), 0.9, thres_steps=np.bool_(False)).schedule.name == "constant"


def test_a_string_black_list_is_refused_where_paddledetection_lists_every_key():
    model = net()
    keys = {k: v.numpy() for k, v in model.state_dict().items()}
    # PaddleDetection iterates the string's characters: every key holds a '.', so nothing is averaged.
    assert ModelEMAOracle(keys, ema_black_list="0.weight").black == set(keys)
    with pytest.raises(SelectionError, match=r"ema_black_list must be a list of substrings, got the string '0.weight'"
                                             r" .*write \['0.weight'\]"):
        ModelEMA(model, ema_black_list="0.weight")
    assert ModelEMA(model, ema_black_list=["0.weight"]).averaged == ["0.bias", "2.weight", "2.bias"]


NEVER_MOVING = [
    ("normal", dict(decay=1.0)),
    ("constant", dict(decay=1.0)),
    ("power", dict(decay=1.0, min_decay=1.0)),
    ("exponential", dict(decay=1.0, tau=0.01)),  # 1 - exp(-100) is 1.0 in float64
]


@pytest.mark.parametrize("schedule, options", NEVER_MOVING, ids=[s for s, _ in NEVER_MOVING])
def test_a_schedule_that_never_moves_is_refused_by_every_front_end(schedule, options):
    decay = options.pop("decay")
    message = rf"the \w+ schedule \(decay=1.0.*\) has decay 1 from its first update on: the average would never move"
    with pytest.raises(ConfigError, match=message):
        ExponentialMovingAverage(net(), decay, schedule=schedule, schedule_options=options)
    if schedule in ("normal", "constant"):  # ModelEMA's ema_decay_type takes no options
        with pytest.raises(ConfigError, match=message):
            ModelEMA(net(), decay, schedule)
        # What PaddleDetection computes there: shadows that stay 0, divided by 1 - 1**t = 0.
        model = net()
        oracle = ModelEMAOracle({k: v.numpy() for k, v in model.state_dict().items()}, decay, schedule)
        oracle.update({k: v.numpy() for k, v in model.state_dict().items()})
        with np.errstate(invalid="ignore", divide="ignore"):
            assert all(np.isnan(v).all() for v in oracle.apply({}).values())


def test_decays_just_below_one_still_average():
    model = net()
    ema = ModelEMA(model, math.nextafter(1.0, 0.0), "normal")
    ema.update()
    assert all(np.isfinite(v.numpy()).all() for v in ema.apply().values())
    ExponentialMovingAverage(model, 1.0)  # 'threshold': (1+t)/(10+t) < 1 whatever the cap
    ExponentialMovingAverage(model, 1.0, schedule="exponential")  # tau 2000: d(0) = 1 - exp(-1/2000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelEMA(model, 1.0, "exponential")  # never divides: PaddleDetection's numbers are finite
