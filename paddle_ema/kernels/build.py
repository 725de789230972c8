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
from pathlib import Path

import paddle

__all__ = ["BuildError", "cache_dir", "library_path", "load_extension"]

LIBRARY_NAME = "paddle_ema_ops"
SOURCE_DIR = Path(__file__).with_name("csrc")
CPU_SOURCES = ("ema_ops.cc", "ema_python.cc", "ema_ppdet.cc")
CUDA_SOURCES = ("ema_ops.cu",)
HEADERS = ("ema_ops.h", "ema_segments.h", "ema_cuda_kernel.cuh")
# -ffp-contract=off: the update must be a + w * (x - a) rounded step by step, as paddle.lerp_
# computes it, never fused into an FMA that rounds differently.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
CUDA_FLAGS = ["-O3", "--fmad=false"]
BUILD_TIMEOUT_S = 900


def _link_flags():
    """OpenMP runtime to link: Paddle's own libiomp5 when its wheel ships one, else GNU libgomp.

    Sharing Paddle's runtime means sharing its (already spinning) worker threads: with a second
    runtime, two thread pools fight over the cores and the update stalls for a scheduler tick
    whenever Paddle's threads are busy-waiting, which is always right after a training step.
    """
    libs = Path(paddle.__file__).parent / "libs"
    if (libs / "libiomp5.so").exists():
        return [f"-L{libs}", "-Wl,--no-as-needed", "-l:libiomp5.so", "-Wl,--as-needed", f"-Wl,-rpath,{libs}"]
    return ["-fopenmp"]


class BuildError(RuntimeError):
    """The extension could not be compiled or loaded; the message says why."""


def cache_dir():
    """Where compiled libraries are kept (see the module docstring for the order)."""
    explicit = os.environ.get("PADDLE_EMA_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "paddle_ema"


def with_cuda():
    """Compile the CUDA kernel too: Paddle is a CUDA build and nvcc is there."""
    if not paddle.is_compiled_with_cuda():
        return False
    from paddle.utils.cpp_extension.extension_utils import find_cuda_home

    home = find_cuda_home()
    return bool(home) and os.path.exists(os.path.join(home, "bin", "nvcc"))


def _sources(cuda):
    return [SOURCE_DIR / name for name in CPU_SOURCES + (CUDA_SOURCES if cuda else ())]


def _build_key(cuda):
    digest = hashlib.sha256()
    for path in _sources(cuda) + [SOURCE_DIR / name for name in HEADERS]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    commit = getattr(getattr(paddle, "version", None), "commit", "")
    for part in (CXX_FLAGS, CUDA_FLAGS, _link_flags(), paddle.__version__, commit, sys.version_info[:2], cuda):
        digest.update(repr(part).encode() + b"\0")
    return digest.hexdigest()[:16]


def library_path():
    """The cached library for this Paddle and these sources (it may not exist yet)."""
    cuda = with_cuda()
    name = f"{LIBRARY_NAME}-paddle{paddle.__version__}-{'cuda' if cuda else 'cpu'}-{_build_key(cuda)}.so"
    return cache_dir() / name


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


def _compile(target):
    """Compile the sources into `target` (written by an atomic rename)."""
    cuda = with_cuda()
    if _compiler() is None:
        raise BuildError(
            "no C++ compiler found (looked for $CXX, Python's configured CXX, then c++); "
            "install g++ or clang++ to get the fused kernel"
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
                link=_link_flags(),
                out=str(out),
            )
        )
        try:
            result = subprocess.run(
                [sys.executable, "setup.py", "build"],
                cwd=work,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=BUILD_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BuildError(f"the compiler could not run: {exc}") from None
        built = sorted(out.glob("*.so")) if out.is_dir() else []
        if result.returncode != 0 or not built:
            tail = "\n".join(result.stdout.strip().splitlines()[-15:])
            raise BuildError(f"compiling {', '.join(p.name for p in _sources(cuda))} failed:\n{tail}")
        os.replace(built[0], target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load_extension():
    """The library's Python module, compiled first if this Paddle and these sources have none cached.

    Also registers its operators with Paddle (once per process is the caller's business).
    """
    import importlib.util

    from paddle.utils.cpp_extension import load_op_meta_info_and_register_op

    target = library_path()
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with _FileLock(target.with_suffix(".lock")):
                if not target.exists():  # another process may have built it while we waited
                    print(
                        f"paddle_ema: compiling the fused EMA kernel once for Paddle {paddle.__version__} "
                        f"(about 15-60 s) into {target.parent} ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    _compile(target)
        except OSError as exc:  # an unwritable cache directory, a full disk...
            raise BuildError(f"cannot build into {target.parent}: {exc}") from None
    try:
        load_op_meta_info_and_register_op(str(target))
        # The module's name is the one compiled in (PADDLE_EXTENSION_NAME), whatever the file's.
        spec = importlib.util.spec_from_file_location(LIBRARY_NAME, target)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as exc:  # a corrupt or incompatible library: say so, the caller falls back
        raise BuildError(f"cannot load {target}: {exc}") from None
    return module
