"""How fast one EMA update is, per implementation, against the machine's memory floor.

An EMA update reads every weight and every average and writes the average: 12 bytes per float32
parameter. For three parameter sets it times one update of all tensors (median over --runs after
--warmup, taken in --rounds interleaved rounds so that a shared machine's drifting load falls on
every row alike) and prints ms, effective GB/s (12 bytes x parameters / time), and the ratio to
the fastest row and to the memory floor (the faster of the two floor rows):

    seed numpy loop          the seed tutorial's update as written (SeedTutorialEMA below): numpy
                             copies of every weight and shadow, a new numpy average each step
    PaddleDetection-style    ModelEMA.update as written (DetectionModelEMA below): the model's
                             whole state_dict, ema = d * ema + (1 - d) * value.astype('float32')
                             as new Paddle tensors, outside no_grad as its trainer calls it
    paddle_ema fallback      paddle_ema.kernels.reference.lerp_ (built-in ops, per tensor)
    paddle_ema fused         paddle_ema.kernels.fused.lerp_ (one C++ / OpenMP call)
    torch _foreach_lerp_     PyTorch on the same shapes, in a separate process (if importable)
    floor (one flat tensor)  the fused lerp of one flat buffer of the same size: the same
                             12 bytes per parameter and work split, no per-tensor work
    floor (numpy a += x)     numpy's single-threaded a += x over one flat buffer

The fused kernel and its floor use $PADDLE_EMA_NUM_THREADS threads (default: every CPU the
process may use); PyTorch's child gets the OMP_NUM_THREADS the user had before Paddle's import
(Paddle sets it to 1 when unset), so by default each uses all cores. "(Nt)" shows the count.

Sets: ResNet-50 (161 trainable tensors, 25.6M parameters), MobileNetV3-small (many small
tensors), a synthetic transformer-like set of 1,000 tensors (13.4M parameters: embeddings,
62 blocks of attention, MLP and LayerNorms, a pooler and a classifier), and 1,000 one-element
tensors (overhead1000: the per-call and per-tensor overhead alone).

    PYTHONPATH=. python benchmarks/bench_update.py [--runs 20] [--warmup 3] [--rounds 4]
                                   [--sets resnet50,...] [--no-torch] [--json out.json]
"""

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np

from reporting import write_json

# Paddle sets OMP_NUM_THREADS=1 at import when it is unset; PyTorch's process gets what the user had.
USER_OMP_NUM_THREADS = os.environ.get("OMP_NUM_THREADS")
BYTES_PER_PARAMETER = 12  # read weight, read average, write average (float32)
DECAY = 0.9998
SETS = ("resnet50", "mobilenet_v3_small", "transformer1000", "overhead1000")


def _exit_usage(parser, message):
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="timed updates per row (at least 20 for the table)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed updates before timing")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the runs are split into")
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, from {', '.join(SETS)}")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch row even if torch is installed")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or not 1 <= args.rounds <= args.runs:
        _exit_usage(
            parser,
            f"--runs must be >= 1, --warmup >= 0 and 1 <= --rounds <= --runs, "
            f"got {args.runs}, {args.warmup} and {args.rounds}",
        )
    args.sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in args.sets if s not in SETS]
    if unknown or not args.sets:
        _exit_usage(parser, f"--sets takes names from {', '.join(SETS)}, got {unknown or args.sets}")
    return args


# --- parameter sets: shapes only ---------------------------------------------------------------


def transformer_shapes(blocks=62, hidden=128, ffn=512, vocab=8000, positions=512, classes=2):
    shapes = [[vocab, hidden], [positions, hidden]]
    for _ in range(blocks):
        shapes += [[hidden], [hidden]]  # LayerNorm before attention
        for _ in range(4):  # q, k, v, output projections
            shapes += [[hidden, hidden], [hidden]]
        shapes += [[hidden], [hidden]]  # LayerNorm before the MLP
        shapes += [[hidden, ffn], [ffn], [ffn, hidden], [hidden]]
    shapes += [[hidden], [hidden], [hidden, hidden], [hidden], [hidden, classes], [classes]]
    return shapes


def synthetic_shapes(name):
    """The shapes of a set that is not one of Paddle's models, else None. overhead1000: 1,000
    one-element tensors, where an update's time is all per-call and per-tensor overhead."""
    if name == "transformer1000":
        return transformer_shapes()
    if name == "overhead1000":
        return [[1]] * 1000
    return None


def build_model(name):
    """The set as a paddle.nn.Layer: Paddle's model (BatchNorm statistics included), or a Layer
    holding a synthetic set's parameters."""
    import paddle

    shapes = synthetic_shapes(name)
    if shapes is None:
        import paddle.vision.models as models

        return getattr(models, name)()
    layer = paddle.nn.Layer()
    for i, shape in enumerate(shapes):
        layer.add_parameter(f"p{i}", layer.create_parameter(shape))
    return layer


def set_shapes(name):
    return synthetic_shapes(name) or [list(p.shape) for p in build_model(name).parameters() if not p.stop_gradient]


# --- the two baselines, as their authors wrote them ------------------------------------------------


class SeedTutorialEMA:
    """The seed tutorial's ExponentialMovingAverage.update, step for step: walk named_parameters(),
    copy each trainable weight to numpy (numpy(), .copy(), np.array) and the shadow (np.array),
    threshold decay, new numpy arrays for the average."""

    def __init__(self, model, decay, thres_steps=True):
        self._model, self._decay, self._thres_steps = model, decay, thres_steps
        self._shadow = {n: p.numpy().copy() for n, p in model.named_parameters() if p.stop_gradient is False}
        self._update_step = 0

    def update(self):
        for name, param in self._model.named_parameters():
            if param.stop_gradient is False:
                new_val = np.array(param.numpy().copy())
                old_val = np.array(self._shadow[name])
                decay = (min(self._decay, (1 + self._update_step) / (10 + self._update_step))
                         if self._thres_steps else self._decay)
                self._shadow[name] = decay * old_val + (1 - decay) * new_val
        self._update_step += 1


class DetectionModelEMA:
    """PaddleDetection's ModelEMA.update (ppdet/optimizer/ema.py), step for step: a state_dict of
    the whole model each call (BatchNorm statistics too), then for every entry a new float32 tensor
    decay * ema + (1 - decay) * value.astype('float32'), outside no_grad as its trainer calls it."""

    def __init__(self, model, decay):
        self.decay, self.step, self.model = decay, 0, model
        import paddle

        # float32 zeros, stop_gradient as PaddleDetection makes them
        self.state_dict = {k: paddle.zeros(v.shape, "float32") for k, v in model.state_dict().items()}

    def update(self):
        decay = min(self.decay, (1 + self.step) / (10 + self.step))
        model_dict = self.model.state_dict()
        for k, v in self.state_dict.items():
            v = decay * v + (1 - decay) * model_dict[k].astype("float32")
            v.stop_gradient = True
            self.state_dict[k] = v
        self.step += 1


# --- contestants: (label, one update) -------------------------------------------------------------


def paddle_contestants(name):
    """Every Paddle/numpy implementation and the floors, each as (label, function doing one update)."""
    import paddle

    from paddle_ema.kernels import fused, reference

    model = build_model(name)
    params = [p for p in model.parameters() if not p.stop_gradient]  # the trainable weights
    shapes = [list(p.shape) for p in params]
    weight = 1.0 - DECAY
    contestants = [
        ("seed numpy loop", SeedTutorialEMA(model, DECAY).update),
        ("PaddleDetection-style", DetectionModelEMA(model, DECAY).update),
    ]
    by_fallback = [p.detach().clone() for p in params]
    contestants.append(("paddle_ema fallback", lambda: reference.lerp_(by_fallback, params, weight)))
    total = sum(int(np.prod(s)) for s in shapes)
    if fused.available():
        by_fused = [p.detach().clone() for p in params]
        threads = fused.num_threads()
        contestants.append((f"paddle_ema fused ({threads}t)", lambda: fused.lerp_(by_fused, params, weight)))
        flat_a, flat_x = paddle.zeros([total]), paddle.ones([total])
        contestants.append((f"floor (one flat tensor, fused, {threads}t)", lambda: fused.lerp_([flat_a], [flat_x], weight)))
    np_a, np_x = np.zeros(total, "float32"), np.ones(total, "float32")
    contestants.append(("floor (numpy a += x)", lambda: np.add(np_a, np_x, out=np_a)))
    return contestants


TORCH_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import torch
    spec = json.loads(sys.stdin.readline())
    torch.manual_seed(0)
    params = [torch.randn(s) for s in spec["shapes"]]
    averages = [p.clone() for p in params]
    w = spec["weight"]
    for _ in range(spec["warmup"]):
        torch._foreach_lerp_(averages, params, w)
    print(json.dumps({"version": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:  # "N": time N updates and answer their times in ms
        times = []
        for _ in range(int(line)):
            t = time.perf_counter()
            torch._foreach_lerp_(averages, params, w)
            times.append((time.perf_counter() - t) * 1e3)
        print(json.dumps(times), flush=True)
    """
)


class TorchContestant:
    """PyTorch's _foreach_lerp_ on the same shapes in a child process that times on request."""

    def __init__(self, shapes, warmup):
        env = dict(os.environ)
        env.pop("OMP_NUM_THREADS", None)
        if USER_OMP_NUM_THREADS is not None:
            env["OMP_NUM_THREADS"] = USER_OMP_NUM_THREADS
        self.child = subprocess.Popen(
            [sys.executable, "-c", TORCH_CHILD],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )
        self.child.stdin.write(json.dumps({"shapes": shapes, "weight": 1.0 - DECAY, "warmup": warmup}) + "\n")
        self.child.stdin.flush()
        hello = self.child.stdout.readline()
        if not hello:
            self.close()
            raise RuntimeError("torch is not importable")
        info = json.loads(hello)
        self.label = f"torch {info['version']} _foreach_lerp_ ({info['threads']}t)"

    def times_ms(self, runs):
        self.child.stdin.write(f"{runs}\n")
        self.child.stdin.flush()
        return json.loads(self.child.stdout.readline())

    def close(self):
        self.child.stdin.close()
        self.child.wait(timeout=60)


def run_interleaved(contestants, torch, runs, warmup, rounds):
    """Median ms per contestant, timed in `rounds` interleaved rounds of runs/rounds updates each,
    so that the load of a shared machine, which drifts over seconds, falls on every row alike."""
    samples = {label: [] for label, _ in contestants}
    if torch is not None:
        samples[torch.label] = []
    for _, update in contestants:
        for _ in range(warmup):
            update()
    per_round = [runs // rounds + (1 if r < runs % rounds else 0) for r in range(rounds)]
    for count in per_round:
        for label, update in contestants:
            for _ in range(count):
                start = time.perf_counter()
                update()
                samples[label].append((time.perf_counter() - start) * 1e3)
        if torch is not None:
            samples[torch.label] += torch.times_ms(count)
    return [(label, float(np.median(times))) for label, times in samples.items()]


def table(name, count, parameters, rows, digits=2):
    fastest = min(ms for _, ms in rows)
    floor = min((ms for label, ms in rows if label.startswith("floor")), default=None)
    lines = [
        f"{name}: {count} tensors, {parameters / 1e6:.2f}M parameters, "
        f"{BYTES_PER_PARAMETER * parameters / 1e6:.0f} MB moved per update",
        f"  {'implementation':<38}{'median ms':>10}{'GB/s':>8}{'x fastest':>11}{'x floor':>9}",
    ]
    for label, ms in rows:
        gbs = BYTES_PER_PARAMETER * parameters / (ms * 1e-3) / 1e9
        vs_floor = f"{ms / floor:9.2f}" if floor else f"{'-':>9}"
        lines.append(f"  {label:<38}{ms:10.{digits}f}{gbs:8.1f}{ms / fastest:11.2f}{vs_floor}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    import paddle

    from paddle_ema.kernels import fused

    if not fused.available():
        print(f"note: fused kernel unavailable ({fused.failure()}); its rows are left out", file=sys.stderr)
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "paddle": paddle.__version__,
            "user_omp_num_threads": USER_OMP_NUM_THREADS,
            "fused_threads": fused.num_threads() if fused.available() else None,
        },
        "runs": args.runs,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "bytes_per_parameter": BYTES_PER_PARAMETER,
        "sets": {},
    }
    for name in args.sets:
        shapes = set_shapes(name)
        parameters = sum(int(np.prod(s)) for s in shapes)
        torch = None
        if not args.no_torch:
            try:
                torch = TorchContestant(shapes, args.warmup)
            except (OSError, RuntimeError, ValueError):
                print("note: torch is not importable; its row is left out", file=sys.stderr)
        try:
            rows = run_interleaved(paddle_contestants(name), torch, args.runs, args.warmup, args.rounds)
        finally:
            if torch is not None:
                torch.close()
        rows.sort(key=lambda row: row[0].startswith("floor"))  # floors last
        print(table(name, len(shapes), parameters, rows), flush=True)
        print()
        report["sets"][name] = {
            "tensors": len(shapes),
            "parameters": parameters,
            "rows": [
                {"implementation": label, "median_ms": ms,
                 "gb_per_s": BYTES_PER_PARAMETER * parameters / (ms * 1e-3) / 1e9}
                for label, ms in rows
            ],
        }
    write_json(args.json, report)


if __name__ == "__main__":
    main()
