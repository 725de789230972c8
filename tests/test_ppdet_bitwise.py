"""paddle_ema.ppdet's ModelEMA and SimpleModelEMA give PaddleDetection's numbers bit for bit.

First the numpy oracle (tests/ppdet_oracle.py) is checked bitwise against Paddle's own eager ops,
the ones PaddleDetection's ema.py runs; then the classes are checked bitwise against the oracle
over 64 updates of a model with conv, BatchNorm, linear, a frozen weight and a float16 parameter,
for every constructor setting, with both kernels and a resume in the middle.
"""

import copy
import logging
import os
import warnings

import numpy as np
import paddle
import pytest

import ppdet_oracle as oracle
from test_model_ema import Net as ModelEMANet
from paddle_ema import kernels
from paddle_ema.errors import NonFiniteError
from paddle_ema.ppdet import ModelEMA, SimpleModelEMA, load_ema_state_file, save_ema_state_file

# The hard inputs overflow to inf in numpy's float32/float16 arithmetic on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

DECAYS = [0.1, 0.3, 1 / 3, 0.9, 0.99, 0.9996, 0.9998, 0.99990001]


def bits(x):
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def assert_bitwise(actual, expected, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    nan = np.isnan(actual) & np.isnan(expected)  # NaN payloads are not arithmetic
    same = (bits(actual) == bits(expected)) | nan
    assert same.all(), f"{what}: {int((~same).sum())} of {same.size} elements differ"


def hard_values(rng, n, dtype=np.float32):
    """Random magnitudes over the whole range, with +-0, subnormals and the largest values."""
    if dtype == np.float16:
        x = rng.standard_normal(n) * np.exp(rng.uniform(-20, 11, n))
        x[:8] = [0.0, -0.0, 6e-8, -6e-8, 65504.0, -65504.0, 1e-5, -3e-5]
        return np.clip(x, -65504, 65504).astype(np.float16)
    x = rng.standard_normal(n) * np.exp(rng.uniform(-103, 88, n))
    x[:6] = [0.0, -0.0, 1e-45, -1e-40, 3.4e38, -3.4e38]
    x[6:200] = rng.standard_normal(194) * 2.0 ** rng.uniform(-90, -76, 194)  # the float16 cast's odd range
    return x.astype(dtype)


@pytest.fixture(params=["fused", "reference"])
def kernel(request):
    kernels.set_kernel(request.param)
    yield request.param
    kernels.set_kernel(None)


# --- 1. the oracle against Paddle's ops ---------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_oracle_scale_is_paddles_scalar_multiply(dtype):
    rng = np.random.default_rng(0)
    x = hard_values(rng, 50_000, np.dtype(dtype).type)
    t = paddle.to_tensor(x)
    for d in DECAYS:
        for factor in (d, 1 - d):
            assert_bitwise((factor * t).numpy(), oracle.scale(x, factor), f"{factor} * x")
            assert_bitwise((t * factor).numpy(), oracle.scale(x, factor), f"x * {factor}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_oracle_add_is_paddles_add(dtype):
    rng = np.random.default_rng(1)
    a, b = hard_values(rng, 50_000, np.dtype(dtype).type), hard_values(rng, 50_000, np.dtype(dtype).type)
    b[:4] = [-0.0, 0.0, -0.0, 0.0]
    a[:4] = [-0.0, -0.0, 0.0, 0.0]
    with np.errstate(over="ignore"):
        expected = oracle.add(a, b)
    assert_bitwise((paddle.to_tensor(a) + paddle.to_tensor(b)).numpy(), expected)


def test_oracle_divide_and_cast_are_paddles():
    rng = np.random.default_rng(2)
    x = hard_values(rng, 200_000)
    t = paddle.to_tensor(x)
    for d in DECAYS:
        for steps in (1, 2, 7, 60, 1000):
            c = 1 - d**steps
            assert_bitwise((t / c).numpy(), oracle.divide(x, c), f"x / (1 - {d}**{steps})")
    assert_bitwise(t.astype("float16").numpy(), oracle.paddle_half(x), "astype float16")
    # The quirk is real on this Paddle: some of those float32 values do not become +-0.
    odd = np.abs(x[6:200]) < 2.0**-77
    assert (oracle.paddle_half(x[6:200])[odd] != 0).any()
    half = hard_values(rng, 50_000, np.float16)
    assert_bitwise(paddle.to_tensor(half).astype("float32").numpy(), half.astype(np.float32), "astype float32")


def test_oracle_update_formula_is_paddledetections_expression():
    rng = np.random.default_rng(3)
    v, x = hard_values(rng, 50_000), hard_values(rng, 50_000)
    for d in DECAYS:
        expression = d * paddle.to_tensor(v) + (1 - d) * paddle.to_tensor(x).astype("float32")
        assert_bitwise(expression.numpy(), oracle.add(oracle.scale(v, d), oracle.scale(x, 1 - d)), f"decay {d}")


def test_kernels_ppdet_update_matches_the_oracle(kernel):
    rng = np.random.default_rng(4)
    for value_dtype in (np.float32, np.float16):
        v, x = hard_values(rng, 300_000), hard_values(rng, 300_000, value_dtype)  # > 1 thread's share
        for d in DECAYS:
            average = paddle.to_tensor(v)
            kernels.ppdet_update_([average], [paddle.to_tensor(x)], d, 1 - d)
            expected = oracle.add(oracle.scale(v, d), oracle.scale(x.astype(np.float32), 1 - d))
            assert_bitwise(average.numpy(), expected, f"{kernel}, {value_dtype.__name__} values, decay {d}")


# --- 2. the classes against the oracle ----------------------------------------------------------
class Net(ModelEMANet):
    """test_model_ema's network, plus a float16 parameter (created last: the others keep their seeds)."""

    def __init__(self, half=True):
        super().__init__()
        if half:
            self.half = self.create_parameter([5, 3], dtype="float16")


def make_net(half=True):
    paddle.seed(0)
    return Net(half)


def numpy_state(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def train_step(model, rng):
    """Stand-in for an optimizer step: every state entry moves, BN statistics included, with a
    few exact zeros and negative zeros among the values."""
    with paddle.no_grad():
        for tensor in model.state_dict().values():
            value = tensor.numpy().astype(np.float32) + rng.normal(0, 0.3, tensor.shape).astype(np.float32)
            flat = value.reshape(-1)
            flat[: max(1, flat.size // 10)] = rng.choice([0.0, -0.0], max(1, flat.size // 10))
            tensor.set_value(value.astype(tensor.numpy().dtype))
    return numpy_state(model)


def check_same(ema, ref, what):
    for name, shadow in ref.state.items():
        if name not in ref.black:
            assert_bitwise(ema.state_dict[name].numpy(), shadow, f"{what}: shadow {name}")


def check_applied(applied, expected, what):
    assert set(applied) == set(expected)
    for name, value in applied.items():
        assert_bitwise(value.numpy(), expected[name], f"{what}: apply() {name}")


SETTINGS = [
    dict(ema_decay_type="threshold"),
    dict(ema_decay_type="exponential"),
    dict(ema_decay_type="normal", decay=0.99),
    dict(ema_decay_type="threshold", cycle_epoch=3, ema_black_list=["fc."]),
    dict(ema_decay_type="exponential", cycle_epoch=2, ema_filter_no_grad=True),
    dict(ema_decay_type="normal", decay=0.9, ema_black_list=["conv.bias"], ema_filter_no_grad=True),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_model_ema_is_bitwise_paddledetection(settings, kernel):
    model, rng = make_net(), np.random.default_rng(5)
    ema = ModelEMA(model, **settings, freeze_black_list=False)
    frozen = ["frozen"] if settings.get("ema_filter_no_grad") else []
    ref_settings = {k: v for k, v in settings.items() if k != "ema_filter_no_grad"}
    ref = oracle.ModelEMAOracle(numpy_state(model), frozen_no_grad=frozen, **ref_settings)
    assert ema.ema_black_list == ref.black
    check_applied(ema.apply(), ref.apply(numpy_state(model)), "t = 0")
    for t in range(64):
        values = train_step(model, rng)
        ema.update()
        ref.update(values)
        check_same(ema, ref, f"update {t}")
        if t % 5 == 4:  # an evaluation: apply() counts an epoch, cycle_epoch may reset
            check_applied(ema.apply(), ref.apply(values), f"apply after update {t}")
            assert (ema.step, ema.epoch) == (ref.step, ref.epoch)
        if t == 31:  # the trainer's resume: from the saved apply() output, at the saved step
            saved = {k: v.clone() for k, v in ema.apply().items()}  # as paddle.save/load gives it back
            expected = ref.apply(values)
            step = ema.step
            ema = ModelEMA(model, **settings, freeze_black_list=False)
            ema.resume(saved, step)
            ref = oracle.ModelEMAOracle(numpy_state(model), frozen_no_grad=frozen, **ref_settings)
            ref.resume(expected, step)
    check_applied(ema.apply(), ref.apply(values), "final apply")


def test_simple_model_ema_is_bitwise_paddledetection(kernel):
    # Paddle 3.3.1 has no float16 `add` kernel on the CPU, so PaddleDetection's `v += ...` fails
    # there for a float16 entry: SimpleModelEMA fails alike (below); the bitwise run has none.
    model, rng = make_net(half=False), np.random.default_rng(6)
    ema = SimpleModelEMA(model, decay=0.9)
    ref = oracle.SimpleModelEMAOracle(numpy_state(model), decay=0.9)
    assert ema.model is not model
    for t in range(64):
        values = train_step(model, rng)
        decay = None if t % 3 else 0.5  # update(model, decay) overrides the decay for one call
        ema.update(model, decay)
        ref.update(values, decay)
        for name, value in ref.state.items():
            assert_bitwise(ema.model.state_dict()[name].numpy(), value, f"update {t}: {name}")
        if t == 31:
            saved = {k: v.clone() for k, v in ema.model.state_dict().items()}
            ema = SimpleModelEMA(model, decay=0.9)
            ema.resume(saved, step=32)
            assert ema.step == 32
            for name, value in ref.state.items():
                assert_bitwise(ema.model.state_dict()[name].numpy(), value, f"resume: {name}")


class TiedNet(Net):
    """Net with a head registered twice, as PaddleDetection's PicoHeadV2 registers its first
    classification layer both as `head_cls_list.0` and as `head_cls0`: one tensor, two keys."""

    def __init__(self):
        super().__init__(half=False)
        self.head_cls_list = paddle.nn.LayerList([paddle.nn.Linear(3, 2)])
        self.head_cls0 = self.head_cls_list[0]


def tied_groups(model):
    """Keys that name one tensor object (found by identity, apart from the package's check)."""
    groups = {}
    for name, tensor in model.state_dict().items():
        groups.setdefault(id(tensor), []).append(name)
    return [group for group in groups.values() if len(group) > 1]


def test_simple_model_ema_moves_a_tied_tensor_once_like_paddledetection(kernel):
    paddle.seed(0)
    model, rng = TiedNet(), np.random.default_rng(11)
    groups = tied_groups(model)
    assert sorted(map(sorted, groups)) == [["head_cls0.bias", "head_cls_list.0.bias"],
                                           ["head_cls0.weight", "head_cls_list.0.weight"]]
    ema = SimpleModelEMA(model, decay=0.9)
    assert sorted(map(sorted, tied_groups(ema.model))) == sorted(map(sorted, groups))  # the copy keeps the ties
    ref = oracle.SimpleModelEMAOracle(numpy_state(model), decay=0.9, tied=groups)
    for t in range(24):
        before = ema.model.state_dict()["head_cls0.weight"].numpy().copy()
        values = train_step(model, rng)
        ema.update(model, None if t % 4 else 0.6)
        ref.update(values, None if t % 4 else 0.6)
        for name, value in ref.state.items():
            assert_bitwise(ema.model.state_dict()[name].numpy(), value, f"update {t}: {name}")
        # moved once: a second move from the once-moved value would give something else
        once = ref.state["head_cls0.weight"]
        decay = 0.9 if t % 4 else 0.6
        twice = oracle.add(oracle.scale(once, decay), oracle.scale(values["head_cls0.weight"], 1.0 - decay))
        assert not np.array_equal(once, twice) and not np.array_equal(once, before)
    assert sorted(map(sorted, tied_groups(ema.model))) == sorted(map(sorted, groups))


def test_model_ema_with_a_tied_tensor_is_paddledetection(kernel):
    # ModelEMA keeps one zero shadow per key, as PaddleDetection's does: both keys average the one tensor.
    paddle.seed(0)
    model, rng = TiedNet(), np.random.default_rng(12)
    ema = ModelEMA(model, decay=0.9)
    ref = oracle.ModelEMAOracle(numpy_state(model), decay=0.9)
    for t in range(12):
        values = train_step(model, rng)
        ema.update()
        ref.update(values)
        check_same(ema, ref, f"update {t}")
    check_applied(ema.apply(), ref.apply(values), "apply")


def test_simple_model_ema_float16_entry_fails_on_cpu_as_paddles_add_does(kernel):
    half = paddle.to_tensor(np.ones(3, np.float16))
    with pytest.raises(RuntimeError, match="add"):
        half * 0.5 + half * 0.5  # PaddleDetection's ops on such an entry
    model = make_net()
    ema = SimpleModelEMA(model)
    train_step(model, np.random.default_rng(10))
    before = numpy_state(ema.model)
    with pytest.raises(RuntimeError, match="add"):
        ema.update(model)
    for name, value in before.items():  # nothing changed, as PaddleDetection changes nothing
        assert_bitwise(ema.model.state_dict()[name].numpy(), value, name)
    # float16 scale does exist on the CPU, and the oracle rounds it as Paddle does
    x = hard_values(np.random.default_rng(9), 10_000, np.float16)
    assert_bitwise((paddle.to_tensor(x) * 0.9996).numpy(), oracle.scale(x, 0.9996), "float16 scale")


# --- 3. the black-list quirk --------------------------------------------------------------------
NOTICE = "sets stop_gradient=True on the trainable black-listed parameter(s) ['fc.weight']"


def test_black_listed_trainable_parameter_is_frozen_by_apply_like_paddledetection(caplog):
    model = make_net()
    ema = ModelEMA(model, ema_black_list=["fc.weight"])
    ema.update()
    assert not model.fc.weight.stop_gradient
    with caplog.at_level(logging.WARNING, logger="paddle_ema"), warnings.catch_warnings():
        warnings.simplefilter("error")  # a log record, no warning
        applied = ema.apply()
        assert applied["fc.weight"] is model.fc.weight
        assert model.fc.weight.stop_gradient  # frozen: the optimizer skips it from now on
        model.fc.weight.stop_gradient = False
        ema.apply()  # said once only
    assert [r.name for r in caplog.records] == ["paddle_ema.ppdet"]
    assert NOTICE in caplog.records[0].getMessage() and "freeze_black_list=False" in caplog.records[0].getMessage()
    assert model.fc.weight.stop_gradient

    other = make_net()
    kept = ModelEMA(other, ema_black_list=["fc.weight"], freeze_black_list=False)
    kept.update()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="paddle_ema"):
        kept.apply()
    assert not caplog.records
    assert not other.fc.weight.stop_gradient


NOTICE_SCRIPT = """
import logging, sys, warnings
import paddle
from paddle_ema.ppdet import ModelEMA

def run():
    model = paddle.nn.Linear(3, 2)
    ema = ModelEMA(model, ema_black_list=["weight"])
    ema.update()
    ema.apply()
    ema.apply()

run()
print("--- filtered", file=sys.stderr, flush=True)
warnings.filterwarnings("ignore")  # PaddleDetection's tools/train.py does this at import
ppdet = logging.getLogger("ppdet.engine")  # and its logger setup: its own loggers, not propagated
ppdet.setLevel(logging.INFO)
ppdet.propagate = False
ppdet.addHandler(logging.StreamHandler(sys.stdout))
run()
"""


def test_black_list_notice_shows_once_with_and_without_a_warnings_filter():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-c", NOTICE_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    before, after = result.stderr.split("--- filtered")
    notice = NOTICE.replace("'fc.weight'", "'weight'")
    assert before.count(notice) == 1, before
    assert after.count(notice) == 1, after


# --- 4. PaddleDetection's dygraph trainer, as it uses the class ---------------------------------
def test_paddledetection_trainer_usage_pattern(tmp_path):
    model, rng = make_net(), np.random.default_rng(7)
    ema = ModelEMA(model, decay=0.9998, ema_decay_type="threshold", cycle_epoch=-1)
    ref = oracle.ModelEMAOracle(numpy_state(model))
    for epoch in range(3):
        for _ in range(7):
            values = train_step(model, rng)
            ema.update()
            ref.update(values)
        weight = copy.deepcopy(model.state_dict())
        model.set_dict(ema.apply())
        expected = ref.apply(values)
        for name, tensor in model.state_dict().items():  # evaluation sees the EMA weights
            assert_bitwise(tensor.numpy(), expected[name], f"epoch {epoch}: {name}")
        model.set_dict(weight)
        for name, tensor in model.state_dict().items():  # training goes on from the raw weights
            assert_bitwise(tensor.numpy(), values[name], f"epoch {epoch}: raw {name}")
    path = str(tmp_path / "model_final.pdparams")
    paddle.save(ema.apply(), path)
    saved = ref.apply(values)
    step = ema.step
    resumed = ModelEMA(model, decay=0.9998, ema_decay_type="threshold", cycle_epoch=-1)
    resumed.resume(paddle.load(path), step)
    ref = oracle.ModelEMAOracle(numpy_state(model))
    ref.resume(saved, step)
    for _ in range(4):
        values = train_step(model, rng)
        resumed.update()
        ref.update(values)
    check_applied(resumed.apply(), ref.apply(values), "after resume")


class Detector(paddle.nn.Layer):
    """A small trainable model with BatchNorm for the trainer pattern below."""

    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(1, 4, 3)
        self.bn = paddle.nn.BatchNorm2D(4)
        self.fc = paddle.nn.Linear(16, 3)
        self.head = paddle.nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.fc(paddle.nn.functional.relu(self.bn(self.conv(x))).flatten(1)))


EPOCHS, STEPS = 3, 4


def trainer_run(folder, settings, start_epoch=0, resume=None, exact=False):
    """PaddleDetection's Trainer.train() with its Checkpointer, save_model() and load_weight(), in
    the calls they make: ModelEMA.update() after each optimizer and LR step; at each epoch's end
    weight = deepcopy(model.state_dict()), model.set_dict(ema.apply()), <epoch>.pdparams = the
    model's (EMA) state, .pdema = weight, .pdopt = the optimizer's state with last_epoch, then
    model.set_dict(weight). Resuming: model.set_dict(.pdema), optimizer.set_state_dict(.pdopt),
    ema.resume(.pdparams, the LR scheduler's last_epoch); `exact` adds paddle_ema's two lines
    (save_ema_state_file beside each checkpoint, load_ema_state_file after the resume).
    Returns the model's state before each update, {step: numpy state}, and the snapshots taken."""
    with paddle.utils.unique_name.guard():  # the optimizer's state names, as in a fresh process
        paddle.seed(3)
        model = Detector()
        lr = paddle.optimizer.lr.PiecewiseDecay([6], [0.05, 0.01])
        optimizer = paddle.optimizer.Momentum(lr, parameters=model.parameters(), weight_decay=1e-4)
        ema = ModelEMA(model, **settings)
        if resume is not None:
            model.set_dict(paddle.load(resume + ".pdema"))
            state = paddle.load(resume + ".pdopt")
            start_epoch = state.pop("last_epoch")
            optimizer.set_state_dict(state)
            ema.resume(paddle.load(resume + ".pdparams"), state["LR_Scheduler"]["last_epoch"])
            if exact:
                load_ema_state_file(ema, resume)
        values, snapshots = {}, {}
        for epoch in range(start_epoch, EPOCHS):
            for step in range(STEPS):
                rng = np.random.default_rng(100 * epoch + step)  # the data loader's batch
                x = paddle.to_tensor(rng.standard_normal((6, 1, 4, 4)).astype("float32"))
                y = paddle.to_tensor(rng.standard_normal((6, 2)).astype("float32"))
                loss = paddle.nn.functional.mse_loss(model(x), y)
                loss.backward()
                optimizer.step()
                lr.step()
                optimizer.clear_grad()
                values[epoch * STEPS + step] = numpy_state(model)
                ema.update()
            weight = copy.deepcopy(model.state_dict())
            model.set_dict(ema.apply())
            stem = os.path.join(folder, str(epoch))
            paddle.save(model.state_dict(), stem + ".pdparams")
            paddle.save(weight, stem + ".pdema")
            paddle.save({**optimizer.state_dict(), "last_epoch": epoch + 1}, stem + ".pdopt")
            if exact:
                save_ema_state_file(ema, stem)
            snapshots[epoch] = stem
            model.set_dict(weight)
    return values, snapshots


def file_bytes(stem, suffix):
    with open(stem + suffix, "rb") as f:
        return f.read()


# The second: a trainable black-listed weight (apply() freezes it) and a black-listed running
# statistic (it changes at every step), restarts after every second apply().
RESUME_SETTINGS = [dict(), dict(decay=0.9, ema_decay_type="normal", cycle_epoch=2,
                                ema_black_list=["head.bias", "bn._mean"])]


@pytest.mark.parametrize("settings", RESUME_SETTINGS, ids=["default", "black_list-cycle_epoch"])
def test_exact_resume_in_the_trainer_pattern_is_byte_identical_and_the_default_stays_paddledetections(
        settings, tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    values, snapshots = trainer_run(str(whole), settings, exact=True)
    # the uninterrupted run's checkpoints are PaddleDetection's numbers
    ref = oracle.ModelEMAOracle(values[0], **settings)
    for t in range(EPOCHS * STEPS):
        ref.update(values[t])
        if t % STEPS == STEPS - 1:
            saved = {k: v for k, v in paddle.load(snapshots[t // STEPS] + ".pdparams").items()}
            expected = ref.apply(values[t])
            for name, value in saved.items():
                assert_bitwise(np.asarray(value), expected[name], f"uninterrupted, epoch {t // STEPS}: {name}")
    final = snapshots[EPOCHS - 1]
    with paddle.utils.unique_name.guard():  # the internal name of the black-listed (frozen) weight
        frozen = Detector().head.bias.name if settings.get("ema_black_list") else None
    for start in range(EPOCHS - 1):
        for exact in (True, False):
            folder = tmp_path / f"from{start}-{exact}"
            folder.mkdir()
            mine, resumed = trainer_run(str(folder), settings, resume=snapshots[start], exact=exact)
            # The model and the optimizer resume exactly, but PaddleDetection's own resume leaves the
            # black-listed weight trainable until the next apply() freezes it again: another run.
            if exact or not frozen:
                for t, state in mine.items():
                    for name, value in state.items():
                        assert_bitwise(value, values[t][name], f"from {start}, step {t}: {name}")
            last = resumed[EPOCHS - 1]
            if exact:  # byte for byte the uninterrupted run's files
                for suffix in (".pdparams", ".pdemastate") + ((".pdopt",) if not frozen else ()):
                    assert file_bytes(last, suffix) == file_bytes(final, suffix), f"from {start}: {suffix}"
                if frozen:  # Paddle's optimizer makes no accumulator after a resume for a parameter
                    # that gets no gradient: the frozen one's momentum is not saved again
                    opt, whole_opt = paddle.load(last + ".pdopt"), paddle.load(final + ".pdopt")
                    assert set(whole_opt) - set(opt) == {f"{frozen}_velocity_0"} and set(opt) <= set(whole_opt)
                    for name in opt:
                        if name != "LR_Scheduler":
                            assert_bitwise(np.asarray(opt[name]), np.asarray(whole_opt[name]), f".pdopt {name}")
                    assert opt["LR_Scheduler"] == whole_opt["LR_Scheduler"]
                # .pdema's bytes hold the names deepcopy gave its tensors, which count the copies
                # made in the process: its values are compared
                raw, whole_raw = paddle.load(last + ".pdema"), paddle.load(final + ".pdema")
                assert list(raw) == list(whole_raw)
                for name in raw:
                    assert_bitwise(np.asarray(raw[name]), np.asarray(whole_raw[name]), f"from {start}: .pdema {name}")
                continue
            # PaddleDetection's resume: the applied weights taken as raw shadows, t from the LR
            # scheduler, epoch 0: its numbers, bit for bit, and not the uninterrupted run's
            ref = oracle.ModelEMAOracle(values[0], **settings)
            ref.resume({k: np.asarray(v) for k, v in paddle.load(snapshots[start] + ".pdparams").items()},
                       (start + 1) * STEPS)
            for t in sorted(mine):
                ref.update(mine[t])
                if t % STEPS == STEPS - 1:
                    expected = ref.apply(mine[t])
                    for name, value in paddle.load(resumed[t // STEPS] + ".pdparams").items():
                        assert_bitwise(np.asarray(value), expected[name], f"default from {start}: {name}")
            assert file_bytes(last, ".pdparams") != file_bytes(final, ".pdparams")


# --- 5. the non-finite guard --------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_guard_changes_no_number_of_a_finite_run(policy):
    plain_model, guarded_model = make_net(), make_net()
    plain, guarded = ModelEMA(plain_model), ModelEMA(guarded_model, nonfinite=policy)
    rng_a, rng_b = np.random.default_rng(8), np.random.default_rng(8)
    for _ in range(12):
        train_step(plain_model, rng_a)
        train_step(guarded_model, rng_b)
        plain.update()
        guarded.update()
    mine, theirs = guarded.apply(), plain.apply()
    for name in mine:
        assert_bitwise(mine[name].numpy(), theirs[name].numpy(), name)
    assert guarded.num_nonfinite_skipped == 0


def test_nonfinite_skip_and_raise():
    model = make_net()
    ema = ModelEMA(model, nonfinite="skip")
    ema.update()
    before = {k: v.numpy().copy() for k, v in ema.state_dict.items()}
    model.bn._mean.set_value(np.array([np.nan, 0.0], np.float32))
    with pytest.warns(RuntimeWarning, match="'bn._mean' holds NaN or Inf"):
        ema.update()
    assert ema.step == 1 and ema.num_nonfinite_skipped == 1
    for name, value in before.items():
        assert_bitwise(ema.state_dict[name].numpy(), value, name)
    with pytest.raises(NonFiniteError, match="bn._mean"):
        ModelEMA(model, nonfinite="raise").update()
    unguarded = ModelEMA(model)  # PaddleDetection's behaviour: the NaN goes in
    unguarded.update()
    assert np.isnan(unguarded.state_dict["bn._mean"].numpy()[0])
