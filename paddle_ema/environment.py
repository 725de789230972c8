"""The environment variables paddle_ema reads, each parsed and checked here, once.

A value that is not allowed is one ConfigError naming the variable and what it may hold; the tools
check every variable before they start (`check`), so a typo fails in the first second, not
after an epoch.
"""

import os
from typing import Optional

from .errors import ConfigError

__all__ = ["KERNEL", "NUM_THREADS", "MAX_THREADS", "FAULT_SAVE_DELAY", "MAX_SAVE_DELAY_S", "REBUILD", "CACHE_DIR",
           "ALLOWED", "parse_threads", "save_delay", "rebuild_requested", "check"]

KERNEL = "PADDLE_EMA_KERNEL"
NUM_THREADS = "PADDLE_EMA_NUM_THREADS"
# Fault injection for the crash tests: seconds to pause after each file of a checkpoint, so that a
# test can kill the process while a checkpoint is half written. Unset in normal use.
FAULT_SAVE_DELAY = "PADDLE_EMA_FAULT_SAVE_DELAY"
REBUILD = "PADDLE_EMA_REBUILD"
CACHE_DIR = "PADDLE_EMA_CACHE_DIR"
MAX_THREADS = 1024  # far above any CPU's cores; bounds what reaches OpenMP's C int
MAX_SAVE_DELAY_S = 3600.0

ALLOWED = {
    KERNEL: "auto, fused or reference",
    NUM_THREADS: f"a whole number from 1 to {MAX_THREADS}",
    FAULT_SAVE_DELAY: f"seconds, a number from 0 to {MAX_SAVE_DELAY_S:g}",
    REBUILD: "0 or 1",
    CACHE_DIR: "a folder (or a path where one can be made)",
}


def _refuse(name, text):
    shown = repr(text) if len(text) <= 40 else repr(text[:37]) + "..."
    return ConfigError(f"${name} must be {ALLOWED[name]}, got {shown}")


def parse_threads(text: Optional[str]) -> Optional[int]:
    """$PADDLE_EMA_NUM_THREADS's value.

    Args:
        text: the variable's text, or None when unset.

    Returns:
        The thread count, or None when the variable is unset or blank.
    """
    if text is None or not text.strip():
        return None
    digits = text.strip()
    if not (digits.isascii() and digits.isdigit()) or not 1 <= int(digits) <= MAX_THREADS:
        raise _refuse(NUM_THREADS, text)
    return int(digits)


def save_delay() -> float:
    """$PADDLE_EMA_FAULT_SAVE_DELAY's pause after each checkpoint file.

    Returns:
        Seconds; 0.0 when unset.
    """
    text = os.environ.get(FAULT_SAVE_DELAY, "")
    if not text.strip():
        return 0.0
    try:
        seconds = float(text)
    except ValueError:
        raise _refuse(FAULT_SAVE_DELAY, text) from None
    if not 0.0 <= seconds <= MAX_SAVE_DELAY_S:  # NaN fails too
        raise _refuse(FAULT_SAVE_DELAY, text)
    return seconds


def rebuild_requested() -> bool:
    """Whether $PADDLE_EMA_REBUILD asks to ignore a remembered build failure.

    Returns:
        True for 1, False when unset, empty or 0.
    """
    text = os.environ.get(REBUILD, "").strip()
    if text not in ("", "0", "1"):
        raise _refuse(REBUILD, os.environ[REBUILD])
    return text == "1"


def _check_kernel():
    text = os.environ.get(KERNEL, "")
    if text.strip().lower() not in ("", "auto", "fused", "reference"):
        raise _refuse(KERNEL, text)


def _check_cache_dir():
    text = os.environ.get(CACHE_DIR)
    if text is None or not text:
        return
    path = os.path.expanduser(text)
    if os.path.exists(path) and not os.path.isdir(path):
        raise _refuse(CACHE_DIR, text)


def check() -> None:
    """Every variable this package reads, checked: ConfigError naming the first that is not allowed."""
    _check_kernel()
    parse_threads(os.environ.get(NUM_THREADS))
    save_delay()
    rebuild_requested()
    _check_cache_dir()
