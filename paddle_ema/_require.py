"""Checks at import that PaddlePaddle 3.x is installed, with a message that says how to get it.

paddle_ema does not depend on a Paddle distribution: the CPU build (`paddlepaddle`) and the GPU
build (`paddlepaddle-gpu`) are different packages, and a hard requirement on one would replace
the other. The `[cpu]` extra installs the CPU build for the quick start.
"""

MIN_PADDLE = (2, 6)

_HOW_TO_INSTALL = (
    "install one build of PaddlePaddle 3.x first: `pip install 'paddle_ema[cpu]'` "
    "(CPU build), or the GPU build that matches your CUDA from "
    "https://www.paddlepaddle.org.cn/install/quick (package `paddlepaddle-gpu`)"
)


def _version_tuple(text):
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def require_paddle():
    try:
        import paddle
    except ImportError as exc:
        raise ImportError(f"paddle_ema needs PaddlePaddle, which is not installed: {_HOW_TO_INSTALL}.") from exc
    version = getattr(paddle, "__version__", "0.0")
    # Source builds report 0.0.0; let them through.
    if version != "0.0.0" and _version_tuple(version) < MIN_PADDLE:
        raise ImportError(f"paddle_ema needs PaddlePaddle >= 3.0, found {version}: {_HOW_TO_INSTALL}.")
    return paddle
