"""Entry point; the logic is paddle_ema.engine.cli.export_main. Run from the repository root: python tools/export_model.py -h"""

import os
import sys

# Like PaddleDetection's tools/: make the repository's paddle_ema importable without installing it.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from paddle_ema.engine.cli import export_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(export_main())
