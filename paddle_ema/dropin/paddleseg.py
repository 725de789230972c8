"""PaddleSeg's EMA (paddleseg/utils/ema.py, paddleseg 2.8.0), bit for bit: `init_ema_params`,
`update_ema_model`, `judge_params_equal`, and state helpers for the resume PaddleSeg lacks.

    ema_model = copy.deepcopy(model); ema_model.eval()      # PaddleSeg's core/train.py
    init_ema_params(ema_model, model)                       # at the first iteration
    update_ema_model(ema_model, model, step=iter)           # after each optimizer step, iter from 1

The same functions and numbers as PaddleSeg's:
- init_ema_params copies the model's floating-point entries into the EMA model (by key; the
  others are left as they are);
- update_ema_model takes d = min(1 - 1/(step + 1), decay) (Python floats: step 0 gives 0, the
  trainer's first call, step 1, gives 0.5) and moves every floating-point entry v of
  `ema_model.state_dict()` to `v * d + (1 - d) * model.state_dict()[k]` in the entry's dtype,
  rounded as Paddle's `scale` and `add` ops round PaddleSeg's two statements: each product and
  the sum on its own, `1 - d` in float64 (`kernels.scale_add_`, one fused multi-threaded call
  for float32/float64 entries; float16/bfloat16 entries and mixed dtypes run PaddleSeg's own ops,
  whose float16 and bfloat16 add Paddle has on GPUs only);
- judge_params_equal(ema_model, model): whether the parameters, zipped by position, are equal.

PaddleSeg's quirks, kept:
- all new values are computed from the old ones and then written with one set_state_dict, so a
  tensor under two keys (a tied weight) moves once a step, to its last key's value;
- BatchNorm statistics are averaged like weights; the decay depends only on the caller's step;
- core/train.py calls init_ema_params at the first iteration of every run, a resumed one too: the
  EMA it saved (`iter_N/ema_model.pdparams`) is never loaded and the average restarts from the raw
  weights, with the decay continuing at step N + 1. `init_ema_params(ema_model, model,
  resume_from=resume_model)` (one line changed in core/train.py, docs/migration.md) loads it
  instead, so a resumed run continues the EMA it stopped with; `save_ema_state`/`load_ema_state`
  keep the EMA model's state with its step for loops of one's own.

Beyond PaddleSeg's functions, changing no number: `update_ema_model(..., nonfinite='skip' |
'raise')` (not the default) guards the update against NaN/Inf weights, and the update is one fused
call with no new tensors instead of three Paddle ops per entry and a copy of every entry.
"""

import logging
import os
from typing import Any, Dict, Optional, Union

import paddle
from paddle import nn

from .ppdet import last_key_per_tensor

from .. import kernels
from ..infra.saved_state import tensor_problem
from ..kernels import first_nonfinite_name
from ..infra.checkpoint import atomic_save, safe_load
from ..errors import IncompatibleStateError
from ..core.validation import is_integer
from ._nonfinite import NonfiniteGuard

__all__ = ["judge_params_equal", "init_ema_params", "update_ema_model", "paddleseg_decay", "save_ema_state",
           "load_ema_state", "EMA_MODEL_FILE"]

LOGGER = logging.getLogger(__name__)

# The file core/train.py writes in each iter_N folder: ema_model.state_dict().
EMA_MODEL_FILE = "ema_model.pdparams"
STATE_FORMAT = "paddle_ema.paddleseg.ema_model"

_FUSED_DTYPES = (paddle.float32, paddle.float64)


def paddleseg_decay(step: int, decay: float = 0.999) -> float:
    """PaddleSeg's decay of the update at `step`.

    Args:
        step: the caller's step (core/train.py passes its iteration, counted from 1).
        decay: the largest decay.

    Returns:
        min(1 - 1/(step + 1), decay), in Python floats.
    """
    return min(1 - 1 / (step + 1), decay)


def judge_params_equal(ema_model: nn.Layer, model: nn.Layer) -> bool:
    """Whether every parameter of `ema_model` equals the model's, zipped by position.

    Args:
        ema_model: the EMA model.
        model: the trained model.

    Returns:
        True when each pair is equal element for element (NaN is never equal).
    """
    for (_, mine), (_, theirs) in zip(ema_model.named_parameters(), model.named_parameters()):
        if not paddle.equal_all(mine, theirs):
            return False
    return True


@paddle.no_grad()
def init_ema_params(ema_model: nn.Layer, model: nn.Layer, *,
                    resume_from: Optional[Union[str, os.PathLike]] = None) -> None:
    """Copy the model's floating-point entries into the EMA model (PaddleSeg's init), or, with
    `resume_from`, load the EMA that run saved.

    Args:
        ema_model: the EMA model (core/train.py's deep copy of the model).
        model: the trained model.
        resume_from: (beyond PaddleSeg's) core/train.py's `resume_model`, a folder `iter_N` it
            wrote: the EMA model's state is read from its `ema_model.pdparams` (no code in the
            file runs; every entry is checked before any is written). None, or a folder without
            that file (a run saved without --use_ema, said in a log line), keeps PaddleSeg's init.

    Raises:
        CheckpointError: the file is unreadable or is not what paddle.save writes.
        IncompatibleStateError: it does not fit the EMA model.
    """
    if resume_from is not None:
        path = os.path.join(os.fspath(resume_from), EMA_MODEL_FILE)
        if os.path.lexists(path):
            _load_state(ema_model, safe_load(path, "PaddleSeg EMA model"), path)
            return
        LOGGER.warning("%s has no %s: the EMA starts from the model's weights, as PaddleSeg's resume does",
                       resume_from, EMA_MODEL_FILE)
    theirs = model.state_dict()
    ema_model.set_state_dict({k: theirs[k].detach() if paddle.is_floating_point(v) else v
                              for k, v in ema_model.state_dict().items()})


@paddle.no_grad()
def update_ema_model(ema_model: nn.Layer, model: nn.Layer, step: int = 0, decay: float = 0.999, *,
                     nonfinite: str = "update") -> bool:
    """Move the EMA model's floating-point entries to v * d + (1 - d) * m, d = paddleseg_decay(step, decay).

    Args:
        ema_model: the EMA model, updated in place.
        model: the trained model.
        step: the caller's step (core/train.py: its iteration, from 1).
        decay: the largest decay.
        nonfinite: (beyond PaddleSeg's) 'update' (default, PaddleSeg's behaviour): no check.
            'skip': an update that would read NaN or Inf from the model changes nothing (with a
            RuntimeWarning); 'raise': NonFiniteError.

    Returns:
        True when the EMA moved; False when `nonfinite='skip'` skipped the update.
    """
    guard = NonfiniteGuard(nonfinite, f"update_ema_model(step={step})")
    hooked, live, theirs = ema_model.state_dict(), ema_model.state_dict(use_hook=False), model.state_dict()
    # One write per tensor, from its last key: set_state_dict writes the keys in order, and every
    # new value was computed from the old one.
    names = last_key_per_tensor(live, [k for k, v in hooked.items() if paddle.is_floating_point(v)])
    if not guard.allows({k: theirs[k] for k in names}):
        return False
    d = paddleseg_decay(step, decay)
    # Entries read through a state-dict hook (a copy) or of other dtypes: PaddleSeg's own ops,
    # computed before anything is written, then set_value (set_state_dict's write, with its dtype check).
    fusable = {k for k in names if hooked[k] is live[k] and live[k].dtype in _FUSED_DTYPES
               and theirs[k].dtype == live[k].dtype}
    other = {k: hooked[k] * d + (1.0 - d) * theirs[k].detach() for k in names if k not in fusable}
    fused = [k for k in names if k in fusable]
    kernels.scale_add_([live[k] for k in fused], [theirs[k] for k in fused], d, 1.0 - d)
    for k, new in other.items():
        live[k].set_value(new)
    return True


def save_ema_state(ema_model: nn.Layer, path: Union[str, os.PathLike], step: int) -> None:
    """Write the EMA model's state and its step to `path`, crash-safe (paddle.save's format; read
    back with load_ema_state, which runs no code from the file).

    Args:
        ema_model: the EMA model.
        path: the file to write.
        step: the step of the last update_ema_model call (the next one passes step + 1).
    """
    if not is_integer(step, 0):
        raise IncompatibleStateError(f"save_ema_state: step must be an integer >= 0, got {step!r}")
    atomic_save({"format": STATE_FORMAT, "step": int(step), "state": ema_model.state_dict(use_hook=False)}, path)


def load_ema_state(ema_model: nn.Layer, path: Union[str, os.PathLike]) -> int:
    """Load what save_ema_state wrote into the EMA model; every entry is checked before any is written.

    Args:
        ema_model: the EMA model (with the same entries as the one saved).
        path: the file save_ema_state wrote.

    Returns:
        The saved step: continue with update_ema_model(..., step=returned + 1).

    Raises:
        CheckpointError: the file is missing, unreadable or not what paddle.save writes.
        IncompatibleStateError: it is not a saved EMA state, or does not fit the EMA model.
    """
    saved = safe_load(path, "PaddleSeg EMA state")
    if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
        raise IncompatibleStateError(f"{path} is not a state written by save_ema_state (format {STATE_FORMAT!r})")
    step = saved.get("step")
    if not is_integer(step, 0):
        raise IncompatibleStateError(f"{path}: its step is {step!r}, not an integer >= 0")
    _load_state(ema_model, saved.get("state"), path)
    return int(step)


def _load_state(ema_model, state: Any, path) -> None:
    """Every entry of the EMA model from `state`: each present, a tensor of its shape and dtype,
    finite; one that is not raises IncompatibleStateError naming it, and nothing is written."""
    if not isinstance(state, dict):
        raise IncompatibleStateError(f"{path}: the EMA state is a {type(state).__name__}, not a state dict")
    live = ema_model.state_dict(use_hook=False)
    missing = [k for k in live if k not in state]
    if missing:
        raise IncompatibleStateError(f"{path} lacks {missing[:5]} of the EMA model")
    values: Dict[str, paddle.Tensor] = {}
    for k, tensor in live.items():
        value = state[k]
        problem = tensor_problem(value, tensor.shape, floating=paddle.is_floating_point(tensor))
        if problem:
            raise IncompatibleStateError(f"{path}: {k!r} {problem}")
        value = value if isinstance(value, paddle.Tensor) else paddle.to_tensor(value)
        if value.dtype != tensor.dtype:
            raise IncompatibleStateError(f"{path}: {k!r} is {str(value.dtype).replace('paddle.', '')}, "
                                         f"{str(tensor.dtype).replace('paddle.', '')} in the EMA model")
        values[k] = value
    bad = first_nonfinite_name(values)
    if bad is not None:
        raise IncompatibleStateError(f"{path}: {bad!r} holds NaN or Inf")
    ema_model.set_state_dict(values)
