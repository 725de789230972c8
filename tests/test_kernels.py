"""The multi-tensor kernels' numbers: fused (C++ extension) and reference paths give the same
numbers, bit for bit, for every formula and dtype pair; the static programs' operators; the
Kernel object of one average. The build itself is tests/test_kernel_build.py's.
"""

import re

import numpy as np
import paddle
import pytest

from paddle_ema import ConfigError, ExponentialMovingAverage, kernels
from paddle_ema.kernels import fused, reference


@pytest.fixture
def fused_ready():
    kernels.set_kernel("fused")
    try:  # a failed check must not leave 'fused' forced for the tests that follow
        assert fused.available(), fused.failure()
        yield
    finally:
        kernels.set_kernel(None)


def _require_run_custom_op():
    """These tests run the static operators in dygraph, through an API Paddle 2.6 lacks; on 2.6
    the operators run inside legacy programs only (the static EMA's tests)."""
    from paddle import _C_ops

    if not hasattr(_C_ops, "_run_custom_op"):
        pytest.skip(f"paddle._C_ops._run_custom_op is missing on Paddle {paddle.__version__} (needs >= 3.0)")


# --- numbers -------------------------------------------------------------------------------------

SMALL_SHAPES = [[n % 37 + 1] for n in range(300)] + [[3, 3, 2, 2], [17, 5]]
LARGE_SHAPES = [[513, 1031], [300_007]]  # above the threshold where the CPU kernel goes parallel


def _pairs(value_dtype, shapes, seed):
    rng = np.random.default_rng(seed)
    averages = [rng.standard_normal(s).astype("float32") for s in shapes]
    values = [(a + rng.standard_normal(a.shape) * 0.5).astype("float32") for a in averages]
    return averages, [paddle.to_tensor(v).astype(value_dtype) for v in values]


def _float64_model(average, value, weight):
    """a + w * (x - a) in float64, with w rounded to float32 as the kernels do."""
    w = np.float64(np.float32(weight))
    return average.astype(np.float64) + w * (value.astype(np.float64) - average.astype(np.float64))


@pytest.mark.parametrize("value_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shapes", [SMALL_SHAPES, LARGE_SHAPES], ids=["302-small", "2-large"])
@pytest.mark.parametrize("weight", [0.3, 2e-4])
def test_fused_matches_reference_and_float64_model(fused_ready, value_dtype, shapes, weight):
    initial, values = _pairs(value_dtype, shapes, seed=len(shapes))
    by_fused = [paddle.to_tensor(a) for a in initial]
    by_reference = [paddle.to_tensor(a) for a in initial]
    pointers = [t.data_ptr() for t in by_fused]
    fused.lerp_(by_fused, values, weight)
    reference.lerp_(by_reference, values, weight)
    assert [t.data_ptr() for t in by_fused] == pointers  # in place
    for a0, x, f, r in zip(initial, values, by_fused, by_reference):
        got, ref = f.numpy(), r.numpy()
        assert got.dtype == np.float32
        # Same formula, same rounding: at most one float32 ulp apart (bit-equal on x86 CPUs).
        np.testing.assert_array_max_ulp(got, ref, maxulp=1)
        exact_value = x.astype("float32").numpy()
        model = _float64_model(a0, exact_value, weight)
        # Three float32 roundings of terms no bigger than |a| + |w (x - a)|.
        bound = 3 * np.finfo(np.float32).eps * (np.abs(a0) + abs(weight) * np.abs(exact_value - a0)) + 1e-45
        assert np.all(np.abs(got - model) <= bound)


def test_float64_averages(fused_ready):
    rng = np.random.default_rng(1)
    initial = [rng.standard_normal([400, 300]), rng.standard_normal([7])]
    raw = [rng.standard_normal(a.shape) for a in initial]
    averages = [paddle.to_tensor(a) for a in initial]
    fused.lerp_(averages, [paddle.to_tensor(v) for v in raw], 0.123456789)
    for a0, x, got in zip(initial, raw, averages):
        expected = a0 + 0.123456789 * (x - a0)  # weight kept in float64
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=4e-16 * (np.abs(a0).max() + 1))


@pytest.mark.parametrize("path", ["fused", "reference"])
def test_constant_stays_constant(fused_ready, path):
    lerp_ = fused.lerp_ if path == "fused" else reference.lerp_
    constants = [0.1, -3.7e-5, 1234.5678, 7.0]
    averages = [paddle.to_tensor(np.full([100_000 if c == 7.0 else 33], c, "float32")) for c in constants]
    values = [paddle.to_tensor(np.full(a.shape, c, "float32")).astype(dt) for a, c, dt in
              zip(averages, constants, ["float32", "float32", "float32", "bfloat16"])]
    for weight in (0.9, 0.5, 1e-3, 2e-4, 1.0):
        lerp_(averages, values, weight)
    for a, c in zip(averages, constants):
        np.testing.assert_array_equal(a.numpy(), np.full(a.shape, c, "float32"))


def test_empty_lists_and_empty_tensors(fused_ready):
    fused.lerp_([], [], 0.5)
    reference.lerp_([], [], 0.5)
    averages = [paddle.zeros([0], "float32"), paddle.ones([4], "float32")]
    values = [paddle.zeros([0], "float16"), paddle.full([4], 3.0, "float32")]
    fused.lerp_(averages, values, 0.5)
    np.testing.assert_array_equal(averages[1].numpy(), np.full([4], 2.0, "float32"))
    with pytest.raises(ValueError):
        fused.lerp_(averages, values[:1], 0.5)
    with pytest.raises(ValueError):
        reference.lerp_(averages, values[:1], 0.5)


def test_pairs_the_extension_does_not_take_go_through_the_reference(fused_ready):
    """A float64 value for a float32 average, a strided value and a strided average (which Paddle
    would hand the operator as a copy) are still updated, with the reference numbers."""
    rng = np.random.default_rng(2)
    a0 = [rng.standard_normal([6]).astype("float32") for _ in range(4)]
    wide = rng.standard_normal([12]).astype("float32")
    values = [
        paddle.to_tensor(rng.standard_normal([6])),  # float64 value for a float32 average
        paddle.to_tensor(wide)[::2],  # a strided view as the value
        paddle.to_tensor(rng.standard_normal([6]).astype("float32")),
        paddle.to_tensor(rng.standard_normal([6]).astype("float16")),
    ]
    results = {}
    for name, lerp_ in (("fused", fused.lerp_), ("reference", reference.lerp_)):
        bases = [paddle.to_tensor(np.repeat(a, 2)) for a in a0]
        averages = [bases[0][::2], paddle.to_tensor(a0[1]), paddle.to_tensor(a0[2]), bases[3][::2]]
        assert not averages[0].is_contiguous()
        lerp_(averages, values, 0.25)
        results[name] = [a.numpy() for a in averages] + [bases[0].numpy()[::2], bases[3].numpy()[::2]]
    for f, r in zip(results["fused"], results["reference"]):
        np.testing.assert_array_equal(f, r)
    w = np.float32(0.25)
    np.testing.assert_array_equal(results["fused"][1], a0[1] + w * (wide[::2] - a0[1]))
    expected0 = a0[0] + w * (values[0].numpy().astype("float32") - a0[0])
    np.testing.assert_array_equal(results["fused"][4], expected0)  # written through to the base
    np.testing.assert_array_equal(results["fused"][5], results["fused"][3])


def test_offset_views_and_scalars_are_read_where_they_start(fused_ready):
    """The extension reads a tensor's buffer itself (its pointer plus the view's offset, its element
    count from the dims): a contiguous slice in the middle of a larger tensor and a 0-d tensor are
    updated in place, bitwise the float32 formula, and the rest of the base tensor is untouched."""
    rng = np.random.default_rng(3)
    base0 = rng.standard_normal([40]).astype("float32")
    x0 = rng.standard_normal([40]).astype("float32")
    base, xs = paddle.to_tensor(base0), paddle.to_tensor(x0)
    average, value = base[7:31], xs[3:27]  # contiguous views that start inside their buffers
    scalar, scalar_value = paddle.to_tensor(np.float32(1.5)), paddle.to_tensor(np.float32(-2.25))
    assert average.is_contiguous() and scalar.shape == []
    w = np.float32(0.375)
    fused.lerp_([average, scalar], [value, scalar_value], float(w))
    expected = base0.copy()
    expected[7:31] = base0[7:31] + w * (x0[3:27] - base0[7:31])
    if average.data_ptr() == base.data_ptr() + 7 * 4:  # a view: the update is written through
        np.testing.assert_array_equal(base.numpy().view(np.uint32), expected.view(np.uint32))
    np.testing.assert_array_equal(average.numpy().view(np.uint32), expected[7:31].view(np.uint32))
    np.testing.assert_array_equal(scalar.numpy(), np.float32(1.5) + w * (np.float32(-2.25) - np.float32(1.5)))
    np.testing.assert_array_equal(xs.numpy(), x0)  # the values are only read


def test_static_operator_gives_the_dygraph_numbers(fused_ready):
    """paddle_ema_lerp_by_tensor (the static programs' operator, called here in dygraph) = fused.lerp_."""
    from paddle import _C_ops

    initial, values = _pairs("bfloat16", SMALL_SHAPES[:40] + LARGE_SHAPES[:1], seed=5)
    declared = [paddle.to_tensor(a) for a in initial]
    by_fused = [paddle.to_tensor(a) for a in initial]
    _require_run_custom_op()
    outputs = _C_ops._run_custom_op("paddle_ema_lerp_by_tensor", declared, values, paddle.to_tensor([0.01]), 2)
    fused.lerp_(by_fused, values, 0.01)
    for d, f, out in zip(declared, by_fused, outputs):
        np.testing.assert_array_equal(d.numpy(), f.numpy())
        assert out.data_ptr() == d.data_ptr()


def test_bindings_refuse_what_is_not_a_tensor_list(fused_ready):
    module = fused._module()
    with pytest.raises(TypeError, match=r"averages\[1\] is a numpy.ndarray, not a paddle.Tensor"):
        module.lerp_([paddle.zeros([2]), np.zeros(2)], [paddle.zeros([2])] * 2, 0.5, 1)
    with pytest.raises(TypeError, match="values must be a list or tuple"):
        module.lerp_([paddle.zeros([2])], paddle.zeros([2]), 0.5, 1)


@pytest.mark.parametrize("shape", [[2, 6], [12], [4, 1], [1, 3], [1]], ids=str)
def test_pairs_of_other_shapes_are_refused_before_anything_is_written(fused_ready, shape):
    """Every kernel of both implementations, for an average or target of shape [4, 3] paired with
    `shape` (the same size in another shape, another size, shapes that would broadcast): one
    ValueError naming the pair, and no tensor of the call changed, the well-shaped pairs before it
    included. Nothing is broadcast or reshaped."""
    rng = np.random.default_rng(11)
    good = [rng.standard_normal([5]).astype("float32"), rng.standard_normal([2, 2]).astype("float32")]
    values = [paddle.to_tensor(g + 1) for g in good] + [paddle.to_tensor(rng.standard_normal(shape).astype("float32"))]
    calls = {
        "lerp_": [fused.lerp_, reference.lerp_, kernels.lerp_],
        "guarded_lerp_": [lambda a, v, w: fused.guarded_lerp_(a, v, v, w),
                          lambda a, v, w: fused.guarded_lerp_(a, v, v, w, [paddle.empty_like(t) for t in a])],
        "scale_add_": [lambda a, v, w: f(a, v, 1 - w, w) for f in (fused.scale_add_, reference.scale_add_,
                                                                   kernels.scale_add_, kernels.ppdet_update_)],
        "sub_scale_sub_": [fused.sub_scale_sub_, reference.sub_scale_sub_, kernels.sub_scale_sub_],
        "guarded_scale_add_": [lambda a, v, w: fused.guarded_update_("scale_add", a, v, v, 1 - w, w)],
        "copy_": [lambda a, v, w: f(a, v) for f in (fused.copy_, reference.copy_, kernels.copy_)],
    }
    calls["copy_"].append(lambda a, v, w: kernels.lerp_(a, v, 1.0))  # a weight of 1 is a copy
    for op, functions in calls.items():
        for function in functions:
            first, second = ("a target", "a source") if op == "copy_" else ("an average", "a value")
            averages = [paddle.to_tensor(g) for g in good] + [paddle.zeros([4, 3])]
            with pytest.raises(ValueError, match=re.escape(
                    f"paddle_ema {op}: pair 2 has {first} of shape [4, 3] and {second} of shape {shape}; the shapes "
                    "must be equal (nothing was changed)")):
                function(averages, values, 0.25)
            for average, expected in zip(averages, [*good, np.zeros([4, 3], "float32")]):
                assert list(average.shape) == list(expected.shape)
                np.testing.assert_array_equal(average.numpy(), expected)


def test_dygraph_ema_same_with_either_kernel(fused_ready):
    """The EMA front-end gives identical shadows through either path (callers do not change)."""
    shadows = {}
    for mode in ("fused", "reference"):
        paddle.seed(3)
        model = paddle.nn.Sequential(paddle.nn.Linear(64, 300), paddle.nn.LayerNorm(300), paddle.nn.Linear(300, 3))
        ema = ExponentialMovingAverage(model, decay=0.99)
        kernels.set_kernel(mode)
        try:
            for step in range(4):
                with paddle.no_grad():
                    for p in model.parameters():
                        p.set_value(p + 0.01 * (step + 1))
                ema.update()
        finally:
            kernels.set_kernel(None)
        shadows[mode] = [s.numpy() for s in ema.state_dict()["shadow"].values()]
    for f, r in zip(shadows["fused"], shadows["reference"]):
        np.testing.assert_array_equal(f, r)


@pytest.mark.parametrize("threads", ["1", "3"])
def test_thread_count_does_not_change_the_numbers(fused_ready, monkeypatch, threads):
    monkeypatch.setenv("PADDLE_EMA_NUM_THREADS", threads)
    assert fused.num_threads() == int(threads)
    initial, values = _pairs("float16", LARGE_SHAPES + SMALL_SHAPES[:50], seed=6)
    by_fused = [paddle.to_tensor(a) for a in initial]
    by_reference = [paddle.to_tensor(a) for a in initial]
    fused.lerp_(by_fused, values, 0.05)
    reference.lerp_(by_reference, values, 0.05)
    for f, r in zip(by_fused, by_reference):
        np.testing.assert_array_max_ulp(f.numpy(), r.numpy(), maxulp=1)


def test_bad_thread_count_is_refused(monkeypatch):
    monkeypatch.setenv("PADDLE_EMA_NUM_THREADS", "two")
    with pytest.raises(ConfigError, match="PADDLE_EMA_NUM_THREADS must be a whole number from 1 to 1024, got .two."):
        fused.num_threads()
    monkeypatch.delenv("PADDLE_EMA_NUM_THREADS")
    assert fused.num_threads() >= 1


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_first_nonfinite_finds_the_first_bad_tensor(fused_ready, dtype):
    rng = np.random.default_rng(5)
    sizes = [10, 300_000, 7, 0, 200_000, 33]  # large ones take the multi-threaded path
    clean = [rng.standard_normal(n) * 100 for n in sizes]

    def tensors(arrays):
        return [paddle.to_tensor(a.astype("float32")).astype(dtype) for a in arrays]

    assert fused.first_nonfinite(tensors(clean)) is None and reference.first_nonfinite(tensors(clean)) is None
    for bad_value in (np.nan, np.inf, -np.inf):
        for where in ([(4, 199_999)], [(1, 0), (4, 5)], [(5, 32), (2, 3)], [(1, 299_999)]):
            arrays = [a.copy() for a in clean]
            for tensor, element in where:
                arrays[tensor][element] = bad_value
            want = min(tensor for tensor, _ in where)
            assert fused.first_nonfinite(tensors(arrays)) == want, (bad_value, where)
            assert reference.first_nonfinite(tensors(arrays)) == want
    # The largest finite numbers are finite (only an all-ones exponent counts).
    big = {"float32": 3.4e38, "float16": 65504.0, "bfloat16": 3.38e38, "float64": 3.4e38}[dtype]
    assert fused.first_nonfinite(tensors([np.full(1000, big), np.full(5, -big)])) is None
    assert fused.first_nonfinite([]) is None


# --- paddle_ema_all_finite: the static EMA's check (bool [1]), run here in dygraph --------------


def _all_finite(tensors, threads=None):
    from paddle import _C_ops

    _require_run_custom_op()
    (finite,) = _C_ops._run_custom_op(
        "paddle_ema_all_finite", list(tensors), fused.num_threads() if threads is None else threads
    )
    assert finite.shape == [1] and finite.dtype == paddle.bool and finite.place.is_cpu_place()
    return bool(finite.numpy()[0])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_all_finite_op(fused_ready, dtype):
    rng = np.random.default_rng(10)
    sizes = [10, 300_000, 0, 7, 200_000]  # large ones take the multi-threaded path

    def tensors(arrays):
        return [paddle.to_tensor(a.astype("float32")).astype(dtype) for a in arrays]

    clean = [rng.standard_normal(n) * 100 for n in sizes]
    assert _all_finite(tensors(clean))
    assert _all_finite(tensors(clean), threads=1)
    for bad_value in (np.nan, np.inf, -np.inf):
        for tensor, element in ((0, 0), (1, 299_999), (1, 150_000), (3, 6), (4, 0), (4, 199_999)):
            arrays = [a.copy() for a in clean]
            arrays[tensor][element] = bad_value
            assert not _all_finite(tensors(arrays)), (bad_value, tensor, element)
            assert not _all_finite(tensors(arrays), threads=1), (bad_value, tensor, element)
    big = {"float32": 3.4e38, "float16": 65504.0, "bfloat16": 3.38e38, "float64": 3.4e38}[dtype]
    assert _all_finite(tensors([np.full(1000, big), np.full(5, -big)]))
    # Nothing to read is finite: an empty list, or only empty tensors.
    assert _all_finite([])
    assert _all_finite(tensors([np.zeros(0), np.zeros([0])]))


def test_all_finite_op_refuses_what_it_cannot_check(fused_ready):
    # Unlike the dygraph first_nonfinite it hands nothing back for a fallback: an error instead.
    for other in (paddle.zeros([3], "int64"), paddle.zeros([3], "int32"), paddle.zeros([3], "bool")):
        with pytest.raises(OSError, match="paddle_ema_all_finite: value 1 is not a dense CPU tensor"):
            _all_finite([paddle.zeros([4]), other])


# --- paddle_ema_lerp_by_tensor: the static EMA's op (weight as a tensor), run here in dygraph ----


def _lerp_by_tensor(averages, values, weight, dtype="float32"):
    from paddle import _C_ops

    _require_run_custom_op()
    _C_ops._run_custom_op(
        "paddle_ema_lerp_by_tensor", averages, values, paddle.to_tensor([weight], dtype), fused.num_threads()
    )


@pytest.mark.parametrize("value_dtype", ["float32", "float16", "bfloat16"])
def test_lerp_by_tensor_equals_fused_lerp(fused_ready, value_dtype):
    initial, values = _pairs(value_dtype, SMALL_SHAPES[:60] + LARGE_SHAPES, seed=7)
    by_tensor = [paddle.to_tensor(a) for a in initial]
    by_attribute = [paddle.to_tensor(a) for a in initial]
    pointers = [t.data_ptr() for t in by_tensor]
    for weight in (0.3, 2e-4, 0.123456789):
        _lerp_by_tensor(by_tensor, values, np.float32(weight))
        fused.lerp_(by_attribute, values, np.float32(weight))
    assert [t.data_ptr() for t in by_tensor] == pointers  # in place
    for t, a in zip(by_tensor, by_attribute):
        np.testing.assert_array_equal(t.numpy(), a.numpy())


def test_lerp_by_tensor_float64_keeps_a_float64_weight(fused_ready):
    rng = np.random.default_rng(8)
    a0, x = rng.standard_normal([300, 301]), rng.standard_normal([300, 301])
    average = [paddle.to_tensor(a0)]
    _lerp_by_tensor(average, [paddle.to_tensor(x)], 0.123456789, "float64")
    np.testing.assert_array_equal(average[0].numpy(), a0 + 0.123456789 * (x - a0))


def test_lerp_by_tensor_weight_zero_is_a_no_op_and_one_a_copy(fused_ready):
    a0 = [np.array([1.5, -2.0, 0.0, 3.0], "float32"), np.arange(70_000, dtype="float32"), np.ones(3)]
    nan = [np.array([np.nan, np.inf, 1.0, -np.inf], "float32"), np.full(70_000, np.nan, "float32"), np.full(3, np.nan)]
    averages = [paddle.to_tensor(a) for a in a0]
    _lerp_by_tensor(averages, [paddle.to_tensor(v) for v in nan], 0.0)  # 0 * NaN would be NaN
    for a, expected in zip(averages, a0):
        np.testing.assert_array_equal(a.numpy(), expected)
    # Weight 1 takes the values bit for bit (a + 1 * (x - a) is not x, and loses the sign of -0).
    rng = np.random.default_rng(9)
    raw = np.concatenate([[-0.0, 1e-30, 65504.0], rng.standard_normal(200_000) * 1e4]).astype("float32")
    for value_dtype in ("float32", "float16", "bfloat16"):
        value = paddle.to_tensor(raw).astype(value_dtype)
        average = [paddle.to_tensor(np.full(raw.shape, 7.25, "float32"))]
        _lerp_by_tensor(average, [value], 1.0)
        exact = value.astype("float32").numpy()
        np.testing.assert_array_equal(average[0].numpy().view(np.uint32), exact.view(np.uint32))
    average = [paddle.to_tensor(np.full([5], 2.0))]
    _lerp_by_tensor(average, [paddle.to_tensor(np.full([5], -0.0))], 1.0, "float64")
    assert np.signbit(average[0].numpy()).all()


def test_lerp_by_tensor_refuses_what_it_cannot_update(fused_ready):
    average = [paddle.zeros([4], "float32")]
    with pytest.raises(OSError, match="pair 0 is not a CPU pair"):
        _lerp_by_tensor(average, [paddle.zeros([4], "float64")], 0.5)
    for other in ([5], [2, 2]):  # another size, or the same size in another shape: never broadcast or reshaped
        with pytest.raises(OSError, match=re.escape(f"pair 0 has an average of shape [4] and a value of shape {other}")):
            _lerp_by_tensor(average, [paddle.ones(other, "float32")], 0.5)
        assert np.array_equal(average[0].numpy(), np.zeros(4, "float32"))
    from paddle import _C_ops

    for weight in (paddle.to_tensor([0.5, 0.5]), paddle.to_tensor([1], "int64")):
        with pytest.raises(OSError, match="one-element float32 or float64 CPU tensor"):
            _require_run_custom_op()
            _C_ops._run_custom_op("paddle_ema_lerp_by_tensor", average, [paddle.zeros([4])], weight, 1)
    np.testing.assert_array_equal(average[0].numpy(), np.zeros(4, "float32"))


# --- the formulas of the suites, the Kernel object and the sign of zero --------------------------

from suite_oracles import add as oracle_add  # noqa: E402
from suite_oracles import bf16_to_f32  # noqa: E402
from suite_oracles import cast as oracle_cast
from suite_oracles import scale as oracle_scale  # noqa: E402
from suite_oracles import subtract as oracle_subtract

# Values that probe each rounding step: signed zeros, a subnormal whose scaled step underflows to a
# signed zero, large and tiny magnitudes, plus random ones.
SPECIAL = np.array([0.0, -0.0, -1.4e-45, 1.4e-45, 3.0e38, -2.5e-38, 1.0, -1.0], "float32")


def _formula_case(value_dtype, shapes, seed):
    """float32 averages and values of `value_dtype` (as numpy float32 of the exact value, and as
    the tensor the kernels read), SPECIAL values placed in the first tensor of each."""
    rng = np.random.default_rng(seed)
    averages = [rng.standard_normal(s).astype("float32") for s in shapes]
    raw = [(a + rng.standard_normal(a.shape) * 0.5).astype("float32") for a in averages]
    first_a, first_x = averages[0].reshape(-1), raw[0].reshape(-1)
    k = min(len(SPECIAL), first_a.size)
    first_a[:k] = SPECIAL[:k]
    first_x[:k] = SPECIAL[::-1][:k]
    if value_dtype == "float16":
        exact = [oracle_cast(x, np.float16).astype("float32") for x in raw]
        tensors = [paddle.to_tensor(oracle_cast(x, np.float16)) for x in raw]
    elif value_dtype == "bfloat16":  # the bits the tensors hold (Paddle 2.6's cast truncates, later ones round)
        tensors = [paddle.to_tensor(x).astype("bfloat16") for x in raw]
        exact = [bf16_to_f32(t.numpy()) for t in tensors]
    else:
        exact, tensors = raw, [paddle.to_tensor(x) for x in raw]
    return averages, exact, tensors


def _scale_add_oracle(a, x, decay, weight):
    return oracle_add(oracle_scale(a, decay), oracle_scale(x, weight))


def _sub_scale_sub_oracle(a, x, weight):
    return oracle_subtract(a, oracle_scale(oracle_subtract(a, x), weight))


def _assert_bits(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    view = np.uint64 if got.dtype == np.float64 else np.uint32
    assert got.dtype == want.dtype, what
    np.testing.assert_array_equal(got.view(view), want.view(view), err_msg=what)


FORMULA_PATHS = {
    "fused": lambda name: getattr(fused, name),
    "reference": lambda name: getattr(reference, name),
    "kernels": lambda name: getattr(kernels, name),
}


@pytest.mark.parametrize("value_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shapes", [SMALL_SHAPES, LARGE_SHAPES], ids=["302-small", "2-large"])
@pytest.mark.parametrize("path", list(FORMULA_PATHS))
def test_suite_formulas_are_the_suites_ops_bit_for_bit(fused_ready, value_dtype, shapes, path):
    # The oracle is tests/suite_oracles.py's scale/add/subtract, each checked against Paddle's op.
    decay = 0.9998
    weight = 1 - decay  # in float64, as the suites compute it: not 1 - float32(decay)
    initial, exact, values = _formula_case(value_dtype, shapes, seed=7)
    scale_add_ = FORMULA_PATHS[path]("scale_add_")
    sub_scale_sub_ = FORMULA_PATHS[path]("sub_scale_sub_")
    by_scale_add = [paddle.to_tensor(a) for a in initial]
    by_sub = [paddle.to_tensor(a) for a in initial]
    scale_add_(by_scale_add, values, decay, weight)
    sub_scale_sub_(by_sub, values, weight)
    for i, (a0, x) in enumerate(zip(initial, exact)):
        _assert_bits(by_scale_add[i].numpy(), _scale_add_oracle(a0, x, decay, weight), f"scale_add_ {i}")
        _assert_bits(by_sub[i].numpy(), _sub_scale_sub_oracle(a0, x, weight), f"sub_scale_sub_ {i}")


@pytest.mark.parametrize("path", list(FORMULA_PATHS))
def test_suite_formulas_in_float64(fused_ready, path):
    rng = np.random.default_rng(8)
    initial = [rng.standard_normal([300, 301]), np.array([0.0, -0.0, -5e-324, 1.0])]
    raw = [rng.standard_normal(initial[0].shape), np.array([-0.0, 0.0, 5e-324, 2.0])]
    for name in ("scale_add_", "sub_scale_sub_"):
        averages = [paddle.to_tensor(a) for a in initial]
        values = [paddle.to_tensor(x) for x in raw]
        function = FORMULA_PATHS[path](name)
        if name == "scale_add_":
            function(averages, values, 0.75, 0.25)
            want = [_scale_add_oracle(a, x, 0.75, 0.25) for a, x in zip(initial, raw)]
        else:
            function(averages, values, 0.25)
            want = [_sub_scale_sub_oracle(a, x, 0.25) for a, x in zip(initial, raw)]
        for got, expected in zip(averages, want):
            _assert_bits(got.numpy(), expected, f"{name} {path}")


def test_sub_scale_sub_is_not_a_lerp_in_the_sign_of_zero(fused_ready):
    # s = -0, p = +0: EMAModel's s - w (s - p) keeps -0, a lerp gives +0.
    for path in ("fused", "reference"):
        lerped, subbed = paddle.to_tensor([-0.0]), paddle.to_tensor([-0.0])
        FORMULA_PATHS[path]("lerp_")([lerped], [paddle.to_tensor([0.0])], 0.25)
        FORMULA_PATHS[path]("sub_scale_sub_")([subbed], [paddle.to_tensor([0.0])], 0.25)
        assert np.signbit(subbed.numpy()[0]) and not np.signbit(lerped.numpy()[0]), path


def test_reference_lerp_keeps_the_sign_of_an_underflowing_step(fused_ready):
    # a = -0, x = -1.4e-45, w = 0.25: w (x - a) underflows to -0; paddle.lerp and the fused kernel
    # give -0 + -0 = -0, and so must the reference ops (scale's default bias of +0 would give +0).
    a, x = np.array([-0.0, 0.0, -0.0], "float32"), np.array([-1.4e-45, 1.4e-45, 0.0], "float32")
    by_paddle = paddle.lerp(paddle.to_tensor(a), paddle.to_tensor(x), 0.25).numpy()
    for lerp_ in (fused.lerp_, reference.lerp_):
        average = paddle.to_tensor(a)
        lerp_([average], [paddle.to_tensor(x)], 0.25)
        _assert_bits(average.numpy(), by_paddle, lerp_.__module__)
    assert list(np.signbit(by_paddle)) == [True, False, False]


def _kernel_case(seed=9):
    rng = np.random.default_rng(seed)
    initial = [rng.standard_normal(s).astype("float32") for s in ([700, 513], [33], [4, 4])]
    steps = [[(a + rng.standard_normal(a.shape)).astype("float32") for a in initial] for _ in range(3)]
    return initial, steps


@pytest.mark.parametrize("mode", ["fused", "reference"])
def test_kernel_formulas_equal_the_module_functions(fused_ready, mode):
    initial, steps = _kernel_case()
    kernels.set_kernel(mode)
    try:
        for name, call in (("lerp_", lambda k, v: k.lerp_(v, 0.3)),
                           ("scale_add_", lambda k, v: k.scale_add_(v, 0.7, 1 - 0.7)),
                           ("sub_scale_sub_", lambda k, v: k.sub_scale_sub_(v, 0.3))):
            mine = [paddle.to_tensor(a) for a in initial]
            theirs = [paddle.to_tensor(a) for a in initial]
            kernel = kernels.Kernel(mine)
            assert kernel.name is None  # chosen at the first call
            for values in steps:
                tensors = [paddle.to_tensor(v) for v in values]
                assert call(kernel, tensors) is None
                if name == "lerp_":
                    reference.lerp_(theirs, tensors, 0.3)
                elif name == "scale_add_":
                    reference.scale_add_(theirs, tensors, 0.7, 1 - 0.7)
                else:
                    reference.sub_scale_sub_(theirs, tensors, 0.3)
            assert kernel.name == mode
            for got, want in zip(mine, theirs):
                _assert_bits(got.numpy(), want.numpy(), f"{name} {mode}")
    finally:
        kernels.set_kernel(None)


@pytest.mark.parametrize("mode", ["fused", "reference"])
@pytest.mark.parametrize("formula", ["lerp_", "scale_add_", "sub_scale_sub_", "copy_from"])
def test_kernel_guard_leaves_everything_when_a_scanned_tensor_is_not_finite(fused_ready, mode, formula):
    initial, steps = _kernel_case(seed=10)
    kernels.set_kernel(mode)
    try:
        averages = [paddle.to_tensor(a) for a in initial]
        kernel = kernels.Kernel(averages)
        values = [paddle.to_tensor(v) for v in steps[0]]
        other = paddle.to_tensor(np.array([1.0, np.inf], "float32"))  # a weight this rank does not average
        call = {"lerp_": lambda scan: kernel.lerp_(values, 0.3, scan=scan),
                "scale_add_": lambda scan: kernel.scale_add_(values, 0.7, 0.3, scan=scan),
                "sub_scale_sub_": lambda scan: kernel.sub_scale_sub_(values, 0.3, scan=scan),
                "copy_from": lambda scan: kernel.copy_from(values, scan=scan)}[formula]
        assert call([values[0], other, values[1]]) == 1
        bad = values[2].numpy().copy()
        bad[1, 2] = np.nan
        values[2] = paddle.to_tensor(bad)
        assert call(values) == 2
        for got, want in zip(kernel.averages, initial):
            _assert_bits(got.numpy(), want, f"{formula} {mode}")
        values[2] = paddle.to_tensor(steps[0][2])
        assert call(values) is None
        assert not np.array_equal(kernel.averages[0].numpy(), initial[0])
    finally:
        kernels.set_kernel(None)


def test_kernel_choice_follows_the_mode_at_the_next_call(fused_ready, monkeypatch):
    averages = [paddle.zeros([4])]
    kernel = kernels.Kernel(averages)
    kernel.lerp_([paddle.ones([4])], 0.5)
    assert kernel.name == "fused"
    kernels.set_kernel("reference")
    try:
        kernel.lerp_([paddle.ones([4])], 0.5)
        assert kernel.name == "reference"
    finally:
        kernels.set_kernel(None)
    monkeypatch.setenv("PADDLE_EMA_KERNEL", "reference")
    kernel.lerp_([paddle.ones([4])], 0.5)
    assert kernel.name == "reference"
    monkeypatch.delenv("PADDLE_EMA_KERNEL")
    kernel.lerp_([paddle.ones([4])], 0.5)
    assert kernel.name == "fused"
    np.testing.assert_array_equal(averages[0].numpy(), np.full(4, 1 - 0.5**4, "float32"))


def test_kernel_lends_its_guard_spares_only_when_they_fit(fused_ready):
    averages = [paddle.zeros([600, 600]), paddle.zeros([9])]  # above the one-pass path's threshold
    values = [paddle.ones([600, 600]), paddle.ones([9])]
    kernel = kernels.Kernel(averages)
    assert kernel.lerp_(values, 0.5, scan=values) is None
    spares = kernel.spares
    assert spares is not None and not kernel.spares_shared
    assert [a.data_ptr() for a in kernel.averages] != [s.data_ptr() for s in spares]
    # Tensors of the averages' shapes and dtypes: the same buffers, lent.
    assert kernel.scratch_like(values) is spares and kernel.spares_shared
    # Others (another dtype): a set of the kernel's own, kept for the next call.
    halves = [v.astype("float16") for v in values]
    scratch = kernel.scratch_like(halves)
    assert scratch is not spares and [s.dtype for s in scratch] == [paddle.float16] * 2
    assert kernel.scratch_like(halves) is scratch
    # Lent for good (apply(need_restore=False)): the guard makes new ones.
    kernel.forget_scratch()
    assert kernel.spares is None
    assert kernel.lerp_(values, 0.5, scan=values) is None and kernel.spares is not None
    np.testing.assert_array_equal(kernel.averages[1].numpy(), np.full(9, 0.75, "float32"))
    # rebind() keeps spares that fit the new averages and drops others.
    kept = kernel.spares
    kernel.rebind([paddle.zeros([600, 600]), paddle.zeros([9])])
    assert kernel.spares is kept
    kernel.rebind([paddle.zeros([3])])
    assert kernel.spares is None
