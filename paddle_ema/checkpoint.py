"""Crash-safe checkpoint files.

Every write goes to a temporary file in the target's folder, is flushed and fsynced, then renamed
over the target (rename is atomic on POSIX file systems), and the folder is fsynced so the rename
itself survives a power cut. A reader therefore sees either the old file or the new one, never a
mix.

A checkpoint of several files (PaddleDetection's `<stem>.pdparams`, `.pdema`, `.pdopt`) is made
complete by a manifest, `<stem>.manifest.json`, that lists each file's size and SHA-256. A stem is
replaced only once its successor is complete, in three steps:

1. every new file is written under a temporary name `.<stem><suffix>.tmp-<pid>` and fsynced
   (a full disk or a kill here leaves the old checkpoint untouched);
2. the new manifest is written, atomically, as `<stem>.manifest.json.next` (the journal): from
   here the new checkpoint is committed;
3. the new files are renamed over the old ones, then the journal over the manifest.

A reader (`verify`, `resolve`) that finds a journal whose files are all present, under their final
or temporary names, with the journal's checksums, reads the new checkpoint; otherwise the old
manifest decides. So at every moment one complete checkpoint is loadable, and `recover` (run by the
trainer while it holds the run folder's lock) finishes a commit a killed writer left half done and
removes the temporary files of writers that are no longer alive.
"""

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import paddle

from .errors import CheckpointError
from .step_policy import is_integer

__all__ = [
    "atomic_save",
    "staged_prefix",
    "atomic_write_text",
    "safe_load",
    "save_checkpoint",
    "verify",
    "resolve",
    "is_complete",
    "complete_checkpoints",
    "checkpoint_info",
    "recover",
    "remove_stale_temporaries",
    "MANIFEST_SUFFIX",
    "JOURNAL_SUFFIX",
]

MANIFEST_SUFFIX = ".manifest.json"
JOURNAL_SUFFIX = MANIFEST_SUFFIX + ".next"
MANIFEST_FORMAT = "paddle_ema.checkpoint/1"
MANIFEST_MAX_BYTES = 1 << 20
# Fault injection for the crash tests: seconds to pause after each file of a checkpoint, so that a
# test can kill the process while a checkpoint is half written. Unset in normal use.
FAULT_SAVE_DELAY = "PADDLE_EMA_FAULT_SAVE_DELAY"
# A temporary file of this module: `.<name>.tmp-<pid>` (files) or `.<name>.tmp-<pid>-<random>` (folders).
_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)(?:-[A-Za-z0-9_]+)?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary_name(path):
    folder, base = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{base}.tmp-{os.getpid()}")


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _write_synced(write, temporary, target=None):
    try:
        write(temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
    except OSError as exc:
        _remove_quietly(temporary)
        if exc.filename is None and exc.errno is not None:  # a failed write() names no file: name it
            raise OSError(exc.errno, exc.strerror, os.fspath(target or temporary)) from None
        raise
    except BaseException:
        _remove_quietly(temporary)
        raise


def _atomic(write, path):
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = _temporary_name(path)
    try:
        _write_synced(write, temporary, path)
        os.replace(temporary, path)
        _fsync_dir(folder)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def atomic_save(obj: Any, path: Union[str, os.PathLike]) -> None:
    """paddle.save(obj, path), crash-safe: temporary file, fsync, rename, fsync of the folder.

    Args:
        obj: what paddle.save writes (a state dict, a tensor, ...).
        path: the file to write; its folder is created when missing.
    """
    _atomic(lambda temporary: paddle.save(obj, temporary), path)


def atomic_write_text(text: str, path: Union[str, os.PathLike]) -> None:
    """Write `text` to `path` in UTF-8, crash-safe like `atomic_save`.

    Args:
        text: the file's whole content.
        path: the file to write; its folder is created when missing.
    """

    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic(write, path)


@contextlib.contextmanager
def staged_prefix(prefix: Union[str, os.PathLike]) -> Iterator[str]:
    """For writers that produce several `<prefix><suffix>` files (paddle.jit.save,
    paddle.static.save_inference_model): the block writes under the yielded staging prefix, in a
    temporary folder beside the target; only if it succeeds does each file move to
    `<prefix><suffix>`, fsynced, by an atomic rename. On failure nothing at `prefix` changes.

    Args:
        prefix: the final path prefix of the files.

    Yields:
        The staging prefix to write under (a path in the temporary folder).
    """
    prefix = os.fspath(prefix)
    folder, base = os.path.split(os.path.abspath(prefix))
    os.makedirs(folder, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{base}.tmp-{os.getpid()}-", dir=folder)
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


def _entry(path):
    return {"bytes": os.path.getsize(path), "sha256": _digest(path)}


def save_checkpoint(stem: Union[str, os.PathLike], files: Dict[str, Any], info: Optional[Any] = None) -> None:
    """Write `{suffix: obj}` as `<stem><suffix>` files, replacing an older checkpoint at `stem` only
    once the new one is complete (see the module's docstring).

    Args:
        stem: the checkpoint's path without suffix, e.g. `output/model_final`.
        files: {suffix: object for paddle.save}, e.g. {'.pdparams': state_dict}.
        info: JSON-able data kept in the manifest (e.g. the step); None keeps none.
    """
    stem = os.fspath(stem)
    folder = os.path.dirname(os.path.abspath(stem))
    os.makedirs(folder, exist_ok=True)
    delay = float(os.environ.get(FAULT_SAVE_DELAY, "0") or 0)
    staged, entries = {}, {}
    try:
        for suffix, obj in files.items():
            temporary = _temporary_name(stem + suffix)
            _write_synced(lambda path, obj=obj: paddle.save(obj, path), temporary, stem + suffix)
            staged[suffix] = temporary
            entries[suffix] = {**_entry(temporary), "staged": os.path.basename(temporary)}
            if delay:
                time.sleep(delay)
        manifest = {"format": MANIFEST_FORMAT, "files": entries}
        if info is not None:
            manifest["info"] = info
        atomic_write_text(json.dumps(manifest, indent=1), stem + JOURNAL_SUFFIX)  # the commit point
    except BaseException:
        for temporary in staged.values():
            _remove_quietly(temporary)
        raise
    _finish_commit(stem, manifest)


def _finish_commit(stem, manifest):
    folder = os.path.dirname(os.path.abspath(stem))
    for suffix, entry in manifest["files"].items():
        temporary = os.path.join(folder, entry["staged"])
        if os.path.exists(temporary):
            os.replace(temporary, stem + suffix)
    _fsync_dir(folder)
    final = {**manifest, "files": {s: {"bytes": e["bytes"], "sha256": e["sha256"]} for s, e in manifest["files"].items()}}
    atomic_write_text(json.dumps(final, indent=1), stem + MANIFEST_SUFFIX)
    _remove_quietly(stem + JOURNAL_SUFFIX)
    _fsync_dir(folder)


def _read_manifest(path):
    """The parsed manifest at `path`, None when there is none; CheckpointError when it is malformed."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"checkpoint manifest {path} is unreadable ({exc.strerror})") from None
    if size > MANIFEST_MAX_BYTES:
        raise CheckpointError(f"checkpoint manifest {path} is malformed: {size} bytes, a manifest is at most "
                              f"{MANIFEST_MAX_BYTES}")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        why = "nested too deeply" if isinstance(exc, RecursionError) else " ".join(str(exc).split())[:160]
        raise CheckpointError(f"checkpoint manifest {path} is unreadable (not JSON: {why})") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint manifest {path} is unreadable ({exc.strerror})") from None
    problem = _schema_problem(manifest)
    if problem:
        raise CheckpointError(f"checkpoint manifest {path} is malformed: {problem}; expected "
                              f'{{"format": "{MANIFEST_FORMAT}", "files": {{SUFFIX: {{"bytes": N, "sha256": HEX}}}}}}')
    return manifest


def _schema_problem(manifest):
    if not isinstance(manifest, dict):
        return f"it holds a JSON {type(manifest).__name__}, not an object"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"format is {str(manifest.get('format'))[:60]!r}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "'files' is not a non-empty object"
    for suffix, entry in files.items():
        shown = suffix[:40]
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", suffix) or "/" in suffix or ".." in suffix:
            return f"the file suffix {shown!r} is not a plain file-name suffix"
        if not isinstance(entry, dict):
            return f"files[{shown!r}] is a JSON {type(entry).__name__}, not an object"
        size, sha = entry.get("bytes"), entry.get("sha256")
        if not is_integer(size, 0):
            return f"files[{shown!r}].bytes is not an integer >= 0"
        if not isinstance(sha, str) or not _SHA256.match(sha):
            return f"files[{shown!r}].sha256 is not 64 hexadecimal digits"
        staged = entry.get("staged")
        if staged is not None and (not isinstance(staged, str) or not _TEMPORARY.match(staged)
                                   or os.path.basename(staged) != staged):
            return f"files[{shown!r}].staged is not a temporary file name"
    return None


def _matches(path, entry):
    try:
        return os.path.isfile(path) and os.path.getsize(path) == entry["bytes"] and _digest(path) == entry["sha256"]
    except OSError:
        return False


def _journal_paths(stem):
    """{suffix: path} of a committed journal whose files are all there (final or temporary name), else None."""
    try:
        journal = _read_manifest(stem + JOURNAL_SUFFIX)
    except CheckpointError:
        return None
    if journal is None:
        return None
    folder = os.path.dirname(os.path.abspath(stem))
    paths = {}
    for suffix, entry in journal["files"].items():
        candidates = [stem + suffix]
        if entry.get("staged"):
            candidates.append(os.path.join(folder, entry["staged"]))
        found = next((p for p in candidates if _matches(p, entry)), None)
        if found is None:
            return None
        paths[suffix] = found
    return paths


def resolve(stem: Union[str, os.PathLike], suffixes: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """The files to read of the complete checkpoint `stem`; CheckpointError naming what is wrong.

    Args:
        stem: the checkpoint's path without suffix.
        suffixes: the files wanted, e.g. ['.pdparams']; None for all the manifest lists.

    Returns:
        {suffix: path to read}: the final file, or a committed journal's staged file.
    """
    stem = os.fspath(stem)
    committed = _journal_paths(stem)
    if committed is not None:
        manifest_files = committed
        entries = None
    else:
        manifest = _read_manifest(stem + MANIFEST_SUFFIX)
        if manifest is None:
            folder, base = os.path.split(os.path.abspath(stem))
            present = os.path.isdir(folder) and any(
                name.startswith(base + ".") or name.startswith(f".{base}.") for name in os.listdir(folder))
            why = "the run stopped while writing it" if present else "no such checkpoint"
            hint = _complete_hint(os.path.dirname(stem) or ".")
            raise CheckpointError(f"checkpoint {stem} is incomplete ({why}: {stem}{MANIFEST_SUFFIX} is missing){hint}")
        entries = manifest["files"]
        manifest_files = {suffix: stem + suffix for suffix in entries}
    wanted = list(suffixes or manifest_files)
    for suffix in wanted:
        if suffix not in manifest_files:
            raise CheckpointError(f"checkpoint {stem} has no {suffix} file (it holds {sorted(manifest_files)})")
        if entries is not None:
            path = stem + suffix
            if not os.path.exists(path):
                raise CheckpointError(f"checkpoint file {path} is missing")
            if not _matches(path, entries[suffix]):
                raise CheckpointError(f"checkpoint file {path} is truncated or corrupted (its checksum does not match)")
    return {suffix: manifest_files[suffix] for suffix in wanted}


def verify(stem: Union[str, os.PathLike], suffixes: Optional[Sequence[str]] = None) -> None:
    """Raise CheckpointError unless the checkpoint `stem` is complete and its files are intact.

    Args:
        stem: the checkpoint's path without suffix.
        suffixes: the files to check; None for all the manifest lists.
    """
    resolve(stem, suffixes)


def is_complete(stem: Union[str, os.PathLike]) -> bool:
    """Whether `verify(stem)` passes.

    Args:
        stem: the checkpoint's path without suffix.

    Returns:
        True when the checkpoint is complete and intact.
    """
    try:
        verify(stem)
    except CheckpointError:
        return False
    return True


def checkpoint_info(stem: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The `info` a checkpoint's committed journal or manifest holds.

    Args:
        stem: the checkpoint's path without suffix.

    Returns:
        The info dict; {} when neither file is readable or holds one.
    """
    for suffix in (JOURNAL_SUFFIX, MANIFEST_SUFFIX):
        try:
            manifest = _read_manifest(stem + suffix)
        except CheckpointError:
            continue
        if manifest is not None and isinstance(manifest.get("info"), dict):
            return manifest["info"]
    return {}


def _order(stem):
    """Sort key: the recorded step, then the epoch number of the name (model_final after epochs)."""
    info = checkpoint_info(stem)
    step = info.get("global_step")
    step = step if isinstance(step, int) and not isinstance(step, bool) else -1
    base = os.path.basename(stem)
    number = int(base) if base.isdigit() else (float("inf") if base == "model_final" else -1)
    return (step, number, base)


def complete_checkpoints(folder: Union[str, os.PathLike], suffix: Optional[str] = None) -> List[str]:
    """The complete checkpoints in `folder`, oldest first: in the order of the training step
    recorded in their manifest, then of their epoch number.

    Args:
        folder: the folder to list; a missing one has none.
        suffix: only checkpoints holding this file (e.g. '.pdopt'); None for all.

    Returns:
        Their stems (paths without suffix).
    """
    if not os.path.isdir(folder):
        return []
    stems = set()
    for name in os.listdir(folder):
        for ending in (MANIFEST_SUFFIX, JOURNAL_SUFFIX):
            if name.endswith(ending) and not name.startswith("."):
                stems.add(os.path.join(folder, name[: -len(ending)]))
    complete = []
    for stem in stems:
        try:
            resolve(stem, [suffix] if suffix else None)
        except CheckpointError:
            continue
        complete.append(stem)
    return sorted(complete, key=_order)


def _complete_hint(folder):
    """The complete checkpoints of `folder` for a message: the resumable ones (with a .pdopt) in step
    order, then the weight-only ones (best_model)."""
    stems = complete_checkpoints(folder)
    resumable = set(complete_checkpoints(folder, ".pdopt"))
    names = [os.path.basename(s) for s in stems if s in resumable]
    names += [os.path.basename(s) for s in stems if s not in resumable]
    return f"; complete checkpoints there: {', '.join(names)}" if names else ""


def _pid_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(folder: Union[str, os.PathLike]) -> None:
    """Finish the commits that killed writers left half done in `folder` (a journal whose files are all
    there), drop journals that never completed, then remove dead writers' temporary files. Call it only
    while no other process writes to `folder` (the trainer holds the run lock).

    Args:
        folder: the checkpoint folder; a missing one is left alone.
    """
    if not os.path.isdir(folder):
        return
    for name in sorted(os.listdir(folder)):
        if name.endswith(JOURNAL_SUFFIX) and not name.startswith("."):
            stem = os.path.join(folder, name[: -len(JOURNAL_SUFFIX)])
            if _journal_paths(stem) is not None:
                _finish_commit(stem, _read_manifest(stem + JOURNAL_SUFFIX))
            else:
                _remove_quietly(stem + JOURNAL_SUFFIX)
    remove_stale_temporaries(folder)


def remove_stale_temporaries(folder: Union[str, os.PathLike]) -> List[str]:
    """Remove `.<name>.tmp-<pid>` files and folders in `folder` whose writer (pid) is not alive.

    Args:
        folder: the folder to clean (it must exist).

    Returns:
        The paths removed.
    """
    removed = []
    for name in os.listdir(folder):
        match = _TEMPORARY.match(name)
        if match and not _pid_alive(int(match.group(1))):
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                _remove_quietly(path)
            removed.append(path)
    return removed


def safe_load(path: Union[str, os.PathLike], what: str = "checkpoint") -> Any:
    """paddle.load with one clear CheckpointError for a missing, truncated or corrupted file.

    Args:
        path: the file to load.
        what: what the file is, for the error message.

    Returns:
        What paddle.load returns.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{what}: {path} is a folder, not a file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{what}: {path} does not exist")
    try:
        return paddle.load(path)
    except MemoryError:
        raise CheckpointError(f"{what}: {path} cannot be read: loading it ran out of memory") from None
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EIO):
            raise CheckpointError(f"{what}: {path} cannot be read ({exc.strerror})") from None
        raise CheckpointError(
            f"{what}: {path} cannot be read: it is truncated, corrupted or not a Paddle file ({type(exc).__name__})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - pickle and Paddle raise many kinds for a bad file
        raise CheckpointError(
            f"{what}: {path} cannot be read: it is truncated, corrupted or not a Paddle file "
            f"({type(exc).__name__})"
        ) from None
