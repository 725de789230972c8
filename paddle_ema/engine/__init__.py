"""The training engine behind tools/: built-in datasets, models, optimizers, the trainer."""

from .. import _aliases
from .. import config as _config
from . import data, models, optim  # noqa: F401  (registers the built-in building blocks)

__all__ = ["read_config"]


def read_config(path, overrides=()):
    """config.read_config with the built-in registry entries loaded."""
    return _config.read_config(path, overrides)


# The modules' names before they said what they do (imported after read_config, which cli uses).
from . import (  # noqa: E402
    average_protocol,
    checkpoint_averaging,
    checkpoint_files,
    output_folder,
    swa_posthoc_setup,
    trainer_choice,
)

_aliases.register(__name__, averages=average_protocol, average_files=checkpoint_averaging,
                  extra_averages=swa_posthoc_setup, runs=trainer_choice, run_folder=output_folder,
                  run_checkpoints=checkpoint_files)
