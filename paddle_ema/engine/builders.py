"""What a run is built from: the device, the seeds, the datasets, the model and the loss.

Shared by the trainers (trainer.py, static_trainer.py) and the other tools (export, averaging,
post-hoc); nothing here imports a trainer, so every module can import these.
"""

import os
import random

import numpy as np
import paddle
import paddle.nn.functional as F

from ..config import create
from ..errors import ConfigError

__all__ = ["set_device", "seed_everything", "build_datasets", "build_model", "classification_loss", "run_name"]


def set_device(cfg):
    try:
        paddle.set_device(cfg["device"])
    except (ValueError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ConfigError(f"device: {cfg['device']!r} is not available here ({reason})") from None


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def build_datasets(cfg, splits=("train", "eval")):
    return {split: create("dataset", cfg, split=split) for split in splits}


_UNITS = {"num_classes": "classes", "in_channels": "channels", "image_size": "pixels a side"}


def build_model(cfg, dataset):
    """The configured architecture sized for `dataset` (classes, channels, image side); a section
    that sets one of those to something the data does not have is a ConfigError."""
    name = cfg["architecture"]
    section = cfg.get(name) or {}
    side = int(dataset.images.shape[-1])
    for key, have, fits in (("num_classes", dataset.num_classes, lambda v, have: v >= have),
                            ("in_channels", dataset.in_channels, lambda v, have: v == have),
                            ("image_size", side, lambda v, have: v == have)):
        if section.get(key) is not None and not fits(section[key], have):
            need = f">= {have}" if key == "num_classes" else f"{have}"
            raise ConfigError(f"{name}.{key}: {section[key]!r} does not fit the data: dataset {cfg['dataset']} has "
                              f"{have} {_UNITS[key]}; set {need} or leave it out (the data's value is used)")
    return create("architecture", cfg, num_classes=dataset.num_classes, in_channels=dataset.in_channels,
                  image_size=int(dataset.images.shape[-1]))


def classification_loss(logits, labels):
    return F.cross_entropy(logits, labels)


def run_name(config_path):
    return os.path.splitext(os.path.basename(config_path))[0]
