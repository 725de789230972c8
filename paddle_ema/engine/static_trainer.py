"""`mode: static`: the trainer of tools/train.py on the Executor, with paddle_ema.static's EMA.

The same registered architecture, optimizer and LR schedule are built into a main and a startup
program (PIR by default; legacy programs with FLAGS_enable_pir_api=0 at process start); the
test program is `clone_for_test` of the forward pass. The EMA update ops are part of the main
program, so one `exe.run` trains and averages. Everything else (data order, progress, report,
checkpoint files, resume) is the dygraph Trainer's: this subclass only replaces the methods that
touch the model, the optimizer and the evaluation.

- Initial weights: those of the dygraph model built with the same seed, so both modes start
  from the same point (and, same kernels, step for step the same raw weights).
- Checkpoints: keyed by the model's structured state-dict names (`features.0.weight`), not the
  program's variable names, so tools/eval.py and tools/export_model.py load them unchanged.
  `.pdopt` holds the optimizer's accumulators under `<structured name>_<accumulator>`, the LR
  schedule, and the static EMA's full persistable state.
- The EMA keys map like engine/ema_setup.py's (`ema_settings`), `ema_bias_correction` included
  (the static EMA's own `bias_correction`); the average starts from the weights
  (`start_from_weights`), as the dygraph EMA's does. The static EMA has no start step, shadow
  device or PaddleDetection variant: those settings are refused.

Paddle's global mode stays dygraph outside the trainer's own program and executor calls.
"""

import contextlib
import warnings

import numpy as np
import paddle

from .. import _compat
from ..config import create
from ..core.averaging import settings_differences
from ..core.selection import select_parameters
from ..errors import ConfigError, IncompatibleStateError
from ..infra.saved_state import SavedState
from ..static import ExponentialMovingAverage as StaticEMA
from ..static import clone_for_test
from .builders import build_model, classification_loss
from .ema_setup import ema_settings, restart_allowed
from .evaluation import accuracy, predict_with
from .trainer import Trainer

__all__ = ["StaticTrainer"]

STATE_IMPL = "paddle_ema.static"


def check_static_config(cfg):
    """ConfigError for EMA settings that the static EMA cannot honour."""
    for key in ("use_swa", "ema_posthoc", "ema_update_bn"):  # dygraph averages / passes of the dygraph model
        if cfg[key]:
            raise ConfigError(f"{key}: true is not available with mode: static yet; use mode: dygraph")
    if not cfg["use_ema"]:
        return
    refused = {
        "ema_impl": (cfg["ema_impl"] == "ppdet", "ppdet (PaddleDetection's ModelEMA is a dygraph class)",
                     "ema_impl: paddle_ema"),
        "ema_start_step": (cfg["ema_start_step"] != 0, cfg["ema_start_step"], "ema_start_step: 0"),
        "ema_device": (cfg["ema_device"] is not None, repr(cfg["ema_device"]),
                       "ema_device: null (the averages live beside the parameters)"),
        "ema_nonfinite": (cfg["ema_nonfinite"] == "raise", "raise", "ema_nonfinite: skip or update"),
    }
    for key, (bad, shown, allowed) in refused.items():
        if bad:
            raise ConfigError(f"{key}: {shown} is not available with mode: static; use {allowed}, or mode: dygraph")


class _Scope:
    """numpy access to the variables of one executor scope."""

    def __init__(self, scope, place):
        self.scope, self.place = scope, place

    def read(self, name):
        return np.array(self.scope.find_var(name).get_tensor())

    def write(self, name, value):
        tensor = self.scope.find_var(name).get_tensor()
        tensor.set(np.ascontiguousarray(np.asarray(value, dtype=np.array(tensor).dtype)), self.place)


def _tensors(arrays):
    return {k: paddle.to_tensor(v) for k, v in arrays.items()}


class _StaticEMAState:
    """paddle_ema.static's EMA as the trainer's EvaluatedAverage (engine/averages.py)."""

    def __init__(self, cfg, model, structured):
        settings = ema_settings(cfg, model)
        include = settings["include_stop_gradient"]
        # Chosen by structured names (what ema_black_list means), handed over by program name.
        chosen = [structured[n] for n, _ in select_parameters(model, include, settings["exclude"])]
        self.ema = StaticEMA(rule=settings["rule"], policy=settings["policy"], include_stop_gradient=include,
                             parameters=chosen, nonfinite=settings["nonfinite"])
        self.ema.update()
        self.policy = self.ema.policy  # restarts after cycle_epoch snapshots (ema_settings)
        self.structured = structured  # structured name -> program name
        program_to_structured = {v: k for k, v in structured.items()}
        self.names = self.ema.state_names()
        self.shadows = {program_to_structured[p]: s for p, s in self.names["shadows"].items()}
        self.snapshots = 0

    def bind(self, variables, executor, static_guard, read_weights):
        """Attach to what exists once the programs are built: the scope's variables (a _Scope),
        the executor, the context that enters static mode and the scope, and a function returning
        the raw weights as {structured name: array}."""
        self.vars, self.exe = variables, executor
        self._static, self._read_weights = static_guard, read_weights

    def update(self, step=None):
        """Nothing to do: the EMA's update ops run inside the main program's own run."""

    @contextlib.contextmanager
    def swapped(self):
        with self._static(), self.ema.apply(self.exe):
            yield

    @property
    def variable_names(self):
        return set(self.shadows.values()) | {self.names["counter"], self.names["product"], self.names["skipped"]}

    def register(self):
        """Start the average from the current weights, like the dygraph EMA's register()."""
        with self._static():
            self.ema.start_from_weights(self.exe)

    def _calls(self):
        return int(self.vars.read(self.names["counter"])[0])

    @property
    def last_decay(self):
        """The schedule's decay of the last averaging run (the program uses float32(ema_decay))."""
        t = self.policy.last_step(self._calls())
        return None if t is None else float(self.ema.schedule(t))

    def snapshot(self):
        with self.swapped():
            weights = self._read_weights()
        self.snapshots += 1
        if self.policy.restarts_after(self.snapshots):
            live = [(name, self.vars.read(self.structured[name])) for name in self.shadows]
            if restart_allowed(self.ema.nonfinite_policy, live, f"snapshot {self.snapshots}"):
                self.register()
        return _tensors(weights)

    def state_dict(self):
        calls = self._calls()
        return {
            "impl": STATE_IMPL,
            "ema": {
                "shadow": _tensors({n: self.vars.read(s) for n, s in self.shadows.items()}),
                "num_calls": calls,
                "num_updates": self.policy.num_updates(calls),
                "decay_product": float(self.vars.read(self.names["product"])[0]),
                "last_decay": self.last_decay,
                "num_nonfinite_skipped": int(self.vars.read(self.names["skipped"])[0]),
                "settings": self.ema.settings(),
            },
            "snapshots": self.snapshots,
        }

    def set_state_dict(self, state):
        saved = SavedState(state, "the checkpoint's static EMA state")
        if state.get("impl") != STATE_IMPL:
            raise ConfigError(f"the checkpoint's EMA was made by {state.get('impl')!r}; mode: static resumes only "
                              f"its own ({STATE_IMPL!r})")
        # The whole state is checked before the scope changes: its variables would take any shape.
        ema = SavedState(saved.mapping("ema"), "the checkpoint's static EMA does not fit this config")
        # Checkpoints written before the settings were recorded have none to compare.
        recorded = ema.mapping("settings") if "settings" in ema.state else self.ema.settings()
        differences = settings_differences(recorded, self.ema.settings())
        if differences:
            raise IncompatibleStateError("the checkpoint's static EMA does not fit this config: "
                                         + "; ".join(differences))
        shadows = ema.averages("shadow", {name: list(self.vars.read(var).shape) for name, var in self.shadows.items()})
        calls, product = ema.count("num_calls"), ema.fraction("decay_product")
        skipped, snapshots = ema.count("num_nonfinite_skipped", default=0), saved.count("snapshots")
        for name, var in self.shadows.items():
            value = shadows[name]
            self.vars.write(var, value.numpy() if isinstance(value, paddle.Tensor) else value)
        self.vars.write(self.names["counter"], [calls])
        self.vars.write(self.names["product"], [product])
        self.vars.write(self.names["skipped"], [skipped])
        self.snapshots = snapshots


class StaticTrainer(Trainer):
    """Trainer on paddle.static programs and the Executor; same arguments and files as Trainer."""

    def __init__(self, cfg, name, do_eval=False, vdl_log_dir=None, resume=None, stream=None, write=True):
        check_static_config(cfg)
        self.scope = paddle.static.Scope()
        super().__init__(cfg, name, do_eval=do_eval, vdl_log_dir=vdl_log_dir, resume=resume, stream=stream,
                         write=write)

    @contextlib.contextmanager
    def _static(self):
        """Static mode and this trainer's scope inside the block; the previous global mode after it."""
        was_dynamic = paddle.in_dynamic_mode()
        if was_dynamic:
            paddle.enable_static()
        try:
            with paddle.static.scope_guard(self.scope):
                yield
        finally:
            if was_dynamic:
                paddle.disable_static()

    def _build(self, cfg):
        train = self.data["train"]
        # The dygraph model of the same seed, for its initial weights: both modes start alike.
        initial = {k: v.numpy() for k, v in build_model(cfg, train).state_dict().items()}
        self.main, startup = paddle.static.Program(), paddle.static.Program()
        with self._static(), paddle.static.program_guard(self.main, startup), paddle.utils.unique_name.guard(), \
                warnings.catch_warnings():
            # Paddle's PIR backward and paddle.where ask a Value for its place, and warn that it has none.
            warnings.filterwarnings("ignore", message="Tensor do not have 'place' interface")
            self.model = build_model(cfg, train)
            images = paddle.static.data("image", [-1, *train.images.shape[1:]], "float32")
            logits = self.model(images)
            # The forward pass only: cloned before the label, loss, backward, optimizer and EMA ops.
            self.test_program, (self.test_logits,) = clone_for_test(self.main, [logits])
            labels = paddle.static.data("label", [-1], "int64")
            self.loss = classification_loss(logits, labels)
            self.optimizer = create("optimizer", cfg, parameters=self.model.parameters(), learning_rate=self.lr)
            self.optimizer.minimize(self.loss)
            self.structured = {k: v.name for k, v in self.model.state_dict().items()}
            self.ema = _StaticEMAState(cfg, self.model, self.structured) if cfg["use_ema"] else None
            self.exe = paddle.static.Executor()
            self.exe.run(startup)
        self.vars = _Scope(self.scope, _compat.expected_place())
        self._set_raw(initial)
        self._optimizer_vars = self._find_optimizer_vars()
        if self.ema is not None:
            self.ema.bind(self.vars, self.exe, self._static, self._raw_arrays)
            self.ema.register()

    def _find_optimizer_vars(self):
        """{checkpoint key: program name} of the optimizer's persistable state (accumulators):
        every persistable variable but the weights, the EMA's state and the LR (set from the
        schedule at each run). Keys use the structured names: `features.0.weight_velocity_0`."""
        skip = set(self.structured.values()) | (self.ema.variable_names if self.ema is not None else set())
        skip.add(_compat.lr_scheduler_variable_name(self.main))
        by_length = sorted(self.structured.items(), key=lambda item: -len(item[1]))
        found = {}
        for var in self.main.list_vars():
            if not var.persistable or var.name in skip or self.scope.find_var(var.name) is None:
                continue
            key = var.name
            for structured, program_name in by_length:
                if var.name.startswith(program_name + "_"):
                    key = structured + var.name[len(program_name):]
                    break
            found[key] = var.name
        return found

    # -- weights and optimizer state, as the Trainer's checkpoints hold them ---------------------
    def _raw_arrays(self):
        return {k: self.vars.read(v) for k, v in self.structured.items()}

    def _raw_state(self):
        return _tensors(self._raw_arrays())

    def _set_raw(self, weights):
        missing = [k for k in self.structured if k not in weights]
        if missing:
            raise IncompatibleStateError(f"the weights lack {missing[:5]} of the configured model")
        for name, program_name in self.structured.items():
            value = weights[name]
            self.vars.write(program_name, value.numpy() if hasattr(value, "numpy") else value)

    def _optimizer_state(self):
        state = _tensors({k: self.vars.read(v) for k, v in self._optimizer_vars.items()})
        state["LR_Scheduler"] = self.lr.state_dict()
        return state

    def _load_weights_and_optimizer(self, raw, optimizer_state):
        self._set_raw(raw)
        missing = [k for k in self._optimizer_vars if k not in optimizer_state]
        if missing:
            raise IncompatibleStateError(f"the checkpoint's optimizer state lacks {missing[:5]}: it was made by "
                                         "another optimizer or mode")
        for key, program_name in self._optimizer_vars.items():
            self.vars.write(program_name, optimizer_state[key].numpy())
        self.lr.set_state_dict(optimizer_state["LR_Scheduler"])

    # -- evaluation and steps ----------------------------------------------------------------------
    def _accuracy(self):
        dataset = self.data["eval"]

        def forward(images):
            return self.exe.run(self.test_program, feed={"image": images}, fetch_list=[self.test_logits])[0]

        with self._static():
            logits = predict_with(forward, dataset, self.cfg["EvalReader"]["batch_size"])
        return accuracy(logits, dataset.labels)

    def _accuracy_of(self, weights):
        # The static twin of engine/averages.weights_loaded: the scope holds `weights` while the
        # test program runs, and its raw weights (bit-exact) again after.
        raw = self._raw_arrays()
        self._set_raw(weights)
        try:
            return self._accuracy()
        finally:
            self._set_raw(raw)

    def _step(self, images, labels, loss_scale=1.0):
        # One process (build_trainer refuses the launcher for mode: static): the whole batch, scale 1.
        with self._static():
            (loss,) = self.exe.run(self.main, feed={"image": images, "label": labels}, fetch_list=[self.loss])
        self.lr.step()
        self.global_step += 1
        return float(loss)
