"""The fused implementation of the kernels: the C++/CUDA extension updates a whole list in one call.

`lerp_` hands every (average, value) pair to one call of the extension's `lerp_` (a Python function
of the compiled library, ema_python.cc), which updates all pairs it supports in a single
multi-threaded pass (CPU) or one launch per device (GPU): float32 averages with
float32/float16/bfloat16 values and float64 with float64, both tensors on one device, contiguous.
It returns the indices of any other pair (an average kept on another device than its weight, an
unusual dtype, a strided view), which the reference implementation then updates, so every input
gets the same numbers either way. Static programs use the library's operators instead
(program_ops.fused_lerp_, paddle_ema_lerp_by_tensor), which take the weight as a tensor.

The extension is built on first use (see build.py). `available()` says whether it could be; when
it cannot, `failure()` says why and `lerp_` must not be called.
"""

import os
import threading

import paddle

from ..errors import ConfigError
from . import build, reference

__all__ = ["available", "failure", "lerp_", "first_nonfinite", "stream_add_", "num_threads", "THREADS_ENV"]

THREADS_ENV = "PADDLE_EMA_NUM_THREADS"

_lock = threading.Lock()
_state = {"loaded": False, "failure": None, "module": None}


def _load():
    with _lock:
        if _state["loaded"] or _state["failure"] is not None:
            return
        try:
            _state["module"] = build.load_extension()
            _state["loaded"] = True
        except build.BuildError as exc:
            _state["failure"] = str(exc)  # kernels.active_kernel says it, once, in the mode in force


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


def _module():
    if not _state["loaded"] and not available():
        raise RuntimeError(f"the fused EMA kernel is unavailable: {_state['failure']}")
    return _state["module"]


@paddle.no_grad()
def lerp_(averages, values, weight):
    if len(averages) != len(values):
        raise ValueError(f"lerp_ needs one value per average, got {len(averages)} averages and {len(values)} values")
    if not averages:
        return
    averages, values = list(averages), list(values)
    skipped = _module().lerp_(averages, values, float(weight), num_threads())
    if skipped:  # strided views, other dtypes or devices: Paddle's own ops
        reference.lerp_([averages[i] for i in skipped], [values[i] for i in skipped], weight)


@paddle.no_grad()
def first_nonfinite(tensors):
    """Index of the first tensor holding NaN or Inf, or None: one multi-threaded read of all of them."""
    if not tensors:
        return None
    tensors = list(tensors)
    first, unchecked = _module().first_nonfinite(tensors, num_threads())
    found = [first] if first >= 0 else []
    if unchecked:  # tensors not on the CPU, or strided: Paddle's own ops check them
        other = reference.first_nonfinite([tensors[i] for i in unchecked])
        if other is not None:
            found.append(unchecked[other])
    return min(found) if found else None


@paddle.no_grad()
def stream_add_(a, x):
    """a += x over one flat float32 CPU buffer, multi-threaded like lerp_: the benchmarks' memory floor."""
    _module().stream_add_(a, x, num_threads())
