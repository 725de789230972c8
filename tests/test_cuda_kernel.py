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
