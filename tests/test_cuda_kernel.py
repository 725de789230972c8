"""The CUDA kernel's sources: they compile (wherever nvcc is), and on a GPU its numbers are exact.

No CUDA build of Paddle 3.x is on PyPI, so the kernel (csrc/ema_cuda_kernel.cuh) is checked through
benchmarks/cuda/lerp_check.cu, which launches it on its own and compares every element bit for bit
with a host model of the same rounding. Without a GPU that run is skipped (and says so);
benchmarks/bench_update_cuda.py runs it with the timings.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "paddle_ema" / "kernels" / "csrc"
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_update_cuda import HARNESS, NVCC_FLAGS, SHAPES_FILE  # noqa: E402

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


def test_saved_parameter_shapes_are_paddles_models():
    # bench_update_cuda.py times these where Paddle is not installed: they must be the same sets.
    import paddle.vision.models as models

    saved = json.loads(SHAPES_FILE.read_text())
    for name, shapes in saved.items():
        model = getattr(models, name)()
        assert shapes == [list(p.shape) for p in model.parameters() if not p.stop_gradient], name


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    target = tmp_path_factory.mktemp("cuda") / "lerp_check"
    # sm_90 is a fixed target so that this builds on machines without a GPU too.
    subprocess.run([NVCC, *NVCC_FLAGS, "-arch=sm_90", "-o", str(target), str(HARNESS)], check=True)
    return target


@needs_nvcc
def test_operator_glue_compiles_against_paddles_headers(tmp_path):
    # What CUDAExtension compiles on a CUDA build of Paddle, short of linking.
    include = Path(paddle.__file__).parent / "include"
    result = subprocess.run(
        [NVCC, "-c", "-std=c++17", "-O3", "--fmad=false", "-DPADDLE_EMA_WITH_CUDA", "-DPADDLE_WITH_CUDA",
         f"-I{include}", f"-I{include / 'third_party'}", "-diag-suppress=20012,20014,68",
         "-o", str(tmp_path / "ema_ops_cu.o"), str(CSRC / "ema_ops.cu")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ema_ops_cu.o").stat().st_size > 0


def test_harness_rejects_bad_arguments(harness):
    result = subprocess.run([str(harness), "bogus"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr


# The CUDA runtime's words (cudaGetErrorString) for a machine without a GPU or a driver for it.
NO_GPU_ERRORS = {
    "no CUDA-capable device is detected": "no GPU is visible",
    "CUDA driver version is insufficient for CUDA runtime version": "no NVIDIA driver, or one older than "
                                                                    "this CUDA runtime",
    "CUDA driver is a stub library": "only the driver's stub library is installed",
}


def no_gpu_reason(stderr):
    """The skip reason when the harness stopped because this machine has no GPU or driver, else None."""
    for words, meaning in NO_GPU_ERRORS.items():
        if words in stderr:
            return f"no CUDA GPU/driver: {meaning} (the harness needs one to run the kernel)"
    return None


def test_no_gpu_reason_reads_plainly():
    driver = "CUDA error in cudaMalloc: CUDA driver version is insufficient for CUDA runtime version\n"
    assert no_gpu_reason(driver) == ("no CUDA GPU/driver: no NVIDIA driver, or one older than this CUDA runtime "
                                     "(the harness needs one to run the kernel)")
    assert no_gpu_reason("CUDA error in cudaMalloc: no CUDA-capable device is detected").startswith(
        "no CUDA GPU/driver: no GPU is visible")
    # Any other CUDA error comes from a GPU that ran the kernel: a failure, never a skip.
    assert no_gpu_reason("CUDA error in cudaMemcpy: an illegal memory access was encountered") is None


def test_kernel_is_bitwise_equal_to_the_host_model_on_a_gpu(harness):
    result = subprocess.run([str(harness), "check"], capture_output=True, text=True, timeout=300)
    reason = no_gpu_reason(result.stderr) if result.returncode == 3 else None
    if reason is not None:
        pytest.skip(reason)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "elements" in line]
    assert len(lines) == 6
    for line in lines:
        counts = [int(word) for word in line.split() if word.isdigit()]
        assert counts[-1] == 0 and counts[-2] > 0, line
    assert result.stdout.strip().endswith("ALL EQUAL")


def test_host_model_rounds_like_paddle_lerp():
    # The harness's host model (a + w * (x - a), each operation rounded to float32) is the rule
    # the CPU operator and paddle.lerp_ follow: check that rule against Paddle itself here.
    rng = np.random.default_rng(0)
    a = rng.standard_normal(100_000).astype("float32")
    x = (rng.standard_normal(100_000) * 3).astype("float32")
    w = np.float32(1.0 - 0.9998)
    model = (a + (w * (x - a)).astype("float32")).astype("float32")
    out = paddle.to_tensor(a)
    out.lerp_(paddle.to_tensor(x), float(w))
    assert np.array_equal(out.numpy().view("uint32"), model.view("uint32"))


# --- the suites' formulas: scale_add and sub_scale_sub --------------------------------------------

from suite_oracles import bf16_to_f32, f32_to_bf16  # noqa: E402

DECAY = 0.9998


def _to_half(values):
    """float32 -> float16 rounded to nearest, ties to even (numpy's cast; the GPU's cvt.rn.f16.f32)."""
    with np.errstate(over="ignore"):
        return np.asarray(values, np.float32).astype(np.float16)


def _gpu_rule(formula, kind, a, x, decay, weight):
    """numpy of the GPU rule the kernel follows: float32/float64 averages step by step in their
    dtype; float16/bfloat16 averages with each op in float32 (the factor a float32, as scale's
    MPType) rounded to the half type (nearest even)."""
    f32 = np.float32
    if kind in ("half", "bfloat16"):
        widen = (lambda h: h.astype(f32)) if kind == "half" else bf16_to_f32
        narrow = _to_half if kind == "half" else f32_to_bf16
        af, xf, d, w = widen(a), widen(x), f32(decay), f32(weight)
        if formula == "scale_add":
            left = widen(narrow(d * af + f32(0)))
            right = widen(narrow(w * xf + f32(0)))
            return narrow(left + right)
        difference = widen(narrow(af - xf))
        return narrow(af - widen(narrow(w * difference + f32(0))))
    dtype = np.float64 if kind == "double" else f32
    d, w = dtype(decay), dtype(weight)
    xw = x.astype(f32) if kind == "float_half" else bf16_to_f32(x) if kind == "float_bfloat16" else x
    if formula == "scale_add":
        return (d * a + dtype(0)) + (w * xw + dtype(0))
    return a - (w * (a - xw) + dtype(0))


def _formula_inputs(kind, rng):
    special = np.array([0.0, -0.0, 1e-40, -6e-8, 65504.0, 1.0, -1.0, 3.0e-5], np.float32)
    average32 = np.concatenate([special, rng.standard_normal(4000).astype(np.float32) * 2])
    value32 = np.concatenate([special[::-1], (average32[len(special):] + rng.standard_normal(4000) * 0.5)
                              .astype(np.float32)])
    if kind == "double":
        return average32.astype(np.float64) * (1 + 1e-9), value32.astype(np.float64)
    if kind == "half":
        return _to_half(average32), _to_half(value32)
    if kind == "bfloat16":
        return f32_to_bf16(average32), f32_to_bf16(value32)
    value = {"float": value32, "float_half": _to_half(value32), "float_bfloat16": f32_to_bf16(value32)}[kind]
    return average32, value


def _bits(array):
    array = np.asarray(array)
    return array.view({8: np.uint64, 4: np.uint32, 2: np.uint16}[array.dtype.itemsize])


@pytest.mark.parametrize("formula", ["scale_add", "sub_scale_sub"])
@pytest.mark.parametrize("kind", ["float", "float_half", "float_bfloat16", "double", "half", "bfloat16"])
def test_formula_host_model_is_the_gpu_rule(harness, formula, kind):
    # The host model the GPU's results are compared with (lerp_check formulas) runs on the CPU:
    # checked here, bit for bit, against numpy's float32 arithmetic and the half roundings.
    rng = np.random.default_rng(len(formula) * 7 + len(kind))
    average, value = _formula_inputs(kind, rng)
    lines = "\n".join(f"{int(a):x} {int(x):x}" for a, x in zip(_bits(average), _bits(value)))
    result = subprocess.run([str(harness), "model", formula, kind, repr(DECAY), repr(1 - DECAY)], input=lines,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    got = np.array([int(word, 16) for word in result.stdout.split()], dtype=np.uint64)
    want = _bits(_gpu_rule(formula, kind, average, value, DECAY, 1 - DECAY)).astype(np.uint64)
    assert len(got) == len(want)
    np.testing.assert_array_equal(got, want)


def test_formula_kernels_are_bitwise_equal_to_the_host_model_on_a_gpu(harness):
    result = subprocess.run([str(harness), "formulas"], capture_output=True, text=True, timeout=300)
    reason = no_gpu_reason(result.stderr) if result.returncode == 3 else None
    if reason is not None:
        pytest.skip(reason)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "elements" in line]
    assert len(lines) == 2
    for line in lines:
        counts = [int(word) for word in line.split() if word.isdigit()]
        assert counts[-1] == 0 and counts[-2] > 0, line
    assert result.stdout.strip().endswith("ALL EQUAL")
