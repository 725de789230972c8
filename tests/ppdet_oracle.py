"""PaddleDetection's EMA arithmetic (ppdet/optimizer/ema.py) in numpy, rounding step by step as
Paddle 3.3.1's CPU kernels round it. Independent of paddle_ema; tests/test_ppdet_bitwise.py checks
each primitive bitwise against Paddle's own ops before trusting the classes built on them.

What Paddle's eager ops do (read from Paddle's source, confirmed by those tests):
- `python_float * tensor` and `tensor * python_float` are the `scale` op: the factor rounded to
  the tensor's dtype (float16: double -> float32 -> float16), then x * s + 0.0, each step rounded
  in that dtype; the + 0.0 bias turns a -0 product into +0;
- `tensor + tensor` is `add`; float16 arithmetic is done in float32 and rounded back to float16;
- `tensor / python_float` is a true division by float32(c) (Paddle 3.3.1; the C++ scalar path
  of older sources multiplies by float32(1/c) instead: the tests pin which one runs);
- `astype('float16')` on the CPU rounds to nearest even, except that float32 inputs with
  |x| in [2**-89, 2**-77) come out as garbage small halves instead of +-0 (Paddle 3.3.1's
  software float16 conversion); `paddle_half` reproduces that.
"""

import math

import numpy as np

F16, F32, F64 = np.float16, np.float32, np.float64


def _rne_shift(m, s):
    """m >> s rounded to nearest, ties to even (m int64 array, s >= 1 per element)."""
    q = m >> s
    r = m & ((np.int64(1) << s) - 1)
    half = np.int64(1) << (s - 1)
    return q + ((r > half) | ((r == half) & ((q & 1) == 1)))


def paddle_half(x):
    """float32 -> float16 as Paddle's CPU cast rounds it (see the module docstring)."""
    x = np.asarray(x, F32)
    with np.errstate(over="ignore"):
        out = x.astype(F16).view(np.uint16).copy()
    bits = x.view(np.uint32).astype(np.int64)
    exponent = ((bits >> 23) & 0xFF) - 126  # frexp's exponent for normal floats
    quirk = ((bits >> 23) & 0xFF != 0) & (exponent >= -88) & (exponent <= -77)
    if quirk.any():
        mantissa = (bits[quirk] & 0x7FFFFF) | 0x800000
        garbage = _rne_shift(mantissa, -exponent[quirk] - 64) & 0x7FF
        out[quirk] = (garbage | ((bits[quirk] >> 16) & 0x8000)).astype(np.uint16)
    return out.view(F16)


def scalar_as(value, dtype):
    """A Python float as `scale` takes it for a tensor of `dtype`."""
    if dtype == F64:
        return F64(value)
    if dtype == F32:
        return F32(value)
    return paddle_half(np.array([F32(value)]))[0]


def scale(x, value):
    """Paddle's scale(x, value, bias=0.0): x * s + 0.0 in x's dtype."""
    s = scalar_as(value, x.dtype)
    if x.dtype == F16:
        product = paddle_half(x.astype(F32) * F32(s))
        return paddle_half(product.astype(F32) + F32(0.0))
    return x * s + x.dtype.type(0.0)


def add(a, b):
    if a.dtype == F16:
        return paddle_half(a.astype(F32) + b.astype(F32))
    return a + b


def astype(x, dtype):
    if dtype == x.dtype:
        return x.copy()
    if dtype == F16:
        return paddle_half(x.astype(F32))
    return x.astype(dtype)


def divide(x, value):
    """tensor / python float, float32 tensor: x / float32(value)."""
    return x / F32(value)


class ModelEMAOracle:
    """PaddleDetection's ModelEMA on numpy arrays. `model_dict`: the model's state dict as numpy
    arrays (names, dtypes, shapes); `frozen_no_grad`: the names ema_filter_no_grad adds."""

    def __init__(self, model_dict, decay=0.9998, ema_decay_type="threshold", cycle_epoch=-1,
                 ema_black_list=None, frozen_no_grad=()):
        self.step = self.epoch = 0
        self.decay, self.ema_decay_type, self.cycle_epoch = decay, ema_decay_type, cycle_epoch
        self.dtypes = {n: v.dtype for n, v in model_dict.items()}
        self.black = {n for n in model_dict for key in (ema_black_list or ()) if key in n} | set(frozen_no_grad)
        # Black-listed entries are the model's live tensors until resume() puts others there.
        self.live = set(self.black)
        self.state = {n: None if n in self.black else np.zeros(v.shape, F32) for n, v in model_dict.items()}

    def _decay_now(self):
        if self.ema_decay_type == "threshold":
            return min(self.decay, (1 + self.step) / (10 + self.step))
        if self.ema_decay_type == "exponential":
            return self.decay * (1 - math.exp(-(self.step + 1) / 2000))
        return self.decay

    def update(self, model_dict):
        decay = self._decay_now()
        self._decay = decay
        for name in self.state:
            if name not in self.black:
                value = astype(model_dict[name], F32)
                self.state[name] = add(scale(self.state[name], decay), scale(value, 1 - decay))
        self.step += 1

    def _entry(self, name, model_dict):
        return model_dict[name] if name in self.live else self.state[name]

    def apply(self, model_dict):
        """The dict apply() returns, as numpy arrays."""
        if self.step == 0:
            return {n: self._entry(n, model_dict) for n in self.state}
        out = {}
        for name, shadow in self.state.items():
            if name in self.black:
                out[name] = self._entry(name, model_dict)
            elif self.ema_decay_type != "exponential":
                out[name] = astype(divide(shadow, 1 - self._decay**self.step), self.dtypes[name])
            else:
                out[name] = shadow.copy()
        self.epoch += 1
        if self.cycle_epoch > 0 and self.epoch == self.cycle_epoch:
            self.step = self.epoch = 0
            for name in self.state:
                if name not in self.black:
                    self.state[name] = np.zeros_like(self.state[name])
        return out

    def resume(self, state_dict, step=0):
        for name, value in state_dict.items():
            if name in self.state:
                dtype = self.dtypes[name] if name in self.black else F32
                self.state[name] = astype(value, dtype)
                self.live.discard(name)
        self.step = step


class SimpleModelEMAOracle:
    """PaddleDetection's SimpleModelEMA on numpy arrays: v = v*decay + (1-decay)*x in v's dtype.

    `tied`: groups of keys under which the model holds one tensor. PaddleDetection computes every
    key's new value from the tensor's old value, then `set_state_dict` writes the keys in order
    into the one tensor: it moves once, and the last key's value is what it holds.
    """

    def __init__(self, model_dict, decay=0.9996, tied=()):
        self.state = {n: v.copy() for n, v in model_dict.items()}
        self.decay = decay
        self.tied = [list(group) for group in tied]

    def update(self, model_dict, decay=None):
        decay = self.decay if decay is None else decay
        new = {}
        for name, v in self.state.items():
            if np.issubdtype(v.dtype, np.floating):
                new[name] = add(scale(v, decay), scale(model_dict[name], 1.0 - decay))
        for group in self.tied:
            last = [name for name in self.state if name in group][-1]
            for name in group:
                new[name] = new[last]
        self.state.update(new)
