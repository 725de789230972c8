"""Top-1 accuracy of a model on an ArrayDataset: the one prediction loop and the one count that
the dygraph trainer, the static trainer, the distributed evaluation and tools/eval.py share."""

from typing import Callable

import numpy as np
import paddle

from .data import ArrayDataset, batches

__all__ = ["accuracy", "evaluate", "num_correct", "predict", "predict_with"]


def predict_with(forward: Callable[[np.ndarray], np.ndarray], dataset: ArrayDataset, batch_size: int) -> np.ndarray:
    """Logits for the whole `dataset`, in order, as one numpy array.

    Args:
        forward: images (a numpy batch) -> logits (numpy); a dygraph model or an executor run.
        dataset: the images, taken in order in batches of `batch_size`.
        batch_size: images per forward call.

    Returns:
        The logits, one row per image.
    """
    return np.concatenate([forward(dataset.batch(indices)[0]) for indices in batches(len(dataset), batch_size)])


@paddle.no_grad()
def predict(model: paddle.nn.Layer, dataset: ArrayDataset, batch_size: int) -> np.ndarray:
    """`predict_with` for a dygraph model (left in eval mode)."""
    model.eval()
    return predict_with(lambda images: model(paddle.to_tensor(images)).numpy(), dataset, batch_size)


def num_correct(logits: np.ndarray, labels: np.ndarray) -> int:
    """How many samples have their arg-max logit at the label."""
    return int((logits.argmax(axis=1) == labels).sum())


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose arg-max logit is the label."""
    return num_correct(logits, labels) / len(labels)


def evaluate(model: paddle.nn.Layer, dataset: ArrayDataset, batch_size: int) -> float:
    """Top-1 accuracy of `model` on `dataset`; the model's train/eval mode is kept."""
    was_training = model.training
    logits = predict(model, dataset, batch_size)
    if was_training:
        model.train()
    return accuracy(logits, dataset.labels)
