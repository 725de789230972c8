"""`paddle.Model.fit` integration: an EMA kept by a callback, used for evaluation and saved."""

import os

import paddle

from .checkpoint import atomic_save
from .dygraph import ExponentialMovingAverage

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
            for resuming (`cb.ema.set_state_dict(paddle.load(...))`).
        save_freq: save every this many epochs.
    """

    def __init__(self, decay=0.9998, save_dir=None, save_freq=1, **options):
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

    def on_train_begin(self, logs=None):
        self._ensure_ema()

    def on_train_batch_end(self, step, logs=None):
        self.ema.update()

    def on_eval_begin(self, logs=None):
        self._ensure_ema()
        if not self.ema.is_applied:
            self.ema.apply()
            self._applied = True

    def on_eval_end(self, logs=None):
        if self._applied:
            self.ema.restore()
            self._applied = False

    def on_epoch_end(self, epoch, logs=None):
        if self.save_dir and (epoch + 1) % self.save_freq == 0:
            self.save(f"ema_{epoch}")

    def on_train_end(self, logs=None):
        if self.save_dir:
            self.save("ema_final")

    def save(self, name):
        """Save the EMA weights in `paddle.Model.save`'s files (<name>.pdparams, <name>.pdopt), and
        the EMA state beside them, each written crash-safe (paddle_ema.checkpoint.atomic_save).

        Every rank must call it (a sharded EMA gathers); rank 0 writes."""
        write = paddle.distributed.get_rank() == 0
        path = os.path.join(self.save_dir, name)
        with self.ema.apply():
            if write:
                atomic_save(self.model.network.state_dict(), path + ".pdparams")
                optimizer = getattr(self.model, "_optimizer", None)
                if optimizer is not None:
                    atomic_save(optimizer.state_dict(), path + ".pdopt")
        state = self.ema.state_dict()
        if write:
            atomic_save(state, path + ".pdema_state")
