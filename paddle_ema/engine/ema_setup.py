"""The EMA a config asks for, behind one small interface the trainer uses.

`ema_impl: paddle_ema` (default): paddle_ema.ExponentialMovingAverage, initialised from the
weights, with the config's schedule and options. PaddleDetection's keys keep their meaning:
- ema_decay_type: threshold | exponential (tau = ema_tau, PaddleDetection's 2000) | normal
  (constant) | power (ema_inv_gamma, ema_power, ema_min_decay);
- ema_black_list: substrings of names left out; ema_filter_no_grad: also leave out frozen
  parameters other than BatchNorm statistics;
- BatchNorm statistics are averaged like PaddleDetection does (ema_include_stop_gradient: true);
- cycle_epoch: after that many snapshots the average restarts from the current weights; when
  those hold NaN or Inf, `ema_nonfinite` decides: skip keeps the average (with a warning), raise
  stops, update restarts anyway (PaddleDetection's behaviour).
- ema_shard: under paddle.distributed.launch each of the N processes keeps the average of about
  1/N of the weights; snapshot() and state_dict() gather them, so every process must call them.
`ema_impl: ppdet`: paddle_ema.ppdet.ModelEMA, PaddleDetection's exact numbers (zero init,
1 - d_last**t correction); of the ema_* extensions only `ema_nonfinite` applies (ModelEMA's
`nonfinite` guard).
Both resume exactly from their full state in .pdopt.
"""

import math

import paddle

from .. import kernels
from ..core.averaging import EMARule
from ..core.schedules import schedule_for_decay_type
from ..core.step_policy import StepPolicy
from ..dropin.ppdet import ModelEMA, bn_running_state_names
from ..dygraph import ExponentialMovingAverage
from ..errors import ConfigError
from ..infra.saved_state import SavedState
from .average_protocol import weights_loaded
from .checkpoint_files import copy_state

__all__ = ["build_ema", "check_averaging_steps", "ema_settings", "relative_distance", "restart_allowed"]


def restart_allowed(policy, arrays_or_tensors, where):
    """Whether a cycle_epoch restart may copy the current weights into the average.

    `policy`: the average's NonfinitePolicy; `arrays_or_tensors`: (name, value) pairs of the
    floating-point weights. Non-finite weights are copied only under 'update'; 'raise' raises
    NonFiniteError; 'skip' warns and keeps the average."""
    if not policy.checks:
        return True
    bad = kernels.first_nonfinite_name(dict(arrays_or_tensors))
    if bad is None:
        return True
    return policy.allow_copy(
        f"{where}: the cycle_epoch restart would copy parameter {bad!r}, which holds NaN or Inf, into the average",
        skip_note="; the restart is skipped and the average kept (ema_nonfinite: skip)")


def ema_settings(cfg, model):
    """The keyword arguments of paddle_ema.ExponentialMovingAverage that cfg's EMA keys ask for:
    the update rule and the step policy as objects (with cycle_epoch's restarts after snapshots;
    -1, never, is 0), the parameter choice, the device and the non-finite policy.

    `exclude` holds patterns on `model`'s structured parameter names; the static trainer maps the
    same settings onto paddle_ema.static's EMA.
    """
    exclude = list(cfg["ema_black_list"] or [])
    # Frozen parameters are only candidates when stop_gradient ones are averaged at all.
    if cfg["ema_filter_no_grad"] and cfg["ema_include_stop_gradient"]:
        running = bn_running_state_names(model)
        exclude += [f"re:^{name}$" for name, p in model.named_parameters()
                    if p.stop_gradient and name not in running]
    schedule = schedule_for_decay_type(cfg["ema_decay_type"], cfg["ema_decay"], tau=cfg["ema_tau"],
                                       inv_gamma=cfg["ema_inv_gamma"], power=cfg["ema_power"],
                                       min_decay=cfg["ema_min_decay"])
    return dict(rule=EMARule(schedule, cfg["ema_bias_correction"]),
                policy=StepPolicy(start_step=cfg["ema_start_step"], update_every=cfg["ema_update_every"],
                                  restart_every=max(cfg["cycle_epoch"], 0)),
                include_stop_gradient=cfg["ema_include_stop_gradient"], exclude=exclude or None,
                device=cfg["ema_device"], nonfinite=cfg["ema_nonfinite"])


def check_averaging_steps(cfg, total_steps):
    """ConfigError when ema_start_step leaves the EMA no averaging update in the run's optimizer
    steps: every weight it saved would be a copy of the raw weights, not an average."""
    if cfg["ema_impl"] == "ppdet":  # ModelEMA averages from the first step on
        return
    policy = StepPolicy(start_step=cfg["ema_start_step"], update_every=cfg["ema_update_every"])
    if policy.num_updates(total_steps) == 0:
        raise ConfigError(f"ema_start_step {cfg['ema_start_step']} leaves the EMA no averaging update in this run's "
                          f"{total_steps} optimizer steps: its weights would be copies of the raw weights; use an "
                          f"ema_start_step below {total_steps}")


class _PaddleEMA:
    """paddle_ema.ExponentialMovingAverage as the trainer's EvaluatedAverage (engine/averages.py)."""

    def __init__(self, cfg, model):
        self.ema = ExponentialMovingAverage(model, **ema_settings(cfg, model), shard=cfg["ema_shard"])
        self.model = model
        self.policy = self.ema.policy  # restarts after cycle_epoch snapshots (ema_settings)
        self.snapshots = 0

    def update(self, step=None):
        # The EMA counts its own calls (restored on resume), which are the trainer's steps.
        self.ema.update()

    def swapped(self):
        return self.ema.apply()

    @property
    def last_decay(self):
        return self.ema.last_decay

    @property
    def names(self):
        return self.ema.names

    @property
    def owned_names(self):
        return self.ema.owned_names

    @paddle.no_grad()
    def snapshot(self):
        """The model's state dict with EMA weights (copies); counts a snapshot for cycle_epoch."""
        with self.swapped():
            weights = copy_state(self.model.state_dict())
        self.snapshots += 1
        if self.policy.restarts_after(self.snapshots):
            live = [(k, v) for k, v in self.model.state_dict().items() if paddle.is_floating_point(v)]
            if restart_allowed(self.ema.nonfinite_policy, live, f"snapshot {self.snapshots}"):
                skipped = self.ema.num_nonfinite_skipped  # a restart starts a new average, not a new run
                self.ema.register()
                self.ema.num_nonfinite_skipped = skipped
        return weights

    def state_dict(self):
        return {"impl": "paddle_ema", "ema": self.ema.state_dict(), "snapshots": self.snapshots}

    def set_state_dict(self, state):
        saved = SavedState(state, "the checkpoint's EMA state")
        if state.get("impl") != "paddle_ema":
            raise ConfigError(f"the checkpoint's EMA was made by ema_impl {state.get('impl')!r}, this config uses "
                              "'paddle_ema'")
        snapshots = saved.count("snapshots")  # checked before the EMA changes
        self.ema.set_state_dict(saved.mapping("ema"))
        self.snapshots = snapshots


class _PPDetEMA:
    """paddle_ema.ppdet.ModelEMA as the trainer's EvaluatedAverage (engine/averages.py)."""

    def __init__(self, cfg, model):
        # `nonfinite` is ModelEMA's guard (its default 'update' is PaddleDetection's behaviour).
        self.ema = ModelEMA(model, cfg["ema_decay"], cfg["ema_decay_type"], cfg["cycle_epoch"],
                            cfg["ema_black_list"], cfg["ema_filter_no_grad"], nonfinite=cfg["ema_nonfinite"])
        self.model = model

    def update(self, step=None):
        self.ema.update()  # ModelEMA counts its own steps, as in PaddleDetection

    @property
    def last_decay(self):
        return self.ema.last_decay

    def snapshot(self):
        # ModelEMA.apply() returns the averaged state dict (and, PaddleDetection's way, counts an
        # epoch for cycle_epoch); it does not touch the model.
        return copy_state(self.ema.apply())

    def swapped(self):
        # The averaged weights without apply()'s epoch count: evaluating is not a snapshot.
        return weights_loaded(self.model, self.ema.averaged_state())

    def state_dict(self):
        return {"impl": "ppdet", "ema": self.ema.ema_state()}

    def set_state_dict(self, state):
        SavedState(state, "the checkpoint's EMA state")
        if state.get("impl") != "ppdet":
            raise ConfigError(f"the checkpoint's EMA was made by ema_impl {state.get('impl')!r}, this config uses "
                              "'ppdet'")
        self.ema.load_ema_state(state["ema"])


def build_ema(cfg, model):
    """None when use_ema is off; else the config's EMA as an EvaluatedAverage (engine/averages.py)."""
    if not cfg["use_ema"]:
        return None
    if cfg["ema_impl"] == "ppdet":
        if cfg["ema_shard"]:
            raise ConfigError("ema_shard: true needs ema_impl: paddle_ema (ema_impl: ppdet keeps PaddleDetection's "
                              "unsharded ModelEMA)")
        return _PPDetEMA(cfg, model)
    return _PaddleEMA(cfg, model)


@paddle.no_grad()
def relative_distance(ema_weights, raw_weights):
    """||ema - raw|| / ||raw|| over the floating-point entries both hold."""
    num = den = 0.0
    for name, raw in raw_weights.items():
        if name in ema_weights and paddle.is_floating_point(raw):
            raw64 = raw.astype("float64")
            num += float(((ema_weights[name].astype("float64") - raw64) ** 2).sum())
            den += float((raw64**2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0
