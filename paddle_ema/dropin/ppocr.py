"""PaddleOCR's EMA (ppocr/utils/ema.py), bit for bit: `ModelEMA`.

    ema = ModelEMA(model, decay=0.9998, gamma=2000, ema_decay_type='threshold', ema_filter_no_grad=False)
    ema.update(model)                          # after optimizer.step()
    model.set_state_dict(ema.apply())          # the bias-corrected average, in float32
    paddle.save(ema.state_dict_for_save(), path)
    ema.set_state_dict(paddle.load(path))      # resume

The same constructor, methods, attributes (`state_dict` is a dict attribute, `step`, `decay`,
`gamma`, `ema_decay_type`, `ema_black_list`) and numbers as PaddleOCR's class:
- one float32 zero shadow per `model.state_dict()` entry (integer entries too), except the
  black-listed ones, which hold a clone of the entry taken at construction and never change;
- update t (t = updates so far) takes decay d from `ema_decay_type` ('threshold':
  min(decay, (1+t)/(10+t)); 'exponential': decay*(1-exp(-(t+1)/gamma)); 'normal': constant) and
  moves each shadow whose key the model still has to d*shadow + (1-d)*value.astype(float32),
  rounded as Paddle's `scale` and `add` ops round it (`kernels.scale_add_`: one fused
  multi-threaded call, or the same Paddle ops; `1 - d` in float64, as PaddleOCR writes it);
- `apply()` with t = 0 returns clones of the shadows (zeros); otherwise each shadow divided by
  1 - d**t (Paddle's divide by float32(1 - d**t)), d the decay of the LAST update, in float32:
  no cast back to the weight's dtype; 'exponential' gets no division. Black-listed entries are
  returned as the EMA's own clones. Nothing in the EMA changes;
- `state_dict_for_save()` is {'ema_state': the shadow dict, 'step': t} (references, as
  PaddleOCR's); `set_state_dict(d)` takes that back.

PaddleOCR's quirks, kept by default:
- `ema_filter_no_grad` black-lists the stop_gradient parameters other than the `_mean` /
  `_variance` of BatchNorm1D and BatchNorm2D layers, so the statistics of BatchNorm3D,
  SyncBatchNorm and the older `nn.BatchNorm` stay at their value from construction (a bug:
  `all_batchnorm=True` keeps every BatchNorm kind's statistics averaged). The names are the model's
  own `named_parameters()` names: on a `paddle.DataParallel` wrapper they carry its `_layers.`
  prefix and match no state-dict key, so nothing is black-listed there, as in PaddleOCR;
- the decay of the last update is not part of the saved state: after `set_state_dict`, an apply()
  before the next update divides by 1 - d**t with the last decay this object has seen, which for
  a new object (a resumed run) is the constructor's `decay`. A bug for 'threshold' (whose decay
  is below `decay` for the first 9/(1-decay) updates): `restore_last_decay=True` makes
  set_state_dict() restore it, d(t-1), and apply() then equals the saving run's.

Differences that change no number of a run that works with PaddleOCR's class:
- an unknown `ema_decay_type` is a ConfigError (PaddleOCR treats any other string as 'normal'),
  as are a decay outside [0, 1] and a gamma <= 0;
- the shadows are updated in place (PaddleOCR builds new tensors): a state dict taken earlier
  from `state_dict_for_save()` sees later updates, as PaddleOCR's shared dict mostly does too;
- `set_state_dict(d)` checks every entry first (the same keys, shapes, float32 finite shadows, an
  integer step) and copies the values into the EMA's own tensors (PaddleOCR adopts the given
  tensors unchecked): an entry that does not fit raises IncompatibleStateError naming it and
  changes nothing, and later updates leave the given dict alone;
- `nonfinite='skip'` / `'raise'` (not the default) guard the update against NaN/Inf weights.
"""

from typing import Any, Dict, Set, Tuple

import paddle
from paddle import nn

from .. import _compat, kernels
from ..infra.saved_state import tensor_problem
from ..kernels import first_nonfinite_name
from ..errors import IncompatibleStateError
from ..core.schedules import schedule_for_decay_type
from ..core.validation import is_integer
from ..core.nonfinite import NonfiniteAttributes
from ._nonfinite import NonfiniteGuard

__all__ = ["ModelEMA", "PPOCR_BATCHNORM_CLASSES", "frozen_parameter_names"]

# The BatchNorm kinds whose statistics PaddleOCR's ema_filter_no_grad keeps averaged.
PPOCR_BATCHNORM_CLASSES = (nn.BatchNorm2D, nn.BatchNorm1D)


def frozen_parameter_names(model: nn.Layer, batchnorm_classes: Tuple[type, ...] = PPOCR_BATCHNORM_CLASSES) -> Set[str]:
    """PaddleOCR's black list: the model's stop_gradient parameters other than the `_mean` /
    `_variance` of its `batchnorm_classes` layers, named as `model.named_parameters()` names them
    (no wrapper seen through).

    Args:
        model: the model given to ModelEMA.
        batchnorm_classes: the layer classes whose statistics are not listed.

    Returns:
        The set of listed names.
    """
    statistics = set()
    for name, layer in model.named_sublayers():
        if isinstance(layer, batchnorm_classes):
            prefix = name + "." if name else ""
            statistics.update((prefix + "_mean", prefix + "_variance"))
    return {name for name, param in model.named_parameters() if param.stop_gradient and name not in statistics}


class ModelEMA(NonfiniteAttributes):
    """PaddleOCR's ModelEMA: same constructor, methods, attributes and numbers (see the module
    docstring).

    Args:
        model: the `paddle.nn.Layer` whose state dict is averaged.
        decay: the schedule's decay.
        gamma: the 'exponential' warm-up's time constant, in updates.
        ema_decay_type: 'threshold', 'exponential', 'normal' (constant), or another registered
            schedule name (`schedules.schedule_for_decay_type`).
        ema_filter_no_grad: leave the stop_gradient parameters other than BatchNorm1D/2D
            statistics at their value from construction.
        all_batchnorm: (beyond PaddleOCR's) with ema_filter_no_grad, keep the statistics of every
            BatchNorm kind averaged, BatchNorm3D and SyncBatchNorm included. Default False.
        restore_last_decay: (beyond PaddleOCR's) set_state_dict() also restores the decay of the
            last update, so that apply() before the next update corrects as the saving run did.
            Default False (PaddleOCR's: the constructor's decay).
        nonfinite: (beyond PaddleOCR's) 'update' (default, PaddleOCR's behaviour): no check.
            'skip': an update that would read NaN or Inf from the model changes nothing (t does not
            advance), is counted in `num_nonfinite_skipped` and warned about; 'raise':
            NonFiniteError.
    """

    def __init__(self, model: nn.Layer, decay: float = 0.9998, gamma: float = 2000, ema_decay_type: str = "threshold",
                 ema_filter_no_grad: bool = False, *, all_batchnorm: bool = False, restore_last_decay: bool = False,
                 nonfinite: str = "update"):
        self.nonfinite_policy = NonfiniteGuard(nonfinite, "ModelEMA.update()")
        self._schedule = schedule_for_decay_type(ema_decay_type, decay, tau=gamma)
        self.decay = decay
        self.gamma = gamma
        self.ema_decay_type = ema_decay_type
        self.step = 0
        self._decay = decay
        self.all_batchnorm = bool(all_batchnorm)
        self.restore_last_decay = bool(restore_last_decay)
        self.ema_black_list = set()
        if ema_filter_no_grad:
            classes = _compat.batchnorm_classes() if self.all_batchnorm else PPOCR_BATCHNORM_CLASSES
            self.ema_black_list = frozen_parameter_names(model, classes)
        self.state_dict = {}
        with paddle.no_grad():
            for name, value in model.state_dict().items():
                if name in self.ema_black_list:
                    self.state_dict[name] = value.clone()
                else:
                    self.state_dict[name] = paddle.zeros(value.shape, "float32")
        # Build (or load) the fused kernel now, with one line when it compiles, not inside the first update.
        kernels.prepare()

    @paddle.no_grad()
    def update(self, model: nn.Layer) -> None:
        """Fold the model's current state into the shadows (after optimizer.step()).

        Args:
            model: the trained model; shadows whose key it lacks are left as they are.
        """
        current = model.state_dict()
        names = [name for name in self.state_dict if name not in self.ema_black_list and name in current]
        values = [current[name] for name in names]
        if self.nonfinite_policy.checks and not self.nonfinite_policy.allows(dict(zip(names, values))):
            return
        decay = self._schedule(self.step)
        self._decay = decay
        # PaddleOCR's (1 - decay), in float64: not 1 - float32(decay).
        kernels.scale_add_([self.state_dict[name] for name in names], values, decay, 1 - decay)
        self.step += 1

    @paddle.no_grad()
    def apply(self) -> Dict[str, paddle.Tensor]:
        """The averaged state dict, bias-corrected PaddleOCR's way; the EMA itself is unchanged.

        Returns:
            {state-dict key: tensor}: new float32 tensors for the averages (clones of the zero
            shadows before the first update), the EMA's own clones for black-listed keys.
        """
        if self.step == 0:
            return {name: value.clone() for name, value in self.state_dict.items()}
        correction = 1 - self._decay**self.step
        result = {}
        for name, value in self.state_dict.items():
            if name in self.ema_black_list:
                result[name] = value
                continue
            # PaddleOCR's own op (a divide by a Python float), so the numbers follow Paddle's.
            value = value / correction if self.ema_decay_type != "exponential" else value.clone()
            value.stop_gradient = True
            result[name] = value
        return result

    def state_dict_for_save(self) -> Dict[str, Any]:
        """What PaddleOCR's trainer saves.

        Returns:
            {'ema_state': the shadow dict (the EMA's own tensors), 'step': updates so far}.
        """
        return {"ema_state": self.state_dict, "step": self.step}

    @paddle.no_grad()
    def set_state_dict(self, d: Dict[str, Any]) -> None:
        """Resume from `state_dict_for_save()`'s dict (as saved and loaded by the trainer). Every
        entry is checked first: the same keys as this EMA, each a tensor of its entry's shape, the
        averaged ones float32 and finite, and an integer step >= 0; one that does not fit raises
        IncompatibleStateError naming it, and nothing changes.

        Args:
            d: {'ema_state': {key: tensor}, 'step': int}.
        """
        where = "ModelEMA.set_state_dict"
        if not isinstance(d, dict) or not isinstance(d.get("ema_state"), dict) or "step" not in d:
            raise IncompatibleStateError(f"{where}: expected the dict of state_dict_for_save(), "
                                         "{'ema_state': {key: tensor}, 'step': int}")
        saved, step = d["ema_state"], d["step"]
        if not is_integer(step, 0):
            raise IncompatibleStateError(f"{where}: step must be an integer >= 0, got {step!r}")
        missing = [name for name in self.state_dict if name not in saved]
        extra = [name for name in saved if name not in self.state_dict]
        if missing or extra:
            raise IncompatibleStateError(f"{where}: the saved state lacks {missing[:5]} and has {extra[:5]} that this "
                                         "EMA does not (a state of another model?)")
        for name, mine in self.state_dict.items():
            averaged = name not in self.ema_black_list
            problem = tensor_problem(saved[name], mine.shape, floating=averaged)
            if problem is None and averaged and str(saved[name].dtype).replace("paddle.", "") != "float32":
                problem = f"is {str(saved[name].dtype).replace('paddle.', '')}; PaddleOCR's shadows are float32"
            if problem:
                raise IncompatibleStateError(f"{where}: {name!r} {problem}")
        bad = first_nonfinite_name({name: saved[name] for name in self.state_dict if name not in self.ema_black_list})
        if bad is not None:
            raise IncompatibleStateError(f"{where}: {bad!r} holds NaN or Inf")
        names = list(self.state_dict)
        sources = [saved[name] if isinstance(saved[name], paddle.Tensor) else paddle.to_tensor(saved[name])
                   for name in names]
        kernels.copy_([self.state_dict[name] for name in names], sources)
        self.step = int(step)
        if self.restore_last_decay and self.step > 0:
            self._decay = self._schedule(self.step - 1)
