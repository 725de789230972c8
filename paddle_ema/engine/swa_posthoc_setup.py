"""What the trainer keeps beside the EMA, from the config:

- `use_swa`: stochastic weight averaging of the weights at the end of every `swa_every_epochs`
  epochs from `swa_start_epoch` (default: three quarters into the run), saved as
  `<stem>_swa.pdparams` and evaluated beside the raw and EMA weights; with `swa_update_bn`
  (default) its BatchNorm statistics are recomputed for the averaged weights.
- `ema_update_bn`: the same recalibration for the EMA weights before they are evaluated and saved.
- `ema_posthoc`: power-function EMA snapshots (Karras et al. 2023) every `ema_posthoc_every`
  updates in `<output>/posthoc/`, from which tools/posthoc_ema.py synthesises any EMA length.
"""

import os

import paddle

from ..dygraph import StochasticWeightAveraging
from ..posthoc import PostHocEMA
from .average_protocol import weights_loaded
from .checkpoint_averaging import recompute_bn_statistics
from .checkpoint_files import copy_state

__all__ = ["SWA_SUFFIX", "TrainerPostHoc", "TrainerSWA", "build_swa", "build_posthoc", "with_recalibrated_bn"]

SWA_SUFFIX = "_swa.pdparams"


class TrainerSWA:
    """SWA over the optimizer steps that end an averaged epoch, as the trainer's EvaluatedAverage
    (engine/averages.py); updated only from its start on."""

    last_decay = None  # SWA weighs every averaged step equally: it has no decay

    def __init__(self, cfg, model, steps_per_epoch):
        start_epoch = cfg["swa_start_epoch"]
        if start_epoch is None:
            start_epoch = (3 * cfg["epoch"]) // 4
        every = cfg["swa_every_epochs"] * steps_per_epoch
        # Call c (0-based optimizer step) averages when c = start + k * every: the last step of an epoch.
        self.start_step = start_epoch * steps_per_epoch + steps_per_epoch - 1
        self.model = model
        self.swa = StochasticWeightAveraging(model, start_step=self.start_step, update_every=every)

    def update(self, step):
        # Before its start SWA would copy the weights on every call: skip those calls instead.
        if step >= self.start_step:
            self.swa.update(step=step)

    @property
    def started(self):
        return self.swa.num_updates > 0

    def swapped(self):
        return self.swa.apply()

    @paddle.no_grad()
    def snapshot(self):
        with self.swapped():
            return copy_state(self.model.state_dict())

    def state_dict(self):
        return self.swa.state_dict()

    def set_state_dict(self, state):
        self.swa.set_state_dict(state)


class TrainerPostHoc:
    """The post-hoc EMA's snapshots (paddle_ema.posthoc.PostHocEMA) as a TrainerAverage: updated
    every step, synthesised later by tools/posthoc_ema.py, never evaluated by the trainer."""

    def __init__(self, posthoc):
        self.posthoc = posthoc

    def update(self, step=None):
        self.posthoc.update()  # it counts its own updates (restored on resume): the trainer's steps

    def state_dict(self):
        return self.posthoc.state_dict()

    def set_state_dict(self, state):
        self.posthoc.set_state_dict(state)


def build_swa(cfg, model, steps_per_epoch):
    return TrainerSWA(cfg, model, steps_per_epoch) if cfg["use_swa"] else None


def build_posthoc(cfg, model, output_dir, write):
    if not cfg["ema_posthoc"]:
        return None
    return TrainerPostHoc(PostHocEMA(model, os.path.join(output_dir, "posthoc"),
                                     sigma_rels=cfg["ema_posthoc_sigma_rels"], snapshot_every=cfg["ema_posthoc_every"],
                                     snapshot_dtype=cfg["ema_posthoc_dtype"], write=write,
                                     include_stop_gradient=cfg["ema_include_stop_gradient"]))


@paddle.no_grad()
def with_recalibrated_bn(model, weights, dataset, batch_size, num_batches=None):
    """`weights` with BatchNorm statistics recomputed over `dataset` for those weights; the model is left as it was."""
    with weights_loaded(model, weights):
        recompute_bn_statistics(model, dataset, batch_size, num_batches)
        return copy_state(model.state_dict())
