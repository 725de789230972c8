"""A saved average state read back (a state_dict() from a file), checked entry by entry before a
loader changes anything: counters, decays, names and shapes against this average's, floating
dtypes and finite averages. Every front-end's loader (the dygraph and static EMAs, ModelEMA,
SimpleModelEMA, post-hoc EMA, the engine's trainers) reads its state through `SavedState` or
`tensor_problem`; the first entry that cannot be loaded is one IncompatibleStateError naming it.
"""

from typing import Any, Dict, List, Optional, Sequence

from ..core.validation import is_integer
from ..errors import IncompatibleStateError
from ..kernels import first_nonfinite_name

__all__ = ["SavedState", "tensor_problem"]


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
