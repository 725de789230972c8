"""PaddleDetection's EMA classes (ppdet/optimizer/ema.py), bit for bit: `ModelEMA`, `SimpleModelEMA`.

    ema = ModelEMA(model, decay=0.9998, ema_decay_type='threshold', cycle_epoch=-1,
                   ema_black_list=None, ema_filter_no_grad=False)
    ema.update()                        # after optimizer.step()
    model.set_dict(ema.apply())         # or paddle.save(ema.apply(), 'x.pdparams')

Same constructor, methods and numbers as PaddleDetection's class (tested bitwise against a numpy
float32 model of its arithmetic that is itself tested against Paddle's ops, tests/ppdet_oracle.py):
- one float32 zero shadow per `model.state_dict()` entry, BatchNorm statistics included;
- update t (t = updates so far) takes decay d from `ema_decay_type` ('threshold':
  min(decay, (1+t)/(10+t)); 'exponential': decay*(1-exp(-(t+1)/2000)); 'normal': constant) and
  computes shadow = d*shadow + (1-d)*value.astype(float32) rounded as Paddle's eager ops round it:
  (float32(d)*shadow + 0) + (float32(1-d)*value + 0), each product and the sum rounded to
  float32 on its own (`kernels.Kernel.scale_add_`: one fused multi-threaded call, or the same
  Paddle ops). Where PaddleDetection allocates new shadows, these are updated in place;
- `apply()` runs PaddleDetection's own ops: with t = 0 the (zero) shadows; otherwise
  shadow / (1 - d_last**t) (Paddle's divide by float32(1 - d_last**t)) cast to the weight's dtype,
  d_last the decay of the LAST update; 'exponential' gets neither the division nor the cast;
- black-listed names (substring match on state-dict keys) are returned as the live tensor, and
  apply() sets stop_gradient = True on them as PaddleDetection's does, which freezes a trainable
  black-listed parameter (a one-time notice on the `paddle_ema.ppdet` logger names each one, shown
  under a `warnings` filter too; freeze_black_list=False keeps them trainable);
  `ema_filter_no_grad` black-lists stop_gradient parameters other than BatchNorm2D/SyncBatchNorm
  `_mean`/`_variance`;
- every `apply()` after the first update counts one 'epoch'; when it reaches `cycle_epoch` (> 0)
  the shadows go back to zeros and t to 0;
- `resume(state_dict, step)` takes the entries as given (cast to float32 for shadows) and sets
  t = step. Fed the output of apply() (bias-corrected weights, as PaddleDetection's trainer does),
  the next apply() divides again: that is the trainer's double correction, kept. `ema_state()` /
  `load_ema_state()` resume exactly instead; inside PaddleDetection's trainer, `exact_resume`
  (one line in its tools/train.py) keeps that state in `<checkpoint>.pdemastate` files.

Differences from PaddleDetection's class, none of which changes a number of a run that works there
(docs/migration.md has the table):
- an unknown `ema_decay_type` is a ConfigError (PaddleDetection treats any other string as
  'normal'); 'constant' and 'power' (package schedules) are accepted too;
- a `cycle_epoch` that is not an integer is a ConfigError (PaddleDetection compares it with its
  epoch count, so a fractional one never restarts there);
- after `resume(..., step>0)` without an update, apply() corrects with the decay of update
  step-1 (PaddleDetection raises AttributeError there);
- returned tensors are copies (the shadows are updated in place), so a returned dict does not
  change under later updates, as PaddleDetection's does not either;
- `nonfinite='skip'` / `'raise'` (not the default) guard the update against NaN/Inf weights.

`SimpleModelEMA(model, decay)` is PaddleDetection's timm-style EMA of a deep copy `.model`:
update(model, decay) does `v = v*decay + (1-decay)*x` on every floating state entry in the entry's
own dtype (float16 entries in float16, as Paddle's scale/add kernels compute them). A tensor held
under several keys (a layer registered twice) moves once per update, as in PaddleDetection
(`last_key_per_tensor`).
"""

import copy
import json
import logging
import os
import weakref
import zipfile
from typing import Any, Callable, Dict, List, Optional, Set, Union

import numpy as np
import paddle
from paddle import nn

from .. import kernels
from ..core.averaging import EMARule, settings_differences
from ..core.nonfinite import NonfiniteAttributes, NonfinitePolicy
from ..core.schedules import schedule_for_decay_type
from ..core.selection import batchnorm_statistic_names, black_listed_keys
from ..core.step_policy import AVERAGE, StepPolicy
from ..core.validation import is_integer
from ..errors import CheckpointError, ConfigError, IncompatibleStateError
from ..infra.checkpoint import atomic_write
from ..infra.saved_state import SavedState, tensor_problem
from ..kernels import Kernel, first_nonfinite_name

__all__ = ["ModelEMA", "SimpleModelEMA", "resume_ema_exactly", "bn_running_state_names", "last_key_per_tensor", "save_ema_state_file",
           "load_ema_state_file", "exact_resume", "EMA_STATE_SUFFIX"]

# The library's logger ("paddle_ema" and below): with no logging set up, Python prints its warnings
# on stderr; PaddleDetection's own loggers do not propagate, so this one reaches stderr there too.
# Named after the documented import path, which log filters may name.
LOGGER = logging.getLogger("paddle_ema.ppdet")

# ModelEMA's non-finite modes, its default (PaddleDetection's behaviour, no check) first.
NONFINITE_MODES = ("update", "skip", "raise")

# The BatchNorm kinds whose statistics PaddleDetection's ema_filter_no_grad keeps averaged.
PPDET_BATCHNORM_CLASSES = (nn.BatchNorm2D, nn.SyncBatchNorm)


def bn_running_state_names(model: nn.Layer) -> Set[str]:
    """State-dict names of BatchNorm2D/SyncBatchNorm running statistics (PaddleDetection's notion).

    Args:
        model: a `paddle.nn.Layer`, bare or wrapped.

    Returns:
        `selection.batchnorm_statistic_names(model, PPDET_BATCHNORM_CLASSES)`.
    """
    return batchnorm_statistic_names(model, PPDET_BATCHNORM_CLASSES)


class ModelEMA(NonfiniteAttributes):
    """PaddleDetection's ModelEMA: same constructor, methods and numbers (see the module docstring).

    Args:
        model: the `paddle.nn.Layer` whose state dict is averaged.
        decay: the schedule's decay.
        ema_decay_type: 'threshold', 'exponential' (tau 2000), 'normal' (constant), or another
            registered schedule name (`schedules.schedule_for_decay_type`).
        cycle_epoch: restart the average after every that many apply() calls; <= 0 never
            (the step policy's restart_every).
        ema_black_list: substrings of state-dict keys left live (not averaged).
        ema_filter_no_grad: also leave live the stop_gradient parameters other than
            BatchNorm2D/SyncBatchNorm statistics.
        freeze_black_list: (beyond PaddleDetection's) apply() sets stop_gradient=True on the
            black-listed tensors it returns (the model's own), as PaddleDetection's does.
            Default True; False keeps them trainable.
        nonfinite: (beyond PaddleDetection's) 'update' (default, PaddleDetection's behaviour): no
            check. 'skip': an update whose averaged values hold NaN or Inf changes nothing (t does
            not advance), is counted in `num_nonfinite_skipped` and warned about; 'raise':
            NonFiniteError.
    """

    def __init__(self, model: nn.Layer, decay: float = 0.9998, ema_decay_type: str = "threshold",
                 cycle_epoch: int = -1, ema_black_list: Optional[List[str]] = None, ema_filter_no_grad: bool = False,
                 *, freeze_black_list: bool = True, nonfinite: str = "update"):
        self.nonfinite_policy = NonfinitePolicy(nonfinite, modes=NONFINITE_MODES)
        self.decay = decay
        self.ema_decay_type = ema_decay_type
        if not is_integer(cycle_epoch):
            raise ConfigError(f"cycle_epoch must be an integer (<= 0: never restart), got {cycle_epoch!r}")
        self.cycle_epoch = cycle_epoch
        # PaddleDetection's quirks as settings of the one step policy: every update averages,
        # t = updates so far, and the average restarts after every cycle_epoch-th apply().
        self.policy = StepPolicy(restart_every=max(int(cycle_epoch), 0))
        self.freeze_black_list = bool(freeze_black_list)
        self.rule = EMARule(schedule_for_decay_type(ema_decay_type, decay))
        self.step = 0
        self.epoch = 0
        self._decay = None
        self._freeze_warned = False
        model_state = model.state_dict()
        self.ema_black_list = black_listed_keys(model, ema_black_list, ema_filter_no_grad, PPDET_BATCHNORM_CLASSES)
        self.averaged = [name for name in model_state if name not in self.ema_black_list]
        self._model_state = {name: weakref.ref(tensor) for name, tensor in model_state.items()}
        self.state_dict = {}
        for name, tensor in model_state.items():
            self.state_dict[name] = tensor if name in self.ema_black_list else self._zeros(tensor)
        # The update of the shadows, bound to them (reset() binds its new zeros).
        self._kernel = Kernel(self._shadows())
        # Build (or load) the fused kernel now, with one line when it compiles, not inside the first update.
        kernels.prepare()

    @staticmethod
    def _zeros(tensor):
        return paddle.zeros(tensor.shape, dtype="float32")

    def _shadows(self):
        return [self.state_dict[name] for name in self.averaged]

    def reset(self) -> None:
        """Restart the average: zero shadows, t = 0, epoch = 0."""
        self.step = 0
        self.epoch = 0
        for name in self.averaged:
            self.state_dict[name] = self._zeros(self.state_dict[name])
        self._kernel.rebind(self._shadows())

    def _live_state(self):
        state = {name: ref() for name, ref in self._model_state.items()}
        gone = [name for name, tensor in state.items() if tensor is None]
        if gone:
            raise RuntimeError(f"ModelEMA: the model's tensors {gone[:3]} were garbage-collected; pass update(model)")
        return state

    def update(self, model: Optional[nn.Layer] = None) -> None:
        """Fold the model's current state into the shadows (after optimizer.step()).

        Args:
            model: the model to read; None reads the one given to the constructor.
        """
        values = model.state_dict() if model is not None else self._live_state()
        values = [values[name] for name in self.averaged]
        kind, t = self.policy.action(self.step)
        assert kind == AVERAGE  # no start step, no update_every: every update averages
        decay = self.rule.schedule(t)
        # PaddleDetection's (1 - decay), in float64: not 1 - float32(decay).
        bad = self._kernel.scale_add_(values, decay, 1 - decay, scan=values if self.nonfinite_policy.checks else None)
        if bad is not None:
            self._skip_nonfinite(bad)
            return
        self._decay = decay
        self.step += 1

    def _skip_nonfinite(self, bad):
        """The update found averaged[bad] holding NaN or Inf: the policy raises, or counts and warns."""
        name = self.averaged[bad]
        self.nonfinite_policy.skip(f"ModelEMA.update() at step {self.step}: {name!r} holds NaN or Inf",
                                   f"ModelEMA update skipped: {name!r} holds NaN or Inf")

    @property
    def last_decay(self) -> Optional[float]:
        """The decay of the last update (None before the first)."""
        return self._decay

    def apply(self) -> Dict[str, paddle.Tensor]:
        """The averaged state dict, bias-corrected PaddleDetection's way; counts one epoch (after
        the first update), restarting the average after `cycle_epoch` of them.

        Returns:
            {state-dict key: tensor}: copies of the averages, the live tensors for black-listed keys.
        """
        result = self.averaged_state()
        if self.step == 0:
            return result
        self.epoch += 1  # apply()s since the last restart: reset() sets it back to 0
        if self.policy.restarts_after(self.epoch):
            self.reset()
        return result

    @paddle.no_grad()
    def averaged_state(self) -> Dict[str, paddle.Tensor]:
        """apply()'s state dict without counting an epoch (to evaluate without a snapshot).

        Returns:
            {name: tensor}, the same values apply() returns.
        """
        if self.step == 0:
            return {name: self._copy(tensor) for name, tensor in self.state_dict.items()}
        model_state = self._live_state()
        correction = 1 - self._decay**self.step
        result = {}
        for name, tensor in self.state_dict.items():
            if name in self.ema_black_list:
                if self.freeze_black_list:
                    self._freeze(name, tensor)
                result[name] = tensor
            elif self.ema_decay_type == "exponential":
                result[name] = self._copy(tensor)
            else:
                # PaddleDetection's own two ops, so the numbers follow whatever Paddle computes.
                result[name] = (tensor / correction).astype(model_state[name].dtype)
                result[name].stop_gradient = True
        return result

    def _freeze(self, name, tensor):
        """PaddleDetection's apply() sets stop_gradient on the black-listed tensors it returns,
        the model's own: a trainable one stops training from then on. Said once."""
        if not tensor.stop_gradient and not self._freeze_warned:
            trainable = [n for n in sorted(self.ema_black_list) if not self.state_dict[n].stop_gradient]
            self._freeze_warned = True
            # A log record, not a warning: PaddleDetection's tools/train.py ignores all warnings.
            LOGGER.warning(
                "ModelEMA.apply() sets stop_gradient=True on the trainable black-listed parameter(s) "
                "%s, as PaddleDetection's ModelEMA does: they stop training from now on. "
                "Pass freeze_black_list=False to keep them trainable.", trainable
            )
        tensor.stop_gradient = True

    @staticmethod
    def _copy(tensor):
        copy = tensor.detach().clone()
        copy.stop_gradient = True
        return copy

    def resume(self, state_dict: Dict[str, Any], step: int = 0) -> None:
        """Take shadows from `state_dict` and set t = step, as PaddleDetection's resume does. Every
        entry is checked first (a tensor of the entry's shape; averaged ones floating point and
        finite): one that does not fit raises IncompatibleStateError naming it, and changes nothing.

        Args:
            state_dict: {key: tensor or array}; keys this EMA does not have are ignored.
            step: the updates made so far, an integer >= 0.
        """
        if not isinstance(state_dict, dict):
            raise IncompatibleStateError(f"ModelEMA.resume: the state is a {type(state_dict).__name__}, not a dict")
        if not is_integer(step, 0):
            raise ConfigError(f"ModelEMA.resume: step must be an integer >= 0, got {step!r}")
        averaged = set(self.averaged)
        given = {name: value for name, value in state_dict.items() if name in self.state_dict}
        for name, value in given.items():
            problem = tensor_problem(value, self.state_dict[name].shape, floating=name in averaged)
            if problem:
                raise IncompatibleStateError(f"ModelEMA.resume: {name!r} {problem}")
        bad = first_nonfinite_name(given)
        if bad is not None:
            raise IncompatibleStateError(f"ModelEMA.resume: {bad!r} holds NaN or Inf")
        for name, value in given.items():
            value = value if isinstance(value, paddle.Tensor) else paddle.to_tensor(value)
            if name not in averaged:  # PaddleDetection keeps the given tensor, in the entry's dtype
                mine = self.state_dict[name].dtype
                self.state_dict[name] = value if value.dtype == mine else value.astype(mine)
            else:
                kernels.copy_([self.state_dict[name]], [value])
        self.step = int(step)
        self._decay = self.rule.schedule(self.step - 1) if self.step > 0 else None

    def ema_state(self) -> Dict[str, Any]:
        """Everything needed to resume exactly.

        Returns:
            The raw shadows, t, epoch, last decay and the settings.
        """
        return {
            "format": "paddle_ema.ModelEMA",
            "shadow": {name: self.state_dict[name] for name in self.averaged},
            "step": self.step,
            "epoch": self.epoch,
            "last_decay": self._decay,
            "settings": {"decay": self.decay, "ema_decay_type": self.ema_decay_type, "cycle_epoch": self.cycle_epoch},
        }

    def load_ema_state(self, state: Dict[str, Any]) -> None:
        """Resume exactly from ema_state(): no second bias correction. The whole state is checked
        first (settings; names, shapes, floating dtypes and finiteness of the shadows; step,
        epoch and last decay): one that does not fit raises IncompatibleStateError naming what
        differs, and changes nothing.

        Args:
            state: an ema_state() of a ModelEMA with the same settings.
        """
        if not isinstance(state, dict) or state.get("format") != "paddle_ema.ModelEMA":
            raise IncompatibleStateError("not a ModelEMA.ema_state() dict")
        saved = SavedState(state, "the ModelEMA state does not fit this ModelEMA")
        differences = settings_differences(saved.mapping("settings"), self.ema_state()["settings"])
        if differences:
            raise IncompatibleStateError("ModelEMA settings differ: " + "; ".join(differences))
        shadows = saved.averages("shadow", {name: self.state_dict[name].shape for name in self.averaged})
        step, epoch = saved.count("step"), saved.count("epoch")
        # apply() divides by 1 - last_decay**step: after an update it is a decay below 1.
        last_decay = saved.fraction("last_decay", optional=step == 0, below_one=True)
        sources = [value if isinstance(value, paddle.Tensor) else paddle.to_tensor(value) for value in shadows.values()]
        kernels.copy_(self._shadows(), sources)
        self.step, self.epoch, self._decay = step, epoch, last_decay
        # Black-listed entries are the model's own tensors again, as in a run that never stopped
        # (resume(), which PaddleDetection's trainer calls first, put loaded copies there).
        for name in self.ema_black_list:
            live = self._model_state[name]()
            self.state_dict[name] = self.state_dict[name] if live is None else live


def last_key_per_tensor(state: Dict[str, paddle.Tensor], names: List[str]) -> List[str]:
    """`names` with one key per underlying tensor: the last of the keys that hold the same memory.

    A model that registers a layer twice (PaddleDetection's PicoHeadV2 holds its first
    classification layer as `head_cls_list.0` and `head_cls0`) has one tensor under two state-dict
    keys. PaddleDetection's whole-state-dict updates compute each key's new value from the tensor's
    old one and write the keys in order with set_state_dict: the tensor moves once, to the value of
    its last key. An in-place update must take it once, from that key, to give the same numbers.

    Args:
        state: a state dict.
        names: keys of `state`, in its order.

    Returns:
        The keys to update, in the same order.
    """
    last = {}
    for name in names:
        tensor = state[name]
        # The same object, or another tensor on the same elements (a buffer shared by
        # Tensor._share_buffer_to): the same first element, dtype and shape.
        last[(tensor.data_ptr(), str(tensor.dtype), tuple(tensor.shape))] = name
    kept = set(last.values())
    return [name for name in names if name in kept]


class SimpleModelEMA:
    """PaddleDetection's SimpleModelEMA (timm's ModelEma): an EMA of a deep copy of the model.

    `model` is the copy; update(model, decay) moves every floating entry of its state dict to
    v*decay + (1-decay)*x in the entry's dtype, rounded as Paddle's scale and add ops round it
    (kernels.Kernel.scale_add_); other entries are left as they are. No zero init, no correction.
    A tensor under several keys moves once, with x from its last key (`last_key_per_tensor`).

    Args:
        model: the model to copy.
        decay: the default decay of update().
    """

    def __init__(self, model: Optional[nn.Layer] = None, decay: float = 0.9996):
        self.model = copy.deepcopy(model)
        self.decay = decay
        self._kernel = None  # bound to the copy's float32/float64 entries at the first update
        # Build (or load) the fused kernel now, with one line when it compiles, not inside the first update.
        kernels.prepare()

    @paddle.no_grad()
    def update(self, model: nn.Layer, decay: Optional[float] = None) -> None:
        """Move the copy's floating entries towards `model`'s.

        Args:
            model: the trained model.
            decay: this update's decay; None for the constructor's.
        """
        if decay is None:
            decay = self.decay
        current, mine = model.state_dict(), self.model.state_dict()
        names = last_key_per_tensor(mine, [name for name, value in mine.items() if paddle.is_floating_point(value)])
        # Half-precision entries first, out of place with PaddleDetection's ops: where Paddle lacks
        # a kernel (float16 add on the CPU) this raises, as PaddleDetection's does, before any
        # entry has changed.
        half = [n for n in names if mine[n].dtype not in (paddle.float32, paddle.float64)]
        new_half = {n: mine[n] * decay + (1.0 - decay) * current[n].detach() for n in half}
        full = [mine[n] for n in names if n not in new_half]
        if self._kernel is None or len(full) != len(self._kernel.averages) or \
                any(a is not b for a, b in zip(full, self._kernel.averages)):
            self._kernel = Kernel(full)
        self._kernel.scale_add_([current[n].detach() for n in names if n not in new_half], decay, 1.0 - decay)
        kernels.copy_([mine[n] for n in half], [new_half[n] for n in half])

    def resume(self, state_dict: Dict[str, Any], step: int = 0) -> None:
        """Load the floating entries of `state_dict` into the copy; set `step`. Every floating
        entry of the copy must be there, a finite floating-point tensor of its shape; otherwise
        IncompatibleStateError names it and nothing changes.

        Args:
            state_dict: a state dict of the model.
            step: the updates made so far, an integer >= 0.
        """
        if not isinstance(state_dict, dict):
            raise IncompatibleStateError(f"SimpleModelEMA.resume: the state is a {type(state_dict).__name__}, not a dict")
        if not is_integer(step, 0):
            raise ConfigError(f"SimpleModelEMA.resume: step must be an integer >= 0, got {step!r}")
        mine = self.model.state_dict()
        floating = [name for name, value in mine.items() if paddle.is_floating_point(value)]
        missing = [name for name in floating if name not in state_dict]
        if missing:
            raise IncompatibleStateError(f"SimpleModelEMA.resume: the state lacks {missing[:5]}")
        for name in floating:
            problem = tensor_problem(state_dict[name], mine[name].shape)
            if problem:
                raise IncompatibleStateError(f"SimpleModelEMA.resume: {name!r} {problem}")
        bad = first_nonfinite_name({name: state_dict[name] for name in floating})
        if bad is not None:
            raise IncompatibleStateError(f"SimpleModelEMA.resume: {bad!r} holds NaN or Inf")
        state = {}
        for name, value in mine.items():
            if name in floating:
                given = state_dict[name]
                value = given.detach() if isinstance(given, paddle.Tensor) else paddle.to_tensor(given)
            state[name] = value
        self.model.set_state_dict(state)
        self.step = int(step)


# Exact resume inside PaddleDetection's trainer. Its checkpoints hold the EMA only as apply()'s
# output (<stem>.pdparams, bias-corrected and cast), which its load_weight() hands to resume() as
# raw shadows: the resumed average is corrected twice. `exact_resume` keeps the EMA's own state
# in one more file beside each checkpoint and loads it after the trainer's own resume.
EMA_STATE_SUFFIX = ".pdemastate"
EMA_STATE_FORMAT = "paddle_ema.ModelEMA/npz-1"
# The suffixes a checkpoint path may carry (PaddleDetection's _strip_postfix takes the first three).
CHECKPOINT_SUFFIXES = (".pdparams", ".pdopt", ".pdmodel", ".pdema", EMA_STATE_SUFFIX)


def _stem(path):
    stem, suffix = os.path.splitext(os.fspath(path))
    return stem if suffix in CHECKPOINT_SUFFIXES else os.fspath(path)


def save_ema_state_file(ema: ModelEMA, stem: Union[str, os.PathLike]) -> str:
    """Write `ema.ema_state()` to `<stem>.pdemastate`, crash-safe, in a format read without pickle.

    The file is a numpy .npz archive: the float32 shadows, and as JSON the step, epoch, last
    decay, settings and the black-listed tensors that are stop_gradient now (apply() freezes the
    trainable ones, and a resumed run must have them frozen too).

    Args:
        ema: the ModelEMA to save.
        stem: the checkpoint's path without suffix (a suffix such as `.pdparams` is dropped).

    Returns:
        The path written.
    """
    state = ema.ema_state()
    names = list(state["shadow"])
    live = {name: ema._model_state[name]() for name in ema.ema_black_list}
    meta = {
        "format": EMA_STATE_FORMAT,
        "names": names,
        "step": state["step"],
        "epoch": state["epoch"],
        "last_decay": state["last_decay"],
        "settings": state["settings"],
        "frozen": sorted(n for n, tensor in live.items() if tensor is not None and tensor.stop_gradient),
    }
    arrays = {f"s{i}": state["shadow"][name].numpy() for i, name in enumerate(names)}
    path = _stem(stem) + EMA_STATE_SUFFIX

    def write(f):
        # np.savez's layout, with a fixed time stamp: the same state gives the same bytes.
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
            for key, array in [("meta", np.array(json.dumps(meta))), *arrays.items()]:
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with archive.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)

    atomic_write(path, write)
    return path


def _read_ema_state(path):
    """The ema_state() dict and the frozen names stored in `path`; CheckpointError when unreadable."""
    if not os.path.isfile(path):
        raise CheckpointError(f"EMA state: {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"][()]))
            if not isinstance(meta, dict) or meta.get("format") != EMA_STATE_FORMAT:
                raise CheckpointError(f"EMA state: {path} is not a paddle_ema ModelEMA state file "
                                      f"(format {EMA_STATE_FORMAT!r})")
            shadow = {name: data[f"s{i}"] for i, name in enumerate(meta["names"])}
            frozen = list(meta["frozen"])
            state = {"format": "paddle_ema.ModelEMA", "shadow": shadow, "step": meta["step"],
                     "epoch": meta["epoch"], "last_decay": meta["last_decay"], "settings": meta["settings"]}
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"EMA state: {path} cannot be read: it is truncated, corrupted or not a "
                              f"paddle_ema ModelEMA state file ({type(exc).__name__})") from None
    return state, frozen


def load_ema_state_file(ema: ModelEMA, stem: Union[str, os.PathLike]) -> None:
    """Resume `ema` exactly from `<stem>.pdemastate` (written by `save_ema_state_file`).

    Overrides what resume() took from the checkpoint's bias-corrected weights; the black-listed
    tensors that apply() had frozen when the file was written are frozen again.

    Args:
        ema: the ModelEMA to set.
        stem: the checkpoint's path without suffix (a suffix such as `.pdparams` is dropped).

    Raises:
        CheckpointError: the file is missing or unreadable.
        IncompatibleStateError: it was written by a ModelEMA with other settings or entries.
    """
    state, frozen = _read_ema_state(_stem(stem) + EMA_STATE_SUFFIX)
    state["shadow"] = {name: paddle.to_tensor(value) for name, value in state["shadow"].items()}
    ema.load_ema_state(state)
    for name in frozen:
        tensor = ema._model_state[name]() if name in ema._model_state else None
        if tensor is not None:
            tensor.stop_gradient = True


def exact_resume(trainer: Any, resume: Optional[Union[str, os.PathLike]] = None) -> None:
    """Make a PaddleDetection Trainer's EMA resume exactly (its own resume corrects twice).

    Call it in PaddleDetection's tools/train.py after `trainer.resume_weights(FLAGS.resume)`:
    `exact_resume(trainer, FLAGS.resume)`. With `resume` given, the EMA state saved beside that
    checkpoint replaces what the trainer's resume made of the bias-corrected weights (a
    checkpoint without one keeps PaddleDetection's resume, with a logged warning). From then on, a
    callback writes `<checkpoint>.pdemastate` beside every checkpoint the trainer's Checkpointer
    saves while training (`<save_dir>/<epoch or model_final>`).

    Args:
        trainer: a `ppdet.engine.Trainer` built with `use_ema` and paddle_ema's ModelEMA.
        resume: the checkpoint passed to `trainer.resume_weights`, or None for a fresh run.

    Raises:
        ConfigError: the trainer has no paddle_ema ModelEMA.
        CheckpointError: the EMA state beside `resume` is unreadable.
        IncompatibleStateError: it does not fit the trainer's EMA.
    """
    def checkpoint(cfg, name):
        folder = os.path.join(cfg.save_dir, name) if cfg.get("uniform_output_enabled", False) else cfg.save_dir
        return os.path.join(folder, name)

    resume_ema_exactly(trainer, resume, ModelEMA, "PaddleDetection", "paddle_ema.ppdet", checkpoint, LOGGER)


def resume_ema_exactly(trainer: Any, resume: Optional[Union[str, os.PathLike]], ema_class: type, suite: str,
                       module: str, checkpoint: Callable[[Any, str], str], logger: logging.Logger) -> None:
    """exact_resume for a trainer of PaddleDetection's design (PaddleDetection's, PaddleYOLO's).

    Args:
        trainer: the `ppdet.engine.Trainer`.
        resume: the checkpoint passed to `trainer.resume_weights`, or None for a fresh run.
        ema_class: the ModelEMA class the trainer must hold.
        suite: the suite's name, for messages.
        module: the module to import ModelEMA from, for messages.
        checkpoint: (cfg, name) -> the stem the suite's Checkpointer writes checkpoint `name` to.
        logger: where a checkpoint without an EMA state beside it is reported.
    """
    from ppdet.engine.callbacks import Callback  # the trainer accepts only its subclasses

    ema = getattr(trainer, "ema", None) if getattr(trainer, "use_ema", False) else None
    if not isinstance(ema, ema_class):
        raise ConfigError("exact_resume: the trainer has no paddle_ema ModelEMA (set use_ema: true, and import "
                          f"ModelEMA from {module} in ppdet/optimizer/ema.py)")
    if resume is not None:
        if os.path.isfile(_stem(resume) + EMA_STATE_SUFFIX):
            load_ema_state_file(ema, resume)
        else:
            logger.warning("%s has no EMA state beside it (%s): the EMA resumes %s's way, from the "
                           "bias-corrected weights", resume, _stem(resume) + EMA_STATE_SUFFIX, suite)

    class SaveEMAState(Callback):
        """Writes the EMA state beside each training checkpoint, after the Checkpointer."""

        def on_epoch_end(self, status):
            # The trainer puts the raw weights in status['weight'] exactly when it snapshots the
            # EMA for the Checkpointer (rank 0, a snapshot epoch); the names are the Checkpointer's.
            if status.get("mode") != "train" or "weight" not in status:
                return
            cfg = self.model.cfg
            epoch_id = status["epoch_id"]
            name = str(epoch_id) if epoch_id != cfg.epoch - 1 else "model_final"
            save_ema_state_file(self.model.ema, checkpoint(cfg, name))

    trainer.register_callbacks([SaveEMAState(trainer)])
