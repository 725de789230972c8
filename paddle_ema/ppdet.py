"""`ModelEMA`: PaddleDetection's EMA class (ppdet/optimizer/ema.py), as a drop-in with its numbers.

    ema = ModelEMA(model, decay=0.9998, ema_decay_type='threshold', cycle_epoch=-1,
                   ema_black_list=None, ema_filter_no_grad=False)
    ema.update()                   # after optimizer.step()
    model.set_state_dict(ema.apply())   # or paddle.save(ema.apply(), 'x.pdparams')

What it computes (PaddleDetection's behaviour, kept on purpose, quirks included):
- one float32 zero shadow per `model.state_dict()` entry, BatchNorm statistics included;
- update t (t = updates so far) uses the schedule `ema_decay_type` of paddle_ema.schedules
  ('threshold': min(decay, (1+t)/(10+t)); 'exponential': decay*(1-exp(-(t+1)/2000)); 'normal':
  constant) and moves each shadow by the package's lerp kernel with weight 1 - d, which is
  shadow = d*shadow + (1-d)*value.astype(float32);
- `apply()` returns a new dict: with t = 0 the (zero) shadows unchanged; otherwise each shadow
  divided by 1 - d_last**t and cast to the weight's dtype. d_last is the decay of the LAST update,
  so for a varying decay this is not the exact zero-init correction 1 - prod(d_i) that
  ExponentialMovingAverage(bias_correction=True) uses; 'exponential' gets neither the division
  nor the cast (its shadows stay float32 and biased toward zero early on);
- black-listed names (substring match on state-dict keys) are returned as the live tensor;
  `ema_filter_no_grad` black-lists stop_gradient parameters other than BatchNorm2D/SyncBatchNorm
  `_mean`/`_variance`;
- every `apply()` after the first update counts one 'epoch'; when it reaches `cycle_epoch` (> 0)
  the shadows go back to zeros and t to 0;
- `resume(state_dict, step)` loads shadows as given (cast to float32) and sets t = step. Fed the
  output of apply() (bias-corrected weights, as PaddleDetection's trainer does), the next apply()
  divides again: that is the trainer's double correction. paddle_ema's tools resume from
  `ema_state()` instead, which is exact.

Where it differs from PaddleDetection, deliberately (none changes a number):
- `apply()` does not set `stop_gradient = True` on the live black-listed parameters it returns
  (PaddleDetection's does, which silently freezes a trainable black-listed parameter);
- an unknown `ema_decay_type` is a ConfigError (PaddleDetection treats any other string as
  'normal'); 'constant' and 'power' (package schedules) are accepted too;
- after `resume(..., step>0)` without an update, apply() corrects with the decay of update
  step-1 (PaddleDetection raises AttributeError there);
- returned tensors are copies: the shadows are updated in place, PaddleDetection's out of place.

Versus `ExponentialMovingAverage`: that class starts from the weights (no zero init, no
correction unless bias_correction=True, which then divides by the exact product of the decays),
averages trainable parameters only by default, swaps weights in place instead of returning a
dict, and has state_dict()/set_state_dict() for exact resume.
"""

import weakref

import paddle
from paddle import nn

from . import kernels
from .averaging import EMARule
from .errors import ConfigError, IncompatibleStateError
from .schedules import SCHEDULES, make_schedule

__all__ = ["ModelEMA", "bn_running_state_names"]

# PaddleDetection hard-codes this time constant of the 'exponential' warm-up.
EXPONENTIAL_TAU = 2000.0


def bn_running_state_names(model):
    """State-dict names of BatchNorm2D/SyncBatchNorm running statistics."""
    names = set()
    for prefix, layer in model.named_sublayers():
        if isinstance(layer, (nn.BatchNorm2D, nn.SyncBatchNorm)):
            names.update((f"{prefix}._mean", f"{prefix}._variance"))
    return names


def _make_schedule(ema_decay_type, decay):
    if ema_decay_type == "exponential":
        return make_schedule("exponential", decay, tau=EXPONENTIAL_TAU)
    if ema_decay_type not in SCHEDULES:
        raise ConfigError(f"ema_decay_type {ema_decay_type!r} is not allowed; allowed: {', '.join(sorted(SCHEDULES))}")
    return make_schedule(ema_decay_type, decay)


class ModelEMA:
    """PaddleDetection's ModelEMA: same constructor, methods and numbers (see the module docstring)."""

    def __init__(self, model, decay=0.9998, ema_decay_type="threshold", cycle_epoch=-1, ema_black_list=None,
                 ema_filter_no_grad=False):
        self.decay = decay
        self.ema_decay_type = ema_decay_type
        self.cycle_epoch = cycle_epoch
        self.rule = EMARule(_make_schedule(ema_decay_type, decay))
        self.step = 0
        self.epoch = 0
        self._decay = None
        model_state = model.state_dict()
        self.ema_black_list = {
            name for name in model_state for key in (ema_black_list or ()) if key in name
        }
        if ema_filter_no_grad:
            running = bn_running_state_names(model)
            self.ema_black_list.update(
                name for name, param in model.named_parameters() if param.stop_gradient and name not in running
            )
        self.averaged = [name for name in model_state if name not in self.ema_black_list]
        self._model_state = {name: weakref.ref(tensor) for name, tensor in model_state.items()}
        self.state_dict = {}
        for name, tensor in model_state.items():
            self.state_dict[name] = tensor if name in self.ema_black_list else self._zeros(tensor)

    @staticmethod
    def _zeros(tensor):
        return paddle.zeros(tensor.shape, dtype="float32")

    def _shadows(self):
        return [self.state_dict[name] for name in self.averaged]

    def reset(self):
        self.step = 0
        self.epoch = 0
        for name in self.averaged:
            self.state_dict[name] = self._zeros(self.state_dict[name])

    def _live_state(self):
        state = {name: ref() for name, ref in self._model_state.items()}
        gone = [name for name, tensor in state.items() if tensor is None]
        if gone:
            raise RuntimeError(f"ModelEMA: the model's tensors {gone[:3]} were garbage-collected; pass update(model)")
        return state

    def update(self, model=None):
        """Fold the model's current state into the shadows (after optimizer.step())."""
        values = model.state_dict() if model is not None else self._live_state()
        decay, weight, _ = self.rule.step(self.step, 1.0)
        self._decay = decay
        kernels.lerp_(self._shadows(), [values[name] for name in self.averaged], weight)
        self.step += 1

    @paddle.no_grad()
    def apply(self):
        """The averaged state dict, bias-corrected PaddleDetection's way; counts one epoch."""
        if self.step == 0:
            return {name: self._copy(tensor) for name, tensor in self.state_dict.items()}
        model_state = self._live_state()
        correction = 1.0 - self._decay**self.step
        result = {}
        for name, tensor in self.state_dict.items():
            if name in self.ema_black_list:
                result[name] = tensor
            elif self.ema_decay_type == "exponential":
                result[name] = self._copy(tensor)
            else:
                result[name] = (tensor / correction).astype(model_state[name].dtype)
                result[name].stop_gradient = True
        self.epoch += 1
        if self.cycle_epoch > 0 and self.epoch == self.cycle_epoch:
            self.reset()
        return result

    @staticmethod
    def _copy(tensor):
        copy = tensor.detach().clone()
        copy.stop_gradient = True
        return copy

    def resume(self, state_dict, step=0):
        """Take shadows from `state_dict` (entries this EMA has; others ignored) and set t = step."""
        averaged = set(self.averaged)
        for name, value in state_dict.items():
            if name not in self.state_dict:
                continue
            value = value if isinstance(value, paddle.Tensor) else paddle.to_tensor(value)
            if name not in averaged:
                self.state_dict[name] = value
                continue
            if list(value.shape) != list(self.state_dict[name].shape):
                raise IncompatibleStateError(
                    f"ModelEMA.resume: {name} has shape {list(value.shape)}, the model's is "
                    f"{list(self.state_dict[name].shape)}"
                )
            kernels.copy_([self.state_dict[name]], [value])
        self.step = step
        self._decay = self.rule.schedule(step - 1) if step > 0 else None

    def ema_state(self):
        """Everything needed to resume exactly (the raw shadows, t, epoch and last decay)."""
        return {
            "format": "paddle_ema.ModelEMA",
            "shadow": {name: self.state_dict[name] for name in self.averaged},
            "step": self.step,
            "epoch": self.epoch,
            "last_decay": self._decay,
            "settings": {"decay": self.decay, "ema_decay_type": self.ema_decay_type, "cycle_epoch": self.cycle_epoch},
        }

    def load_ema_state(self, state):
        """Resume exactly from ema_state(): no second bias correction."""
        if not isinstance(state, dict) or state.get("format") != "paddle_ema.ModelEMA":
            raise IncompatibleStateError("not a ModelEMA.ema_state() dict")
        mine = self.ema_state()["settings"]
        if state["settings"] != mine:
            raise IncompatibleStateError(f"ModelEMA settings differ: {state['settings']} in the state, {mine} here")
        missing = [name for name in self.averaged if name not in state["shadow"]]
        if missing:
            raise IncompatibleStateError(f"ModelEMA state lacks {missing[:5]}")
        kernels.copy_(self._shadows(), [state["shadow"][name] for name in self.averaged])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self._decay = state["last_decay"]
