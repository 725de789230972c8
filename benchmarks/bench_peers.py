"""paddle_ema against its PyTorch peers and the memory floor, one table in one run.

Every implementation runs in its own child process, which builds its tensors for a parameter set,
warms up, then times updates when the parent asks; the parent only waits (it imports neither
Paddle nor PyTorch: an idle OpenMP pool in the parent slowed a timed PyTorch child ~1.6x on a
2-core machine). Rounds alternate between the children, so a shared machine's drifting load
falls on every row alike; each figure is the median of all its rounds' samples.

Rows (ms per update, LeNet in us):
    paddle_ema default            ExponentialMovingAverage(model) (nonfinite='skip': the guard on)
    paddle_ema nonfinite='update' the same without the guard
    paddle_ema reference kernel   default settings, PADDLE_EMA_KERNEL=reference (Paddle's ops)
    timm ModelEmaV3 / ModelEmaV2  timm's EMA (V3: foreach lerp, no guard), loaded from timm's file
    torch-ema, ema-pytorch        when installed
    floor 12 B/param              the fused lerp of one flat float32 buffer: the update with no
                                  per-tensor cost (the extension's threads and work split)
    floor 16 B/param              the 12 B floor x 16/12: the update plus one read of the weights,
                                  the least a guarded in-place update moves (derived, not timed)
    swap                          paddle_ema apply()+restore(); torch-ema store+copy_to+restore;
                                  timm evaluates its own module copy (no swap)
    memory                        peak RSS the EMA adds to the child (MB), after an update and a swap

Sets: LeNet, ResNet-18, ResNet-50 (Paddle's models' trainable shapes, from a Paddle child),
1,000 tensors (a transformer-like set), ViT-B/16 (its shapes written out here).
PyTorch runs from --torch-python (default: $PADDLE_EMA_TORCH_PYTHON or /work/venvs/i16-torch);
without it the PyTorch rows are left out. PyTorch is never a dependency of paddle_ema.

    PYTHONPATH=. python benchmarks/bench_peers.py [--runs 20] [--rounds 4] [--sets lenet,...] [--threads N]
                                                  [--json out.json]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from reporting import write_json

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DECAY = 0.9998
SETS = ("lenet", "resnet18", "resnet50", "tensors1000", "vit_b16")
TITLES = {"lenet": "LeNet (us)", "resnet18": "ResNet-18", "resnet50": "ResNet-50",
          "tensors1000": "1,000 tensors", "vit_b16": "ViT-B/16"}
DEFAULT_TORCH = os.environ.get("PADDLE_EMA_TORCH_PYTHON", "/work/venvs/i16-torch/bin/python")


def vit_b16_shapes(dim=768, depth=12, mlp=3072, tokens=197, classes=1000):
    shapes = [[dim, 3, 16, 16], [dim], [1, 1, dim], [1, tokens, dim]]
    for _ in range(depth):
        shapes += [[dim], [dim], [dim, 3 * dim], [3 * dim], [dim, dim], [dim], [dim], [dim],
                   [dim, mlp], [mlp], [mlp, dim], [dim]]
    return shapes + [[dim], [dim], [dim, classes], [classes]]


SHAPES_CHILD = textwrap.dedent(
    """
    import json, sys
    import paddle.vision.models as models
    sys.path.insert(0, sys.argv[1])
    from bench_update import transformer_shapes
    out = {}
    for name, make in (("lenet", models.LeNet), ("resnet18", models.resnet18), ("resnet50", models.resnet50)):
        out[name] = [list(p.shape) for p in make().parameters() if not p.stop_gradient]
    out["tensors1000"] = transformer_shapes()
    print(json.dumps(out))
    """
)

# The children: one command a line on stdin ("set NAME" builds that set and warms up; "time N"
# and "swap N" answer N samples in ms), one JSON line back per command.
COMMON_CHILD = textwrap.dedent(
    """
    import gc, json, resource, sys, time
    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    def serve(build, warmup):
        state = {}
        for line in sys.stdin:
            words = line.split()
            if words[0] == "set":
                state.clear(); gc.collect()
                shapes = json.loads(sys.stdin.readline())
                before = rss_mb()
                state.update(build(shapes))
                for _ in range(warmup):
                    state["update"]()
                if state.get("swap"):
                    state["swap"]()
                print(json.dumps({"info": state.get("info", ""), "memory_mb": rss_mb() - before}), flush=True)
            else:
                fn = state.get(words[0])
                times = []
                for _ in range(int(words[1]) if fn else 0):
                    t = time.perf_counter(); fn(); times.append((time.perf_counter() - t) * 1e3)
                print(json.dumps(times), flush=True)
    """
)

PADDLE_CHILD = COMMON_CHILD + textwrap.dedent(
    """
    import numpy as np, paddle
    from paddle_ema import ExponentialMovingAverage
    from paddle_ema.kernels import fused
    mode = sys.argv[1]
    def build(shapes):
        layer = paddle.nn.Layer()
        for i, s in enumerate(shapes):
            layer.add_parameter(f"p{i}", layer.create_parameter(s))
        if mode == "floor12":
            total = sum(int(np.prod(s)) for s in shapes)
            a, x = paddle.zeros([total]), paddle.ones([total])
            return {"layer": layer, "update": lambda: fused.lerp_([a], [x], 1.0 - DECAY), "info": f"{fused.num_threads()}t"}
        ema = ExponentialMovingAverage(layer, DECAY, nonfinite="update" if mode == "update" else "skip")
        swap = (lambda: (ema.apply(), ema.restore())) if mode == "default" else None
        return {"layer": layer, "ema": ema, "update": ema.update, "swap": swap, "info": paddle.__version__}
    serve(build, WARMUP)
    """
)

TORCH_CHILD = COMMON_CHILD + textwrap.dedent(
    """
    import importlib.util, torch
    kind = sys.argv[1]
    def timm_module():
        import importlib.metadata as md
        dist = md.distribution("timm")
        path = dist.locate_file("timm/utils/model_ema.py")
        spec = importlib.util.spec_from_file_location("timm_model_ema", path)  # not timm/__init__ (torchvision)
        module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
        return module, dist.version
    def build(shapes):
        torch.manual_seed(0)
        model = torch.nn.Module()
        model.params = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s)) for s in shapes])
        if kind in ("timm_v3", "timm_v2"):
            module, version = timm_module()
            ema = module.ModelEmaV3(model, decay=DECAY) if kind == "timm_v3" else module.ModelEmaV2(model, decay=DECAY)
            info = f"timm {version}, torch {torch.__version__}"
            return {"model": model, "update": lambda: ema.update(model), "ema": ema, "info": info}
        if kind == "torch_ema":
            import importlib.metadata as md
            from torch_ema import ExponentialMovingAverage
            ema = ExponentialMovingAverage(model.parameters(), decay=DECAY)
            def swap():
                ema.store(); ema.copy_to(); ema.restore()
            info = f"torch-ema {md.version('torch_ema')}"
            return {"model": model, "update": ema.update, "swap": swap, "ema": ema, "info": info}
        if kind == "ema_pytorch":
            import importlib.metadata as md
            from ema_pytorch import EMA
            ema = EMA(model, beta=DECAY, update_after_step=0, update_every=1)
            info = f"ema-pytorch {md.version('ema_pytorch')}"
            return {"model": model, "update": ema.update, "ema": ema, "info": info}
        raise SystemExit(f"unknown kind {kind}")
    serve(build, WARMUP)
    """
)

PADDLE_ROWS = [("paddle_ema default (guard on)", "default"), ("paddle_ema nonfinite='update'", "update"),
               ("paddle_ema reference kernel", "reference"), ("floor 12 B/param", "floor12")]
TORCH_ROWS = [("timm ModelEmaV3 (no guard)", "timm_v3"), ("timm ModelEmaV2", "timm_v2"),
              ("torch-ema", "torch_ema"), ("ema-pytorch", "ema_pytorch")]


class Child:
    def __init__(self, label, argv, env, prelude):
        self.label = label
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.prelude = prelude

    def ask(self, line, payload=None):
        self.proc.stdin.write(line + "\n" + (json.dumps(payload) + "\n" if payload is not None else ""))
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"{self.label}: child failed: {self.proc.stderr.read()[-2000:]}")
        return json.loads(answer)

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def start_children(torch_python, warmup, threads):
    prelude = f"DECAY = {DECAY!r}\nWARMUP = {warmup}\n"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if threads:  # every child the same count: paddle_ema's threads, PyTorch's OpenMP pool
        env.update(PADDLE_EMA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    children = []
    for label, mode in PADDLE_ROWS:
        child_env = dict(env, PADDLE_EMA_KERNEL="reference") if mode == "reference" else env
        children.append(Child(label, [sys.executable, "-c", prelude + PADDLE_CHILD, mode], child_env, prelude))
    if torch_python and Path(torch_python).exists():
        torch_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        for label, kind in TORCH_ROWS:
            children.append(Child(label, [torch_python, "-c", prelude + TORCH_CHILD, kind], torch_env, prelude))
    else:
        print(f"note: no PyTorch at {torch_python!r}; its rows are left out", file=sys.stderr)
    return children


def machine():
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": model, "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "load_average": load, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run(args):
    shapes = json.loads(subprocess.run([sys.executable, "-c", SHAPES_CHILD, str(HERE)], capture_output=True,
                                       text=True, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout)
    shapes["vit_b16"] = vit_b16_shapes()
    children = start_children(args.torch_python, args.warmup, args.threads)
    report = {"machine": machine(), "runs": args.runs, "rounds": args.rounds, "threads": args.threads or "all",
              "sets": {}}
    try:
        for name in args.sets:
            parameters = sum(_numel(s) for s in shapes[name])
            live, info, memory = [], {}, {}
            for child in children:
                try:
                    hello = child.ask("set", shapes[name])
                except RuntimeError as exc:
                    print(f"note: {exc}", file=sys.stderr)
                    continue
                live.append(child)
                info[child.label], memory[child.label] = hello["info"], hello["memory_mb"]
            children = live
            samples = {c.label: [] for c in children}
            swaps = {c.label: [] for c in children}
            per_round = max(1, args.runs // args.rounds)
            for _ in range(args.rounds):
                for child in children:  # the others wait on their stdin meanwhile
                    samples[child.label] += child.ask(f"update {per_round}")
                for child in children:
                    swaps[child.label] += child.ask(f"swap {max(1, per_round // 2)}")
            rows = {label: statistics.median(t) for label, t in samples.items() if t}
            swap_rows = {label: statistics.median(t) for label, t in swaps.items() if t}
            floor = rows.get("floor 12 B/param")
            if floor:
                rows["floor 16 B/param (12 B x 16/12)"] = floor * 16 / 12
            report["sets"][name] = {"tensors": len(shapes[name]), "parameters": parameters, "ms": rows,
                                    "swap_ms": swap_rows, "memory_mb": memory, "info": info}
            print(f"{name}: {len(shapes[name])} tensors, {parameters / 1e6:.2f}M parameters done", file=sys.stderr)
    finally:
        for child in children:
            child.close()
    return report


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def format_table(report):
    sets = list(report["sets"])
    labels = list(dict.fromkeys(label for s in sets for label in report["sets"][s]["ms"]))
    lines = ["| | " + " | ".join(TITLES[s] for s in sets) + " |", "|---" * (len(sets) + 1) + "|"]

    def cell(name, value):
        return "-" if value is None else (f"{value * 1e3:.0f}" if name == "lenet" else f"{value:.2f}")

    for label in labels:
        lines.append(f"| {label} | " + " | ".join(cell(s, report["sets"][s]["ms"].get(label)) for s in sets) + " |")
    for label in ("paddle_ema default (guard on)", "torch-ema"):
        if any(label in report["sets"][s]["swap_ms"] for s in sets):
            lines.append(f"| swap: {label} | " + " | ".join(
                cell(s, report["sets"][s]["swap_ms"].get(label)) for s in sets) + " |")
    for label in labels:
        if any(label in report["sets"][s]["memory_mb"] for s in sets):
            lines.append(f"| memory MB: {label} | " + " | ".join(
                (f"{report['sets'][s]['memory_mb'][label]:.0f}" if label in report["sets"][s]["memory_mb"] else "-")
                for s in sets) + " |")
    lines.append("")
    lines.append("Ratios (guard on / timm V3, guard on / 16 B floor, nonfinite='update' / 12 B floor, "
                 "swap / torch-ema swap):")
    for s in sets:
        ms, sw = report["sets"][s]["ms"], report["sets"][s]["swap_ms"]
        on, off = ms.get("paddle_ema default (guard on)"), ms.get("paddle_ema nonfinite='update'")
        parts = []
        for what, a, b in (("on/timmV3", on, ms.get("timm ModelEmaV3 (no guard)")),
                           ("on/floor16", on, ms.get("floor 16 B/param (12 B x 16/12)")),
                           ("update/floor12", off, ms.get("floor 12 B/param")),
                           ("swap/torch-ema", sw.get("paddle_ema default (guard on)"), sw.get("torch-ema"))):
            parts.append(f"{what} {a / b:.2f}" if a and b else f"{what} -")
        lines.append(f"- {TITLES[s]}: " + ", ".join(parts))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="timed updates per row and set (split over the rounds)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, from {', '.join(SETS)}")
    parser.add_argument("--torch-python", default=DEFAULT_TORCH,
                        help="a Python with torch (timm, torch-ema, ema-pytorch)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for every child (paddle_ema and PyTorch alike); default: each library's own "
                             "(all cores)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    args.sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    bad = [s for s in args.sets if s not in SETS]
    if bad or args.runs < 1 or not 1 <= args.rounds <= args.runs or args.warmup < 0:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: --sets from {', '.join(SETS)} (got {bad or args.sets}); --runs >= 1, "
              f"1 <= --rounds <= --runs, --warmup >= 0", file=sys.stderr)
        sys.exit(2)
    report = run(args)
    m = report["machine"]
    print(f"{m['date']}: {m['cpu']}, {m['cpus']} CPUs, load average {m['load_average']}, "
          f"threads {report['threads']}")
    print(format_table(report))
    write_json(args.json, report)


if __name__ == "__main__":
    main()
