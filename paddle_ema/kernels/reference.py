"""The plain implementation of the kernels: Paddle's in-place ops, one tensor at a time."""

import paddle

__all__ = ["lerp_", "copy_"]


def _as(source, like):
    """`source` in `like`'s dtype and place, converting only what differs."""
    if source.dtype != like.dtype:
        source = source.astype(like.dtype)
    if not source.place._equals(like.place):
        source = source._copy_to(like.place, False)
    return source


@paddle.no_grad()
def lerp_(averages, values, weight):
    weight = float(weight)
    for average, value in zip(averages, values, strict=True):
        average.lerp_(_as(value, average), weight)


@paddle.no_grad()
def copy_(targets, sources):
    for target, source in zip(targets, sources, strict=True):
        target.copy_(_as(source, target), False)
