"""paddle_ema.dropin.paddleyolo against PaddleYOLO's EMA arithmetic and its trainer's use of it.

1. ModelEMA bitwise against the numpy oracle of PaddleYOLO's class (tests/suite_oracles.py, itself
   checked against Paddle's ops and paddledet's class) over 64 updates of a model with conv,
   BatchNorm, linear, a frozen weight, a float64 parameter and an int64 buffer, every constructor
   setting (decay types, cycle_epoch, black list, ema_filter_no_grad, freeze_black_list,
   nonfinite), both kernels, apply() every few updates, and a resume in the middle both ways: the
   trainer's (resume() from apply()'s output, corrected twice) and the exact one (ema_state).
2. The trainer's flow: update() without arguments, the snapshot (`set_dict(apply())`, save,
   `set_dict(weight)`), `.pdparams`/`.pdema`, load_weight's resume, and exact_resume's files.
3. Half precision (GPU only), SimpleModelEMA, the real class when ppdet is importable.
"""

import copy
import os

import numpy as np
import paddle
import pytest

import suite_oracles as so
from paddle_ema.dropin.paddleyolo import ModelEMA, SimpleModelEMA, exact_resume, load_ema_state_file, save_ema_state_file
from paddle_ema.errors import ConfigError, IncompatibleStateError, NonFiniteError
from test_ppdet_bitwise import assert_bitwise, kernel  # noqa: F401 - kernel is a fixture
from test_suite_oracles import PADDLEYOLO_SETTINGS, check_state, make_net, numpy_state, suite_class, train_step

SETTINGS = PADDLEYOLO_SETTINGS + [
    dict(ema_decay_type="threshold", decay=0.9998, ema_black_list=["fc.weight"], freeze_black_list=False),
    dict(ema_decay_type="normal", decay=0.95, nonfinite="skip"),
    dict(ema_decay_type="threshold", cycle_epoch=4, nonfinite="raise"),
]


def ids(settings):
    return "-".join(f"{k}={v}" for k, v in settings.items())


def oracle(model, settings):
    frozen = ["frozen"] if settings.get("ema_filter_no_grad") else []
    keep = ("decay", "ema_decay_type", "cycle_epoch", "ema_black_list")
    return so.PaddleYOLOOracle(numpy_state(model), frozen_no_grad=frozen, **{k: v for k, v in settings.items() if k in keep})


def check_shadows(ema, ref, what):
    for key in ref.state:
        if key not in ref.black:
            assert_bitwise(ema.state_dict[key].numpy(), ref.state[key], f"{what}: {key}")


# --- 1. the oracle ----------------------------------------------------------------------------
@pytest.mark.parametrize("resume", ["trainer", "exact"])
@pytest.mark.parametrize("settings", SETTINGS, ids=ids)
def test_bitwise_against_the_oracle(kernel, settings, resume):
    model, rng = make_net(extra_dtype="float64", int_buffer=True), np.random.default_rng(51)
    ema, ref = ModelEMA(model, **settings), oracle(model, settings)
    assert ema.ema_black_list == ref.black
    assert ema.state_dict["count"].dtype == paddle.int64 and ema.state_dict["extra"].dtype == paddle.float64
    check_state(ema.apply(), ref.apply(numpy_state(model)), "t = 0")
    for t in range(64):
        values = train_step(model, rng)
        ema.update()
        ref.update(values)
        check_shadows(ema, ref, f"update {t}")
        if t % 5 == 4:
            check_state(ema.apply(), ref.apply(values), f"apply after update {t}")
            assert (ema.step, ema.epoch) == (ref.step, ref.epoch)
        if t == 31 and resume == "trainer":  # load_weight: resume() from the saved apply() output
            saved = {k: v.clone() for k, v in ema.apply().items()}
            expected, step = ref.apply(values), ema.step
            ema = ModelEMA(model, **settings)
            ema.resume(saved, step)
            ref = oracle(model, settings)
            ref.resume(expected, step)
        elif t == 31:
            state = copy.deepcopy(ema.ema_state())
            ema = ModelEMA(model, **settings)
            ema.load_ema_state(state)
    assert ema.state_dict["count"].dtype == paddle.float32  # promoted by the first update
    check_state(ema.apply(), ref.apply(values), "final apply")


def test_apply_divides_in_the_models_dtype_and_does_not_cast_back(kernel):
    """Closed forms after one 'normal' update from zero shadows, decay 0.75:
    shadow = 0.25 * x (+0), apply = shadow / 0.25 in the entry's dtype; the int64 buffer comes back
    as float32; PaddleDetection's ModelEMA would cast it back to int64."""
    model = make_net(extra_dtype="float64", int_buffer=True)
    ema = ModelEMA(model, decay=0.75, ema_decay_type="normal")
    ema.update()
    out = ema.apply()
    x = model.extra.numpy()
    assert_bitwise(ema.state_dict["extra"].numpy(), x * np.float64(0.25) + np.float64(0.0), "float64 shadow")
    assert_bitwise(out["extra"].numpy(), (x * np.float64(0.25) + np.float64(0.0)) / np.float64(0.25), "float64 apply")
    count = model.count.numpy().astype(np.float32)
    assert_bitwise(out["count"].numpy(), (count * np.float32(0.25) + np.float32(0.0)) / np.float32(0.25), "int64")


def test_nonfinite_skip_and_raise():
    model, rng = make_net(), np.random.default_rng(52)
    skip, raising, plain = (ModelEMA(model, nonfinite=p) for p in ("skip", "raise", "update"))
    for ema in (skip, raising, plain):
        ema.update()
    before = {k: v.numpy() for k, v in skip.state_dict.items()}
    train_step(model, rng)
    with paddle.no_grad():
        bias = model.fc.bias.numpy()
        bias[2] = np.nan
        model.fc.bias.set_value(bias)
    with pytest.warns(RuntimeWarning, match="'fc.bias' holds NaN or Inf"):
        skip.update()
    assert skip.step == 1 and skip.num_nonfinite_skipped == 1
    check_state(skip.state_dict, before, "skipped")
    with pytest.raises(NonFiniteError, match="'fc.bias' holds NaN or Inf"):
        raising.update()
    plain.update()  # PaddleYOLO's behaviour: the NaN enters the average
    assert np.isnan(plain.state_dict["fc.bias"].numpy()[2])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_models_need_a_gpu(dtype):
    """PaddleYOLO averages a float16 model in float16; Paddle's CPU has no float16 (or bfloat16)
    add, so the update raises as PaddleYOLO's does, and nothing changes (GPU numbers unverified)."""
    model = make_net()
    model.to(dtype=dtype)
    ema = ModelEMA(model)
    assert ema.state_dict["fc.weight"].dtype == getattr(paddle, dtype)
    with pytest.raises(RuntimeError, match="add"):
        ema.update()
    assert ema.step == 0
    check_state(ema.state_dict, {k: np.zeros_like(v) for k, v in numpy_state(model).items()}, "still zero")


# --- 2. the trainer's flow ----------------------------------------------------------------------
class Detector(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 4, 3, padding=1)
        self.bn = paddle.nn.BatchNorm2D(4)
        self.fc = paddle.nn.Linear(4 * 6 * 6, 3)
        self.frozen = self.create_parameter([3], default_initializer=paddle.nn.initializer.Constant(0.5))
        self.frozen.stop_gradient = True

    def forward(self, x):
        return self.fc(paddle.nn.functional.relu(self.bn(self.conv(x))).flatten(1)) * self.frozen


def batches(n):
    rng = np.random.default_rng(53)
    return [paddle.to_tensor(rng.normal(size=(2, 3, 6, 6)).astype("float32")) for _ in range(n)]


def trainer_run(data, epochs, per_epoch, save_dir, resume=None, exact=False, ref=None):
    """PaddleYOLO's Trainer.train, reduced to what touches the EMA: update() after each step, the
    snapshot at each epoch end (`weight = deepcopy(state_dict)`, `set_dict(apply())`, the
    Checkpointer's `.pdparams` (EMA) / `.pdema` (raw), `set_dict(weight)`), load_weight's resume."""
    paddle.seed(8)
    model = Detector()
    optimizer = paddle.optimizer.SGD(0.05, parameters=model.parameters())  # stateless: no .pdopt needed
    ema = ModelEMA(model, decay=0.9, ema_decay_type="threshold")
    start = 0
    if resume is not None:
        model.set_dict(paddle.load(resume + ".pdema"))
        start = int(os.path.basename(resume)) + 1
        ema.resume(paddle.load(resume + ".pdparams"), start * per_epoch)
        if ref is not None:
            ref.resume({k: v.numpy() for k, v in paddle.load(resume + ".pdparams").items()}, start * per_epoch)
        if exact:
            load_ema_state_file(ema, resume)
    for epoch in range(start, epochs):
        for x in data[epoch * per_epoch:(epoch + 1) * per_epoch]:
            loss = (model(x) ** 2).mean()
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()
            ema.update()
            if ref is not None:
                ref.update(numpy_state(model))
        weight = copy.deepcopy(model.state_dict())
        model.set_dict(ema.apply())
        if ref is not None:
            check_state(model.state_dict(), ref.apply({k: v.numpy() for k, v in weight.items()}), f"snapshot {epoch}")
        paddle.save(model.state_dict(), os.path.join(save_dir, f"{epoch}.pdparams"))
        paddle.save(weight, os.path.join(save_dir, f"{epoch}.pdema"))
        save_ema_state_file(ema, os.path.join(save_dir, str(epoch)))
        model.set_dict(weight)
    return model


def test_trainer_flow_and_both_resumes(kernel, tmp_path):
    data, per_epoch = batches(12), 3
    for name in ("whole", "trainer", "exact"):
        os.makedirs(tmp_path / name)
    paddle.seed(8)
    ref = so.PaddleYOLOOracle(numpy_state(Detector()), decay=0.9)
    model = trainer_run(data, 4, per_epoch, str(tmp_path / "whole"), ref=ref)
    final = {k: v.numpy() for k, v in paddle.load(str(tmp_path / "whole" / "3.pdparams")).items()}

    # the trainer's own resume: raw weights continue exactly, the EMA is corrected twice (the oracle's too)
    paddle.seed(8)
    ref = so.PaddleYOLOOracle(numpy_state(Detector()), decay=0.9)
    resumed = trainer_run(data, 4, per_epoch, str(tmp_path / "trainer"), resume=str(tmp_path / "whole" / "1"), ref=ref)
    check_state(resumed.state_dict(), numpy_state(model), "raw weights")
    twice = {k: v.numpy() for k, v in paddle.load(str(tmp_path / "trainer" / "3.pdparams")).items()}
    assert not np.array_equal(twice["fc.weight"], final["fc.weight"])

    # exact: the .pdemastate beside the checkpoint, bitwise the uninterrupted run
    trainer_run(data, 4, per_epoch, str(tmp_path / "exact"), resume=str(tmp_path / "whole" / "1"), exact=True)
    for suffix in (".pdparams", ".pdema"):
        expected = {k: v.numpy() for k, v in paddle.load(str(tmp_path / "whole" / f"3{suffix}")).items()}
        check_state(paddle.load(str(tmp_path / "exact" / f"3{suffix}")), expected, suffix)


class FakeTrainer:
    """The attributes of PaddleYOLO's Trainer that exact_resume touches."""

    def __init__(self, ema, save_dir, epochs):
        self.use_ema, self.ema, self.callbacks = True, ema, []
        self.cfg = {"save_dir": str(save_dir), "filename": "yolov3_tiny", "epoch": epochs}

    def register_callbacks(self, callbacks):
        self.callbacks.extend(callbacks)


class Cfg(dict):
    __getattr__ = dict.__getitem__


def test_exact_resume_writes_where_paddleyolos_checkpointer_does(tmp_path, caplog):
    pytest.importorskip("ppdet.engine.callbacks", reason="ppdet (PaddleYOLO or paddledet) is not installed")
    model, rng = make_net(), np.random.default_rng(54)
    trainer = FakeTrainer(ModelEMA(model, decay=0.9), tmp_path, epochs=2)
    trainer.cfg = Cfg(trainer.cfg)
    exact_resume(trainer)
    (callback,) = trainer.callbacks
    for epoch in range(2):
        train_step(model, rng)
        trainer.ema.update()
        callback.on_epoch_end({"mode": "train", "epoch_id": epoch, "weight": {}})
    folder = tmp_path / "yolov3_tiny"
    assert sorted(os.listdir(folder)) == ["0.pdemastate", "model_final.pdemastate"]
    again = FakeTrainer(ModelEMA(model, decay=0.9), tmp_path, epochs=2)
    again.cfg = Cfg(again.cfg)
    exact_resume(again, str(folder / "model_final.pdparams"))
    check_state(again.ema.state_dict, {k: v.numpy() for k, v in trainer.ema.state_dict.items()}, "loaded")
    assert again.ema.step == 2
    plain = FakeTrainer(ModelEMA(model, decay=0.9), tmp_path, epochs=2)
    plain.cfg = Cfg(plain.cfg)
    exact_resume(plain, str(tmp_path / "elsewhere" / "0"))  # no state beside it: PaddleYOLO's resume, said
    assert "has no EMA state beside it" in caplog.text and plain.ema.step == 0
    with pytest.raises(ConfigError, match="no paddle_ema ModelEMA"):
        exact_resume(FakeTrainer(None, tmp_path, 2))


def test_load_ema_state_refused_changes_nothing():
    model = make_net(int_buffer=True)
    ema = ModelEMA(model)
    state = copy.deepcopy(ema.ema_state())
    state["shadow"]["fc.weight"] = paddle.zeros([2, 2])
    with pytest.raises(IncompatibleStateError):
        ema.load_ema_state(state)
    assert ema.state_dict["count"].dtype == paddle.int64


# --- 3. SimpleModelEMA and the real class ----------------------------------------------------------
def test_simple_model_ema_is_paddledetections():
    from paddle_ema.ppdet import SimpleModelEMA as PPDetSimpleModelEMA

    assert SimpleModelEMA is PPDetSimpleModelEMA


@pytest.mark.parametrize("settings", SETTINGS[:6], ids=ids)
def test_against_paddleyolo(kernel, settings):
    """ppdet's ModelEMA: PaddleYOLO's when a checkout is first on PYTHONPATH, else paddledet's
    (2.6.0, the same arithmetic; its ema_filter_no_grad fails on a frozen weight)."""
    Theirs = suite_class(["ppdet.optimizer.ema"], "ModelEMA", "paddledet or PaddleYOLO")
    model, rng = make_net(extra_dtype="float64", int_buffer=True), np.random.default_rng(55)
    try:
        theirs = Theirs(model, **settings)
    except AttributeError:
        pytest.skip("paddledet 2.6.0: ema_filter_no_grad fails on a frozen weight")
    ours = ModelEMA(model, **settings)
    for t in range(64):
        train_step(model, rng)
        ours.update()
        theirs.update()
        for key, value in theirs.state_dict.items():
            assert_bitwise(ours.state_dict[key].numpy(), value.numpy(), f"update {t}: {key}")
        if t % 5 == 4:
            check_state(ours.apply(), {k: v.numpy() for k, v in theirs.apply().items()}, f"apply {t}")
