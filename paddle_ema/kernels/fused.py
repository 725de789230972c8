"""The fused implementation of the kernels: the C++/CUDA extension updates a whole list in one call.

`lerp_` hands every (average, value) pair to one call of the `paddle_ema_lerp_dygraph` operator
(the static EMA uses `paddle_ema_lerp_by_tensor`, declared in place with the weight a tensor), which
updates all pairs it supports in a single multi-threaded pass (CPU) or one launch per device
(GPU): float32 averages with float32/float16/bfloat16 values and float64 with float64, both
tensors on one device. It returns the indices of any other pair (an average kept on another
device than its weight, an unusual dtype), which the reference implementation then updates, so
every input gets the same numbers either way.

The extension is built on first use (see build.py). `available()` says whether it could be; when
it cannot, one warning says why and `lerp_` must not be called.
"""

import os
import threading
import warnings

import paddle
from paddle import _C_ops

from ..errors import ConfigError
from . import build, reference

__all__ = ["available", "failure", "lerp_", "first_nonfinite", "stream_add_", "num_threads", "THREADS_ENV"]

THREADS_ENV = "PADDLE_EMA_NUM_THREADS"

_lock = threading.Lock()
_state = {"loaded": False, "failure": None}


def _load():
    with _lock:
        if _state["loaded"] or _state["failure"] is not None:
            return
        try:
            build.load_extension()
            _state["loaded"] = True
        except build.BuildError as exc:
            _state["failure"] = str(exc)
            warnings.warn(
                f"paddle_ema: the fused EMA kernel is unavailable, so EMA updates use Paddle's built-in "
                f"ops (same numbers, slower). Reason: {exc}",
                RuntimeWarning,
                stacklevel=4,
            )


def available():
    """True when the extension is built and loaded (building it now if needed)."""
    if not _state["loaded"] and _state["failure"] is None:
        _load()
    return _state["loaded"]


def failure():
    """Why the extension is unavailable, or None."""
    _load()
    return _state["failure"]


def num_threads():
    """CPU threads of one update: $PADDLE_EMA_NUM_THREADS, else every CPU this process may use.

    Not OpenMP's default: Paddle sets OMP_NUM_THREADS=1 at import when it is unset, and the
    update, bound by memory bandwidth, needs several cores to reach it on most servers.
    """
    text = os.environ.get(THREADS_ENV)
    if text is None or not text.strip():
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        threads = int(text)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ConfigError(f"${THREADS_ENV} must be a whole number >= 1, got {text!r}")
    return threads


@paddle.no_grad()
def lerp_(averages, values, weight):
    if len(averages) != len(values):
        raise ValueError(f"lerp_ needs one value per average, got {len(averages)} averages and {len(values)} values")
    if not averages:
        return
    if not _state["loaded"] and not available():
        raise RuntimeError(f"the fused EMA kernel is unavailable: {_state['failure']}")
    averages, values = list(averages), list(values)
    # Paddle gives a custom operator a contiguous copy of a strided tensor: the update of a
    # strided average would be lost there, so those take the reference path.
    strided = [i for i, average in enumerate(averages) if not average.is_contiguous()]
    if strided:
        reference.lerp_([averages[i] for i in strided], [values[i] for i in strided], weight)
        keep = sorted(set(range(len(averages))) - set(strided))
        averages, values = [averages[i] for i in keep], [values[i] for i in keep]
    (skipped,) = _C_ops._run_custom_op("paddle_ema_lerp_dygraph", averages, values, float(weight), num_threads())
    if skipped.shape[0]:
        indices = skipped.tolist()
        reference.lerp_([averages[i] for i in indices], [values[i] for i in indices], weight)


@paddle.no_grad()
def first_nonfinite(tensors):
    """Index of the first tensor holding NaN or Inf, or None: one multi-threaded read of all of them."""
    if not tensors:
        return None
    if not _state["loaded"] and not available():
        raise RuntimeError(f"the fused EMA kernel is unavailable: {_state['failure']}")
    tensors = list(tensors)
    first, skipped = _C_ops._run_custom_op("paddle_ema_first_nonfinite", tensors, num_threads())
    found = [int(first.item())] if int(first.item()) >= 0 else []
    if skipped.shape[0]:  # tensors not on the CPU: Paddle's own ops check them
        indices = skipped.tolist()
        other = reference.first_nonfinite([tensors[i] for i in indices])
        if other is not None:
            found.append(indices[other])
    return min(found) if found else None


@paddle.no_grad()
def stream_add_(a, x):
    """a += x over one flat float32 CPU buffer, multi-threaded like lerp_: the benchmarks' memory floor."""
    if not _state["loaded"] and not available():
        raise RuntimeError(f"the fused EMA kernel is unavailable: {_state['failure']}")
    _C_ops._run_custom_op("paddle_ema_stream_add", a, x, num_threads())
