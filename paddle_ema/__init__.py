"""paddle_ema: exponential moving averages of PaddlePaddle model weights.

    from paddle_ema import ExponentialMovingAverage
    ema = ExponentialMovingAverage(model, decay=0.9998)
    ...  # after each optimizer.step():
    ema.update()
    with ema.apply():
        evaluate(model)

Checkpoint files are read with `paddle_ema.safe_load`, paddle.load without running any code a file holds.

The static-graph EMA is `paddle_ema.static.ExponentialMovingAverage`; `static`, `EMACallback` and
`PostHocEMA` are loaded on first use (PEP 562), so importing the package does not build them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._require import require_paddle

require_paddle()

from . import _aliases  # noqa: E402
from .batchnorm import update_bn  # noqa: E402
from .core import averaging, schedules, selection, step_policy  # noqa: E402
from .core.averaging import EMARule  # noqa: E402
from .core.schedules import SCHEDULES, Schedule, make_schedule, register_schedule  # noqa: E402
from .dropin import ppdet  # noqa: E402
from .dropin.ppdet import ModelEMA, SimpleModelEMA  # noqa: E402
from .dygraph import ExponentialMovingAverage, StochasticWeightAveraging  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    EMAStateError,
    IncompatibleStateError,
    NonFiniteError,
    PaddleEMAError,
    SelectionError,
)
from .infra import checkpoint, program_ops, restricted_pickle, sharding  # noqa: E402
from .infra.checkpoint import safe_load  # noqa: E402

# The modules' paths before the package had core/, infra/ and dropin/: the same module objects.
_aliases.register(__name__, averaging=averaging, schedules=schedules, selection=selection, step_policy=step_policy,
                  checkpoint=checkpoint, program_ops=program_ops, restricted_pickle=restricted_pickle,
                  sharding=sharding, ppdet=ppdet)

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from . import static
    from .callbacks import EMACallback
    from .posthoc import PostHocEMA

__version__: str = "0.1.0"

# name -> (module, attribute or None for the module itself), imported on first access
_LAZY: dict[str, tuple[str, str | None]] = {
    "static": (".static", None),
    "EMACallback": (".callbacks", "EMACallback"),
    "PostHocEMA": (".posthoc", "PostHocEMA"),
}

__all__: list[str] = [
    "ExponentialMovingAverage",
    "StochasticWeightAveraging",
    "ModelEMA",
    "SimpleModelEMA",
    "EMARule",
    "Schedule",
    "SCHEDULES",
    "make_schedule",
    "register_schedule",
    "update_bn",
    "safe_load",
    "static",
    "EMACallback",
    "PostHocEMA",
    "PaddleEMAError",
    "ConfigError",
    "SelectionError",
    "IncompatibleStateError",
    "EMAStateError",
    "NonFiniteError",
    "CheckpointError",
]

def __getattr__(name: str) -> Any:
    """Import a lazily exported name (`static`, `EMACallback`, `PostHocEMA`) on first access."""
    if name in _LAZY:
        module_name, attribute = _LAZY[name]
        module = importlib.import_module(module_name, __name__)
        value = module if attribute is None else getattr(module, attribute)
        globals()[name] = value  # later accesses skip this function
        return value
    raise AttributeError(f"module 'paddle_ema' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
