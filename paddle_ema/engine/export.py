"""Inference export with paddle.jit.save, verified by loading the result back."""

import numpy as np
import paddle

from ..errors import PaddleEMAError
from ..infra.checkpoint import staged_prefix
from .average_protocol import check_finite
from .builders import build_datasets, build_model, set_device
from .checkpoint_files import load_weights
from .evaluation import predict

__all__ = ["export_model", "ExportMismatch"]


class ExportMismatch(PaddleEMAError):
    """The exported model's predictions differ from the checkpoint's."""


def export_model(cfg, weights, prefix, check_samples=64, tolerance=1e-4):
    """Save `<prefix>` (model + params) with `weights` loaded; returns (prefix, max |logit diff|)."""
    set_device(cfg)
    dataset = build_datasets(cfg, ("eval",))["eval"]
    model = build_model(cfg, dataset)
    file = load_weights(model, weights)
    check_finite(model.state_dict(), f"the weights {file}")  # nothing is exported from NaN weights
    model.eval()
    shape = [None, *dataset.images.shape[1:]]
    images, _ = dataset.batch(np.arange(min(check_samples, len(dataset))))
    expected = predict(model, dataset, 256)[: len(images)]
    # Checked before it is published: a failed export leaves an earlier one at `prefix` intact.
    with staged_prefix(prefix) as staged:
        paddle.jit.save(model, staged, input_spec=[paddle.static.InputSpec(shape, "float32", "image")])
        loaded = paddle.jit.load(staged)
        loaded.eval()
        got = loaded(paddle.to_tensor(images)).numpy()
        max_diff = float(np.abs(got - expected).max())
        if not max_diff <= tolerance:
            raise ExportMismatch(f"exported model {prefix} predicts differently: max |diff| {max_diff:.3g} > {tolerance}")
    return prefix, max_diff
