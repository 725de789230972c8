"""What must hold on every supported Paddle (2.6.2 through 3.3.x), run by each CI leg (.ci/run):
the fused kernel loads, casts to half precision give the same bits everywhere, the library pulls
in none of the tools' dependencies, and older Paddle is refused with a clear message."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_ema import ExponentialMovingAverage, kernels
from paddle_ema.kernels import KERNEL_ENV, fused

ROOT = Path(__file__).resolve().parents[1]


def test_fused_kernel_is_active(monkeypatch):
    """Each CI leg has a compiler: the fused kernel must build and load on its Paddle."""
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    monkeypatch.setattr(kernels.mode, "_forced", None)
    assert kernels.prepare() == "fused", fused.failure()


def _float32_samples():
    rng = np.random.default_rng(0)
    random = rng.standard_normal(4000).astype(np.float32)
    # Exact ties and values just above them, in float16's and in bfloat16's grid, specials,
    # subnormals and values beyond float16's range.
    ties16 = (1 + (2 * np.arange(1, 200) + 1) * 2.0**-11).astype(np.float32)
    ties_bf = (1 + (2 * np.arange(1, 200) + 1) * 2.0**-8).astype(np.float32)
    above = np.nextafter(ties16, np.float32(2))
    special = np.array([0.0, -0.0, np.inf, -np.inf, 65504, 65519, 65520, 70000, 1e-8, -6e-8, 3e38], np.float32)
    return np.concatenate([random, ties16, -ties16, ties_bf, -ties_bf, above, special])


def _bfloat16_oracle(values):
    """Nearest bfloat16 (ties to the even bit pattern), by comparing both neighbours in float64."""
    bits = values.view(np.uint32)
    low = (bits >> 16).astype(np.uint32)
    high = low + 1
    as_f64 = lambda b: (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)  # noqa: E731
    exact = values.astype(np.float64)
    # Infinity's upper neighbour is a NaN pattern: its distance is NaN and never picked (no warning).
    with np.errstate(invalid="ignore"):
        d_low, d_high = np.abs(exact - as_f64(low)), np.abs(exact - as_f64(high))
    pick_high = (d_high < d_low) | ((d_high == d_low) & (low % 2 == 1))
    out = np.where(pick_high, high, low).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FFF), out)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_copy_to_half_rounds_to_nearest_even(dtype):
    """kernels.copy_ (apply/restore) writes the IEEE nearest value, ties to even, whatever
    Paddle's own cast does (3.0/3.1 and 2.6 truncate on the CPU)."""
    source = _float32_samples()
    target = paddle.zeros([source.size], dtype=dtype)
    kernels.copy_([target], [paddle.to_tensor(source)])
    got = target.numpy().view(np.uint16) if dtype == "float16" else target.numpy()
    if dtype == "float16":
        with np.errstate(over="ignore"):
            want = source.astype(np.float16).view(np.uint16)
    else:
        want = _bfloat16_oracle(source)
    np.testing.assert_array_equal(got, want)


def test_apply_writes_nearest_even_half_weights():
    layer = paddle.nn.Linear(40, 30)
    layer.to(dtype="float16")
    ema = ExponentialMovingAverage(layer, 0.5, thres_steps=False)
    ema.update()
    with paddle.no_grad():
        for p in layer.parameters():
            p.set_value((p.astype("float32") * 1.37).astype("float16"))
    ema.update()
    shadow = ema.average("weight").numpy()
    with ema.apply():
        with np.errstate(over="ignore"):
            want = shadow.astype(np.float16)
        np.testing.assert_array_equal(layer.weight.numpy().view(np.uint16), want.view(np.uint16))


def test_import_pulls_in_none_of_the_tools_dependencies():
    # Paddle itself imports some of them (tqdm): only what paddle_ema adds counts.
    code = (
        "import sys, paddle\n"
        "before = set(sys.modules)\n"
        "import paddle_ema, paddle_ema.kernels\n"
        "tools = ('yaml', 'visualdl', 'sklearn', 'tqdm', 'matplotlib')\n"
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in tools))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _import_with(paddle_stub):
    code = f"import sys; {paddle_stub}; import paddle_ema"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("version", ["2.6.1", "2.5.2", "2.6.0rc1"])
def test_too_old_paddle_is_refused(version):
    result = _import_with(f"import types; sys.modules['paddle'] = types.SimpleNamespace(__version__={version!r})")
    assert f"ImportError: paddle_ema needs PaddlePaddle >= 2.6.2, found {version}" in result.stderr


@pytest.mark.parametrize("version", ["2.6.2", "3.0.0", "3.3.1"])
def test_supported_versions_pass_the_guard(version):
    result = _import_with(f"import types; sys.modules['paddle'] = types.SimpleNamespace(__version__={version!r})")
    assert "needs PaddlePaddle" not in result.stderr  # it fails later, on the stub's missing parts
