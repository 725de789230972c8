"""Multi-tensor kernels behind every average: one call updates or copies a whole list of tensors.

    lerp_(averages, values, weight)   averages[i] += weight * (values[i] - averages[i]), in place
    copy_(targets, sources)           targets[i] <- sources[i], cast to the target's dtype and place
    first_nonfinite(tensors)          index of the first tensor that does, or None

`averages` are the float32 (or float64) shadows; `values` may be float16/bfloat16 weights, or live
on another device, and are cast on the way in. The two tensors of a pair must have one shape:
every kernel refuses a pair of other shapes, the same size in another shape included, with one
ValueError naming the pair, before it writes anything; nothing is broadcast or reshaped.

Two implementations give the same numbers (paddle.lerp_'s rounding): `fused` (fused.py), a C++
OpenMP / CUDA operator compiled on first use that updates every tensor in one call at memory
speed, and `reference` (reference.py), Paddle's built-in ops tensor by tensor. Which one runs:

    PADDLE_EMA_KERNEL=auto       fused when it can be built, else reference with one warning (default)
    PADDLE_EMA_KERNEL=fused      fused, or an error saying why it cannot be built
    PADDLE_EMA_KERNEL=reference  reference, never compiles anything

`set_kernel(mode)` does the same from Python and wins over the variable; `set_kernel(None)`
returns to the variable. `copy_` (apply/restore, not per step) always uses the reference ops,
which round float32 -> float16/bfloat16 to nearest-even themselves on the CPU (`cast`), since
Paddle 3.0 and 3.1 truncate there: the same bits on every Paddle version.

`prepare()` builds or loads the extension now (the EMA constructors call it, so that a first
build happens before training, with one line saying so); `python -m paddle_ema.kernels` does it
ahead of time and says where the cache is and which kernel runs.
"""

import os
import sys
import warnings
from typing import TYPE_CHECKING, Optional, Sequence

from ..errors import ConfigError
from . import fused, reference
from .reference import cast, copy_

if TYPE_CHECKING:  # for the annotations only (the implementations import paddle themselves)
    import paddle

__all__ = ["lerp_", "copy_", "cast", "first_nonfinite", "ppdet_update_", "set_kernel", "kernel_mode", "active_kernel",
           "prepare", "KERNEL_MODES", "KERNEL_ENV"]

KERNEL_ENV = "PADDLE_EMA_KERNEL"
KERNEL_MODES = ("auto", "fused", "reference")
_forced = None


def _check_mode(mode, where):
    if mode not in KERNEL_MODES:
        raise ConfigError(f"{where} must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")
    return mode


def set_kernel(mode: Optional[str]) -> None:
    """Force the implementation of lerp_; it wins over $PADDLE_EMA_KERNEL.

    Args:
        mode: 'auto', 'fused', 'reference', or None to return to $PADDLE_EMA_KERNEL.
    """
    global _forced
    _forced = None if mode is None else _check_mode(mode, "set_kernel(mode)")


def kernel_mode() -> str:
    """The mode in force; ConfigError when $PADDLE_EMA_KERNEL holds another word.

    Returns:
        set_kernel's mode, else $PADDLE_EMA_KERNEL's, else 'auto'.
    """
    if _forced is not None:
        return _forced
    value = os.environ.get(KERNEL_ENV, "").strip().lower() or "auto"
    return _check_mode(value, f"${KERNEL_ENV}")


def _warn_fallback(message):
    """One RuntimeWarning attributed to the first frame outside paddle_ema: the user's call."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, RuntimeWarning, stacklevel=level)


def active_kernel() -> str:
    """What lerp_ runs now, building the extension if the mode allows it. Mode 'fused' without the
    extension raises ConfigError; 'auto' without it warns once.

    Returns:
        'fused' or 'reference'.
    """
    mode = kernel_mode()
    if mode == "reference":
        return "reference"
    if fused.available():
        return "fused"
    if mode == "fused":
        raise ConfigError(
            f"the fused EMA kernel was requested ({KERNEL_ENV}=fused or set_kernel('fused')) but it "
            f"cannot be built: {fused.failure()}. Use 'auto' or 'reference' to run without it."
        )
    if not fused._state.get("warned"):
        fused._state["warned"] = True
        _warn_fallback(
            f"paddle_ema: the fused EMA kernel is unavailable, so EMA updates use Paddle's built-in "
            f"ops (same numbers, slower). Reason: {fused.failure()}"
        )
    return "reference"


def prepare() -> str:
    """Builds or loads the fused extension now, as the mode in force allows. A first build prints
    one line before compiling; a failure warns once ('auto') or raises ConfigError ('fused').
    Cheap after the first call.

    Returns:
        `active_kernel()`: 'fused' or 'reference'.
    """
    return active_kernel()


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


def ppdet_update_(averages: Sequence["paddle.Tensor"], values: Sequence["paddle.Tensor"], decay: float,
                  weight: float) -> None:
    """averages[i] <- (decay * averages[i] + 0) + (weight * values[i] + 0), in place, rounded as
    Paddle's `scale` and `add` ops round PaddleDetection's `decay * v + (1 - decay) * x`: each
    factor to the average's dtype, each product and the sum on its own. No shortcut for a weight
    of 0 or 1: the arithmetic is done as written.

    Args:
        averages: the averages, updated in place.
        values: one per average.
        decay: the factor of the average.
        weight: the factor of the value, passed, not derived: PaddleDetection's is 1 - decay in
            float64, which is not 1 - float32(decay).
    """
    decay, weight = float(decay), float(weight)
    if active_kernel() == "fused":
        fused.ppdet_update_(averages, values, decay, weight)
    else:
        reference.ppdet_update_(averages, values, decay, weight)
