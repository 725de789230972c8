"""paddle_ema: exponential moving averages of PaddlePaddle model weights.

    from paddle_ema import ExponentialMovingAverage
    ema = ExponentialMovingAverage(model, decay=0.9998)
    ...  # after each optimizer.step():
    ema.update()
    with ema.apply():
        evaluate(model)
"""

from ._require import require_paddle

require_paddle()

from .averaging import EMARule  # noqa: E402
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
from .ppdet import ModelEMA  # noqa: E402
from .schedules import SCHEDULES, Schedule, make_schedule, register_schedule  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ExponentialMovingAverage",
    "StochasticWeightAveraging",
    "ModelEMA",
    "EMARule",
    "Schedule",
    "SCHEDULES",
    "make_schedule",
    "register_schedule",
    "PaddleEMAError",
    "ConfigError",
    "SelectionError",
    "IncompatibleStateError",
    "EMAStateError",
    "NonFiniteError",
    "CheckpointError",
]
