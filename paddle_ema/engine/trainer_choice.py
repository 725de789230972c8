"""Which trainer a config runs: the dygraph Trainer or, for `mode: static`, the StaticTrainer.

Apart from trainer.py so that the static trainer (a subclass) and the dygraph one do not import
each other.
"""

import paddle.distributed as dist

from ..errors import ConfigError
from .static_trainer import StaticTrainer
from .trainer import Trainer

__all__ = ["trainer_class", "check_config", "build_trainer"]


def trainer_class(cfg):
    if cfg["mode"] == "static":
        return StaticTrainer
    return Trainer


def check_config(cfg, do_eval=True):
    """Everything a run of `cfg` builds, built without writing a file (Trainer.check_config)."""
    return trainer_class(cfg).check_config(cfg, do_eval)


def build_trainer(cfg, name, **options):
    """The trainer for cfg['mode']. Both modes share data, config, checkpoints, progress and report."""
    if cfg["mode"] == "static":
        if dist.get_world_size() > 1:  # the Executor trainer has no data parallelism: each rank would train alone
            raise ConfigError("mode: static runs in one process; under paddle.distributed.launch use mode: dygraph")
        return StaticTrainer(cfg, name, **options)
    return Trainer(cfg, name, **options)
