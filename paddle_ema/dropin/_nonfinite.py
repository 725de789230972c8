"""The `nonfinite=` option of the drop-ins, on the one non-finite policy (core/nonfinite.py)."""

from typing import Dict

import paddle

from .. import kernels
from ..core.nonfinite import NonfinitePolicy


class NonfiniteGuard(NonfinitePolicy):
    """'update' (the suites' behaviour: no check), 'skip' (the update changes nothing, counted and
    warned about) or 'raise' (NonFiniteError), for one EMA whose update reads a dict of values.

    Args:
        mode: 'skip', 'raise' or 'update'.
        what: the update's name in messages, e.g. 'ExponentialMovingAverage.update()'.
    """

    def __init__(self, mode: str, what: str):
        super().__init__(mode)
        self.what = what

    def allows(self, named: Dict[str, paddle.Tensor]) -> bool:
        """Whether an update that reads these values may run.

        Args:
            named: {name: the value the update averages}; non-floating ones are finite.

        Returns:
            True for 'update', or when every value is finite; False when 'skip' skips the update.

        Raises:
            NonFiniteError: with 'raise', naming the first value that holds NaN or Inf.
        """
        if not self.checks:
            return True
        names = [name for name, value in named.items() if paddle.is_floating_point(value)]
        bad = kernels.first_nonfinite([named[name] for name in names])
        if bad is None:
            return True
        self.skip(f"{self.what}: {names[bad]!r} holds NaN or Inf", f"{self.what} skipped: {names[bad]!r} holds NaN or Inf")
        return False

