"""Each drop-in's update against its suite's own loop, on the same model, one run, alternating.

    python benchmarks/bench_dropins.py [--repeats 30] [--unet-scale 4 | --unet-config DIR] [--real] [--rows NAMES]
                                       [--json PATH]

Rows and models:
- PaddleOCR ModelEMA.update, on ResNet-50 (paddle.vision.models.resnet50: 267 state tensors, 25.6 M elements);
- ppdiffusers EMAModel.step and LitEma.forward, on a UNet-sized set of 686 parameters: the tensors
  of Stable Diffusion 1.5's UNet (conv_in, time embedding, 4 down blocks, mid block, 4 up blocks,
  with their ResNet and transformer layers) with every channel count divided by --unet-scale
  (4: 54 M elements; 1 would be the full 860 M); or, with --unet-config, ppdiffusers' UNet2DModel
  built from that config folder (ppdiffusers needed);
- PaddleClas, PaddleSeg and PaddleYOLO, on ResNet-50, from benchmarks/bench_dropins_ppcls_paddleseg_paddleyolo.py
  when it and `paddle_ema.dropin.ppcls` / `.paddleseg` / `.paddleyolo` are present (a note otherwise).
Each suite's loop is written out here in the Paddle ops its source runs (the expressions that
tests/test_suite_oracles.py checks against the suites):
- PaddleOCR: for every entry not black-listed that the model has, `v = d * v + (1 - d) *
  m.astype('float32')` (new tensors), after `model.state_dict()`, threshold decay;
- EMAModel: for every parameter, `s.copy_(s - (1 - d) * (s - p.cast(s.dtype)), False)` (trainable)
  or `s.copy_(p.cast(s.dtype), False)`, warm-up decay (train_unconditional.py's settings);
- LitEma: `dict(model.named_parameters())`, `dict(self.named_buffers())`, then per trainable
  parameter `b.scale_(d); b.add_(p.astype('float32') * (1 - d))`, threshold decay.
With --real the installed suites' classes run instead (ppdiffusers; PaddleOCR's ppocr on PYTHONPATH).
The drop-in and the suite's loop alternate call by call, each on its own EMA, the model's weights
fixed; after the warm-up calls the two EMA states must be bitwise equal (else the row says so and
is not timed), and again at the end. The table gives the median of each, the ratio, and the check.
Below it, per model, the memory floor (as bench_peers.py measures it): the fused extension's lerp
of one flat float32 buffer of the model's element count, which reads and writes what a fused
update of float32 weights reads and writes, with no per-tensor cost.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import paddle  # noqa: E402
from paddle import nn  # noqa: E402

from benchmarks.reporting import write_json  # noqa: E402
from paddle_ema import kernels  # noqa: E402
from paddle_ema.dropin import ppdiffusers, ppocr  # noqa: E402

WARMUP = 3


# --- the suites' loops, in the ops their sources run ------------------------------------------
def paddleocr_update(shadows, black, model, step, decay=0.9998):
    """`step`: updates so far (ModelEMA's self.step), from 0."""
    decay = min(decay, (1 + step) / (10 + step))
    model_dict = model.state_dict()
    for k, v in shadows.items():
        if k not in black and k in model_dict:
            v = decay * v + (1 - decay) * model_dict[k].astype("float32")
            v.stop_gradient = True
            shadows[k] = v


def ppdiffusers_decay(optimization_step, decay=0.9999, power=0.75):
    """EMAModel.get_decay with train_unconditional.py's use_ema_warmup=True, inv_gamma 1, power 0.75."""
    return min(1 - (1 + optimization_step) ** -power, decay)


def emamodel_step(shadows, parameters, optimization_step):
    one_minus_decay = 1 - ppdiffusers_decay(optimization_step)
    with paddle.no_grad():
        for s_param, param in zip(shadows, parameters):
            if not param.stop_gradient:
                s_param.copy_(s_param - one_minus_decay * (s_param - param.cast(s_param.dtype)), False)
            else:
                s_param.copy_(param.cast(s_param.dtype), False)


def litema_forward(owner, model, num_updates, decay=0.9999):
    """`owner`: a Layer holding the float32 buffers; `num_updates`: this call's n, from 1."""
    decay = min(decay, (1 + num_updates) / (10 + num_updates))
    one_minus_decay = 1.0 - decay
    with paddle.no_grad():
        m_param = dict(model.named_parameters())
        shadow_params = dict(owner.named_buffers())
        for key in m_param:
            if not m_param[key].stop_gradient:
                sname = key.replace(".", "")
                shadow_params[sname].scale_(decay)
                shadow_params[sname].add_(m_param[key].astype("float32") * one_minus_decay)


# --- the models --------------------------------------------------------------------------------
def unet_shapes(scale):
    """[(module name, {param: shape})] of Stable Diffusion 1.5's UNet, channels divided by `scale`."""
    c = [320 // scale, 640 // scale, 1280 // scale, 1280 // scale]
    temb, cross = 1280 // scale, 768 // scale
    modules = []

    def add(name, **params):
        modules.append((name, params))

    def resnet(name, cin, cout):
        add(f"{name}_norm1", weight=[cin], bias=[cin])
        add(f"{name}_conv1", weight=[cout, cin, 3, 3], bias=[cout])
        add(f"{name}_time_emb_proj", weight=[temb, cout], bias=[cout])
        add(f"{name}_norm2", weight=[cout], bias=[cout])
        add(f"{name}_conv2", weight=[cout, cout, 3, 3], bias=[cout])
        if cin != cout:
            add(f"{name}_conv_shortcut", weight=[cout, cin, 1, 1], bias=[cout])

    def transformer(name, ch):
        add(f"{name}_norm", weight=[ch], bias=[ch])
        add(f"{name}_proj_in", weight=[ch, ch, 1, 1], bias=[ch])
        for i, kv in ((1, ch), (2, cross)):
            add(f"{name}_norm{i}", weight=[ch], bias=[ch])
            add(f"{name}_attn{i}_to_q", weight=[ch, ch])
            add(f"{name}_attn{i}_to_k", weight=[kv, ch])
            add(f"{name}_attn{i}_to_v", weight=[kv, ch])
            add(f"{name}_attn{i}_to_out", weight=[ch, ch], bias=[ch])
        add(f"{name}_norm3", weight=[ch], bias=[ch])
        add(f"{name}_ff_proj", weight=[ch, 8 * ch], bias=[8 * ch])
        add(f"{name}_ff_out", weight=[4 * ch, ch], bias=[ch])
        add(f"{name}_proj_out", weight=[ch, ch, 1, 1], bias=[ch])

    add("conv_in", weight=[c[0], 4, 3, 3], bias=[c[0]])
    add("time_linear_1", weight=[c[0], temb], bias=[temb])
    add("time_linear_2", weight=[temb, temb], bias=[temb])
    skips, cin = [c[0]], c[0]
    for b, ch in enumerate(c):
        for r in range(2):
            resnet(f"down{b}_res{r}", cin, ch)
            if b < 3:
                transformer(f"down{b}_attn{r}", ch)
            cin = ch
            skips.append(ch)
        if b < 3:
            add(f"down{b}_downsample", weight=[ch, ch, 3, 3], bias=[ch])
            skips.append(ch)
    resnet("mid_res0", c[3], c[3])
    transformer("mid_attn0", c[3])
    resnet("mid_res1", c[3], c[3])
    for b, ch in enumerate(reversed(c)):
        for r in range(3):
            resnet(f"up{b}_res{r}", cin + skips.pop(), ch)
            if b > 0:
                transformer(f"up{b}_attn{r}", ch)
            cin = ch
        if b < 3:
            add(f"up{b}_upsample", weight=[ch, ch, 3, 3], bias=[ch])
    add("conv_norm_out", weight=[c[0]], bias=[c[0]])
    add("conv_out", weight=[4, c[0], 3, 3], bias=[4])
    return modules


class UNetLike(nn.Layer):
    """A Layer with unet_shapes(scale)'s parameters, under one sublayer per module (names
    `<module>.weight`, as a UNet's named_parameters() has them), random normal values."""

    def __init__(self, scale):
        super().__init__()
        rng = np.random.default_rng(0)
        for name, params in unet_shapes(scale):
            module = nn.Layer()
            for pname, shape in params.items():
                param = module.create_parameter(shape, default_initializer=nn.initializer.Assign(
                    rng.standard_normal(shape, dtype=np.float32) * 0.02))
                setattr(module, pname, param)
            self.add_sublayer(name, module)


# --- the rows: (drop-in call(step), suite call(step), drop-in state(), suite state()) ---------
def bench_paddleocr(real, models):
    model = models["resnet50"]
    ours = ppocr.ModelEMA(model)
    if real:
        from ppocr.utils.ema import ModelEMA

        theirs = ModelEMA(model)
        return (lambda step: ours.update(model), lambda step: theirs.update(model),
                lambda: ours.state_dict, lambda: theirs.state_dict)
    shadows = {k: paddle.zeros(v.shape, "float32") for k, v in model.state_dict().items()}
    return (lambda step: ours.update(model), lambda step: paddleocr_update(shadows, set(), model, step - 1),
            lambda: ours.state_dict, lambda: shadows)


def bench_emamodel(real, models):
    model = models["unet"]
    options = dict(decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    ours = ppdiffusers.EMAModel(model.parameters(), **options)
    if real:
        from ppdiffusers.training_utils import EMAModel

        theirs = EMAModel(model.parameters(), **options)
        update, state = lambda step: theirs.step(model.parameters()), lambda: as_dict(theirs.shadow_params)
    else:
        shadows = [p.clone().detach() for p in model.parameters()]
        update, state = lambda step: emamodel_step(shadows, model.parameters(), step), lambda: as_dict(shadows)
    return lambda step: ours.step(model.parameters()), update, lambda: as_dict(ours.shadow_params), state


def bench_litema(real, models):
    model = models["unet"]
    ours = ppdiffusers.LitEma(model)
    if real:
        from ppdiffusers.models.ema import LitEma

        theirs = LitEma(model)
        update = lambda step: theirs(model)  # noqa: E731
    else:
        theirs = nn.Layer()
        for name, p in model.named_parameters():
            theirs.register_buffer(name.replace(".", ""), p.clone().detach().astype("float32"))
        update = lambda step: litema_forward(theirs, model, step)  # noqa: E731
    return lambda step: ours(model), update, ours.state_dict, theirs.state_dict


def as_dict(tensors):
    return {str(i): t for i, t in enumerate(tensors)}


def bitwise_equal(a, b):
    return list(a) == list(b) and all(
        x.dtype == y.dtype and np.array_equal(x.numpy().view(np.uint8), y.numpy().view(np.uint8))
        for x, y in zip(a.values(), b.values()))


def rows():
    """{row name: (model key, builder(real, models))}, the other helper's rows when importable."""
    found = {"PaddleOCR ModelEMA": ("resnet50", bench_paddleocr),
             "ppdiffusers EMAModel": ("unet", bench_emamodel),
             "ppdiffusers LitEma": ("unet", bench_litema)}
    notes = []
    try:
        from benchmarks.bench_dropins_ppcls_paddleseg_paddleyolo import SUITES
    except ImportError as error:  # that branch's drop-ins and benchmark not merged here
        notes.append(f"PaddleClas, PaddleSeg, PaddleYOLO rows skipped: {error}")
    else:
        for name, builder in SUITES.items():
            found[name] = ("resnet50", lambda real, models, builder=builder: builder(models["resnet50"], real))
    return found, notes


def timed(ours, theirs, our_state, their_state, repeats):
    """Alternate the two calls; None when the states differ after the warm-up (nothing timed)."""
    times = {"drop-in": [], "suite": []}
    for step in range(1, repeats + WARMUP + 1):
        if step == WARMUP + 1 and not bitwise_equal(our_state(), their_state()):
            return None
        for label, update in (("drop-in", ours), ("suite", theirs)):
            start = time.perf_counter()
            update(step)
            if step > WARMUP:
                times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) * 1e3 for label, t in times.items()}


def memory_floors(models, repeats):
    """{model key: median ms of the extension's fused lerp of one flat float32 buffer of its size (12 bytes an
    element, no per-tensor cost: the memory floor)}; {} without it."""
    from paddle_ema.kernels import fused

    if kernels.active_kernel() != "fused":
        return {}
    floors = {}
    for key, model in models.items():
        numel = sum(int(np.prod(v.shape)) for v in model.state_dict().values())
        a, x = paddle.zeros([numel], "float32"), paddle.ones([numel], "float32")
        times = []
        for i in range(repeats + WARMUP):
            start = time.perf_counter()
            fused.lerp_([a], [x], 0.5)
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
        floors[key] = statistics.median(times) * 1e3
    return floors


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--unet-scale", type=int, default=4, help="divide the UNet's channel counts by this")
    parser.add_argument("--unet-config", help="a folder with a ppdiffusers UNet2DModel config.json to use instead")
    parser.add_argument("--real", action="store_true", help="time the installed suites' own classes")
    parser.add_argument("--rows", help="comma-separated row names (default: all)")
    parser.add_argument("--json")
    args = parser.parse_args()
    found, notes = rows()
    names = args.rows.split(",") if args.rows else list(found)
    unknown = [n for n in names if n not in found]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(found)}")
    paddle.seed(0)
    models = {}
    if any(found[n][0] == "resnet50" for n in names):
        models["resnet50"] = paddle.vision.models.resnet50()
    if any(found[n][0] == "unet" for n in names):
        if args.unet_config:
            from ppdiffusers import UNet2DModel

            models["unet"] = UNet2DModel.from_config(UNet2DModel.load_config(args.unet_config))
        else:
            models["unet"] = UNetLike(args.unet_scale)
    for key, model in models.items():
        state = model.state_dict()
        numel = sum(int(np.prod(v.shape)) for v in state.values())
        print(f"{key}: {len(state)} state tensors, {len(model.parameters())} parameters, {numel / 1e6:.1f} M elements")
    print(f"kernel {kernels.active_kernel()}, Paddle {paddle.__version__}, {args.repeats} alternating calls after "
          f"{WARMUP}, suites' loops {'installed' if args.real else 'written out in Paddle ops'}")
    for note in notes:
        print(note)
    print("| row | model | drop-in median ms | suite's loop median ms | ratio "
          "| EMA bitwise equal (after warm-up, end) |")
    print("|---|---|---|---|---|---|")
    report, ok = {}, True
    for name in names:
        key, builder = found[name]
        ours, theirs, our_state, their_state = builder(args.real, models)
        medians = timed(ours, theirs, our_state, their_state, args.repeats)
        if medians is None:
            ok = False
            print(f"| {name} | {key} | - | - | - | False (not timed) |")
            report[name] = {"bitwise_equal": False}
            continue
        same = bitwise_equal(our_state(), their_state())
        ok &= same
        ratio = medians["suite"] / medians["drop-in"]
        print(f"| {name} | {key} | {medians['drop-in']:.2f} | {medians['suite']:.2f} | {ratio:.1f}x | True, {same} |")
        report[name] = {"model": key, "median_ms": medians, "ratio": ratio, "bitwise_equal": same}
    unet = args.unet_config or f"SD 1.5 UNet shapes, channels / {args.unet_scale}"
    floors = memory_floors(models, args.repeats)
    for key, ms in floors.items():
        print(f"memory floor, {key}: {ms:.2f} ms (the fused lerp of one flat float32 buffer of its size)")
    write_json(args.json, {"real": args.real, "unet": unet, "rows": report, "notes": notes,
                           "memory_floor_ms": floors})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
