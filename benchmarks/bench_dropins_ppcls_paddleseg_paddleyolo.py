"""The PaddleClas, PaddleSeg and PaddleYOLO drop-ins' updates against each suite's own loop, on the same model.

    python benchmarks/bench_dropins_ppcls_paddleseg_paddleyolo.py [--model resnet50|resnet18]
                                                                 [--repeats 30] [--real] [--suites NAMES]
                                                                 [--json PATH]

Each suite's loop is written out here in the Paddle ops its ema.py runs, as bench_ppdet.py does
for PaddleDetection's (tests/test_suite_oracles.py checks those expressions against the suites):
- PaddleClas ExponentialMovingAverage.update: for every state-dict pair, zipped by position,
  `paddle.assign(d * e + (1 - d) * m, e)`;
- PaddleSeg update_ema_model: for every floating entry `v = v * d; v = v + (1 - d) * m` (new
  tensors), then one `ema_model.set_state_dict(state)`, d = min(1 - 1/(step + 1), 0.999);
- PaddleYOLO ModelEMA.update: for every entry `v = d * v + (1 - d) * x` in the model's dtype (new
  tensors), threshold decay.
With --real, the installed suites' own code runs instead (paddleclas, paddleseg, ppdet: run it in
an environment that has them). The drop-in and the suite's loop alternate call by call, each on
its own copy of the EMA state, the model's weights fixed; the table gives the median of each and
the ratio, and whether the final EMA states are bitwise equal.
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from benchmarks.reporting import write_json  # noqa: E402
from paddle_ema import kernels  # noqa: E402
from paddle_ema.dropin import paddleseg, paddleyolo, ppcls  # noqa: E402

WARMUP = 3


def paddleclas_update(module, model, decay):
    with paddle.no_grad():
        for e, m in zip(module.state_dict().values(), model.state_dict().values()):
            paddle.assign(decay * e + (1. - decay) * m, e)


def paddleseg_update(ema_model, model, step, decay=0.999):
    with paddle.no_grad():
        state, decay = {}, min(1 - 1 / (step + 1), decay)
        msd = model.state_dict()
        for k, v in ema_model.state_dict().items():
            if paddle.is_floating_point(v):
                v = v * decay
                v = v + (1.0 - decay) * msd[k].detach()
            state[k] = v
        ema_model.set_state_dict(state)


def paddleyolo_update(shadows, model_dict, step, decay=0.9998):
    """`step`: updates made so far (ModelEMA's self.step), from 0."""
    decay = min(decay, (1 + step) / (10 + step))
    for k, v in shadows.items():
        v = decay * v + (1 - decay) * model_dict[k]
        v.stop_gradient = True
        shadows[k] = v


def bench_paddleclas(model, real):
    """(drop-in update(step), suite's update(step), drop-in state(), suite's state())."""
    ours = ppcls.ExponentialMovingAverage(model, 0.9999)
    if real:
        from paddleclas.ppcls.utils.ema import ExponentialMovingAverage

        theirs = ExponentialMovingAverage(model, 0.9999)
        update = lambda step: theirs.update(model)  # noqa: E731
    else:
        theirs = copy.deepcopy(ours)
        update = lambda step: paddleclas_update(theirs.module, model, 0.9999)  # noqa: E731
    return (lambda step: ours.update(model), update, ours.module.state_dict, theirs.module.state_dict)


def bench_paddleseg(model, real):
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    if real:
        from paddleseg.utils.ema import update_ema_model

        update = lambda step: update_ema_model(theirs, model, step=step)  # noqa: E731
    else:
        update = lambda step: paddleseg_update(theirs, model, step)  # noqa: E731
    return (lambda step: paddleseg.update_ema_model(ours, model, step=step), update, ours.state_dict, theirs.state_dict)


def bench_paddleyolo(model, real):
    ours = paddleyolo.ModelEMA(model)
    if real:
        from ppdet.optimizer.ema import ModelEMA

        theirs = ModelEMA(model)
        update, state = lambda step: theirs.update(), lambda: theirs.state_dict  # noqa: E731
    else:
        shadows = {k: paddle.zeros_like(v) for k, v in model.state_dict().items()}
        update = lambda step: paddleyolo_update(shadows, model.state_dict(), step - 1)  # noqa: E731
        state = lambda: shadows  # noqa: E731
    return (lambda step: ours.update(), update, lambda: ours.state_dict, state)


SUITES = {"PaddleClas": bench_paddleclas, "PaddleSeg": bench_paddleseg, "PaddleYOLO": bench_paddleyolo}


def bitwise_equal(a, b):
    return list(a) == list(b) and all(
        x.dtype == y.dtype and np.array_equal(x.numpy().view(np.uint8), y.numpy().view(np.uint8))
        for x, y in zip(a.values(), b.values()))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet50", choices=["resnet50", "resnet18"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--real", action="store_true", help="time the installed suites' own code")
    parser.add_argument("--suites", default=",".join(SUITES), help="comma-separated: " + ", ".join(SUITES))
    parser.add_argument("--json")
    args = parser.parse_args()
    paddle.seed(0)
    model = getattr(paddle.vision.models, args.model)()
    state = model.state_dict()
    numel = sum(int(np.prod(v.shape)) for v in state.values())
    print(f"{args.model}: {len(state)} state tensors, {numel / 1e6:.1f} M elements, kernel {kernels.active_kernel()}, "
          f"Paddle {paddle.__version__}, {args.repeats} alternating calls after {WARMUP}, "
          f"suites' loops {'installed' if args.real else 'written out in Paddle ops'}")
    print("| suite | drop-in median ms | suite's loop median ms | ratio | final EMA bitwise equal |")
    print("|---|---|---|---|---|")
    report, ok = {}, True
    names = args.suites.split(",")
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        parser.error(f"unknown suites {unknown}; known: {', '.join(SUITES)}")
    for name in names:
        ours, theirs, our_state, their_state = SUITES[name](model, args.real)
        times = {"drop-in": [], "suite": []}
        for step in range(1, args.repeats + WARMUP + 1):
            for label, update in (("drop-in", ours), ("suite", theirs)):
                start = time.perf_counter()
                update(step)
                if step > WARMUP:
                    times[label].append(time.perf_counter() - start)
        medians = {label: statistics.median(t) * 1e3 for label, t in times.items()}
        same = bitwise_equal(our_state(), their_state())
        ok &= same
        ratio = medians["suite"] / medians["drop-in"]
        print(f"| {name} | {medians['drop-in']:.2f} | {medians['suite']:.2f} | {ratio:.1f}x | {same} |")
        report[name] = {"median_ms": medians, "ratio": ratio, "bitwise_equal": same}
    write_json(args.json, {"model": args.model, "real": args.real, "suites": report})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
