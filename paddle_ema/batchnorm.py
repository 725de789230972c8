"""BatchNorm recalibration: running statistics that match the weights now in the model.

An average of weights (EMA, SWA) was never run forward during training, so the BatchNorm running
statistics collected with the raw weights do not describe its activations. `update_bn` runs the
model over data and sets each BatchNorm layer's `_mean`/`_variance` to the exact mean and
population variance of that layer's inputs over the pass (Paddle's running variance is the
population one too). Each batch's per-channel mean and variance are computed on the model's device
(float32, by BatchNorm's own forward); only those vectors reach the host, where they are merged in
float64 with Chan's parallel formulas, so the result does not depend on BatchNorm's momentum,
which is left as it was.
"""

from typing import Any, Dict, Optional, Tuple

import numpy as np
import paddle

from . import _compat

# batchnorm_layers lives in selection.py, with the one BatchNorm-statistic test; re-exported here.
from .core.selection import batchnorm_layers, unwrap

__all__ = ["batchnorm_layers", "bn_statistics", "set_bn_statistics", "update_bn"]


def bn_statistics(model: paddle.nn.Layer) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Copies of the BatchNorm running statistics, for set_bn_statistics().

    Args:
        model: a `paddle.nn.Layer`, bare or wrapped.

    Returns:
        {layer name: (mean, variance)} as numpy arrays.
    """
    return {name: tuple(s.numpy().copy() for s in _compat.batchnorm_statistics(layer))
            for name, layer in batchnorm_layers(model)}


def set_bn_statistics(model: paddle.nn.Layer, statistics: Dict[str, Tuple[Any, Any]]) -> None:
    """Write running statistics back into the model's BatchNorm layers (each in its own dtype).

    Args:
        model: a `paddle.nn.Layer`, bare or wrapped.
        statistics: {layer name: (mean, variance)}, as bn_statistics() or update_bn() return
            them; layers not named are left as they are.
    """
    for name, layer in batchnorm_layers(model):
        if name in statistics:
            for target, value in zip(_compat.batchnorm_statistics(layer), statistics[name]):
                target.set_value(np.asarray(value).astype(target.numpy().dtype))


def _channel_axis(layer):
    data_format = _compat.batchnorm_data_format(layer)
    return 1 if data_format.startswith("NC") else -1


class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch in float64
    (Chan's parallel formulas) from each batch's float32 mean and population variance."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, n, mean, variance):
        mean = np.asarray(mean, np.float64)
        m2 = np.asarray(variance, np.float64) * n
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total


def _per_channel_count(x, axis):
    """Values per channel, from the shape (Tensor.numel() would read a tensor back)."""
    return int(np.prod(x.shape)) // int(x.shape[axis])


def _batch_moments_on_device(x, axis):
    """(count, mean, population variance) per channel of one input, reduced where x lives;
    only the two per-channel vectors come to the host."""
    axes = [d for d in range(x.ndim) if d != axis % x.ndim]
    x = x.astype("float32") if x.dtype not in (paddle.float32, paddle.float64) else x
    mean = x.mean(axis=axes)
    variance = (x - mean.reshape([-1 if d == axis % x.ndim else 1 for d in range(x.ndim)])).square().mean(axis=axes)
    return _per_channel_count(x, axis), mean.numpy(), variance.numpy()


def _order(model, loader):
    """(model, loader) from either order: update_bn(model, loader) is this library's, and
    PyTorch's torch.optim.swa_utils.update_bn takes (loader, model); a Layer is the model."""
    if not isinstance(model, paddle.nn.Layer) and isinstance(loader, paddle.nn.Layer):
        return loader, model
    if not isinstance(model, paddle.nn.Layer):
        raise TypeError(f"update_bn needs a paddle.nn.Layer and a loader, got {type(model).__name__} "
                        f"and {type(loader).__name__}")
    return model, loader


@paddle.no_grad()
def update_bn(model: Any, loader: Any, num_batches: Optional[int] = None) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Recompute BatchNorm statistics with a pass over `loader`.

    Args:
        model: the `paddle.nn.Layer` (bare or wrapped); PyTorch's order, the loader first, works too.
        loader: an iterable of batches, each `x` or a tuple/list whose first element is `x`.
        num_batches: at most this many batches; None for the whole loader.

    Returns:
        The statistics replaced, {layer name: (mean, variance)}, for set_bn_statistics().

    Each batch is `x` or a tuple/list whose first element is `x`; the model runs in training mode
    (as during training, each BatchNorm normalises with its batch) and is put back in the mode it
    had. `num_batches` limits the pass. The return value restores the old statistics through
    `set_bn_statistics(model, old)`. A model without BatchNorm is left untouched. The arguments
    may also come in PyTorch's order, `update_bn(loader, model)`: the one that is a Layer is the
    model.

    The per-batch moments are the ones the forward pass computes anyway, on the model's device:
    with its momentum set to 0 for the pass, each BatchNorm leaves the batch's mean and population
    variance in its running statistics, and only those per-channel vectors come to the host, where
    they are merged in float64. A layer that normalises with its running statistics during
    training (use_global_stats) gets its input's moments reduced on the device instead.
    """
    model, loader = _order(model, loader)
    layers = batchnorm_layers(model)
    if not layers:
        return {}
    previous = bn_statistics(model)
    moments = {name: _Moments() for name, _ in layers}
    hooks, momenta = _collect_moments(layers, moments)
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
        for name, layer in layers:
            if name in momenta:
                _compat.set_batchnorm_momentum(layer, momenta[name])
        if not was_training:
            model.eval()
    for name, layer in layers:
        m = moments[name]
        mean, variance = _compat.batchnorm_statistics(layer)
        if m.count:
            mean.set_value(m.mean.astype(mean.numpy().dtype))
            variance.set_value((m.m2 / m.count).astype(variance.numpy().dtype))
        else:
            mean.set_value(previous[name][0])
            variance.set_value(previous[name][1])
    return previous


def _collect_moments(layers, moments):
    """Hooks that add each batch's per-channel moments to `moments[name]`, and the momenta they
    set to 0 (to be put back): ([hook handles], {name: momentum})."""
    hooks, momenta, counts = [], {}, {}
    for name, layer in layers:
        if _compat.batchnorm_uses_global_stats(layer) or _compat.batchnorm_momentum(layer) is None:
            hooks.append(layer.register_forward_pre_hook(
                lambda layer, inputs, name=name: moments[name].add(
                    *_batch_moments_on_device(inputs[0], _channel_axis(layer)))))
            continue
        momenta[name] = _compat.batchnorm_momentum(layer)
        _compat.set_batchnorm_momentum(layer, 0.0)  # running <- 0 * running + 1 * batch: the batch's own moments

        def count(layer, inputs, name=name):
            x = inputs[0]
            counts[name] = _per_channel_count(x, _channel_axis(layer))
            for statistic in _compat.batchnorm_statistics(layer):
                statistic.set_value(paddle.zeros_like(statistic))  # 0 * NaN would stay NaN

        def collect(layer, inputs, output, name=name):
            mean, variance = _compat.batchnorm_statistics(layer)
            moments[name].add(counts[name], mean.numpy(), variance.numpy())

        hooks.append(layer.register_forward_pre_hook(count))
        hooks.append(layer.register_forward_post_hook(collect))
    return hooks, momenta
