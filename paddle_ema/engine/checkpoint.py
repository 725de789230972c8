"""Checkpoint files, PaddleDetection's layout, written atomically (temporary file, then rename).

    <name>.pdparams   the weights to evaluate, export and deploy: EMA weights when use_ema is on
    <name>.pdema      the raw (trained) weights, only when use_ema is on
    <name>.pdopt      optimizer (with LR schedule), epoch, step, full EMA state, RNG state, history

`<name>` is the 0-based epoch id, `model_final` for the last epoch, `best_model` for the best
EMA accuracy. A resumed run loads the raw weights (.pdema, or .pdparams without EMA) and .pdopt,
so it continues bit for bit, the EMA included.
"""

import os

import paddle

from ..errors import ConfigError, IncompatibleStateError

__all__ = ["atomic_save", "checkpoint_stem", "save_checkpoint", "load_resume_state", "load_weights"]

SUFFIXES = (".pdparams", ".pdema", ".pdopt")


def atomic_save(obj, path):
    """paddle.save to a temporary file in the same folder, then rename over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        paddle.save(obj, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def checkpoint_stem(path):
    """'out/3' from 'out/3', 'out/3.pdparams', 'out/3.pdopt', ..."""
    path = os.fspath(path)
    for suffix in SUFFIXES:
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def save_checkpoint(stem, weights, raw_weights=None, train_state=None):
    """Write <stem>.pdparams (weights), <stem>.pdema (raw weights) and <stem>.pdopt (train_state)."""
    atomic_save(weights, stem + ".pdparams")
    if raw_weights is not None:
        atomic_save(raw_weights, stem + ".pdema")
    if train_state is not None:
        atomic_save(train_state, stem + ".pdopt")


def _load(path, what):
    if not os.path.isfile(path):
        raise ConfigError(f"{what}: {path} does not exist")
    return paddle.load(path)


def load_resume_state(path, use_ema):
    """(raw weights, train state) of the checkpoint `path` (with or without a suffix)."""
    stem = checkpoint_stem(path)
    raw = _load(stem + (".pdema" if use_ema else ".pdparams"), "resume checkpoint (-r)")
    state = _load(stem + ".pdopt", "resume checkpoint (-r)")
    return raw, state


def load_weights(model, path):
    """Load weights into `model`: `path` as given (.pdparams, or .pdema for the raw weights), or
    <path>.pdparams without a suffix; names and shapes must match exactly."""
    path = os.fspath(path)
    file = path if path.endswith((".pdparams", ".pdema")) else path + ".pdparams"
    state = _load(file, "weights")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in own.items()
             if k in state and list(state[k].shape) != list(v.shape)]
    if missing or unexpected or wrong:
        raise IncompatibleStateError(
            f"weights {file} do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {wrong[:5]}"
        )
    model.set_state_dict(state)
    return file
