"""How many CPU threads one update of the fused kernels runs on.

Not OpenMP's default: Paddle sets OMP_NUM_THREADS=1 at import when it is unset, and the update,
bound by memory bandwidth, needs several cores to reach it on most servers. So every extension
call is given `num_threads()`: $PADDLE_EMA_NUM_THREADS, else every CPU this process may use.
"""

import os
import time
from typing import Optional

from .. import _compat, environment

__all__ = ["num_threads", "environment_text", "THREADS_ENV"]

THREADS_ENV = environment.NUM_THREADS

read_environment = _compat.environment_reader()

# num_threads() runs on every update: it keeps its answer for the same $PADDLE_EMA_NUM_THREADS
# text and re-reads the CPU affinity (a system call) at most every _AFFINITY_TTL_S seconds, so a
# changed variable takes effect at once and a changed affinity (taskset) within a second.
_AFFINITY_TTL_S = 1.0
_cache = {"text": None, "threads": None, "until": 0.0}


def environment_text() -> Optional[str]:
    """$PADDLE_EMA_NUM_THREADS as it is set now.

    Returns:
        Its raw text, or None when unset.
    """
    return read_environment(THREADS_ENV)


def num_threads() -> int:
    """CPU threads of one update.

    Returns:
        $PADDLE_EMA_NUM_THREADS (ConfigError unless a whole number from 1 to 1024), else every
        CPU this process may use.
    """
    text = read_environment(THREADS_ENV)
    cache = _cache
    if text == cache["text"] and cache["threads"] is not None:
        if text is not None or time.monotonic() < cache["until"]:
            return cache["threads"]
    threads = _threads_from(text)
    cache.update(text=text, threads=threads, until=time.monotonic() + _AFFINITY_TTL_S)
    return threads


def _threads_from(text):
    threads = environment.parse_threads(text)
    if threads is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return threads
