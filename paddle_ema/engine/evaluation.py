"""Top-1 accuracy of a model on an ArrayDataset."""

import numpy as np
import paddle

from .data import batches

__all__ = ["accuracy", "evaluate", "predict"]


@paddle.no_grad()
def predict(model, dataset, batch_size):
    """Logits for the whole dataset, in order, as a numpy array (the model is left in eval mode)."""
    model.eval()
    outputs = []
    for indices in batches(len(dataset), batch_size):
        images, _ = dataset.batch(indices)
        outputs.append(model(paddle.to_tensor(images)).numpy())
    return np.concatenate(outputs)


def accuracy(logits, labels):
    """Fraction of samples whose arg-max logit is the label."""
    return float((logits.argmax(axis=1) == labels).mean())


def evaluate(model, dataset, batch_size):
    """Top-1 accuracy of `model` on `dataset`."""
    was_training = model.training
    logits = predict(model, dataset, batch_size)
    if was_training:
        model.train()
    return accuracy(logits, dataset.labels)
