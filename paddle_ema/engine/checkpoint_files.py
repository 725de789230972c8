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
from typing import Any, Dict, Optional

import numpy as np
import paddle

from ..errors import CheckpointError, IncompatibleStateError
from ..infra.checkpoint import (  # noqa: F401
    JOURNAL_SUFFIX,
    MANIFEST_SUFFIX,
    atomic_save,
    check_replaceable,
    checkpoint_info,
    complete_checkpoints,
    listed_suffixes,
    resolve,
    safe_load,
)
from ..infra.checkpoint import save_checkpoint as _save_files

__all__ = ["atomic_save", "copy_state", "checkpoint_stem", "save_checkpoint", "load_resume_state", "load_weights", "check_fits",
           "run_identity", "check_same_run", "ema_keys", "ema_resume_hint", "load_state_dict", "newest_resumable",
           "save_weights_file", "check_weights_output"]

SUFFIXES = (".pdparams", ".pdema", ".pdopt")
# What a .pdopt of tools/train.py holds, and the types its entries must have to be resumed.
TRAIN_STATE_KEYS = {"optimizer": dict, "last_epoch": int, "global_step": int, "history": list, "scalars": dict}


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


def save_checkpoint(stem, weights, raw_weights=None, train_state=None, extra=None, info=None):
    """Write <stem>.pdparams (weights), <stem>.pdema (raw weights), <stem>.pdopt (train_state), any
    `extra` {suffix: weights} (e.g. SWA's), then the manifest that makes them one checkpoint."""
    files = {".pdparams": weights, **(extra or {})}
    if raw_weights is not None:
        files[".pdema"] = raw_weights
    if train_state is not None:
        files[".pdopt"] = train_state
    _save_files(stem, files, info)


# The manifest info of a weights file a tool wrote on its own (an average): such a file may be
# written over again; a file of a training checkpoint may not.
WEIGHTS_FILE_INFO = {"kind": "weights file"}


def check_weights_output(path, what):
    """CheckpointError unless `path` may take a new weights file: a `.pdparams` name that is not a
    file of a training checkpoint (its own stem's, or listed by another's manifest)."""
    path = os.fspath(path)
    if not path.strip():
        raise CheckpointError(f"{what}: an empty path; give the .pdparams file to write")
    if not path.endswith(".pdparams") or os.path.basename(path).startswith("."):
        raise CheckpointError(f"{what}: {path} is not a .pdparams file name; the output is a .pdparams weights file")
    check_replaceable(path)
    stem = path[: -len(".pdparams")]
    owned = any(os.path.lexists(stem + ending) for ending in (MANIFEST_SUFFIX, JOURNAL_SUFFIX))
    if owned and checkpoint_info(stem) != WEIGHTS_FILE_INFO:
        raise CheckpointError(f"{what}: {path} is a file of the checkpoint {stem}; a checkpoint's files are never "
                              "written over, choose another name")
    found = _manifest_for(path)
    if found is not None and found[0] != stem and found[1] in listed_suffixes(found[0]):
        raise CheckpointError(f"{what}: {path} is a file of the checkpoint {found[0]}; a checkpoint's files are "
                              "never written over, choose another name")


def save_weights_file(state, path):
    """A single weights file `<stem>.pdparams` with its manifest, so that every reader checks it."""
    path = os.fspath(path)
    if not path.endswith(".pdparams"):
        atomic_save(state, path)
        return
    _save_files(path[: -len(".pdparams")], {".pdparams": state}, dict(WEIGHTS_FILE_INFO))


def _manifest_for(path):
    """(stem, suffix) of the checkpoint whose manifest lists the file `path`, or None."""
    folder, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):
        return None
    for other in sorted(os.listdir(folder), key=len, reverse=True):
        for ending in (JOURNAL_SUFFIX, MANIFEST_SUFFIX):
            if other.endswith(ending) and not other.startswith("."):
                base = other[: -len(ending)]
                if name.startswith(base) and name[len(base):][:1] in (".", "_"):
                    return os.path.join(folder, base), name[len(base):]
    return None


def _is_tensor(value):
    return isinstance(value, (paddle.Tensor, np.ndarray))


def _check_state_dict(state, path, what):
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{what}: {path} holds a {type(state).__name__}, not a state dict of weights")
    bad = [str(k)[:60] for k, v in state.items() if not isinstance(k, str) or not _is_tensor(v)]
    if bad:
        raise CheckpointError(f"{what}: {path} is not a state dict of weights (entries {bad[:3]} are not named tensors)")
    return state


def load_state_dict(path, what):
    """A weights file, checked against its checkpoint's manifest when one lists it (else just readable),
    and checked to be a state dict of named tensors."""
    path = os.fspath(path)
    found = _manifest_for(path)
    if found is not None:
        stem, suffix = found
        try:
            path = resolve(stem, [suffix])[suffix]
        except CheckpointError as exc:
            if f"has no {suffix} file" not in str(exc):  # another checkpoint's manifest: the file is loose
                raise CheckpointError(f"{what}: {exc}") from None
    return _check_state_dict(safe_load(path, what), path, what)


def _check_train_state(state, path):
    if not isinstance(state, dict):
        raise CheckpointError(f"-r {path}: its .pdopt holds a {type(state).__name__}, not the training state "
                              "tools/train.py writes")
    for key, kind in TRAIN_STATE_KEYS.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            got = "nothing" if key not in state else f"a {type(value).__name__}"
            raise CheckpointError(f"-r {path}: its .pdopt is not a training state of tools/train.py ({key!r} holds "
                                  f"{got}, expected a {kind.__name__})")
    return state


def load_resume_state(path, use_ema):
    """(raw weights, train state) of the checkpoint `path` (with or without a suffix)."""
    stem = checkpoint_stem(path)
    weights = ".pdema" if use_ema else ".pdparams"
    paths = resolve(stem, [weights, ".pdopt"])  # a resume needs a complete checkpoint, not just files
    what = "resume checkpoint (-r)"
    raw = _check_state_dict(safe_load(paths[weights], what), stem + weights, what)
    state = _check_train_state(safe_load(paths[".pdopt"], what), stem)
    return raw, state


def newest_resumable(run_dir, use_ema):
    """The newest complete checkpoint of `run_dir` that a run can resume from (in step order), or None."""
    weights = ".pdema" if use_ema else ".pdparams"
    stems = [s for s in complete_checkpoints(run_dir, ".pdopt") if s in complete_checkpoints(run_dir, weights)]
    return stems[-1] if stems else None


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
    if not isinstance(saved, dict):
        raise CheckpointError(f"-r {path}: its .pdopt records no valid run identity (a {type(saved).__name__})")
    current = run_identity(cfg)
    differences = [f"{key}: {saved.get(key)!r} there, {current.get(key)!r} here"
                   for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
    if differences:
        raise CheckpointError(f"-r {path}: the checkpoint comes from another config ({'; '.join(differences)})")


def ema_keys(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The config's EMA keys (ema_*, cycle_epoch), which a checkpoint records: when its EMA state does
    not fit a resumed run's EMA, the error can name the -o that would.

    Args:
        cfg: a complete config (read_config's).

    Returns:
        {key: value} of those keys.
    """
    return {key: value for key, value in cfg.items() if key.startswith("ema_") or key == "cycle_epoch"}


def _yaml_word(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_yaml_word(v) for v in value) + "]"
    return str(value)


def ema_resume_hint(saved: Optional[Dict[str, Any]], cfg: Dict[str, Any]) -> str:
    """What to do when a checkpoint's EMA state does not fit `cfg`'s EMA.

    Args:
        saved: the EMA keys the checkpoint recorded (`ema_keys`), None in an older checkpoint.
        cfg: the config of the run that resumes.

    Returns:
        '; the checkpoint was trained with K: V (W here): resume it with -o K=V, ...', or '' when the
        checkpoint recorded no keys or none differ.
    """
    import shlex

    if not isinstance(saved, dict):
        return ""
    current = ema_keys(cfg)
    changed = [key for key in sorted(current) if key in saved and saved[key] != current[key]]
    if not changed:
        return ""
    there = ", ".join(f"{key}: {_yaml_word(saved[key])} ({_yaml_word(current[key])} here)" for key in changed)
    fix = " ".join(shlex.quote(f"{key}={_yaml_word(saved[key])}") for key in changed)
    return (f"; the checkpoint was trained with {there}: resume it with -o {fix}, or train the new settings "
            f"into another output_dir (-o output_dir=...)")


def load_weights(model, path):
    """Load weights into `model`: `path` as given (.pdparams, or .pdema for the raw weights), or
    <path>.pdparams without a suffix; names and shapes must match exactly."""
    path = os.fspath(path)
    file = path if path.endswith((".pdparams", ".pdema")) else path + ".pdparams"
    state = load_state_dict(file, "weights")
    check_fits(model, state, f"weights {file}")
    model.set_state_dict(state)
    return file
