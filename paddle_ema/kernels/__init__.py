"""Multi-tensor kernels behind every average: one call updates or copies a whole list of tensors.

    lerp_(averages, values, weight)   averages[i] += weight * (values[i] - averages[i]), in place
    copy_(targets, sources)           targets[i] <- sources[i], cast to the target's dtype and place

`averages` are the float32 (or float64) shadows; `values` may be float16/bfloat16 weights, or live
on another device, and are cast on the way in. The reference implementation here uses Paddle's
own in-place ops tensor by tensor; a fused implementation can replace it without changing callers.
"""

from .reference import copy_, lerp_

__all__ = ["lerp_", "copy_"]
