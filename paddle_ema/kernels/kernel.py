"""The update of one average's tensors, chosen once: `Kernel`.

An average (the dygraph EMA, ModelEMA, SimpleModelEMA, the suites' drop-ins) keeps one Kernel
bound to its average tensors and calls it on every update:

    kernel = Kernel(shadows)
    bad = kernel.lerp_(weights, 1 - decay, scan=weights)   # None: updated; i: weights[i] is NaN/Inf

Which implementation runs (the fused extension or Paddle's own ops, `mode.active_kernel()`) is
decided when the Kernel is made and again only when `mode.key()` changes (set_kernel(), the
$PADDLE_EMA_KERNEL variable, the extension loading), so a change acts at the very next update and
an update otherwise costs one comparison. Averages that live where the extension does not run (a
GPU without a CUDA build) take the reference ops from the start.

The guarded lerp on the CPU writes the new averages into spare buffers and trades buffers with
the averages only when every weight was finite (fused.guarded_lerp_: 12 bytes a parameter instead
of 16). The spares are the Kernel's; `scratch_like()` lends them to an average's apply() when
they fit its tensors, so the EMA holds one spare set for both (a documented memory trade,
docs/performance.md); otherwise it makes a separate set. A tensor that shares an average's buffer
(a `detach()`) keeps the old buffer after such an update (docs/dygraph.md).
"""

from typing import TYPE_CHECKING, List, Optional, Sequence

from .. import _compat
from . import fused, mode, reference
from .threads import num_threads

if TYPE_CHECKING:  # for the annotations only
    import paddle

__all__ = ["Kernel"]


class Kernel:
    """The multi-tensor update of one average's tensors: fused or reference, chosen once.

    Args:
        averages: the average's tensors, updated in place by every method.
    """

    def __init__(self, averages: Sequence["paddle.Tensor"]):
        self._key = None
        self.name = None
        self._spares: Optional[List["paddle.Tensor"]] = None  # the guard's second buffers
        self.spares_shared = False  # lent to apply() by scratch_like() as well
        self._scratch: Optional[List["paddle.Tensor"]] = None  # scratch_like()'s own set, when the spares do not fit
        self._lent = None  # (ids of the tensors, the buffers) of scratch_like()'s last answer
        self._guard_plan = None  # None: undecided; True: one pass into spares; False: scan, then in place
        self.averages: List["paddle.Tensor"] = []
        self.rebind(averages)

    @property
    def spares(self) -> Optional[List["paddle.Tensor"]]:
        """The guard's spare buffers, once made (None before, and off the CPU)."""
        return self._spares

    def rebind(self, averages: Sequence["paddle.Tensor"]) -> None:
        """Bind new average tensors (register(), reset()); spares that no longer fit are dropped.

        Args:
            averages: the new tensors, one per average.
        """
        self.averages = list(averages)
        self._guard_plan = None
        self._lent = None
        if self._spares is not None and not _fits(self._spares, self.averages):
            self._spares, self.spares_shared = None, False
        self._key = None  # choose again: the averages may live elsewhere now

    def _choose(self):
        key = mode.key()
        if key != self._key:
            name = mode.active_kernel()  # raises for a bad mode: nothing kept then
            if name == "fused" and not any(_compat.is_cpu_place(a.place) for a in self.averages) \
                    and not fused.runs_on_gpus():
                name = "reference"  # nowhere the extension runs: no call needed to learn it
            self._key, self.name = key, name
        return self.name

    # -- the formulas ------------------------------------------------------------------------

    def lerp_(self, values: Sequence["paddle.Tensor"], weight: float,
              scan: Optional[Sequence["paddle.Tensor"]] = None) -> Optional[int]:
        """averages[i] += weight * (values[i] - averages[i]); a weight of 0 changes nothing, 1 copies.

        Args:
            values: one per average; cast to its dtype and place when they differ.
            weight: the update's weight, 1 - decay.
            scan: None, or the weights whose finiteness decides: when one holds NaN or Inf,
                nothing changes.

        Returns:
            None when updated (or nothing to check); else the index in `scan` of the first
            non-finite tensor.
        """
        weight = float(weight)
        name = self._choose()
        if name == "fused" and 0.0 < weight < 1.0:  # the common case: one call
            if scan is None:
                fused.lerp_(self.averages, values, weight, num_threads())
                return None
            return fused.guarded_lerp_(self.averages, values, scan, weight, self._guard_spares(values),
                                       num_threads())
        if scan is not None:
            bad = self.first_nonfinite(scan)
            if bad is not None:
                return bad
        if weight == 0.0:
            return None
        if weight == 1.0:  # avg + 1 * (x - avg) is not x in float arithmetic; a weight of 1 means "take x"
            self.copy_(self.averages, values)
        elif name == "fused":
            fused.lerp_(self.averages, values, weight, num_threads())
        else:
            reference.lerp_(self.averages, values, weight)
        return None

    def scale_add_(self, values: Sequence["paddle.Tensor"], decay: float, weight: float,
                   scan: Optional[Sequence["paddle.Tensor"]] = None) -> Optional[int]:
        """averages[i] <- (decay * averages[i] + 0) + (weight * values[i] + 0), rounded as Paddle's
        `scale` and `add` ops round `decay * a + weight * x` in the average's dtype. No shortcut for
        a weight of 0 or 1: the arithmetic is done as written.

        Args:
            values: one per average.
            decay: the factor of the average.
            weight: the factor of the value, passed, not derived (a suite's 1 - decay in float64
                is not 1 - float32(decay)).
            scan: as for `lerp_`.

        Returns:
            As for `lerp_`.
        """
        return self._update("scale_add", values, float(decay), float(weight), scan)

    def sub_scale_sub_(self, values: Sequence["paddle.Tensor"], weight: float,
                       scan: Optional[Sequence["paddle.Tensor"]] = None) -> Optional[int]:
        """averages[i] <- averages[i] - (weight * (averages[i] - values[i]) + 0), rounded as
        Paddle's `subtract`, `scale` and `subtract` ops round it (ppdiffusers' EMAModel). Not a
        lerp: the sign of a zero result can differ. No shortcut for a weight of 0 or 1.

        Args:
            values: one per average.
            weight: the update's weight, 1 - decay.
            scan: as for `lerp_`.

        Returns:
            As for `lerp_`.
        """
        return self._update("sub_scale_sub", values, 0.0, float(weight), scan)

    def _update(self, formula, values, decay, weight, scan):
        if self._choose() == "fused":
            if scan is None:
                fused.update_(formula, self.averages, values, decay, weight, num_threads())
                return None
            return fused.guarded_update_(formula, self.averages, values, scan, decay, weight, num_threads())
        if scan is not None:
            bad = reference.first_nonfinite(scan)
            if bad is not None:
                return bad
        reference.update_(formula, self.averages, values, decay, weight)
        return None

    # -- copies and scans --------------------------------------------------------------------

    def copy_from(self, values: Sequence["paddle.Tensor"],
                  scan: Optional[Sequence["paddle.Tensor"]] = None) -> Optional[int]:
        """averages[i] <- values[i], cast to the average's dtype (an average that copies the weights).

        Args:
            values: one per average.
            scan: as for `lerp_`.

        Returns:
            As for `lerp_`.
        """
        if scan is not None:
            bad = self.first_nonfinite(scan)
            if bad is not None:
                return bad
        self.copy_(self.averages, values)
        return None

    def copy_to(self, targets: Sequence["paddle.Tensor"]) -> None:
        """targets[i] <- averages[i], cast to the target's dtype (apply(), a state).

        Args:
            targets: one per average.
        """
        self.copy_(targets, self.averages)

    def copy_(self, targets: Sequence["paddle.Tensor"], sources: Sequence["paddle.Tensor"]) -> None:
        """targets[i] <- sources[i]: same-dtype CPU pairs by the extension when it runs, casts by the
        reference ops (nearest-even on every Paddle version, `reference.cast`).

        Args:
            targets: the tensors written.
            sources: one per target.
        """
        if self._choose() == "fused":
            fused.copy_(targets, sources, num_threads())
        else:
            reference.copy_(targets, sources)

    def first_nonfinite(self, tensors: Sequence["paddle.Tensor"]) -> Optional[int]:
        """The first tensor holding NaN or Inf.

        Args:
            tensors: the tensors to check.

        Returns:
            Its index, or None when every tensor is finite.
        """
        if self._choose() == "fused":
            return fused.first_nonfinite(tensors, num_threads())
        return reference.first_nonfinite(tensors)

    # -- buffers -----------------------------------------------------------------------------

    def _guard_spares(self, values):
        """The spares of the one-pass guarded lerp, or None to scan and update in place (a tensor
        off the CPU). Decided at the first guarded update after a (re)binding."""
        if self._guard_plan is None:
            self._guard_plan = all(_compat.is_cpu_place(t.place) for t in (*self.averages, *values))
        if not self._guard_plan:
            return None
        if self._spares is None:
            import paddle

            self._spares = [paddle.empty_like(a) for a in self.averages]
        return self._spares

    def scratch_like(self, tensors: Sequence["paddle.Tensor"]) -> List["paddle.Tensor"]:
        """Buffers of `tensors`' shapes, dtypes and places, kept from call to call: the guard's
        spares when they fit (they are free whenever the averages are not being updated), else a
        set of the Kernel's own.

        Args:
            tensors: the tensors the buffers stand in for.

        Returns:
            One buffer per tensor (contents undefined).
        """
        import paddle

        tensors = list(tensors)
        ids = [id(t) for t in tensors]
        # The same tensors as last time (every apply() of an EMA): the same buffers, without comparing
        # each tensor's shape, dtype and place again (microseconds a tensor; the caller checks shapes).
        if self._lent is not None and self._lent[0] == ids:
            return self._lent[1]
        if _fits(tensors, self.averages) and all(_compat.is_cpu_place(t.place) for t in tensors):
            if self._spares is None:
                self._spares = [paddle.empty_like(t) for t in tensors]
            self.spares_shared = True
            buffers = self._spares
        else:
            if self._scratch is None or not _fits(self._scratch, tensors):
                self._scratch = [paddle.empty_like(t) for t in tensors]
            buffers = self._scratch
        self._lent = (ids, buffers)
        return buffers

    def forget_scratch(self) -> None:
        """The buffers scratch_like() returned are someone else's for good (apply(need_restore=False)
        left the model's parameters on them): make new ones when next needed."""
        if self.spares_shared:
            self._spares, self.spares_shared = None, False
        self._scratch = None
        self._lent = None


def _fits(buffers, tensors):
    """Whether `buffers` can stand in for `tensors`: one each, of the same shape, dtype and place."""
    return len(buffers) == len(tensors) and all(
        b.shape == t.shape and b.dtype == t.dtype and _compat.same_place(b.place, t.place)
        for b, t in zip(buffers, tensors))
