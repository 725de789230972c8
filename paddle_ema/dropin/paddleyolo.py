"""PaddleYOLO's EMA classes (ppdet/optimizer/ema.py of PaddleYOLO), bit for bit: `ModelEMA`, `SimpleModelEMA`.

PaddleYOLO's ModelEMA is PaddleDetection's (`paddle_ema.ppdet.ModelEMA`: the same constructor,
schedules, black list, cycle_epoch and apply() bias correction) without the float32 master copy:

- each shadow starts as `zeros_like` of its entry, in the MODEL's dtype, and the update
  `decay * v + (1 - decay) * x` runs in that dtype, x not cast to float32 (float32 models: the
  same numbers as PaddleDetection's; float64 entries average in float64; float16/bfloat16 ones in
  half precision, whose add Paddle runs on GPUs only: there PaddleYOLO's own ops run, computed
  before any shadow changes, so on a CPU the update raises as PaddleYOLO's does and changes nothing);
- apply() divides by 1 - d_last**t in the shadow's dtype and does not cast back.

PaddleYOLO's quirks, kept:
- an integer entry has an integer zero shadow until the first update, which promotes it to
  float32 (`decay * v` casts an integer tensor to float32); apply() returns it as float32, and
  resume() into a fresh ModelEMA casts the given values to the integer dtype, as PaddleYOLO's does;
- the black list as in PaddleDetection (substring match on state-dict keys; with
  ema_filter_no_grad, stop_gradient parameters other than BatchNorm2D/SyncBatchNorm statistics),
  and apply() sets stop_gradient=True on the black-listed tensors it returns, freezing a trainable
  one (a bug: `freeze_black_list=False` turns it off);
- the trainer resumes the EMA from the bias-corrected weights of its `.pdparams` file, so the
  resumed average is corrected twice (a bug: `exact_resume(trainer, FLAGS.resume)`, one line in
  PaddleYOLO's tools/train.py, resumes exactly from `<checkpoint>.pdemastate` files).

Differences that change no number of a run that works there (paddle_ema.ppdet's): apply() after
resume(..., step > 0) without an update corrects with the decay of update step - 1 (PaddleYOLO
raises AttributeError there); apply() at t = 0 returns copies rather than the live dict;
ema_filter_no_grad works with a frozen non-BatchNorm weight (paddledet 2.6.0's raises
AttributeError there); `nonfinite='skip'|'raise'`; the fused update.

`SimpleModelEMA` is PaddleDetection's class: PaddleYOLO's is the same.
"""

import logging
import os
from typing import Any, Dict, Optional, Union

import paddle
from paddle import nn

from .ppdet import SimpleModelEMA, load_ema_state_file, resume_ema_exactly, save_ema_state_file
from .ppdet import ModelEMA as PPDetModelEMA

from .. import kernels
from ..errors import ConfigError

__all__ = ["ModelEMA", "SimpleModelEMA", "exact_resume", "save_ema_state_file", "load_ema_state_file"]

LOGGER = logging.getLogger(__name__)

_FUSED_DTYPES = (paddle.float32, paddle.float64)


def _fusable(shadow, value):
    """Whether kernels.scale_add_ gives PaddleYOLO's numbers for this pair: a float32/float64
    shadow with a value of its dtype, or an integer value (which `scale` casts to float32 first,
    as the kernel does)."""
    return shadow.dtype in _FUSED_DTYPES and (value.dtype == shadow.dtype or (
        shadow.dtype == paddle.float32 and not paddle.is_floating_point(value)))


class ModelEMA(PPDetModelEMA):
    """PaddleYOLO's ModelEMA: PaddleDetection's with shadows in the model's dtype (see the
    module docstring). Same arguments as `paddle_ema.ppdet.ModelEMA`.

    Args:
        model: the `paddle.nn.Layer` whose state dict is averaged.
        decay: the schedule's decay.
        ema_decay_type: 'threshold', 'exponential' (tau 2000) or 'normal' (constant).
        cycle_epoch: restart the average after every that many apply() calls; <= 0 never.
        ema_black_list: substrings of state-dict keys left live (not averaged).
        ema_filter_no_grad: also leave live the stop_gradient parameters other than
            BatchNorm2D/SyncBatchNorm statistics.
        freeze_black_list: (beyond PaddleYOLO's) False keeps black-listed tensors trainable.
        nonfinite: (beyond PaddleYOLO's) 'update' (default), 'skip' or 'raise'.
    """

    @staticmethod
    def _zeros(tensor):
        return paddle.zeros(tensor.shape, dtype=tensor.dtype)

    def update(self, model: Optional[nn.Layer] = None) -> None:
        """Fold the model's current state into the shadows (after optimizer.step()).

        Args:
            model: the model to read; None reads the one given to the constructor.
        """
        state = model.state_dict() if model is not None else self._live_state()
        values = [state[name] for name in self.averaged]
        bad = kernels.first_nonfinite(values) if self.nonfinite_policy.checks else None
        if bad is not None:
            self._skip_nonfinite(bad)
            return
        decay = self.rule.schedule(self.policy.action(self.step)[1])
        # PaddleYOLO's `decay * v` makes an integer shadow float32, which is where it is kept from now on.
        shadows = [s if paddle.is_floating_point(s) else s.astype("float32")
                   for s in (self.state_dict[name] for name in self.averaged)]
        # PaddleYOLO's own ops for the pairs the kernel does not take, all computed before anything
        # is written (where Paddle has no kernel, float16 add on a CPU, this raises as PaddleYOLO's does).
        with paddle.no_grad():
            other = {i: decay * s + (1 - decay) * v for i, (s, v) in enumerate(zip(shadows, values))
                     if not _fusable(s, v)}
        for name, shadow in zip(self.averaged, shadows):
            self.state_dict[name] = shadow
        fused = [i for i in range(len(shadows)) if i not in other]
        kernels.scale_add_([shadows[i] for i in fused], [values[i] for i in fused], decay, 1 - decay)
        for i, new in other.items():
            new.stop_gradient = True
            self.state_dict[self.averaged[i]] = new
        self._decay = decay
        self.step += 1

    @paddle.no_grad()
    def averaged_state(self) -> Dict[str, paddle.Tensor]:
        """apply()'s state dict without counting an epoch: shadow / (1 - d_last**t) in the
        shadow's dtype (no cast back to the model's).

        Returns:
            {name: tensor}, the same values apply() returns.
        """
        result = super().averaged_state()
        if self.step > 0 and self.ema_decay_type != "exponential":
            for name in self.averaged:
                shadow = self.state_dict[name]
                if result[name].dtype != shadow.dtype:  # PaddleDetection's cast back, which PaddleYOLO lacks
                    result[name] = shadow / (1 - self._decay**self.step)
                    result[name].stop_gradient = True
        return result

    def load_ema_state(self, state: Dict[str, Any]) -> None:
        """Resume exactly from ema_state() (see paddle_ema.ppdet.ModelEMA.load_ema_state); an
        integer entry's shadow takes the saved float32 one, as the promoted shadow of the run
        that saved it.

        Args:
            state: an ema_state() of a ModelEMA with the same settings.
        """
        shadows = state.get("shadow") if isinstance(state, dict) else None
        integer = [name for name in self.averaged if not paddle.is_floating_point(self.state_dict[name])]
        kept = {name: self.state_dict[name] for name in integer}
        if isinstance(shadows, dict):
            for name in integer:
                self.state_dict[name] = paddle.zeros(self.state_dict[name].shape, "float32")
        try:
            super().load_ema_state(state)
        except Exception:
            self.state_dict.update(kept)  # nothing changes when the state is refused
            raise


def exact_resume(trainer: Any, resume: Optional[Union[str, os.PathLike]] = None) -> None:
    """Make a PaddleYOLO Trainer's EMA resume exactly (its own resume corrects twice).

    Call it in PaddleYOLO's tools/train.py after `trainer.resume_weights(FLAGS.resume)`:
    `exact_resume(trainer, FLAGS.resume)`. With `resume` given, the EMA state saved beside that
    checkpoint replaces what the trainer's resume made of the bias-corrected weights (a checkpoint
    without one keeps PaddleYOLO's resume, with a logged warning). From then on, a callback writes
    `<checkpoint>.pdemastate` beside every checkpoint PaddleYOLO's Checkpointer saves while
    training (`<save_dir>/<config name>/<epoch or model_final>`).

    Args:
        trainer: a `ppdet.engine.Trainer` of PaddleYOLO built with `use_ema` and this ModelEMA.
        resume: the checkpoint passed to `trainer.resume_weights`, or None for a fresh run.

    Raises:
        ConfigError: the trainer has no paddle_ema ModelEMA.
        CheckpointError: the EMA state beside `resume` is unreadable.
        IncompatibleStateError: it does not fit the trainer's EMA.
    """
    resume_ema_exactly(trainer, resume, PPDetModelEMA, "PaddleYOLO", "paddle_ema.dropin.paddleyolo",
                       lambda cfg, name: os.path.join(cfg.save_dir, cfg.filename, name), LOGGER)
