"""The `nonfinite=` option of the drop-ins: what an update does when a weight holds NaN or Inf."""

import warnings
from typing import Dict

import paddle

from paddle_ema.ppdet import NONFINITE_POLICIES

from .. import kernels
from ..errors import ConfigError, NonFiniteError


class NonfiniteGuard:
    """'update' (the suites' behaviour: no check), 'skip' (the update changes nothing, counted and
    warned about) or 'raise' (NonFiniteError), for one EMA.

    Args:
        policy: one of NONFINITE_POLICIES.
        what: the update's name in messages, e.g. 'ExponentialMovingAverage.update()'.
    """

    def __init__(self, policy: str, what: str):
        if policy not in NONFINITE_POLICIES:
            raise ConfigError(f"nonfinite must be one of {list(NONFINITE_POLICIES)}, got {policy!r}")
        self.policy = policy
        self.what = what
        self.skipped = 0

    def allows(self, named: Dict[str, paddle.Tensor]) -> bool:
        """Whether an update that reads these values may run.

        Args:
            named: {name: the value the update averages}; non-floating ones are finite.

        Returns:
            True for 'update', or when every value is finite; False when 'skip' skips the update.

        Raises:
            NonFiniteError: with 'raise', naming the first value that holds NaN or Inf.
        """
        if self.policy == "update":
            return True
        names = [name for name, value in named.items() if paddle.is_floating_point(value)]
        bad = kernels.first_nonfinite([named[name] for name in names])
        if bad is None:
            return True
        if self.policy == "raise":
            raise NonFiniteError(f"{self.what}: {names[bad]!r} holds NaN or Inf")
        self.skipped += 1
        if self.skipped in (1, 10, 100) or self.skipped % 1000 == 0:  # a diverged run would warn every step
            warnings.warn(f"{self.what} skipped: {names[bad]!r} holds NaN or Inf ({self.skipped} update(s) "
                          "skipped so far; warnings repeat at 10, 100 and every 1000)", RuntimeWarning, stacklevel=3)
        return False
