"""EMA in PaddleFormers' `Trainer`: one callback that averages, evaluates, saves and resumes.

    from paddle_ema.integrations.paddleformers import EMACallback
    trainer = Trainer(model=model, args=args, ..., callbacks=[EMACallback(decay=0.9999)])

`load_ema_weights(checkpoint_dir)` reads the averages of one `checkpoint-N/` in one process,
whatever number of ranks wrote them. What is saved where, and why evaluation works the way it does:
docs/paddleformers.md.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import warnings
import weakref
import zipfile
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple

import numpy as np
import paddle
import paddle.distributed as dist

from ..core.validation import check_choice
from ..dygraph import ExponentialMovingAverage
from ..errors import CheckpointError, ConfigError

try:
    from paddleformers.trainer import Trainer, TrainerCallback
    from paddleformers.trainer.trainer_utils import ShardingOption, get_last_checkpoint
    from paddleformers.transformers import PretrainedModel
except ImportError as exc:  # also pyarrow's "requires NumPy 2.0" (docs/paddleformers.md, install)
    raise ImportError(
        f"paddle_ema.integrations.paddleformers needs PaddleFormers, which does not import here ({exc}); "
        'install it with pip install "paddle_ema[paddleformers]" "numpy>=2"'
    ) from exc

__all__ = ["EMACallback", "load_ema_weights", "STATE_FILE"]

# One file per part: the unsharded average is one part (rank 0 writes it), a sharded one has a
# part per rank, each with the averages that rank keeps. The name says how many parts make the set.
STATE_FILE = "paddle_ema_state.{part:05d}-of-{parts:05d}.npz"
_STATE_FILE = re.compile(r"^paddle_ema_state\.(\d{5})-of-(\d{5})\.npz$")
_FORMAT = "paddle_ema.integrations.paddleformers"
_VERSION = 1
# The counters a part records; with the averages they are ExponentialMovingAverage.state_dict().
_COUNTERS = ("num_calls", "num_updates", "decay_product", "last_decay", "num_nonfinite_skipped")
MISSING_STATE_POLICIES = ("error", "restart")


class EMACallback(TrainerCallback):
    """An EMA of the Trainer's model, kept by a `TrainerCallback`.

    It builds `paddle_ema.ExponentialMovingAverage` on the trainer's model when training starts
    (from the starting weights, or from the state in the checkpoint being resumed), folds the
    weights in after every optimizer step (once per step under gradient accumulation), adds the
    EMA weights' metrics (`eval_ema_*`) to every evaluation, writes its state into every
    `checkpoint-N/` the trainer saves, and exports the final EMA weights at the end of training.

    Args:
        decay: the schedule's decay, as for ExponentialMovingAverage (default 0.9998).
        export_dir: where the final EMA weights go at the end of training, relative to
            `args.output_dir` unless absolute (default `<output_dir>/ema`); None exports nothing.
            A `PretrainedModel` is saved with `save_pretrained` (load it with `from_pretrained`),
            any other Layer as `model_state.pdparams` (load it with `set_state_dict`).
        missing_state: what resuming from a checkpoint without an EMA state does: 'error'
            (default) raises CheckpointError; 'restart' warns and starts the average from the
            resumed weights (for adding the EMA to a run that had none).
        **options: the other options of ExponentialMovingAverage: thres_steps, schedule,
            schedule_options, bias_correction, update_every, start_step, include_stop_gradient,
            exclude, device, shard, group, nonfinite.
    """

    def __init__(self, decay: Optional[float] = None, *, export_dir: Optional[str] = "ema",
                 missing_state: str = "error", **options: Any):
        accepted = [name for name in inspect.signature(ExponentialMovingAverage).parameters if name != "model"]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ConfigError(f"EMACallback got unknown option(s) {unknown}; it takes {accepted}, "
                              "export_dir and missing_state")
        check_choice("missing_state", missing_state, MISSING_STATE_POLICIES)
        self.decay = decay
        self.options = options
        self.export_dir = export_dir
        self.missing_state = missing_state
        self.ema: Optional[ExponentialMovingAverage] = None
        self._trainer = None

    # -- finding the trainer -------------------------------------------------------------------

    def _find_trainer(self) -> Trainer:
        """The Trainer whose callback handler is calling this callback.

        PaddleFormers passes callbacks the model, optimizer and data loaders but not the trainer,
        whose evaluation loop and logger the EMA evaluation needs; the trainer is the caller, so
        it is found on the call stack (inspect, public API): the first frame whose `self` is a
        Trainer that lists this callback.
        """
        cached = self._trainer() if self._trainer is not None else None
        if cached is not None and _lists(cached, self):
            return cached
        for frame in _caller_frames():
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer) and _lists(candidate, self):
                self._trainer = weakref.ref(candidate)
                return candidate
        raise ConfigError("EMACallback must be called by a paddleformers Trainer: pass it as "
                          "Trainer(..., callbacks=[EMACallback(...)]) or trainer.add_callback(...)")

    def _resumed_checkpoint(self, trainer: Trainer, args: Any, step: int) -> str:
        """The folder `trainer.train(resume_from_checkpoint=...)` resumes: the argument of the
        running `Trainer.train` call (callbacks are not given it), True meaning the last
        checkpoint of args.output_dir, as the trainer reads it."""
        argument = None
        for frame in _caller_frames():
            if frame.f_code is Trainer.train.__code__ and frame.f_locals.get("self") is trainer:
                argument = frame.f_locals.get("resume_from_checkpoint")
                break
        if argument is True:
            argument = get_last_checkpoint(args.output_dir)
        if isinstance(argument, (str, os.PathLike)):
            return os.fspath(argument)
        return os.path.join(args.output_dir, f"checkpoint-{step}")

    # -- the trainer's events ------------------------------------------------------------------

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Find the trainer (the EMA evaluation runs its evaluation loop).

        Args:
            args: the TrainingArguments.
            state: the TrainerState.
            control: the TrainerControl.
            **kwargs: model, optimizer, data loaders (unused here).
        """
        self._find_trainer()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Build the EMA on the model, from the resumed checkpoint's state when resuming.

        Args:
            args: the TrainingArguments.
            state: the TrainerState; global_step > 0 when a checkpoint was resumed.
            control: the TrainerControl.
            **kwargs: `model` (the trainer's unwrapped model), optimizer, data loaders.
        """
        trainer = self._find_trainer()
        _check_parallelism(args)
        self.ema = ExponentialMovingAverage(kwargs["model"], self.decay, **self.options)
        if state.global_step > 0:  # the trainer has loaded a checkpoint's weights and trainer state
            folder = self._resumed_checkpoint(trainer, args, state.global_step)
            loaded = _read_state(folder)
            if loaded is None:
                message = (f"{folder} has no EMA state ({_pattern()}): it was written without EMACallback, "
                           "or the run stopped between the trainer's save and the callback's")
                if self.missing_state == "error":
                    raise CheckpointError(message + "; EMACallback(missing_state='restart') starts the average "
                                          "from the resumed weights instead")
                warnings.warn(message + "; the average starts from the resumed weights", RuntimeWarning,
                              stacklevel=2)
                return
            state_dict, step = loaded
            if step != state.global_step:
                raise CheckpointError(f"{folder}: the EMA state was saved at step {step}, the trainer state "
                                      f"at step {state.global_step}")
            self.ema.set_state_dict(state_dict)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Fold the weights of this optimizer step into the average.

        Args:
            args: the TrainingArguments.
            state: the TrainerState.
            control: the TrainerControl.
            **kwargs: unused.
        """
        if self.ema is not None:
            self.ema.update()

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Evaluate the EMA weights on the batches just evaluated and add their metrics.

        The trainer's own evaluation loop runs again on the same data loader with the EMA weights
        swapped in (`ema.apply()`, which swaps buffers, so the raw weights come back bit for bit);
        its metrics, prefixed `eval_ema` (`eval_ema_<name>` for a dataset named in a dict of eval
        datasets, `<prefix>_ema` otherwise), are logged and added to the metrics this evaluation
        returns, where `metric_for_best_model='ema_loss'` and later callbacks see them.

        Args:
            args: the TrainingArguments.
            state: the TrainerState.
            control: the TrainerControl.
            **kwargs: `metrics` (the raw weights' metrics, updated in place) and `eval_dataloader`.
        """
        metrics, loader = kwargs.get("metrics"), kwargs.get("eval_dataloader")
        if self.ema is None or self.ema.is_applied or metrics is None or loader is None:
            return
        trainer = self._find_trainer()
        prefix = _ema_prefix(_metric_prefix(metrics))
        with self.ema.apply():
            output = trainer.evaluation_loop(
                loader,
                description="Evaluation of the EMA weights",
                # as Trainer.evaluate: gather predictions only for compute_metrics
                prediction_loss_only=True if trainer.compute_metrics is None else None,
                metric_key_prefix=prefix,
                max_eval_iters=args.max_evaluate_steps,
            )
        metrics.update(output.metrics)
        trainer.log(dict(output.metrics))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the EMA state into the checkpoint folder the trainer has just saved.

        The trainer's rotation (`save_total_limit`) removes whole folders, this file with them.

        Args:
            args: the TrainingArguments.
            state: the TrainerState.
            control: the TrainerControl.
            **kwargs: unused.
        """
        if self.ema is None:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):  # e.g. zero-cost checkpoints: the trainer wrote no folder
            warnings.warn(f"EMACallback: the trainer wrote no {folder}; the EMA state is not saved", RuntimeWarning,
                          stacklevel=2)
            return
        _write_state(self.ema, folder, state.global_step, self.options.get("group"))
        if self.ema.is_sharded and dist.get_world_size() > 1:
            # Every part is on disk before any rank goes on: callbacks after this one (a copy, an
            # upload) and a crash right after see the whole set.
            dist.barrier()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Export the final EMA weights (every rank takes part; rank 0 writes).

        Args:
            args: the TrainingArguments.
            state: the TrainerState.
            control: the TrainerControl.
            **kwargs: `model`, the trainer's unwrapped model.
        """
        if self.ema is None or self.export_dir is None:
            return
        folder = os.path.join(args.output_dir, self.export_dir)
        model = kwargs["model"]
        main = dist.get_rank() == 0
        with self.ema.apply():  # collective when sharded
            if isinstance(model, PretrainedModel):
                # As the trainer calls it for its Hugging Face exports: on every rank, in the run's format.
                model.save_pretrained(folder, is_main_process=main, save_checkpoint_format=args.save_checkpoint_format)
            elif main:
                os.makedirs(folder, exist_ok=True)
                _atomic_write(os.path.join(folder, "model_state.pdparams"),
                              lambda path: paddle.save(model.state_dict(), path))


def _caller_frames():
    """The frames of the current call stack, innermost first."""
    frame = inspect.currentframe()
    while frame is not None:
        yield frame
        frame = frame.f_back


def _lists(trainer, callback):
    return any(cb is callback for cb in trainer.callback_handler.callbacks)


def _ema_prefix(prefix: str) -> str:
    """The prefix of the EMA weights' metrics for an evaluation whose metrics have `prefix`.

    Args:
        prefix: the evaluation's metric_key_prefix ('eval', 'eval_<dataset>', 'test', ...).

    Returns:
        'eval_ema' for 'eval', 'eval_ema_<dataset>' for 'eval_<dataset>', '<prefix>_ema' otherwise.
    """
    if prefix == "eval" or prefix.startswith("eval_"):
        return "eval_ema" + prefix[len("eval"):]
    return prefix + "_ema"


def _metric_prefix(metrics):
    # Trainer.evaluate adds speed metrics named "<metric_key_prefix>_runtime"; callbacks are not
    # given the prefix itself.
    for key in metrics:
        if key.endswith("_runtime"):
            return key[: -len("_runtime")]
    return "eval"


def _check_parallelism(args):
    """Refuse the parallel layouts where ranks hold different weights (not supported, not run)."""
    problems = []
    for field, what in (("tensor_model_parallel_size", "tensor parallel"),
                        ("pipeline_model_parallel_size", "pipeline parallel"),
                        ("expert_model_parallel_size", "expert parallel")):
        if int(getattr(args, field, 1) or 1) > 1:
            problems.append(f"{what} ({field}={getattr(args, field)})")
    if ShardingOption.FULL_SHARD in (getattr(args, "sharding", None) or []) and args.world_size > 1:
        problems.append("sharding stage3 (parameters sharded over ranks)")
    if getattr(args, "enable_auto_parallel", False):
        problems.append("auto parallel (enable_auto_parallel)")
    if problems:
        raise ConfigError(f"EMACallback does not support {', '.join(problems)}: each rank holds a different part "
                          "of the weights there; data parallel and sharding stage1/2 are supported "
                          "(docs/paddleformers.md, 'Parallel layouts')")


# -- the state files ---------------------------------------------------------------------------


def _pattern():
    return STATE_FILE.format(part=0, parts=1).replace("00000-of-00001", "*")


def _atomic_write(path, write):
    """write(temporary) then rename over `path`: a reader sees the old file or the new one. The
    temporary name is removed first, so that no link left there is followed."""
    temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    if os.path.lexists(temporary):
        os.remove(temporary)
    try:
        write(temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.lexists(temporary):
            os.remove(temporary)


def _write_state(ema, folder, step, group=None):
    """This rank's part of the EMA state, as one .npz file (no pickle: reading it runs no code).

    A sharded EMA's parts are numbered by the rank in its group; ranks of different groups that
    keep the same part hold the same averages (data parallel) and write the same file."""
    if ema.is_sharded:
        part, parts = (group.rank, group.nranks) if group is not None else (dist.get_rank(), dist.get_world_size())
    elif dist.get_rank() == 0:
        part, parts = 0, 1
    else:
        return
    owned = ema.owned_names
    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        "global_step": int(step),
        "names": list(ema.names),
        "owned": owned,
        "settings": ema.settings(),
        **{key: getattr(ema, key) for key in _COUNTERS},
    }
    index = {name: i for i, name in enumerate(ema.names)}
    arrays = {f"average_{index[name]}": ema.average(name).numpy() for name in owned}
    # A set with another number of parts (a run that wrote this step before, with other ranks)
    # is removed first: a folder never holds two sets.
    for entry in os.listdir(folder):
        match = _STATE_FILE.match(entry)
        if match and int(match.group(2)) != parts:
            try:
                os.remove(os.path.join(folder, entry))
            except FileNotFoundError:  # another rank removed it first
                pass

    def write(path):
        with open(path, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)

    _atomic_write(os.path.join(folder, STATE_FILE.format(part=part, parts=parts)), write)


def _read_part(path):
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
                raise ValueError("not an EMA state file")
            if meta.get("version") != _VERSION:
                raise ValueError(f"version {meta.get('version')!r}, this paddle_ema reads version {_VERSION}")
            index = {name: i for i, name in enumerate(meta["names"])}
            arrays = {name: np.asarray(data[f"average_{index[name]}"]) for name in meta["owned"]}
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path} cannot be read as an EMA state: {exc}") from None
    return meta, arrays


def _read_state(folder: str) -> Optional[Tuple[Dict[str, Any], int]]:
    """The merged state of a checkpoint folder's EMA files, or None when it has none."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder} is not a folder")
    found = {}
    for entry in sorted(os.listdir(folder)):
        match = _STATE_FILE.match(entry)
        if match:
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = os.path.join(folder, entry)
    if not found:
        return None
    if len(found) > 1:
        raise CheckpointError(f"{folder} holds EMA state sets of {sorted(found)} parts; one set is expected")
    (parts, files), = found.items()
    missing = [STATE_FILE.format(part=p, parts=parts) for p in range(parts) if p not in files]
    if missing or len(files) != parts:
        raise CheckpointError(f"{folder}: the EMA state of {parts} parts lacks {missing}")
    shadow: Dict[str, paddle.Tensor] = {}
    first = None
    for part in range(parts):
        meta, arrays = _read_part(files[part])
        common = {key: meta.get(key) for key in ("global_step", "names", "settings", *_COUNTERS)}
        if first is None:
            first = common
        elif common != first:
            differ = sorted(key for key in common if common[key] != first[key])
            raise CheckpointError(f"{files[part]} disagrees with part 0 on {differ}")
        for name, value in arrays.items():
            if name in shadow:
                raise CheckpointError(f"{folder}: {name!r} is in more than one part")
            shadow[name] = paddle.to_tensor(value, place=paddle.CPUPlace())
    absent = [name for name in first["names"] if name not in shadow]
    if absent:
        raise CheckpointError(f"{folder}: no part holds the averages of {absent[:5]}")
    state = {
        "shadow": OrderedDict((name, shadow[name]) for name in first["names"]),
        "settings": first["settings"],
        **{key: first[key] for key in _COUNTERS},
    }
    return state, int(first["global_step"])


def load_ema_weights(checkpoint_dir: str) -> Dict[str, paddle.Tensor]:
    """The EMA weights saved by EMACallback in one checkpoint folder, merged from all its parts.

    Reads in one process whatever number of ranks wrote them. The keys are the model's
    `state_dict()` keys of the averaged parameters (BatchNorm statistics and other buffers are
    not averaged unless `include_stop_gradient=True`), so `model.set_state_dict(weights)` loads
    them; for a model with buffers, update a copy of `model.state_dict()` with them first.

    Args:
        checkpoint_dir: a `checkpoint-N/` folder written by a Trainer with EMACallback.

    Returns:
        {name: averaged weight} (CPU tensors; float32 for half-precision weights).
    """
    loaded = _read_state(os.fspath(checkpoint_dir))
    if loaded is None:
        raise CheckpointError(f"{checkpoint_dir} has no EMA state ({_pattern()}): it was not written "
                              "by a Trainer with EMACallback")
    return dict(loaded[0]["shadow"])

