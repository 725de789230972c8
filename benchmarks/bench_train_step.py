"""What share of a CPU training step the EMA update costs, with the fused kernel and without.

For ResNet-18 (ImageNet-sized input) and a small CIFAR-sized CNN it runs SGD-momentum training
steps (forward, backward, optimizer step) and, after each, one update of two EMAs of the same
model: one through the fused kernel, one through the pure-Paddle fallback (alternating which goes
first). It prints median ms of the step and of each update, and the update's share of
step + update. Target: under 3% for ResNet-18 with the fused kernel.

    PYTHONPATH=. python benchmarks/bench_train_step.py [--runs 10] [--warmup 2]
        [--models resnet18,small_cnn] [--batch-resnet 8] [--batch-cnn 64] [--json out.json]
"""

import argparse
import sys
import time

import numpy as np

from reporting import write_json

MODELS = ("resnet18", "small_cnn")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--batch-resnet", type=int, default=8, help="ResNet-18 batch (3x224x224 images)")
    parser.add_argument("--batch-cnn", type=int, default=64, help="small CNN batch (3x32x32 images)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    numbers = (args.runs, args.batch_resnet, args.batch_cnn)
    if bad or not args.models or min(numbers) < 1 or args.warmup < 0:
        parser.print_usage(sys.stderr)
        problem = f"--models takes {', '.join(MODELS)}, got {bad}" if bad or not args.models else (
            "--runs and the batch sizes must be >= 1 and --warmup >= 0"
        )
        print(f"{parser.prog}: error: {problem}", file=sys.stderr)
        sys.exit(2)
    return args


def build(name, args):
    import paddle

    if name == "resnet18":
        model = paddle.vision.models.resnet18(num_classes=1000)
        shape = [args.batch_resnet, 3, 224, 224]
    else:
        nn = paddle.nn
        model = nn.Sequential(
            nn.Conv2D(3, 32, 3, padding=1), nn.BatchNorm2D(32), nn.ReLU(),
            nn.Conv2D(32, 64, 3, padding=1), nn.BatchNorm2D(64), nn.ReLU(), nn.MaxPool2D(2),
            nn.Conv2D(64, 128, 3, padding=1), nn.BatchNorm2D(128), nn.ReLU(), nn.MaxPool2D(2),
            nn.Flatten(), nn.Linear(128 * 8 * 8, 256), nn.ReLU(), nn.Linear(256, 10),
        )
        shape = [args.batch_cnn, 3, 32, 32]
    classes = 1000 if name == "resnet18" else 10
    images = paddle.randn(shape)
    labels = paddle.randint(0, classes, [shape[0], 1])
    return model, images, labels


def measure(name, args):
    import paddle

    from paddle_ema import ExponentialMovingAverage, kernels

    paddle.seed(0)
    model, images, labels = build(name, args)
    optimizer = paddle.optimizer.Momentum(learning_rate=0.01, momentum=0.9, parameters=model.parameters())
    modes = ["fused", "reference"] if kernels.fused.available() else ["reference"]
    emas = {mode: ExponentialMovingAverage(model, decay=0.9998) for mode in modes}
    step_times, update_times = [], {mode: [] for mode in modes}
    for i in range(args.warmup + args.runs):
        start = time.perf_counter()
        loss = paddle.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        float(loss)  # wait for the step to finish
        step = time.perf_counter() - start
        order = modes if i % 2 == 0 else modes[::-1]
        for mode in order:
            kernels.set_kernel(mode)
            start = time.perf_counter()
            emas[mode].update()
            update = time.perf_counter() - start
            if i >= args.warmup:
                update_times[mode].append(update)
        kernels.set_kernel(None)
        if i >= args.warmup:
            step_times.append(step)
    step_ms = float(np.median(step_times) * 1e3)
    parameters = sum(int(np.prod(p.shape)) for p in emas[modes[0]]._params)
    result = {"step_ms": step_ms, "tensors": len(emas[modes[0]].names), "parameters": parameters, "updates": {}}
    for mode in modes:
        ms = float(np.median(update_times[mode]) * 1e3)
        result["updates"][mode] = {"ms": ms, "share": ms / (step_ms + ms)}
    return result


def main(argv=None):
    args = parse_args(argv)
    from paddle_ema.kernels import fused

    if not fused.available():
        print(f"note: fused kernel unavailable ({fused.failure()}); only the fallback is timed", file=sys.stderr)
    report = {"runs": args.runs, "warmup": args.warmup, "models": {}}
    print(f"{'model':<11}{'tensors':>8}{'params':>9}{'step ms':>10}  {'EMA update':<11}{'ms':>8}{'share':>8}")
    for name in args.models:
        result = measure(name, args)
        report["models"][name] = result
        first = True
        for mode, figures in result["updates"].items():
            head = (f"{name:<11}{result['tensors']:>8}{result['parameters'] / 1e6:>8.2f}M{result['step_ms']:>10.1f}"
                    if first else " " * 38)
            print(f"{head}  {mode:<11}{figures['ms']:>8.2f}{figures['share'] * 100:>7.2f}%", flush=True)
            first = False
    write_json(args.json, report)


if __name__ == "__main__":
    main()
