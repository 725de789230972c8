"""The extension's float32 -> float16/bfloat16 cast for static programs (program_ops.fused_cast,
the ops paddle_ema_cast_to_float16/_bfloat16), bit for bit against independent oracles, in PIR and
legacy programs.

apply() narrows the float32 averages of half-precision parameters with it, because Paddle's own
CPU cast rounds toward zero before 3.2 (float16) and on 2.6 (bfloat16 too). The oracles: numpy's
astype(float16) (IEEE round to nearest, ties to even, NaN payloads kept), and for bfloat16 the
nearer of the two truncations of each value, chosen in float64, ties to the even one, every NaN
0x7fff (what Paddle 3.x's cast and kernels.cast write).
"""

import numpy as np
import paddle
import pytest
from test_static import KINDS, static_programs
from test_static_fused import _fused_built, op_names  # noqa: F401 (an autouse fixture: the kernel is built)

from paddle_ema import kernels, program_ops
from paddle_ema.errors import ConfigError
from paddle_ema.static import ExponentialMovingAverage

OP = {"float16": "paddle_ema_cast_to_float16", "bfloat16": "paddle_ema_cast_to_bfloat16"}



def custom(kind, dtype):
    return f"custom_op.{OP[dtype]}" if kind == "pir" else OP[dtype]


def f32(*bits):
    return np.array(bits, dtype=np.uint32).view(np.float32)


def edge_cases():
    tiny = 2.0**-24  # the smallest subnormal half
    ties16 = [1 + 2**-11, 1 + 3 * 2**-11, 2049.0, 4097.0, 1 + 2**-10 + 2**-11, 0.5 + 2**-12]
    ties_bf = [1 + 2**-8, 1 + 3 * 2**-8, 257.0, 259.0, 2.0**100 * (1 + 2**-8)]
    halves = [tiny, tiny / 2, 3 * tiny / 2, 5 * tiny / 2, 2.0**-14 - tiny / 2, 2.0**-14, 2.0**-15, 1e-6, 3e-8]
    beyond = [65504.0, 65519.99, 65520.0, 65536.0, 1e6, 3.4e38]
    values = np.array(ties16 + ties_bf + halves + beyond + [0.0, 1.0, 0.1, 1 / 3, 1e-40, 1e-45, 2.0**-126],
                      dtype=np.float32)
    nudged = np.concatenate([np.nextafter(values, np.float32(np.inf)), np.nextafter(values, np.float32(0))])
    special = np.concatenate([
        f32(0x7F800000, 0x7FC00000, 0x7F800001, 0x7FBFFFFF, 0x7FFFFFFF,  # inf and NaNs (signalling too)
            0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x7F7E8000,  # float32 max, bfloat16 ties at the top
            0x00000001, 0x00008000, 0x00018000, 0x007FFFFF),  # float32 subnormals, bfloat16 ties there
        np.array([np.nan], dtype=np.float32),
    ])
    finite = np.concatenate([values, nudged, special])
    return np.concatenate([finite, -finite])  # -0 among them


def random_values(rng, n):
    """Normal values over many scales, and arbitrary bit patterns (every kind of float)."""
    scaled = rng.standard_normal(n) * 10.0 ** rng.integers(-9, 7, n)
    patterns = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([scaled.astype(np.float32), patterns])


def float16_oracle(values):
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(np.float16).view(np.uint16)


def bfloat16_oracle(values):
    bits = values.view(np.uint32)
    sign = (bits >> 16) & 0x8000
    magnitude = bits & 0x7FFFFFFF
    down = magnitude & 0xFFFF0000
    up = down.astype(np.uint64) + 0x10000
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.abs(values).astype(np.float64)
        low = down.view(np.float32).astype(np.float64)
        # One step past bfloat16's largest is 2^128: where float32 has only inf, the rounding
        # still weighs the distance to it as if the exponent went on.
        high = np.where(up >= 0x7F800000, 2.0**128, up.astype(np.uint32).view(np.float32).astype(np.float64))
        take_up = (high - x < x - low) | ((high - x == x - low) & ((down >> 16) & 1 == 1))  # NaN: replaced below
    rounded = np.where(take_up, up, down).astype(np.uint32) >> 16
    result = (sign | rounded).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FFF), result)


ORACLE = {"float16": float16_oracle, "bfloat16": bfloat16_oracle}


def cast_in_program(kind, values, dtype):
    """Runs fused_cast over `values` in a program of `kind`: (the result's bits, the ops)."""
    with static_programs(kind) as (main, startup):
        x = paddle.static.data("x", [len(values)], "float32")
        out = program_ops.fused_cast(x, getattr(paddle, dtype))
        exe = paddle.static.Executor(paddle.CPUPlace())
        exe.run(startup)
        (result,) = exe.run(main, feed={"x": values}, fetch_list=[out])
        ops = op_names(main, kind)
    result = np.asarray(result)
    assert result.dtype in (np.uint16, np.float16), result.dtype  # Paddle hands bfloat16 back as its bits
    return result.view(np.uint16), ops


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cast_rounds_to_nearest_even_bit_for_bit(kind, dtype):
    rng = np.random.default_rng(15)
    # 2 x 60,000 random values: the multi-threaded path; the edge cases: one thread's chunk.
    for values in (edge_cases(), random_values(rng, 60_000)):
        got, ops = cast_in_program(kind, values, dtype)
        assert custom(kind, dtype) in ops
        want = ORACLE[dtype](values)
        wrong = np.flatnonzero(got != want)
        assert wrong.size == 0, [(hex(values.view(np.uint32)[i]), hex(got[i]), hex(want[i])) for i in wrong[:5]]
    # The oracle itself on known answers: ties to even, overflow, NaN, the smallest subnormals.
    known = {
        "float16": {1 + 2**-11: 0x3C00, 1 + 3 * 2**-11: 0x3C02, 65520.0: 0x7C00, 65519.99: 0x7BFF,
                    2.0**-25: 0x0000, 3 * 2.0**-25: 0x0002, -0.0: 0x8000, float("nan"): 0x7E00},
        "bfloat16": {1 + 2**-8: 0x3F80, 1 + 3 * 2**-8: 0x3F82, 3.4028235e38: 0x7F80, -0.0: 0x8000,
                     float("nan"): 0x7FFF, float("-inf"): 0xFF80, 1e-45: 0x0000},
    }[dtype]
    values = np.array(list(known), dtype=np.float32)
    np.testing.assert_array_equal(ORACLE[dtype](values), np.array(list(known.values()), dtype=np.uint16))


def test_cast_matches_the_dygraph_cast():
    # kernels.cast (the dygraph EMA's apply) and the program op give the same bits.
    values = np.concatenate([edge_cases(), random_values(np.random.default_rng(16), 2000)])
    for dtype in ("float16", "bfloat16"):
        got, _ = cast_in_program(KINDS[0], values, dtype)
        dygraph = kernels.cast(paddle.to_tensor(values), dtype).numpy().view(np.uint16)
        np.testing.assert_array_equal(got, dygraph, err_msg=dtype)


def test_fused_cast_refuses_other_dtypes():
    with static_programs(KINDS[0]):
        x = paddle.static.data("x", [3], "float64")
        with pytest.raises(ConfigError, match="float32 to float16 or bfloat16"):
            program_ops.fused_cast(x, paddle.float16)
        assert not program_ops.fused_cast_takes(x, paddle.float16)
        y = paddle.static.data("y", [3], "float32")
        assert not program_ops.fused_cast_takes(y, paddle.float64)
        assert program_ops.fused_cast_takes(y, paddle.bfloat16)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_apply_programs_use_the_cast_with_the_fused_kernel_only(kind, dtype):
    # The fused kernel: apply() narrows with the extension's op; 'reference' (nothing compiled):
    # with Paddle's cast, which this Paddle may truncate (tests/test_static.py's xfail).
    names = {}
    for mode in ("fused", "reference"):
        with static_programs(kind):
            feed = paddle.static.data("v", [6], "float32")
            half = paddle.static.create_parameter([6], dtype, default_initializer=paddle.nn.initializer.Constant(0.0))
            paddle.assign(paddle.cast(feed, dtype), output=half)
            half.stop_gradient = False
            kernels.set_kernel(mode)
            ema = ExponentialMovingAverage(0.8)
            kernels.set_kernel(None)
            names[mode] = op_names(ema.apply_program, kind)
    assert names["fused"].count(custom(kind, dtype)) == 1
    assert names["reference"].count(custom(kind, dtype)) == 0
    # The op stands in for one of Paddle's casts, and changes nothing else.
    paddle_cast = "pd_op.cast" if kind == "pir" else "cast"
    assert names["fused"].count(paddle_cast) == names["reference"].count(paddle_cast) - 1
    assert len(names["fused"]) == len(names["reference"])
