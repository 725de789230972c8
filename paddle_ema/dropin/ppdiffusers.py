"""ppdiffusers' EMAs, bit for bit: `EMAModel` (training_utils.py) and `LitEma` (models/ema.py), 0.29.0.

    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, model_cls=UNet2DModel,
                   model_config=unet.config)
    ema.step(unet.parameters())                           # after optimizer.step()
    ema.store(unet.parameters()); ema.copy_to(unet.parameters()); ...; ema.restore(unet.parameters())
    ema.save_pretrained(path); EMAModel.from_pretrained(path, UNet2DModel)

    self.model_ema = LitEma(self.unet)                    # an nn.Layer: its buffers are the average
    self.model_ema(self.unet)                             # after optimizer.step()

EMAModel: the same constructor (deprecated `max_value`, `min_value`, `device` keywords and a Layer
passed for parameters included), methods, attributes (`shadow_params`, `temp_stored_params`,
`decay`, `min_decay`, `update_after_step`, `use_ema_warmup`, `inv_gamma`, `power`,
`optimization_step`, `cur_decay_value`, `model_cls`, `model_config`), state keys and numbers as
ppdiffusers':
- one shadow per parameter given, a clone in the parameter's dtype, paired BY POSITION;
- step(parameters) counts `optimization_step` first, then takes d = get_decay(optimization_step):
  0 while optimization_step <= update_after_step, else (t = optimization_step - update_after_step)
  1 - (1 + t/inv_gamma)**-power with `use_ema_warmup`, (1 + t)/(10 + t) without, capped at
  `decay` and floored at `min_decay` (ppdiffusers' t is one step ahead of diffusers' on purpose);
  a trainable parameter's shadow becomes s - (1 - d)*(s - p) in the SHADOW's dtype, rounded as
  Paddle's subtract, scale (+ 0) and subtract ops round it (at d = 0 that is s - 1.0*(s - p), not
  an exact copy); a stop_gradient parameter (BatchNorm statistics, frozen weights) is copied;
- copy_to / store / restore cast to the parameter's dtype; store keeps CPU clones;
- state_dict() holds references; load_state_dict() checks the settings' types as ppdiffusers does;
- save_pretrained() writes the averaged weights through `model_cls.from_config(model_config)` with
  the settings registered in its config; from_pretrained() rebuilds the shadows from those weights.

EMAModel's quirks, kept by default:
- from_pretrained() asks `model_cls.load_config(path, return_unused_kwargs=True)` for the settings,
  which returns the keyword arguments it was given (none), not the config: the loaded EMA has the
  default settings and optimization_step 0, whatever save_pretrained() wrote, so a run resumed
  that way restarts its decay schedule (a bug: `from_pretrained(..., settings_from_config=True)`
  reads them from the config file that save_pretrained wrote);
- shadows saved by save_pretrained() come back in the model class's dtype (float32 by default),
  so a half-precision EMA continues in float32 after such a resume (state_dict() and
  load_state_dict() keep the dtype).

LitEma: the same constructor, methods (`forward(model)`, `copy_to(model)`, `store`, `restore`),
attributes (`m_name2s_name`, `decay`, `num_updates`, `collected_params`) and numbers as
ppdiffusers': a float32 buffer per trainable parameter at construction, named like the parameter
with the dots removed (so they live in the owning model's state dict as `model_ema.<name>`);
forward(model) counts n = num_updates + 1 (unless use_num_upates=False), d = min(decay,
(1 + n)/(10 + n)), and moves each buffer to (d*b + 0) + ((1 - d)*p.astype(float32) + 0), rounded as
Paddle's scale_ and add_ (`kernels.scale_add_`); copy_to casts back to each parameter's dtype.

LitEma's quirks, kept by default:
- two parameter names that differ only by dots ('a.bc', 'ab.c') share one buffer, which both
  update, one after the other, every step (a bug: `name_collisions='separate'` gives the second
  one its own buffer, `<name>_1`);
- `num_updates` is a Python int, not in the state dict: a LitEma loaded from a checkpoint restarts
  its threshold at n = 1, weighting the next update by 9/11 (a bug for resume:
  `save_num_updates=True` keeps it in an int64 buffer `_num_updates` of the state dict).

Differences that change no number of a run that works with ppdiffusers' classes:
- both updates are one fused in-place call for float32/float64 shadows (`kernels.scale_add_`,
  `kernels.sub_scale_sub_`), Paddle's own ops for the others, without ppdiffusers' copies;
- a call that does not fit (load_state_dict with other shadow shapes or a non-finite shadow; a
  LitEma forward or copy_to on a model whose trainable parameters differ from the ones it was built
  with; restore() twice) raises one IncompatibleStateError / EMAStateError naming what is wrong,
  before anything changes;
- `nonfinite='skip'` / `'raise'` (not the default) guard the update against NaN/Inf weights.
"""

import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import paddle
from paddle import nn

from .. import _compat, kernels
from ..kernels import first_nonfinite_name
from ..errors import ConfigError, EMAStateError, IncompatibleStateError
from ..core.schedules import Power, Threshold
from ..core.nonfinite import NonfiniteAttributes
from ._nonfinite import NonfiniteGuard

__all__ = ["EMAModel", "LitEma", "STATE_KEYS", "NUM_UPDATES_BUFFER"]

# EMAModel.state_dict()'s keys besides shadow_params: the settings save_pretrained registers.
STATE_KEYS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")
# The LitEma buffer that keeps num_updates with save_num_updates=True.
NUM_UPDATES_BUFFER = "_num_updates"


def _deprecated(message):
    """ppdiffusers' `deprecate(..., standard_warn=False)`: the message as a FutureWarning."""
    warnings.warn(message, FutureWarning, stacklevel=3)


@paddle.no_grad()
def _copy_cast(targets: Sequence[paddle.Tensor], sources: Sequence[paddle.Tensor]) -> None:
    """targets[i] <- sources[i].cast(targets[i].dtype), with the suite's own cast op where the
    dtypes differ (so the rounding is the running Paddle's, as in ppdiffusers)."""
    same = [(t, s) for t, s in zip(targets, sources) if t.dtype == s.dtype]
    kernels.copy_([t for t, _ in same], [s for _, s in same])
    for target, source in zip(targets, sources):
        if target.dtype != source.dtype:
            target.copy_(source.cast(target.dtype), False)


class _StoreRestore:
    """store()/restore() of both classes: CPU clones, kept in the attribute ppdiffusers names
    (`_stored_name`), written back cast to each parameter's dtype."""

    _stored_name = "temp_stored_params"

    def store(self, parameters: Iterable[paddle.Tensor]) -> None:
        """Keep CPU clones of the parameters, for restore().

        Args:
            parameters: the parameters to keep.
        """
        setattr(self, self._stored_name, [param.detach().cpu().clone() for param in parameters])

    def restore(self, parameters: Iterable[paddle.Tensor]) -> None:
        """Write the stored clones back into the parameters and drop them.

        Args:
            parameters: the parameters store() was given, in its order.
        """
        stored = getattr(self, self._stored_name)
        if stored is None:
            raise EMAStateError(f"{type(self).__name__}.restore(): nothing stored (store() first; restore() gives the "
                                "stored weights back once)")
        pairs = list(zip(stored, parameters))
        _copy_cast([p for _, p in pairs], [c for c, _ in pairs])
        setattr(self, self._stored_name, None)


class EMAModel(NonfiniteAttributes, _StoreRestore):
    """ppdiffusers' EMAModel: same constructor, methods, attributes, state keys and numbers (see
    the module docstring).

    Args:
        parameters: the parameters to average (an iterable; a Layer is deprecated and also turns
            use_ema_warmup on, as in ppdiffusers).
        decay: the cap of the decay.
        min_decay: the floor of the decay.
        update_after_step: the steps before averaging starts (decay 0 until then).
        use_ema_warmup: the warm-up 1 - (1 + t/inv_gamma)**-power instead of (1 + t)/(10 + t).
        inv_gamma: the warm-up's time scale.
        power: the warm-up's exponent.
        model_cls: the model class save_pretrained() writes through (a ppdiffusers ModelMixin).
        model_config: that model's config.
        nonfinite: (beyond ppdiffusers') 'update' (default, ppdiffusers' behaviour): no check.
            'skip': a step whose parameters hold NaN or Inf changes nothing (optimization_step
            does not advance), is counted in `num_nonfinite_skipped` and warned about; 'raise':
            NonFiniteError.
        **kwargs: ppdiffusers' deprecated `max_value` (decay), `min_value` (min_decay) and
            `device` (to(device=...)).
    """

    def __init__(self, parameters: Iterable[paddle.Tensor], decay: float = 0.9999, min_decay: float = 0.0,
                 update_after_step: int = 0, use_ema_warmup: bool = False, inv_gamma: Union[float, int] = 1.0,
                 power: Union[float, int] = 2 / 3, model_cls: Optional[Any] = None,
                 model_config: Optional[Dict[str, Any]] = None, *, nonfinite: str = "update", **kwargs: Any):
        self.nonfinite_policy = NonfiniteGuard(nonfinite, "EMAModel.step()")
        if isinstance(parameters, nn.Layer):
            _deprecated("Passing a `nn.Layer` to `ExponentialMovingAverage` is deprecated. "
                        "Please pass the parameters of the module instead.")
            parameters = parameters.parameters()
            use_ema_warmup = True  # ppdiffusers' backward compatibility for a Layer passed
        if kwargs.get("max_value", None) is not None:
            _deprecated("The `max_value` argument is deprecated. Please use `decay` instead.")
            decay = kwargs["max_value"]
        if kwargs.get("min_value", None) is not None:
            _deprecated("The `min_value` argument is deprecated. Please use `min_decay` instead.")
            min_decay = kwargs["min_value"]
        unknown = sorted(set(kwargs) - {"max_value", "min_value", "device"})
        if unknown:
            raise ConfigError(f"EMAModel got unexpected keyword arguments {unknown}")
        with paddle.no_grad():
            self.shadow_params = [p.clone().detach() for p in parameters]
        if kwargs.get("device", None) is not None:
            _deprecated("The `device` argument is deprecated. Please use `to` instead.")
            self.to(device=kwargs["device"])
        self.temp_stored_params = None
        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_ema_warmup = use_ema_warmup
        self.inv_gamma = inv_gamma
        self.power = power
        self.optimization_step = 0
        self.cur_decay_value = None  # set in step()
        self.model_cls = model_cls
        self.model_config = model_config
        self._schedules = {}
        self._schedule()  # a setting the schedule refuses is an error now, not at the first step
        # Build (or load) the fused kernel now, with one line when it compiles, not inside the first update.
        kernels.prepare()

    def _schedule(self):
        """The decay schedule of the current settings (they are public attributes and
        load_state_dict changes them), built once per settings."""
        key = (self.use_ema_warmup, self.decay, self.inv_gamma, self.power)
        schedule = self._schedules.get(key)
        if schedule is None:
            if self.use_ema_warmup:
                schedule = Power(decay=self.decay, inv_gamma=self.inv_gamma, power=self.power, min_decay=0.0)
            else:
                schedule = Threshold(decay=self.decay)
            self._schedules = {key: schedule}
        return schedule

    @classmethod
    def from_pretrained(cls, path: str, model_cls: Any, *, settings_from_config: bool = False,
                        nonfinite: str = "update") -> "EMAModel":
        """An EMAModel whose shadows are the weights `save_pretrained(path)` wrote.

        Args:
            path: the folder save_pretrained() wrote.
            model_cls: the model class (a ppdiffusers ModelMixin) that reads it.
            settings_from_config: (beyond ppdiffusers') also take the settings and
                optimization_step from the config file save_pretrained() wrote. Default False:
                ppdiffusers' defaults and optimization_step 0 (see the module docstring).
            nonfinite: the new EMAModel's non-finite policy.

        Returns:
            The EMAModel, with `model_cls` and the loaded model's config.
        """
        config, ema_kwargs = model_cls.load_config(path, return_unused_kwargs=True)
        model = model_cls.from_pretrained(path)
        ema_model = cls(model.parameters(), model_cls=model_cls, model_config=model.config, nonfinite=nonfinite)
        if settings_from_config:
            ema_kwargs = {key: config[key] for key in STATE_KEYS if key in config}
        ema_model.load_state_dict(ema_kwargs)
        return ema_model

    def save_pretrained(self, path: str) -> None:
        """Write the averaged weights and the settings as a `model_cls` model folder.

        Args:
            path: the folder to write (model_cls.save_pretrained's).
        """
        if self.model_cls is None:
            raise ConfigError("`save_pretrained` can only be used if `model_cls` was defined at __init__.")
        if self.model_config is None:
            raise ConfigError("`save_pretrained` can only be used if `model_config` was defined at __init__.")
        model = self.model_cls.from_config(self.model_config)
        state_dict = self.state_dict()
        state_dict.pop("shadow_params", None)
        model.register_to_config(**state_dict)
        self.copy_to(model.parameters())
        model.save_pretrained(path)

    def get_decay(self, optimization_step: int) -> float:
        """The decay of the step that brings optimization_step to this value.

        Args:
            optimization_step: the step count, from 1 for the first step.

        Returns:
            0.0 up to update_after_step; then the schedule's value at t = optimization_step -
            update_after_step, capped at decay and floored at min_decay.
        """
        step = max(0, optimization_step - self.update_after_step)
        if step <= 0:
            return 0.0
        return max(self._schedule()(step), self.min_decay)

    @paddle.no_grad()
    def step(self, parameters: Iterable[paddle.Tensor]) -> None:
        """Average the trainable parameters into the shadows, copy the stop_gradient ones.

        Args:
            parameters: the parameters, in the constructor's order (a Layer is deprecated).
        """
        if isinstance(parameters, nn.Layer):
            _deprecated("Passing a `nn.Layer` to `ExponentialMovingAverage.step` is deprecated. "
                        "Please pass the parameters of the module instead.")
            parameters = parameters.parameters()
        parameters = list(parameters)
        if self.nonfinite_policy.checks and not self.nonfinite_policy.allows(
                {f"parameter {i} ({p.name})": p for i, p in enumerate(parameters)}):
            return
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        averaged, copied = [], []
        for shadow, param in zip(self.shadow_params, parameters):
            (copied if param.stop_gradient else averaged).append((shadow, param))
        # ppdiffusers' one_minus_decay, 1 - decay in float64.
        kernels.sub_scale_sub_([s for s, _ in averaged], [p for _, p in averaged], 1 - decay)
        _copy_cast([s for s, _ in copied], [p for _, p in copied])

    def copy_to(self, parameters: Iterable[paddle.Tensor]) -> None:
        """Write the shadows into the parameters, cast to each parameter's dtype.

        Args:
            parameters: the parameters, in the constructor's order.
        """
        parameters = list(parameters)
        pairs = list(zip(self.shadow_params, parameters))
        _copy_cast([p for _, p in pairs], [s for s, _ in pairs])

    def to(self, device: Any = None, dtype: Any = None) -> None:
        """Move the shadows to `device`, and cast the floating ones to `dtype`.

        Args:
            device: a Paddle place or device string; None keeps each shadow's.
            dtype: a floating dtype; None keeps each shadow's.
        """
        self.shadow_params = [p.to(device=device, dtype=dtype) if p.is_floating_point() else p.to(device=device)
                              for p in self.shadow_params]

    def state_dict(self) -> Dict[str, Any]:
        """ppdiffusers' EMA state (references to the shadows, as ppdiffusers returns them).

        Returns:
            {'decay', 'min_decay', 'optimization_step', 'update_after_step', 'use_ema_warmup',
            'inv_gamma', 'power', 'shadow_params'}.
        """
        return {
            "decay": self.decay,
            "min_decay": self.min_decay,
            "optimization_step": self.optimization_step,
            "update_after_step": self.update_after_step,
            "use_ema_warmup": self.use_ema_warmup,
            "inv_gamma": self.inv_gamma,
            "power": self.power,
            "shadow_params": self.shadow_params,
        }

    @paddle.no_grad()
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Take settings and shadows from a state_dict(); absent keys keep their value. Checked as
        ppdiffusers checks them (decay in [0, 1]; min_decay a float; optimization_step and
        update_after_step ints; use_ema_warmup a bool; inv_gamma and power numbers;
        shadow_params a list of tensors), and the shadows one per shadow here, of its shape and
        finite, all before anything changes.

        Args:
            state_dict: a state_dict() of an EMAModel (or part of one).
        """
        where = "EMAModel.load_state_dict"
        if not isinstance(state_dict, dict):
            raise IncompatibleStateError(f"{where}: the state is a {type(state_dict).__name__}, not a dict")
        settings = {key: state_dict.get(key, getattr(self, key)) for key in STATE_KEYS}
        checks = [
            ("decay", lambda v: 0.0 <= v <= 1.0, "Decay must be between 0 and 1"),
            ("min_decay", lambda v: isinstance(v, float), "Invalid min_decay (a float)"),
            ("optimization_step", lambda v: isinstance(v, int), "Invalid optimization_step (an int)"),
            ("update_after_step", lambda v: isinstance(v, int), "Invalid update_after_step (an int)"),
            ("use_ema_warmup", lambda v: isinstance(v, bool), "Invalid use_ema_warmup (a bool)"),
            ("inv_gamma", lambda v: isinstance(v, (float, int)), "Invalid inv_gamma (a number)"),
            ("power", lambda v: isinstance(v, (float, int)), "Invalid power (a number)"),
        ]
        for key, valid, message in checks:
            if not valid(settings[key]):
                raise IncompatibleStateError(f"{where}: {message}, got {key}={settings[key]!r}")
        shadows = state_dict.get("shadow_params", None)
        if shadows is not None:
            self._check_shadows(shadows, where)
        previous = {key: getattr(self, key) for key in STATE_KEYS}
        for key, value in settings.items():
            setattr(self, key, value)
        try:
            self._schedule()  # settings the schedule refuses (inv_gamma <= 0, ...) change nothing
        except ConfigError:
            for key, value in previous.items():
                setattr(self, key, value)
            raise
        if shadows is not None:
            # ppdiffusers deep-copies the state: a shadow of another dtype becomes a copy of the
            # saved one; the others take the saved values in place (no second copy of the model).
            for i, saved in enumerate(shadows):
                mine = self.shadow_params[i]
                if saved.dtype == mine.dtype and _compat.same_place(saved.place, mine.place):
                    kernels.copy_([mine], [saved])
                else:
                    self.shadow_params[i] = saved.detach().clone()

    def _check_shadows(self, shadows, where):
        if not isinstance(shadows, list):
            raise IncompatibleStateError(f"{where}: shadow_params must be a list")
        if not all(paddle.is_tensor(p) for p in shadows):
            raise IncompatibleStateError(f"{where}: shadow_params must all be Tensors")
        if len(shadows) != len(self.shadow_params):
            raise IncompatibleStateError(f"{where}: {len(shadows)} shadow_params for the {len(self.shadow_params)} "
                                         "parameters of this EMAModel")
        for i, (saved, mine) in enumerate(zip(shadows, self.shadow_params)):
            if list(saved.shape) != list(mine.shape):
                raise IncompatibleStateError(f"{where}: shadow_params[{i}] has shape {list(saved.shape)}, "
                                             f"{list(mine.shape)} here")
        bad = first_nonfinite_name({f"shadow_params[{i}]": p for i, p in enumerate(shadows)})
        if bad is not None:
            raise IncompatibleStateError(f"{where}: {bad} holds NaN or Inf")


def _buffer_names(names: List[str], collisions: str) -> Dict[str, str]:
    """{parameter name: buffer name}: the name without dots; with collisions='separate', a name
    already taken gets the first `_<k>` suffix that no other parameter's name takes."""
    plain = [name.replace(".", "") for name in names]
    if collisions == "share":
        return dict(zip(names, plain))
    taken, result = set(), {}
    for name, base in zip(names, plain):
        buffer, k = base, 0
        while buffer in taken or (k and buffer in plain):
            k += 1
            buffer = f"{base}_{k}"
        taken.add(buffer)
        result[name] = buffer
    return result


def _in_rounds(pairs: List[Tuple[paddle.Tensor, paddle.Tensor]]) -> List[List[Tuple[paddle.Tensor, paddle.Tensor]]]:
    """`pairs` split into rounds that each hold a buffer at most once, in order: a shared buffer
    takes its updates one after the other, as ppdiffusers' loop gives them."""
    seen, rounds = {}, []
    for pair in pairs:
        k = seen.get(id(pair[0]), 0)
        seen[id(pair[0])] = k + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(pair)
    return rounds


class LitEma(NonfiniteAttributes, _StoreRestore, nn.Layer):
    """ppdiffusers' LitEma: an nn.Layer whose float32 buffers are the averages (see the module
    docstring).

    Args:
        model: the model; its trainable parameters at construction are averaged.
        decay: the cap of the decay, in [0, 1].
        use_num_upates: (ppdiffusers' spelling) the threshold min(decay, (1 + n)/(10 + n));
            False: the constant decay.
        nonfinite: (beyond ppdiffusers') 'update' (default, ppdiffusers' behaviour): no check.
            'skip': an update whose parameters hold NaN or Inf changes nothing (num_updates does
            not advance), is counted in `num_nonfinite_skipped` and warned about; 'raise':
            NonFiniteError.
        name_collisions: (beyond ppdiffusers') 'share' (default, ppdiffusers'): parameters whose
            names differ only by dots share one buffer; 'separate': each gets its own.
        save_num_updates: (beyond ppdiffusers') keep num_updates in the int64 buffer
            `_num_updates`, so that the state dict resumes the threshold exactly. Default False.
    """

    _stored_name = "collected_params"

    def __init__(self, model: nn.Layer, decay: float = 0.9999, use_num_upates: bool = True, *,
                 nonfinite: str = "update", name_collisions: str = "share", save_num_updates: bool = False):
        super().__init__()
        if decay < 0.0 or decay > 1.0:
            raise ConfigError(f"Decay must be between 0 and 1, got {decay!r}")
        if name_collisions not in ("share", "separate"):
            raise ConfigError(f"name_collisions must be 'share' or 'separate', got {name_collisions!r}")
        self.nonfinite_policy = NonfiniteGuard(nonfinite, "LitEma.forward()")
        self._count = None
        self.decay = decay
        trainable = [(name, p) for name, p in model.named_parameters() if not p.stop_gradient]
        self.m_name2s_name = _buffer_names([name for name, _ in trainable], name_collisions)
        if save_num_updates:
            if NUM_UPDATES_BUFFER in self.m_name2s_name.values():
                raise ConfigError(f"save_num_updates: a parameter's buffer is already named {NUM_UPDATES_BUFFER!r}")
            self.register_buffer(NUM_UPDATES_BUFFER, paddle.to_tensor(0, dtype="int64"))
            self._count = NUM_UPDATES_BUFFER
        self.num_updates = 0 if use_num_upates else -1
        with paddle.no_grad():
            for name, p in trainable:
                # ppdiffusers registers them in this order: a shared name keeps the last one's clone.
                self.register_buffer(self.m_name2s_name[name], p.clone().detach().astype("float32"))
        self.collected_params = []
        # Build (or load) the fused kernel now, with one line when it compiles, not inside the first update.
        kernels.prepare()

    @property
    def num_updates(self) -> int:
        """Updates so far (-1 with use_num_upates=False); in the `_num_updates` buffer with
        save_num_updates."""
        if self._count is None:
            return self._num_updates_int
        return int(getattr(self, self._count))

    @num_updates.setter
    def num_updates(self, value: int) -> None:
        if self._count is None:
            self._num_updates_int = int(value)
        else:
            getattr(self, self._count).set_value(paddle.to_tensor(int(value), dtype="int64"))

    def _pairs(self, model, what):
        """(buffer, parameter) for the model's trainable parameters, in its order; an
        IncompatibleStateError when they are not the ones this LitEma was built with."""
        buffers = dict(self.named_buffers())
        pairs = []
        for name, param in model.named_parameters():
            tracked = name in self.m_name2s_name
            if param.stop_gradient:
                if tracked:
                    raise IncompatibleStateError(f"LitEma.{what}: {name!r} was trainable when this LitEma was built "
                                                 "and is stop_gradient now")
                continue
            if not tracked:
                raise IncompatibleStateError(f"LitEma.{what}: {name!r} is trainable and has no average (it was not a "
                                             "trainable parameter of the model this LitEma was built with)")
            pairs.append((buffers[self.m_name2s_name[name]], param))
        return pairs

    @paddle.no_grad()
    def forward(self, model: nn.Layer) -> None:
        """Fold the model's trainable parameters into the buffers (after optimizer.step()).

        Args:
            model: the model LitEma was built with (or one with the same parameter names).
        """
        pairs = self._pairs(model, "forward()")
        if self.nonfinite_policy.checks and not self.nonfinite_policy.allows(
                {f"parameter {i}": p for i, (_, p) in enumerate(pairs)}):
            return
        decay = self.decay
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = Threshold(decay=self.decay)(self.num_updates)
        for group in _in_rounds(pairs):
            # ppdiffusers' one_minus_decay = 1.0 - decay, in float64.
            kernels.scale_add_([b for b, _ in group], [p for _, p in group], decay, 1.0 - decay)

    def copy_to(self, model: nn.Layer) -> None:
        """Write the averages into the model's trainable parameters, cast to each one's dtype.

        Args:
            model: the model LitEma was built with.
        """
        pairs = self._pairs(model, "copy_to()")
        _copy_cast([p for _, p in pairs], [b for b, _ in pairs])

