"""Loaded at start-up by every Python process that has this folder on PYTHONPATH (tests only).

With PADDLE_EMA_AUDIT_DIR and PADDLE_EMA_AUDIT_UNDER set, a process records every path under
PADDLE_EMA_AUDIT_UNDER that it opens for writing, renames onto or creates as a folder, one per
line, in <PADDLE_EMA_AUDIT_DIR>/writes.<PADDLE_TRAINER_ID>.txt (`writes.launcher.txt` for the
launcher itself). tests/test_tools_distributed.py reads it to show that only rank 0 writes.
"""

import os
import sys

_AUDIT_DIR = os.environ.get("PADDLE_EMA_AUDIT_DIR")
_UNDER = os.environ.get("PADDLE_EMA_AUDIT_UNDER")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


def _written_path(event, args):
    if event == "open":
        path, _, flags = args
        return path if isinstance(flags, int) and flags & _WRITE_FLAGS else None
    if event == "os.rename":  # os.rename and os.replace
        return args[1]
    if event == "os.mkdir":
        return args[0]
    return None


def _hook(event, args):
    path = _written_path(event, args)
    if path is None or isinstance(path, int):
        return
    path = os.path.abspath(os.fsdecode(path))
    if path.startswith(_UNDER):
        with open(_LOG, "a") as log:  # outside _UNDER, so this open is not recorded
            log.write(f"{event} {path}\n")


if _AUDIT_DIR and _UNDER:
    _UNDER = os.path.abspath(_UNDER) + os.sep
    _LOG = os.path.join(_AUDIT_DIR, f"writes.{os.environ.get('PADDLE_TRAINER_ID', 'launcher')}.txt")
    sys.addaudithook(_hook)
