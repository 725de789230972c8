"""The CUDA multi-tensor EMA kernel on a GPU: its numbers checked, its speed against the floor.

Paddle's CUDA wheels are not on PyPI for Paddle 3.x, so the kernel (paddle_ema/kernels/csrc/
ema_cuda_kernel.cuh, the code the Paddle operator launches) is built here on its own with nvcc
into benchmarks/cuda/lerp_check.cu and:

1. checked: every dtype pair, sizes around chunk and vector boundaries, misaligned tensors, host
   and device weights, compared bit for bit with a host model of the same rounding;
2. timed on the parameter sets of bench_update.py (ResNet-50, MobileNetV3-small, a 1,000-tensor
   transformer-like set), median ms per update over --runs after --warmup, each update timed by
   CUDA events from before its host work to after its launch:

    paddle_ema fused        the chunk table built and copied, one launch: what the operator does
    one launch per tensor   the same arithmetic, a kernel launch per tensor
    torch _foreach_lerp_    PyTorch on the same shapes, in a separate process (if importable)
    floor (a += x)          a vectorised a += x over one flat buffer of the same size

    python benchmarks/bench_update_cuda.py [--runs 50] [--warmup 5] [--sets ...] [--json out.json]

Needs nvcc and a CUDA GPU; not numpy-free, but Paddle-free (shapes come from
benchmarks/param_shapes.json when Paddle is not importable).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_update import BYTES_PER_PARAMETER, DECAY, SETS, set_shapes, table  # noqa: E402
from reporting import write_json  # noqa: E402

HARNESS = HERE / "cuda" / "lerp_check.cu"
SHAPES_FILE = HERE / "param_shapes.json"
NVCC_FLAGS = ["-O3", "--fmad=false", "-std=c++17", "-Xcompiler", "-ffp-contract=off"]


def shapes_of(name):
    """Trainable parameter shapes: from Paddle's model zoo when importable, else the saved list."""
    try:
        return set_shapes(name)  # imports Paddle only for its models
    except ImportError:
        return json.loads(SHAPES_FILE.read_text())[name]


def build(out_dir, arch=None):
    """Compile the harness; returns the executable's path. `arch`: an sm_XX, else the GPU's own."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc is not on PATH")
    target = Path(out_dir) / "lerp_check"
    arch_flags = [f"-arch={arch}"] if arch else ["-arch=native"]
    subprocess.run([nvcc, *NVCC_FLAGS, *arch_flags, "-o", str(target), str(HARNESS)], check=True)
    return target


TORCH_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    spec = json.loads(sys.stdin.read())
    torch.manual_seed(0)
    params = [torch.randn(s, device="cuda") for s in spec["shapes"]]
    averages = [p.clone() for p in params]
    w = spec["weight"]
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(spec["warmup"]):
        torch._foreach_lerp_(averages, params, w)
    torch.cuda.synchronize()
    times = []
    for _ in range(spec["runs"]):
        start.record()
        torch._foreach_lerp_(averages, params, w)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    n = len(times)
    print(json.dumps({"version": torch.__version__,
                      "median_ms": times[n // 2] if n % 2 else 0.5 * (times[n // 2 - 1] + times[n // 2])}))
    """
)


def torch_row(shapes, runs, warmup):
    spec = json.dumps({"shapes": shapes, "weight": 1.0 - DECAY, "runs": runs, "warmup": warmup})
    result = subprocess.run([sys.executable, "-c", TORCH_CHILD], input=spec, capture_output=True, text=True)
    if result.returncode != 0:
        return None
    info = json.loads(result.stdout.strip().splitlines()[-1])
    return f"torch {info['version']} _foreach_lerp_", info["median_ms"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--arch", help="an nvcc -arch value such as sm_90 (default: the GPU's own)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    unknown = [s for s in sets if s not in SETS]
    if unknown or args.runs < 1 or args.warmup < 0:
        parser.error(f"--sets takes names from {', '.join(SETS)}; --runs >= 1, --warmup >= 0")

    with tempfile.TemporaryDirectory() as work:
        harness = build(work, args.arch)
        check = subprocess.run([str(harness), "check"], capture_output=True, text=True)
        print(check.stdout.rstrip())
        if check.returncode != 0:
            print(check.stderr.rstrip(), file=sys.stderr)
            sys.exit(f"the CUDA kernel's check failed (exit {check.returncode})")
        report = {"runs": args.runs, "warmup": args.warmup, "check": check.stdout, "sets": {}}
        for name in sets:
            shapes = shapes_of(name)
            numels = "\n".join(str(_numel(s)) for s in shapes)
            bench = subprocess.run([str(harness), "bench", str(args.runs), str(args.warmup)], input=numels,
                                   capture_output=True, text=True, check=True)
            figures = json.loads(bench.stdout)
            rows = [("paddle_ema fused", figures["fused_ms"]), ("one launch per tensor", figures["per_tensor_ms"])]
            if not args.no_torch:
                row = torch_row(shapes, args.runs, args.warmup)
                if row is not None:
                    rows.append(row)
            rows.append(("floor (a += x, one flat buffer)", figures["floor_ms"]))
            print()
            print(f"{figures['device']}")
            print(table(name, len(shapes), figures["parameters"], rows, digits=3), flush=True)
            report["device"] = figures["device"]
            report["sets"][name] = {
                "tensors": len(shapes),
                "parameters": figures["parameters"],
                "rows": [{"implementation": label, "median_ms": ms,
                          "gb_per_s": BYTES_PER_PARAMETER * figures["parameters"] / (ms * 1e-3) / 1e9}
                         for label, ms in rows],
            }
    write_json(args.json, report)


def _numel(shape):
    n = 1
    for d in shape:
        n *= int(d)
    return n


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
