"""The non-finite policy: what an average does when the weights it is given hold NaN or Inf.

One object per average says it for every front-end (the dygraph and static EMAs, ModelEMA, SWA,
post-hoc EMA) and the training engine:

    'skip'    the update changes nothing; it is counted and warned about at the 1st, 10th, 100th
              and every 1000th skip (a diverged run would otherwise warn on every step)
    'raise'   NonFiniteError naming the first offending tensor
    'update'  no check: the average takes whatever the weights hold

The front-end finds the offending tensor (its kernel's scan) and words the messages; the policy
decides, counts and warns, attributing each warning to the first frame outside paddle_ema.
"""

from typing import Callable, Iterable, Optional

from .. import _compat
from ..errors import ConfigError, NonFiniteError
from .validation import check_choice

__all__ = ["NonfinitePolicy", "NonfiniteAttributes", "NONFINITE_POLICIES", "WARN_AT", "REPEAT_EVERY"]

NONFINITE_POLICIES = ("skip", "raise", "update")
# Skips that warn: these, then every REPEAT_EVERY-th.
WARN_AT = (1, 10, 100)
REPEAT_EVERY = 1000


class NonfinitePolicy:
    """Skip, raise or update on NaN/Inf weights, with the count of skipped updates.

    Args:
        mode: 'skip', 'raise' or 'update' (one of `modes`).
        modes: the modes this front-end offers, in the order its error message lists them.
        setting: the setting's name in that message.
        refused: the whole message for a mode not in `modes`, where a front-end words it itself.
    """

    def __init__(self, mode: str = "skip", *, modes: Iterable[str] = NONFINITE_POLICIES, setting: str = "nonfinite",
                 refused: Optional[str] = None):
        modes = tuple(modes)
        if refused is not None and mode not in modes:
            raise ConfigError(refused.format(mode=mode))
        self.mode = check_choice(setting, mode, modes)
        self.skipped = 0
        self._reported = 0

    @property
    def checks(self) -> bool:
        """Whether updates are checked at all (every mode but 'update')."""
        return self.mode != "update"

    @staticmethod
    def warns_at(count: int) -> bool:
        """Whether the `count`-th skip warns.

        Args:
            count: skips so far, this one included.

        Returns:
            True at 1, 10, 100 and every 1000th.
        """
        return count in WARN_AT or count % REPEAT_EVERY == 0

    def skip(self, raise_message: str, warn_message: str) -> None:
        """An update whose weights hold NaN or Inf: raise (mode 'raise'), or count it and warn when due.

        Args:
            raise_message: the NonFiniteError's message.
            warn_message: the warning's message; the count and the cadence are appended.
        """
        if self.mode == "raise":
            raise NonFiniteError(raise_message)
        self.skipped += 1
        if self.warns_at(self.skipped):
            _compat.warn_at_caller(f"{warn_message} ({self.skipped} update(s) skipped so far; warnings repeat at "
                                   f"10, 100 and every {REPEAT_EVERY})", RuntimeWarning)

    def allow_copy(self, message: str, *, skip_note: str) -> bool:
        """Whether an average may restart by copying weights that hold NaN or Inf: yes under
        'update'; 'raise' raises; 'skip' warns that the restart is skipped and the average kept.

        Args:
            message: what holds NaN or Inf, e.g. "snapshot 3: 'fc.weight' holds NaN or Inf".
            skip_note: appended to the warning's message under 'skip'.

        Returns:
            True when the copy may go ahead.
        """
        if self.mode == "update":
            return True
        if self.mode == "raise":
            raise NonFiniteError(message)
        _compat.warn_at_caller(message + skip_note, RuntimeWarning)
        return False

    def refuse(self, message: str, *, raise_note: str, skip_note: str) -> None:
        """A result that must not be used holds NaN or Inf: raise under 'raise', else warn (the
        caller keeps what it had).

        Args:
            message: what holds NaN or Inf.
            raise_note: appended to the NonFiniteError's message.
            skip_note: appended to the warning's message.
        """
        if self.mode == "raise":
            raise NonFiniteError(message + raise_note)
        _compat.warn_at_caller(message + skip_note, RuntimeWarning)

    def report_total(self, count: int, message: Callable[[int], str]) -> None:
        """For an average that counts its skips elsewhere (a static program's variable): warn when
        the count grew since the last report.

        Args:
            count: the skips counted so far.
            message: the warning's text for that count.
        """
        if count > self._reported:
            self._reported = count
            _compat.warn_at_caller(message(count), RuntimeWarning)

    def reset(self) -> None:
        """Forget the skips counted (a new average)."""
        self.skipped = 0
        self._reported = 0


class NonfiniteAttributes:
    """`nonfinite` and `num_nonfinite_skipped` of an average that keeps its policy as `nonfinite_policy`."""

    nonfinite_policy: NonfinitePolicy

    @property
    def nonfinite(self) -> str:
        """The non-finite policy's mode: 'skip', 'raise' or 'update'."""
        return self.nonfinite_policy.mode

    @property
    def num_nonfinite_skipped(self) -> int:
        """Updates skipped for NaN or Inf values."""
        return self.nonfinite_policy.skipped
