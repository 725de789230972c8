"""The EMA arithmetic of the Paddle suites in numpy, rounding step by step as Paddle rounds it.

One oracle per suite class: PaddleClas's ExponentialMovingAverage, PaddleSeg's EMA functions,
PaddleOCR's and PaddleYOLO's ModelEMA, ppdiffusers' EMAModel and LitEma. Each works on
numpy state dicts (name -> array, in the model's order) and knows nothing of paddle_ema;
tests/test_suite_oracles.py checks every primitive bitwise against Paddle's own ops, and the
oracles against the real suite classes where those are installed.

Paddle's ops as the suites' expressions reach them (Paddle 3.3.1, CPU; the tests pin each; Paddle
3.0.0 and 2.6.2 round float16 scale, division and casts otherwise, so CI runs them on the newest leg):
- `python_float * tensor` is `scale`: the factor rounded to the tensor's dtype (through float32
  for float16 and bfloat16), x * s + 0.0 rounded in that dtype; an integer tensor is first
  cast to float32 and the result is float32 (so `paddle.assign` of it into an int64 tensor
  turns that tensor into float32);
- `tensor + tensor`, `tensor - tensor`: float16 and bfloat16 are computed in float32 and
  rounded back; Paddle's CPU has no float16 add/subtract and no bfloat16 add kernel (those
  run on GPUs only; the oracle models them as the same float32-then-round step);
- `tensor / python_float` divides by the factor rounded to the tensor's dtype;
- `astype`/`cast`: float32 -> float16 is `ppdet_oracle.paddle_half`, float32 -> bfloat16
  rounds to nearest even (NaN -> 0x7FFF); widening casts are exact;
- in-place forms (`scale_`, `add_`, `copy_`, `paddle.assign`) round as the out-of-place ones.

bfloat16 arrays are np.uint16 bit patterns, the form Paddle's own `Tensor.numpy()` gives.
"""

import math

import numpy as np

from ppdet_oracle import F16, F32, F64, paddle_half

BF16 = np.dtype(np.uint16)
FLOATS = (np.dtype(F16), np.dtype(F32), np.dtype(F64), BF16)


# --- primitives -------------------------------------------------------------------------------
def bf16_to_f32(bits):
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(F32)


def f32_to_bf16(x):
    """float32 -> bfloat16 bits, rounded to nearest even (overflow gives inf); every NaN becomes
    0x7FFF, as Paddle's conversion writes it."""
    x = np.asarray(x, F32)
    b = x.view(np.uint32).astype(np.uint64)
    out = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FFF), out)


def is_floating(x):
    return np.asarray(x).dtype in FLOATS


def widen(x):
    """The float32 (float64 for float64) value each element holds."""
    x = np.asarray(x)
    if x.dtype == BF16:
        return bf16_to_f32(x)
    if x.dtype == F64:
        return x
    return x.astype(F32)


def narrow(x32, dtype):
    """A float32 result rounded to `dtype` as Paddle's CPU cast rounds it."""
    dtype = np.dtype(dtype)
    if dtype == BF16:
        return f32_to_bf16(x32)
    if dtype == F16:
        return paddle_half(x32)
    return np.asarray(x32).astype(dtype)


def cast(x, dtype):
    x, dtype = np.asarray(x), np.dtype(dtype)
    if x.dtype == dtype:
        return x.copy()
    if x.dtype == F64 and dtype in (np.dtype(F16), BF16):
        return narrow(x.astype(F32), dtype)
    return narrow(widen(x) if x.dtype in FLOATS else x.astype(F32), dtype)


def scalar_as(value, dtype):
    """A Python float as `scale` and `/` take it for a tensor of `dtype`."""
    dtype = np.dtype(dtype)
    if dtype == F64:
        return F64(value)
    if dtype in (np.dtype(F16), BF16):
        return widen(narrow(np.array([F32(value)]), dtype))[0]
    return F32(value)


def scale(x, value):
    """`value * x` (Paddle's scale op with bias 0.0); integer x is promoted to float32."""
    x = np.asarray(x)
    if x.dtype not in FLOATS:
        x = x.astype(F32)
    s = scalar_as(value, x.dtype)
    with np.errstate(over="ignore"):
        if x.dtype in (np.dtype(F32), np.dtype(F64)):
            return x * s + x.dtype.type(0.0)
        product = narrow(widen(x) * s, x.dtype)
        return narrow(widen(product) + F32(0.0), x.dtype)


def _binary(a, b, op):
    a, b = np.asarray(a), np.asarray(b)
    with np.errstate(over="ignore", invalid="ignore"):
        if a.dtype in (np.dtype(F32), np.dtype(F64)):
            return op(a, b)
        return narrow(op(widen(a), widen(b)), a.dtype)


def add(a, b):
    return _binary(a, b, np.add)


def subtract(a, b):
    return _binary(a, b, np.subtract)


def divide(x, value):
    """`x / value` for a Python float value."""
    x = np.asarray(x)
    s = scalar_as(value, x.dtype)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        if x.dtype in (np.dtype(F32), np.dtype(F64)):
            return x / s
        return narrow(widen(x) / s, x.dtype)


def ema_step(average, value, decay):
    """`decay * average + (1 - decay) * value`, the suites' common expression, in average's dtype
    (value as given: callers cast it first where the suite does)."""
    return add(scale(average, decay), scale(value, 1 - decay))


# --- decay schedules (Python floats, as the suites compute them) ------------------------------
def threshold_decay(decay, n):
    """min(decay, (1 + n) / (10 + n))."""
    return min(decay, (1 + n) / (10 + n))


def paddleseg_decay(step, decay=0.999):
    return min(1 - 1 / (step + 1), decay)


def ppdiffusers_decay(optimization_step, decay=0.9999, min_decay=0.0, update_after_step=0,
                      use_ema_warmup=False, inv_gamma=1.0, power=2 / 3):
    step = max(0, optimization_step - update_after_step)
    if step <= 0:
        return 0.0
    if use_ema_warmup:
        value = 1 - (1 + step / inv_gamma) ** -power
    else:
        value = (1 + step) / (10 + step)
    return max(min(value, decay), min_decay)


# --- the suites' classes ----------------------------------------------------------------------
class _Storage:
    """An EMA copy of a model's state dict; `aliases` maps a key to the first key that holds the
    same tensor (tied weights), so a write through either key is seen through both."""

    def __init__(self, state, aliases=None):
        self.keys = list(state)
        self.aliases = dict(aliases or {})
        self.slots = {k: np.array(v, copy=True) for k, v in state.items() if k not in self.aliases}

    def slot(self, key):
        return self.aliases.get(key, key)

    def __getitem__(self, key):
        return self.slots[self.slot(key)]

    def __setitem__(self, key, value):
        self.slots[self.slot(key)] = value

    def state(self):
        return {k: self[k] for k in self.keys}


class PaddleClasOracle(_Storage):
    """ppcls ExponentialMovingAverage: `paddle.assign(d * e + (1 - d) * m, e)` over every entry of
    the module's state dict zipped with the model's, in the EMA entry's dtype; a tensor under two
    keys is assigned twice. `state()` is `ema.module.state_dict()`."""

    def __init__(self, model_state, aliases=None, decay=0.9999):
        super().__init__(model_state, aliases)
        self.decay = decay

    def update(self, model_state):
        for key, value in zip(self.keys, model_state.values()):
            self[key] = add(scale(self[key], self.decay), scale(value, 1.0 - self.decay))

    def set(self, model_state):
        for key, value in zip(self.keys, model_state.values()):
            self[key] = np.array(value, copy=True)


class PaddleSegOracle(_Storage):
    """paddleseg.utils.ema: `init_ema_params` and `update_ema_model` on the EMA model's state
    dict; floating entries `v * d + (1 - d) * m` (out of place), then one `set_state_dict`, so a
    tied tensor moves once a step."""

    def init(self, model_state):
        for key in self.keys:
            if is_floating(self[key]):
                self[key] = np.array(model_state[key], copy=True)

    def update(self, model_state, step=0, decay=0.999):
        d = paddleseg_decay(step, decay)
        new = {}
        for key in self.keys:
            v = self[key]
            if is_floating(v):
                v = add(scale(v, d), scale(model_state[key], 1.0 - d))
            new[key] = v
        for key in self.keys:
            self[key] = new[key]


class PaddleOCROracle:
    """ppocr ModelEMA: float32 shadows from zeros (every entry not black-listed, integer ones
    too), PaddleDetection's threshold/exponential/normal decay with `gamma` as the exponential
    constant, `apply()` bias-corrected in float32 (no cast back). `black`: the names the suite
    black-lists (stop_gradient parameters other than BatchNorm1D/2D statistics when
    ema_filter_no_grad); they keep their value from construction."""

    def __init__(self, model_state, decay=0.9998, gamma=2000, ema_decay_type="threshold", black=()):
        self.decay, self.gamma, self.ema_decay_type = decay, gamma, ema_decay_type
        self.step, self._decay = 0, decay
        self.black = set(black)
        self.state = {k: np.array(v, copy=True) if k in self.black else np.zeros(np.shape(v), F32)
                      for k, v in model_state.items()}

    def decay_now(self):
        if self.ema_decay_type == "threshold":
            return threshold_decay(self.decay, self.step)
        if self.ema_decay_type == "exponential":
            return self.decay * (1 - math.exp(-(self.step + 1) / self.gamma))
        return self.decay

    def update(self, model_state):
        d = self.decay_now()
        self._decay = d
        for key, v in self.state.items():
            if key not in self.black and key in model_state:
                self.state[key] = ema_step(v, cast(model_state[key], F32), d)
        self.step += 1

    def apply(self):
        if self.step == 0:
            return {k: v.copy() for k, v in self.state.items()}
        out = {}
        for key, v in self.state.items():
            if key not in self.black and self.ema_decay_type != "exponential":
                v = divide(v, 1 - self._decay**self.step)
            out[key] = v.copy()
        return out

    def state_dict_for_save(self):
        return {"ema_state": self.state, "step": self.step}

    def set_state_dict(self, saved):
        self.state, self.step = saved["ema_state"], saved["step"]


class PaddleYOLOOracle:
    """PaddleYOLO ModelEMA (and paddledet 2.6.0's): PaddleDetection's schedule, cycle_epoch and
    black list, with shadows in the model's dtype (`zeros_like`, no float32 master) and
    `apply()` dividing in that dtype. Black-listed entries are the model's live values until
    `resume()` replaces them. `apply()` before any `update()` since construction raises
    AttributeError in the suite at step > 0 (no `_decay` yet); this oracle does the same."""

    def __init__(self, model_state, decay=0.9998, ema_decay_type="threshold", cycle_epoch=-1,
                 ema_black_list=None, frozen_no_grad=()):
        self.step = self.epoch = 0
        self.decay, self.ema_decay_type, self.cycle_epoch = decay, ema_decay_type, cycle_epoch
        self.black = {k for k in model_state for b in (ema_black_list or ()) if b in k} | set(frozen_no_grad)
        self.live = set(self.black)
        self.dtypes = {k: np.asarray(v).dtype for k, v in model_state.items()}
        self.state = {k: None if k in self.black else np.zeros_like(v) for k, v in model_state.items()}

    def _reset(self):
        self.step = self.epoch = 0
        for key, v in self.state.items():
            if key not in self.black:
                self.state[key] = np.zeros_like(v)

    def _entry(self, key, model_state):
        return model_state[key] if key in self.live else self.state[key]

    def update(self, model_state):
        if self.ema_decay_type == "threshold":
            d = threshold_decay(self.decay, self.step)
        elif self.ema_decay_type == "exponential":
            d = self.decay * (1 - math.exp(-(self.step + 1) / 2000))
        else:
            d = self.decay
        self._decay = d
        for key, v in self.state.items():
            if key not in self.black:
                self.state[key] = add(scale(v, d), scale(model_state[key], 1 - d))
        self.step += 1

    def apply(self, model_state):
        if self.step == 0:
            return {k: self._entry(k, model_state) for k in self.state}
        out = {}
        for key, v in self.state.items():
            if key in self.black:
                out[key] = self._entry(key, model_state)
            elif self.ema_decay_type != "exponential":
                out[key] = divide(v, 1 - self._decay**self.step)  # AttributeError before an update
            else:
                out[key] = v
        self.epoch += 1
        if self.cycle_epoch > 0 and self.epoch == self.cycle_epoch:
            self._reset()
        return out

    def resume(self, state_dict, step=0):
        for key, value in state_dict.items():
            if key in self.state:
                dtype = self.dtypes[key] if key in self.live else self.state[key].dtype
                self.state[key] = cast(value, dtype)
                self.live.discard(key)
        self.step = step


class EMAModelOracle:
    """ppdiffusers EMAModel: one shadow per parameter (zipped by position) in the shadow's dtype;
    trainable ones `s - (1 - d) * (s - p.cast(s.dtype))`, stop_gradient ones copied."""

    def __init__(self, parameters, decay=0.9999, min_decay=0.0, update_after_step=0,
                 use_ema_warmup=False, inv_gamma=1.0, power=2 / 3):
        self.shadow_params = [np.array(p, copy=True) for p in parameters]
        self.settings = dict(decay=decay, min_decay=min_decay, update_after_step=update_after_step,
                             use_ema_warmup=use_ema_warmup, inv_gamma=inv_gamma, power=power)
        self.optimization_step = 0
        self.cur_decay_value = None

    def get_decay(self, optimization_step):
        return ppdiffusers_decay(optimization_step, **self.settings)

    def step(self, parameters, trainable):
        self.optimization_step += 1
        d = self.get_decay(self.optimization_step)
        self.cur_decay_value = d
        one_minus_decay = 1 - d
        for i, (s, p, train) in enumerate(zip(self.shadow_params, parameters, trainable)):
            p = cast(p, s.dtype)
            self.shadow_params[i] = subtract(s, scale(subtract(s, p), one_minus_decay)) if train else p

    def copy_to(self, dtypes):
        return [cast(s, dtype) for s, dtype in zip(self.shadow_params, dtypes)]

    def state_dict(self):
        return dict(self.settings, optimization_step=self.optimization_step, shadow_params=self.shadow_params)


class LitEmaOracle:
    """ppdiffusers LitEma: a float32 buffer per trainable parameter (named without dots);
    `scale_(d)` then `add_(p.astype('float32') * (1 - d))`, d = min(decay, (1 + n)/(10 + n))
    with n counted from 1 (or `decay` alone when use_num_upates=False)."""

    def __init__(self, named_trainable, decay=0.9999, use_num_upates=True):
        self.decay = decay
        self.num_updates = 0 if use_num_upates else -1
        self.buffers = {name.replace(".", ""): cast(p, F32) for name, p in named_trainable.items()}

    def forward(self, named_trainable):
        d = self.decay
        if self.num_updates >= 0:
            self.num_updates += 1
            d = threshold_decay(self.decay, self.num_updates)
        one_minus_decay = 1.0 - d
        for name, p in named_trainable.items():
            key = name.replace(".", "")
            self.buffers[key] = add(scale(self.buffers[key], d), scale(cast(p, F32), one_minus_decay))

    def copy_to(self, named_dtypes):
        return {name: cast(self.buffers[name.replace(".", "")], dtype) for name, dtype in named_dtypes.items()}
