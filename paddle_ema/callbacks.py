"""`paddle.Model.fit` integration: an EMA kept by a callback, used for evaluation and saved."""

import os
from typing import Any, Dict, Optional

import paddle

from . import _compat
from .dygraph import ExponentialMovingAverage
from .infra.checkpoint import atomic_save

__all__ = ["EMACallback"]


class EMACallback(paddle.callbacks.Callback):
    """Keeps an EMA of `paddle.Model`'s network: updated after every training batch, swapped in
    for every evaluation (inside `fit` and in `Model.evaluate(..., callbacks=[cb])`), and saved.

    Args:
        decay, **options: as for `paddle_ema.ExponentialMovingAverage` (thres_steps, schedule,
            bias_correction, update_every, exclude, ...).
        save_dir: where to save; None saves nothing. Following `paddle.Model.save`, each save
            writes `<save_dir>/ema_<epoch>.pdparams` (the EMA weights) and `.pdopt` (the optimizer),
            and `ema_final` at the end of training, plus `<name>.pdema_state`, the EMA's own state
            for resuming (`cb.ema.set_state_dict(paddle_ema.safe_load(...))`).
        save_freq: save every this many epochs.
    """

    def __init__(self, decay: float = 0.9998, save_dir: Optional[str] = None, save_freq: int = 1, **options: Any):
        super().__init__()
        self.decay = decay
        self.options = options
        self.save_dir = save_dir
        self.save_freq = save_freq
        self.ema = None
        self._applied = False

    def _ensure_ema(self):
        if self.ema is None:
            self.ema = ExponentialMovingAverage(self.model.network, self.decay, **self.options)

    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        """Create the EMA of the network (once).

        Args:
            logs: paddle.Model's logs, unused.
        """
        self._ensure_ema()

    def on_train_batch_end(self, step: int, logs: Optional[Dict[str, Any]] = None) -> None:
        """Fold the weights after this batch's optimizer step into the average.

        Args:
            step: the batch index, unused (the EMA counts its own updates).
            logs: paddle.Model's logs, unused.
        """
        self.ema.update()

    def on_eval_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        """Swap the EMA weights in for the evaluation, unless they are already applied.

        Args:
            logs: paddle.Model's logs, unused.
        """
        self._ensure_ema()
        if not self.ema.is_applied:
            self.ema.apply()
            self._applied = True

    def on_eval_end(self, logs: Optional[Dict[str, Any]] = None) -> None:
        """Restore the raw weights if `on_eval_begin` swapped them.

        Args:
            logs: paddle.Model's logs, unused.
        """
        if self._applied:
            self.ema.restore()
            self._applied = False

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        """Save `ema_<epoch>` every `save_freq` epochs when `save_dir` is set.

        Args:
            epoch: the epoch just finished, from 0.
            logs: paddle.Model's logs, unused.
        """
        if self.save_dir and (epoch + 1) % self.save_freq == 0:
            self.save(f"ema_{epoch}")

    def on_train_end(self, logs: Optional[Dict[str, Any]] = None) -> None:
        """Save `ema_final` when `save_dir` is set.

        Args:
            logs: paddle.Model's logs, unused.
        """
        if self.save_dir:
            self.save("ema_final")

    def save(self, name: str) -> None:
        """Save the EMA weights in `paddle.Model.save`'s files (<name>.pdparams, <name>.pdopt), and
        the EMA state beside them, each written crash-safe (paddle_ema.checkpoint.atomic_save).

        Every rank must call it (a sharded EMA gathers); rank 0 writes.

        Args:
            name: the files' name in `save_dir`, without suffix.
        """
        write = paddle.distributed.get_rank() == 0
        path = os.path.join(self.save_dir, name)
        with self.ema.apply():
            if write:
                atomic_save(self.model.network.state_dict(), path + ".pdparams")
                optimizer = _compat.model_optimizer(self.model)
                if optimizer is not None:
                    atomic_save(optimizer.state_dict(), path + ".pdopt")
        state = self.ema.state_dict()
        if write:
            atomic_save(state, path + ".pdema_state")
