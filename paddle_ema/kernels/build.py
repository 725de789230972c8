"""Builds the fused kernels' extension (csrc/) on first use and caches it for later processes.

The shared library is compiled just in time with Paddle's own `paddle.utils.cpp_extension`
machinery (its compiler flags, include paths and ABI checks) and kept in a user cache directory:

    $PADDLE_EMA_CACHE_DIR, else $XDG_CACHE_HOME/paddle_ema, else ~/.cache/paddle_ema

under a name made of the Paddle version and a hash of everything that changes the binary (the
sources, the flags, Paddle's version and commit, the Python version, CPU or CUDA). A later process
finds the library there and loads it without compiling. Several processes that start at once are
safe: one compiles while the others wait on a file lock, and the library appears under its final
name only by an atomic rename, so nobody ever loads a half-written file.

`load_extension()` registers the library's operators (for static programs) with Paddle and returns
its Python module (the dygraph functions, ema_python.cc); it raises `BuildError` (with the
compiler's output) when there is no compiler or the build fails, and the caller decides what to do.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path
from types import ModuleType
from typing import List, Optional

import paddle

from .. import environment

__all__ = ["BuildError", "cache_dir", "library_path", "build_key", "failure_path", "load_extension", "forget_builds",
           "clean_stale", "REBUILD_ENV"]

LIBRARY_NAME = "paddle_ema_ops"
SOURCE_DIR = Path(__file__).with_name("csrc")
CPU_SOURCES = ("ema_ops.cc", "ema_python.cc", "ema_update.cc", "ema_guard.cc", "ema_simd.cc")
CUDA_SOURCES = ("ema_ops.cu",)
HEADERS = ("ema_compat.h", "ema_half.h", "ema_parallel.h", "ema_segments.h", "ema_simd.h", "ema_tensors.h",
           "ema_update.h", "ema_cuda_kernel.cuh")
# -ffp-contract=off: the update must be a + w * (x - a) rounded step by step, as paddle.lerp_
# computes it, never fused into an FMA that rounds differently.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
CUDA_FLAGS = ["-O3", "--fmad=false"]
BUILD_TIMEOUT_S = 900
# What a first build costs, as docs/install.md measured it; shown while the compiler runs.
USUAL_BUILD_TIME = "usually under 2 minutes, more on a busy machine"
# While compiling: on a terminal one line rewritten every second, otherwise a line this often.
PROGRESS_EVERY_S = 10.0
# Set to 1 to try again a build that failed before (the failure is remembered otherwise).
REBUILD_ENV = environment.REBUILD


def _paddle_libs():
    return Path(paddle.__file__).parent / "libs"


def _uses_paddle_openmp():
    return (_paddle_libs() / "libiomp5.so").exists()


def _link_flags():
    """OpenMP runtime to link: Paddle's own libiomp5 when its wheel ships one, else GNU libgomp.

    Sharing Paddle's runtime means sharing its (already spinning) worker threads: with a second
    runtime, two thread pools fight over the cores and the update stalls for a scheduler tick
    whenever Paddle's threads are busy-waiting, which is always right after a training step.
    The library records only the runtime's name (no rpath): `_preload_openmp` finds it at load
    time in whichever Paddle is installed, so one cached build serves every environment with
    the same Paddle version.
    """
    if _uses_paddle_openmp():
        return ["-Wl,--no-as-needed", "-l:libiomp5.so", "-Wl,--as-needed"]
    return ["-fopenmp"]


def _link_search_flags():
    """Where the linker finds libiomp5.so at build time; not part of the build key."""
    return [f"-L{_paddle_libs()}"] if _uses_paddle_openmp() else []


def _preload_openmp():
    """Loads Paddle's libiomp5 by path, so the library's `NEEDED libiomp5.so` resolves to it
    (the dynamic linker matches an already loaded soname) wherever Paddle is installed."""
    if _uses_paddle_openmp():
        import ctypes

        ctypes.CDLL(str(_paddle_libs() / "libiomp5.so"), mode=ctypes.RTLD_GLOBAL)


class BuildError(RuntimeError):
    """The extension could not be compiled or loaded; the message says why."""


def cache_dir() -> Path:
    """Where compiled libraries are kept (see the module docstring for the order).

    Returns:
        $PADDLE_EMA_CACHE_DIR, else $XDG_CACHE_HOME/paddle_ema, else ~/.cache/paddle_ema.
    """
    explicit = os.environ.get("PADDLE_EMA_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "paddle_ema"


def with_cuda():
    """Compile the CUDA kernel too: Paddle is a CUDA build and nvcc is there."""
    if not paddle.is_compiled_with_cuda():
        return False
    from .. import _compat

    home = _compat.find_cuda_home()
    return bool(home) and os.path.exists(os.path.join(home, "bin", "nvcc"))


def _sources(cuda):
    return [SOURCE_DIR / name for name in CPU_SOURCES + (CUDA_SOURCES if cuda else ())]


def _build_key(cuda):
    """A hash of everything that changes the binary, and nothing that does not (no install paths)."""
    digest = hashlib.sha256()
    for path in _sources(cuda) + [SOURCE_DIR / name for name in HEADERS]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    commit = getattr(getattr(paddle, "version", None), "commit", "")
    for part in (CXX_FLAGS, CUDA_FLAGS, _link_flags(), paddle.__version__, commit, sys.version_info[:2], cuda):
        digest.update(repr(part).encode() + b"\0")
    return digest.hexdigest()[:16]


def build_key() -> str:
    """The key of the library this process would load (see `_build_key`).

    Returns:
        16 hexadecimal digits of a hash of the sources, flags and versions.
    """
    return _build_key(with_cuda())


def _flavour(cuda):
    """The part of a library's name shared by all its builds for this Paddle and Python."""
    return f"{LIBRARY_NAME}-paddle{paddle.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-" \
           f"{'cuda' if cuda else 'cpu'}"


def library_path() -> Path:
    """The cached library for this Paddle and these sources.

    Returns:
        Its path in `cache_dir()` (the file may not exist yet).
    """
    cuda = with_cuda()
    return cache_dir() / f"{_flavour(cuda)}-{_build_key(cuda)}.so"


def failure_path(target: Optional[Path] = None) -> Path:
    """Where a failed build of `target` is remembered.

    Args:
        target: a library path; None for this process's, `library_path()`.

    Returns:
        The target's path with the suffix '.failed'.
    """
    return (target or library_path()).with_suffix(".failed")


def _compiler():
    """The C++ compiler distutils will call, or None when it is not installed."""
    command = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    program = command.split()[0]
    return shutil.which(program)


class _FileLock:
    """An exclusive lock on `path` across processes (fcntl); a no-op where fcntl is missing,
    which stays safe, only slower: each process then builds its own copy and renames it."""

    def __init__(self, path):
        self.path = path
        self._file = None

    def __enter__(self):
        self._file = open(self.path, "a+b")
        try:
            import fcntl
        except ImportError:
            return self
        fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc_info):
        self._file.close()  # closing releases the lock
        return False


_SETUP_TEMPLATE = """
from paddle.utils.cpp_extension import BuildExtension, {extension}, setup

setup(
    name={name!r},
    ext_modules=[{extension}(
        sources={sources!r},
        extra_compile_args={{"cxx": {cxx!r}, "nvcc": {nvcc!r}}},
        extra_link_args={link!r},
    )],
    cmdclass={{"build_ext": BuildExtension.with_options(output_dir={out!r}, no_python_abi_suffix=True)}},
)
"""


class _BuildProgress:
    """Says on `stream` that the compiler is still running and for how long: a line rewritten once
    a second on a terminal, a new line every PROGRESS_EVERY_S seconds otherwise (a log file)."""

    def __init__(self, stream):
        self.stream = stream
        isatty = getattr(stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.every = 1.0 if self.tty else PROGRESS_EVERY_S
        self.shown, self.width = 0.0, 0

    def _show(self, text, end=""):
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width) + end)
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def tick(self, elapsed):
        """The compiler has run `elapsed` seconds; shows it when the next update is due."""
        if elapsed - self.shown >= self.every:
            self.shown = elapsed
            self._show(f"paddle_ema: still compiling, {elapsed:.0f} s ({USUAL_BUILD_TIME})")

    def done(self, elapsed, ok):
        """The compiler has finished (ok) or failed, after `elapsed` seconds."""
        self._show(f"paddle_ema: compiled in {elapsed:.0f} s" if ok else
                   f"paddle_ema: compiling failed after {elapsed:.0f} s", end="\n")


def _wait(process, progress, timeout, clock=time.monotonic, poll_s=1.0):
    """`process`'s exit status, with `progress` told the elapsed time while it runs; BuildError
    (the process killed) once it runs past `timeout` seconds."""
    start = clock()
    try:
        while True:
            try:
                status = process.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                elapsed = clock() - start
                if elapsed > timeout:
                    raise BuildError(f"the compiler did not finish within {timeout} s") from None
                progress.tick(elapsed)
    except BaseException:
        process.kill()
        process.wait()
        progress.done(clock() - start, ok=False)
        raise
    progress.done(clock() - start, ok=status == 0)
    return status


def _compile(target):
    """Compile the sources into `target` (written by an atomic rename)."""
    cuda = with_cuda()
    if _compiler() is None:
        raise BuildError(
            "no C++ compiler found (looked for $CXX, Python's configured CXX, then c++); "
            "install g++ or clang++ to get the fused kernel"
        )
    print(
        f"paddle_ema: compiling the fused EMA kernel for Paddle {paddle.__version__} "
        f"(once per Paddle version and source) into {target.parent} ...",
        file=sys.stderr,
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix=f"{LIBRARY_NAME}-build-", dir=target.parent))
    try:
        out = work / "out"
        (work / "setup.py").write_text(
            textwrap.dedent(_SETUP_TEMPLATE).format(
                extension="CUDAExtension" if cuda else "CppExtension",
                name=LIBRARY_NAME,
                sources=[str(path) for path in _sources(cuda)],
                cxx=CXX_FLAGS + (["-DPADDLE_EMA_WITH_CUDA"] if cuda else []),
                nvcc=CUDA_FLAGS + ["-DPADDLE_EMA_WITH_CUDA"],
                link=_link_search_flags() + _link_flags(),
                out=str(out),
            )
        )
        # The compiler's output goes to a file, read once it has finished: a pipe nobody reads
        # while the progress loop waits could fill and stall the build.
        with open(work / "build.log", "w+", encoding="utf-8", errors="replace") as log:
            try:
                process = subprocess.Popen([sys.executable, "setup.py", "build"], cwd=work, stdout=log,
                                           stderr=subprocess.STDOUT)
            except OSError as exc:
                raise BuildError(f"the compiler could not run: {exc}") from None
            status = _wait(process, _BuildProgress(sys.stderr), BUILD_TIMEOUT_S)
            log.seek(0)
            output = log.read()
        built = sorted(out.glob("*.so")) if out.is_dir() else []
        if status != 0 or not built:
            tail = "\n".join(output.strip().splitlines()[-15:])
            raise BuildError(f"compiling {', '.join(p.name for p in _sources(cuda))} failed:\n{tail}")
        os.replace(built[0], target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _remember_failure(target, reason):
    try:
        failure_path(target).write_text(reason + "\n", encoding="utf-8")
    except OSError:
        pass  # not remembered: the next process tries again, no worse than before


def _remembered_failure(target):
    """The reason an earlier process gave for failing to build `target`, or None."""
    if environment.rebuild_requested():
        return None
    try:
        reason = failure_path(target).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return (
        f"{reason}\n(remembered from an earlier build for Paddle {paddle.__version__}: {failure_path(target)}; "
        f"set {REBUILD_ENV}=1 or run `python -m paddle_ema.kernels --rebuild` to try again)"
    )


def forget_builds() -> None:
    """Removes this Paddle's cached library and remembered failure, so the next load builds anew."""
    target = library_path()
    for path in (target, failure_path(target)):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


STALE_TEMP_S = 24 * 3600


def clean_stale(keep: Path) -> List[Path]:
    """Removes what no process will load again: builds of this Paddle, Python and device from
    other sources (an older paddle_ema), their failure notes, and build folders or lock files
    left by processes that were killed a day ago or more. Builds for other Paddle or Python
    versions stay: another environment may be using them. Errors are ignored (a racing process
    may remove the same files).

    Args:
        keep: the library just built; its folder is the one cleaned.

    Returns:
        The paths removed.
    """
    folder, prefix = keep.parent, keep.name.rsplit("-", 1)[0] + "-"
    name_, version, _, device, _ = keep.stem.split("-")
    legacy = f"{name_}-{version}-{device}-"  # paddle_ema 0.1's names, which had no Python version
    now = time.time()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    removed = []
    for path in entries:
        name = path.name
        try:
            if (name.startswith(prefix) or name.startswith(legacy)) and path.suffix in (".so", ".failed") \
                    and path.stem != keep.stem:
                path.unlink()
            elif name.startswith(f"{LIBRARY_NAME}-build-") and now - path.stat().st_mtime > STALE_TEMP_S:
                shutil.rmtree(path)
            elif name.startswith(LIBRARY_NAME) and path.suffix == ".lock" and now - path.stat().st_mtime > STALE_TEMP_S:
                path.unlink()
            else:
                continue
            removed.append(path)
        except OSError:
            pass
    return removed


def _build(target):
    """Compiles `target` unless another process did meanwhile; remembers a failure. The lock file
    goes once the build is decided: a process still waiting on it checks again what exists."""
    lock = target.with_suffix(".lock")
    try:
        with _FileLock(lock):
            if target.exists():  # another process built it while we waited
                return
            remembered = _remembered_failure(target)
            if remembered is not None:
                raise BuildError(remembered)
            try:
                _compile(target)
            except BuildError as exc:
                if _compiler() is not None:  # installing a compiler is its own retry
                    _remember_failure(target, str(exc))
                raise
            try:
                failure_path(target).unlink()
            except FileNotFoundError:
                pass
            clean_stale(target)
    finally:
        try:
            lock.unlink()
        except OSError:
            pass


def load_extension() -> ModuleType:
    """Load the extension, compiled first if this Paddle and these sources have none cached.

    Also registers its operators with Paddle (once per process is the caller's business). Raises
    BuildError saying why when it cannot be built or loaded.

    Returns:
        The library's Python module (the dygraph functions of ema_python.cc).
    """
    import importlib.util

    from .. import _compat

    target = library_path()
    if not target.exists():
        remembered = _remembered_failure(target)
        if remembered is not None:
            raise BuildError(remembered)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _build(target)
        except OSError as exc:  # an unwritable cache directory, a full disk...
            raise BuildError(f"cannot build into {target.parent}: {exc}") from None
    try:
        _preload_openmp()
        _compat.register_custom_ops(target)
        # The module's name is the one compiled in (PADDLE_EXTENSION_NAME, see ema_compat.h).
        spec = importlib.util.spec_from_file_location(LIBRARY_NAME, target)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as exc:  # a corrupt or incompatible library: say so, the caller falls back
        raise BuildError(f"cannot load {target}: {exc}") from None
    return module
