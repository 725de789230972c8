"""paddle_ema.dropin.paddleseg against PaddleSeg's EMA arithmetic and core/train.py's use of it.

1. Bitwise against the numpy oracle of PaddleSeg's functions (tests/suite_oracles.py, itself
   checked against Paddle's ops) over 64 updates of a model with conv, BatchNorm, linear, a frozen
   weight, a float64 parameter and an int64 buffer, plain and with a tied head, each decay and
   non-finite setting, both kernels, and a resume in the middle three ways: PaddleSeg's (the EMA
   restarts from the model), `init_ema_params(..., resume_from=)` and `save_ema_state`/
   `load_ema_state` (the EMA continues).
2. core/train.py's loop: deepcopy, init at the first iteration, update with step=iter, the
   `iter_N/ema_model.pdparams` files, and its resume with and without the one-line change.
3. Hooks, half precision, non-finite weights, bad and hostile state files.
4. Against PaddleSeg's own functions when paddleseg is installed (skipped otherwise).
"""

import copy
import os
import pickle

import numpy as np
import paddle
import pytest

import suite_oracles as so
from paddle_ema.dropin.paddleseg import (EMA_MODEL_FILE, init_ema_params, judge_params_equal, load_ema_state,
                                         paddleseg_decay, save_ema_state, update_ema_model)
from paddle_ema.errors import CheckpointError, ConfigError, IncompatibleStateError, NonFiniteError
from test_ppdet_bitwise import assert_bitwise, kernel  # noqa: F401 - kernel is a fixture
from test_suite_oracles import check_state, make_net, numpy_state, suite_class, tied_aliases, train_step


def ema_copy(model):
    """core/train.py's EMA model: a deep copy in eval mode with every parameter frozen."""
    ema_model = copy.deepcopy(model)
    ema_model.eval()
    for param in ema_model.parameters():
        param.stop_gradient = True
    return ema_model


def real(name):
    return suite_class(["paddleseg.utils.ema"], name, "paddleseg")


def test_decay_closed_form():
    assert paddleseg_decay(0) == 0.0 and paddleseg_decay(1) == 0.5 and paddleseg_decay(3) == 0.75
    assert paddleseg_decay(10**6) == 0.999 and paddleseg_decay(9, decay=0.5) == 0.5
    for step in range(0, 3000, 7):
        assert paddleseg_decay(step) == so.paddleseg_decay(step)


# --- 1. the oracle ----------------------------------------------------------------------------
@pytest.mark.parametrize("resume", ["paddleseg", "resume_from", "state_file"])
@pytest.mark.parametrize("tied", [False, True], ids=["plain", "tied"])
@pytest.mark.parametrize("settings", [dict(), dict(decay=0.9, nonfinite="skip"), dict(nonfinite="raise")],
                         ids=["defaults", "decay=0.9-skip", "raise"])
def test_bitwise_against_the_oracle(kernel, settings, tied, resume, tmp_path):
    model, rng = make_net(tied=tied, extra_dtype="float64", int_buffer=True), np.random.default_rng(41)
    ema_model = ema_copy(model)
    ref = so.PaddleSegOracle(numpy_state(ema_model), tied_aliases(ema_model))
    values = train_step(model, rng)
    init_ema_params(ema_model, model)
    ref.init(values)
    check_state(ema_model.state_dict(), ref.state(), "init")
    decay = settings.get("decay", 0.999)
    for it in range(1, 65):
        values = train_step(model, rng)
        assert update_ema_model(ema_model, model, step=it, **settings) is True
        ref.update(values, step=it, decay=decay)
        check_state(ema_model.state_dict(), ref.state(), f"iter {it}")
        if it == 32:
            folder = tmp_path / f"iter_{it}"
            os.makedirs(folder)
            paddle.save(ema_model.state_dict(), str(folder / EMA_MODEL_FILE))  # what core/train.py saves
            save_ema_state(ema_model, tmp_path / "ema.pdstate", it)
            ema_model = ema_copy(make_net(tied=tied, extra_dtype="float64", int_buffer=True))
            if resume == "paddleseg":  # the EMA restarts from the model's weights
                init_ema_params(ema_model, model)
                ref.init(values)
            elif resume == "resume_from":
                init_ema_params(ema_model, model, resume_from=folder)
            else:
                assert load_ema_state(ema_model, tmp_path / "ema.pdstate") == it
            check_state(ema_model.state_dict(), ref.state(), f"resumed ({resume})")


def test_a_tied_tensor_moves_once_a_step(kernel):
    """Closed form: fc.weight and head.weight are one tensor; its new value is its last key's:
    float32(d) * e + float32(1 - d) * x, each rounded, x the model's value (also tied)."""
    model = make_net(tied=True)
    ema_model = ema_copy(model)
    before = ema_model.fc.weight.numpy()
    with paddle.no_grad():
        model.fc.weight.set_value(np.full(model.fc.weight.shape, 3.0, np.float32))
    update_ema_model(ema_model, model, step=3)  # d = 0.75
    expected = (before * np.float32(0.75) + np.float32(0.0)) + np.float32(0.75)
    assert_bitwise(ema_model.fc.weight.numpy(), expected, "once")
    assert ema_model.head.weight is ema_model.fc.weight


# --- 2. core/train.py -------------------------------------------------------------------------
class Segmenter(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 4, 3, padding=1)
        self.bn = paddle.nn.BatchNorm2D(4)
        self.head = paddle.nn.Conv2D(4, 2, 1)

    def forward(self, x):
        return self.head(paddle.nn.functional.relu(self.bn(self.conv(x))))


def data(n):
    rng = np.random.default_rng(42)
    return [(paddle.to_tensor(rng.normal(size=(2, 3, 8, 8)).astype("float32")),
             paddle.to_tensor(rng.integers(0, 2, (2, 8, 8)).astype("int64"))) for _ in range(n)]


def train(batches, iters, save_dir, save_interval, resume_model=None, resume_ema=False):
    """core/train.py reduced to what touches the EMA (use_ema=True; plain SGD, a stateless
    optimizer, so that a resume in this process needs no optimizer state)."""
    paddle.seed(6)
    model = Segmenter()
    optimizer = paddle.optimizer.SGD(0.1, parameters=model.parameters())
    ema_model = ema_copy(model)
    start_iter = 0
    if resume_model is not None:  # utils.resume: the raw weights only
        model.set_state_dict(paddle.load(os.path.join(resume_model, "model.pdparams")))
        start_iter = int(resume_model.split("_")[-1])
    it = start_iter
    while it < iters:
        if it == start_iter:
            # PaddleSeg's line, and the one-line change that keeps the EMA
            init_ema_params(ema_model, model, resume_from=resume_model if resume_ema else None)
        for x, y in batches[it:]:
            it += 1
            loss = paddle.nn.functional.cross_entropy(model(x), y, axis=1)
            loss.backward()
            optimizer.step()
            model.clear_gradients()
            update_ema_model(ema_model, model, step=it)
            if it % save_interval == 0 or it == iters:
                folder = os.path.join(save_dir, f"iter_{it}")
                os.makedirs(folder, exist_ok=True)
                paddle.save(model.state_dict(), os.path.join(folder, "model.pdparams"))
                paddle.save(ema_model.state_dict(), os.path.join(folder, EMA_MODEL_FILE))
            if it >= iters:
                break
    return model, ema_model


def test_train_loop_and_its_resume(kernel, tmp_path):
    batches = data(12)
    model, ema_model = train(batches, 12, str(tmp_path / "whole"), 4)
    # the raw weights after each step, from a second run of the same training
    paddle.seed(6)
    replay = Segmenter()
    optimizer = paddle.optimizer.SGD(0.1, parameters=replay.parameters())
    raw = [numpy_state(replay)]
    for x, y in batches:
        paddle.nn.functional.cross_entropy(replay(x), y, axis=1).backward()
        optimizer.step()
        replay.clear_gradients()
        raw.append(numpy_state(replay))

    def oracle(start):
        ref = so.PaddleSegOracle(raw[start])
        for it in range(start + 1, 13):
            ref.update(raw[it], step=it)
        return ref.state()

    check_state(ema_model.state_dict(), oracle(0), "the whole run's EMA")
    whole_8 = str(tmp_path / "whole" / "iter_8")
    kept_model, kept_ema = train(batches, 12, str(tmp_path / "kept"), 4, whole_8, resume_ema=True)
    check_state(kept_model.state_dict(), numpy_state(model), "resumed raw weights")
    check_state(kept_ema.state_dict(), numpy_state(ema_model), "EMA resumed with resume_from")
    # PaddleSeg's resume: the EMA restarts from the raw weights of iteration 8
    lost_model, lost_ema = train(batches, 12, str(tmp_path / "lost"), 4, whole_8)
    check_state(lost_model.state_dict(), numpy_state(model), "resumed raw weights")
    check_state(lost_ema.state_dict(), oracle(8), "EMA restarted by PaddleSeg's resume")
    assert not np.array_equal(lost_ema.conv.weight.numpy(), ema_model.conv.weight.numpy())


# --- 3. hooks, half precision, non-finite weights, bad files -------------------------------------
def cast_copies(state_dict):
    for key, value in state_dict.items():
        if paddle.is_floating_point(value):
            state_dict[key] = paddle.cast(value, "float32")


def test_an_ema_model_with_state_dict_hooks_still_moves(kernel):
    """PaddleSeg reads the hooked copies and writes with set_state_dict, which writes the model's
    own tensors: the EMA moves (unlike PaddleClas's); the copies go through PaddleSeg's ops."""
    model, rng = make_net(), np.random.default_rng(43)
    ema_model = ema_copy(model)
    for layer in ema_model.sublayers(include_self=True):
        layer.register_state_dict_hook(cast_copies)
    ref = so.PaddleSegOracle(numpy_state(ema_model))
    for it in range(1, 8):
        values = train_step(model, rng)
        update_ema_model(ema_model, model, step=it)
        ref.update(values, step=it)
        check_state(ema_model.state_dict(use_hook=False), ref.state(), f"iter {it}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_models_need_a_gpu(dtype):
    """PaddleSeg computes in the model's dtype; Paddle's CPU has no float16 (or bfloat16) add, so
    the update raises as PaddleSeg's does, before any entry has changed (GPU numbers unverified)."""
    model = make_net()
    model.to(dtype=dtype)
    ema_model = ema_copy(model)
    before = numpy_state(ema_model)
    with pytest.raises(RuntimeError, match="add"):
        update_ema_model(ema_model, model, step=5)
    check_state(ema_model.state_dict(), before, "nothing changed")


def test_nonfinite_options():
    model, rng = make_net(), np.random.default_rng(44)
    ema_model = ema_copy(model)
    update_ema_model(ema_model, model, step=1)
    train_step(model, rng)
    with paddle.no_grad():
        weight = model.fc.weight.numpy()
        weight[0, 0] = np.inf
        model.fc.weight.set_value(weight)
    before = numpy_state(ema_model)
    with pytest.raises(NonFiniteError, match="'fc.weight' holds NaN or Inf"):
        update_ema_model(ema_model, model, step=2, nonfinite="raise")
    with pytest.warns(RuntimeWarning, match="skipped: 'fc.weight'"):
        assert update_ema_model(ema_model, model, step=2, nonfinite="skip") is False
    check_state(ema_model.state_dict(), before, "unchanged")
    assert update_ema_model(ema_model, model, step=2) is True  # PaddleSeg's: the Inf enters the average
    assert np.isinf(ema_model.fc.weight.numpy()[0, 0])
    with pytest.raises(ConfigError, match="nonfinite must be one of"):
        update_ema_model(ema_model, model, step=3, nonfinite="ignore")


class Marker:
    """A pickle that would write a file when loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bad_and_hostile_state_files(tmp_path):
    model = make_net(int_buffer=True)
    ema_model = ema_copy(model)
    save_ema_state(ema_model, tmp_path / "good", 7)
    good = paddle.load(str(tmp_path / "good"))
    before = numpy_state(ema_model)

    def broken(**change):
        state = dict(good, **{k: v for k, v in change.items() if k != "entries"})
        state["state"] = dict(good["state"], **change.get("entries", {}))
        path = tmp_path / f"bad{len(os.listdir(tmp_path))}"
        paddle.save(state, str(path))
        return path

    cases = [
        (broken(format="other"), "is not a state written by save_ema_state"),
        (broken(step=-1), "its step is -1"),
        (broken(step=2.5), "its step is 2.5"),
        (broken(entries={"fc.weight": paddle.zeros([3, 3])}), "'fc.weight' has shape"),
        (broken(entries={"fc.weight": paddle.zeros([8, 3], "float64")}), "'fc.weight' is float64, float32"),
        (broken(entries={"count": paddle.zeros([3], "float32")}), "'count' is float32, int64"),
        (broken(entries={"fc.bias": paddle.to_tensor([1.0, np.nan, 0.0])}), "'fc.bias' holds NaN"),
        (broken(entries={"bn._mean": "zeros"}), "'bn._mean' is a str, not a tensor"),
    ]
    missing = dict(good["state"])
    del missing["conv.weight"]
    paddle.save(dict(good, state=missing), str(tmp_path / "missing"))
    cases.append((tmp_path / "missing", r"lacks \['conv.weight'\]"))
    for path, message in cases:
        with pytest.raises(IncompatibleStateError, match=message):
            load_ema_state(ema_model, path)
        check_state(ema_model.state_dict(), before, f"{message}: nothing written")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_ema_state(ema_model, tmp_path / "nothing")
    with pytest.raises(IncompatibleStateError, match="step must be an integer"):
        save_ema_state(ema_model, tmp_path / "x", -2)

    # a pickle that runs code when loaded, as the trainer's ema_model.pdparams
    folder = tmp_path / "iter_4"
    os.makedirs(folder)
    marker = tmp_path / "marker"
    with open(folder / EMA_MODEL_FILE, "wb") as f:
        pickle.dump({"conv.weight": Marker(str(marker))}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused"):
        init_ema_params(ema_model, model, resume_from=folder)
    assert not marker.exists()
    check_state(ema_model.state_dict(), before, "hostile file: nothing written")


def test_resume_from_a_folder_without_the_ema_keeps_paddlesegs_init(tmp_path, caplog):
    model, rng = make_net(), np.random.default_rng(45)
    ema_model = ema_copy(model)
    values = train_step(model, rng)
    init_ema_params(ema_model, model, resume_from=tmp_path)
    check_state(ema_model.state_dict(), values, "initialised from the model")
    assert f"has no {EMA_MODEL_FILE}" in caplog.text


def test_judge_params_equal():
    model, rng = make_net(), np.random.default_rng(46)
    ema_model = ema_copy(model)
    assert judge_params_equal(ema_model, model)
    train_step(model, rng)
    assert not judge_params_equal(ema_model, model)
    init_ema_params(ema_model, model)
    assert judge_params_equal(ema_model, model)


# --- 4. PaddleSeg's own functions ---------------------------------------------------------------
@pytest.mark.parametrize("hooks", [False, True], ids=["plain", "hooked"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_against_paddleseg(kernel, tied, hooks):
    their_init, their_update, their_judge = real("init_ema_params"), real("update_ema_model"), real("judge_params_equal")
    model, rng = make_net(tied=tied, extra_dtype="float64", int_buffer=True), np.random.default_rng(47)
    ours, theirs = ema_copy(model), ema_copy(model)
    for ema_model in (ours, theirs) if hooks else ():
        for layer in ema_model.sublayers(include_self=True):
            layer.register_state_dict_hook(cast_copies)
    train_step(model, rng)
    init_ema_params(ours, model)
    their_init(theirs, model)
    for it in range(1, 65):
        train_step(model, rng)
        decay = 0.999 if it < 50 else 0.9
        update_ema_model(ours, model, step=it, decay=decay)
        their_update(theirs, model, step=it, decay=decay)
        expected = {k: v.numpy() for k, v in theirs.state_dict(use_hook=False).items()}
        check_state(ours.state_dict(use_hook=False), expected, f"iter {it}")
        assert judge_params_equal(ours, model) == their_judge(theirs, model)
