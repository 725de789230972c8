"""The suites' EMA oracles (tests/suite_oracles.py) against Paddle's own ops and the real classes.

1. Every primitive and every suite's update expression, written with Paddle's ops as the suite
   writes it, bitwise against the oracle on random inputs over the whole float range and many
   decays (random ones, ones near 1, the schedules' values, PaddleDetection's float64 1 - d).
   float16/bfloat16 arithmetic is checked where Paddle's CPU has the kernel; where it has none
   (float16 add/subtract, bfloat16 add) the test pins that it raises: those run on GPUs only.
2. Each oracle against the suite's real class over 64 updates of a model with conv, BatchNorm,
   linear and a frozen weight, when the suite is importable (skipped with the reason otherwise):
   paddleclas, paddleseg, ppdiffusers and paddledet (whose ModelEMA computes as PaddleYOLO's) from
   the package registry; PaddleOCR's `ppocr` and PaddleYOLO's `ppdet` from a checkout put first on
   PYTHONPATH. CI installs none of them.
"""

import copy
import importlib

import numpy as np
import paddle
import pytest

import suite_oracles as so
from test_model_ema import Net as ModelEMANet
from test_ppdet_bitwise import assert_bitwise, hard_values

pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


def _decays():
    rng = np.random.default_rng(25)
    decays = list(rng.uniform(0, 1, 12)) + list(1 - 10.0 ** -rng.uniform(1, 7, 12))
    decays += [0.0, 0.5, 2 / 11, 0.999, 0.9996, 0.9998, 0.9999, 1 / 3]
    decays += [so.threshold_decay(0.9998, n) for n in (0, 1, 7, 60, 5000)]
    decays += [so.paddleseg_decay(n) for n in (1, 2, 3, 999, 5000)]
    decays += [so.ppdiffusers_decay(n, use_ema_warmup=True) for n in (1, 10, 31_623)]
    return decays


DECAYS = _decays()


def bf16_values(rng, n):
    """Random bfloat16 bit patterns over the whole range, with +-0 and the extremes."""
    x = so.f32_to_bf16(hard_values(rng, n))
    x[:4] = [0x0000, 0x8000, 0x7F7F, 0x0001]
    return x


def values(rng, n, dtype):
    if dtype == "bfloat16":
        return bf16_values(rng, n)
    return hard_values(rng, n, np.dtype(dtype).type)


def tensor(x):
    return paddle.to_tensor(x)  # uint16 arrays become bfloat16 tensors, as Paddle maps them


# --- 1. primitives --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_scale_is_paddles_python_float_multiply(dtype):
    rng = np.random.default_rng(1)
    x = values(rng, 40_000, dtype)
    t = tensor(x)
    for d in DECAYS:
        for factor in (d, 1 - d, 1.0 - d):
            assert_bitwise((factor * t).numpy(), so.scale(x, factor), f"{dtype}: {factor} * x")
        assert_bitwise(t.clone().scale_(d).numpy(), so.scale(x, d), f"{dtype}: scale_({d})")


@pytest.mark.parametrize("dtype", ["int64", "int32"])
def test_integer_entries_are_promoted_to_float32(dtype):
    rng = np.random.default_rng(2)
    x = rng.integers(-(2**31), 2**31 - 1, 20_000).astype(dtype)
    x[:3] = [0, 16_777_217, -33_554_435]  # above float32's exact integers
    t = tensor(x)
    for d in DECAYS:
        result = d * t
        assert result.dtype == paddle.float32
        assert_bitwise(result.numpy(), so.scale(x, d), f"{d} * {dtype}")
    # PaddleClas's paddle.assign of such a result turns the integer tensor into float32
    target = tensor(x)
    paddle.assign(0.5 * target + 0.5 * t, target)
    assert target.dtype == paddle.float32


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_add_subtract_are_paddles(dtype):
    rng = np.random.default_rng(3)
    a, b = values(rng, 40_000, dtype), values(rng, 40_000, dtype)
    if dtype != "bfloat16":
        a[:4], b[:4] = [-0.0, -0.0, 0.0, 0.0], [-0.0, 0.0, -0.0, 0.0]
    assert_bitwise((tensor(a) - tensor(b)).numpy(), so.subtract(a, b), f"{dtype} subtract")
    if dtype != "bfloat16":
        assert_bitwise((tensor(a) + tensor(b)).numpy(), so.add(a, b), f"{dtype} add")
        assert_bitwise(tensor(a).add_(tensor(b)).numpy(), so.add(a, b), f"{dtype} add_")


@pytest.mark.parametrize("dtype,ops", [("float16", ["add", "subtract"]), ("bfloat16", ["add"])])
def test_half_kernels_missing_on_cpu(dtype, ops):
    """Paddle's CPU has no kernel for these: the suites' expressions that need them (PaddleClas,
    PaddleSeg and PaddleYOLO on float16/bfloat16 models, EMAModel on float16 shadows) run only
    on a GPU, where the oracle's float32-then-round step is unverified here."""
    t = tensor(values(np.random.default_rng(4), 300, dtype))
    for op in ops:
        with pytest.raises(RuntimeError, match=op):
            getattr(paddle, op)(t, t)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_divide_by_python_float_is_paddles(dtype):
    rng = np.random.default_rng(5)
    x = values(rng, 40_000, dtype)
    t = tensor(x)
    for d in DECAYS[::3]:
        for steps in (1, 2, 7, 60, 1000):
            c = 1 - d**steps
            if c == 0:
                continue
            assert_bitwise((t / c).numpy(), so.divide(x, c), f"{dtype}: x / (1 - {d}**{steps})")


def test_casts_are_paddles():
    rng = np.random.default_rng(6)
    x = hard_values(rng, 200_000)
    t = tensor(x)
    assert_bitwise(t.astype("float16").numpy(), so.cast(x, so.F16), "float32 -> float16")
    assert_bitwise(t.cast("bfloat16").numpy(), so.cast(x, so.BF16), "float32 -> bfloat16")
    b, h = bf16_values(rng, 50_000), hard_values(rng, 50_000, np.float16)
    assert_bitwise(tensor(b).astype("float32").numpy(), so.cast(b, so.F32), "bfloat16 -> float32")
    assert_bitwise(tensor(h).cast("float32").numpy(), so.cast(h, so.F32), "float16 -> float32")
    # copy_ and paddle.assign move bits unchanged, whatever the dtype
    for v in (x, b, h):
        dst = paddle.zeros(v.shape, tensor(v).dtype)
        dst.copy_(tensor(v), False)
        assert_bitwise(dst.numpy(), v, "copy_")
        paddle.assign(tensor(v), dst)
        assert_bitwise(dst.numpy(), v, "assign")


# --- 1b. each suite's update expression, in Paddle's ops, against the oracle step ------------
def test_paddleclas_paddleyolo_paddleseg_expression():
    """d * e + (1 - d) * m in the model's dtype (PaddleSeg: v * d, v + (1 - d) * m)."""
    rng = np.random.default_rng(7)
    for dtype in ("float32", "float64"):
        e, m = values(rng, 40_000, dtype), values(rng, 40_000, dtype)
        for d in DECAYS:
            expected = so.add(so.scale(e, d), so.scale(m, 1.0 - d))
            got = d * tensor(e) + (1.0 - d) * tensor(m)
            assert_bitwise(got.numpy(), expected, f"{dtype}, decay {d}")
            v = tensor(e)
            v *= d  # no __imul__ on Paddle's Tensor: a new tensor, as PaddleSeg relies on
            v += (1.0 - d) * tensor(m)
            assert_bitwise(v.numpy(), expected, f"{dtype} in place, decay {d}")


def test_paddleocr_litema_expression():
    """float32 shadows of float32/float16/bfloat16 weights: d * v + (1 - d) * m.astype(float32)
    (PaddleOCR); v.scale_(d).add_(m.astype(float32) * (1 - d)) (LitEma)."""
    rng = np.random.default_rng(8)
    v = hard_values(rng, 40_000)
    for dtype in ("float32", "float16", "bfloat16"):
        m = values(rng, 40_000, dtype)
        for d in DECAYS:
            expected = so.ema_step(v, so.cast(m, so.F32), d)
            got = d * tensor(v) + (1 - d) * tensor(m).astype("float32")
            assert_bitwise(got.numpy(), expected, f"PaddleOCR {dtype}, decay {d}")
            lit = tensor(v)
            lit.scale_(d)
            lit.add_(tensor(m).astype("float32") * (1.0 - d))
            assert_bitwise(lit.numpy(), expected, f"LitEma {dtype}, decay {d}")


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_emamodel_expression(dtype):
    """s - (1 - d) * (s - p.cast(s.dtype)), then copy_ into s (float16 shadows: GPU only)."""
    rng = np.random.default_rng(9)
    s, p = values(rng, 40_000, dtype), values(rng, 40_000, dtype)
    for d in DECAYS:
        one_minus_decay = 1 - d
        expected = so.subtract(s, so.scale(so.subtract(s, p), one_minus_decay))
        shadow, param = tensor(s), tensor(p)
        shadow.copy_(shadow - one_minus_decay * (shadow - param.cast(shadow.dtype)), False)
        assert_bitwise(shadow.numpy(), expected, f"{dtype}, decay {d}")


def test_ppdet_style_float64_one_minus_decay():
    """PaddleDetection-style decays: 1 - d in float64 is not float32(1) - float32(d)."""
    rng = np.random.default_rng(10)
    x = hard_values(rng, 40_000)
    differs = 0
    for d in DECAYS:
        assert_bitwise(((1 - d) * tensor(x)).numpy(), so.scale(x, 1 - d), f"(1 - {d}) * x")
        differs += so.F32(1 - d) != so.F32(1) - so.F32(d)
    assert differs > 0  # the float64 subtraction matters for some of these decays


def test_schedules_closed_forms():
    assert so.threshold_decay(0.9998, 0) == 0.1 and so.threshold_decay(0.5, 100) == 0.5
    assert so.paddleseg_decay(0) == 0.0 and so.paddleseg_decay(1) == 0.5 and so.paddleseg_decay(10**6) == 0.999
    assert so.ppdiffusers_decay(0) == 0.0 and so.ppdiffusers_decay(1) == 2 / 11
    assert so.ppdiffusers_decay(3, update_after_step=3) == 0.0 and so.ppdiffusers_decay(4, update_after_step=3) == 2 / 11
    assert so.ppdiffusers_decay(1, use_ema_warmup=True, power=1.0) == 0.5
    assert so.ppdiffusers_decay(1, min_decay=0.3) == 0.3


# --- 2. the oracles against the real suite classes (when installed) --------------------------
class SuiteNet(ModelEMANet):
    """conv, BatchNorm, linear and a frozen non-BN weight; optionally a head tied to fc's weight
    (one tensor under two state_dict keys, as in PicoDet's head), an extra parameter of another
    dtype, and an int64 buffer."""

    def __init__(self, tied=False, extra_dtype=None, int_buffer=False):
        super().__init__()
        if tied:
            self.head = paddle.nn.Linear(8, 3)
            self.head.weight = self.fc.weight
        if extra_dtype:
            self.extra = self.create_parameter([5, 3], dtype=extra_dtype)
        if int_buffer:
            self.register_buffer("count", paddle.to_tensor(np.array([3, -7, 11], np.int64)))


def make_net(**options):
    paddle.seed(0)
    return SuiteNet(**options)


def numpy_state(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def tied_aliases(model):
    """key -> the first key holding the same tensor."""
    first, aliases = {}, {}
    for key, value in model.state_dict().items():
        if id(value) in first:
            aliases[key] = first[id(value)]
        else:
            first[id(value)] = key
    return aliases


def train_step(model, rng):
    """Stand-in for an optimizer step: every entry moves (BN statistics and frozen weights too),
    with exact zeros and negative zeros among the values; integer entries move by integers."""
    with paddle.no_grad():
        for tensor_ in model.state_dict().values():
            old = tensor_.numpy()
            noise = rng.normal(0, 0.3, old.shape).astype(np.float32)
            if old.dtype == so.BF16:
                new = so.f32_to_bf16(so.bf16_to_f32(old) + noise)
            elif so.is_floating(old):
                new = (old.astype(np.float32) + noise)
                flat = new.reshape(-1)
                flat[: max(1, flat.size // 10)] = rng.choice([0.0, -0.0], max(1, flat.size // 10))
                new = new.astype(old.dtype)
            else:
                new = old + rng.integers(-3, 4, old.shape).astype(old.dtype)
            tensor_.set_value(new)
    return numpy_state(model)


def suite_class(modules, name, package):
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except ImportError:
            continue
    pytest.skip(f"{package} is not installed (tried {', '.join(modules)}): its real class is not compared")


def check_state(actual, expected, what):
    assert list(actual) == list(expected), what
    for key, value in expected.items():
        assert_bitwise(actual[key].numpy(), value, f"{what}: {key}")


@pytest.mark.parametrize("tied", [False, True], ids=["plain", "tied"])
@pytest.mark.parametrize("decay", [0.9999, 0.99, 0.5])
def test_paddleclas_real_class(tied, decay):
    EMA = suite_class(["paddleclas.ppcls.utils.ema", "ppcls.utils.ema"], "ExponentialMovingAverage", "paddleclas")
    model, rng = make_net(tied=tied, int_buffer=True), np.random.default_rng(11)
    ema = EMA(model, decay) if decay != 0.9999 else EMA(model)
    ref = so.PaddleClasOracle(numpy_state(model), tied_aliases(model), decay)
    assert not ema.module.training and ema.module is not model
    for t in range(64):
        values = train_step(model, rng)
        if t == 40:
            ema.set(model)  # what PaddleClas's engine offers besides update
            ref.set(values)
        else:
            ema.update(model)
            ref.update(values)
        check_state(ema.module.state_dict(), ref.state(), f"update {t}")
        # the int64 buffer: float32 after each update (promoted), int64 again after set()
        assert ema.module.state_dict()["count"].dtype == (paddle.int64 if t == 40 else paddle.float32)


def test_paddleclas_update_is_lost_under_state_dict_hooks():
    """paddle.amp.decorate(level='O2', save_dtype=...) on a GPU hooks every sublayer's state_dict()
    to return cast copies, as the hook below does (PaddleClas's engine decorates so before building
    the EMA): the deep-copied module keeps the hooks, paddle.assign writes into the copies, and the
    EMA never moves. (On the CPU decorate(O2) returns early, so the hook is registered by hand.)"""
    EMA = suite_class(["paddleclas.ppcls.utils.ema", "ppcls.utils.ema"], "ExponentialMovingAverage", "paddleclas")

    def cast_copies(state_dict):
        for key, value in state_dict.items():
            if paddle.is_floating_point(value):
                state_dict[key] = paddle.cast(value, "float32")

    model = make_net()
    for layer in model.sublayers(include_self=True):
        layer.register_state_dict_hook(cast_copies)
    ema = EMA(model, 0.5)
    before = numpy_state(ema.module)
    train_step(model, np.random.default_rng(17))
    ema.update(model)
    check_state(ema.module.state_dict(), before, "hooked module after update")


@pytest.mark.parametrize("tied", [False, True], ids=["plain", "tied"])
def test_paddleseg_real_functions(tied):
    init_ema_params = suite_class(["paddleseg.utils.ema"], "init_ema_params", "paddleseg")
    update_ema_model = suite_class(["paddleseg.utils.ema"], "update_ema_model", "paddleseg")
    model, rng = make_net(tied=tied, int_buffer=True), np.random.default_rng(12)
    ema_model = copy.deepcopy(model)  # as paddleseg's core/train.py builds it
    ema_model.eval()
    for param in ema_model.parameters():
        param.stop_gradient = True
    ref = so.PaddleSegOracle(numpy_state(ema_model), tied_aliases(ema_model))
    values = train_step(model, rng)
    init_ema_params(ema_model, model)
    ref.init(values)
    check_state(ema_model.state_dict(), ref.state(), "init")
    for it in range(1, 65):
        values = train_step(model, rng)
        decay = 0.999 if it < 50 else 0.9
        update_ema_model(ema_model, model, step=it, decay=decay)
        ref.update(values, step=it, decay=decay)
        check_state(ema_model.state_dict(), ref.state(), f"iter {it}")
        if it == 32:  # the trainer's resume: the EMA restarts from the model's weights
            init_ema_params(ema_model, model)
            ref.init(values)
            check_state(ema_model.state_dict(), ref.state(), "re-init")


PADDLEYOLO_SETTINGS = [
    dict(ema_decay_type="threshold"),
    dict(ema_decay_type="exponential"),
    dict(ema_decay_type="normal", decay=0.99),
    dict(ema_decay_type="threshold", cycle_epoch=3, ema_black_list=["fc."]),
    dict(ema_decay_type="normal", decay=0.9, ema_black_list=["conv.bias"]),
    dict(ema_decay_type="exponential", cycle_epoch=2, ema_filter_no_grad=True),
]


def paddleyolo_oracle(model, settings):
    frozen = ["frozen"] if settings.get("ema_filter_no_grad") else []
    oracle_settings = {k: v for k, v in settings.items() if k != "ema_filter_no_grad"}
    return so.PaddleYOLOOracle(numpy_state(model), frozen_no_grad=frozen, **oracle_settings)


@pytest.mark.parametrize("settings", PADDLEYOLO_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_paddleyolo_real_class(settings):
    """paddledet's ModelEMA (2.6.0 on the registry) computes as PaddleYOLO's; PaddleYOLO only
    moved the ema_filter_no_grad block (see the next test). With a PaddleYOLO checkout first on
    PYTHONPATH, `ppdet` is PaddleYOLO's own."""
    ModelEMA = suite_class(["ppdet.optimizer.ema"], "ModelEMA", "paddledet or PaddleYOLO")
    model, rng = make_net(int_buffer=True), np.random.default_rng(13)
    try:
        ema = ModelEMA(model, **settings)
    except AttributeError as error:
        assert settings.get("ema_filter_no_grad") and "append" in str(error)
        pytest.skip("this ppdet is paddledet 2.6.0: ema_filter_no_grad fails on a frozen weight there")
    ref = paddleyolo_oracle(model, settings)
    assert ema.ema_black_list == ref.black
    check_state(ema.apply(), ref.apply(numpy_state(model)), "t = 0")
    for t in range(64):
        values = train_step(model, rng)
        ema.update()
        ref.update(values)
        for key in ref.state:
            if key not in ref.black:
                assert_bitwise(ema.state_dict[key].numpy(), ref.state[key], f"update {t}: {key}")
        if t % 5 == 4:
            check_state(ema.apply(), ref.apply(values), f"apply after update {t}")
            assert (ema.step, ema.epoch) == (ref.step, ref.epoch)
        if t == 31:  # resume from the saved apply() output, at the saved step
            saved = {k: v.clone() for k, v in ema.apply().items()}
            expected = ref.apply(values)
            step = ema.step
            ema = ModelEMA(model, **settings)
            ema.resume(saved, step)
            ref = paddleyolo_oracle(model, settings)
            ref.resume(expected, step)
            if settings["ema_decay_type"] != "exponential":
                with pytest.raises(AttributeError, match="_decay"):
                    ema.apply()  # no update since construction: the suite has no _decay yet
                with pytest.raises(AttributeError, match="_decay"):
                    ref.apply(values)
    check_state(ema.apply(), ref.apply(values), "final apply")


def test_paddledet_ema_filter_no_grad_on_a_frozen_weight():
    """paddledet 2.6.0 appends to a set: ema_filter_no_grad=True with any frozen non-BN weight
    raises; PaddleYOLO's copy adds to the set before building the state and black-lists it."""
    ModelEMA = suite_class(["ppdet.optimizer.ema"], "ModelEMA", "paddledet or PaddleYOLO")
    try:
        ema = ModelEMA(make_net(), ema_filter_no_grad=True)
    except AttributeError as error:  # paddledet 2.6.0
        assert "append" in str(error)
        return
    assert ema.ema_black_list == {"frozen"}  # PaddleYOLO: BN statistics stay averaged


PADDLEOCR_SETTINGS = [
    dict(),
    dict(ema_decay_type="exponential", gamma=500),
    dict(ema_decay_type="normal", decay=0.99),
    dict(decay=0.9, ema_filter_no_grad=True),
]


@pytest.mark.parametrize("settings", PADDLEOCR_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_paddleocr_real_class(settings):
    """PaddleOCR is not on the package registry: this runs with a PaddleOCR checkout on
    PYTHONPATH. A float16 weight is averaged in float32 and apply() gives float32 back."""
    ModelEMA = suite_class(["ppocr.utils.ema"], "ModelEMA", "PaddleOCR (a checkout on PYTHONPATH)")
    model, rng = make_net(tied=True, extra_dtype="float16", int_buffer=True), np.random.default_rng(16)
    ema = ModelEMA(model, **settings)
    black = ["frozen"] if settings.get("ema_filter_no_grad") else []
    oracle_settings = {k: v for k, v in settings.items() if k != "ema_filter_no_grad"}
    ref = so.PaddleOCROracle(numpy_state(model), black=black, **oracle_settings)
    assert ema.ema_black_list == ref.black
    check_state(ema.apply(), ref.apply(), "t = 0")
    for t in range(64):
        values = train_step(model, rng)
        ema.update(model)
        ref.update(values)
        check_state(ema.state_dict, ref.state, f"update {t}")
        if t % 5 == 4:
            check_state(ema.apply(), ref.apply(), f"apply after update {t}")
        if t == 31:  # the checkpoint round trip the class offers
            saved = ema.state_dict_for_save()
            saved = {"ema_state": {k: v.clone() for k, v in saved["ema_state"].items()}, "step": saved["step"]}
            ema = ModelEMA(model, **settings)
            ema.set_state_dict(saved)
            expected = ref.state_dict_for_save()
            ref = so.PaddleOCROracle(numpy_state(model), black=black, **oracle_settings)
            ref.set_state_dict({"ema_state": dict(expected["ema_state"]), "step": expected["step"]})
    check_state(ema.apply(), ref.apply(), "final apply")


EMAMODEL_SETTINGS = [
    dict(),
    dict(use_ema_warmup=True),
    dict(use_ema_warmup=True, inv_gamma=3.0, power=0.75, decay=0.999),
    dict(update_after_step=5, min_decay=0.5),
    dict(decay=0.9),
]


@pytest.mark.parametrize("settings", EMAMODEL_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_ppdiffusers_emamodel_real_class(settings):
    EMAModel = suite_class(["ppdiffusers.training_utils"], "EMAModel", "ppdiffusers")
    model, rng = make_net(tied=True, extra_dtype="bfloat16"), np.random.default_rng(14)
    params = model.parameters()  # BN statistics are stop_gradient parameters here: copied, not averaged
    ema = EMAModel(params, **settings)
    ref = so.EMAModelOracle([p.numpy() for p in params], **settings)
    for t in range(64):
        train_step(model, rng)
        ema.step(model.parameters())
        ref.step([p.numpy() for p in model.parameters()], [not p.stop_gradient for p in model.parameters()])
        assert ema.cur_decay_value == ref.cur_decay_value and ema.optimization_step == ref.optimization_step
        for i, (shadow, expected) in enumerate(zip(ema.shadow_params, ref.shadow_params)):
            assert_bitwise(shadow.numpy(), expected, f"step {t}: shadow {i}")
        if t == 31:  # accelerate-style checkpoint: state_dict() saved, a new EMAModel loads it
            saved = copy.deepcopy(ema.state_dict())
            ema = EMAModel(model.parameters(), **settings)
            ema.load_state_dict(saved)
    target = make_net(tied=True, extra_dtype="bfloat16")
    ema.copy_to(target.parameters())
    for p, expected in zip(target.parameters(), ref.copy_to([p.numpy().dtype for p in target.parameters()])):
        assert_bitwise(p.numpy(), expected, "copy_to")


@pytest.mark.parametrize("decay,use_num_upates", [(0.9999, True), (0.99, False), (0.5, True)])
def test_ppdiffusers_litema_real_class(decay, use_num_upates):
    LitEma = suite_class(["ppdiffusers.models.ema"], "LitEma", "ppdiffusers")
    model, rng = make_net(tied=True, extra_dtype="float16"), np.random.default_rng(15)
    ema = LitEma(model, decay=decay, use_num_upates=use_num_upates)

    def trainable():
        return {n: p.numpy() for n, p in model.named_parameters() if not p.stop_gradient}

    ref = so.LitEmaOracle(trainable(), decay=decay, use_num_upates=use_num_upates)
    for t in range(64):
        train_step(model, rng)
        ema(model)
        ref.forward(trainable())
        assert ema.num_updates == ref.num_updates
        check_state(dict(ema.named_buffers()), ref.buffers, f"forward {t}")
        if t == 31:  # LitEma's state_dict holds the buffers only: num_updates restarts
            saved = {k: v.clone() for k, v in ema.state_dict().items()}
            ema = LitEma(model, decay=decay, use_num_upates=use_num_upates)
            ema.set_state_dict(saved)
            ref.num_updates = 0 if use_num_upates else -1
    target = make_net(tied=True, extra_dtype="float16")
    ema.copy_to(target)
    dtypes = {n: p.numpy().dtype for n, p in target.named_parameters() if not p.stop_gradient}
    expected = ref.copy_to(dtypes)
    for name, p in target.named_parameters():
        if name in expected:
            assert_bitwise(p.numpy(), expected[name], f"copy_to {name}")
