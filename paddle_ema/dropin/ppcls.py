"""PaddleClas's EMA (ppcls/utils/ema.py, paddleclas 2.6.0), bit for bit: `ExponentialMovingAverage`.

    ema = ExponentialMovingAverage(model, decay=0.9999)
    ema.update(model)                   # after optimizer.step()
    evaluate(ema.module)                # PaddleClas's engine swaps self.model for ema.module

The same constructor, attributes and numbers as PaddleClas's class:
- `.module` is a deep copy of the model, in eval mode: the average itself. PaddleClas's engine
  evaluates it in place of the model, saves `ema.module.state_dict()` as `<prefix>.pdparams` (the
  raw weights as `<prefix>.pdema`), loads it back with `set_state_dict` on resume and exports it;
  the decay is constant, so that state is the whole EMA and its resume is exact.
- update(model) moves every entry of `module.state_dict()` (BatchNorm statistics, frozen weights
  and integer buffers too), zipped BY POSITION with `model.state_dict()`, to
  `decay * e + (1 - decay) * m` in the entry's dtype, rounded as Paddle's `scale` and `add` ops
  round PaddleClas's expression: each product and the sum on its own, `1 - decay` in float64
  (`kernels.scale_add_`, one fused multi-threaded call for the float32/float64 entries; every
  other entry runs PaddleClas's own ops, `paddle.assign(decay * e + (1 - decay) * m, e)`).
- set(model) copies the model's entries into the module (`paddle.assign(m, e)`), by position.

PaddleClas's quirks, kept:
- a tensor under two state-dict keys (a tied weight) is assigned once per key: twice a step, the
  second time from the value the first wrote (each key's occurrence is updated in order);
- an integer entry becomes float32 at the first update (`decay * e` promotes it and
  `paddle.assign` replaces the dtype); set() puts the integer back;
- under `paddle.amp.decorate(..., save_dtype=...)` (PaddleClas's engine calls it before it builds
  the EMA; with level 'O2' on a GPU it registers a state-dict hook on every sublayer), each
  `state_dict()` returns cast copies, the deep-copied module keeps the hooks, and the update writes
  into those copies: the EMA never moves. `use_hook=False` reads and updates the module's own
  tensors (`state_dict(use_hook=False)`, the model's too) and so turns the bug off; the
  arithmetic is then in the live tensors' dtype (float16 under AMP O2, which Paddle computes on a
  GPU only).

Beyond PaddleClas's class, changing no number of a run that works there: `nonfinite='skip'` /
`'raise'` (not the default) guard the update against NaN/Inf weights, and the update is one fused
call instead of three Paddle ops per entry.
"""

import copy
from typing import Any, Dict, List, Tuple

import paddle
from paddle import nn

from .. import kernels
from ..core.nonfinite import NonfiniteAttributes
from ._nonfinite import NonfiniteGuard

__all__ = ["ExponentialMovingAverage"]

# The pairs the fused update takes; others run PaddleClas's own ops (integer entries, which the
# expression promotes; float16/bfloat16 ones, whose add Paddle runs on GPUs only; mixed dtypes).
_FUSED_DTYPES = (paddle.float32, paddle.float64)


def _fusable(e, m):
    """Whether kernels.scale_add_ gives PaddleClas's numbers for this pair."""
    return e.dtype in _FUSED_DTYPES and m.dtype == e.dtype


def _memory(tensor):
    """What identifies the tensor's storage: two keys on one tensor give the same."""
    return tensor.data_ptr(), str(tensor.dtype), tuple(tensor.shape)


def _in_write_order(entries):
    """`entries` ((key, e, m), in state-dict order) split into rounds that each hold a tensor at
    most once: round k has every tensor's k-th key, so round after round writes a tied tensor in
    PaddleClas's order while each round's tensors are independent of each other."""
    seen: Dict[Any, int] = {}
    rounds: List[List[Tuple[str, paddle.Tensor, paddle.Tensor]]] = []
    for entry in entries:
        memory = _memory(entry[1])
        k = seen.get(memory, 0)
        seen[memory] = k + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(entry)
    return rounds


class ExponentialMovingAverage(NonfiniteAttributes):
    """PaddleClas's ExponentialMovingAverage: same constructor, attributes and numbers (see the
    module docstring).

    Args:
        model: the `paddle.nn.Layer` to average; `.module` is a deep copy of it.
        decay: the constant decay.
        nonfinite: (beyond PaddleClas's) 'update' (default, PaddleClas's behaviour): no check.
            'skip': an update that would read NaN or Inf from the model changes nothing, is counted
            in `num_nonfinite_skipped` and warned about; 'raise': NonFiniteError.
        use_hook: (beyond PaddleClas's) True (default): read `state_dict()` with its hooks, as
            PaddleClas does, so that under amp.decorate(save_dtype=...) hooks the EMA does not
            move. False: update the module's own tensors from the model's own.
    """

    def __init__(self, model: nn.Layer, decay: float = 0.9999, *, nonfinite: str = "update", use_hook: bool = True):
        self.nonfinite_policy = NonfiniteGuard(nonfinite, "ExponentialMovingAverage.update()")
        self.module = copy.deepcopy(model)
        self.module.eval()
        self.decay = decay
        self.use_hook = bool(use_hook)
        # Build (or load) the fused kernel now, with one line when it compiles, not inside the first update.
        kernels.prepare()

    def _entries(self, model):
        """(key, module entry, model entry), zipped by position as PaddleClas zips them."""
        mine = self.module.state_dict(use_hook=self.use_hook)
        theirs = model.state_dict(use_hook=self.use_hook)
        return [(key, e, m) for (key, e), m in zip(mine.items(), theirs.values())]

    @paddle.no_grad()
    def update(self, model: nn.Layer) -> None:
        """Move every module entry to decay * e + (1 - decay) * m (after optimizer.step()).

        Args:
            model: the trained model.
        """
        entries = self._entries(model)
        if not self.nonfinite_policy.allows({key: m for key, _, m in entries}):
            return
        decay, weight = self.decay, 1.0 - self.decay
        for entries_ in _in_write_order(entries):
            fused = [(e, m) for _, e, m in entries_ if _fusable(e, m)]
            # PaddleClas's expression for the rest, all computed before anything is written: where
            # Paddle has no kernel (float16 add on a CPU) it raises as PaddleClas's does, changing nothing.
            other = [(e, decay * e + weight * m) for _, e, m in entries_ if not _fusable(e, m)]
            kernels.scale_add_([e for e, _ in fused], [m for _, m in fused], decay, weight)
            for e, new in other:
                paddle.assign(new, e)

    @paddle.no_grad()
    def set(self, model: nn.Layer) -> None:
        """Copy the model's entries into the module, by position (PaddleClas's set()).

        Args:
            model: the model to copy.
        """
        for _, e, m in self._entries(model):
            paddle.assign(m, e)
