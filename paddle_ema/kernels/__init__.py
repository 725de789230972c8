"""Multi-tensor kernels behind every average: one call updates, copies or scans a whole list of tensors.

An average keeps a `Kernel` (kernel.py) bound to its tensors, chosen once; the module-level
functions are the same operations as one-shot calls:

    lerp_(averages, values, weight)              a <- a + w * (x - a)             paddle.lerp_'s rounding
    scale_add_(averages, values, decay, weight)  a <- (d * a + 0) + (w * x + 0)   the suites' scale, scale, add
    sub_scale_sub_(averages, values, weight)     a <- a - (w * (a - x) + 0)       ppdiffusers' subtract, scale, subtract
    copy_(targets, sources)                      targets[i] <- sources[i], cast to the target's dtype and place
    first_nonfinite(tensors)                     index of the first tensor holding NaN or Inf, or None

`averages` are float32 or float64 (on a GPU, scale_add_ and sub_scale_sub_ also take float16 and
bfloat16 averages: the model-dtype averages of some suites); `values` may be float16/bfloat16
weights, or live on another device, and are cast on the way in. The two tensors of a pair must
have one shape: every kernel refuses a pair of other shapes, the same size in another shape
included, with one ValueError naming the pair, before it writes anything; nothing is broadcast or
reshaped.

Two implementations give the same numbers: `fused` (fused.py), a C++ OpenMP / CUDA extension
compiled on first use that updates every tensor in one call at memory speed, and `reference`
(reference.py), Paddle's built-in ops tensor by tensor. Which one runs is `mode.py`'s
(PADDLE_EMA_KERNEL=auto|fused|reference, `set_kernel`). The module-level `copy_` always uses the
reference ops, which round float32 -> float16/bfloat16 to nearest-even themselves on the CPU
(`cast`), since Paddle 3.0 and 3.1 truncate there; a Kernel copies same-dtype CPU pairs with the
extension when it runs (the same bytes) and casts with the reference ops.

`prepare()` builds or loads the extension now (the EMA constructors call it, so that a first
build happens before training, with one line saying so); `python -m paddle_ema.kernels` does it
ahead of time and says where the cache is and which kernel runs.
"""

from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence

from . import fused, mode, reference, threads  # noqa: F401  (kernels.mode, kernels.threads)
from .kernel import Kernel
from .mode import KERNEL_ENV, KERNEL_MODES, active_kernel, kernel_mode, prepare, set_kernel
from .reference import cast, copy_

if TYPE_CHECKING:  # for the annotations only (the implementations import paddle themselves)
    import paddle

__all__ = ["Kernel", "lerp_", "scale_add_", "sub_scale_sub_", "ppdet_update_", "copy_", "cast", "first_nonfinite",
           "first_nonfinite_name", "set_kernel", "kernel_mode", "active_kernel", "prepare", "KERNEL_MODES", "KERNEL_ENV"]


def first_nonfinite(tensors: Sequence["paddle.Tensor"]) -> Optional[int]:
    """The first tensor holding NaN or Inf, found by the active kernel.

    Args:
        tensors: the tensors to check.

    Returns:
        Its index, or None when every tensor is finite.
    """
    if active_kernel() == "fused":
        return fused.first_nonfinite(tensors)
    return reference.first_nonfinite(tensors)


def first_nonfinite_name(named: Dict[str, Any]) -> Optional[str]:
    """The first name (in `named`'s order) whose Paddle tensor or numpy array holds NaN or Inf; the
    Paddle tensors are read in one multi-tensor scan (`first_nonfinite`).

    Args:
        named: {name: tensor or array}; entries of a non-floating dtype are finite.

    Returns:
        That name, or None.
    """
    import numpy as np
    import paddle

    order = list(named)
    tensors = [n for n in order if isinstance(named[n], paddle.Tensor) and paddle.is_floating_point(named[n])]
    bad = first_nonfinite([named[n] for n in tensors]) if tensors else None
    found = [tensors[bad]] if bad is not None else []
    found += [n for n in order if isinstance(named[n], np.ndarray) and named[n].dtype.kind == "f"
              and not np.isfinite(named[n]).all()]
    return min(found, key=order.index) if found else None


def lerp_(averages: Sequence["paddle.Tensor"], values: Sequence["paddle.Tensor"], weight: float) -> None:
    """averages[i] += weight * (values[i] - averages[i]), in place, with the active kernel.

    A weight of 0 leaves the averages as they are; 1 copies the values (`copy_`).

    Args:
        averages: the float32/float64 averages, updated in place.
        values: one per average; cast to its dtype and place when they differ.
        weight: the update's weight, 1 - decay.
    """
    weight = float(weight)
    if weight == 0.0:
        return
    if weight == 1.0:
        # avg + 1 * (x - avg) is not x in float arithmetic; a weight of 1 means "take x".
        copy_(averages, values)
        return
    if active_kernel() == "fused":
        fused.lerp_(averages, values, weight)
    else:
        reference.lerp_(averages, values, weight)


def scale_add_(averages: Sequence["paddle.Tensor"], values: Sequence["paddle.Tensor"], decay: float,
               weight: float) -> None:
    """averages[i] <- (decay * averages[i] + 0) + (weight * values[i] + 0), in place, rounded as
    Paddle's `scale` and `add` ops round the suites' `decay * v + (1 - decay) * x`: each factor to
    the average's dtype, each product and the sum on its own. No shortcut for a weight of 0 or 1:
    the arithmetic is done as written.

    Args:
        averages: the averages, updated in place.
        values: one per average.
        decay: the factor of the average.
        weight: the factor of the value, passed, not derived: PaddleDetection's is 1 - decay in
            float64, which is not 1 - float32(decay).
    """
    decay, weight = float(decay), float(weight)
    if active_kernel() == "fused":
        fused.scale_add_(averages, values, decay, weight)
    else:
        reference.scale_add_(averages, values, decay, weight)


# The name PaddleDetection's drop-in was written against.
ppdet_update_ = scale_add_


def sub_scale_sub_(averages: Sequence["paddle.Tensor"], values: Sequence["paddle.Tensor"], weight: float) -> None:
    """averages[i] <- averages[i] - (weight * (averages[i] - values[i]) + 0), in place, rounded as
    Paddle's `subtract`, `scale` and `subtract` ops round ppdiffusers' `s - w * (s - p)`. No
    shortcut for a weight of 0 or 1.

    Args:
        averages: the averages, updated in place.
        values: one per average.
        weight: the update's weight, 1 - decay.
    """
    weight = float(weight)
    if active_kernel() == "fused":
        fused.sub_scale_sub_(averages, values, weight)
    else:
        reference.sub_scale_sub_(averages, values, weight)
