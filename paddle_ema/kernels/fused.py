"""The fused implementation of the kernels: the C++/CUDA extension updates a whole list in one call.

`lerp_`, `scale_add_` and `sub_scale_sub_` hand every (average, value) pair to one call of the
extension (ema_python.cc), which updates all pairs it supports in a single multi-threaded pass
(CPU) or one launch per device (GPU): float32 averages with float32/float16/bfloat16 values and
float64 with float64, both tensors on one device, contiguous (and on a GPU, float16/bfloat16
averages with values of their dtype for the two suite formulas). It returns the indices of any
other pair (an average kept on another device than its weight, an unusual dtype, a strided
view), which the reference implementation then updates, so every input gets the same numbers
either way. Static programs use the library's operators instead (program_ops.fused_lerp_,
paddle_ema_lerp_by_tensor), which take the weight as a tensor.

Every function takes `threads`, the CPU threads of the call (None: `threads.num_threads()`).

The extension is built on first use (see build.py). `available()` says whether it could be; when
it cannot, `failure()` says why and `lerp_` must not be called.
"""

import threading
from typing import TYPE_CHECKING, Hashable, Optional, Sequence

from . import build, reference
from .threads import THREADS_ENV, num_threads

if TYPE_CHECKING:  # for the annotations only: build imports paddle when the extension is loaded
    import paddle

__all__ = ["available", "failure", "state_key", "runs_on_gpus", "update_", "lerp_", "scale_add_", "sub_scale_sub_", "ppdet_update_",
           "guarded_lerp_", "guarded_update_", "copy_", "first_nonfinite", "num_threads", "THREADS_ENV", "FORMULAS"]

# The formulas, by the name the kernels use (ema_segments.h's Formula, the module's FORMULA_* codes).
FORMULAS = ("lerp", "scale_add", "sub_scale_sub")

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


def available() -> bool:
    """Whether the extension is built and loaded, building it now if needed.

    Returns:
        True when it is loaded; False when it cannot be (then `failure()` says why).
    """
    if not _state["loaded"] and _state["failure"] is None:
        _load()
    return _state["loaded"]


def failure() -> Optional[str]:
    """Why the extension is unavailable.

    Returns:
        The build or load error's message, or None when it is loaded.
    """
    _load()
    return _state["failure"]


def runs_on_gpus() -> bool:
    """Whether the loaded extension has the CUDA kernel (a CUDA build of Paddle, nvcc at build time).

    Returns:
        True when GPU pairs are updated by the extension too.
    """
    return available() and build.with_cuda()


def state_key() -> Hashable:
    """What changes when the extension loads or its state is replaced (a new process state).

    Returns:
        A value that compares equal while neither happened.
    """
    state = _state
    return id(state), state["loaded"], state["failure"] is not None


def _module():
    if not _state["loaded"] and not available():
        raise RuntimeError(f"the fused EMA kernel is unavailable: {_state['failure']}")
    return _state["module"]


# The functions below call no Paddle op themselves (the extension writes through data pointers;
# the reference functions they fall back on have their own no_grad), so they go without
# paddle.no_grad(), whose context costs microseconds a call.


def _sequence(items):
    """A list or tuple as it is (what the extension takes), anything else as a new list."""
    return items if isinstance(items, (list, tuple)) else list(items)


def _pairs(op, averages, values):
    if len(averages) != len(values):
        raise ValueError(f"{op} needs one value per average, got {len(averages)} averages and {len(values)} values")
    return _sequence(averages), _sequence(values)


def update_(formula: str, averages: Sequence["paddle.Tensor"], values: Sequence["paddle.Tensor"], decay: float,
            weight: float, threads: Optional[int] = None) -> None:
    """One of the formulas by name in one call of the extension; the pairs it does not take (other
    dtypes or devices, strided views) go to the reference ops.

    Args:
        formula: 'lerp', 'scale_add' or 'sub_scale_sub'.
        averages: the averages, updated in place.
        values: one per average.
        decay: the factor of the average (scale_add; ignored by the others).
        weight: the update's weight.
        threads: CPU threads; None for `num_threads()`.
    """
    averages, values = _pairs(f"{formula}_", averages, values)
    if not averages:
        return
    module = _module()
    code = getattr(module, f"FORMULA_{formula.upper()}")
    skipped = module.update_(code, averages, values, float(decay), float(weight),
                             num_threads() if threads is None else threads)
    if skipped:  # strided views, other dtypes or devices: Paddle's own ops
        reference.update_(formula, [averages[i] for i in skipped], [values[i] for i in skipped], decay, weight)


def lerp_(averages: Sequence["paddle.Tensor"], values: Sequence["paddle.Tensor"], weight: float,
          threads: Optional[int] = None) -> None:
    """averages[i] += weight * (values[i] - averages[i]), in place, in one call of the extension.

    Pairs it does not take (other dtypes or devices, strided views) go to `reference.lerp_`.

    Args:
        averages: the float32/float64 averages, updated in place.
        values: one per average.
        weight: the update's weight, 1 - decay.
        threads: CPU threads; None for `num_threads()`.
    """
    update_("lerp", averages, values, 0.0, weight, threads)


def scale_add_(averages: Sequence["paddle.Tensor"], values: Sequence["paddle.Tensor"], decay: float, weight: float,
               threads: Optional[int] = None) -> None:
    """averages[i] <- (decay * averages[i] + 0) + (weight * values[i] + 0), in place, in one call of
    the extension, rounded as Paddle's `scale` and `add` ops round `decay * a + weight * x`.

    Args:
        averages: the averages, updated in place.
        values: one per average.
        decay: the factor of the average.
        weight: the factor of the value.
        threads: CPU threads; None for `num_threads()`.
    """
    update_("scale_add", averages, values, decay, weight, threads)


def sub_scale_sub_(averages: Sequence["paddle.Tensor"], values: Sequence["paddle.Tensor"], weight: float,
                   threads: Optional[int] = None) -> None:
    """averages[i] <- averages[i] - (weight * (averages[i] - values[i]) + 0), in place, in one call
    of the extension, rounded as Paddle's `subtract`, `scale` and `subtract` ops round it.

    Args:
        averages: the averages, updated in place.
        values: one per average.
        weight: the update's weight, 1 - decay.
        threads: CPU threads; None for `num_threads()`.
    """
    update_("sub_scale_sub", averages, values, 0.0, weight, threads)


# The name PaddleDetection's drop-in was written against.
ppdet_update_ = scale_add_


def first_nonfinite(tensors: Sequence["paddle.Tensor"], threads: Optional[int] = None) -> Optional[int]:
    """The first tensor holding NaN or Inf: one multi-threaded read of all of them.

    Args:
        tensors: the tensors to check.
        threads: CPU threads; None for `num_threads()`.

    Returns:
        Its index, or None when every tensor is finite.
    """
    if not tensors:
        return None
    tensors = list(tensors)
    first, unchecked = _module().first_nonfinite(tensors, num_threads() if threads is None else threads)
    found = [first] if first >= 0 else []
    if unchecked:  # tensors not on the CPU, or strided: Paddle's own ops check them
        other = reference.first_nonfinite([tensors[i] for i in unchecked])
        if other is not None:
            found.append(unchecked[other])
    return min(found) if found else None


def guarded_update_(formula: str, averages: Sequence["paddle.Tensor"], values: Sequence["paddle.Tensor"],
                    scan: Sequence["paddle.Tensor"], decay: float, weight: float,
                    threads: Optional[int] = None) -> Optional[int]:
    """`formula`'s update only when no tensor of `scan` holds NaN or Inf: one pass reads all of
    `scan`, a second updates in place, backwards, so that the values read last come from the cache
    (GuardedUpdateTensors, 16 bytes a float32 parameter). When some tensor of `scan` is not one the
    extension reads (another device, strided), the scan and the update run as two separate calls,
    with Paddle's ops for what the extension leaves out.

    Args:
        formula: 'lerp', 'scale_add' or 'sub_scale_sub'.
        averages: the averages, updated in place.
        values: one per average.
        scan: the weights whose finiteness decides (`values` among them, or others).
        decay: the factor of the average (scale_add; ignored by the others).
        weight: the update's weight.
        threads: CPU threads; None for `num_threads()`.

    Returns:
        The index in `scan` of the first non-finite tensor (the averages untouched), or None
        (the averages updated).
    """
    averages, values = _pairs(f"guarded_{formula}_", averages, values)
    scan = _sequence(scan)
    threads = num_threads() if threads is None else threads
    module = _module()
    code = getattr(module, f"FORMULA_{formula.upper()}")
    first, unchecked, skipped = module.guarded_update_(code, averages, values, scan, float(decay), float(weight),
                                                       threads)
    if unchecked:
        bad = first_nonfinite(scan, threads)
        if bad is not None:
            return bad
        update_(formula, averages, values, decay, weight, threads)
        return None
    if first >= 0:
        return first
    if skipped:
        reference.update_(formula, [averages[i] for i in skipped], [values[i] for i in skipped], decay, weight)
    return None


def guarded_lerp_(averages: Sequence["paddle.Tensor"], values: Sequence["paddle.Tensor"],
                  scan: Sequence["paddle.Tensor"], weight: float,
                  spares: Optional[Sequence["paddle.Tensor"]] = None, threads: Optional[int] = None) -> Optional[int]:
    """`lerp_` only when no tensor of `scan` holds NaN or Inf, in one call.

    With `spares` (CPU pairs): one pass reads each block of values once for the scan and the update
    together and writes the new averages into the spares; only when every weight was finite does
    each average take its spare's buffer and the spare the old one (GuardedLerpSwapTensors in
    ema_guard.cc): 12 bytes a parameter, as unguarded. The Tensor objects stay the same; only
    tensors that share an average's buffer (a `detach()`, `_share_buffer_to`) keep the old one.
    Without spares, or where they do not fit: `guarded_update_('lerp', ...)`.

    Args:
        averages: the averages, updated in place (or given their spares' buffers).
        values: one per average.
        scan: the weights whose finiteness decides (every weight, `values` among them).
        weight: the update's weight, 1 - decay.
        spares: None, or one buffer per average of its dtype and size (contents ignored); after
            an update each holds the average's previous buffer.
        threads: CPU threads; None for `num_threads()`.

    Returns:
        The index in `scan` of the first non-finite tensor (the averages untouched), or None
        (the averages updated).
    """
    averages, values = _pairs("lerp_", averages, values)
    scan = _sequence(scan)
    threads = num_threads() if threads is None else threads
    if spares is not None:
        first = _module().guarded_lerp_swap_(averages, values, scan, _sequence(spares), float(weight), threads)
        if first != -2:
            return None if first < 0 else first
    return guarded_update_("lerp", averages, values, scan, 0.0, weight, threads)


def copy_(targets: Sequence["paddle.Tensor"], sources: Sequence["paddle.Tensor"],
          threads: Optional[int] = None) -> None:
    """targets[i] <- sources[i]: same-dtype CPU pairs in one multi-threaded call, the rest (casts,
    other devices, strided views) with Paddle's copy.

    Args:
        targets: the tensors written.
        sources: one per target.
        threads: CPU threads; None for `num_threads()`.
    """
    targets, sources = list(targets), list(sources)
    if len(targets) != len(sources):
        raise ValueError(f"copy_ needs one source per target, got {len(targets)} targets and {len(sources)} sources")
    if not targets:
        return
    skipped = _module().copy_(targets, sources, num_threads() if threads is None else threads)
    if skipped:
        reference.copy_([targets[i] for i in skipped], [sources[i] for i in skipped])
