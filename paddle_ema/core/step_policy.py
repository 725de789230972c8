"""The step policy: which calls of an average's `update()` average, copy or do nothing, and with
which averaging step t.

One object answers that for every front-end (the dygraph EMA, the static EMA, ModelEMA, SWA,
post-hoc EMA and the training engine), for host integers and for program tensors alike:

    policy = StepPolicy(start_step=100, update_every=4)
    policy.action(99)    # Action(kind='copy', t=None): before the start the average copies the weights
    policy.action(100)   # Action(kind='average', t=0)
    policy.action(101)   # Action(kind='skip', t=None)
    policy.action(104)   # Action(kind='average', t=1)

Call c (0-based, counted by `update()` or given as `step=`) copies the weights when c < start_step,
averages with t = (c - start_step) / update_every when c - start_step is a multiple of
update_every, and does nothing otherwise. The decay thus follows the call counter, also when calls
are skipped or an external step jumps.

`restart_every` (PaddleDetection's `cycle_epoch`) restarts the average after every that many
snapshots (evaluations); 0 never restarts.
"""

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Tuple

from ..errors import ConfigError
from .validation import check_int, is_integer  # noqa: F401  (is_integer: its old import path)

__all__ = ["StepPolicy", "Action", "COPY", "SKIP", "AVERAGE"]

COPY, SKIP, AVERAGE = "copy", "skip", "average"


class Action(NamedTuple):
    """What one call does: `kind` is 'copy', 'skip' or 'average'; `t` the averaging step of an average."""

    kind: str
    t: Optional[int] = None


@dataclass(frozen=True)
class StepPolicy:
    """Call index -> copy / skip / average with step t, and when to restart.

    Args:
        start_step: calls before this index copy the weights into the average (no averaging yet).
        update_every: average on every k-th call from `start_step` on; the calls between do nothing.
        restart_every: restart the average after every this many snapshots (0: never).
    """

    start_step: int = 0
    update_every: int = 1
    restart_every: int = 0

    def __post_init__(self):
        # Stored as Python ints (a numpy integer would leak into settings and JSON).
        for name, minimum in (("update_every", 1), ("start_step", 0), ("restart_every", 0)):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum))

    def action(self, call: int) -> Action:
        """What one call does.

        Args:
            call: the call's index, 0-based.

        Returns:
            Action('copy'), Action('skip') or Action('average', t).
        """
        offset = call - self.start_step
        if offset < 0:
            return Action(COPY)
        if offset % self.update_every:
            return Action(SKIP)
        return Action(AVERAGE, offset // self.update_every)

    def num_updates(self, calls: int) -> int:
        """How many of the first `calls` calls averaged.

        Args:
            calls: the number of calls made.

        Returns:
            The count of averaging calls among them.
        """
        averaging = calls - self.start_step
        return 0 if averaging <= 0 else (averaging + self.update_every - 1) // self.update_every

    def last_step(self, calls: int) -> Optional[int]:
        """The t of the last averaging call among the first `calls` calls.

        Args:
            calls: the number of calls made.

        Returns:
            That t, or None when none of them averaged.
        """
        updates = self.num_updates(calls)
        return None if updates == 0 else updates - 1

    def restarts_after(self, snapshots: int) -> bool:
        """Whether the average restarts after a snapshot.

        Args:
            snapshots: the snapshots taken so far, this one included (1-based).

        Returns:
            True when `restart_every` > 0 and `snapshots` is a multiple of it.
        """
        return self.restart_every > 0 and snapshots > 0 and snapshots % self.restart_every == 0

    def tensor_step(self, call: Any, dtype: str = "float32") -> Tuple[Any, Any]:
        """`action` for a call counter of a static program (or a dygraph tensor), as Paddle ops.

        Program calls start at 0 and static programs have no copy phase, so start_step must be 0.

        Args:
            call: an integer (or integer-valued float) tensor or program value, the call index.
            dtype: the dtype of the returned t.

        Returns:
            (averages, t): `averages` a bool tensor, True where the call averages (None when every
            call does); `t` the averaging step in `dtype`.
        """
        import paddle

        if self.start_step:
            raise ConfigError("start_step is not supported in static programs; use 0")
        if self.update_every == 1:
            return None, paddle.cast(call, dtype)
        call = paddle.cast(call, "int64")
        return call % self.update_every == 0, paddle.cast(call // self.update_every, dtype)
