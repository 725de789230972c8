"""Typed exceptions: one clear message naming what is wrong and what is allowed."""


class PaddleEMAError(Exception):
    """Base class of every error raised by paddle_ema."""


class ConfigError(PaddleEMAError, ValueError):
    """An option or setting has a value that is not allowed."""


class SelectionError(ConfigError):
    """A parameter-selection option (an exclude pattern, say) matched nothing."""


class IncompatibleStateError(PaddleEMAError, ValueError):
    """A state dict does not fit this EMA (other names, shapes or settings)."""


class EMAStateError(PaddleEMAError, RuntimeError):
    """A call that does not fit the EMA's current state (restore() without apply())."""


class NonFiniteError(PaddleEMAError, FloatingPointError):
    """The weights hold NaN or Inf and the EMA was told to raise (nonfinite='raise')."""


class CheckpointError(PaddleEMAError, ValueError):
    """A checkpoint is missing, incomplete (the run stopped while writing it), truncated or corrupted."""
