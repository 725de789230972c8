"""update_bn computes per-batch moments on the device and merges them on the host: checked
against the float64 moments of the layer inputs, in both argument orders, NHWC included, and
without any activation reaching the host."""

import numpy as np
import paddle
import pytest

from paddle_ema.batchnorm import update_bn


class Net(paddle.nn.Layer):
    def __init__(self, data_format="NCHW"):
        super().__init__()
        self.data_format = data_format
        self.conv = paddle.nn.Conv2D(2, 5, 3, data_format=data_format)
        self.bn = paddle.nn.BatchNorm2D(5, momentum=0.7, data_format=data_format)
        self.frozen = paddle.nn.BatchNorm2D(5, use_global_stats=True, data_format=data_format)

    def forward(self, x):
        return self.frozen(self.bn(self.conv(x)))


def _batches(data_format, offset=100.0):
    rng = np.random.default_rng(0)
    shape = lambda n: (n, 2, 9, 9) if data_format == "NCHW" else (n, 9, 9, 2)  # noqa: E731
    return [paddle.to_tensor((rng.standard_normal(shape(n)) * 0.3 + offset).astype("float32")) for n in (6, 11, 3)]


def _oracle(values, axis):
    values = np.moveaxis(np.concatenate(values).astype(np.float64), axis, -1)
    values = values.reshape(-1, values.shape[-1])
    return values.mean(axis=0), values.var(axis=0)


@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
@pytest.mark.parametrize("order", ["model_first", "loader_first"])
def test_moments_match_the_float64_oracle(data_format, order):
    net = Net(data_format)
    batches = _batches(data_format)
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
        mean, variance = _oracle(inputs, axis)
        np.testing.assert_allclose(layer._mean.numpy(), mean, rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(layer._variance.numpy(), variance, rtol=1e-4)


def test_no_activation_reaches_the_host(monkeypatch):
    net = Net()
    batches = _batches("NCHW", offset=0.0)
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
