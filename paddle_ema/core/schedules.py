"""Decay schedules: the decay d(t) used by the t-th EMA update, t = 0, 1, 2, ...

Each schedule is a small frozen dataclass whose formula is written once, against a math namespace,
so that the same expression serves host floats (the dygraph EMA computes d(t) in float64 on the
host) and Paddle tensors (the static EMA emits it as ops of the main program):

    schedule(t)         -> float, d(t) in float64
    schedule.tensor(t)  -> Tensor, the same formula in Paddle ops, for static programs

Schedules are looked up by name in a registry that user code extends with `register_schedule`.
"""

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, Type

from ..errors import ConfigError
from .validation import check_number

__all__ = [
    "Schedule",
    "Constant",
    "Threshold",
    "Exponential",
    "Power",
    "PowerFunction",
    "SCHEDULES",
    "register_schedule",
    "make_schedule",
    "schedule_for_decay_type",
    "PPDET_EXPONENTIAL_TAU",
]


class _HostMath:
    """Float64 arithmetic on Python floats."""

    @staticmethod
    def minimum(x, c):
        return min(x, c)

    @staticmethod
    def clip(x, lo, hi):
        return max(lo, min(hi, x))

    exp = staticmethod(math.exp)


class _TensorMath:
    """The same operations as Paddle ops; they work in dygraph and in both static program kinds."""

    @staticmethod
    def minimum(x, c):
        import paddle

        return paddle.clip(x, max=c)

    @staticmethod
    def clip(x, lo, hi):
        import paddle

        return paddle.clip(x, min=lo, max=hi)

    @staticmethod
    def exp(x):
        from .. import _compat  # imports paddle: deferred like the `import paddle` above

        return _compat.exp(x)  # paddle.exp rejects legacy-program Variables on Paddle 3.3


HOST = _HostMath()
TENSOR = _TensorMath()


@dataclass(frozen=True)
class Schedule:
    """Base class of the decay schedules.

    Args:
        decay: the schedule's upper bound, reached or approached as t grows.

    Subclasses write `formula` once; `schedule(t)` and `schedule.tensor(t)` evaluate it.
    """

    decay: float = 0.9998

    name = "base"

    def __post_init__(self):
        check_number(f"{self.name} schedule: decay", self.decay, at_least=0, at_most=1)

    def formula(self, t: Any, m: Any) -> Any:
        """d(t), written with the operations of a math namespace.

        Args:
            t: the step, a float (HOST) or a tensor (TENSOR).
            m: the math namespace, HOST or TENSOR (minimum, clip, exp).

        Returns:
            The decay, of t's kind.
        """
        raise NotImplementedError

    def __call__(self, t: int) -> float:
        """d(t) on the host in float64.

        Args:
            t: the averaging step, >= 0.

        Returns:
            The decay.
        """
        if t < 0:
            raise ConfigError(f"schedule step must be >= 0, got {t}")
        return float(self.formula(float(t), HOST))

    def tensor(self, t: Any) -> Any:
        """d(t) as Paddle ops, for a static program (or a dygraph tensor).

        Args:
            t: a floating step tensor or program value.

        Returns:
            The decay, a tensor of t's dtype.
        """
        return self.formula(t, TENSOR)

    def options(self) -> Dict[str, Any]:
        """The settings that determine d(t), for state dicts and configs.

        Returns:
            {'name': the registered name, and each field}.
        """
        return {"name": self.name, **asdict(self)}


SCHEDULES = {}


def register_schedule(name: str, *aliases: str) -> Callable[[Type[Schedule]], Type[Schedule]]:
    """Class decorator that makes a Schedule subclass available by name (and aliases).

    Args:
        name: the schedule's name (also set as the class's `name`).
        *aliases: further names for it.

    Returns:
        The decorator; it returns the class unchanged.
    """

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, Schedule)):
            raise TypeError(f"register_schedule({name!r}) decorates a Schedule subclass, got {cls!r}")
        cls.name = name
        for key in (name, *aliases):
            if key in SCHEDULES and SCHEDULES[key] is not cls:
                raise ConfigError(f"schedule name {key!r} is already registered to {SCHEDULES[key].__name__}")
            SCHEDULES[key] = cls
        return cls

    return decorate


@register_schedule("constant", "normal")
@dataclass(frozen=True)
class Constant(Schedule):
    """d(t) = decay. ('normal' is PaddleDetection's name for it.)

    Args:
        decay: the constant decay.
    """

    def formula(self, t: Any, m: Any) -> Any:
        return self.decay + 0.0 * t


@register_schedule("threshold")
@dataclass(frozen=True)
class Threshold(Schedule):
    """d(t) = min(decay, (1 + t) / (10 + t)): TensorFlow's num_updates and the seeds' thres_steps.

    Args:
        decay: the cap.
    """

    def formula(self, t: Any, m: Any) -> Any:
        return m.minimum((1.0 + t) / (10.0 + t), self.decay)


@register_schedule("exponential")
@dataclass(frozen=True)
class Exponential(Schedule):
    """d(t) = decay * (1 - exp(-(t + 1) / tau)): the YOLO / PaddleDetection warm-up.

    Args:
        decay: the limit as t grows.
        tau: the warm-up's time constant, in updates.
    """

    tau: float = 2000.0

    def __post_init__(self):
        super().__post_init__()
        check_number("exponential schedule: tau", self.tau, above=0)

    def formula(self, t: Any, m: Any) -> Any:
        return self.decay * (1.0 - m.exp(-(t + 1.0) / self.tau))


@register_schedule("power")
@dataclass(frozen=True)
class Power(Schedule):
    """d(t) = clip(1 - (1 + t / inv_gamma) ** -power, min_decay, decay): timm ModelEmaV3, ema-pytorch.

    Args:
        decay: the cap.
        inv_gamma: the warm-up's time scale.
        power: the warm-up's exponent.
        min_decay: the floor (<= decay).
    """

    inv_gamma: float = 1.0
    power: float = 2.0 / 3.0
    min_decay: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_number("power schedule: inv_gamma", self.inv_gamma, above=0)
        check_number("power schedule: power", self.power, above=0)
        check_number("power schedule: min_decay", self.min_decay, at_least=0, at_most=1)
        if self.min_decay > self.decay:
            raise ConfigError(f"power schedule: min_decay ({self.min_decay}) must not exceed decay ({self.decay})")

    def formula(self, t: Any, m: Any) -> Any:
        return m.clip(1.0 - (1.0 + t / self.inv_gamma) ** (-self.power), self.min_decay, self.decay)


@register_schedule("power_function")
@dataclass(frozen=True)
class PowerFunction(Schedule):
    """d(t) = min(decay, (t / (t + 1)) ** (gamma + 1)): Karras et al. 2023's power-function EMA.

    After n updates the weights x_1..x_n enter the average in proportion to about tau ** gamma:
    gamma = 0 gives them equal weight (stochastic weight averaging). The first update (t = 0) takes
    the weights whole.

    Args:
        decay: an optional cap, 1 (none) by default.
        gamma: the profile's exponent, >= 0.
    """

    decay: float = 1.0
    gamma: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_number("power_function schedule: gamma", self.gamma, at_least=0)

    def formula(self, t: Any, m: Any) -> Any:
        return m.minimum((t / (t + 1.0)) ** (self.gamma + 1.0), self.decay)


def make_schedule(schedule: Any = "threshold", decay: Any = None, **options: Any) -> Schedule:
    """A Schedule from a registered name or an instance.

    Args:
        schedule: a registered name or a Schedule instance (which carries its own settings;
            passing `decay` or options beside one is an error).
        decay: the named schedule's decay; None for its default.
        **options: the named schedule's own options (e.g. tau=2000 for 'exponential').

    Returns:
        The Schedule.
    """
    if isinstance(schedule, Schedule):
        if decay is not None or options:
            raise ConfigError("pass either a Schedule instance or a schedule name with decay/options, not both")
        return schedule
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        allowed = ", ".join(sorted(SCHEDULES))
        raise ConfigError(f"unknown decay schedule {schedule!r}; allowed: {allowed}")
    cls = SCHEDULES[schedule]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"schedule {schedule!r} takes the options {sorted(known)}, not {unknown}"
        )
    if decay is not None:
        options["decay"] = decay
    return cls(**options)


# PaddleDetection hard-codes this time constant of its 'exponential' warm-up.
PPDET_EXPONENTIAL_TAU = 2000.0


def schedule_for_decay_type(
    ema_decay_type: str,
    decay: float,
    *,
    tau: float = PPDET_EXPONENTIAL_TAU,
    inv_gamma: float = 1.0,
    power: float = 2.0 / 3.0,
    min_decay: float = 0.0,
) -> Schedule:
    """The schedule a PaddleDetection-style `ema_decay_type` names: the one place that maps it.

    Args:
        ema_decay_type: 'threshold', 'exponential', 'normal' (PaddleDetection's three) or any
            registered schedule name ('constant', 'power', ...).
        decay: the schedule's decay (upper bound).
        tau: the 'exponential' warm-up's time constant (PaddleDetection's 2000 by default).
        inv_gamma: the 'power' schedule's inv_gamma.
        power: the 'power' schedule's power.
        min_decay: the 'power' schedule's min_decay.

    Returns:
        The Schedule. Each option goes only to the schedule that takes it; an unknown
        `ema_decay_type` is a ConfigError (PaddleDetection treats it as 'normal').
    """
    if not isinstance(ema_decay_type, str) or ema_decay_type not in SCHEDULES:
        raise ConfigError(f"ema_decay_type {ema_decay_type!r} is not allowed; allowed: {', '.join(sorted(SCHEDULES))}")
    given = {"tau": tau, "inv_gamma": inv_gamma, "power": power, "min_decay": min_decay}
    taken = {f.name for f in fields(SCHEDULES[ema_decay_type])}
    return make_schedule(ema_decay_type, decay, **{k: v for k, v in given.items() if k in taken})
