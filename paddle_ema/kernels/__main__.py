"""`python -m paddle_ema.kernels [--rebuild]`: build the fused kernel now (a Docker image, a cluster
job's setup step) and say where it is cached, under which key, and which kernel the EMA runs.

Exit status 0 when the kernel the mode asks for runs (the fused one, or reference when
PADDLE_EMA_KERNEL=reference), 1 when 'auto' falls back to the reference ops, 2 when
PADDLE_EMA_KERNEL=fused cannot be had.
"""

import argparse
import sys
import warnings
from typing import List, Optional

import paddle

from ..errors import ConfigError
from . import KERNEL_ENV, build, fused, kernel_mode


def main(argv: Optional[List[str]] = None) -> int:
    """Build or load the kernel and report on it (see the module docstring).

    Args:
        argv: the command-line arguments; None reads sys.argv.

    Returns:
        The exit status: 0, 1 or 2 as the module docstring says.
    """
    parser = argparse.ArgumentParser(prog="python -m paddle_ema.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rebuild", action="store_true",
                        help="forget this Paddle's cached build and any remembered failure, then build again")
    args = parser.parse_args(argv)
    try:
        mode = kernel_mode()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"paddle:     {paddle.__version__} ({'CUDA' if paddle.is_compiled_with_cuda() else 'CPU'} build), "
          f"Python {sys.version_info[0]}.{sys.version_info[1]}")
    print(f"cache:      {build.cache_dir()}")
    print(f"build key:  {build.build_key()}")
    print(f"library:    {build.library_path()}")
    if mode == "reference":
        print(f"kernel:     reference ({KERNEL_ENV}=reference: nothing is compiled)")
        return 0
    if args.rebuild:
        build.forget_builds()
    existed = build.library_path().exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said below, once
        loaded = fused.available()
    if loaded:
        print(f"kernel:     fused ({'loaded from the cache' if existed else 'built now'})")
        return 0
    print(f"kernel:     reference, because the fused kernel is unavailable: {fused.failure()}")
    if mode == "fused":
        print(f"error: {KERNEL_ENV}=fused but the fused kernel cannot be built", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
