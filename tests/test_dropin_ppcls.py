"""paddle_ema.dropin.ppcls.ExponentialMovingAverage against PaddleClas's arithmetic and its engine's use.

1. Bitwise against the numpy oracle of PaddleClas's class (tests/suite_oracles.py, itself checked
   against Paddle's ops) over 64 updates of a model with conv, BatchNorm, linear, a frozen weight,
   a float64 parameter and an int64 buffer, plain and with a tied head, every constructor setting,
   both kernels, set() and a resume (the engine's: `ema.module.set_state_dict(<.pdparams>)`) in the
   middle.
2. PaddleClas's engine: training with the optimizer, evaluation by swapping the model for
   `ema.module`, the `.pdparams` (EMA) / `.pdema` (raw) checkpoint and its resume, bitwise equal
   to a run that never stopped.
3. The state-dict-hook quirk (EMA frozen under amp.decorate(save_dtype=)) and its off-switch; the
   non-finite option; float16/bfloat16 models (Paddle has their add on GPUs only).
4. Against PaddleClas's own class when paddleclas is installed (skipped otherwise).
"""

import numpy as np
import paddle
import pytest

import suite_oracles as so
from paddle_ema import kernels
from paddle_ema.dropin.ppcls import ExponentialMovingAverage
from paddle_ema.errors import ConfigError, NonFiniteError
from test_ppdet_bitwise import assert_bitwise, kernel  # noqa: F401 - kernel is a fixture
from test_suite_oracles import check_state, make_net, numpy_state, suite_class, tied_aliases, train_step

SETTINGS = [
    dict(),
    dict(decay=0.99),
    dict(decay=0.5, nonfinite="skip"),
    dict(decay=0.9, nonfinite="raise", use_hook=False),
]


def ids(settings):
    return "-".join(f"{k}={v}" for k, v in settings.items()) or "defaults"


def real_class():
    return suite_class(["paddleclas.ppcls.utils.ema", "ppcls.utils.ema"], "ExponentialMovingAverage", "paddleclas")


# --- 1. the oracle ----------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True], ids=["plain", "tied"])
@pytest.mark.parametrize("settings", SETTINGS, ids=ids)
def test_bitwise_against_the_oracle(kernel, settings, tied):
    model, rng = make_net(tied=tied, extra_dtype="float64", int_buffer=True), np.random.default_rng(31)
    ema = ExponentialMovingAverage(model, **settings)
    decay = settings.get("decay", 0.9999)
    assert ema.decay == decay and not ema.module.training and model.training and ema.module is not model
    ref = so.PaddleClasOracle(numpy_state(model), tied_aliases(model), decay)
    for t in range(64):
        values = train_step(model, rng)
        if t == 40:
            ema.set(model)
            ref.set(values)
        else:
            ema.update(model)
            ref.update(values)
        check_state(ema.module.state_dict(), ref.state(), f"update {t}")
        # PaddleClas's dtype quirk: float32 after an update, int64 again after set()
        assert ema.module.state_dict()["count"].dtype == (paddle.int64 if t == 40 else paddle.float32)
    assert ema.num_nonfinite_skipped == 0


class Tied(paddle.nn.Layer):
    """One large weight under two keys, `fc.weight` and `head.weight` (a tied head)."""

    def __init__(self, size):
        super().__init__()
        self.fc = paddle.nn.Linear(size, size)
        self.head = paddle.nn.Linear(size, size)
        self.head.weight = self.fc.weight


@pytest.mark.parametrize("size", [8, 1024])
def test_a_tied_tensor_moves_once_per_key(kernel, size):
    """The closed form: a tensor under two keys, decay d, the same value x under both keys:
    e <- d*(d*e + w*x) + w*x, each product and sum rounded in float32 (large enough that the
    fused kernel's threads would split the two occurrences between them)."""
    paddle.seed(0)
    model = Tied(size)
    ema = ExponentialMovingAverage(model, 0.5)
    before = ema.module.fc.weight.numpy()
    with paddle.no_grad():
        model.fc.weight.set_value(np.full(model.fc.weight.shape, 3.0, np.float32))
    ema.update(model)
    once = before * np.float32(0.5) + np.float32(1.5)
    assert_bitwise(ema.module.fc.weight.numpy(), once * np.float32(0.5) + np.float32(1.5), "twice a step")
    assert ema.module.head.weight is ema.module.fc.weight  # the deep copy keeps the tie


@pytest.mark.parametrize("tied", [False, True], ids=["plain", "tied"])
def test_resume_from_the_module_state(kernel, tied, tmp_path):
    """PaddleClas's engine resumes by `ema.module.set_state_dict(paddle.load(<prefix>.pdparams))`
    into a fresh EMA: the constant decay makes that exact (no integer buffer here: after an update
    it is float32 in the file and int64 in a fresh module, which set_state_dict refuses)."""
    model, rng = make_net(tied=tied), np.random.default_rng(32)
    ema = ExponentialMovingAverage(model, 0.9)
    ref = so.PaddleClasOracle(numpy_state(model), tied_aliases(model), 0.9)
    for t in range(64):
        values = train_step(model, rng)
        ema.update(model)
        ref.update(values)
        if t == 30:
            paddle.save(ema.module.state_dict(), str(tmp_path / "ppcls.pdparams"))
            paddle.save(model.state_dict(), str(tmp_path / "ppcls.pdema"))
            model = make_net(tied=tied)
            ema = ExponentialMovingAverage(model, 0.9)
            ema.module.set_state_dict(paddle.load(str(tmp_path / "ppcls.pdparams")))
            model.set_state_dict(paddle.load(str(tmp_path / "ppcls.pdema")))
    check_state(ema.module.state_dict(), ref.state(), "after the resume")


# --- 2. PaddleClas's engine ---------------------------------------------------------------------
class Classifier(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 4, 3, padding=1)
        self.bn = paddle.nn.BatchNorm2D(4)
        self.fc = paddle.nn.Linear(4 * 8 * 8, 5)
        self.frozen = self.create_parameter([5], default_initializer=paddle.nn.initializer.Constant(0.25))
        self.frozen.stop_gradient = True

    def forward(self, x):
        return self.fc(paddle.nn.functional.relu(self.bn(self.conv(x))).flatten(1)) + self.frozen


def batches(n):
    rng = np.random.default_rng(33)
    return [(paddle.to_tensor(rng.normal(size=(4, 3, 8, 8)).astype("float32")),
             paddle.to_tensor(rng.integers(0, 5, (4,)).astype("int64"))) for _ in range(n)]


def build(decay):
    paddle.seed(5)
    model = Classifier()
    # plain SGD: a stateless optimizer, so that a resume in the same process (new parameter names)
    # needs no optimizer state
    optimizer = paddle.optimizer.SGD(0.05, parameters=model.parameters())
    return model, optimizer, ExponentialMovingAverage(model, decay)


def engine_run(data, epochs, per_epoch, prefix, resume_from=None, ref=None):
    """PaddleClas's engine, reduced to what touches the EMA: update after each optimizer step,
    evaluation of `ema.module` swapped in for the model, `.pdparams` = EMA and `.pdema` = raw,
    resume with `ema.module.set_state_dict` (save_load.init_model)."""
    model, optimizer, model_ema = build(0.9)
    start = 0
    if resume_from is not None:
        model_ema.module.set_state_dict(paddle.load(resume_from + ".pdparams"))
        model.set_state_dict(paddle.load(resume_from + ".pdema"))
        start = int(resume_from.rsplit("_", 1)[1])
    ema_module = model_ema.module
    for epoch in range(start, epochs):
        model.train()
        for x, y in data[epoch * per_epoch:(epoch + 1) * per_epoch]:
            loss = paddle.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()
            model_ema.update(model)
            if ref is not None:
                ref.update(numpy_state(model))
        ori_model, model = model, ema_module  # the engine's evaluation of the EMA
        model.eval()
        with paddle.no_grad():
            logits = model(data[0][0])
        model = ori_model
        if ref is not None:  # a second path: a fresh model holding the oracle's numbers
            check_state(ema_module.state_dict(), ref.state(), f"epoch {epoch}")
            twin = Classifier()
            twin.set_state_dict({k: paddle.to_tensor(v) for k, v in ref.state().items()})
            twin.eval()
            with paddle.no_grad():
                assert_bitwise(logits.numpy(), twin(data[0][0]).numpy(), "the EMA's evaluation")
        paddle.save(model.state_dict(), f"{prefix}_{epoch + 1}.pdema")
        paddle.save(ema_module.state_dict(), f"{prefix}_{epoch + 1}.pdparams")
    return model, ema_module


def test_engine_swap_save_and_resume(kernel, tmp_path):
    data, per_epoch = batches(12), 3
    paddle.seed(5)
    ref = so.PaddleClasOracle(numpy_state(Classifier()), decay=0.9)
    whole = str(tmp_path / "whole")
    model, module = engine_run(data, 4, per_epoch, whole, ref=ref)
    assert not module.training and model.training
    resumed = str(tmp_path / "resumed")
    engine_run(data, 2, per_epoch, resumed)
    model2, module2 = engine_run(data, 4, per_epoch, resumed, resume_from=f"{resumed}_2")
    check_state(module2.state_dict(), numpy_state(module), "resumed EMA")
    check_state(model2.state_dict(), numpy_state(model), "resumed raw weights")
    for suffix in (".pdparams", ".pdema"):
        expected = {k: v.numpy() for k, v in paddle.load(f"{whole}_4{suffix}").items()}
        check_state(paddle.load(f"{resumed}_4{suffix}"), expected, f"the files {suffix}")


# --- 3. quirks and options --------------------------------------------------------------------
def cast_copies(state_dict):
    """What paddle.amp.decorate(level='O2', save_dtype='float32') registers on each sublayer on a
    GPU (paddle.amp.auto_cast.StateDictHook): state_dict() returns cast copies."""
    for key, value in state_dict.items():
        if paddle.is_floating_point(value):
            state_dict[key] = paddle.cast(value, "float32")


def hooked_net():
    model = make_net()
    for layer in model.sublayers(include_self=True):
        layer.register_state_dict_hook(cast_copies)
    return model


@pytest.mark.parametrize("use_hook", [True, False])
def test_state_dict_hooks_freeze_the_ema_unless_use_hook_is_off(kernel, use_hook):
    model, rng = hooked_net(), np.random.default_rng(34)
    ema = ExponentialMovingAverage(model, 0.5, use_hook=use_hook)
    before = {k: v.numpy() for k, v in ema.module.state_dict(use_hook=False).items()}
    ref = so.PaddleClasOracle(before, decay=0.5)
    for t in range(3):
        values = train_step(model, rng)
        ema.update(model)
        ref.update(values)
    live = ema.module.state_dict(use_hook=False)
    check_state(live, before if use_hook else ref.state(), f"use_hook={use_hook}")


def put_nan(model):
    with paddle.no_grad():
        weight = model.fc.weight.numpy()
        weight[1, 2] = np.nan
        model.fc.weight.set_value(weight)


def test_nonfinite_skip_raise_and_update():
    for policy in ("skip", "raise", "update"):
        model, rng = make_net(), np.random.default_rng(35)
        ema = ExponentialMovingAverage(model, 0.5, nonfinite=policy)
        train_step(model, rng)
        ema.update(model)
        before = numpy_state(ema.module)
        values = train_step(model, rng)
        put_nan(model)
        values["fc.weight"] = model.fc.weight.numpy()
        if policy == "raise":
            with pytest.raises(NonFiniteError, match="'fc.weight' holds NaN or Inf"):
                ema.update(model)
        elif policy == "skip":
            with pytest.warns(RuntimeWarning, match="skipped: 'fc.weight' holds NaN"):
                ema.update(model)
            assert ema.num_nonfinite_skipped == 1
        else:
            ema.update(model)  # PaddleClas's behaviour: the NaN enters the average
            ref = so.PaddleClasOracle(before, decay=0.5)
            ref.update(values)
            check_state(ema.module.state_dict(), ref.state(), "update with a NaN")
            assert np.isnan(ema.module.fc.weight.numpy()[1, 2])
            continue
        check_state(ema.module.state_dict(), before, f"{policy}: unchanged")
    with pytest.raises(ConfigError, match="nonfinite must be one of"):
        ExponentialMovingAverage(make_net(), nonfinite="ignore")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_models_need_a_gpu(dtype):
    """PaddleClas computes in the model's dtype; Paddle's CPU has no float16 (or bfloat16) add, so
    the update raises as PaddleClas's does, before any entry has changed. Its numbers on a GPU are
    the oracle's float32-then-round step (unverified here: no GPU)."""
    model = make_net()
    model.to(dtype=dtype)
    ema = ExponentialMovingAverage(model, 0.5)
    before = numpy_state(ema.module)
    with pytest.raises(RuntimeError, match="add"):
        ema.update(model)
    check_state(ema.module.state_dict(), before, "nothing changed")


# --- 4. PaddleClas's own class ------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True], ids=["plain", "tied"])
def test_against_paddleclas(kernel, tied):
    EMA = real_class()
    model, rng = make_net(tied=tied, extra_dtype="float64", int_buffer=True), np.random.default_rng(36)
    ours, theirs = ExponentialMovingAverage(model, 0.9), EMA(model, 0.9)
    for t in range(64):
        train_step(model, rng)
        if t == 40:
            ours.set(model)
            theirs.set(model)
        else:
            ours.update(model)
            theirs.update(model)
        check_state(ours.module.state_dict(), numpy_state(theirs.module), f"update {t}")


def test_against_paddleclas_under_state_dict_hooks():
    EMA = real_class()
    model, rng = hooked_net(), np.random.default_rng(37)
    ours, theirs = ExponentialMovingAverage(model, 0.5), EMA(model, 0.5)
    train_step(model, rng)
    ours.update(model)
    theirs.update(model)
    check_state(ours.module.state_dict(use_hook=False),
                {k: v.numpy() for k, v in theirs.module.state_dict(use_hook=False).items()}, "both frozen")
