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

from .errors import ConfigError

__all__ = ["EMARule", "shadow_dtype"]


def shadow_dtype(dtype):
    """The dtype an average of `dtype` weights is kept in: float32 for float16/bfloat16 (a
    half-precision average rounds each small (1 - d) * (x - a) step away and stops moving),
    else the weights' own."""
    import paddle

    return paddle.float32 if dtype in (paddle.float16, paddle.bfloat16) else dtype


class EMARule:
    """Exponential moving average with a decay schedule, optionally zero-initialised and bias-corrected."""

    def __init__(self, schedule, bias_correction=False):
        if bias_correction and schedule.decay >= 1.0:
            raise ConfigError("bias_correction needs decay < 1: with decay 1 nothing is ever averaged")
        self.schedule = schedule
        self.bias_correction = bool(bias_correction)

    def weight(self, decay, product):
        """(w, new product) for one update with decay `decay`; float or tensor arithmetic alike."""
        new_product = product * decay
        if self.bias_correction:
            return (1.0 - decay) / (1.0 - new_product), new_product
        return 1.0 - decay, new_product

    def step(self, t, product):
        """(decay, w, new product) for the t-th update, decay from the schedule in float64."""
        decay = self.schedule(t)
        w, new_product = self.weight(decay, product)
        return decay, w, new_product

    def options(self):
        return {"schedule": self.schedule.options(), "bias_correction": self.bias_correction}
