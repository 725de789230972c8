"""ModelEMA.update() against PaddleDetection's own loop in Paddle ops, on the same model, one run.

    python benchmarks/bench_ppdet.py [--model resnet50|small] [--repeats 30] [--json PATH]

PaddleDetection's loop (ppdet/optimizer/ema.py, ModelEMA.update) is written out here in the same
ops: per state-dict entry `v = decay * v + (1 - decay) * x.astype('float32')`. The two alternate
call by call; the table gives medians and the ratio. Both give the same numbers bit for bit
(checked here on the final shadows, and in tests/test_ppdet_bitwise.py).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from benchmarks.reporting import write_json  # noqa: E402
from paddle_ema import kernels  # noqa: E402
from paddle_ema.ppdet import ModelEMA  # noqa: E402


def paddledetection_update(shadows, model_dict, decay):
    for k, v in shadows.items():
        v = decay * v + (1 - decay) * model_dict[k].astype("float32")
        v.stop_gradient = True
        shadows[k] = v


def build(name):
    if name == "resnet50":
        return paddle.vision.models.resnet50()
    return paddle.vision.models.resnet18()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet50", choices=["resnet50", "small"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json")
    args = parser.parse_args()
    paddle.seed(0)
    model = build(args.model)
    state = model.state_dict()
    ema = ModelEMA(model, decay=0.9998)
    plain = {k: paddle.zeros(v.shape, "float32") for k, v in state.items()}
    times = {"ModelEMA.update": [], "PaddleDetection loop": []}
    with paddle.no_grad():
        for step in range(args.repeats + 3):
            decay = min(0.9998, (1 + step) / (10 + step))
            start = time.perf_counter()
            ema.update()
            middle = time.perf_counter()
            paddledetection_update(plain, state, decay)
            end = time.perf_counter()
            if step >= 3:  # warm-up
                times["ModelEMA.update"].append(middle - start)
                times["PaddleDetection loop"].append(end - middle)
    same = all(np.array_equal(ema.state_dict[k].numpy().view(np.uint32), v.numpy().view(np.uint32))
               for k, v in plain.items())
    medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    numel = sum(int(np.prod(v.shape)) for v in state.values())
    print(f"{args.model}: {len(state)} tensors, {numel / 1e6:.1f} M elements, kernel {kernels.active_kernel()}, "
          f"Paddle {paddle.__version__}, {args.repeats} alternating calls")
    print("| update | median ms |")
    print("|---|---|")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.2f} |")
    ratio = medians["PaddleDetection loop"] / medians["ModelEMA.update"]
    print(f"ratio (PaddleDetection / ModelEMA): {ratio:.2f}x; shadows bitwise equal: {same}")
    write_json(args.json, {"model": args.model, "median_ms": medians, "ratio": ratio, "bitwise_equal": same})
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
