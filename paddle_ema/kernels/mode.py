"""Which implementation the kernels run: the fused extension or Paddle's own ops.

    PADDLE_EMA_KERNEL=auto       fused when it can be built, else reference with one warning (default)
    PADDLE_EMA_KERNEL=fused      fused, or an error saying why it cannot be built
    PADDLE_EMA_KERNEL=reference  reference, never compiles anything

`set_kernel(mode)` does the same from Python and wins over the variable; `set_kernel(None)`
returns to the variable. `key()` changes whenever either does, so that an average's Kernel,
which chooses once, chooses again at its next call.
"""

from typing import Hashable, Optional

from .. import _compat, environment
from ..core.validation import check_choice
from ..errors import ConfigError
from . import fused
from .threads import read_environment

__all__ = ["KERNEL_ENV", "KERNEL_MODES", "set_kernel", "kernel_mode", "active_kernel", "prepare", "key"]

KERNEL_ENV = environment.KERNEL
KERNEL_MODES = ("auto", "fused", "reference")
_forced = None
# The extension state the fallback warning was given for: once per process (per extension state).
_warned_for = None


def set_kernel(mode: Optional[str]) -> None:
    """Force the implementation of the kernels; it wins over $PADDLE_EMA_KERNEL.

    Args:
        mode: 'auto', 'fused', 'reference', or None to return to $PADDLE_EMA_KERNEL.
    """
    global _forced
    _forced = None if mode is None else check_choice("set_kernel(mode)", mode, KERNEL_MODES, ", ".join(KERNEL_MODES))


def kernel_mode() -> str:
    """The mode in force; ConfigError when $PADDLE_EMA_KERNEL holds another word.

    Returns:
        set_kernel's mode, else $PADDLE_EMA_KERNEL's, else 'auto'.
    """
    if _forced is not None:
        return _forced
    value = (read_environment(KERNEL_ENV) or "").strip().lower() or "auto"
    return check_choice(f"${KERNEL_ENV}", value, KERNEL_MODES, ", ".join(KERNEL_MODES))


def key() -> Hashable:
    """What the choice of `active_kernel()` depends on, cheap to read on every update.

    Returns:
        set_kernel's mode, the raw $PADDLE_EMA_KERNEL and the extension's `fused.state_key()`.
    """
    return _forced, read_environment(KERNEL_ENV), fused.state_key()


def active_kernel() -> str:
    """What the kernels run now, building the extension if the mode allows it. Mode 'fused' without
    the extension raises ConfigError; 'auto' without it warns once.

    Returns:
        'fused' or 'reference'.
    """
    global _warned_for
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
    if _warned_for != fused.state_key():
        _warned_for = fused.state_key()
        _compat.warn_at_caller(
            f"paddle_ema: the fused EMA kernel is unavailable, so EMA updates use Paddle's built-in "
            f"ops (same numbers, slower). Reason: {fused.failure()}", RuntimeWarning
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
