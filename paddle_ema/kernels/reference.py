"""The plain implementation of the kernels: Paddle's built-in ops, one tensor at a time.

It is also the fallback when the fused extension cannot be built. `lerp_` writes the update as
subtract, in-place scale and in-place add: the same a + w * (x - a), rounded step by step exactly
as `paddle.lerp_` does (w rounded to the average's dtype), so a constant stays constant and the
numbers equal lerp_'s, but faster on CPU, where lerp_'s broadcasting kernel is slow (measured in
docs/performance.md, "Why the kernels are written as they are"). `scale_add_` and `sub_scale_sub_`
are the suites' own op sequences, so they round as the suites do by construction.
"""

from typing import Any, Optional, Sequence

import numpy as np
import paddle

from .. import _compat

__all__ = ["lerp_", "scale_add_", "sub_scale_sub_", "ppdet_update_", "update_", "copy_", "cast", "first_nonfinite",
           "check_shapes"]

_WIDE = (paddle.float32, paddle.float64)
_HALF = (paddle.float16, paddle.bfloat16)
_FLOAT_NAMES = {"float16": paddle.float16, "bfloat16": paddle.bfloat16, "float32": paddle.float32,
                "float64": paddle.float64}


def _bfloat16_bits(values):
    """float32 -> bfloat16 rounded to nearest, ties to even, as uint16 bits; every NaN becomes
    0x7fff, the NaN Paddle's own bfloat16 cast writes."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FFF), rounded)


def cast(source: paddle.Tensor, dtype: Any) -> paddle.Tensor:
    """`source.astype(dtype)`, except that float32/float64 -> float16/bfloat16 on the CPU rounds to
    nearest, ties to even, on every Paddle version: Paddle 3.0 and 3.1 round toward zero there,
    3.2 and later (and every GPU cast) to nearest-even, so apply() would differ by a step.

    Args:
        source: the tensor to cast.
        dtype: a Paddle dtype or its name, e.g. 'bfloat16'.

    Returns:
        A tensor of `dtype` on source's place (`source` itself when astype returns it).
    """
    dtype = _FLOAT_NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype  # other names: astype's
    if source.dtype == dtype or source.dtype not in _WIDE or dtype not in _HALF or not source.place.is_cpu_place():
        return source.astype(dtype)
    values = source.numpy()
    if dtype == paddle.float16:
        with np.errstate(over="ignore"):  # beyond float16's range is inf, as in Paddle's cast
            narrow = values.astype(np.float16)  # numpy's cast is IEEE round-to-nearest-even
    else:  # Paddle holds bfloat16 as uint16 in numpy and reads uint16 arrays back as bfloat16
        narrow = _bfloat16_bits(values.astype(np.float32))
    result = paddle.to_tensor(narrow, place=source.place)
    assert result.dtype == dtype, (result.dtype, dtype)
    return result


def _as(source, like):
    """`source` in `like`'s dtype and place, converting only what differs."""
    if source.dtype != like.dtype:
        source = cast(source, like.dtype)
    if not _compat.same_place(source.place, like.place):
        source = _compat.copy_to_place(source, like.place)
    return source


def check_shapes(op: str, firsts: Sequence[paddle.Tensor], seconds: Sequence[paddle.Tensor], first: str,
                 second: str) -> None:
    """ValueError naming the first pair whose shapes differ, before anything is written: the
    kernels never broadcast or reshape (the fused extension refuses the same pairs, same text).

    Args:
        op: the kernel's name, as the message shows it.
        firsts: the tensors written (averages, targets).
        seconds: one per tensor written.
        first: what a written tensor is called, e.g. 'an average'.
        second: what its partner is called, e.g. 'a value'.
    """
    for index, (a, b) in enumerate(zip(firsts, seconds, strict=True)):
        if a.shape != b.shape:
            raise ValueError(f"paddle_ema {op}: pair {index} has {first} of shape {list(a.shape)} and {second} of "
                             f"shape {list(b.shape)}; the shapes must be equal (nothing was changed)")


@paddle.no_grad()
def lerp_(averages: Sequence[paddle.Tensor], values: Sequence[paddle.Tensor], weight: float) -> None:
    """averages[i] <- averages[i] + weight * (values[i] - averages[i]), in place, one tensor at a time.

    Args:
        averages: the float32/float64 averages, updated in place.
        values: one per average; cast to its dtype and moved to its place when they differ.
        weight: the update's weight, 1 - decay.
    """
    # Not Tensor.lerp_: with a Python float weight it leaks memory on every call and is slower
    # than this (docs/performance.md, "Why the kernels are written as they are"). The scale's bias
    # is -0.0, not scale's default 0.0: x * w + (-0) keeps the sign of a zero product, as lerp does
    # (a -0 average stays -0 when w * (x - a) underflows).
    check_shapes("lerp_", averages, values, "an average", "a value")
    for average, value in zip(averages, values, strict=True):
        average.add_(paddle.subtract(_as(value, average), average).scale_(weight, bias=-0.0))


@paddle.no_grad()
def copy_(targets: Sequence[paddle.Tensor], sources: Sequence[paddle.Tensor]) -> None:
    """targets[i] <- sources[i], in place, cast to the target's dtype (as `cast`) and place.

    Args:
        targets: the tensors written.
        sources: one per target.
    """
    check_shapes("copy_", targets, sources, "a target", "a source")
    for target, source in zip(targets, sources, strict=True):
        target.copy_(_as(source, target), False)


@paddle.no_grad()
def first_nonfinite(tensors: Sequence[paddle.Tensor]) -> Optional[int]:
    """The first tensor holding NaN or Inf, with one host sync for the whole list.

    Args:
        tensors: the tensors to check; empty ones are finite.

    Returns:
        Its index, or None when every tensor is finite.
    """
    # Empty tensors are finite; Paddle 2.6's all() refuses them.
    checked = [i for i, t in enumerate(tensors) if t.size > 0]
    if not checked:
        return None
    finite = paddle.stack([paddle.isfinite(tensors[i]).all() for i in checked]).numpy()
    return None if finite.all() else checked[int(finite.argmin())]


@paddle.no_grad()
def scale_add_(averages: Sequence[paddle.Tensor], values: Sequence[paddle.Tensor], decay: float,
               weight: float) -> None:
    """a <- decay * a + weight * x in place with exactly the ops the suites run: `scale` (the factor
    rounded to a's dtype, then + 0.0, which makes -0 products +0) twice and `add`.

    Args:
        averages: the averages, updated in place.
        values: one per average, cast to its dtype and place when they differ.
        decay: the factor of the average.
        weight: the factor of the value.
    """
    check_shapes("scale_add_", averages, values, "an average", "a value")
    for average, value in zip(averages, values, strict=True):
        average.scale_(decay).add_(_as(value, average).scale(weight))


# The name PaddleDetection's drop-in was written against.
ppdet_update_ = scale_add_


@paddle.no_grad()
def sub_scale_sub_(averages: Sequence[paddle.Tensor], values: Sequence[paddle.Tensor], weight: float) -> None:
    """a <- a - weight * (a - x) in place with exactly the ops ppdiffusers' EMAModel runs:
    `subtract`, `scale` (the factor rounded to a's dtype, + 0.0) and `subtract`.

    Args:
        averages: the averages, updated in place.
        values: one per average, cast to its dtype and place when they differ.
        weight: the update's weight, 1 - decay.
    """
    check_shapes("sub_scale_sub_", averages, values, "an average", "a value")
    for average, value in zip(averages, values, strict=True):
        average.subtract_(paddle.subtract(average, _as(value, average)).scale_(weight))


def update_(formula: str, averages: Sequence[paddle.Tensor], values: Sequence[paddle.Tensor], decay: float,
            weight: float) -> None:
    """One of the formulas by name, as the fused kernels name them.

    Args:
        formula: 'lerp', 'scale_add' or 'sub_scale_sub'.
        averages: the averages, updated in place.
        values: one per average.
        decay: the factor of the average (scale_add; ignored by the others).
        weight: the update's weight.
    """
    if formula == "lerp":
        lerp_(averages, values, weight)
    elif formula == "scale_add":
        scale_add_(averages, values, decay, weight)
    elif formula == "sub_scale_sub":
        sub_scale_sub_(averages, values, weight)
    else:
        raise ValueError(f"unknown formula {formula!r}")
