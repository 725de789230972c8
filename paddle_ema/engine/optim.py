"""Optimizers and learning-rate schedules picked by config (`optimizer:`, `lr_schedule:`).

Schedules step once per iteration; `warmup_steps` adds a linear warm-up from 0 to base_lr.
Piecewise milestones are given in epochs.
"""

import paddle

from ..config import register
from ..config.registry import Limit
from ..core.validation import is_integer

_NONNEG = Limit(0)
_BETA = Limit(0, 1, high_open=True)
_STEPS = Limit(0, 2**31 - 1)


def _milestones(value):
    ok = (isinstance(value, (list, tuple)) and value
          and all(is_integer(m, 1) and m < 2**31 for m in value)
          and all(a < b for a, b in zip(value, value[1:])))
    return None if ok else "expected a non-empty list of increasing epochs >= 1, e.g. [6, 9]"

__all__ = ["Momentum", "SGD", "Adam", "AdamW", "Constant", "CosineDecay", "PiecewiseDecay"]


def _decay(weight_decay):
    return paddle.regularizer.L2Decay(weight_decay) if weight_decay else None


@register("optimizer", limits={"momentum": Limit(0, 1), "weight_decay": _NONNEG})
def Momentum(parameters, learning_rate, momentum=0.9, weight_decay=0.0, use_nesterov=False):
    return paddle.optimizer.Momentum(learning_rate, momentum, parameters, use_nesterov=use_nesterov,
                                     weight_decay=_decay(weight_decay))


@register("optimizer", limits={"weight_decay": _NONNEG})
def SGD(parameters, learning_rate, weight_decay=0.0):
    return paddle.optimizer.SGD(learning_rate, parameters, weight_decay=_decay(weight_decay))


@register("optimizer", limits={"beta1": _BETA, "beta2": _BETA, "epsilon": Limit(0, low_open=True),
                               "weight_decay": _NONNEG})
def Adam(parameters, learning_rate, beta1=0.9, beta2=0.999, epsilon=1e-8, weight_decay=0.0):
    return paddle.optimizer.Adam(learning_rate, beta1, beta2, epsilon, parameters, weight_decay=_decay(weight_decay))


@register("optimizer", limits={"beta1": _BETA, "beta2": _BETA, "epsilon": Limit(0, low_open=True),
                               "weight_decay": _NONNEG})
def AdamW(parameters, learning_rate, beta1=0.9, beta2=0.999, epsilon=1e-8, weight_decay=0.01):
    return paddle.optimizer.AdamW(learning_rate, beta1, beta2, epsilon, parameters, weight_decay=weight_decay)


def _warmup(schedule, base_lr, warmup_steps):
    if not warmup_steps:
        return schedule
    return paddle.optimizer.lr.LinearWarmup(schedule, warmup_steps, 0.0, base_lr)


@register("lr_schedule", limits={"warmup_steps": _STEPS})
def Constant(base_lr, total_steps, steps_per_epoch, warmup_steps=0):
    # LambdaDecay, not a float: the optimizer state then always carries a scheduler to resume.
    return _warmup(paddle.optimizer.lr.LambdaDecay(base_lr, lambda step: 1.0), base_lr, warmup_steps)


@register("lr_schedule", limits={"warmup_steps": _STEPS, "min_lr": _NONNEG})
def CosineDecay(base_lr, total_steps, steps_per_epoch, min_lr=0.0, warmup_steps=0):
    cosine = paddle.optimizer.lr.CosineAnnealingDecay(base_lr, max(1, total_steps - warmup_steps), min_lr)
    return _warmup(cosine, base_lr, warmup_steps)


@register("lr_schedule", limits={"milestones": Limit(check=_milestones), "gamma": Limit(0, low_open=True),
                                 "warmup_steps": _STEPS})
def PiecewiseDecay(base_lr, total_steps, steps_per_epoch, milestones=None, gamma=0.1, warmup_steps=0):
    """The rate times gamma**i after the i-th milestone (epochs); the milestones must be given."""
    problem = _milestones(milestones)
    if problem:
        from ..errors import ConfigError

        raise ConfigError(f"PiecewiseDecay.milestones: {milestones!r} is not allowed; {problem}")
    boundaries = [int(m) * steps_per_epoch for m in milestones]
    values = [base_lr * gamma**i for i in range(len(boundaries) + 1)]
    return _warmup(paddle.optimizer.lr.PiecewiseDecay(boundaries, values), base_lr, warmup_steps)
