"""The run folder of tools/train.py: one writer at a time, writable before anything trains.

- `RunLock`: `fcntl.flock` on `<run folder>/.lock`, which holds the holder's PID. A second run on
  the same folder is refused naming that PID. The kernel drops the lock when its process dies, so
  a lock file left by a killed run is stale: the next run takes it over. The holder removes the
  file when it ends (still holding the lock; a waiting process re-checks that the file it locked is
  still the one at the path).
- `check_writable`: creates the folders and writes, fsyncs and removes a probe file in each, so a
  read-only, full or misnamed location fails in the first second, not after an epoch.
Both raise `OutputError` (a PaddleEMAError: one line, exit status 2 in the tools).
"""

import errno
import fcntl
import os

from ..errors import PaddleEMAError

__all__ = ["OutputError", "RunLock", "check_writable", "describe_os_error", "LOCK_NAME"]

LOCK_NAME = ".lock"


class OutputError(PaddleEMAError):
    """An output location cannot be written, or is in use by another run."""


_HINTS = {
    errno.ENOSPC: "the file system is full; free space or choose another folder",
    errno.EDQUOT: "the disk quota is exhausted; free space or choose another folder",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.EACCES: "permission denied; choose a folder this user may write",
    errno.EPERM: "permission denied; choose a folder this user may write",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f); raise the limit",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "the path is a folder; give a file name",
    errno.ENAMETOOLONG: "the path is too long; choose a shorter one",
    errno.EEXIST: "a file of that name is in the way; choose another path",
    errno.ELOOP: "the path has a symbolic link loop; choose another path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
    errno.EIO: "an input/output error of the device",
}


def describe_os_error(exc, what=None):
    """One line for an OSError: the path, what went wrong and what to do."""
    path = exc.filename if exc.filename is not None else what
    reason = exc.strerror or type(exc).__name__
    hint = _HINTS.get(exc.errno)
    where = f"{what} " if what and path != what else ""
    text = f"{where}{path}: {reason}" if path is not None else reason
    return f"{text} ({hint})" if hint else text


def _make_folders(folder):
    """os.makedirs, returning the folders it created (outermost first)."""
    created, current = [], os.path.abspath(folder)
    while not os.path.exists(current):
        created.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    if os.path.exists(current) and not os.path.isdir(current):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), current)
    for path in reversed(created):
        os.mkdir(path)
    return list(reversed(created))


def remove_created(folders):
    """Remove the folders `_make_folders` created, innermost first, where they are still empty."""
    for path in reversed(folders):
        try:
            os.rmdir(path)
        except OSError:
            break


def check_writable(folder, what):
    """Create `folder` if needed and write a probe file there; returns the folders created.
    OutputError naming `what` (e.g. 'output_dir') and the path when that fails."""
    created = []
    try:
        created = _make_folders(folder)
        probe = os.path.join(folder, f".write-probe.tmp-{os.getpid()}")
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 512)
                f.flush()
                os.fsync(f.fileno())
        finally:
            if os.path.exists(probe):
                os.remove(probe)
    except OSError as exc:
        remove_created(created)
        raise OutputError(f"{what}: cannot write to {folder}: {describe_os_error(exc)}") from None
    return created


class RunLock:
    """An exclusive lock on a run folder for this process (see the module's docstring)."""

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.fd = None

    def acquire(self):
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(f"output_dir: cannot create the run lock: {describe_os_error(exc)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_pid(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    who = f"PID {holder}" if holder else "another process"
                    raise OutputError(f"output_dir: {self.folder} is in use by another training run ({who} holds "
                                      f"{self.path}); wait for it to end, or choose another output_dir") from None
                raise OutputError(f"output_dir: cannot lock {self.path}: {describe_os_error(exc)}") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file between our open and our lock: lock the new one
                os.close(fd)
                continue
            break
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise OutputError(f"output_dir: cannot write the run lock: {describe_os_error(exc)}") from None
        self.fd = fd
        return self

    def release(self):
        if self.fd is None:
            return
        try:
            os.remove(self.path)  # while still holding the lock: see acquire's inode check
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __del__(self):
        self.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()


def _read_pid(fd):
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
