"""One test per shim of paddle_ema._compat, on the Paddle installed: each does what it says."""

import contextlib
import os

import numpy as np
import paddle
import pytest

from paddle_ema import _compat

PADDLE3 = int(paddle.__version__.split(".")[0]) >= 3


def test_every_shim_has_a_test():
    tested = {name[len("test_"):] for name in globals() if name.startswith("test_")}
    assert set(_compat.__all__) <= tested, sorted(set(_compat.__all__) - tested)


def _run_static(build, fetch_count=1, pir=True):
    """Build a program with `build()` (returns values to fetch) and run it on the CPU."""
    paddle.enable_static()
    try:
        main, startup = paddle.static.Program(), paddle.static.Program()
        with paddle.static.program_guard(main, startup):
            fetch = build()
        exe = paddle.static.Executor(paddle.CPUPlace())
        exe.run(startup)
        return exe.run(main, fetch_list=list(fetch)), main
    finally:
        paddle.disable_static()


@pytest.mark.skipif(not PADDLE3, reason="PIR programs need Paddle 3")
def test_inplace_add_():
    x = paddle.to_tensor([1.0, 2.0])
    _compat.inplace_add_(x, paddle.to_tensor([0.5, 0.25]))
    assert x.numpy().tolist() == [1.5, 2.25]


@pytest.mark.skipif(not PADDLE3, reason="custom ops through _C_ops need Paddle 3")
def test_run_custom_op():
    from paddle_ema.kernels import build

    try:
        build.load_extension()
    except build.BuildError as exc:
        pytest.fail(f"the extension must build to test this shim: {exc}")
    values = [paddle.to_tensor([1.0, 2.0]), paddle.to_tensor([np.inf])]
    (finite,) = _compat.run_custom_op("paddle_ema_all_finite", values, 1)
    assert finite.numpy().tolist() == [False]


def test_legacy_layer_helper():
    helper = _compat.legacy_layer_helper("scale")
    assert helper.layer_type == "scale"


def test_expected_place():
    paddle.set_device("cpu")
    assert _compat.is_cpu_place(_compat.expected_place())


def test_is_cpu_place():
    assert _compat.is_cpu_place(paddle.CPUPlace())
    assert _compat.is_cpu_place(paddle.to_tensor([1.0]).place)
    assert not _compat.is_cpu_place(object())


@pytest.mark.skipif(not PADDLE3, reason="PIR needs Paddle 3")
def test_create_pir_persistable():
    def build():
        init = paddle.nn.initializer.Constant(3.0)
        return [_compat.create_pir_persistable("float32", [2], "compat_test_var", init)]

    (value,), _ = _run_static(build)
    assert value.tolist() == [3.0, 3.0]





def _legacy(build):
    """build(main) inside a fresh legacy program (2.6 has only those; on 3.x under OldIrGuard)."""
    guard = paddle.pir_utils.OldIrGuard() if PADDLE3 else contextlib.nullcontext()
    with guard:
        paddle.enable_static()
        try:
            main = paddle.static.Program()
            with paddle.static.program_guard(main, paddle.static.Program()):
                return build(main)
        finally:
            paddle.disable_static()


def test_prepend_legacy_op():
    def body(main):
        x = paddle.static.data("x", [1], "float32")
        paddle.scale(x, 2.0)
        block = main.global_block()
        _compat.prepend_legacy_op(block, type="increment", inputs={"X": [x]}, outputs={"Out": [x]},
                                  attrs={"step": 1.0})
        return [op.type for op in block.ops]

    assert _legacy(body)[0] == "increment"


def test_legacy_optimizer_role():
    def body(main):
        x = paddle.static.data("x", [1], "float32")
        with _compat.legacy_optimizer_role(main):
            paddle.scale(x, 2.0)
        paddle.scale(x, 3.0)
        return [(op.type, op.attr("scale"), op.attr("op_role")) for op in main.global_block().ops]

    # OpRole.Optimize is 2 (paddle/fluid/framework/op_proto_maker.h); the op outside the guard is a forward op (0).
    assert _legacy(body) == [("scale", 2.0, 2), ("scale", 3.0, 0)]


def test_lr_scheduler_variable_name():
    def body(main):
        x = paddle.static.data("x", [2, 3], "float32")
        loss = paddle.mean(paddle.static.nn.fc(x, 1))
        plain = _compat.lr_scheduler_variable_name(main)
        scheduler = paddle.optimizer.lr.StepDecay(0.1, step_size=2)
        paddle.optimizer.SGD(learning_rate=scheduler).minimize(loss)
        return plain, _compat.lr_scheduler_variable_name(main)

    plain, name = _legacy(body)
    assert plain is None and isinstance(name, str) and name


def test_to_place():
    assert _compat.is_cpu_place(_compat.to_place("cpu"))


def test_copy_to_place():
    x = paddle.to_tensor([1.0, -2.0])
    copy = _compat.copy_to_place(x, paddle.CPUPlace())
    copy[0] = 5.0
    assert x.numpy().tolist() == [1.0, -2.0] and copy.numpy().tolist() == [5.0, -2.0]


def test_same_place():
    assert _compat.same_place(paddle.to_tensor([1.0]).place, paddle.CPUPlace())


def test_batchnorm_classes():
    classes = _compat.batchnorm_classes()
    for layer in (paddle.nn.BatchNorm1D(3), paddle.nn.BatchNorm2D(3), paddle.nn.BatchNorm3D(3),
                  paddle.nn.SyncBatchNorm(3), paddle.nn.BatchNorm(3)):
        assert isinstance(layer, classes)
    assert not isinstance(paddle.nn.LayerNorm(3), classes)


def test_batchnorm_statistics():
    layer = paddle.nn.BatchNorm2D(2)
    mean, variance = _compat.batchnorm_statistics(layer)
    names = dict(layer.named_parameters())
    assert mean is names["_mean"] and variance is names["_variance"]
    assert mean.numpy().tolist() == [0.0, 0.0] and variance.numpy().tolist() == [1.0, 1.0]


def test_unwrap_layers():
    inner = paddle.nn.Linear(2, 2)
    assert _compat.unwrap_layers(paddle.DataParallel(inner)) is inner
    assert _compat.unwrap_layers(inner) is None


def test_conv_geometry():
    out_channels, kernel_size, padding = _compat.conv_geometry(paddle.nn.Conv2D(3, 5, 3, padding=1))
    assert out_channels == 5 and list(kernel_size) == [3, 3] and padding in (1, [1, 1], [1, 1, 1, 1])


def test_find_cuda_home():
    home = _compat.find_cuda_home()
    assert home is None or isinstance(home, str)


def test_can_share_buffers():
    assert _compat.can_share_buffers(paddle.to_tensor([1.0])) == hasattr(paddle.Tensor, "_share_buffer_to")


@pytest.mark.skipif(not hasattr(paddle.Tensor, "_share_buffer_to"), reason="this Paddle cannot share buffers")
def test_share_buffer():
    source, target = paddle.to_tensor([1.0, 2.0]), paddle.zeros([2])
    _compat.share_buffer(source, target)
    source[0] = 9.0  # the same memory: the write shows through the target
    assert target.numpy().tolist() == [9.0, 2.0]


def test_scope_tensor_initialized():
    scope = paddle.static.Scope()
    var = scope.var("compat_scope_var")
    assert not _compat.scope_tensor_initialized(var)
    var.get_tensor().set(np.ones([2], "float32"), paddle.CPUPlace())
    assert _compat.scope_tensor_initialized(var)


def test_batchnorm_momentum():
    assert _compat.batchnorm_momentum(paddle.nn.BatchNorm2D(2, momentum=0.7)) == pytest.approx(0.7)


def test_set_batchnorm_momentum():
    layer = paddle.nn.BatchNorm1D(2)
    _compat.set_batchnorm_momentum(layer, 0.0)  # running <- the batch's own statistics
    layer.train()
    x = paddle.to_tensor([[1.0, 4.0], [3.0, 8.0]])
    layer(x)
    mean, variance = _compat.batchnorm_statistics(layer)
    assert mean.numpy().tolist() == [2.0, 6.0]


def test_batchnorm_uses_global_stats():
    assert _compat.batchnorm_uses_global_stats(paddle.nn.BatchNorm2D(2, use_global_stats=True))
    assert not _compat.batchnorm_uses_global_stats(paddle.nn.BatchNorm2D(2))


def test_batchnorm_data_format():
    assert _compat.batchnorm_data_format(paddle.nn.BatchNorm2D(2)) == "NCHW"
    assert _compat.batchnorm_data_format(paddle.nn.BatchNorm2D(2, data_format="NHWC")) == "NHWC"


def test_exp():
    # dygraph tensors and legacy-program Variables (which paddle.exp rejects on 3.3)
    values = np.array([-2.0, 0.0, 0.5, 3.0])
    # exp is not correctly rounded in every library: Paddle 2.6.2 differs from numpy by an ulp.
    np.testing.assert_allclose(_compat.exp(paddle.to_tensor(values)).numpy(), np.exp(values), rtol=1e-15)

    def body(main):
        x = paddle.static.data("x", [4], "float64")
        y = _compat.exp(x)
        (out,) = paddle.static.Executor(paddle.CPUPlace()).run(main, feed={"x": values}, fetch_list=[y])
        return out

    np.testing.assert_allclose(_legacy(body), np.exp(values), rtol=1e-15)


def test_save_to_file(tmp_path):
    state = {"w": paddle.to_tensor([[1.0, -2.0], [3.5, 0.25]]), "step": 3, "lr": {"last_epoch": 2}}
    paddle.save(state, str(tmp_path / "by_path.pdparams"))
    with open(tmp_path / "by_file.pdparams", "wb") as f:
        _compat.save_to_file(state, f)
    # the same bytes as paddle.save to a path (names aside: each save numbers its tensors anew)
    loaded = paddle.load(str(tmp_path / "by_file.pdparams"))
    assert loaded["step"] == 3 and loaded["lr"] == {"last_epoch": 2}
    assert loaded["w"].numpy().tolist() == [[1.0, -2.0], [3.5, 0.25]]
    assert (tmp_path / "by_file.pdparams").stat().st_size == (tmp_path / "by_path.pdparams").stat().st_size
    tensor_list = [paddle.to_tensor([1.0, 2.0])]  # not a state dict: paddle.save's other pickler
    with open(tmp_path / "list.pd", "wb") as f:
        _compat.save_to_file(tensor_list, f)
    assert paddle.load(str(tmp_path / "list.pd"))[0].numpy().tolist() == [1.0, 2.0]


def test_dense_tensor(tmp_path):
    tensor = _compat.dense_tensor(np.array([[1.5, -2.0]], np.float32))
    assert np.array(tensor).tolist() == [[1.5, -2.0]] and np.array(tensor).dtype == np.float32
    paddle.save({"w": np.ones([2], np.float32)}, str(tmp_path / "w.pd"))
    paddle.enable_static()
    try:
        loaded = paddle.load(str(tmp_path / "w.pd"))["w"]  # what paddle.load gives in static mode
    finally:
        paddle.disable_static()
    assert type(tensor) is type(loaded)


def test_in_pir_mode():
    assert _compat.in_pir_mode() is False  # dygraph
    paddle.enable_static()
    try:
        if PADDLE3:
            assert _compat.in_pir_mode() is True  # PIR is Paddle 3's default program kind
            with paddle.pir_utils.OldIrGuard():
                assert _compat.in_pir_mode() is False
        else:
            assert _compat.in_pir_mode() is False
    finally:
        paddle.disable_static()


def test_model_optimizer():
    network = paddle.nn.Linear(2, 1)
    model = paddle.Model(network)
    assert _compat.model_optimizer(model) is None
    optimizer = paddle.optimizer.SGD(learning_rate=0.1, parameters=network.parameters())
    model.prepare(optimizer, paddle.nn.MSELoss())
    assert _compat.model_optimizer(model) is optimizer


def test_register_custom_ops(tmp_path):
    # A file that is not a library is refused by Paddle's loader; the kernel tests register the real one.
    not_a_library = tmp_path / "not_a_library.so"
    not_a_library.write_bytes(b"not an ELF file")
    with pytest.raises(Exception):
        _compat.register_custom_ops(not_a_library)


def test_warn_at_caller():
    with pytest.warns(RuntimeWarning, match="said here") as record:
        _compat.warn_at_caller("said here", RuntimeWarning)
    assert record[0].filename == __file__


def test_environment_reader(monkeypatch):
    read = _compat.environment_reader()
    monkeypatch.setenv("PADDLE_EMA_COMPAT_TEST", "é 1")
    assert read("PADDLE_EMA_COMPAT_TEST") == "é 1" == os.environ.get("PADDLE_EMA_COMPAT_TEST")
    monkeypatch.setenv("PADDLE_EMA_COMPAT_TEST", "2")  # a change is seen at once
    assert read("PADDLE_EMA_COMPAT_TEST") == "2"
    monkeypatch.delenv("PADDLE_EMA_COMPAT_TEST")
    assert read("PADDLE_EMA_COMPAT_TEST") is None
    # Where os.environ has no private mapping to read, the reader is os.environ.get.
    plain = {"PADDLE_EMA_COMPAT_TEST": "3"}
    monkeypatch.setattr(os, "environ", plain)
    fallback = _compat.environment_reader()
    assert fallback("PADDLE_EMA_COMPAT_TEST") == "3" and fallback("UNSET_NAME") is None
