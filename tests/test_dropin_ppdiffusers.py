"""paddle_ema.dropin.ppdiffusers: ppdiffusers' EMAModel and LitEma bit for bit.

1. EMAModel against the numpy oracle (tests/suite_oracles.py) over 64 steps of a model with conv,
   BatchNorm, linear, a frozen weight and a tied head: float32 and bfloat16 models, a float16 model
   with float32 shadows (`to(dtype=)`; float16 shadows need Paddle's float16 subtract, which only
   GPUs have: pinned as an error here, unverified on a GPU), every constructor setting, both
   kernels, a resume through state_dict/load_state_dict in the middle, store/copy_to/restore.
2. save_pretrained/from_pretrained through a model class with ppdiffusers' ModelMixin calls
   (`TinyModel`, JSON + npz files), ppdiffusers' lost settings pinned and the off-switch checked;
   load_state_dict's checks; the deprecated arguments; the non-finite option.
3. LitEma against the oracle (float32, float16 and bfloat16 models, both kernels, a resume through
   the owning model's state dict), its name-collision and num_updates off-switches, its
   state_dict as a Layer, and a small latent-diffusion-style loop that calls it as ppdiffusers'
   trainers do (model_ema(unet) after each step, ema_scope's store/copy_to/restore, checkpoints).
4. Against ppdiffusers' own classes when ppdiffusers is installed (skipped with the reason
   otherwise): EMAModel and LitEma step by step, the trainer loops, and save_pretrained /
   from_pretrained with a tiny UNet2DModel, file bytes compared.
"""

import copy
import json
import os
import warnings

import numpy as np
import paddle
import pytest

import suite_oracles as so
from paddle_ema.dropin.ppdiffusers import EMAModel, LitEma
from paddle_ema.errors import ConfigError, EMAStateError, IncompatibleStateError, NonFiniteError
import test_ppdet_bitwise
from test_ppdet_bitwise import assert_bitwise
from test_suite_oracles import EMAMODEL_SETTINGS, SuiteNet, check_state, suite_class, train_step

kernel = test_ppdet_bitwise.kernel  # the fused/reference fixture

pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


def make_model(dtype="float32", **options):
    """SuiteNet (conv, BatchNorm, linear, frozen weight; tied head by default) in `dtype`; its
    BatchNorm stays float32, as Paddle creates it (and AMP O2 keeps it)."""
    paddle.seed(0)
    paddle.set_default_dtype(dtype)
    try:
        return SuiteNet(**{"tied": True, **options})
    finally:
        paddle.set_default_dtype("float32")


def arrays(tensors):
    return [t.numpy().copy() for t in tensors]


def check_list(actual, expected, what):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_bitwise(a.numpy() if hasattr(a, "numpy") else a, e, f"{what}: {i}")


# --- 1. EMAModel against the oracle ----------------------------------------------------------
SETTINGS = EMAMODEL_SETTINGS + [dict(decay=0.0), dict(decay=0.3, min_decay=0.5),
                                dict(use_ema_warmup=True, inv_gamma=2, power=1)]


def ids(settings):
    return "-".join(f"{k}={v}" for k, v in settings.items()) or "defaults"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16-float32-shadows"])
@pytest.mark.parametrize("settings", SETTINGS, ids=ids)
def test_emamodel_bitwise_against_the_oracle(settings, dtype, kernel):
    model_dtype, _, shadow_dtype = dtype.partition("-")
    model, rng = make_model(model_dtype), np.random.default_rng(31)
    ema = EMAModel(model.parameters(), **settings)
    start = arrays(model.parameters())
    if shadow_dtype:
        ema.to(dtype=shadow_dtype.split("-")[0])
        start = [so.cast(p, so.F32) for p in start]
    ref = so.EMAModelOracle(start, **settings)
    dtypes = [p.numpy().dtype for p in model.parameters()]
    for t in range(64):
        train_step(model, rng)
        ema.step(model.parameters())
        ref.step(arrays(model.parameters()), [not p.stop_gradient for p in model.parameters()])
        assert (ema.optimization_step, ema.cur_decay_value) == (ref.optimization_step, ref.cur_decay_value)
        assert ema.get_decay(t + 1) == ref.get_decay(t + 1)
        check_list(ema.shadow_params, ref.shadow_params, f"step {t}")
        if t % 10 == 9:  # the trainer's evaluation: store, copy_to, ..., restore
            raw = arrays(model.parameters())
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
            check_list(model.parameters(), ref.copy_to(dtypes), f"copy_to after step {t}")
            ema.restore(model.parameters())
            check_list(model.parameters(), raw, f"restore after step {t}")
            assert ema.temp_stored_params is None
        if t == 31:  # a checkpoint of state_dict(), loaded by a new EMAModel
            saved = copy.deepcopy(ema.state_dict())
            ema = EMAModel(model.parameters(), **settings)
            ema.load_state_dict(saved)
            check_list(ema.shadow_params, ref.shadow_params, "resumed")
    assert ema.state_dict()["shadow_params"] is ema.shadow_params  # references, as ppdiffusers returns


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_emamodel_small_and_large_tensors(dtype):
    """Small and large tensors, float32 shadows (the fused update) and bfloat16 ones (Paddle's ops)."""
    paddle.seed(5)
    paddle.set_default_dtype(dtype)
    try:
        model = paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.Linear(400, 300))
    finally:
        paddle.set_default_dtype("float32")
    rng = np.random.default_rng(44)
    ema = EMAModel(model.parameters(), use_ema_warmup=True)
    ref = so.EMAModelOracle(arrays(model.parameters()), use_ema_warmup=True)
    for t in range(8):
        train_step(model, rng)
        ema.step(model.parameters())
        ref.step(arrays(model.parameters()), [True] * 4)
        check_list(ema.shadow_params, ref.shadow_params, f"step {t}")


def test_emamodel_float16_shadows_need_a_gpu():
    """Paddle's CPU has no float16 subtract: EMAModel on float16 shadows raises there, as
    ppdiffusers' does (the float32-then-round step the oracle models is GPU-only, unverified here)."""
    model = make_model("float16")
    ema = EMAModel(model.parameters())
    with pytest.raises(RuntimeError, match="subtract"):
        ema.step(model.parameters())


# --- 2. save_pretrained / from_pretrained, checks, deprecations, non-finite ------------------
class TinyModel(SuiteNet):
    """A model class with the ppdiffusers ModelMixin/ConfigMixin calls EMAModel makes:
    from_config, register_to_config, config, save_pretrained, from_pretrained, and load_config,
    whose `return_unused_kwargs=True` returns the keyword arguments it was given besides the
    config, as ppdiffusers' does. Files: config.json and weights.npz (no pickle)."""

    def __init__(self, width=8):
        super().__init__(tied=True)
        self.config = {"width": width}

    @classmethod
    def from_config(cls, config):
        return cls(width=config["width"])

    def register_to_config(self, **kwargs):
        self.config = {**self.config, **kwargs}

    def save_pretrained(self, path):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.config, f)
        np.savez(os.path.join(path, "weights.npz"), **{k: v.numpy() for k, v in self.state_dict().items()})

    @classmethod
    def load_config(cls, path, return_unused_kwargs=False, **kwargs):
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        return (config, kwargs) if return_unused_kwargs else config

    @classmethod
    def from_pretrained(cls, path):
        model = cls.from_config(cls.load_config(path))
        with np.load(os.path.join(path, "weights.npz"), allow_pickle=False) as weights:
            model.set_state_dict({k: weights[k] for k in weights.files})
        return model


SAVED_SETTINGS = dict(decay=0.999, use_ema_warmup=True, inv_gamma=2.0, power=0.75, update_after_step=2)


def trained_ema(rng, steps=6):
    paddle.seed(0)
    model = TinyModel()
    ema = EMAModel(model.parameters(), model_cls=TinyModel, model_config=model.config, **SAVED_SETTINGS)
    for _ in range(steps):
        train_step(model, rng)
        ema.step(model.parameters())
    return model, ema


def test_save_pretrained_and_from_pretrained(tmp_path):
    model, ema = trained_ema(np.random.default_rng(32))
    ema.save_pretrained(str(tmp_path))
    config = TinyModel.load_config(str(tmp_path))
    assert {k: config[k] for k in SAVED_SETTINGS} == SAVED_SETTINGS and config["optimization_step"] == 6
    with np.load(tmp_path / "weights.npz", allow_pickle=False) as weights:
        written = [weights[name] for name, _ in TinyModel().named_parameters()]
    check_list(written, arrays(ema.shadow_params), "the averaged weights written")

    # ppdiffusers' quirk: load_config(..., return_unused_kwargs=True) hands back no settings
    lost = EMAModel.from_pretrained(str(tmp_path), TinyModel)
    assert (lost.optimization_step, lost.use_ema_warmup, lost.decay, lost.power) == (0, False, 0.9999, 2 / 3)
    check_list(lost.shadow_params, arrays(ema.shadow_params), "shadows from the saved weights")
    assert lost.model_cls is TinyModel and lost.model_config["width"] == 8

    kept = EMAModel.from_pretrained(str(tmp_path), TinyModel, settings_from_config=True)
    assert {k: getattr(kept, k) for k in SAVED_SETTINGS} == SAVED_SETTINGS and kept.optimization_step == 6
    rng = np.random.default_rng(33)
    for step in range(5):  # the resumed EMA continues exactly
        train_step(model, rng)
        ema.step(model.parameters())
        kept.step(model.parameters())
        check_list(kept.shadow_params, arrays(ema.shadow_params), f"resumed step {step}")


def test_save_pretrained_needs_the_model_class():
    model = make_model()
    with pytest.raises(ConfigError, match="model_cls"):
        EMAModel(model.parameters()).save_pretrained("unused")
    with pytest.raises(ConfigError, match="model_config"):
        EMAModel(model.parameters(), model_cls=TinyModel).save_pretrained("unused")


def test_load_state_dict_checks_everything_first():
    model, ema = trained_ema(np.random.default_rng(34))
    before, settings = arrays(ema.shadow_params), {k: getattr(ema, k) for k in ema.state_dict() if k != "shadow_params"}
    good = copy.deepcopy(ema.state_dict())
    shadows = good["shadow_params"]
    nan = [s.clone() for s in shadows]
    nan[2] = paddle.full_like(nan[2], float("nan"))
    cases = [
        (dict(decay=1.5), "Decay must be between 0 and 1"),
        (dict(min_decay=0), "min_decay"),  # ppdiffusers' check: a float, so 0 is refused
        (dict(optimization_step=3.0), "optimization_step"),
        (dict(use_ema_warmup=1), "use_ema_warmup"),
        (dict(power="2/3"), "power"),
        (dict(shadow_params=tuple(shadows)), "must be a list"),
        (dict(shadow_params=shadows[:-1]), "shadow_params for the"),
        (dict(shadow_params=shadows[:-1] + [paddle.zeros([2])]), "has shape"),
        (dict(shadow_params=nan), "NaN"),
    ]
    for change, message in cases:
        with pytest.raises(IncompatibleStateError, match=message):
            ema.load_state_dict({**good, **change})
        assert {k: getattr(ema, k) for k in settings} == settings
        check_list(ema.shadow_params, before, f"unchanged after {change}")
    with pytest.raises(ConfigError, match="inv_gamma"):  # the warm-up schedule refuses it
        ema.load_state_dict({**good, "inv_gamma": 0})
    assert {k: getattr(ema, k) for k in settings} == settings
    ema.load_state_dict(good)
    check_list(ema.shadow_params, before, "loaded")
    train_step(model, np.random.default_rng(0))
    ema.step(model.parameters())
    check_list(good["shadow_params"], before, "the given state, after a step")  # values taken, not the tensors


def test_deprecated_arguments_as_ppdiffusers():
    model = make_model()
    with pytest.warns(FutureWarning, match="nn.Layer"):
        ema = EMAModel(model)
    assert ema.use_ema_warmup and len(ema.shadow_params) == len(model.parameters())
    with pytest.warns(FutureWarning, match="max_value"):
        assert EMAModel(model.parameters(), max_value=0.5).decay == 0.5
    with pytest.warns(FutureWarning, match="min_value"):
        assert EMAModel(model.parameters(), min_value=0.25).min_decay == 0.25
    with pytest.warns(FutureWarning, match="device"):
        EMAModel(model.parameters(), device="cpu")
    with pytest.warns(FutureWarning, match="step"):
        ema.step(model)
    with pytest.raises(ConfigError, match="foreach"):
        EMAModel(model.parameters(), foreach=True)


def test_emamodel_nonfinite_option():
    model, rng = make_model(), np.random.default_rng(35)
    plain, skip = EMAModel(model.parameters()), EMAModel(model.parameters(), nonfinite="skip")
    raising = EMAModel(model.parameters(), nonfinite="raise")
    train_step(model, rng)
    for ema in (plain, skip, raising):
        ema.step(model.parameters())
    good = arrays(skip.shadow_params)
    with paddle.no_grad():
        model.conv.weight[0, 0, 0, 0] = float("inf")
    plain.step(model.parameters())
    assert not np.isfinite(plain.shadow_params[1].numpy()).all()
    with pytest.warns(RuntimeWarning, match="parameter"):
        skip.step(model.parameters())
    check_list(skip.shadow_params, good, "'skip' changes nothing")
    assert (skip.optimization_step, skip.num_nonfinite_skipped) == (1, 1)
    with pytest.raises(NonFiniteError):
        raising.step(model.parameters())
    assert raising.optimization_step == 1


def test_restore_without_store():
    model = make_model()
    ema = EMAModel(model.parameters())
    with pytest.raises(EMAStateError, match="store"):
        ema.restore(model.parameters())


# --- 3. LitEma -------------------------------------------------------------------------------
def trainable(model):
    return {n: p.numpy().copy() for n, p in model.named_parameters() if not p.stop_gradient}


class Owner(paddle.nn.Layer):
    """The way ppdiffusers' latent-diffusion trainers hold it: `self.unet`, `self.model_ema`."""

    def __init__(self, unet, lit_ema_class=LitEma, **options):
        super().__init__()
        self.unet = unet
        self.model_ema = lit_ema_class(unet, **options)


LITEMA_SETTINGS = [dict(decay=0.9999), dict(decay=0.99, use_num_upates=False), dict(decay=0.5),
                   dict(decay=0.9999, save_num_updates=True)]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("settings", LITEMA_SETTINGS, ids=ids)
def test_litema_bitwise_against_the_oracle(settings, dtype, kernel):
    model, rng = make_model(dtype), np.random.default_rng(36)
    owner = Owner(model, **settings)
    oracle_settings = {k: v for k, v in settings.items() if k != "save_num_updates"}
    ref = so.LitEmaOracle(trainable(model), **oracle_settings)
    assert list(owner.model_ema.m_name2s_name) == list(trainable(model))
    for t in range(64):
        train_step(model, rng)
        owner.model_ema(model)
        ref.forward(trainable(model))
        assert owner.model_ema.num_updates == ref.num_updates
        count = {"_num_updates": np.array(ref.num_updates)} if "save_num_updates" in settings else {}
        check_state(dict(owner.model_ema.named_buffers()), {**count, **ref.buffers}, f"forward {t}")
        if t == 31:  # the owner's checkpoint, loaded by a new owner (the buffers only, unless save_num_updates)
            saved = {k: v.clone() for k, v in owner.state_dict().items()}
            assert all(saved[f"model_ema.{name}"].dtype == paddle.float32 for name in ref.buffers)
            owner = Owner(model, **settings)
            owner.set_state_dict(saved)
            if "save_num_updates" not in settings:
                ref.num_updates = 0 if settings.get("use_num_upates", True) else -1  # the threshold restarts
    dtypes = {n: p.numpy().dtype for n, p in model.named_parameters() if not p.stop_gradient}
    raw = {name: p.numpy().copy() for name, p in model.named_parameters()}
    owner.model_ema.store(model.parameters())
    owner.model_ema.copy_to(model)
    expected = {**raw, **ref.copy_to(dtypes)}  # the frozen ones stay as they were
    for name, p in model.named_parameters():
        assert_bitwise(p.numpy(), expected[name], f"copy_to {name}")
    owner.model_ema.restore(model.parameters())
    check_list(model.parameters(), list(raw.values()), "restore")
    with pytest.raises(EMAStateError, match="restore"):
        owner.model_ema.restore(model.parameters())


class Colliding(paddle.nn.Layer):
    """Parameters 'a.bc' and 'ab.c': the same name once the dots are removed."""

    def __init__(self):
        super().__init__()
        self.a = paddle.nn.Layer()
        self.a.bc = self.a.create_parameter([3, 2])
        self.ab = paddle.nn.Layer()
        self.ab.c = self.ab.create_parameter([3, 2])


def test_litema_name_collisions(kernel):
    paddle.seed(1)
    model, rng = Colliding(), np.random.default_rng(37)
    shared, separate = LitEma(model, 0.9), LitEma(model, 0.9, name_collisions="separate")
    assert shared.m_name2s_name == {"a.bc": "abc", "ab.c": "abc"} and list(shared.state_dict()) == ["abc"]
    assert separate.m_name2s_name == {"a.bc": "abc", "ab.c": "abc_1"}
    ref_shared = so.LitEmaOracle(trainable(model), decay=0.9)  # one buffer, updated by both, in order
    ref_separate = so.LitEmaOracle({"abc": trainable(model)["a.bc"], "abc_1": trainable(model)["ab.c"]}, decay=0.9)
    for t in range(60):
        train_step(model, rng)
        shared(model)
        separate(model)
        values = trainable(model)
        ref_shared.forward(values)
        ref_separate.forward({"abc": values["a.bc"], "abc_1": values["ab.c"]})
        check_state(dict(shared.named_buffers()), ref_shared.buffers, f"shared, forward {t}")
        check_state(dict(separate.named_buffers()), ref_separate.buffers, f"separate, forward {t}")


def test_litema_refuses_a_model_it_was_not_built_with():
    model = make_model()
    ema = LitEma(model)
    before = {k: v.numpy().copy() for k, v in ema.state_dict().items()}
    model.fc.bias.stop_gradient = True
    with pytest.raises(IncompatibleStateError, match="fc.bias"):
        ema(model)
    model.fc.bias.stop_gradient = False
    model.frozen.stop_gradient = False
    with pytest.raises(IncompatibleStateError, match="frozen"):
        ema.copy_to(model)
    check_state(ema.state_dict(), before, "unchanged")
    assert ema.num_updates == 0
    with pytest.raises(ConfigError, match="between 0 and 1"):
        LitEma(model, decay=1.5)


def test_litema_nonfinite_option():
    model, rng = make_model(), np.random.default_rng(38)
    skip, raising = LitEma(model, nonfinite="skip"), LitEma(model, nonfinite="raise")
    train_step(model, rng)
    skip(model)
    raising(model)
    good = {k: v.numpy().copy() for k, v in skip.state_dict().items()}
    with paddle.no_grad():
        model.fc.bias[1] = float("nan")
    with pytest.warns(RuntimeWarning):
        skip(model)
    check_state(skip.state_dict(), good, "'skip' changes nothing")
    assert (skip.num_updates, skip.num_nonfinite_skipped) == (1, 1)
    with pytest.raises(NonFiniteError):
        raising(model)


# --- the trainers' usage patterns ------------------------------------------------------------
class TinyUNet(paddle.nn.Layer):
    """conv, GroupNorm, linear time embedding, a frozen weight: a stand-in denoiser."""

    def __init__(self):
        super().__init__()
        self.conv_in = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.norm = paddle.nn.GroupNorm(2, 8)
        self.time = paddle.nn.Linear(1, 8)
        self.conv_out = paddle.nn.Conv2D(8, 3, 3, padding=1)
        self.scale = self.create_parameter([1], default_initializer=paddle.nn.initializer.Constant(0.5))
        self.scale.stop_gradient = True

    def forward(self, x, t):
        h = self.conv_in(x) + self.time(t)[:, :, None, None]
        return self.conv_out(paddle.nn.functional.silu(self.norm(h))) * self.scale


def denoising_steps(unet, optimizer, rng, steps):
    """A few DDPM-like training steps on random images; yields after each optimizer step."""
    for _ in range(steps):
        images = paddle.to_tensor(rng.standard_normal((2, 3, 8, 8)).astype("float32"))
        noise = paddle.to_tensor(rng.standard_normal((2, 3, 8, 8)).astype("float32"))
        t = paddle.to_tensor(rng.uniform(0, 1, (2, 1)).astype("float32"))
        loss = paddle.nn.functional.mse_loss(unet(images + noise * t[:, :, None, None], t), noise)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        yield


def ldm_run(lit_ema_class, tmp_path, record=None):
    """ppdiffusers' latent-diffusion trainers' LitEma calls (examples/stable_diffusion/sd/model.py,
    DiT's trainer_model.py): `self.model_ema = LitEma(self.unet)`; `self.model_ema(self.unet)` at
    each train batch end; ema_scope = store(unet.parameters()) + copy_to(unet) ... restore; the
    owner's state_dict saved and loaded (resume). Returns the final owner state and the weights
    seen inside the last ema_scope."""
    paddle.seed(2)
    rng = np.random.default_rng(39)
    owner = Owner(TinyUNet(), lit_ema_class)
    optimizer = paddle.optimizer.Adam(1e-2, parameters=owner.unet.parameters())
    scoped = None
    for step in range(24):
        next(denoising_steps(owner.unet, optimizer, rng, 1))
        owner.model_ema(owner.unet)  # on_train_batch_end
        if record is not None:
            record.append(trainable(owner.unet))
        if step % 8 == 7:  # validation inside ema_scope
            owner.model_ema.store(owner.unet.parameters())
            owner.model_ema.copy_to(owner.unet)
            scoped = {k: v.numpy().copy() for k, v in owner.unet.state_dict().items()}
            owner.model_ema.restore(owner.unet.parameters())
        if step == 11:  # a checkpoint of the whole owner, loaded into a new one
            paddle.save(owner.state_dict(), str(tmp_path / "owner.pdparams"))
            owner = Owner(TinyUNet(), lit_ema_class)
            owner.set_state_dict(paddle.load(str(tmp_path / "owner.pdparams")))
            optimizer = paddle.optimizer.Adam(1e-2, parameters=owner.unet.parameters())
    return {k: v.numpy().copy() for k, v in owner.state_dict().items()}, scoped


def test_litema_in_a_latent_diffusion_loop(kernel, tmp_path):
    record = []
    final, scoped = ldm_run(LitEma, tmp_path, record)
    paddle.seed(2)
    ref = so.LitEmaOracle(trainable(TinyUNet()))
    for step, values in enumerate(record):
        if step == 12:  # the loaded LitEma counts its updates from 0 again
            ref.num_updates = 0
        ref.forward(values)
    assert [k for k in final if k.startswith("model_ema.")] == [f"model_ema.{k}" for k in ref.buffers]
    for name, value in ref.buffers.items():
        assert_bitwise(final[f"model_ema.{name}"], value, f"final {name}")
    expected = ref.copy_to({name: value.dtype for name, value in record[-1].items()})
    for name, value in scoped.items():  # the last ema_scope (step 23): averages in, the frozen weight as it was
        assert_bitwise(value, expected[name] if name in expected else final[f"unet.{name}"], f"in ema_scope: {name}")


def emamodel_run(ema_class, model_cls, tmp_path, record=None):
    """train_unconditional.py's EMAModel calls: EMAModel(model.parameters(), decay, use_ema_warmup=True,
    inv_gamma, power, model_cls, model_config); step(model.parameters()) after each optimizer step;
    save_pretrained(checkpoint/unet_ema) every few steps; store/copy_to ... restore around
    sampling and around saving the pipeline. Returns the final shadows, the weights copied in for
    the last save, and the raw weights."""
    paddle.seed(3)
    rng = np.random.default_rng(40)
    model = model_cls()
    ema = ema_class(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75,
                    model_cls=model_cls, model_config=model.config)
    saved = None
    for step in range(12):
        train_step(model, rng)  # stands in for loss.backward(); optimizer.step(); lr_scheduler.step()
        ema.step(model.parameters())
        if record is not None:
            record.append((arrays(model.parameters()), [not p.stop_gradient for p in model.parameters()]))
        if step % 6 == 5:
            ema.save_pretrained(str(tmp_path / f"checkpoint-{step + 1}" / "unet_ema"))
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
            saved = arrays(model.parameters())  # what the pipeline saves
            ema.restore(model.parameters())
    return arrays(ema.shadow_params), saved, arrays(model.parameters())


def test_emamodel_in_train_unconditional_loop(kernel, tmp_path):
    record = []
    shadows, saved, raw = emamodel_run(EMAModel, TinyModel, tmp_path, record)
    paddle.seed(3)
    ref = so.EMAModelOracle(arrays(TinyModel().parameters()), decay=0.9999, use_ema_warmup=True, power=0.75)
    for values, train in record:
        ref.step(values, train)
    check_list(shadows, ref.shadow_params, "final shadows")
    check_list(saved, ref.copy_to([v.dtype for v in raw]), "weights copied in for the last save")
    check_list(raw, record[-1][0], "raw weights after restore")
    written = EMAModel.from_pretrained(str(tmp_path / "checkpoint-12" / "unet_ema"), TinyModel,
                                       settings_from_config=True)
    check_list(written.shadow_params, ref.shadow_params, "checkpoint-12/unet_ema")
    assert written.optimization_step == 12


# --- 4. against ppdiffusers' own classes -----------------------------------------------------
def real(name, module):
    return suite_class([module], name, "ppdiffusers")


@pytest.mark.parametrize("settings", SETTINGS, ids=ids)
def test_emamodel_against_ppdiffusers(settings, kernel):
    Real = real("EMAModel", "ppdiffusers.training_utils")
    model, rng = make_model("bfloat16"), np.random.default_rng(41)
    ours, theirs = EMAModel(model.parameters(), **settings), Real(model.parameters(), **settings)
    for t in range(64):
        train_step(model, rng)
        ours.step(model.parameters())
        theirs.step(model.parameters())
        assert ours.cur_decay_value == theirs.cur_decay_value
        check_list(ours.shadow_params, arrays(theirs.shadow_params), f"step {t}")
        if t == 31:
            ours_state, theirs_state = copy.deepcopy(ours.state_dict()), copy.deepcopy(theirs.state_dict())
            ours, theirs = EMAModel(model.parameters(), **settings), Real(model.parameters(), **settings)
            ours.load_state_dict(ours_state)
            theirs.load_state_dict(theirs_state)
    targets = [make_model("bfloat16") for _ in range(2)]
    ours.copy_to(targets[0].parameters())
    theirs.copy_to(targets[1].parameters())
    check_list(targets[0].parameters(), arrays(targets[1].parameters()), "copy_to")


@pytest.mark.parametrize("settings", LITEMA_SETTINGS[:3], ids=ids)
def test_litema_against_ppdiffusers(settings, kernel):
    Real = real("LitEma", "ppdiffusers.models.ema")
    model, rng = make_model("float16"), np.random.default_rng(42)
    ours, theirs = LitEma(model, **settings), Real(model, **settings)
    for t in range(64):
        train_step(model, rng)
        ours(model)
        theirs(model)
        assert ours.num_updates == theirs.num_updates and ours.m_name2s_name == theirs.m_name2s_name
        check_state(ours.state_dict(), {k: v.numpy() for k, v in theirs.state_dict().items()}, f"forward {t}")
        if t == 31:
            ours_state = {k: v.clone() for k, v in ours.state_dict().items()}
            theirs_state = {k: v.clone() for k, v in theirs.state_dict().items()}
            ours, theirs = LitEma(model, **settings), Real(model, **settings)
            ours.set_state_dict(ours_state)
            theirs.set_state_dict(theirs_state)
    targets = [make_model("float16") for _ in range(2)]
    ours.copy_to(targets[0])
    theirs.copy_to(targets[1])
    check_list(targets[0].parameters(), arrays(targets[1].parameters()), "copy_to")


def test_trainer_loops_against_ppdiffusers(tmp_path):
    RealLit, RealEMA = real("LitEma", "ppdiffusers.models.ema"), real("EMAModel", "ppdiffusers.training_utils")
    ours, theirs = ldm_run(LitEma, tmp_path / "a"), ldm_run(RealLit, tmp_path / "b")
    check_state({k: paddle.to_tensor(v) for k, v in ours[0].items()}, theirs[0], "LDM loop: final owner state")
    check_state({k: paddle.to_tensor(v) for k, v in ours[1].items()}, theirs[1], "LDM loop: inside ema_scope")
    ours, theirs = emamodel_run(EMAModel, TinyModel, tmp_path / "c"), emamodel_run(RealEMA, TinyModel, tmp_path / "d")
    for what, a, b in zip(("shadows", "saved weights", "raw weights"), ours, theirs):
        check_list(a, b, f"train_unconditional loop: {what}")
    for name in ("config.json", "weights.npz"):
        for step in (6, 12):
            a = (tmp_path / "c" / f"checkpoint-{step}" / "unet_ema" / name).read_bytes()
            b = (tmp_path / "d" / f"checkpoint-{step}" / "unet_ema" / name).read_bytes()
            assert a == b, f"checkpoint-{step}/unet_ema/{name} differs"


def test_save_and_from_pretrained_with_ppdiffusers_unet(tmp_path):
    RealEMA = real("EMAModel", "ppdiffusers.training_utils")
    from ppdiffusers import UNet2DModel

    paddle.seed(4)
    unet = UNet2DModel(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    rng = np.random.default_rng(43)
    emas = [cls(unet.parameters(), use_ema_warmup=True, power=0.75, model_cls=UNet2DModel, model_config=unet.config)
            for cls in (EMAModel, RealEMA)]
    for _ in range(5):
        train_step(unet, rng)
        for ema in emas:
            ema.step(unet.parameters())
    for ema, folder in zip(emas, ("ours", "theirs")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ema.save_pretrained(str(tmp_path / folder))
    for name in os.listdir(tmp_path / "theirs"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes(), name
    loaded = [EMAModel.from_pretrained(str(tmp_path / "ours"), UNet2DModel),
              RealEMA.from_pretrained(str(tmp_path / "theirs"), UNet2DModel)]
    assert loaded[0].optimization_step == loaded[1].optimization_step == 0  # ppdiffusers' lost settings
    check_list(loaded[0].shadow_params, arrays(loaded[1].shadow_params), "from_pretrained shadows")
    kept = EMAModel.from_pretrained(str(tmp_path / "ours"), UNet2DModel, settings_from_config=True)
    assert (kept.optimization_step, kept.use_ema_warmup, kept.power) == (5, True, 0.75)
