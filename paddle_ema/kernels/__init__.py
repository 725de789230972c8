"""Multi-tensor kernels behind every average: one call updates or copies a whole list of tensors.

    lerp_(averages, values, weight)   averages[i] += weight * (values[i] - averages[i]), in place
    copy_(targets, sources)           targets[i] <- sources[i], cast to the target's dtype and place
    all_finite(tensors)               True when no tensor holds NaN or Inf
    first_nonfinite(tensors)          index of the first tensor that does, or None

`averages` are the float32 (or float64) shadows; `values` may be float16/bfloat16 weights, or live
on another device, and are cast on the way in. The reference implementation here uses Paddle's
own in-place ops tensor by tensor; a fused implementation can replace it without changing callers.
"""

from . import reference
from .reference import all_finite, copy_, first_nonfinite

__all__ = ["lerp_", "copy_", "all_finite", "first_nonfinite"]


def lerp_(averages, values, weight):
    weight = float(weight)
    if weight == 0.0:
        return
    if weight == 1.0:
        # avg + 1 * (x - avg) is not x in float arithmetic; a weight of 1 means "take x".
        copy_(averages, values)
        return
    reference.lerp_(averages, values, weight)
