"""The training engine behind tools/: built-in datasets, models, optimizers, the trainer."""

from . import data, models, optim  # noqa: F401  (registers the built-in building blocks)
from .. import config as _config

__all__ = ["read_config"]


def read_config(path, overrides=()):
    """config.read_config with the built-in registry entries loaded."""
    return _config.read_config(path, overrides)
