"""The averaging rule: how one update moves the average, and bias correction.

Every average in paddle_ema is kept with one in-place operation per update,

    average <- average + w * (weight - average)          (lerp; w in [0, 1])

and an averaging rule only decides the interpolation weight w of each update. Writing the update
as a lerp keeps a constant weight exactly constant in float arithmetic, which `d*a + (1-d)*x` does
not.

EMA, initialised from the weights:      w_t = 1 - d_t
EMA, from zero with bias correction:    w_t = (1 - d_t) / (1 - P_t),   P_t = d_0 * d_1 * ... * d_t

The second is the bias-corrected average s_t / (1 - P_t) of the zero-initialised EMA
s_t = d_t s_{t-1} + (1 - d_t) x_t, carried directly: with a = s / (1 - P),
a_t = a_{t-1} + (1 - d_t) / (1 - P_t) * (x_t - a_{t-1}) follows because
d_t (1 - P_{t-1}) + (1 - d_t) = 1 - P_t. It divides by the exact product of the decays applied
(not decay**t, which is wrong when the decay varies), never divides a tiny number at apply time,
and its first update takes the weights whole (w_0 = 1). P_t is tracked in float64 on the host in
both modes, starting from P = 1: it is the share of the initial value still in the average.

The formulas are plain arithmetic, so the static EMA evaluates them on tensors too.
"""

from typing import Any, Dict, Optional, Tuple

from ..errors import ConfigError
from .schedules import make_schedule

__all__ = ["EMARule", "rule_from_options", "settings_differences", "shadow_dtype"]


def shadow_dtype(dtype: Any) -> Any:
    """The dtype an average of `dtype` weights is kept in.

    Args:
        dtype: the weights' Paddle dtype.

    Returns:
        float32 for float16/bfloat16 (a half-precision average rounds each small
        (1 - d) * (x - a) step away and stops moving), else `dtype` itself.
    """
    import paddle

    return paddle.float32 if dtype in (paddle.float16, paddle.bfloat16) else dtype


class EMARule:
    """Exponential moving average with a decay schedule, optionally zero-initialised and bias-corrected.

    Args:
        schedule: the decay schedule (a `paddle_ema.schedules.Schedule`).
        bias_correction: zero start with the correction by 1 - P_t (w_t = (1 - d_t) / (1 - P_t));
            False: start from the weights, w_t = 1 - d_t.
    """

    def __init__(self, schedule: Any, bias_correction: bool = False):
        if bias_correction and schedule.decay >= 1.0:
            raise ConfigError("bias_correction needs decay < 1: with decay 1 nothing is ever averaged")
        if schedule(0) >= 1.0:
            # Every update would have weight 0: an average started from the weights stays there, one
            # started from zero stays zero, and PaddleDetection's correction divides it by 1 - 1**t = 0.
            raise ConfigError(f"the {schedule.name} schedule {_shown(schedule.options())} has decay 1 from its first "
                              "update on: the average would never move from where it starts (one started from zero "
                              "stays 0, and its bias correction divides by 1 - 1**t = 0); use a decay below 1")
        self.schedule = schedule
        self.bias_correction = bool(bias_correction)

    def weight(self, decay: Any, product: Any) -> Tuple[Any, Any]:
        """The interpolation weight of one update; float or tensor arithmetic alike.

        Args:
            decay: this update's decay d_t.
            product: P_{t-1}, the product of the decays applied before (1 at the start).

        Returns:
            (w_t, P_t).
        """
        new_product = product * decay
        if self.bias_correction:
            return (1.0 - decay) / (1.0 - new_product), new_product
        return 1.0 - decay, new_product

    def step(self, t: int, product: float) -> Tuple[float, float, float]:
        """The t-th update on the host, its decay from the schedule in float64.

        Args:
            t: the averaging step (0 for the first update).
            product: P_{t-1}.

        Returns:
            (d_t, w_t, P_t).
        """
        decay = self.schedule(t)
        w, new_product = self.weight(decay, product)
        return decay, w, new_product

    def options(self) -> Dict[str, Any]:
        """The settings that change the numbers, for state dicts.

        Returns:
            {'schedule': the schedule's options, 'bias_correction': bool}.
        """
        return {"schedule": self.schedule.options(), "bias_correction": self.bias_correction}


def rule_from_options(schedule: Any, decay: Optional[float] = None, schedule_options: Optional[Dict[str, Any]] = None,
                      bias_correction: bool = False) -> EMARule:
    """The EMARule of the keyword form the front-ends accept beside `rule=`.

    Args:
        schedule: a registered schedule name or a Schedule instance.
        decay: the named schedule's decay (None with an instance, which carries its own).
        schedule_options: the named schedule's own options.
        bias_correction: zero start with the exact correction.

    Returns:
        EMARule(make_schedule(schedule, decay, **schedule_options), bias_correction).
    """
    return EMARule(make_schedule(schedule, decay, **dict(schedule_options or {})), bool(bias_correction))


def settings_differences(saved: Dict[str, Any], ours: Dict[str, Any]) -> list:
    """The settings a saved average state was made with that differ from this average's: the one
    check every front-end's set_state_dict runs (dygraph and static EMA, ModelEMA).

    Args:
        saved: the settings recorded in the state (nested dicts allowed).
        ours: this average's settings, in the same form.

    Returns:
        ["setting K: SAVED in the state, OURS here", ...] for each differing key (nested keys
        dotted), sorted; empty when they agree.
    """
    mine, theirs = _flatten(ours), _flatten(saved)
    return [f"setting {key}: {theirs.get(key)!r} in the state, {mine.get(key)!r} here"
            for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key)]


def _flatten(mapping, prefix=""):
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(options):
    return "(" + ", ".join(f"{k}={v!r}" for k, v in options.items() if k != "name") + ")"
