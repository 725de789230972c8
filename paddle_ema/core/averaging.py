"""The averaging rule: how one update moves the average, and bias correction.

Every average in paddle_ema is kept with one in-place operation per update,

    average <- average + w * (weight - average)          (lerp; w in [0, 1])

and an averaging rule only decides the interpolation weight w of each update. Writing the update
as a lerp keeps a constant weight exactly constant in float arithmetic, which `d*a + (1-d)*x` does
not.

EMA, initialised from the weights:      w_t = 1 - d_t
EMA, from zero with bias correction:    w_t = (1 - d_t) / (1 - P_t),   P_t = d_0 * d_1 * ... * d_t

The second is the bias-corrected average s_t / (1 - P_t) of the zero-initialised EMA
s_t = d_t s_{t-1} + (1 - d_t) x_t, carried directly: with a = s / (1 - P),
a_t = a_{t-1} + (1 - d_t) / (1 - P_t) * (x_t - a_{t-1}) follows because
d_t (1 - P_{t-1}) + (1 - d_t) = 1 - P_t. It divides by the exact product of the decays applied
(not decay**t, which is wrong when the decay varies), never divides a tiny number at apply time,
and its first update takes the weights whole (w_0 = 1). P_t is tracked in float64 on the host in
both modes, starting from P = 1: it is the share of the initial value still in the average.

The formulas are plain arithmetic, so the static EMA evaluates them on tensors too.
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import ConfigError, IncompatibleStateError
from .step_policy import is_integer

__all__ = ["EMARule", "settings_differences", "shadow_dtype", "SavedState", "tensor_problem", "first_nonfinite_name"]


def shadow_dtype(dtype: Any) -> Any:
    """The dtype an average of `dtype` weights is kept in.

    Args:
        dtype: the weights' Paddle dtype.

    Returns:
        float32 for float16/bfloat16 (a half-precision average rounds each small
        (1 - d) * (x - a) step away and stops moving), else `dtype` itself.
    """
    import paddle

    return paddle.float32 if dtype in (paddle.float16, paddle.bfloat16) else dtype


class EMARule:
    """Exponential moving average with a decay schedule, optionally zero-initialised and bias-corrected.

    Args:
        schedule: the decay schedule (a `paddle_ema.schedules.Schedule`).
        bias_correction: zero start with the correction by 1 - P_t (w_t = (1 - d_t) / (1 - P_t));
            False: start from the weights, w_t = 1 - d_t.
    """

    def __init__(self, schedule: Any, bias_correction: bool = False):
        if bias_correction and schedule.decay >= 1.0:
            raise ConfigError("bias_correction needs decay < 1: with decay 1 nothing is ever averaged")
        if schedule(0) >= 1.0:
            # Every update would have weight 0: an average started from the weights stays there, one
            # started from zero stays zero, and PaddleDetection's correction divides it by 1 - 1**t = 0.
            raise ConfigError(f"the {schedule.name} schedule {_shown(schedule.options())} has decay 1 from its first "
                              "update on: the average would never move from where it starts (one started from zero "
                              "stays 0, and its bias correction divides by 1 - 1**t = 0); use a decay below 1")
        self.schedule = schedule
        self.bias_correction = bool(bias_correction)

    def weight(self, decay: Any, product: Any) -> Tuple[Any, Any]:
        """The interpolation weight of one update; float or tensor arithmetic alike.

        Args:
            decay: this update's decay d_t.
            product: P_{t-1}, the product of the decays applied before (1 at the start).

        Returns:
            (w_t, P_t).
        """
        new_product = product * decay
        if self.bias_correction:
            return (1.0 - decay) / (1.0 - new_product), new_product
        return 1.0 - decay, new_product

    def step(self, t: int, product: float) -> Tuple[float, float, float]:
        """The t-th update on the host, its decay from the schedule in float64.

        Args:
            t: the averaging step (0 for the first update).
            product: P_{t-1}.

        Returns:
            (d_t, w_t, P_t).
        """
        decay = self.schedule(t)
        w, new_product = self.weight(decay, product)
        return decay, w, new_product

    def options(self) -> Dict[str, Any]:
        """The settings that change the numbers, for state dicts.

        Returns:
            {'schedule': the schedule's options, 'bias_correction': bool}.
        """
        return {"schedule": self.schedule.options(), "bias_correction": self.bias_correction}


def settings_differences(saved: Dict[str, Any], ours: Dict[str, Any]) -> list:
    """The settings a saved average state was made with that differ from this average's: the one
    check every front-end's set_state_dict runs (dygraph and static EMA, ModelEMA).

    Args:
        saved: the settings recorded in the state (nested dicts allowed).
        ours: this average's settings, in the same form.

    Returns:
        ["setting K: SAVED in the state, OURS here", ...] for each differing key (nested keys
        dotted), sorted; empty when they agree.
    """
    mine, theirs = _flatten(ours), _flatten(saved)
    return [f"setting {key}: {theirs.get(key)!r} in the state, {mine.get(key)!r} here"
            for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key)]


def _flatten(mapping, prefix=""):
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(options):
    return "(" + ", ".join(f"{k}={v!r}" for k, v in options.items() if k != "name") + ")"


def _short(value, limit=60):
    text = " ".join(repr(value).split())  # one line, also for an array's repr
    return text if len(text) <= limit else text[: limit - 3] + "..."


_FLOATING = "float16, bfloat16, float32 or float64"


def tensor_problem(value: Any, shape: Sequence[int], floating: bool = True) -> Optional[str]:
    """Why a saved `value` cannot be loaded where a tensor of `shape` is: not a Paddle tensor or
    numpy array, another shape (never reshaped or broadcast), or (with `floating`) an integer or
    bool dtype (never truncated).

    Args:
        value: the saved value.
        shape: the shape it must have.
        floating: it must have a floating dtype (an average does).

    Returns:
        The reason, worded to follow the value's name ("is a str, not a tensor"), or None.
    """
    import numpy as np
    import paddle

    if not isinstance(value, (paddle.Tensor, np.ndarray)):
        return f"is a {type(value).__name__}, not a tensor"
    if list(value.shape) != list(shape):
        return f"has shape {list(value.shape)}, {list(shape)} here"
    if floating:
        is_float = paddle.is_floating_point(value) if isinstance(value, paddle.Tensor) else value.dtype.kind == "f"
        if not is_float:
            return f"is {str(value.dtype).replace('paddle.', '')}; it must be floating point ({_FLOATING})"
    return None


def first_nonfinite_name(named: Dict[str, Any]) -> Optional[str]:
    """The first name (in `named`'s order) whose Paddle tensor or numpy array holds NaN or Inf; the
    Paddle tensors are read in one multi-tensor scan (kernels.first_nonfinite).

    Args:
        named: {name: tensor or array}; entries of a non-floating dtype are finite.

    Returns:
        That name, or None.
    """
    import numpy as np
    import paddle

    from .. import kernels

    order = list(named)
    tensors = [n for n in order if isinstance(named[n], paddle.Tensor) and paddle.is_floating_point(named[n])]
    bad = kernels.first_nonfinite([named[n] for n in tensors]) if tensors else None
    found = [tensors[bad]] if bad is not None else []
    found += [n for n in order if isinstance(named[n], np.ndarray) and named[n].dtype.kind == "f"
              and not np.isfinite(named[n]).all()]
    return min(found, key=order.index) if found else None


class SavedState:
    """The entries of a saved average state (a state_dict() read back from a file), each checked
    before a loader changes anything: the first entry that cannot be loaded is one
    IncompatibleStateError naming its key. Every front-end's loader reads its state through this.

    Args:
        state: the saved state.
        what: how messages name it, e.g. 'the EMA state does not fit this EMA'.
    """

    def __init__(self, state: Any, what: str):
        if not isinstance(state, dict):
            raise IncompatibleStateError(f"{what}: it is a {type(state).__name__}, not a state dict")
        self.state, self.what = state, what

    def refuse(self, key: str, problem: str) -> None:
        """Raise the IncompatibleStateError of one entry.

        Args:
            key: the entry's key.
            problem: what is wrong with it, worded to follow the key.
        """
        raise IncompatibleStateError(f"{self.what}: {key!r} {problem}")

    @staticmethod
    def shown(value: Any) -> str:
        """A saved value as a message shows it: its repr on one line, cut at 60 characters.

        Args:
            value: the value.

        Returns:
            The text.
        """
        return _short(value)

    def _get(self, key, default):
        if key in self.state:
            return self.state[key]
        if default is _REQUIRED:
            self.refuse(key, "is missing")
        return default

    def mapping(self, key: str) -> Dict[str, Any]:
        """A dict entry.

        Args:
            key: the entry's key.

        Returns:
            The dict.
        """
        value = self._get(key, _REQUIRED)
        if not isinstance(value, dict):
            self.refuse(key, f"must be a dict, got a {type(value).__name__}")
        return value

    def count(self, key: str, default: Any = None) -> int:
        """A counter: an integer >= 0 (a bool or a float is not one).

        Args:
            key: the entry's key.
            default: the value when the entry is absent; None makes it required.

        Returns:
            The count as an int.
        """
        value = self._get(key, _REQUIRED if default is None else default)
        if not is_integer(value, 0):
            self.refuse(key, f"must be an integer >= 0, got {_short(value)}")
        return int(value)

    def fraction(self, key: str, optional: bool = False, below_one: bool = False) -> Optional[float]:
        """A decay or decay product: a number in [0, 1] ([0, 1) with `below_one`).

        Args:
            key: the entry's key (required; its value may be None when `optional`).
            optional: None is allowed.
            below_one: 1 is not allowed.

        Returns:
            The number as a float, or None.
        """
        value = self._get(key, _REQUIRED)
        if value is None and optional:
            return None
        number = isinstance(value, (int, float)) and not isinstance(value, bool) or _is_numpy_number(value)
        if not number or not 0.0 <= float(value) <= 1.0 or (below_one and float(value) == 1.0):
            allowed = "[0, 1)" if below_one else "[0, 1]"
            self.refuse(key, f"must be a number in {allowed}{' or None' if optional else ''}, got {_short(value)}")
        return float(value)

    def name_and_shape_problems(self, key: str, shapes: Dict[str, Sequence[int]]) -> List[str]:
        """What differs between the averages under `key` and `shapes`: missing and unexpected
        names, other shapes (for a loader that reports them with other differences in one line).

        Args:
            key: the entry's key (a dict of averages).
            shapes: {name: the shape an average of that name has here}.

        Returns:
            ['missing parameters [...]', 'unexpected parameters [...]', 'NAME: shape [..] in the
            state, [..] here', ...]; empty when names and shapes agree.
        """
        saved = self.mapping(key)
        missing = [n for n in shapes if n not in saved]
        unexpected = [str(n)[:80] for n in saved if n not in shapes]
        problems = []
        if missing:
            problems.append(f"missing parameters {missing}")
        if unexpected:
            problems.append(f"unexpected parameters {unexpected[:20]}")
        for name, shape in shapes.items():
            value = saved.get(name)
            if hasattr(value, "shape") and list(value.shape) != list(shape):
                problems.append(f"{name}: shape {list(value.shape)} in the state, {list(shape)} here")
        return problems

    def averages(self, key: str, shapes: Dict[str, Sequence[int]]) -> Dict[str, Any]:
        """The averages under `key`, {name: tensor}: exactly the names of `shapes`, each passing
        `tensor_problem` (a tensor of its shape and a floating dtype), none holding NaN or Inf.

        Args:
            key: the entry's key.
            shapes: {name: the shape an average of that name has here}, in the order to report.

        Returns:
            {name: the saved tensor or array}, in the order of `shapes`.
        """
        problems = self.name_and_shape_problems(key, shapes)
        if problems:
            raise IncompatibleStateError(f"{self.what}: {'; '.join(problems)}")
        saved = self.state[key]
        for name, shape in shapes.items():
            problem = tensor_problem(saved[name], shape)
            if problem:
                self.refuse(key, f"holds {name!r}, which {problem}")
        averages = {name: saved[name] for name in shapes}
        bad = first_nonfinite_name(averages)
        if bad is not None:
            self.refuse(key, f"holds NaN or Inf in {bad!r}; a saved average must be finite")
        return averages


_REQUIRED = object()


def _is_numpy_number(value):
    import numpy as np

    return isinstance(value, (np.integer, np.floating))
