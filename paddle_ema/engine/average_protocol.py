"""What the trainer averages, behind one protocol.

The trainer keeps up to three averages of the weights: the EMA (paddle_ema's, PaddleDetection's
ModelEMA, or the static EMA of `mode: static`), SWA, and the post-hoc EMA's snapshots. It treats
them alike through `TrainerAverage`; the ones it also evaluates and saves are `EvaluatedAverage`s.
Each adapter is a few lines over the library class (engine/ema_setup.py, engine/extra_averages.py,
engine/static_trainer.py) and never exposes it: the trainer reaches no further than this protocol.

`weights_loaded` is the one swap of a state dict into a model and back, for weights that are not
an average's own (recalibrated BatchNorm statistics, a checkpoint's). `check_finite` is the one
check every writer of averaged weights runs first: a file never receives NaN or Inf weights.
"""

import contextlib
from typing import ContextManager, Dict, Iterator, Optional, Protocol, runtime_checkable

import paddle

from ..errors import NonFiniteError
from ..kernels import first_nonfinite_name
from .checkpoint_files import copy_state

__all__ = ["TrainerAverage", "EvaluatedAverage", "weights_loaded", "check_finite"]


@runtime_checkable
class TrainerAverage(Protocol):
    """An average the trainer updates after every optimizer step and keeps in its checkpoints."""

    def update(self, step: Optional[int] = None) -> None:
        """Fold in the weights after optimizer step `step` (0-based, the trainer's count); the
        averages that count their own calls (restored on resume: the same count) may ignore it."""

    def state_dict(self) -> Dict:
        """Everything the average needs to continue bit for bit (saved in the .pdopt)."""

    def set_state_dict(self, state: Dict) -> None:
        """Continue from `state_dict()`'s output; a ConfigError or IncompatibleStateError when it
        was made with other settings or another implementation."""


@runtime_checkable
class EvaluatedAverage(TrainerAverage, Protocol):
    """An average whose weights the trainer evaluates and saves at snapshot epochs."""

    @property
    def last_decay(self) -> Optional[float]:
        """The decay of the last averaging update (None before the first, or without a decay)."""

    def snapshot(self) -> Dict[str, paddle.Tensor]:
        """The model's state dict with the averaged weights (copies). Counts one snapshot, after
        which an average with a restart policy (cycle_epoch) may restart. Collective when sharded."""

    def swapped(self) -> ContextManager[None]:
        """A context inside which the model holds the averaged weights; the raw ones after it."""


@contextlib.contextmanager
def weights_loaded(model: paddle.nn.Layer, weights: Dict[str, paddle.Tensor]) -> Iterator[None]:
    """`model` holds `weights` inside the block, and its own weights (bit-exact) and train/eval
    mode again after it.

    Args:
        model: the dygraph model.
        weights: a state dict for `model` (all or some of its keys).
    """
    raw, was_training = copy_state(model.state_dict()), model.training
    model.set_state_dict(weights)
    try:
        yield
    finally:
        model.set_state_dict(raw)
        if was_training:
            model.train()


def check_finite(weights: Dict[str, "paddle.Tensor"], what: str) -> None:
    """NonFiniteError naming the first entry of `weights` that holds NaN or Inf: raised before a
    file is written, so what is on disk stays as it was.

    Args:
        weights: a state dict (tensors or arrays) about to be written.
        what: what they are and when, e.g. 'the EMA weights at step 85 (epoch 1)'.
    """
    bad = first_nonfinite_name(weights)
    if bad is not None:
        raise NonFiniteError(f"{what}: {bad!r} holds NaN or Inf; nothing is written (the files already on disk are "
                             "kept)")
