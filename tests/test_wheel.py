"""A plain `pip install` of the built wheel, outside the repository: the console command trains
the default config from another folder, and the same environment moved to another path (Paddle
installed elsewhere) reuses the compiled kernel (no compile). One test, marked `wheel` (CI's
newest-Paddle leg runs it; it installs Paddle once from pip's cache, a few minutes in all). Timings are printed (pytest -s)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paddle
import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPILING = "paddle_ema: compiling the fused EMA kernel"
SHIPPED = ("paddle_ema", "configs", "setup.py", "pyproject.toml", "README.md", "LICENSE")


def _run(command, timeout=1500, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _clean_env(cache):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PADDLE_EMA_KERNEL", "VIRTUAL_ENV")}
    env["PADDLE_EMA_CACHE_DIR"] = str(cache)
    return env


def _venv(path, wheel, env):
    """A fresh environment with the wheel, the CPU Paddle and numpy of this one, and the tools."""
    _run([sys.executable, "-m", "venv", str(path)])
    python = path / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", f"{wheel}[tools]", f"paddlepaddle=={paddle.__version__}",
          f"numpy=={np.__version__}"], env=env)
    return path / "bin"


@pytest.mark.wheel
@pytest.mark.timeout(3000)
def test_wheel_installs_trains_from_anywhere_and_shares_the_kernel_cache(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in SHIPPED:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    cache, elsewhere = tmp_path / "kernel-cache", tmp_path / "somewhere-else"
    elsewhere.mkdir()
    env = _clean_env(cache)
    timings = {}

    started = time.perf_counter()
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(source)], env=env)
    (wheel,) = (tmp_path / "dist").glob("paddle_ema-*.whl")
    timings["build wheel"] = time.perf_counter() - started

    started = time.perf_counter()
    first = _venv(tmp_path / "venv-a", wheel, env)
    timings["install (venv A)"] = time.perf_counter() - started

    started = time.perf_counter()
    train = _run([str(first / "paddle-ema-train"), "-c", "lenet_digits", "-o", "epoch=1"], cwd=elsewhere, env=env)
    timings["first run, empty cache (1 epoch)"] = time.perf_counter() - started
    assert train.stderr.count(COMPILING) == 1, train.stderr
    assert (elsewhere / "output" / "lenet_digits" / "model_final.pdparams").is_file(), train.stdout
    assert str(ROOT) not in train.stdout + train.stderr  # nothing came from the checkout
    (library,) = cache.glob("*.so")

    # A second environment, with the first one gone: the same Paddle, installed at another path
    # (the environment moved, which costs no second install of Paddle from pip's cache). The cached
    # kernel, whose key holds no install path, loads as it is.
    second = shutil.move(str(tmp_path / "venv-a"), str(tmp_path / "venv-b"))
    assert not (tmp_path / "venv-a").exists()
    second = Path(second) / "bin"
    started = time.perf_counter()
    status = _run([str(second / "python"), "-m", "paddle_ema.kernels"], cwd=elsewhere, env=env)
    timings["python -m paddle_ema.kernels (venv B)"] = time.perf_counter() - started
    assert "kernel:     fused (loaded from the cache)" in status.stdout, status.stdout + status.stderr
    assert COMPILING not in status.stderr
    assert [p.name for p in cache.glob("*.so")] == [library.name]
    for step, seconds in timings.items():
        print(f"{step}: {seconds:.1f} s")


def test_config_resolves_by_path_or_by_shipped_name(tmp_path, monkeypatch):
    from paddle_ema.config.packaged import packaged_config_dir, resolve_config

    shipped = packaged_config_dir()
    assert shipped is not None and (shipped / "lenet_digits.yml").is_file()
    monkeypatch.chdir(tmp_path)  # another folder: README's relative paths do not exist here
    for arg in ("lenet_digits", "lenet_digits.yml", "configs/lenet_digits.yml"):
        assert resolve_config(arg) == str(shipped / "lenet_digits.yml")
    assert resolve_config("datasets/mnist") == str(shipped / "datasets" / "mnist.yml")
    mine = tmp_path / "lenet_digits.yml"
    mine.write_text("epoch: 1\n")
    assert resolve_config("lenet_digits.yml") == "lenet_digits.yml"  # an existing path wins
    for unknown in ("no_such_config", "../lenet_digits", "", "configs"):
        assert resolve_config(unknown) == unknown  # left for the loader's own error
