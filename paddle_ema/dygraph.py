"""The dygraph EMA: `paddle_ema.ExponentialMovingAverage`."""

import difflib
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Union

import numpy as np
import paddle

from . import _compat, kernels
from .core.averaging import EMARule, rule_from_options, settings_differences, shadow_dtype
from .core.nonfinite import NonfinitePolicy
from .core.schedules import PowerFunction, Schedule
from .core.selection import select_parameters
from .core.step_policy import AVERAGE, COPY, SKIP, StepPolicy
from .core.validation import check_int, check_object_or_keywords
from .errors import ConfigError, EMAStateError, IncompatibleStateError
from .infra.saved_state import SavedState
from .infra.sharding import Sharding
from .kernels import Kernel

__all__ = ["ExponentialMovingAverage", "StochasticWeightAveraging"]

STATE_VERSION = 1
DEFAULT_DECAY = 0.9998


class _Applied:
    """What `apply()` returns: the swap has already happened; as a context manager it restores on exit."""

    def __init__(self, ema, token):
        self._ema = ema
        self._token = token

    def __enter__(self):
        return self._ema

    def __exit__(self, *exc_info):
        # Only the apply() that saved the raw weights restores them, so nested applies and an
        # explicit restore() inside the block do not restore twice.
        if self._token is not None and self._ema._backup_token is self._token:
            self._ema.restore()
        return False


def _rule_and_policy(rule, policy, decay, thres_steps, schedule, schedule_options, bias_correction, update_every,
                     start_step):
    """(EMARule, StepPolicy) from the objects or from the keywords they replace (not both)."""
    # thres_steps=True is the default: only False counts as given beside rule=.
    check_object_or_keywords("rule", rule, EMARule, {
        "decay": decay, "thres_steps": None if thres_steps is True else thres_steps, "schedule": schedule,
        "schedule_options": schedule_options, "bias_correction": bias_correction})
    check_object_or_keywords("policy", policy, StepPolicy, {"update_every": update_every, "start_step": start_step})
    if rule is None:
        if not isinstance(thres_steps, (bool, np.bool_)):
            raise ConfigError(f"thres_steps must be True (the threshold warm-up) or False (a constant decay), got "
                              f"{thres_steps!r}")
        if schedule is None:
            schedule = "threshold" if thres_steps else "constant"
        if isinstance(schedule, str) and decay is None:
            decay = DEFAULT_DECAY
        rule = rule_from_options(schedule, decay, schedule_options, bool(bias_correction))
    if policy is None:
        policy = StepPolicy(start_step=0 if start_step is None else start_step,
                            update_every=1 if update_every is None else update_every)
    return rule, policy


class ExponentialMovingAverage:
    """Exponential moving average of a dygraph model's weights.

    Args:
        model: a `paddle.nn.Layer`, bare or wrapped in `paddle.DataParallel`.
        decay: the schedule's decay (upper bound), default 0.9998. Leave unset when `schedule` is
            a Schedule instance, which carries its own.
        thres_steps: the seeds' switch: True (default) uses d = min(decay, (1+t)/(10+t))
            ('threshold'), False a constant decay. Used only when `schedule` is not given.
        schedule: a registered schedule name ('constant', 'threshold', 'exponential', 'power') or
            a `paddle_ema.schedules.Schedule` instance.
        schedule_options: the named schedule's own options, e.g. {'tau': 2000} for 'exponential',
            {'inv_gamma': 1, 'power': 2/3, 'min_decay': 0} for 'power'.
        bias_correction: start the average from zero and correct its bias by 1 - prod(d_i) (the
            product of the decays actually applied). Default False: start from the weights.
        update_every: average every k-th call of update(). Default 1.
        start_step: before this call index the shadow copies the weights. Default 0.
        include_stop_gradient: also average parameters with stop_gradient=True (BatchNorm's
            running statistics, frozen layers). Default False.
        exclude: names to leave out: substrings, 're:<regex>' strings or re.Pattern objects.
        device: where the shadow lives, e.g. 'cpu' to save accelerator memory. Default: beside
            each weight.
        shard: under data parallelism, keep on each of the N ranks the shadow of about 1/N of the
            weights (a balanced partition by size). Updates need no communication; apply() and
            state_dict() broadcast from the owners, so every rank must call them. Default False.
        group: the process group to shard over (default: the global group).
        nonfinite: what update() does when a weight holds NaN or Inf (a diverged step): 'skip'
            (default) leaves the average as it is, counts the skip in `num_nonfinite_skipped` and
            warns naming the first offending parameter; 'raise' raises NonFiniteError; 'update'
            averages without checking. On the CPU the guarded update writes the new averages
            into apply()'s spare buffers (or its own, for half-precision or sharded weights) and
            swaps them in only when every weight was finite: the check then costs no extra pass
            over the weights. Elsewhere the weights are read twice, once for the check.

        rule: the update rule as one object (`paddle_ema.EMARule(schedule, bias_correction)`),
            instead of decay, thres_steps, schedule, schedule_options and bias_correction.
        policy: the step policy as one object (`paddle_ema.step_policy.StepPolicy(start_step,
            update_every)`), instead of update_every and start_step.

    The step t of the schedule counts averaging updates from 0. `update(step=n)` takes the call
    index from an external counter instead (TensorFlow's num_updates); t is then
    (n - start_step) // update_every, so the decay follows the external counter. Which call
    copies, skips or averages is `self.policy`'s answer (`paddle_ema.step_policy.StepPolicy`).
    """

    def __init__(
        self,
        model: paddle.nn.Layer,
        decay: Optional[float] = None,
        thres_steps: bool = True,
        *,
        schedule: Any = None,
        schedule_options: Optional[Dict[str, Any]] = None,
        bias_correction: Optional[bool] = None,
        update_every: Optional[int] = None,
        start_step: Optional[int] = None,
        include_stop_gradient: bool = False,
        exclude: Any = None,
        device: Any = None,
        shard: bool = False,
        group: Any = None,
        nonfinite: Union[str, NonfinitePolicy] = "skip",
        rule: Optional[EMARule] = None,
        policy: Optional[StepPolicy] = None,
    ):
        self.rule, self.policy = _rule_and_policy(rule, policy, decay, thres_steps, schedule, schedule_options,
                                                  bias_correction, update_every, start_step)
        # A policy object is used as given (its count goes on); a mode name makes a new one.
        self.nonfinite_policy = nonfinite if isinstance(nonfinite, NonfinitePolicy) else NonfinitePolicy(nonfinite)
        self.include_stop_gradient = bool(include_stop_gradient)
        self.exclude = exclude
        self.device = self._place(device)
        self._model = model
        named = select_parameters(model, self.include_stop_gradient, exclude)
        if not named:
            raise ConfigError("the model has no parameters to average (none is trainable, or all are excluded)")
        self.names = [name for name, _ in named]
        self._params = [param for _, param in named]
        self._index = {name: i for i, name in enumerate(self.names)}
        self._sharding = Sharding([int(p.numel()) for p in self._params], group) if shard else None
        self._owned = self._sharding.owned if shard else list(range(len(self._params)))
        self._backup = None
        self._backup_token = None
        self._holders = None  # the tensors that hold the raw weights' buffers while applied
        self._kernel = Kernel([])  # the update of the averages this process keeps (register())
        self.register()
        # Build (or load) the fused kernel now, with one line when it compiles, not inside the first update.
        kernels.prepare()

    @staticmethod
    def _place(device):
        if device is None:
            return None
        try:
            return _compat.to_place(device) if isinstance(device, str) else device
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"device must be None, 'cpu', 'gpu' or 'gpu:N', got {device!r} ({exc})") from None

    @property
    def schedule(self) -> Schedule:
        """The decay schedule."""
        return self.rule.schedule

    @property
    def update_every(self) -> int:
        """Average on every k-th call (the step policy's)."""
        return self.policy.update_every

    @property
    def start_step(self) -> int:
        """Calls before this index copy the weights (the step policy's)."""
        return self.policy.start_step

    @paddle.no_grad()
    def _new_shadow(self, param):
        shadow = param.detach().clone().astype(shadow_dtype(param.dtype))
        if self.device is not None:
            shadow = _compat.copy_to_place(shadow, self.device)
        shadow.stop_gradient = True
        return shadow

    def register(self) -> None:
        """(Re)snapshot the shadow from the current weights and reset the counters."""
        if self._backup is not None:
            raise EMAStateError("register() while EMA weights are applied would average them; call restore() first")
        owned = set(self._owned)
        self._shadows = [self._new_shadow(p) if i in owned else None for i, p in enumerate(self._params)]
        self._owned_shadows = [self._shadows[i] for i in self._owned]
        self._owned_params = [self._params[i] for i in self._owned]
        self._kernel.rebind(self._owned_shadows)
        self.num_calls = 0
        self.nonfinite_policy.reset()
        self.num_updates = 0
        self.decay_product = 1.0
        self.last_decay = None

    def update(self, step: Optional[int] = None) -> Optional[float]:
        """Fold the current weights into the average. Call it after `optimizer.step()`.

        Args:
            step: an external call counter (0-based); None counts the calls of update().

        Returns:
            The decay used, or None when the call copied the weights, was skipped by
            update_every, or skipped for non-finite weights.
        """
        if self._backup is not None:
            raise EMAStateError(
                "update() while EMA weights are applied would average the average; call restore() first"
            )
        call = self.num_calls if step is None else check_int("step", step, 0)
        kind, t = self.policy.action(call)
        if kind == SKIP:
            self.num_calls = call + 1
            return None
        calls = self.num_calls
        try:
            return self._update(call, kind, t)
        except ValueError:  # the kernels refuse a pair of unequal shapes before writing anything
            self.num_calls = calls
            self._check_shapes("update()")
            raise

    def _update(self, call, kind, t):
        self.num_calls = call + 1
        # Every rank checks every weight (not only the ones it averages), so that sharded ranks,
        # which hold the same weights, take the same decision without communicating.
        scan = self._params if self.nonfinite_policy.checks else None
        if kind == COPY:
            bad = self._kernel.copy_from(self._owned_params, scan=scan)
        else:
            assert kind == AVERAGE
            decay, weight, product = self.rule.step(t, self.decay_product)
            bad = self._kernel.lerp_(self._owned_params, weight, scan=scan)
        if bad is not None:
            self._nonfinite(call, bad)
            return None
        if kind == COPY:
            self.num_updates, self.decay_product, self.last_decay = 0, 1.0, None
            return None
        self.num_updates += 1
        self.decay_product = product
        self.last_decay = decay
        return decay

    def _check_shapes(self, where):
        """EMAStateError naming the first parameter whose shape is no longer its average's."""
        for index in self._owned:
            param, shadow = self._params[index], self._shadows[index]
            if param.shape != shadow.shape:
                raise EMAStateError(
                    f"{where}: parameter {self.names[index]!r} has shape {list(param.shape)}, its average "
                    f"{list(shadow.shape)}: it was reshaped after register(); nothing was changed. Call register() "
                    "to average it from its new shape on"
                )

    def _nonfinite(self, call, bad):
        """The guard's answer to the weight `bad` holding NaN or Inf: raise, or count and warn."""
        name = self.names[bad]
        self.nonfinite_policy.skip(f"update() at call {call}: parameter {name!r} holds NaN or Inf",
                                   f"EMA update at call {call} skipped: parameter {name!r} holds NaN or Inf")

    @property
    def nonfinite(self) -> str:
        """The non-finite policy's mode: 'skip', 'raise' or 'update'."""
        return self.nonfinite_policy.mode

    @property
    def num_nonfinite_skipped(self) -> int:
        """Updates skipped for NaN or Inf weights since register()."""
        return self.nonfinite_policy.skipped

    @num_nonfinite_skipped.setter
    def num_nonfinite_skipped(self, count: int) -> None:
        self.nonfinite_policy.skipped = int(count)

    @property
    def is_applied(self) -> bool:
        """True while the model holds EMA weights that restore() can swap back."""
        return self._backup is not None

    @paddle.no_grad()
    def apply(self, need_restore: bool = True) -> "_Applied":
        """Swap the EMA weights into the model.

        `ema.apply(); ...; ema.restore()` and `with ema.apply(): ...` both work. A second apply()
        before restore() keeps the raw weights saved by the first.

        Args:
            need_restore: False keeps the EMA weights in the model and drops the raw ones (for export).

        Returns:
            A context manager that restores the raw weights on exit (the swap has already happened).
        """
        self._check_shapes("apply()")
        token = None
        if self._backup is None and need_restore:
            self._backup = self._swap_out()
            self._backup_token = token = object()
        self._averages_into(self._params)
        if not need_restore:
            if self._backup is not None and self._backup is self._holders:
                # The weights stay on the spare buffers for good, and the raw ones are dropped.
                self._kernel.forget_scratch()
                self._holders = None
            self._backup = self._backup_token = None
        return _Applied(self, token)

    def _swap_out(self):
        """Set the raw weights aside for restore() without copying them: each parameter's buffer
        goes to a holder and the parameter is pointed at a spare buffer of its size, which the
        averages are then copied into. The parameter objects stay the same, so the optimizer,
        hooks, state_dict() and export see the averages; restore() points them back.

        The spares are the kernel's, kept from one apply() to the next (no allocation, no page
        faults). Without buffer sharing (_compat.share_buffer; not in this Paddle), the raw weights
        are copied instead."""
        if not _compat.can_share_buffers(self._params[0]):
            return [p.detach().clone() for p in self._params]
        spares = self._kernel.scratch_like(self._params)
        if self._holders is None:
            self._holders = [paddle.Tensor() for _ in self._params]  # slow to make: made once
        for param, spare, holder in zip(self._params, spares, self._holders):
            _compat.share_buffer(param, holder)
            _compat.share_buffer(spare, param)
        return self._holders

    def _averages_into(self, targets):
        """targets[i] <- average i for every averaged parameter; collective when sharded."""
        if self._sharding is None:
            self._kernel.copy_(targets, self._shadows)
        else:
            dtypes = [shadow_dtype(p.dtype) for p in self._params]
            self._sharding.broadcast_into(targets, self._shadows, dtypes, self._params[0].place)

    @property
    def is_sharded(self) -> bool:
        """True when each rank keeps only its shard of the averages (shard=True)."""
        return self._sharding is not None

    @property
    def owned_names(self) -> List[str]:
        """Names of the averages this process keeps: all of them, or this rank's shard when sharded."""
        return [self.names[i] for i in self._owned]

    @paddle.no_grad()
    def restore(self) -> None:
        """Swap the raw weights saved by apply() back into the model."""
        if self._backup is None:
            raise EMAStateError(
                "restore() without a matching apply(): the model holds its raw weights "
                "(or apply(need_restore=False) dropped them)"
            )
        if self._backup is self._holders:  # the parameters point at spare buffers
            for param, holder in zip(self._params, self._backup):
                _compat.share_buffer(holder, param)
        else:
            self._kernel.copy_(self._params, self._backup)
        self._backup = self._backup_token = None

    def average(self, name: str) -> paddle.Tensor:
        """The average of one parameter.

        Args:
            name: the parameter's name (as in `names`).

        Returns:
            Its shadow, by reference (float32 for half-precision weights). The Tensor object
            follows every update; a tensor that shares its memory (`detach()`) may not, since a
            guarded update on the CPU gives the shadow a new buffer (docs/dygraph.md, "Calls and
            attributes").
        """
        if name not in self._index:
            close = difflib.get_close_matches(name, self.names, n=3)
            hint = f"; did you mean {close}?" if close else f"; averaged names: {self.names[:6]}..."
            raise KeyError(f"{name!r} is not averaged by this EMA{hint}")
        shadow = self._shadows[self._index[name]]
        if shadow is None:
            owner = self._sharding.owners[self._index[name]]
            raise EMAStateError(
                f"the average of {name!r} is kept on rank {owner} of this sharded EMA; "
                "state_dict() gathers all averages on every rank"
            )
        return shadow

    def settings(self) -> Dict[str, Any]:
        """The settings that change the numbers: a resumed EMA must have the same.

        Returns:
            {'schedule': ..., 'bias_correction': ..., 'update_every': ..., 'start_step': ...}.
        """
        return {
            **self.rule.options(),
            "update_every": self.update_every,
            "start_step": self.start_step,
        }

    @paddle.no_grad()
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume exactly.

        A sharded EMA gathers every average on every rank (a collective call) into new tensors,
        so its state is the same as an unsharded one's and loads with any number of ranks.

        Returns:
            The state: shadows (by reference, like Layer.state_dict()), counters, decay product,
            last decay and settings.
        """
        shadows = self._shadows
        if self._sharding is not None:
            shadows = [paddle.empty(p.shape, dtype=shadow_dtype(p.dtype)) for p in self._params]
            self._averages_into(shadows)
        return {
            "format": f"paddle_ema.{type(self).__name__}",
            "version": STATE_VERSION,
            "shadow": OrderedDict(zip(self.names, shadows)),
            "num_calls": self.num_calls,
            "num_updates": self.num_updates,
            "decay_product": float(self.decay_product),
            "last_decay": self.last_decay,
            "num_nonfinite_skipped": self.num_nonfinite_skipped,
            "settings": self.settings(),
        }

    def set_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state from state_dict(). The whole state is checked first (names, shapes,
        floating dtypes and finiteness of the averages, counters, settings): one that does not fit
        raises IncompatibleStateError naming what differs, and changes nothing.

        Args:
            state_dict: a state_dict() of an EMA with the same parameters and settings.
        """
        self._load_checked(*self._checked_state(state_dict))

    def _load_checked(self, shadows, counters):
        """Load what _checked_state returned (nothing there can fail any more)."""
        sources = []
        for index in self._owned:
            value = shadows[self.names[index]]
            sources.append(value if isinstance(value, paddle.Tensor) else paddle.to_tensor(value))
        self._kernel.copy_from(sources)
        for key, value in counters.items():
            setattr(self, key, value)

    def _checked_state(self, state):
        """(the saved averages by name, the counters to set), every entry checked."""
        required = ("shadow", "num_calls", "num_updates", "decay_product", "last_decay", "settings")
        if not isinstance(state, dict) or any(key not in state for key in required):
            have = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise IncompatibleStateError(
                f"not a state dict of {type(self).__name__}: it needs the keys {list(required)}, got {have}"
            )
        saved = SavedState(state, "the EMA state does not fit this EMA")
        shapes = {name: list(p.shape) for name, p in zip(self.names, self._params)}
        problems = saved.name_and_shape_problems("shadow", shapes)
        problems += settings_differences(saved.mapping("settings"), self.settings())
        if problems:
            raise IncompatibleStateError("the EMA state does not fit this EMA: " + "; ".join(problems))
        shadows = saved.averages("shadow", shapes)
        counters = {
            "num_calls": saved.count("num_calls"),
            "num_updates": saved.count("num_updates"),
            "decay_product": saved.fraction("decay_product"),
            "last_decay": saved.fraction("last_decay", optional=True),
            "num_nonfinite_skipped": saved.count("num_nonfinite_skipped", default=0),
        }
        return shadows, counters

    def __repr__(self):
        return (
            f"{type(self).__name__}({len(self.names)} tensors, schedule={self.schedule!r}, "
            f"bias_correction={self.rule.bias_correction}, update_every={self.update_every}, "
            f"start_step={self.start_step}, num_updates={self.num_updates})"
        )


class StochasticWeightAveraging(ExponentialMovingAverage):
    """Stochastic weight averaging: the equal-weight mean of the weights seen by averaging updates.

    The mean of n values is an EMA whose t-th update has decay t / (t + 1) (the power_function
    schedule with gamma = 0), so SWA is this one setting of the same machinery. Typical use: from a
    start step on, average every k steps (e.g. once an epoch):

        swa = StochasticWeightAveraging(model, start_step=75 * steps_per_epoch, update_every=steps_per_epoch)

    Before start_step the average copies the weights; the first averaging update restarts it.

    Args:
        model: a `paddle.nn.Layer`, bare or wrapped in `paddle.DataParallel`.
        update_every: average on every k-th call from start_step on (default 1).
        start_step: before this call index the average copies the weights (default 0).
        **options: as for ExponentialMovingAverage (policy= among them), without the decay settings.
    """

    def __init__(self, model: paddle.nn.Layer, *, update_every: Optional[int] = None, start_step: Optional[int] = None,
                 **options: Any):
        decay_settings = sorted({"decay", "thres_steps", "schedule", "schedule_options", "bias_correction", "rule"}
                                & set(options))
        if decay_settings:
            raise ConfigError(f"StochasticWeightAveraging gives every averaged step equal weight; it takes no {decay_settings}")
        super().__init__(model, rule=EMARule(PowerFunction(gamma=0.0)), update_every=update_every, start_step=start_step,
                         **options)
