"""BatchNorm recalibration: running statistics that match the weights now in the model.

An average of weights (EMA, SWA) was never run forward during training, so the BatchNorm running
statistics collected with the raw weights do not describe its activations. `update_bn` runs the
model over data and sets each BatchNorm layer's `_mean`/`_variance` to the exact mean and
population variance of that layer's inputs over the pass (Paddle's running variance is the
population one too). The statistics are accumulated in float64 with Chan's parallel formulas, one
batch at a time, so the result does not depend on BatchNorm's momentum, which is left as it was.
"""

import numpy as np
import paddle
from paddle.nn.layer.norm import _BatchNormBase

from .selection import unwrap

__all__ = ["batchnorm_layers", "bn_statistics", "set_bn_statistics", "update_bn"]


def batchnorm_layers(model):
    """[(name, layer)] for every BatchNorm layer (BatchNorm1D/2D/3D, SyncBatchNorm, legacy BatchNorm)."""
    return [
        (name, layer)
        for name, layer in unwrap(model).named_sublayers(include_self=True)
        if isinstance(layer, (_BatchNormBase, paddle.nn.BatchNorm))
    ]


def bn_statistics(model):
    """{layer name: (mean, variance)} copies of the running statistics, for set_bn_statistics()."""
    return {name: (layer._mean.numpy().copy(), layer._variance.numpy().copy()) for name, layer in batchnorm_layers(model)}


def set_bn_statistics(model, statistics):
    for name, layer in batchnorm_layers(model):
        if name in statistics:
            mean, variance = statistics[name]
            layer._mean.set_value(np.asarray(mean).astype(layer._mean.numpy().dtype))
            layer._variance.set_value(np.asarray(variance).astype(layer._variance.numpy().dtype))


def _channel_axis(layer):
    data_format = getattr(layer, "_data_format", None) or getattr(layer, "_data_layout", "NCHW")
    return 1 if data_format.startswith("NC") else -1


class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch in float64."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, x, axis):
        values = np.moveaxis(x.astype("float64").numpy(), axis, -1).reshape(-1, x.shape[axis])
        n = values.shape[0]
        mean = values.mean(axis=0)
        m2 = ((values - mean) ** 2).sum(axis=0)
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total


@paddle.no_grad()
def update_bn(model, loader, num_batches=None):
    """Recompute BatchNorm statistics with a pass over `loader`; returns the statistics replaced.

    Each batch is `x` or a tuple/list whose first element is `x`; the model runs in training mode
    (as during training, each BatchNorm normalises with its batch) and is put back in the mode it
    had. `num_batches` limits the pass. The return value restores the old statistics through
    `set_bn_statistics(model, old)`. A model without BatchNorm is left untouched.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return {}
    previous = bn_statistics(model)
    moments = {name: _Moments() for name, _ in layers}
    hooks = [
        layer.register_forward_pre_hook(
            lambda layer, inputs, name=name: moments[name].add(inputs[0], _channel_axis(layer))
        )
        for name, layer in layers
    ]
    was_training = unwrap(model).training
    model.train()
    try:
        for index, batch in enumerate(loader):
            if num_batches is not None and index >= num_batches:
                break
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for hook in hooks:
            hook.remove()
        if not was_training:
            model.eval()
    for name, layer in layers:
        m = moments[name]
        if m.count:
            layer._mean.set_value(m.mean.astype(layer._mean.numpy().dtype))
            layer._variance.set_value((m.m2 / m.count).astype(layer._variance.numpy().dtype))
    return previous
