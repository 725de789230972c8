"""The run folder of tools/train.py: one writer at a time, writable before anything trains.

- `RunLock`: `fcntl.flock` on `<run folder>/.lock`, which holds the holder's PID. A second run on
  the same folder is refused naming that PID. The kernel drops the lock when its process dies, so
  a lock file left by a killed run is stale: the next run takes it over. The holder removes the
  file when it ends (still holding the lock; a waiting process re-checks that the file it locked is
  still the one at the path). The lock is opened with O_NOFOLLOW and must be a regular file with
  one link: a link planted at `.lock` is refused, never followed or truncated.
- `check_writable`: creates the folders and writes, fsyncs and removes a probe file in each
  (created O_EXCL|O_NOFOLLOW under a random name), so a read-only, full or misnamed location
  fails in the first second, not after an epoch.
- `refuse_planted_links`: a run folder holds only regular files the tools wrote: a symbolic link
  or a non-regular file at a name they write (`*.pdparams`, manifests, `curves.png`, the
  `posthoc` and `vdl` folders, ...) is refused before anything trains.
All raise `OutputError` (a PaddleEMAError: one line, exit status 2 in the tools).
"""

import errno
import fcntl
import os
import re
import stat
import tempfile

from ..errors import PaddleEMAError

__all__ = ["OutputError", "RunLock", "check_writable", "describe_os_error", "refuse_planted_links", "LOCK_NAME"]

LOCK_NAME = ".lock"
# Names the tools write in a run folder (and in its `posthoc` folder): files, and the folders below.
OWNED_FILE = re.compile(r"^[^.].*\.(pdparams|pdema|pdopt|json|json\.next)$|^curves\.png$")
OWNED_FOLDERS = ("posthoc", "vdl")


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
        fd, probe = tempfile.mkstemp(prefix=f".write-probe.tmp-{os.getpid()}-", dir=folder)  # O_EXCL|O_NOFOLLOW
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"\0" * 512)
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.remove(probe)
    except OSError as exc:
        remove_created(created)
        raise OutputError(f"{what}: cannot write to {folder}: {describe_os_error(exc)}") from None
    return created


def _planted(path, folder_expected):
    """What is wrong with `path` (a name the tools write), or None: links and other kinds are refused."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if folder_expected:
        return None if stat.S_ISDIR(mode) else "not a folder"
    return None if stat.S_ISREG(mode) else ("a folder" if stat.S_ISDIR(mode) else "not a regular file")


def refuse_planted_links(folder, what="output_dir"):
    """OutputError naming the first name in the run `folder` (and its `posthoc` folder) that the tools
    write but that holds a symbolic link or something else than they would put there."""
    paths = []
    for sub in ("", "posthoc"):
        where = os.path.join(folder, sub) if sub else folder
        if sub and (not os.path.isdir(where) or os.path.islink(where)):
            continue
        try:
            names = sorted(os.listdir(where))
        except FileNotFoundError:
            continue
        paths += [(os.path.join(where, n), False) for n in names if OWNED_FILE.match(n)]
        if not sub:
            paths += [(os.path.join(where, n), True) for n in OWNED_FOLDERS if n in names]
    for path, folder_expected in paths:
        problem = _planted(path, folder_expected)
        if problem:
            raise OutputError(f"{what}: {path} is {problem}; a run folder holds only the files and folders the "
                              "tools write (remove it, or choose another output_dir)")


class RunLock:
    """An exclusive lock on a run folder for this process (see the module's docstring)."""

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.fd = None

    def acquire(self):
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        while True:
            try:
                fd = os.open(self.path, flags, 0o644)
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
                    raise OutputError(f"output_dir: {self.path} is a symbolic link; the run lock is a regular file the "
                                      "trainer creates (remove the link)") from None
                raise OutputError(f"output_dir: cannot create the run lock: {describe_os_error(exc)}") from None
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                os.close(fd)
                what = "a file with other hard links" if stat.S_ISREG(info.st_mode) else "not a regular file"
                raise OutputError(f"output_dir: {self.path} is {what}; the run lock is a regular file the trainer "
                                  "creates (remove it)")
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
                same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
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
