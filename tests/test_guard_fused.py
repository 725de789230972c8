"""The guard fused with the update (fused.guarded_lerp_), in place and written into spares that
then trade buffers with the averages: same decisions and bit-identical shadows as the separate
scan + update, and as the unguarded update on finite runs."""


import numpy as np
import paddle
import pytest

from paddle_ema import ExponentialMovingAverage
from paddle_ema.kernels import fused, reference

pytestmark = pytest.mark.skipif(not fused.available(), reason="the fused extension cannot be built here")

# Large enough that the scan and the update run multi-threaded in several chunks each, and that
# the update into spares takes its streaming pass (10 MB of float32 averages, over the 8 MB of
# kStreamingLerpBytes in ema_ops.cc).
SHAPES = [[300, 700], [5], [1000, 130], [3, 3, 64, 64], [17], [1], [1100, 2000]]


def _tensors(seed, dtype="float32"):
    rng = np.random.default_rng(seed)
    return [paddle.to_tensor(rng.standard_normal(s).astype("float32")).astype(dtype) for s in SHAPES]


# The two ways of the guarded update: in place (scan, then update), and into spares (one pass,
# then the buffers trade places).
PATHS = ["in place", "spares"]


def _guarded(path, averages, values, scan, weight):
    spares = [paddle.empty_like(a) for a in averages] if path == "spares" else None
    return fused.guarded_lerp_(averages, values, scan, weight, spares)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_guarded_update_equals_unguarded_bit_for_bit_when_finite(dtype, path):
    values = _tensors(1, dtype)
    start = [v.astype("float64" if dtype == "float64" else "float32") * 0.5 for v in values]
    guarded = [s.clone() for s in start]
    plain = [s.clone() for s in start]
    assert _guarded(path, guarded, values, values, 0.0137) is None
    fused.lerp_(plain, values, 0.0137)
    by_reference = [s.clone() for s in start]
    reference.lerp_(by_reference, values, 0.0137)
    for g, p, r in zip(guarded, plain, by_reference):
        assert g.dtype == p.dtype and g.shape == p.shape
        assert np.array_equal(g.numpy().view(np.uint8), p.numpy().view(np.uint8))
        np.testing.assert_array_max_ulp(g.numpy(), r.numpy(), maxulp=0 if dtype in ("float32", "float64") else 1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [(0, 0), (0, 209_999), (2, 64_999), (3, 36_863), (5, 0)])
def test_any_nonfinite_value_leaves_every_average_untouched(bad, where, path):
    values = _tensors(2)
    tensor, flat = where
    poisoned = values[tensor].numpy().reshape(-1).copy()
    poisoned[flat] = bad
    values[tensor] = paddle.to_tensor(poisoned.reshape(SHAPES[tensor]))
    averages = _tensors(3)
    before = [a.numpy().copy() for a in averages]
    assert _guarded(path, averages, values, values, 0.5) == tensor
    for a, b in zip(averages, before):
        assert np.array_equal(a.numpy().view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("path", PATHS)
def test_first_bad_index_is_the_lowest_and_scan_may_cover_more_than_the_values(path):
    scan = _tensors(4)
    for i in (4, 1):
        arr = scan[i].numpy().copy()
        arr.reshape(-1)[-1] = np.nan
        scan[i] = paddle.to_tensor(arr)
    averages = [s.clone() for s in _tensors(5)[:2]]
    before = [a.numpy().copy() for a in averages]
    # Values are a subset (a sharded rank's own weights); the finiteness of all of scan decides.
    assert _guarded(path, averages, _tensors(6)[:2], scan, 0.25) == 1
    assert all(np.array_equal(a.numpy(), b) for a, b in zip(averages, before))
    # Values that are themselves the first bad tensors of scan: the lowest index of scan.
    shaped = [_tensors(5)[4].clone(), _tensors(5)[1].clone()]  # each average of its value's shape
    kept = [a.numpy().copy() for a in shaped]
    assert _guarded(path, shaped, [scan[4], scan[1]], scan, 0.25) == 1
    assert all(np.array_equal(a.numpy(), b) for a, b in zip(shaped, kept))
    # Bad tensors both among the values and not (another rank's shard): still the lowest index of scan.
    for first_value, second_value in ((0, 1), (0, 4)):
        pair = [_tensors(5)[first_value].clone(), _tensors(5)[second_value].clone()]
        kept = [a.numpy().copy() for a in pair]
        assert _guarded(path, pair, [scan[first_value], scan[second_value]], scan, 0.25) == 1
        assert all(np.array_equal(a.numpy(), b) for a, b in zip(pair, kept))
    # A bad tensor of scan that is no value (another rank's shard), the values finite.
    scan[1] = _tensors(4)[1]
    assert _guarded(path, averages, [scan[0], scan[1]], scan, 0.25) == 4
    assert all(np.array_equal(a.numpy(), b) for a, b in zip(averages, before))


def test_with_spares_the_averages_keep_their_objects_and_trade_buffers_with_the_spares():
    values = _tensors(8)
    averages = _tensors(9)
    spares = [paddle.empty_like(a) for a in averages]
    expected = [a.clone() for a in averages]
    fused.lerp_(expected, values, 0.3)
    old_average_buffers = [a.data_ptr() for a in averages]
    old_spare_buffers = [s.data_ptr() for s in spares]
    ids = [id(a) for a in averages]
    assert fused.guarded_lerp_(averages, values, values, 0.3, spares) is None
    assert [id(a) for a in averages] == ids
    assert [a.data_ptr() for a in averages] == old_spare_buffers
    assert [s.data_ptr() for s in spares] == old_average_buffers
    for a, e in zip(averages, expected):
        assert list(a.shape) == list(e.shape) and a.dtype == e.dtype
        assert np.array_equal(a.numpy().view(np.uint32), e.numpy().view(np.uint32))
    # A second update writes into the old buffers and trades them back.
    fused.lerp_(expected, values, 0.3)
    assert fused.guarded_lerp_(averages, values, values, 0.3, spares) is None
    assert [a.data_ptr() for a in averages] == old_average_buffers
    for a, e in zip(averages, expected):
        assert np.array_equal(a.numpy().view(np.uint32), e.numpy().view(np.uint32))


def test_a_set_that_fits_in_the_cache_is_updated_in_place_and_the_spares_are_left_alone():
    values = _tensors(12)[:6]  # 1.5 MB
    averages = _tensors(13)[:6]
    spares = [paddle.empty_like(a) for a in averages]
    expected = [a.clone() for a in averages]
    fused.lerp_(expected, values, 0.3)
    buffers, spare_buffers = [a.data_ptr() for a in averages], [s.data_ptr() for s in spares]
    assert fused.guarded_lerp_(averages, values, values, 0.3, spares) is None
    assert [a.data_ptr() for a in averages] == buffers and [s.data_ptr() for s in spares] == spare_buffers
    for a, e in zip(averages, expected):
        assert np.array_equal(a.numpy().view(np.uint32), e.numpy().view(np.uint32))
    poisoned = [v.clone() for v in values]
    poisoned[3] = paddle.full_like(values[3], float("nan"))
    before = [a.numpy().copy() for a in averages]
    assert fused.guarded_lerp_(averages, poisoned, poisoned, 0.3, spares) == 3
    assert all(np.array_equal(a.numpy(), b) for a, b in zip(averages, before))


def test_spares_that_do_not_fit_take_the_in_place_path():
    values = _tensors(10)
    for spares_of in (
        lambda averages: [paddle.empty_like(a).astype("float64") for a in averages],  # another dtype
        lambda averages: [paddle.empty([2]) for _ in averages],  # another size
        lambda averages: averages,  # the averages themselves
    ):
        averages = _tensors(11)
        expected = [a.clone() for a in averages]
        fused.lerp_(expected, values, 0.3)
        buffers = [a.data_ptr() for a in averages]
        assert fused.guarded_lerp_(averages, values, values, 0.3, spares_of(averages)) is None
        assert [a.data_ptr() for a in averages] == buffers  # updated in place
        for a, e in zip(averages, expected):
            assert np.array_equal(a.numpy().view(np.uint32), e.numpy().view(np.uint32))


def test_strided_scan_tensor_takes_the_separate_path_with_the_same_answer():
    values = _tensors(7)
    base = paddle.to_tensor(np.full((40, 40), 1.0, np.float32))
    strided = base[:, ::2]
    if strided.is_contiguous():
        pytest.skip("this Paddle makes slices contiguous copies")
    arr = base.numpy()
    arr[3, 4] = np.inf
    base.set_value(arr)
    averages = [v.clone() * 0 for v in values]
    assert fused.guarded_lerp_(averages, values, values + [base[:, ::2]], 0.5) == len(values)
    assert all(float(a.abs().max()) == 0.0 for a in averages)


def _model():
    paddle.seed(0)
    return paddle.nn.Sequential(paddle.nn.Linear(200, 400), paddle.nn.ReLU(), paddle.nn.Linear(400, 300))


def test_kernel_choice_follows_set_kernel_and_the_variable_at_once(monkeypatch):
    from paddle_ema import kernels

    calls = []
    original = fused.guarded_lerp_
    monkeypatch.setattr(fused, "guarded_lerp_", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = _model()
    ema = ExponentialMovingAverage(model, 0.9)
    ema.update()
    assert len(calls) == 1
    kernels.set_kernel("reference")
    try:
        ema.update()
        assert len(calls) == 1  # the reference path, from the very next call
    finally:
        kernels.set_kernel(None)
    ema.update()
    assert len(calls) == 2
    monkeypatch.setenv("PADDLE_EMA_KERNEL", "reference")
    ema.update()
    assert len(calls) == 2
    monkeypatch.setenv("PADDLE_EMA_KERNEL", "fused")
    ema.update()
    assert len(calls) == 3


def test_thread_count_follows_the_variable_at_once(monkeypatch):
    monkeypatch.setenv("PADDLE_EMA_NUM_THREADS", "1")
    assert fused.num_threads() == 1
    monkeypatch.setenv("PADDLE_EMA_NUM_THREADS", "5")
    assert fused.num_threads() == 5
    monkeypatch.delenv("PADDLE_EMA_NUM_THREADS")
    import os

    assert fused.num_threads() == len(os.sched_getaffinity(0))
