"""Checks at import that PaddlePaddle 2.6.2 or later is installed, with a message that says how to get it.

paddle_ema does not depend on a Paddle distribution: the CPU build (`paddlepaddle`) and the GPU
build (`paddlepaddle-gpu`) are different packages, and a hard requirement on one would replace
the other. The `[cpu]` extra installs the CPU build for the quick start.

Supported: Paddle 2.6.2 through 3.3.x (docs/install.md has what was measured on each).
"""

import os
import sys
import warnings

MIN_PADDLE = (2, 6, 2)

_HOW_TO_INSTALL = (
    "install one build of PaddlePaddle 2.6.2 or later first: `pip install 'paddle_ema[cpu]'` "
    "(CPU build), or the GPU build that matches your CUDA from "
    "https://www.paddlepaddle.org.cn/install/quick (package `paddlepaddle-gpu`)"
)


def _version_tuple(text):
    parts = []
    for piece in text.split(".")[:3]:
        digits = ""
        for ch in piece:  # '0rc1' -> 0: only the leading digits count
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


# The console scripts of setup.py are all named paddle-ema-<tool>.
COMMAND_PREFIX = "paddle-ema-"
MODULE_COMMANDS = ("paddle_ema.kernels",)


def _module_run_by_python_m(argv):
    """MODULE of a `python [options] -m MODULE ...` command line, or None for another kind."""
    args = iter(argv[1:])
    for arg in args:
        if arg == "-m":
            return next(args, None)
        if arg.startswith("-m"):
            return arg[2:]
        if arg in ("-W", "-X"):  # the options that take their value as the next word
            next(args, None)
        elif arg == "-c" or not arg.startswith("-"):
            return None
    return None


def own_command() -> bool:
    """Whether this process is one of paddle_ema's own commands: a console script (paddle-ema-*),
    a tools/*.py next to this package, or `python -m paddle_ema.kernels`.

    Returns:
        True only for those; a user's script or interpreter that imports paddle_ema gets False.
    """
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0).startswith(COMMAND_PREFIX):
        return True
    if argv0 == "-m":  # `python -m pkg.mod`: sys.argv[0] is '-m' while pkg's __init__ runs
        return _module_run_by_python_m(getattr(sys, "orig_argv", [])) in MODULE_COMMANDS
    if not argv0.endswith(".py"):
        return False
    tools = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
    return os.path.dirname(os.path.realpath(argv0)) == os.path.realpath(tools)


def _import_paddle():
    if not own_command():
        import paddle

        return paddle
    # Our commands only: Paddle's import warns that ccache is missing (it matters only to custom-op
    # builds, and reads like a missing prerequisite), and its C++ side logs executor notices at
    # glog INFO level. glog reads GLOG_minloglevel once, when Paddle's library loads.
    os.environ.setdefault("GLOG_minloglevel", "2")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No ccache found")
        import paddle

    return paddle


def require_paddle():
    if "paddle" not in sys.modules:
        # Paddle 2.6's wheel breaks Python's zlib when it is imported first (inflateReset2 then
        # segfaults, e.g. in np.load or gzip); loading zlib before Paddle avoids it.
        import zlib  # noqa: F401
    try:
        paddle = _import_paddle()
    except ImportError as exc:
        raise ImportError(f"paddle_ema needs PaddlePaddle, which is not installed: {_HOW_TO_INSTALL}.") from exc
    version = getattr(paddle, "__version__", "0.0")
    # Source builds report 0.0.0; let them through.
    if version != "0.0.0" and _version_tuple(version) < MIN_PADDLE:
        raise ImportError(f"paddle_ema needs PaddlePaddle >= 2.6.2, found {version}: {_HOW_TO_INSTALL}.")
    return paddle
