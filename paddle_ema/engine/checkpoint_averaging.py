"""Average checkpoints after training (stochastic weight averaging after the fact).

    average = sum_i w_i * checkpoint_i / sum_i w_i          (uniform: w_i = 1)

computed as a running weighted mean with the package's lerp kernel,
avg <- avg + (w_i / W_i) * (x_i - avg) with W_i = w_1 + ... + w_i, in float32 (float64 stays).

BatchNorm running statistics are not weights: an average of weights has its own activation
statistics. They are handled as the user chooses, explicitly (`bn`):
- 'average': averaged like the weights (cheap, approximate);
- 'recompute': the averaged model is run over the training set once and each BN layer's
  statistics become the exact mean and variance of its inputs (paddle_ema.update_bn; needs the config);
- 'first': the first checkpoint's statistics.
Checkpoints that hold BN statistics need a choice; integer entries must agree across checkpoints.
"""

import math

import numpy as np
import paddle

from .. import kernels
from ..batchnorm import batchnorm_layers, update_bn
from ..core.selection import is_batchnorm_statistic  # by key: checkpoint files come without a model
from ..core.validation import check_choice
from ..errors import ConfigError, IncompatibleStateError
from .average_protocol import check_finite
from .checkpoint_files import check_weights_output, copy_state, load_state_dict, save_weights_file
from .data import batches

__all__ = ["average_state_dicts", "average_checkpoint_files", "recompute_bn_statistics", "BN_MODES"]

BN_MODES = ("average", "recompute", "first")


def _check_weights(weights, count):
    """The weights as floats, scaled by a power of two (exact) so that their sum cannot overflow:
    --weights 1e308 1e308 is the mean, as 1 1 is."""
    if weights is None:
        return [1.0] * count
    if len(weights) != count:
        raise ConfigError(f"--weights: {len(weights)} weights for {count} checkpoints; give one per checkpoint")
    if any(not math.isfinite(w) or w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise ConfigError(f"--weights must be finite, >= 0 and not all 0, got {weights}")
    exponent = math.frexp(max(weights))[1]  # the largest becomes a number in [0.5, 1)
    return [math.ldexp(float(w), -exponent) for w in weights]


def average_state_dicts(states, weights=None, bn="average", labels=None):
    """The weighted average of state dicts with identical keys and shapes."""
    labels = labels or [f"checkpoint {i}" for i in range(len(states))]
    if not states:
        raise ConfigError("no checkpoints to average")
    check_choice("bn", bn, BN_MODES, str(BN_MODES))
    weights = _check_weights(weights, len(states))
    first = states[0]
    for state, label in zip(states[1:], labels[1:]):
        if set(state) != set(first):
            diff = sorted(set(state) ^ set(first))[:5]
            raise IncompatibleStateError(f"{label} has other entries than {labels[0]}: {diff}")
        for name, value in state.items():
            if list(value.shape) != list(first[name].shape):
                raise IncompatibleStateError(f"{label}: {name} has shape {list(value.shape)}, "
                                             f"{labels[0]} {list(first[name].shape)}")
    averaged, names = {}, []
    for name, value in first.items():
        if not paddle.is_floating_point(value):
            for state, label in zip(states[1:], labels[1:]):
                if not np.array_equal(state[name].numpy(), value.numpy()):
                    raise IncompatibleStateError(f"{name} is an integer entry and differs in {label}")
            averaged[name] = value.clone()
        elif is_batchnorm_statistic(name) and bn != "average":
            averaged[name] = value.clone()
        else:
            dtype = "float64" if value.dtype == paddle.float64 else "float32"
            averaged[name] = value.astype(dtype).clone()
            names.append(name)
    # A zero first weight only seeds the average: the next positive weight w/total = 1 replaces it.
    total = weights[0]
    for state, weight in zip(states[1:], weights[1:]):
        total += weight
        if weight > 0:
            kernels.lerp_([averaged[n] for n in names], [state[n] for n in names], weight / total)
    for name in names:
        averaged[name] = averaged[name].astype(first[name].dtype)
    return averaged


def recompute_bn_statistics(model, dataset, batch_size, num_batches=None):
    """BatchNorm statistics of `model`'s current weights: the exact moments over one pass of `dataset`."""
    loader = (paddle.to_tensor(dataset.batch(indices)[0]) for indices in batches(len(dataset), batch_size))
    update_bn(model, loader, num_batches)
    model.eval()
    return len(batchnorm_layers(model))


def average_checkpoint_files(paths, weights, bn, output, cfg=None):
    """Average .pdparams files into `output`; returns a one-line summary."""
    import os

    check_weights_output(output, "--output")
    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError(f"checkpoint {path} does not exist")
    states = [load_state_dict(path, "checkpoint to average") for path in paths]
    for path, state in zip(paths, states):  # an average of NaN is NaN: said of the file that holds it
        check_finite(state, f"checkpoint to average {path}")
    has_bn = any(is_batchnorm_statistic(name) for name in states[0])
    if has_bn and bn is None:
        raise ConfigError("the checkpoints hold BatchNorm statistics (*._mean, *._variance): choose how to handle "
                          "them with --bn average|recompute|first")
    if bn == "recompute" and cfg is None:
        raise ConfigError("--bn recompute runs the model over the training data: pass its config with -c")
    averaged = average_state_dicts(states, weights, bn or "average", labels=list(paths))
    if bn == "recompute":
        from .builders import build_datasets, build_model, set_device

        set_device(cfg)
        dataset = build_datasets(cfg, ("train",))["train"]
        model = build_model(cfg, dataset)
        model.set_state_dict(averaged)
        recompute_bn_statistics(model, dataset, cfg["EvalReader"]["batch_size"])
        averaged = copy_state(model.state_dict())
    check_finite(averaged, f"the average of {len(paths)} checkpoints")
    save_weights_file(averaged, output)  # with a manifest: a later reader checks it
    shown = "uniform" if weights is None else "weights " + ", ".join(f"{w:g}" for w in weights)
    return f"averaged {len(paths)} checkpoints ({shown}; BatchNorm statistics: {bn if has_bn else 'none'}) -> {output}"
