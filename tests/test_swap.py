"""apply()/restore() by buffer rotation: bit-exact, and every reader of the weights (forward
pass, optimizer, hooks, state_dict(), paddle.jit.save) sees the averages while applied and the
raw weights after restore."""

import numpy as np
import paddle
import pytest

from paddle_ema import ExponentialMovingAverage


def _trained(steps=3):
    paddle.seed(1)
    model = paddle.nn.Sequential(paddle.nn.Linear(6, 8), paddle.nn.ReLU(), paddle.nn.Linear(8, 3))
    ema = ExponentialMovingAverage(model, 0.5, thres_steps=False)
    optimizer = paddle.optimizer.SGD(0.1, parameters=model.parameters())
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((4, 6)).astype("float32"))
    for _ in range(steps):
        model(x).sum().backward()
        optimizer.step()
        optimizer.clear_grad()
        ema.update()
    return model, ema, optimizer, x


def _bits(t):
    return t.numpy().view(np.uint32).copy()


def test_round_trips_are_bit_exact_and_parameters_keep_their_identity():
    model, ema, _, _ = _trained()
    params = list(model.parameters())
    raw = {p.name: _bits(p) for p in params}
    for _ in range(3):  # the spares are reused
        with ema.apply():
            for name, p in zip(ema.names, params):
                assert np.array_equal(_bits(p), _bits(ema.average(name)))
        assert [id(p) for p in model.parameters()] == [id(p) for p in params]
        for p in params:
            assert np.array_equal(_bits(p), raw[p.name])
    assert all(not p._is_shared_buffer_with(ema.average(n)) for n, p in zip(ema.names, params))


def test_forward_state_dict_and_hooks_see_the_averages_while_applied():
    model, ema, _, x = _trained()
    averaged = paddle.nn.Sequential(paddle.nn.Linear(6, 8), paddle.nn.ReLU(), paddle.nn.Linear(8, 3))
    averaged.set_state_dict({n: ema.average(n) for n in ema.names})
    seen = []
    hook = model[2].register_forward_pre_hook(lambda layer, inputs: seen.append(_bits(layer.weight)))
    with ema.apply():
        assert np.array_equal(model(x).numpy(), averaged(x).numpy())
        state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    hook.remove()
    assert np.array_equal(seen[0], _bits(ema.average("2.weight")))
    for name in ema.names:
        assert np.array_equal(state[name], ema.average(name).numpy())
    assert not np.array_equal(model(x).numpy(), averaged(x).numpy())


def test_optimizer_steps_taken_while_applied_are_dropped_by_restore():
    model, ema, optimizer, x = _trained()
    raw = {p.name: _bits(p) for p in model.parameters()}
    with ema.apply():
        model(x).sum().backward()
        optimizer.step()  # changes the applied (averaged) weights, as with a copying swap
        optimizer.clear_grad()
        changed = _bits(model[0].weight)
    assert not np.array_equal(changed, _bits(ema.average("0.weight")))  # the average is untouched
    assert not np.array_equal(changed, raw[model[0].weight.name])
    for p in model.parameters():
        assert np.array_equal(_bits(p), raw[p.name])
    # and training goes on with the raw weights: the optimizer updates the restored buffers
    model(x).sum().backward()
    optimizer.step()
    assert not np.array_equal(_bits(model[0].weight), raw[model[0].weight.name])


def test_jit_save_while_applied_exports_the_averages(tmp_path):
    model, ema, _, x = _trained()
    with ema.apply():
        expected = model(x).numpy()
        paddle.jit.save(model, str(tmp_path / "m"), input_spec=[paddle.static.InputSpec([None, 6], "float32")])
    loaded = paddle.jit.load(str(tmp_path / "m"))
    loaded.eval()
    np.testing.assert_array_equal(loaded(x).numpy(), expected)
    assert not np.array_equal(model(x).numpy(), expected)


def test_need_restore_false_while_applied_keeps_averages_and_later_applies_still_round_trip():
    model, ema, _, _ = _trained()
    ema.apply()
    ema.apply(need_restore=False)
    assert not ema.is_applied
    for name, p in zip(ema.names, model.parameters()):
        assert np.array_equal(_bits(p), _bits(ema.average(name)))
    with paddle.no_grad():
        for p in model.parameters():
            p.set_value(p * 3)
    now = {p.name: _bits(p) for p in model.parameters()}
    with ema.apply():
        pass
    for p in model.parameters():
        assert np.array_equal(_bits(p), now[p.name])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_round_trip_is_bit_exact(dtype):
    layer = paddle.nn.Linear(40, 30)
    layer.to(dtype=dtype)
    ema = ExponentialMovingAverage(layer, 0.5, thres_steps=False)
    with paddle.no_grad():
        layer.weight.set_value((layer.weight.astype("float32") * 2).astype(dtype))
    ema.update()
    raw = layer.weight.astype("float32").numpy()
    with ema.apply():
        np.testing.assert_array_equal(layer.weight.astype("float32").numpy(),
                                      ema.average("weight").astype(dtype).astype("float32").numpy())
    np.testing.assert_array_equal(layer.weight.astype("float32").numpy(), raw)
