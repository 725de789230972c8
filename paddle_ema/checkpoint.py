"""Crash-safe checkpoint files.

Every write goes to a temporary file in the target's folder, is flushed and fsynced, then renamed
over the target (rename is atomic on POSIX file systems), and the folder is fsynced so the rename
itself survives a power cut. A reader therefore sees either the old file or the new one, never a
mix.

A checkpoint of several files (PaddleDetection's `<stem>.pdparams`, `.pdema`, `.pdopt`) is made
complete by a manifest, `<stem>.manifest.json`, that lists each file's size and SHA-256 and is
written last: the commit point. Before new files are written under a stem its old manifest is
removed, so a run killed half way leaves a stem without a manifest, which `verify` reports as
incomplete instead of loading a torn mixture of old and new files.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time

import paddle

from .errors import CheckpointError

__all__ = [
    "atomic_save",
    "staged_prefix",
    "atomic_write_text",
    "safe_load",
    "save_checkpoint",
    "verify",
    "is_complete",
    "complete_checkpoints",
    "MANIFEST_SUFFIX",
]

MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = "paddle_ema.checkpoint/1"
# Fault injection for the crash tests: seconds to pause after each file of a checkpoint, so that a
# test can kill the process while a checkpoint is half written. Unset in normal use.
FAULT_SAVE_DELAY = "PADDLE_EMA_FAULT_SAVE_DELAY"


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic(write, path):
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write(temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
        _fsync_dir(folder)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def atomic_save(obj, path):
    """paddle.save(obj, path), crash-safe: temporary file, fsync, rename, fsync of the folder."""
    _atomic(lambda temporary: paddle.save(obj, temporary), path)


def atomic_write_text(text, path):
    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic(write, path)


@contextlib.contextmanager
def staged_prefix(prefix):
    """For writers that produce several `<prefix><suffix>` files (paddle.jit.save,
    paddle.static.save_inference_model): the block writes under the yielded staging prefix, in a
    temporary folder beside the target; only if it succeeds does each file move to
    `<prefix><suffix>`, fsynced, by an atomic rename. On failure nothing at `prefix` changes."""
    prefix = os.fspath(prefix)
    folder, base = os.path.split(os.path.abspath(prefix))
    os.makedirs(folder, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=folder)
    try:
        yield os.path.join(stage, base)
        for name in sorted(os.listdir(stage)):
            with open(os.path.join(stage, name), "rb+") as f:
                os.fsync(f.fileno())
            os.replace(os.path.join(stage, name), os.path.join(folder, name))
        _fsync_dir(folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _digest(path):
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def save_checkpoint(stem, files):
    """Write `{suffix: obj}` as `<stem><suffix>` files, then the manifest that makes them complete."""
    stem = os.fspath(stem)
    manifest = stem + MANIFEST_SUFFIX
    if os.path.exists(manifest):
        os.remove(manifest)  # from here until the new manifest, the stem reads as incomplete
    entries = {}
    delay = float(os.environ.get(FAULT_SAVE_DELAY, "0") or 0)
    for suffix, obj in files.items():
        atomic_save(obj, stem + suffix)
        entries[suffix] = {"bytes": os.path.getsize(stem + suffix), "sha256": _digest(stem + suffix)}
        if delay:
            time.sleep(delay)
    atomic_write_text(json.dumps({"format": MANIFEST_FORMAT, "files": entries}, indent=1), manifest)


def _manifest(stem):
    path = stem + MANIFEST_SUFFIX
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
            raise ValueError("unknown format")
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"checkpoint manifest {path} is unreadable ({exc})") from None
    return manifest


def verify(stem, suffixes=None):
    """Raise CheckpointError unless the checkpoint `stem` is complete and its files are intact."""
    stem = os.fspath(stem)
    manifest = _manifest(stem)
    if manifest is None:
        folder, base = os.path.split(os.path.abspath(stem))
        present = os.path.isdir(folder) and any(name.startswith(base + ".") for name in os.listdir(folder))
        why = "the run stopped while writing it" if present else "no such checkpoint"
        hint = _complete_hint(os.path.dirname(stem) or ".")
        raise CheckpointError(f"checkpoint {stem} is incomplete ({why}: {stem}{MANIFEST_SUFFIX} is missing){hint}")
    for suffix in suffixes or manifest["files"]:
        entry = manifest["files"].get(suffix)
        path = stem + suffix
        if entry is None:
            raise CheckpointError(f"checkpoint {stem} has no {suffix} file (it holds {sorted(manifest['files'])})")
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint file {path} is missing")
        if os.path.getsize(path) != entry["bytes"] or _digest(path) != entry["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is truncated or corrupted (its checksum does not match)")


def is_complete(stem):
    try:
        verify(stem)
    except CheckpointError:
        return False
    return True


def complete_checkpoints(folder):
    """Stems of the complete checkpoints in `folder`, oldest first (by modification time)."""
    if not os.path.isdir(folder):
        return []
    stems = [os.path.join(folder, name[: -len(MANIFEST_SUFFIX)])
             for name in os.listdir(folder) if name.endswith(MANIFEST_SUFFIX)]
    complete = [stem for stem in stems if is_complete(stem)]
    return sorted(complete, key=lambda stem: os.path.getmtime(stem + MANIFEST_SUFFIX))


def _complete_hint(folder):
    names = [os.path.basename(stem) for stem in complete_checkpoints(folder)]
    return f"; complete checkpoints there: {', '.join(names)}" if names else ""


def safe_load(path, what="checkpoint"):
    """paddle.load with one clear error for a missing, truncated or corrupted file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{what}: {path} does not exist")
    try:
        return paddle.load(path)
    except Exception as exc:  # noqa: BLE001 - pickle and Paddle raise many kinds for a bad file
        raise CheckpointError(
            f"{what}: {path} cannot be read: it is truncated, corrupted or not a Paddle file "
            f"({type(exc).__name__})"
        ) from None
