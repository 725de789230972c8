"""PaddleDetection-style YAML configs: `_BASE_` inheritance, `-o` overrides, a registry, validation.

    config = read_config("configs/lenet_digits.yml", ["ema_decay=0.999", "TrainReader.batch_size=8"])
"""

import os
from typing import Sequence, Union

from .errors import ConfigFileError
from .loader import BASE_KEY, Config, deep_merge, load_config
from .overrides import apply_overrides, parse_overrides
from .registry import CATEGORIES, REGISTRY, create, lookup, register
from .schema import FIELDS, validate, with_defaults

__all__ = [
    "ConfigFileError", "BASE_KEY", "Config", "deep_merge", "load_config", "apply_overrides", "parse_overrides",
    "CATEGORIES", "REGISTRY", "create", "lookup", "register", "FIELDS", "validate", "with_defaults",
    "read_config",
]


def read_config(path: Union[str, os.PathLike], overrides: Sequence[str] = ()) -> Config:
    """Load, override, validate and complete a config; raises ConfigFileError naming what is wrong.

    The built-in architectures, datasets, optimizers and schedules register when paddle_ema.engine is
    imported; paddle_ema.engine.read_config does both.

    Args:
        path: the YAML config file.
        overrides: `-o` items, e.g. ['ema_decay=0.999', 'TrainReader.batch_size=8'].

    Returns:
        The validated config, every runtime field present.
    """
    config = apply_overrides(load_config(path), overrides)
    validate(config)
    return with_defaults(config)
