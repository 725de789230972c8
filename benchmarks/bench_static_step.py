"""Step time of a static training program with and without the EMA update ops.

    PYTHONPATH=. python benchmarks/bench_static_step.py [--program pir|legacy] [--image-size 32]

Each model is built three times, as the same training program (forward, backward, Momentum)
without the EMA and with `paddle_ema.static.ExponentialMovingAverage(0.999, thres_steps=True)`
built with each update: `fused` (one op of the C++ extension per shadow dtype, the default on CPU)
and `built-in` (Paddle's own ops, ~3 per parameter: PADDLE_EMA_KERNEL=reference). Each program runs
in its own scope. Timing alternates between them in rounds (`--steps` runs each, after a warm-up)
so that drifting machine load hits all alike; the table shows the median time per step over the
rounds and the ratio to the step without EMA, and the added time of each round (with the EMA less
without, timed next to each other) as a median and quartiles over the rounds. The ResNet-18 program has ResNet-18's 11.2 M parameters (what the
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


# The EMA update each program is built with: None (no EMA) or the kernel mode set while building.
UPDATES = {"fused": "fused", "built-in": "reference"}


def count_ops(program):
    """Ops of the program, less PIR's pd_op.data (declarations of the EMA's persistable state)."""
    ops = program.global_block().ops
    return sum(1 for op in ops if not (hasattr(op, "name") and op.name() == "pd_op.data"))


def build(paddle, make_model, size, update):
    from paddle_ema import kernels
    from paddle_ema.static import ExponentialMovingAverage

    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(main, startup), paddle.utils.unique_name.guard():
        image = paddle.static.data("image", [-1, 3, size, size], "float32")
        label = paddle.static.data("label", [-1, 1], "int64")
        loss = paddle.nn.functional.cross_entropy(make_model(paddle, size)(image), label)
        paddle.optimizer.Momentum(learning_rate=0.01, momentum=0.9).minimize(loss)
        ema, before = None, count_ops(main)
        if update is not None:
            kernels.set_kernel(UPDATES[update])
            try:
                ema = ExponentialMovingAverage(0.999, thres_steps=True)
                ema.update()
            finally:
                kernels.set_kernel(None)
    n_params = sum(int(np.prod(p.shape)) for p in main.global_block().all_parameters() if not p.stop_gradient)
    return main, startup, n_params, ema, count_ops(main) - before


def time_model(paddle, name, batch, size, rounds, steps, warmup, updates):
    """{update: (median s/step, EMA ops)} for None (no EMA) and each of `updates`, and sizes."""
    exe = paddle.static.Executor(paddle.CPUPlace())
    rng = np.random.default_rng(0)
    feed = {
        "image": rng.standard_normal((batch, 3, size, size)).astype("float32"),
        "label": rng.integers(0, 10, size=(batch, 1)).astype("int64"),
    }
    runs = {}
    for update in (None, *updates):
        main, startup, n_params, ema, n_ops = build(paddle, MODELS[name], size, update)
        scope = paddle.static.Scope()
        with paddle.static.scope_guard(scope):
            exe.run(startup)
            for _ in range(warmup):
                exe.run(main, feed=feed)
        runs[update] = (main, scope, [], n_ops)
        if ema is not None:
            n_tensors = len(ema.names)

    for _ in range(rounds):
        for main, scope, times, _ in runs.values():
            with paddle.static.scope_guard(scope):
                start = time.perf_counter()
                for _ in range(steps):
                    exe.run(main, feed=feed)
                times.append((time.perf_counter() - start) / steps)
    medians = {update: (statistics.median(times), n_ops) for update, (_, _, times, n_ops) in runs.items()}
    # Each round's step time with the EMA less the one without it, timed next to it: the added
    # time per round, whose spread over the rounds shows how far the machine's noise reaches.
    without = runs[None][2]
    paired = {update: [w - o for w, o in zip(runs[update][2], without)] for update in updates}
    return n_params, n_tensors, medians, paired


def _quartiles(values):
    """(first quartile, median, third quartile); all the median for fewer than 2 values."""
    if len(values) < 2:
        return (statistics.median(values),) * 3
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, q2, q3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--program", choices=["pir", "legacy"], default="pir", help="program kind (default pir)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["small-cnn", "resnet18"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32, help="input height and width (default 32)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per program (median over them)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--updates", nargs="+", choices=sorted(UPDATES), default=list(UPDATES),
                        help="EMA updates to time (default both)")
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
    if "fused" in args.updates:
        from paddle_ema.kernels import fused

        if not fused.available():
            print(f"the fused kernel is unavailable ({fused.failure()}): timing the built-in update only")
            args.updates = [u for u in args.updates if u != "fused"]
    print("| model | parameters (tensors) | EMA update | EMA ops | step without EMA | step with EMA | added | ratio "
          "| added, paired rounds: median (quartiles) |")
    print("|---|---|---|---|---|---|---|---|---|")
    with kind:
        for name in args.models:
            n_params, n_tensors, medians, paired = time_model(
                paddle, name, args.batch, args.image_size, args.rounds, args.steps, args.warmup, args.updates
            )
            without = medians[None][0]
            for update in args.updates:
                with_, n_ops = medians[update]
                q1, q2, q3 = (q * 1e3 for q in _quartiles(paired[update]))
                print(
                    f"| {name} | {n_params / 1e6:.2f} M ({n_tensors}) | {update} | {n_ops} | "
                    f"{without * 1e3:.1f} ms | {with_ * 1e3:.1f} ms | {(with_ - without) * 1e3:+.1f} ms | "
                    f"{with_ / without:.3f} | {q2:+.1f} ms ({q1:+.1f} to {q3:+.1f}) |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
