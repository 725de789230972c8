"""paddle_ema.dropin.ppocr.ModelEMA: PaddleOCR's ModelEMA bit for bit.

1. Against the numpy oracle of PaddleOCR's arithmetic (tests/suite_oracles.py, itself checked
   against Paddle's ops and PaddleOCR's class) over 64 updates of a model with conv, BatchNorm2D,
   BatchNorm3D, linear, a frozen weight, a tied head and an int64 buffer, in float32 and as a
   float16 model (its BatchNorm in float32, as AMP O2 keeps it): every constructor setting, both
   kernels, apply() every few updates, and a resume in the middle through a file, the way the
   trainer saves and loads `state_dict_for_save()`.
2. The off-switches (all_batchnorm, restore_last_decay), the non-finite option, and
   set_state_dict's checks.
3. Against PaddleOCR's own class when `ppocr` is importable (a PaddleOCR checkout on PYTHONPATH;
   PaddleOCR is not on the package registry), skipped with the reason otherwise.
"""

import numpy as np
import paddle
import pytest

import suite_oracles as so
from paddle_ema.dropin.ppocr import ModelEMA
from paddle_ema.errors import ConfigError, IncompatibleStateError, NonFiniteError
import test_ppdet_bitwise
from test_ppdet_bitwise import assert_bitwise
from test_suite_oracles import SuiteNet, check_state, numpy_state, suite_class, train_step

kernel = test_ppdet_bitwise.kernel  # the fused/reference fixture

pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


class OCRNet(SuiteNet):
    """SuiteNet (conv, BatchNorm2D, linear, frozen weight) with a tied head, an int64 buffer and a
    BatchNorm3D, whose statistics PaddleOCR's ema_filter_no_grad black-lists."""

    def __init__(self):
        super().__init__(tied=True, int_buffer=True)
        self.bn3 = paddle.nn.BatchNorm3D(2)


def make_model(dtype="float32"):
    """The model in `dtype`; BatchNorm layers stay float32 (Paddle creates them so), as under AMP O2."""
    paddle.seed(0)
    paddle.set_default_dtype(dtype)
    try:
        return OCRNet()
    finally:
        paddle.set_default_dtype("float32")


# PaddleOCR's ema_filter_no_grad list for OCRNet: the frozen weight and the BatchNorm3D statistics.
PPOCR_BLACK = {"frozen", "bn3._mean", "bn3._variance"}

SETTINGS = [
    dict(),
    dict(ema_decay_type="exponential", gamma=500),
    dict(ema_decay_type="normal", decay=0.99),
    dict(decay=0.9, ema_filter_no_grad=True),
    dict(decay=0.9, ema_filter_no_grad=True, all_batchnorm=True),
    dict(decay=0.999, restore_last_decay=True),
]


def ids(settings):
    return "-".join(f"{k}={v}" for k, v in settings.items()) or "defaults"


def black_for(settings):
    if not settings.get("ema_filter_no_grad"):
        return set()
    return {"frozen"} if settings.get("all_batchnorm") else PPOCR_BLACK


def oracle(values, settings):
    options = {k: v for k, v in settings.items() if k in ("decay", "gamma", "ema_decay_type")}
    return so.PaddleOCROracle(values, black=black_for(settings), **options)


def save_and_load(ema, path):
    """The trainer's checkpoint round trip: paddle.save(state_dict_for_save()), paddle.load."""
    paddle.save(ema.state_dict_for_save(), str(path))
    return paddle.load(str(path))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("settings", SETTINGS, ids=ids)
def test_bitwise_against_the_oracle(settings, dtype, kernel, tmp_path):
    model, rng = make_model(dtype), np.random.default_rng(21)
    ema = ModelEMA(model, **settings)
    ref = oracle(numpy_state(model), settings)
    assert ema.ema_black_list == ref.black
    check_state(ema.apply(), ref.apply(), "apply at t = 0")
    for t in range(64):
        train_step(model, rng)
        ema.update(model)
        ref.update(numpy_state(model))
        assert ema.step == ref.step
        check_state(ema.state_dict, ref.state, f"update {t}")
        if t % 5 == 4:
            applied = ema.apply()
            check_state(applied, ref.apply(), f"apply after update {t}")
            assert all(applied[k].dtype == paddle.float32 for k in applied if k not in ref.black)  # no cast back
            check_state(ema.state_dict, ref.state, "apply() changes nothing")
        if t == 31:  # a resume from the checkpoint file, into a new EMA
            before = {k: v.numpy().copy() for k, v in ema.apply().items()}
            loaded = save_and_load(ema, tmp_path / "ema.pdparams")
            ema = ModelEMA(model, **settings)
            ema.set_state_dict(loaded)
            saved = ref.state_dict_for_save()
            ref = oracle(numpy_state(model), settings)
            ref.set_state_dict({"ema_state": dict(saved["ema_state"]), "step": saved["step"]})
            check_state(ema.state_dict, ref.state, "resumed")
            applied = ema.apply()
            if settings.get("restore_last_decay"):  # the apply() of the run that saved it
                for key, value in before.items():
                    assert_bitwise(applied[key].numpy(), value, f"apply after an exact resume: {key}")
            else:  # PaddleOCR's: the constructor's decay until the next update
                check_state(applied, ref.apply(), "apply right after the resume")
    check_state(ema.apply(), ref.apply(), "final apply")


def test_the_default_decay_after_a_resume_is_the_constructors(tmp_path):
    """The quirk restore_last_decay turns off, with numbers: at t = 32 the threshold's last decay
    is 32/41, while PaddleOCR's apply() after set_state_dict divides by 1 - 0.9998**32."""
    model, rng = make_model(), np.random.default_rng(22)
    ema = ModelEMA(model)
    for _ in range(32):
        train_step(model, rng)
        ema.update(model)
    assert ema._decay == 32 / 41
    shadow = ema.state_dict["fc.weight"].numpy().copy()
    resumed = ModelEMA(model)
    resumed.set_state_dict(save_and_load(ema, tmp_path / "e.pdparams"))
    assert_bitwise(resumed.apply()["fc.weight"].numpy(), so.divide(shadow, 1 - 0.9998**32), "constructor's decay")
    exact = ModelEMA(model, restore_last_decay=True)
    exact.set_state_dict(save_and_load(ema, tmp_path / "e.pdparams"))
    assert_bitwise(exact.apply()["fc.weight"].numpy(), so.divide(shadow, 1 - (32 / 41) ** 32), "last decay")
    assert np.abs(resumed.apply()["fc.weight"].numpy()).max() > 5 * np.abs(exact.apply()["fc.weight"].numpy()).max()


def test_all_batchnorm_keeps_batchnorm3d_statistics_averaged():
    model, rng = make_model(), np.random.default_rng(23)
    frozen_default = ModelEMA(model, ema_filter_no_grad=True)
    fixed = ModelEMA(model, ema_filter_no_grad=True, all_batchnorm=True)
    start = model.state_dict()["bn3._mean"].numpy().copy()
    for _ in range(5):
        train_step(model, rng)
        frozen_default.update(model)
        fixed.update(model)
    assert_bitwise(frozen_default.apply()["bn3._mean"].numpy(), start, "PaddleOCR: frozen at construction")
    assert not np.array_equal(fixed.apply()["bn3._mean"].numpy(), start)
    assert fixed.ema_black_list == {"frozen"}


def test_black_list_on_a_data_parallel_wrapper_is_paddleocrs():
    """On a DataParallel wrapper PaddleOCR's names carry `_layers.`: they match no state-dict key."""
    model = paddle.DataParallel(make_model())
    ema = ModelEMA(model, ema_filter_no_grad=True)
    assert ema.ema_black_list == {"_layers." + name for name in PPOCR_BLACK}
    assert all(paddle.all(v == 0) for v in ema.state_dict.values())  # every entry averaged from zeros


def test_nonfinite_option():
    model, rng = make_model(), np.random.default_rng(24)
    plain, skip, raising = ModelEMA(model), ModelEMA(model, nonfinite="skip"), ModelEMA(model, nonfinite="raise")
    ref = oracle(numpy_state(model), {})
    for _ in range(3):
        train_step(model, rng)
        for ema in (plain, skip, raising):
            ema.update(model)
        ref.update(numpy_state(model))
    good = {k: v.numpy().copy() for k, v in skip.state_dict.items()}
    with paddle.no_grad():
        model.fc.weight[0, 0] = float("nan")
    plain.update(model)
    ref.update(numpy_state(model))
    check_state(plain.state_dict, ref.state, "'update' averages the NaN in, as PaddleOCR")
    with pytest.warns(RuntimeWarning, match="fc.weight"):
        skip.update(model)
    check_state(skip.state_dict, good, "'skip' changes nothing")
    assert (skip.step, skip.num_nonfinite_skipped) == (3, 1)
    with pytest.raises(NonFiniteError, match="fc.weight"):
        raising.update(model)
    assert raising.step == 3


def test_set_state_dict_checks_everything_first(tmp_path):
    model, rng = make_model(), np.random.default_rng(25)
    ema = ModelEMA(model)
    train_step(model, rng)
    ema.update(model)
    good = {"ema_state": {k: v.clone() for k, v in ema.state_dict.items()}, "step": 1}
    before = {k: v.numpy().copy() for k, v in ema.state_dict.items()}

    def variant(change):
        state = {"ema_state": dict(good["ema_state"]), "step": good["step"]}
        change(state)
        return state

    cases = {
        "lacks": variant(lambda s: s["ema_state"].pop("fc.bias")),
        "has": variant(lambda s: s["ema_state"].update(extra=paddle.zeros([1]))),
        "shape": variant(lambda s: s["ema_state"].update({"fc.bias": paddle.zeros([4])})),
        "float32": variant(lambda s: s["ema_state"].update({"fc.bias": paddle.zeros([3], "float16")})),
        "NaN": variant(lambda s: s["ema_state"].update({"fc.bias": paddle.to_tensor([0.0, float("nan"), 1.0])})),
        "integer": variant(lambda s: s.update(step=-1)),
        "state_dict_for_save": [1, 2],
    }
    for message, state in cases.items():
        with pytest.raises(IncompatibleStateError, match=message):
            ema.set_state_dict(state)
        check_state(ema.state_dict, before, f"unchanged after a {message!r} state")
        assert ema.step == 1
    ema.set_state_dict(good)  # the EMA's own tensors take the values; the given dict stays as it was
    train_step(model, rng)
    ema.update(model)
    assert_bitwise(good["ema_state"]["fc.weight"].numpy(), before["fc.weight"], "the given dict")


def test_settings_that_paddleocr_would_misread_are_errors():
    model = make_model()
    with pytest.raises(ConfigError, match="ema_decay_type"):
        ModelEMA(model, ema_decay_type="thresold")
    with pytest.raises(ConfigError, match="tau"):
        ModelEMA(model, ema_decay_type="exponential", gamma=0)
    with pytest.raises(ConfigError, match="nonfinite"):
        ModelEMA(model, nonfinite="ignore")


@pytest.mark.parametrize("settings", [dict(), dict(ema_decay_type="exponential", gamma=500),
                                      dict(decay=0.9, ema_filter_no_grad=True)], ids=ids)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_against_paddleocrs_class(settings, dtype, kernel, tmp_path):
    Real = suite_class(["ppocr.utils.ema"], "ModelEMA", "PaddleOCR (a checkout on PYTHONPATH)")
    model, rng = make_model(dtype), np.random.default_rng(26)
    ours, theirs = ModelEMA(model, **settings), Real(model, **settings)
    assert ours.ema_black_list == theirs.ema_black_list
    for t in range(64):
        train_step(model, rng)
        ours.update(model)
        theirs.update(model)
        check_state(ours.state_dict, numpy_state_of(theirs.state_dict), f"update {t}")
        if t % 5 == 4:
            check_state(ours.apply(), numpy_state_of(theirs.apply()), f"apply after update {t}")
        if t == 31:
            ours_loaded, theirs_loaded = save_and_load(ours, tmp_path / "a"), save_and_load(theirs, tmp_path / "b")
            ours, theirs = ModelEMA(model, **settings), Real(model, **settings)
            ours.set_state_dict(ours_loaded)
            theirs.set_state_dict(theirs_loaded)
            check_state(ours.apply(), numpy_state_of(theirs.apply()), "apply right after the resume")
    check_state(ours.apply(), numpy_state_of(theirs.apply()), "final apply")


def numpy_state_of(state):
    return {k: v.numpy() for k, v in state.items()}
