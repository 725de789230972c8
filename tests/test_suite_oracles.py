"""The suites' EMA oracles (tests/suite_oracles.py) against Paddle's own ops and the real classes.

1. Every primitive and every suite's update expression, written with Paddle's ops as the suite
   writes it, bitwise against the oracle on random inputs over the whole float range and many
   decays (random ones, ones near 1, the schedules' values, PaddleDetection's float64 1 - d).
   float16/bfloat16 arithmetic is checked where Paddle's CPU has the kernel; where it has none
   (float16 add/subtract, bfloat16 add) the test pins that it raises: those run on GPUs only.
2. Each oracle against the suite's real class over 64 updates of a model with conv, BatchNorm,
   linear and a frozen weight, when the suite is installed (skipped with the reason otherwise):
   paddleclas, paddleseg, ppdiffusers and paddledet (whose ModelEMA computes as PaddleYOLO's).
"""

import copy

import numpy as np
import paddle
import pytest

import suite_oracles as so
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
