"""Checks at import that PaddlePaddle 2.6.2 or later is installed, with a message that says how to get it.

paddle_ema does not depend on a Paddle distribution: the CPU build (`paddlepaddle`) and the GPU
build (`paddlepaddle-gpu`) are different packages, and a hard requirement on one would replace
the other. The `[cpu]` extra installs the CPU build for the quick start.

Supported: Paddle 2.6.2 through 3.3.x (docs/install.md has what was measured on each).
"""

import sys

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


def require_paddle():
    if "paddle" not in sys.modules:
        # Paddle 2.6's wheel breaks Python's zlib when it is imported first (inflateReset2 then
        # segfaults, e.g. in np.load or gzip); loading zlib before Paddle avoids it.
        import zlib  # noqa: F401
    try:
        import paddle
    except ImportError as exc:
        raise ImportError(f"paddle_ema needs PaddlePaddle, which is not installed: {_HOW_TO_INSTALL}.") from exc
    version = getattr(paddle, "__version__", "0.0")
    # Source builds report 0.0.0; let them through.
    if version != "0.0.0" and _version_tuple(version) < MIN_PADDLE:
        raise ImportError(f"paddle_ema needs PaddlePaddle >= 2.6.2, found {version}: {_HOW_TO_INSTALL}.")
    return paddle
