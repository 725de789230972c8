"""Checkpoint files in PaddleDetection's layout, written crash-safe by paddle_ema.checkpoint.

    <name>.pdparams   the weights to evaluate, export and deploy: EMA weights when use_ema is on
    <name>.pdema      the raw (trained) weights, only when use_ema is on
    <name>.pdopt      optimizer (with LR schedule), epoch, step, full EMA state, RNG state, history

`<name>` is the 0-based epoch id, `model_final` for the last epoch, `best_model` for the best
EMA accuracy. A resumed run loads the raw weights (.pdema, or .pdparams without EMA) and .pdopt,
so it continues bit for bit, the EMA included. Each checkpoint ends with a manifest of checksums
(paddle_ema.checkpoint): a stem whose writing was interrupted is refused, naming the complete ones.
"""

import os

from ..checkpoint import MANIFEST_SUFFIX, atomic_save, safe_load, verify  # noqa: F401 (atomic_save re-exported)
from ..checkpoint import save_checkpoint as _save_files
from ..errors import CheckpointError, IncompatibleStateError

__all__ = ["atomic_save", "copy_state", "checkpoint_stem", "save_checkpoint", "load_resume_state", "load_weights", "check_fits",
           "run_identity", "check_same_run"]

SUFFIXES = (".pdparams", ".pdema", ".pdopt")


def copy_state(state):
    """A detached copy of a state dict (every tensor cloned): what a snapshot or checkpoint holds."""
    return {k: v.detach().clone() for k, v in state.items()}


def checkpoint_stem(path):
    """'out/3' from 'out/3', 'out/3.pdparams', 'out/3.pdopt', ..."""
    path = os.fspath(path)
    for suffix in SUFFIXES:
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def save_checkpoint(stem, weights, raw_weights=None, train_state=None, extra=None):
    """Write <stem>.pdparams (weights), <stem>.pdema (raw weights), <stem>.pdopt (train_state), any
    `extra` {suffix: weights} (e.g. SWA's), then the manifest that makes them one checkpoint."""
    files = {".pdparams": weights, **(extra or {})}
    if raw_weights is not None:
        files[".pdema"] = raw_weights
    if train_state is not None:
        files[".pdopt"] = train_state
    _save_files(stem, files)


def _load(path, what):
    """safe_load, after checking the file against its checkpoint's manifest when there is one."""
    stem, suffix = os.path.splitext(path)
    if os.path.exists(stem + MANIFEST_SUFFIX):
        verify(stem, [suffix])
    return safe_load(path, what)


def load_resume_state(path, use_ema):
    """(raw weights, train state) of the checkpoint `path` (with or without a suffix)."""
    stem = checkpoint_stem(path)
    weights = ".pdema" if use_ema else ".pdparams"
    verify(stem, [weights, ".pdopt"])  # a resume needs a complete checkpoint, not just files
    raw = safe_load(stem + weights, "resume checkpoint (-r)")
    state = safe_load(stem + ".pdopt", "resume checkpoint (-r)")
    return raw, state


def check_fits(model, state, what):
    """IncompatibleStateError unless `state` has exactly the model's state-dict names and shapes.

    (Layer.set_state_dict only warns about a mismatch and loads what it can.)"""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in own.items()
             if k in state and list(state[k].shape) != list(v.shape)]
    if missing or unexpected or wrong:
        raise IncompatibleStateError(
            f"{what} do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {wrong[:5]}"
        )


# Settings that make a checkpoint belong to a run: resuming under other ones would load weights or
# state into a different model, data or optimizer. (epoch, base_lr, output_dir, ... may change.)
RUN_IDENTITY = ("architecture", "dataset", "optimizer", "lr_schedule", "use_ema", "ema_impl", "mode")


def run_identity(cfg):
    identity = {key: cfg[key] for key in RUN_IDENTITY}
    for key in ("architecture", "dataset"):
        identity[cfg[key]] = cfg.get(cfg[key])  # the chosen class's own section
    return identity


def check_same_run(saved, cfg, path):
    """CheckpointError when the checkpoint at `path` was trained under another run identity."""
    if saved is None:  # written before identities were recorded
        return
    current = run_identity(cfg)
    differences = [f"{key}: {saved.get(key)!r} there, {current.get(key)!r} here"
                   for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
    if differences:
        raise CheckpointError(f"-r {path}: the checkpoint comes from another config ({'; '.join(differences)})")


def load_weights(model, path):
    """Load weights into `model`: `path` as given (.pdparams, or .pdema for the raw weights), or
    <path>.pdparams without a suffix; names and shapes must match exactly."""
    path = os.fspath(path)
    file = path if path.endswith((".pdparams", ".pdema")) else path + ".pdparams"
    state = _load(file, "weights")
    check_fits(model, state, f"weights {file}")
    model.set_state_dict(state)
    return file
