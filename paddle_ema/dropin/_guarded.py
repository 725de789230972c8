"""The attributes a drop-in with the `nonfinite=` option shows, read from its NonfiniteGuard."""


class NonfiniteAttributes:
    """`nonfinite` and `num_nonfinite_skipped` of a class that keeps its NonfiniteGuard as `_guard`."""

    @property
    def nonfinite(self) -> str:
        """The non-finite policy: 'update', 'skip' or 'raise'."""
        return self._guard.policy

    @property
    def num_nonfinite_skipped(self) -> int:
        """How many updates `nonfinite='skip'` has skipped."""
        return self._guard.skipped
