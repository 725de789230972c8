"""The configs shipped with the package, so that the tools run without the repository.

    resolve_config("configs/lenet_digits.yml")  -> that file, when it exists (paths win)
    resolve_config("lenet_digits")              -> the packaged configs/lenet_digits.yml
    resolve_config("datasets/mnist.yml")        -> the packaged configs/datasets/mnist.yml

A wheel carries the repository's configs/ as paddle_ema/configs/ (setup.py); an editable install
or a checkout reads the repository's configs/ itself.
"""

import os
from pathlib import Path
from typing import List, Optional

__all__ = ["resolve_config", "packaged_config_dir", "packaged_configs"]

SUFFIXES = (".yml", ".yaml")


def packaged_config_dir() -> Optional[Path]:
    """The folder of the shipped configs.

    Returns:
        A wheel's paddle_ema/configs/ or a checkout's configs/, or None when neither is there.
    """
    package = Path(__file__).resolve().parents[1]
    for folder in (package / "configs", package.parent / "configs"):
        if folder.is_dir():
            return folder
    return None


def packaged_configs() -> List[str]:
    """The top-level shipped configs, what `-c NAME` accepts.

    Returns:
        Their names without suffix, sorted; [] when no config folder is there.
    """
    folder = packaged_config_dir()
    if folder is None:
        return []
    return sorted(p.stem for p in folder.iterdir() if p.suffix in SUFFIXES and p.is_file())


def resolve_config(arg: Optional[str]) -> Optional[str]:
    """The config file that `-c arg` names.

    Args:
        arg: a path, or the name of a packaged config with or without its suffix; None passes through.

    Returns:
        `arg` itself when it names an existing path (or is not a plain name), else the packaged config's
        path; unknown names come back unchanged, so that the loader's error names what the user typed.
    """
    if arg is None or os.path.exists(arg):
        return arg
    folder = packaged_config_dir()
    if folder is None or os.path.isabs(arg):
        return arg
    relative = Path(arg)
    if ".." in relative.parts:
        return arg
    if relative.parts[:1] == ("configs",):  # README's `configs/x.yml`, typed in another folder
        relative = Path(*relative.parts[1:])
    if not relative.name:
        return arg
    for candidate in [relative] + [relative.with_name(relative.name + s) for s in SUFFIXES]:
        if (folder / candidate).is_file():
            return str(folder / candidate)
    return arg
