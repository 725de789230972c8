"""update_bn: recalibrated BatchNorm statistics are the exact moments of the layer inputs, for
applied EMA weights too; per-batch moments are computed on the device and merged on the host,
checked against the float64 moments in both argument orders, NHWC included, without any
activation reaching the host."""

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddle_ema import ExponentialMovingAverage
from paddle_ema.batchnorm import bn_statistics, set_bn_statistics, update_bn


class Net(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(1, 4, 3)
        self.bn2d = paddle.nn.BatchNorm2D(4)
        self.fc = paddle.nn.Linear(4 * 6 * 6, 5)
        self.bn1d = paddle.nn.BatchNorm1D(5)

    def forward(self, x):
        return self.bn1d(self.fc(F.relu(self.bn2d(self.conv(x))).flatten(1)))


def test_recalibrated_statistics_are_the_exact_moments_of_the_layer_inputs():
    net = Net()
    rng = np.random.default_rng(0)
    batches = [paddle.to_tensor(rng.standard_normal((n, 1, 8, 8)).astype("float32") * 3 + 1) for n in (7, 16, 5)]
    net.eval()
    before = bn_statistics(net)
    previous = update_bn(net, [(x, None) for x in batches])
    recalibrated = bn_statistics(net)
    assert not net.training  # put back in the mode it had
    for name in before:
        np.testing.assert_array_equal(previous[name][0], before[name][0])

    # Independent path: the conv outputs over all data, in float64.
    conv_out = np.concatenate([net.conv(x).numpy().astype(np.float64) for x in batches])
    np.testing.assert_allclose(net.bn2d._mean.numpy(), conv_out.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.bn2d._variance.numpy(), conv_out.var(axis=(0, 2, 3)), rtol=1e-5)

    # bn1d's inputs depend on bn2d normalising each batch with its own statistics (training mode).
    fc_inputs = []
    hook = net.fc.register_forward_post_hook(lambda layer, inputs, out: fc_inputs.append(out.numpy().astype(np.float64)))
    net.train()
    with paddle.no_grad():
        for x in batches:
            net(x)
    hook.remove()
    fc_all = np.concatenate(fc_inputs)
    mean, variance = recalibrated["bn1d"]  # this pass moved the running statistics again
    np.testing.assert_allclose(mean, fc_all.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variance, fc_all.var(axis=0), rtol=1e-5)


def test_num_batches_limits_the_pass_and_old_statistics_come_back():
    net = Net()
    rng = np.random.default_rng(1)
    batches = [paddle.to_tensor(rng.standard_normal((8, 1, 8, 8)).astype("float32") + i) for i in range(4)]
    old = update_bn(net, batches, num_batches=1)
    conv_out = net.conv(batches[0]).numpy().astype(np.float64)
    np.testing.assert_allclose(net.bn2d._mean.numpy(), conv_out.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    set_bn_statistics(net, old)
    np.testing.assert_array_equal(net.bn2d._mean.numpy(), old["bn2d"][0])


def test_update_bn_for_applied_ema_weights_and_model_without_bn():
    net = Net()
    ema = ExponentialMovingAverage(net, 0.5, thres_steps=False)
    for p in net.parameters():
        if not p.stop_gradient:
            p.set_value(p.numpy() * 2)
    ema.update()
    rng = np.random.default_rng(2)
    data = [paddle.to_tensor(rng.standard_normal((8, 1, 8, 8)).astype("float32"))]
    with ema.apply():
        update_bn(net, data)
        conv_out = net.conv(data[0]).numpy().astype(np.float64)  # conv with the averaged weights
        np.testing.assert_allclose(net.bn2d._mean.numpy(), conv_out.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert update_bn(paddle.nn.Linear(2, 2), data) == {}


# --- the moments' merge, the data formats and the argument order ---------------------------------


class FormatNet(paddle.nn.Layer):
    def __init__(self, data_format="NCHW"):
        super().__init__()
        self.data_format = data_format
        self.conv = paddle.nn.Conv2D(2, 5, 3, data_format=data_format)
        self.bn = paddle.nn.BatchNorm2D(5, momentum=0.7, data_format=data_format)
        self.frozen = paddle.nn.BatchNorm2D(5, use_global_stats=True, data_format=data_format)

    def forward(self, x):
        return self.frozen(self.bn(self.conv(x)))


def _format_batches(data_format, offset=100.0):
    rng = np.random.default_rng(0)
    shape = lambda n: (n, 2, 9, 9) if data_format == "NCHW" else (n, 9, 9, 2)  # noqa: E731
    return [paddle.to_tensor((rng.standard_normal(shape(n)) * 0.3 + offset).astype("float32")) for n in (6, 11, 3)]


def _moments_oracle(values, axis):
    values = np.moveaxis(np.concatenate(values).astype(np.float64), axis, -1)
    values = values.reshape(-1, values.shape[-1])
    return values.mean(axis=0), values.var(axis=0)


@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
@pytest.mark.parametrize("order", ["model_first", "loader_first"])
def test_moments_match_the_float64_oracle(data_format, order):
    net = FormatNet(data_format)
    batches = _format_batches(data_format)
    axis = 1 if data_format == "NCHW" else -1
    conv_out = [net.conv(x).numpy() for x in batches]
    # frozen's inputs: bn normalises each batch with its own statistics in training mode
    net.train()
    with paddle.no_grad():
        bn_out = [net.bn(net.conv(x)).numpy() for x in batches]
    net.eval()
    if order == "model_first":
        update_bn(net, batches)
    else:
        update_bn(batches, net)  # PyTorch's order
    assert not net.training and net.bn._momentum == 0.7
    for layer, inputs in ((net.bn, conv_out), (net.frozen, bn_out)):
        mean, variance = _moments_oracle(inputs, axis)
        np.testing.assert_allclose(layer._mean.numpy(), mean, rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(layer._variance.numpy(), variance, rtol=1e-4)


def test_no_activation_reaches_the_host(monkeypatch):
    net = FormatNet()
    batches = _format_batches("NCHW", offset=0.0)
    shapes = []
    original = paddle.Tensor.numpy

    def recording(self, *args, **kwargs):
        shapes.append(list(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(paddle.Tensor, "numpy", recording)
    update_bn(net, batches)
    assert shapes and all(len(s) == 1 and s[0] == 5 for s in shapes), shapes


def test_neither_argument_a_layer_is_a_type_error():
    with pytest.raises(TypeError, match="update_bn needs a paddle.nn.Layer and a loader"):
        update_bn([1], [2])
