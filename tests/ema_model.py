"""A float64 numpy model of the EMA formulas, written independently of the library.

It follows the textbook forms, not the library's implementation: the bias-corrected average is a
zero-initialised EMA divided by 1 - prod(d_i) at read-out, and the plain average is d*a + (1-d)*x.
"""

import math

import numpy as np


def decay_closed_form(kind, t, decay, tau=2000.0, inv_gamma=1.0, power=2.0 / 3.0, min_decay=0.0):
    if kind in ("constant", "normal"):
        return decay
    if kind == "threshold":
        return min(decay, (1.0 + t) / (10.0 + t))
    if kind == "exponential":
        return decay * (1.0 - math.exp(-(t + 1.0) / tau))
    if kind == "power":
        return min(decay, max(min_decay, 1.0 - (1.0 + t / inv_gamma) ** (-power)))
    raise ValueError(kind)


class EMAModel:
    """Replays update() calls on float64 copies of the weights."""

    def __init__(self, initial, decay_fn, bias_correction=False, update_every=1, start_step=0):
        self.decay_fn = decay_fn
        self.bias_correction = bias_correction
        self.update_every = update_every
        self.start_step = start_step
        self._restart({k: np.asarray(v, np.float64) for k, v in initial.items()})
        self.calls = 0
        self.decays = []

    def _restart(self, weights):
        self.plain = {k: v.copy() for k, v in weights.items()}
        self.biased = {k: np.zeros_like(v) for k, v in weights.items()}
        self.product = 1.0
        self.updates = 0

    def update(self, weights, step=None):
        weights = {k: np.asarray(v, np.float64) for k, v in weights.items()}
        call = self.calls if step is None else step
        self.calls = call + 1
        if call < self.start_step:
            self._restart(weights)
            return None
        if (call - self.start_step) % self.update_every:
            return None
        d = self.decay_fn((call - self.start_step) // self.update_every)
        for k, x in weights.items():
            self.plain[k] = d * self.plain[k] + (1.0 - d) * x
            self.biased[k] = d * self.biased[k] + (1.0 - d) * x
        self.product *= d
        self.updates += 1
        self.decays.append(d)
        return d

    def average(self):
        if not self.bias_correction:
            return self.plain
        if self.updates == 0:
            # Nothing averaged yet: the weights of the last (re)start.
            return self.plain
        return {k: v / (1.0 - self.product) for k, v in self.biased.items()}
