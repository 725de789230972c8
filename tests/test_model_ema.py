"""ModelEMA against a float64 numpy model of PaddleDetection's ModelEMA formulas."""

import math

import numpy as np
import paddle
import pytest

from paddle_ema.errors import ConfigError
from paddle_ema.ppdet import ModelEMA


class Net(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(1, 2, 3)
        self.bn = paddle.nn.BatchNorm2D(2)
        self.fc = paddle.nn.Linear(8, 3)
        self.frozen = self.create_parameter([4])
        self.frozen.stop_gradient = True


class Reference:
    """PaddleDetection's ModelEMA, written out in float64 numpy."""

    def __init__(self, names, decay, kind, cycle_epoch=-1, black=()):
        self.decay, self.kind, self.cycle_epoch, self.black = decay, kind, cycle_epoch, set(black)
        self.names = names
        self.shadow = None
        self.step = self.epoch = 0

    def d(self, t):
        if self.kind == "threshold":
            return min(self.decay, (1 + t) / (10 + t))
        if self.kind == "exponential":
            return self.decay * (1 - math.exp(-(t + 1) / 2000))
        return self.decay

    def update(self, values):
        if self.shadow is None:
            self.shadow = {k: np.zeros_like(values[k], dtype=np.float64) for k in self.names}
        self.last = self.d(self.step)
        for k in self.names:
            if k not in self.black:
                self.shadow[k] = self.last * self.shadow[k] + (1 - self.last) * values[k].astype(np.float64)
        self.step += 1

    def apply(self, values):
        if self.step == 0:
            return {k: (values[k] if k in self.black else np.zeros_like(values[k])) for k in self.names}
        out = {}
        for k in self.names:
            if k in self.black:
                out[k] = values[k]
            elif self.kind == "exponential":
                out[k] = self.shadow[k]
            else:
                out[k] = self.shadow[k] / (1 - self.last**self.step)
        self.epoch += 1
        if self.cycle_epoch > 0 and self.epoch == self.cycle_epoch:
            self.step = self.epoch = 0
            self.shadow = {k: np.zeros_like(v) for k, v in self.shadow.items()}
        return out


def perturb(model, rng):
    """Stand-in for an optimizer step: new values for every state entry, BN statistics included."""
    with paddle.no_grad():
        for tensor in model.state_dict().values():
            tensor.set_value(tensor.numpy() + rng.normal(0, 0.5, tensor.shape).astype("float32"))
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def assert_matches(applied, expected, model):
    assert set(applied) == set(expected)
    for name, value in applied.items():
        np.testing.assert_allclose(value.numpy(), expected[name], rtol=2e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("kind", ["threshold", "exponential", "normal"])
@pytest.mark.parametrize("decay", [0.9, 0.9998])
def test_update_and_apply_match_paddledetection(kind, decay):
    paddle.seed(0)
    model, rng = Net(), np.random.default_rng(1)
    ema = ModelEMA(model, decay=decay, ema_decay_type=kind)
    ref = Reference(list(model.state_dict()), decay, kind)
    values = {k: v.numpy() for k, v in model.state_dict().items()}
    assert_matches(ema.apply(), ref.apply(values), model)  # t = 0: zeros, no epoch counted
    assert ema.epoch == 0
    for _ in range(3):
        for _ in range(4):
            values = perturb(model, rng)
            ema.update()
            ref.update(values)
        assert_matches(ema.apply(), ref.apply(values), model)
    assert ema.step == 12 and ema.epoch == 3
    # every state entry is averaged, BN statistics and the frozen parameter included
    assert set(ema.state_dict) == set(model.state_dict())
    assert all(str(v.dtype).endswith("float32") for v in ema.state_dict.values())


def test_update_with_explicit_model_uses_its_state():
    paddle.seed(0)
    model, other = Net(), Net()
    ema = ModelEMA(model, decay=0.9, ema_decay_type="normal")
    ema.update(other)
    expected = {k: v.numpy() for k, v in other.state_dict().items()}  # (0.1 * x) / (1 - 0.9)
    assert_matches(ema.apply(), expected, model)


def test_black_list_and_filter_no_grad():
    paddle.seed(0)
    model, rng = Net(), np.random.default_rng(2)
    # freeze_black_list=False: this test keeps fc trainable (the default freezes it, as
    # PaddleDetection does; tests/test_ppdet_bitwise.py tests that).
    ema = ModelEMA(model, decay=0.9, ema_decay_type="threshold", ema_black_list=["fc."], ema_filter_no_grad=True,
                   freeze_black_list=False)
    assert ema.ema_black_list == {"fc.weight", "fc.bias", "frozen"}  # BN _mean/_variance stay averaged
    ref = Reference(list(model.state_dict()), 0.9, "threshold", black=ema.ema_black_list)
    for _ in range(5):
        values = perturb(model, rng)
        ema.update()
        ref.update(values)
    applied = ema.apply()
    assert_matches(applied, ref.apply(values), model)
    assert applied["fc.weight"] is model.fc.weight  # the live tensor
    assert not model.fc.weight.stop_gradient  # and, with freeze_black_list=False, not frozen by apply()


def test_cycle_epoch_resets_after_that_many_applies():
    paddle.seed(0)
    model, rng = Net(), np.random.default_rng(3)
    ema = ModelEMA(model, decay=0.95, ema_decay_type="threshold", cycle_epoch=2)
    ref = Reference(list(model.state_dict()), 0.95, "threshold", cycle_epoch=2)
    for _ in range(3):
        for _ in range(3):
            values = perturb(model, rng)
            ema.update()
            ref.update(values)
        assert_matches(ema.apply(), ref.apply(values), model)
        assert (ema.step, ema.epoch) == (ref.step, ref.epoch)
    assert ema.step == 3 and ema.epoch == 1  # reset after the second apply, then 3 updates and 1 apply


def test_apply_casts_to_weight_dtype_except_exponential():
    paddle.seed(0)
    model = paddle.nn.Linear(3, 2)
    model.to(dtype="float16")
    for kind, dtype in [("threshold", paddle.float16), ("exponential", paddle.float32)]:
        ema = ModelEMA(model, decay=0.9, ema_decay_type=kind)
        ema.update()
        applied = ema.apply()
        assert applied["weight"].dtype == dtype
        expected = model.weight.numpy().astype(np.float64)
        if kind == "exponential":
            expected = expected * (1 - 0.9 * (1 - math.exp(-1 / 2000)))  # (1 - d0) x, uncorrected
        np.testing.assert_allclose(applied["weight"].numpy().astype(np.float64), expected, rtol=2e-3, atol=1e-6)


def test_resume_of_applied_weights_corrects_twice_like_paddledetection():
    paddle.seed(0)
    model, rng = Net(), np.random.default_rng(4)
    ema = ModelEMA(model, decay=0.9, ema_decay_type="normal")
    for _ in range(3):
        values = perturb(model, rng)
        ema.update()
    applied = ema.apply()
    resumed = ModelEMA(model, decay=0.9, ema_decay_type="normal")
    resumed.resume(applied, step=3)
    again = resumed.apply()  # no update in between: applied / (1 - 0.9**3) once more
    for name in values:
        np.testing.assert_allclose(again[name].numpy(), applied[name].numpy() / (1 - 0.9**3), rtol=2e-5)


def test_ema_state_resumes_exactly():
    paddle.seed(0)
    model, rng = Net(), np.random.default_rng(5)
    ema = ModelEMA(model, decay=0.9, ema_decay_type="threshold", cycle_epoch=5)
    for _ in range(4):
        perturb(model, rng)
        ema.update()
    ema.apply()
    state = {k: (v.clone() if isinstance(v, paddle.Tensor) else v) for k, v in ema.ema_state().items()}
    state["shadow"] = {k: v.clone() for k, v in state["shadow"].items()}
    copy = ModelEMA(model, decay=0.9, ema_decay_type="threshold", cycle_epoch=5)
    copy.load_ema_state(state)
    for _ in range(3):
        perturb(model, rng)
        ema.update()
        copy.update()
    mine, theirs = ema.apply(), copy.apply()
    for name in mine:
        assert np.array_equal(mine[name].numpy(), theirs[name].numpy()), name
    assert (copy.step, copy.epoch) == (ema.step, ema.epoch)


def test_unknown_decay_type_is_rejected():
    with pytest.raises(ConfigError, match="'expo' is not allowed; allowed: .*exponential"):
        ModelEMA(Net(), ema_decay_type="expo")


@pytest.mark.parametrize("cycle_epoch", [2.0, "3", None])
def test_cycle_epoch_must_be_an_integer(cycle_epoch):
    with pytest.raises(ConfigError, match="cycle_epoch must be an integer"):
        ModelEMA(paddle.nn.Linear(2, 2), cycle_epoch=cycle_epoch)


def test_last_key_per_tensor_keeps_one_key_per_memory():
    from paddle_ema import _compat
    from paddle_ema.ppdet import last_key_per_tensor

    a, b, c = paddle.ones([2, 3]), paddle.zeros([2, 3]), paddle.ones([2, 3])
    state = {"a": a, "a_again": a, "b": b, "c": c}  # c equals a in value only
    assert last_key_per_tensor(state, list(state)) == ["a_again", "b", "c"]
    if _compat.can_share_buffers(b):
        _compat.share_buffer(a, b)  # b becomes another tensor on a's elements
        assert last_key_per_tensor(state, list(state)) == ["b", "c"]
    assert last_key_per_tensor(state, ["a", "c"]) == ["a", "c"]


def test_ema_state_file_round_trip_is_exact_and_deterministic(tmp_path):
    from paddle_ema.ppdet import load_ema_state_file, save_ema_state_file

    paddle.seed(0)
    model, rng = Net(), np.random.default_rng(6)
    settings = dict(decay=0.9, ema_decay_type="threshold", cycle_epoch=5, ema_black_list=["fc.bias"])
    ema = ModelEMA(model, **settings)
    for _ in range(4):
        perturb(model, rng)
        ema.update()
    applied = {k: v.clone() for k, v in ema.apply().items()}  # the snapshot; freezes fc.bias
    path = save_ema_state_file(ema, tmp_path / "3.pdparams")  # the suffix is dropped
    assert path == str(tmp_path / "3.pdemastate")
    save_ema_state_file(ema, tmp_path / "again")
    assert (tmp_path / "3.pdemastate").read_bytes() == (tmp_path / "again.pdemastate").read_bytes()

    paddle.seed(0)
    other = Net()  # a fresh model, as a resumed process builds it: fc.bias trainable
    other.set_state_dict(model.state_dict())
    assert not other.fc.bias.stop_gradient
    copy = ModelEMA(other, **settings)
    copy.resume(applied, step=ema.step)  # what PaddleDetection's trainer does first
    load_ema_state_file(copy, tmp_path / "3")
    assert other.fc.bias.stop_gradient  # frozen again, as in the run that did not stop
    assert copy.state_dict["fc.bias"] is other.fc.bias  # the live tensor, not resume()'s copy
    for _ in range(3):
        values = perturb(model, rng)
        other.set_state_dict({k: paddle.to_tensor(v) for k, v in values.items()})
        ema.update()
        copy.update()
    mine, theirs = ema.apply(), copy.apply()
    for name in mine:
        assert mine[name].numpy().tobytes() == theirs[name].numpy().tobytes(), name
    assert (copy.step, copy.epoch) == (ema.step, ema.epoch)


def test_ema_state_file_faults_are_one_line_errors_and_run_no_code(tmp_path):
    import pickle
    import zipfile

    from paddle_ema.errors import CheckpointError, IncompatibleStateError
    from paddle_ema.ppdet import load_ema_state_file, save_ema_state_file

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    model = Net()
    ema = ModelEMA(model, decay=0.9)
    ema.update()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_ema_state_file(ema, tmp_path / "none")
    # a plain pickle under the name, and an .npz whose meta is a pickled object array
    (tmp_path / "pickled.pdemastate").write_bytes(pickle.dumps({"meta": Payload()}))
    with zipfile.ZipFile(tmp_path / "object.pdemastate", "w") as archive:
        with archive.open("meta.npy", "w") as member:
            np.lib.format.write_array(member, np.array([Payload()], dtype=object), allow_pickle=True)
    save_ema_state_file(ema, tmp_path / "good")
    (tmp_path / "cut.pdemastate").write_bytes((tmp_path / "good.pdemastate").read_bytes()[:300])
    for stem in ("pickled", "object", "cut"):
        with pytest.raises(CheckpointError, match=f"{stem}.pdemastate cannot be read") as info:
            load_ema_state_file(ema, tmp_path / stem)
        assert "\n" not in str(info.value)
    assert not marker.exists()
    other = ModelEMA(model, decay=0.5)  # other settings
    with pytest.raises(IncompatibleStateError, match="settings differ"):
        load_ema_state_file(other, tmp_path / "good")
