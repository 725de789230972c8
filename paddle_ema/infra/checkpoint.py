"""Crash-safe checkpoint files.

Every write goes to a temporary file in the target's folder, is flushed and fsynced, then renamed
over the target (rename is atomic on POSIX file systems), and the folder is fsynced so the rename
itself survives a power cut. A reader therefore sees either the old file or the new one, never a
mix.

A checkpoint of several files (PaddleDetection's `<stem>.pdparams`, `.pdema`, `.pdopt`) is made
complete by a manifest, `<stem>.manifest.json`, that lists each file's size and SHA-256. A stem is
replaced only once its successor is complete, in three steps:

1. every new file is written under a new temporary name `.<stem><suffix>.tmp-<pid>-<random>`
   and fsynced (a full disk or a kill here leaves the old checkpoint untouched);
2. the new manifest is written, atomically, as `<stem>.manifest.json.next` (the journal): from
   here the new checkpoint is committed;
3. the new files are renamed over the old ones, then the journal over the manifest.

A reader (`verify`, `resolve`) that finds a journal whose files are all present, under their final
or temporary names, with the journal's checksums, reads the new checkpoint; otherwise the old
manifest decides. So at every moment one complete checkpoint is loadable, and `recover` (run by the
trainer while it holds the run folder's lock) finishes a commit a killed writer left half done and
removes the temporary files of writers that are no longer alive.

No write follows a link: every file is created with O_CREAT|O_EXCL|O_NOFOLLOW under an
unpredictable name and renamed into place, and a symbolic link or a non-regular file at a name
about to be replaced is refused (CheckpointError), never replaced or written through. No read
runs code: `safe_load` reads paddle.save's files with an allow-listing unpickler
(paddle_ema.restricted_pickle).
"""

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Union

from .. import _compat, environment
from ..core.validation import is_integer
from ..errors import CheckpointError
from . import restricted_pickle

__all__ = [
    "atomic_save",
    "atomic_write",
    "check_replaceable",
    "staged_prefix",
    "atomic_write_text",
    "safe_load",
    "save_checkpoint",
    "verify",
    "resolve",
    "is_complete",
    "complete_checkpoints",
    "checkpoint_info",
    "listed_suffixes",
    "recover",
    "remove_stale_temporaries",
    "MANIFEST_SUFFIX",
    "JOURNAL_SUFFIX",
]

MANIFEST_SUFFIX = ".manifest.json"
JOURNAL_SUFFIX = MANIFEST_SUFFIX + ".next"
MANIFEST_FORMAT = "paddle_ema.checkpoint/1"
MANIFEST_MAX_BYTES = 1 << 20
FAULT_SAVE_DELAY = environment.FAULT_SAVE_DELAY
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


def _kind(mode):
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def check_replaceable(path: Union[str, os.PathLike]) -> None:
    """CheckpointError unless `path` is missing or a regular file: paddle_ema never replaces (nor
    writes through) a symbolic link, a folder, a FIFO or a device at a name it writes.

    Args:
        path: a file about to be written.
    """
    path = os.fspath(path)
    try:
        mode = os.lstat(path).st_mode
    except OSError:  # missing, or its folder is (a path through a file): the write reports it
        return
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path} is {_kind(mode)}; paddle_ema replaces only regular files it wrote "
                              "(remove it, or choose another folder)")


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _new_temporary(path):
    """(name, fd) of a new file beside `path`: `.<name>.tmp-<pid>-<random>`, created with
    O_CREAT|O_EXCL|O_NOFOLLOW, so nothing planted at the name (a link) is ever opened."""
    folder, base = os.path.split(os.path.abspath(os.fspath(path)))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(16):
        temporary = os.path.join(folder, f".{base}.tmp-{os.getpid()}-{secrets.token_hex(6)}")
        try:
            return temporary, os.open(temporary, flags, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", os.path.join(folder, f".{base}.tmp-*"))


def _write_temporary(write, target):
    """A new temporary file beside `target` holding what `write(file)` writes, flushed and fsynced;
    its name. On any failure it is removed, and a failed write() is reported naming `target`."""
    temporary, fd = _new_temporary(target)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        _remove_quietly(temporary)
        if exc.filename is None and exc.errno is not None:  # a failed write() names no file: name it
            raise OSError(exc.errno, exc.strerror, os.fspath(target)) from None
        raise
    except BaseException:
        _remove_quietly(temporary)
        raise
    return temporary


def _replace(temporary, path):
    """Rename our `temporary` over `path` (rename never follows a link at `path`)."""
    try:
        check_replaceable(path)
        os.replace(temporary, path)
    except BaseException:
        _remove_quietly(temporary)
        raise


def atomic_write(path: Union[str, os.PathLike], write: Callable[[BinaryIO], Any]) -> None:
    """Write a file crash-safe and without following links: `write(file)` fills a new temporary
    file (O_CREAT|O_EXCL|O_NOFOLLOW, unpredictable name), which is fsynced and renamed over
    `path`, and the folder is fsynced. A link or non-regular file at `path` is refused.

    Args:
        path: the file to write; its folder is created when missing.
        write: called with the open binary file; writes the whole content.
    """
    path = os.fspath(path)
    if not path or os.path.basename(path) in ("", ".", ".."):
        raise CheckpointError(f"cannot write {path!r}: not a file name")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    check_replaceable(path)  # before the work of writing
    _replace(_write_temporary(write, path), path)
    _fsync_dir(folder)


def atomic_save(obj: Any, path: Union[str, os.PathLike]) -> None:
    """paddle.save(obj, path), crash-safe: temporary file, fsync, rename, fsync of the folder.

    Args:
        obj: what paddle.save writes (a state dict, a tensor, ...).
        path: the file to write; its folder is created when missing.
    """
    atomic_write(path, lambda f: _compat.save_to_file(obj, f))


def atomic_write_text(text: str, path: Union[str, os.PathLike]) -> None:
    """Write `text` to `path` in UTF-8, crash-safe like `atomic_save`.

    Args:
        text: the file's whole content.
        path: the file to write; its folder is created when missing.
    """
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


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
        names = sorted(os.listdir(stage))
        for name in names:
            check_replaceable(os.path.join(folder, name))
            with open(os.path.join(stage, name), "rb+") as f:
                os.fsync(f.fileno())
        for name in names:
            os.replace(os.path.join(stage, name), os.path.join(folder, name))
        _fsync_dir(folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _digest(path):
    sha = hashlib.sha256()
    with _open_regular(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


class _Hashing:
    """A binary file's write(), counting and hashing what goes through: a manifest describes the
    bytes written, never what a name holds later."""

    def __init__(self, file):
        self.file, self.sha, self.size = file, hashlib.sha256(), 0

    def write(self, data):
        self.sha.update(data)
        self.size += memoryview(data).nbytes
        return self.file.write(data)

    def flush(self):
        self.file.flush()

    def entry(self):
        return {"bytes": self.size, "sha256": self.sha.hexdigest()}


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
    delay = environment.save_delay()
    for suffix in (*files, MANIFEST_SUFFIX, JOURNAL_SUFFIX):
        check_replaceable(stem + suffix)
    staged, entries = {}, {}
    try:
        for suffix, obj in files.items():
            hashing = []

            def write(f, obj=obj):
                hashing.append(_Hashing(f))
                _compat.save_to_file(obj, hashing[-1])

            temporary = _write_temporary(write, stem + suffix)
            staged[suffix] = temporary
            entries[suffix] = {**hashing[-1].entry(), "staged": os.path.basename(temporary)}
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
        if not entry.get("staged"):  # a journal without staged names (e.g. a copied manifest): files in place
            continue
        temporary = os.path.join(folder, entry["staged"])
        try:
            mode = os.lstat(temporary).st_mode
        except FileNotFoundError:
            continue  # already renamed
        if not stat.S_ISREG(mode):
            raise CheckpointError(f"{temporary} is {_kind(mode)}; a checkpoint's staged file is a regular file "
                                  "paddle_ema wrote (remove it)")
        check_replaceable(stem + suffix)
        os.replace(temporary, stem + suffix)
    _fsync_dir(folder)
    final = {**manifest, "files": {s: {"bytes": e["bytes"], "sha256": e["sha256"]} for s, e in manifest["files"].items()}}
    atomic_write_text(json.dumps(final, indent=1), stem + MANIFEST_SUFFIX)
    _remove_quietly(stem + JOURNAL_SUFFIX)
    _fsync_dir(folder)


@contextlib.contextmanager
def _open_regular(path):
    """A binary file object for reading `path` (links followed), OSError(EINVAL) unless it is a
    regular file: a FIFO or a device at a checkpoint's name never blocks or streams forever."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"it is {_kind(mode)}, not a regular file", path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


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
        with _open_regular(path) as f:
            data = f.read(MANIFEST_MAX_BYTES + 1)
        if len(data) > MANIFEST_MAX_BYTES:
            raise CheckpointError(f"checkpoint manifest {path} is malformed: over {MANIFEST_MAX_BYTES} bytes, a "
                                  f"manifest is at most {MANIFEST_MAX_BYTES}")
        manifest = json.loads(data.decode("utf-8"))
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


def listed_suffixes(stem: Union[str, os.PathLike]) -> List[str]:
    """The file suffixes a checkpoint's journal or manifest lists, without checking the files.

    Args:
        stem: the checkpoint's path without suffix.

    Returns:
        The suffixes (e.g. ['.pdparams', '.pdopt']); [] when neither file is readable.
    """
    stem = os.fspath(stem)
    found = set()
    for suffix in (JOURNAL_SUFFIX, MANIFEST_SUFFIX):
        try:
            manifest = _read_manifest(stem + suffix)
        except CheckpointError:
            continue
        if manifest is not None:
            found.update(manifest["files"])
    return sorted(found)


def _order(stem):
    """Sort key: the recorded step, then the epoch number of the name (model_final after epochs)."""
    info = checkpoint_info(stem)
    step = info.get("global_step")
    step = step if is_integer(step) else -1
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


# Linux's PID_MAX_LIMIT: a temporary name with a larger "PID" (e.g. planted) has no live writer.
_PID_LIMIT = 1 << 22


def _pid_alive(pid):
    if pid == os.getpid():
        return True
    if not 0 < pid <= _PID_LIMIT:
        return False
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
    """Remove `.<name>.tmp-<pid>[-<random>]` files and folders in `folder` whose writer (pid) is not alive.

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


def safe_load(path: Union[str, os.PathLike], what: str = "checkpoint", return_numpy: bool = False) -> Any:
    """paddle.load without running code: a file paddle.save wrote (state dicts, optimizer and LR
    scheduler states, tensors, nested lists and dicts of them, Paddle's RNG state) loads as
    paddle.load gives it, while a pickle that names anything else (`os.system`, `eval` of an
    expression, any class or function outside the allow-list of paddle_ema.restricted_pickle) is
    refused before anything is called. Also one clear CheckpointError for a missing, truncated or
    corrupted file.

    Args:
        path: the file to load.
        what: what the file is, for the error message.
        return_numpy: give numpy arrays instead of tensors (paddle.load's option).

    Returns:
        What paddle.load(path, return_numpy=return_numpy) returns.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{what}: {path} is a folder, not a file")
    if not os.path.lexists(path):
        raise CheckpointError(f"{what}: {path} does not exist")
    if not os.path.exists(path):
        raise CheckpointError(f"{what}: {path} does not exist (a symbolic link to nothing)")
    try:
        with _open_regular(path) as f:
            return restricted_pickle.load(f, return_numpy)
    except restricted_pickle.RefusedGlobal as exc:
        raise CheckpointError(f"{what}: {path} is refused: its pickle asks for {exc.name}, which {exc.why}; nothing "
                              "in it was run (paddle_ema loads only what paddle.save writes)") from None
    except MemoryError:
        raise CheckpointError(f"{what}: {path} cannot be read: loading it ran out of memory") from None
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EIO, errno.EINVAL, errno.EISDIR):
            raise CheckpointError(f"{what}: {path} cannot be read ({exc.strerror})") from None
        raise CheckpointError(
            f"{what}: {path} cannot be read: it is truncated, corrupted or not a Paddle file ({type(exc).__name__})"
        ) from None
    except RecursionError:
        raise CheckpointError(f"{what}: {path} cannot be read: its values are nested too deeply") from None
    except restricted_pickle.UnreadablePickle as exc:
        raise CheckpointError(f"{what}: {path} cannot be read: {exc}; it is not a file paddle.save writes") from None
    except Exception as exc:  # noqa: BLE001 - pickle raises many kinds for a bad file
        raise CheckpointError(
            f"{what}: {path} cannot be read: it is truncated, corrupted or not a Paddle file "
            f"({type(exc).__name__})"
        ) from None
