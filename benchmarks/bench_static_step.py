"""Step time of a static training program with and without the EMA update ops.

    PYTHONPATH=. python benchmarks/bench_static_step.py [--program pir|legacy] [--image-size 32]

Each model is built twice, as the same training program (forward, backward, Momentum) without and
with `paddle_ema.static.ExponentialMovingAverage(0.999, thres_steps=True)`; each program runs in
its own scope. Timing alternates between the two in rounds (`--steps` runs each, after a warm-up) so
that drifting machine load hits both alike; the table shows the median time per step over the
rounds and the ratio with/without. The ResNet-18 program has ResNet-18's 11.2 M parameters (what the
EMA's cost grows with) but, by default, small 32x32 inputs, so the ratio is a pessimistic one: with
224x224 inputs (--image-size 224) the same EMA cost sits beside a ~50x larger forward/backward.
"""

import argparse
import contextlib
import statistics
import sys
import time

import numpy as np


def small_cnn(paddle, size):
    return paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 16, 3, padding=1),
        paddle.nn.BatchNorm2D(16),
        paddle.nn.ReLU(),
        paddle.nn.MaxPool2D(2),
        paddle.nn.Conv2D(16, 32, 3, padding=1),
        paddle.nn.BatchNorm2D(32),
        paddle.nn.ReLU(),
        paddle.nn.MaxPool2D(2),
        paddle.nn.Flatten(),
        paddle.nn.Linear(32 * (size // 4) ** 2, 10),
    )


def resnet18(paddle, size):
    return paddle.vision.models.resnet18(num_classes=10)


MODELS = {"small-cnn": small_cnn, "resnet18": resnet18}


def build(paddle, make_model, size, with_ema):
    from paddle_ema.static import ExponentialMovingAverage

    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(main, startup), paddle.utils.unique_name.guard():
        image = paddle.static.data("image", [-1, 3, size, size], "float32")
        label = paddle.static.data("label", [-1, 1], "int64")
        loss = paddle.nn.functional.cross_entropy(make_model(paddle, size)(image), label)
        paddle.optimizer.Momentum(learning_rate=0.01, momentum=0.9).minimize(loss)
        ema = None
        if with_ema:
            ema = ExponentialMovingAverage(0.999, thres_steps=True)
            ema.update()
    n_params = sum(int(np.prod(p.shape)) for p in main.global_block().all_parameters() if not p.stop_gradient)
    return main, startup, n_params, ema


def time_model(paddle, name, batch, size, rounds, steps, warmup):
    exe = paddle.static.Executor(paddle.CPUPlace())
    rng = np.random.default_rng(0)
    feed = {
        "image": rng.standard_normal((batch, 3, size, size)).astype("float32"),
        "label": rng.integers(0, 10, size=(batch, 1)).astype("int64"),
    }
    runs = {}
    for with_ema in (False, True):
        main, startup, n_params, ema = build(paddle, MODELS[name], size, with_ema)
        scope = paddle.static.Scope()
        with paddle.static.scope_guard(scope):
            exe.run(startup)
            for _ in range(warmup):
                exe.run(main, feed=feed)
        runs[with_ema] = (main, scope, [], ema)

    for _ in range(rounds):
        for with_ema in (False, True):
            main, scope, times, _ = runs[with_ema]
            with paddle.static.scope_guard(scope):
                start = time.perf_counter()
                for _ in range(steps):
                    exe.run(main, feed=feed)
                times.append((time.perf_counter() - start) / steps)
    without = statistics.median(runs[False][2])
    with_ = statistics.median(runs[True][2])
    return n_params, len(runs[True][3].names), without, with_


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--program", choices=["pir", "legacy"], default="pir", help="program kind (default pir)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["small-cnn", "resnet18"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32, help="input height and width (default 32)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per program (median over them)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per round")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    if args.image_size < 8 or args.image_size % 4:
        parser.error(f"--image-size must be a multiple of 4 and >= 8, got {args.image_size}")
    for option in ("batch", "rounds", "steps"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be >= 1, got {getattr(args, option)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")

    import paddle
    from paddle.pir_utils import OldIrGuard

    paddle.enable_static()
    kind = OldIrGuard() if args.program == "legacy" else contextlib.nullcontext()
    print(
        f"paddle {paddle.__version__}, {args.program} programs, CPU, "
        f"batch {args.batch} of 3x{args.image_size}x{args.image_size}, "
        f"median of {args.rounds} rounds x {args.steps} steps"
    )
    print("| model | parameters (tensors) | step without EMA | step with EMA | added | ratio |")
    print("|---|---|---|---|---|---|")
    with kind:
        for name in args.models:
            n_params, n_tensors, without, with_ = time_model(
                paddle, name, args.batch, args.image_size, args.rounds, args.steps, args.warmup
            )
            print(
                f"| {name} | {n_params / 1e6:.2f} M ({n_tensors}) | {without * 1e3:.1f} ms | "
                f"{with_ * 1e3:.1f} ms | {(with_ - without) * 1e3:+.1f} ms | {with_ / without:.3f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
