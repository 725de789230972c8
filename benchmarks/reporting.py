"""What every benchmark does with its figures besides printing them: --json PATH."""

import json
from pathlib import Path


def write_json(path, figures):
    """Write `figures` to `path` as indented JSON and say so (a no-op when path is None)."""
    if path:
        Path(path).write_text(json.dumps(figures, indent=2), encoding="utf-8")
        print(f"wrote {path}")
