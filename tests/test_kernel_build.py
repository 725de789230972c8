"""The fused kernels' extension is built once per source and Paddle, across processes: the build
cache, the fallback to Paddle's ops when it cannot be built, `python -m paddle_ema.kernels`, the
kernel mode.

The extension is compiled once for this module, into a temporary cache directory, by two
processes started together (which is itself the concurrency test); the tests that need a built
library load that one. Almost all of the module's time is that one compilation.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_ema import ConfigError, ExponentialMovingAverage, kernels
from paddle_ema.kernels import build, fused

ROOT = Path(__file__).resolve().parents[1]
COMPILING = "paddle_ema: compiling the fused EMA kernel"

# A child process that updates a constant pair through the dispatch and prints what ran.
CHILD = textwrap.dedent(
    """
    import numpy as np, paddle
    from paddle_ema import kernels
    a = [paddle.to_tensor(np.full([1000], 2.0, "float32"))]
    x = [paddle.to_tensor(np.full([1000], 4.0, "float32"))]
    kernels.lerp_(a, x, 0.25)
    print(kernels.active_kernel(), float(a[0][0]))
    """
)


def _child_env(cache):
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), PADDLE_EMA_CACHE_DIR=str(cache), PADDLE_EMA_KERNEL="fused")
    return env


def _run_children(cache, count):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD],
            env=_child_env(cache),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    return [(p.wait(timeout=600), *p.communicate()) for p in procs]


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """A cache directory filled by two processes that built at the same time, and what they printed."""
    cache = tmp_path_factory.mktemp("kernel-cache")
    results = _run_children(cache, 2)
    previous = os.environ.get("PADDLE_EMA_CACHE_DIR")
    os.environ["PADDLE_EMA_CACHE_DIR"] = str(cache)  # this process loads the same library
    yield cache, results
    if previous is None:
        os.environ.pop("PADDLE_EMA_CACHE_DIR", None)
    else:
        os.environ["PADDLE_EMA_CACHE_DIR"] = previous


# --- the build cache ---------------------------------------------------------------------------


def test_concurrent_builds_both_succeed_and_compile_once(built_cache):
    cache, results = built_cache
    for returncode, stdout, stderr in results:
        assert returncode == 0, stderr
        assert stdout.split() == ["fused", "2.5"]
    assert sum(stderr.count(COMPILING) for _, _, stderr in results) == 1
    assert len(list(cache.glob("*.so"))) == 1
    assert not [p for p in cache.iterdir() if p.is_dir()], "a build directory was left behind"
    assert not list(cache.glob("*.lock")), "a lock file was left behind"


def test_second_process_loads_without_rebuilding(built_cache):
    cache, _ = built_cache
    (library,) = cache.glob("*.so")
    before = library.stat()
    ((returncode, stdout, stderr),) = _run_children(cache, 1)
    assert returncode == 0, stderr
    assert stdout.split() == ["fused", "2.5"]
    assert COMPILING not in stderr
    after = library.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("PADDLE_EMA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert build.cache_dir() == tmp_path / "paddle_ema"
    monkeypatch.setenv("PADDLE_EMA_CACHE_DIR", str(tmp_path / "mine"))
    assert build.cache_dir() == tmp_path / "mine"
    assert build.library_path().parent == tmp_path / "mine"
    assert f"paddle{paddle.__version__}" in build.library_path().name


# --- fallback when the extension cannot be built ------------------------------------------------


@pytest.fixture
def unbuilt(monkeypatch, tmp_path):
    """A process state where the extension was never loaded, with an empty cache directory."""
    monkeypatch.setattr(fused, "_state", {"loaded": False, "failure": None})
    monkeypatch.setenv("PADDLE_EMA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels.mode, "_forced", None)
    return tmp_path


def _constant_case():
    averages = [paddle.to_tensor(np.full([3, 4], 1.0, "float32")), paddle.to_tensor(np.zeros([5], "float64"))]
    values = [paddle.to_tensor(np.full([3, 4], 3.0, "float16")), paddle.to_tensor(np.ones([5], "float64"))]
    return averages, values


def test_missing_compiler_warns_and_falls_back(unbuilt, monkeypatch):
    monkeypatch.setenv("CXX", str(unbuilt / "no-such-compiler"))
    monkeypatch.setenv("PADDLE_EMA_KERNEL", "auto")
    averages, values = _constant_case()
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        kernels.lerp_(averages, values, 0.25)
    np.testing.assert_array_equal(averages[0].numpy(), np.full([3, 4], 1.5, "float32"))
    np.testing.assert_array_equal(averages[1].numpy(), np.full([5], 0.25))
    assert kernels.active_kernel() == "reference"
    # Forcing the fused path now says why it cannot be had.
    monkeypatch.setenv("PADDLE_EMA_KERNEL", "fused")
    with pytest.raises(ConfigError, match="cannot be built: no C\\+\\+ compiler"):
        kernels.lerp_(averages, values, 0.25)
    with pytest.raises(RuntimeError, match="fused EMA kernel is unavailable"):
        fused.lerp_(averages, values, 0.25)


def test_unusable_cache_dir_warns_and_falls_back(unbuilt, monkeypatch):
    blocker = unbuilt / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PADDLE_EMA_CACHE_DIR", str(blocker / "cache"))
    averages, values = _constant_case()
    with pytest.warns(RuntimeWarning, match="cannot build into"):
        kernels.lerp_(averages, values, 0.25)
    np.testing.assert_array_equal(averages[1].numpy(), np.full([5], 0.25))


def test_failed_compilation_warns_with_compiler_output_and_falls_back(unbuilt, monkeypatch):
    broken = unbuilt / "csrc"
    broken.mkdir()
    for name in build.CPU_SOURCES + build.HEADERS:
        (broken / name).write_text("this is not C++;\n")
    monkeypatch.setattr(build, "SOURCE_DIR", broken)
    averages, values = _constant_case()
    with pytest.warns(RuntimeWarning, match=r"compiling ema_ops\.cc, ema_python\.cc(, \w+\.cc)* failed"):
        kernels.lerp_(averages, values, 0.25)
    np.testing.assert_array_equal(averages[0].numpy(), np.full([3, 4], 1.5, "float32"))
    assert not list((unbuilt / "cache").glob("*.so"))


def test_reference_mode_never_builds(unbuilt, monkeypatch):
    monkeypatch.setenv("PADDLE_EMA_KERNEL", "reference")
    monkeypatch.setattr(build, "_compile", lambda target: pytest.fail("reference mode compiled"))
    averages, values = _constant_case()
    kernels.lerp_(averages, values, 0.25)
    assert kernels.active_kernel() == "reference"
    np.testing.assert_array_equal(averages[1].numpy(), np.full([5], 0.25))


def test_no_compiler_says_nothing_of_compiling(unbuilt, monkeypatch, capsys):
    monkeypatch.setenv("CXX", str(unbuilt / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        assert kernels.prepare() == "reference"
    assert COMPILING not in capsys.readouterr().err
    assert not list((unbuilt / "cache").glob("*.lock")) if (unbuilt / "cache").exists() else True


def test_fallback_warning_points_at_the_callers_line(unbuilt, monkeypatch):
    monkeypatch.setenv("CXX", str(unbuilt / "no-such-compiler"))
    model = paddle.nn.Linear(3, 2)
    with pytest.warns(RuntimeWarning, match="fused EMA kernel is unavailable") as record:
        ema = ExponentialMovingAverage(model, decay=0.9)  # warns here once it calls kernels.prepare()
        ema.update()
    (warning,) = [w for w in record if issubclass(w.category, RuntimeWarning)]
    assert warning.filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: a second update warns no more
        ema.update()


def test_forced_fused_raises_without_a_fallback_warning(unbuilt, monkeypatch):
    monkeypatch.setenv("CXX", str(unbuilt / "no-such-compiler"))
    monkeypatch.setenv("PADDLE_EMA_KERNEL", "fused")
    averages, values = _constant_case()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(ConfigError, match="cannot be built: no C\\+\\+ compiler"):
            kernels.lerp_(averages, values, 0.25)
    assert not [w for w in record if issubclass(w.category, RuntimeWarning)]


def test_failed_build_is_remembered_until_a_rebuild_is_asked(unbuilt, monkeypatch):
    calls = []

    def failing_compile(target):
        calls.append(target)
        raise build.BuildError("compiling ema_ops.cc failed:\nema_ops.cc:1: error: made up")

    monkeypatch.setattr(build, "_compile", failing_compile)
    monkeypatch.delenv(build.REBUILD_ENV, raising=False)
    with pytest.warns(RuntimeWarning, match="made up"):
        assert kernels.prepare() == "reference"
    assert len(calls) == 1 and build.failure_path().exists()
    assert not list((unbuilt / "cache").glob("*.lock"))
    # A new process (fresh state) neither compiles again nor hides why.
    monkeypatch.setattr(fused, "_state", {"loaded": False, "failure": None})
    with pytest.warns(RuntimeWarning, match="made up(.|\\n)*remembered from an earlier build(.|\\n)*--rebuild"):
        assert kernels.prepare() == "reference"
    assert len(calls) == 1
    # Asking for a rebuild tries again.
    monkeypatch.setattr(fused, "_state", {"loaded": False, "failure": None})
    monkeypatch.setenv(build.REBUILD_ENV, "1")
    with pytest.warns(RuntimeWarning, match="made up"):
        kernels.prepare()
    assert len(calls) == 2


def test_build_key_does_not_depend_on_where_paddle_is_installed(monkeypatch, tmp_path):
    key = build.build_key()
    real = Path(paddle.__file__).parent / "libs"
    elsewhere = tmp_path / "site-packages" / "paddle" / "libs"
    elsewhere.mkdir(parents=True)
    for entry in real.iterdir():
        (elsewhere / entry.name).symlink_to(entry)
    monkeypatch.setattr(build, "_paddle_libs", lambda: elsewhere)
    assert build.build_key() == key
    assert not [flag for flag in build._link_flags() if str(real) in flag or str(elsewhere) in flag]


def test_library_finds_paddles_openmp_by_name(built_cache):
    """The link records libiomp5 by name only; the path comes from the Paddle loaded at run time.
    (Paddle's own build helper still adds a RUNPATH to its install; the libraries it names are
    loaded by `import paddle` first, so the loader takes them by soname wherever they are.)"""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    if not (Path(paddle.__file__).parent / "libs" / "libiomp5.so").exists():
        pytest.skip("this Paddle wheel ships no libiomp5; the library links GNU libgomp")
    cache, _ = built_cache
    (library,) = cache.glob("*.so")
    dynamic = subprocess.run([readelf, "-d", str(library)], capture_output=True, text=True, check=True).stdout
    assert "Shared library: [libiomp5.so]" in dynamic
    assert not [flag for flag in build._link_flags() if os.sep in flag]


def test_stale_builds_are_cleaned(tmp_path):
    keep = tmp_path / "paddle_ema_ops-paddle9.9.9-py311-cpu-0000000000000000.so"
    names = {
        "same-flavour-older-source": "paddle_ema_ops-paddle9.9.9-py311-cpu-1111111111111111.so",
        "its-failure-note": "paddle_ema_ops-paddle9.9.9-py311-cpu-1111111111111111.failed",
        "legacy-name": "paddle_ema_ops-paddle9.9.9-cpu-2222222222222222.so",
        "other-python": "paddle_ema_ops-paddle9.9.9-py312-cpu-3333333333333333.so",
        "other-paddle": "paddle_ema_ops-paddle3.0.0-py311-cpu-4444444444444444.so",
        "fresh-lock": "paddle_ema_ops-paddle3.0.0-py311-cpu-4444444444444444.lock",
        "old-lock": "paddle_ema_ops-paddle3.0.0-py311-cpu-5555555555555555.lock",
        "unrelated": "notes.txt",
    }
    for name in list(names.values()) + [keep.name]:
        (tmp_path / name).write_text("x")
    old_build = tmp_path / "paddle_ema_ops-build-abc"
    fresh_build = tmp_path / "paddle_ema_ops-build-def"
    old_build.mkdir()
    fresh_build.mkdir()
    two_days_ago = time.time() - 2 * 24 * 3600
    for path in (old_build, tmp_path / names["old-lock"]):
        os.utime(path, (two_days_ago, two_days_ago))
    removed = build.clean_stale(keep)
    gone = {"same-flavour-older-source", "its-failure-note", "legacy-name", "old-lock"}
    assert {p.name for p in removed} == {names[k] for k in gone} | {old_build.name}
    for label, name in names.items():
        assert (tmp_path / name).exists() == (label not in gone), label
    assert keep.exists() and fresh_build.exists() and not old_build.exists()


def _kernels_command(cache, **env):
    run_env = dict(os.environ, PYTHONPATH=str(ROOT), PADDLE_EMA_CACHE_DIR=str(cache))
    run_env.pop("PADDLE_EMA_KERNEL", None)
    run_env.update(env)
    return subprocess.run([sys.executable, "-m", "paddle_ema.kernels"], env=run_env, capture_output=True,
                          text=True, timeout=600)


def test_kernels_command_reports_the_cached_build(built_cache):
    cache, _ = built_cache
    (library,) = cache.glob("*.so")
    result = _kernels_command(cache)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert lines["cache"].strip() == str(cache)
    assert lines["library"].strip() == str(library)
    assert lines["build key"].strip() == library.stem.rsplit("-", 1)[1]
    assert lines["kernel"].strip() == "fused (loaded from the cache)"
    assert COMPILING not in result.stderr


def test_kernels_command_says_why_it_falls_back(tmp_path):
    result = _kernels_command(tmp_path / "cache", CXX=str(tmp_path / "no-such-compiler"))
    assert result.returncode == 1, result.stderr
    assert "kernel:     reference, because the fused kernel is unavailable: no C++ compiler found" in result.stdout
    forced = _kernels_command(tmp_path / "cache", CXX=str(tmp_path / "no-such-compiler"), PADDLE_EMA_KERNEL="fused")
    assert forced.returncode == 2
    assert "error: PADDLE_EMA_KERNEL=fused but the fused kernel cannot be built" in forced.stderr


def test_kernel_mode_switch(monkeypatch):
    monkeypatch.setattr(kernels.mode, "_forced", None)
    monkeypatch.delenv("PADDLE_EMA_KERNEL", raising=False)
    assert kernels.kernel_mode() == "auto"
    monkeypatch.setenv("PADDLE_EMA_KERNEL", "Reference")
    assert kernels.kernel_mode() == "reference"
    kernels.set_kernel("fused")
    assert kernels.kernel_mode() == "fused"  # the setter wins over the variable
    kernels.set_kernel(None)
    assert kernels.kernel_mode() == "reference"
    monkeypatch.setenv("PADDLE_EMA_KERNEL", "fast")
    with pytest.raises(ConfigError, match="PADDLE_EMA_KERNEL must be one of auto, fused, reference, got 'fast'"):
        kernels.kernel_mode()
    with pytest.raises(ConfigError, match="set_kernel\\(mode\\) must be one of"):
        kernels.set_kernel("gpu")
