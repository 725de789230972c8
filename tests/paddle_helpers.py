"""Small helpers that read and write a layer's weights as numpy arrays."""

import numpy as np
import paddle


def as_numpy(tensor, dtype=np.float64):
    """A numpy copy of any float tensor (bfloat16 included, which .numpy() cannot show as floats)."""
    if tensor.dtype != paddle.float64:
        tensor = tensor.astype("float32")
    return tensor.numpy().astype(dtype)


def snapshot(layer, dtype=np.float64):
    """{name: copy of the parameter as a numpy array} for every parameter of the layer."""
    return {name: as_numpy(p, dtype) for name, p in layer.named_parameters()}


def set_weights(layer, arrays):
    for name, p in layer.named_parameters():
        if name in arrays:
            p.set_value(paddle.to_tensor(np.asarray(arrays[name], np.float32)).astype(p.dtype))
