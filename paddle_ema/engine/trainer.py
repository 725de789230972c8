"""The dygraph trainer behind tools/train.py.

One epoch is a permutation of the training set drawn from (seed, epoch); after each optimizer
step the EMA is updated; at snapshot epochs the EMA weights are taken once, evaluated (with
--eval, beside the raw weights) and saved. Everything that decides the next step is in the
checkpoint (raw weights, optimizer and LR schedule, EMA state, RNG state, step counters), so
`-r` continues the same run bit for bit.

Under `python -m paddle.distributed.launch` each process trains its part of every batch of a
DataParallel model and keeps the EMA (or its shard, `ema_shard`) from the synchronised weights;
only rank 0 writes files (engine/distributed.py).

`mode: static` is engine/static_trainer.py (the Executor with paddle_ema.static's EMA), a subclass
that replaces the methods below which touch the model, the optimizer or the evaluation.
"""

import os

import paddle

from .. import kernels
from ..config import create
from ..core.nonfinite import NonfinitePolicy
from ..core.selection import batchnorm_statistic_names
from ..errors import ConfigError, IncompatibleStateError, PaddleEMAError
from ..infra.checkpoint import recover
from .average_protocol import check_finite, weights_loaded
from .builders import build_datasets, build_model, classification_loss, seed_everything, set_device
from .checkpoint_files import (
    check_fits,
    check_same_run,
    copy_state,
    ema_keys,
    ema_resume_hint,
    load_resume_state,
    newest_resumable,
    run_identity,
    save_checkpoint,
)
from .data import batches
from .distributed import Parallel, SilentProgress, dump_snapshot
from .ema_setup import build_ema, check_averaging_steps, relative_distance
from .output_folder import RunLock, check_writable, refuse_planted_links, remove_created
from .progress import Progress
from .report import ScalarLog, output_lines, plot_curves, summary_table
from .swa_posthoc_setup import SWA_SUFFIX, build_posthoc, build_swa, with_recalibrated_bn

# `-r auto`: resume from the newest complete checkpoint of this run, or start fresh without one.
RESUME_AUTO = "auto"
# Exceptions a foreign or damaged training state raises inside Paddle's and the EMA's set_state_dict.
_FOREIGN_STATE = (KeyError, TypeError, ValueError, AssertionError, AttributeError, IndexError, RuntimeError)

__all__ = ["Trainer"]


class Trainer:
    def __init__(self, cfg, name, do_eval=False, vdl_log_dir=None, resume=None, stream=None, write=True):
        self._build_parts(cfg, do_eval, stream)
        # write=False (check_config): everything a run trains with, and no run folder, lock, file or resume.
        self.output_dir = os.path.join(cfg["output_dir"], name) if write else None
        self.lock, self._created = None, []
        try:
            writes = write and self.parallel.is_main
            if writes:
                self._claim_outputs(vdl_log_dir)
            self.posthoc = build_posthoc(cfg, self.model, self.output_dir, write=writes) if write else None
            self.log = ScalarLog(vdl_log_dir if writes else None)
            self.start_epoch, self.global_step, self.history, self.best = 0, 0, [], None
            if resume == RESUME_AUTO:
                resume = newest_resumable(self.output_dir, self.ema is not None)
                if resume is None and self.parallel.is_main:
                    print(f"-r auto: no complete checkpoint in {self.output_dir}: starting fresh", flush=True)
            if resume:
                self._resume(resume)
        except BaseException:
            self.close(failed=True)
            raise

    @classmethod
    def check_config(cls, cfg, do_eval=True):
        """Build everything a run of `cfg` trains with (data, model, schedule, optimizer, EMA), writing
        nothing: a config that passes trains; one that does not raises a PaddleEMAError."""
        return cls(cfg, None, do_eval=do_eval, write=False)

    def _build_parts(self, cfg, do_eval, stream):
        """What the run trains with; validates the config against the data, writes nothing."""
        self.cfg, self.do_eval, self.stream = cfg, do_eval, stream
        set_device(cfg)
        seed_everything(cfg["seed"])
        self.data = build_datasets(cfg, ("train", "eval") if do_eval else ("train",))
        reader = cfg["TrainReader"]
        self.batch_size = reader["batch_size"]
        self.parallel = Parallel(cfg, len(self.data["train"]), self.batch_size, reader["drop_last"])
        self.steps_per_epoch = len(batches(len(self.data["train"]), self.batch_size, drop_last=reader["drop_last"]))
        if self.steps_per_epoch == 0:
            raise ConfigError(f"TrainReader.batch_size {self.batch_size} with drop_last leaves no batch of "
                              f"{len(self.data['train'])} samples")
        total = self.steps_per_epoch * cfg["epoch"]
        if cfg["use_ema"]:
            check_averaging_steps(cfg, total)
        self.lr = create("lr_schedule", cfg, base_lr=cfg["base_lr"], total_steps=total,
                         steps_per_epoch=self.steps_per_epoch)
        self._build(cfg)
        self.swa = build_swa(cfg, self.model, self.steps_per_epoch)

    def _claim_outputs(self, vdl_log_dir):
        """Before anything trains: every output folder writable, this run the folder's only writer,
        and what a killed writer left there finished or removed."""
        self._created = check_writable(self.output_dir, "output_dir")
        if vdl_log_dir:
            self._created += check_writable(vdl_log_dir, "--vdl_log_dir")
        self.lock = RunLock(self.output_dir).acquire()
        refuse_planted_links(self.output_dir)
        recover(self.output_dir)
        if os.path.isdir(os.path.join(self.output_dir, "posthoc")):
            recover(os.path.join(self.output_dir, "posthoc"))

    def close(self, failed=False):
        """Release the run folder (and, after a failed start, remove the folders it created)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if failed:
            remove_created(self._created)
        self._created = []

    def _build(self, cfg):
        """Model (and its DataParallel wrapper for training), optimizer (on self.lr) and EMA."""
        self.model = build_model(cfg, self.data["train"])
        self.train_model = self.parallel.wrap(self.model)
        self.optimizer = create("optimizer", cfg, parameters=self.model.parameters(), learning_rate=self.lr)
        self.ema = build_ema(cfg, self.model)

    # -- checkpoints -------------------------------------------------------------------------
    def _train_state(self, epoch):
        return {
            "optimizer": self._optimizer_state(),
            "last_epoch": epoch,
            "global_step": self.global_step,
            "ema": None if self.ema is None else self.ema.state_dict(),
            "rng": paddle.get_rng_state(),
            "history": self.history,
            "best": self.best,
            "scalars": self.log.state_dict(),
            "run": run_identity(self.cfg),
            "ema_config": ema_keys(self.cfg),
            "swa": None if self.swa is None else self.swa.state_dict(),
            "posthoc": None if self.posthoc is None else self.posthoc.state_dict(),
        }

    def _resume(self, path):
        raw, state = load_resume_state(path, self.ema is not None)
        check_same_run(state.get("run"), self.cfg, path)
        check_fits(self.model, raw, f"-r {path}: the checkpoint's weights")
        self._restore(path, "optimizer", lambda: self._load_weights_and_optimizer(raw, state["optimizer"]))
        if self.ema is not None:
            if not isinstance(state.get("ema"), dict):
                raise ConfigError(f"-r {path}: the checkpoint was trained without EMA; use_ema is on here")
            try:
                self._restore(path, "EMA", lambda: self.ema.set_state_dict(state["ema"]))
            except IncompatibleStateError as exc:
                hint = ema_resume_hint(state.get("ema_config"), self.cfg)
                if not hint:
                    raise
                raise IncompatibleStateError(f"-r {path}: {exc}{hint}") from None
        for name, average in (("swa", self.swa), ("posthoc", self.posthoc)):
            if average is not None:
                if state.get(name) is None:
                    raise ConfigError(f"-r {path}: the checkpoint has no {name} state; it was trained without it")
                self._restore(path, name, lambda average=average, name=name: average.set_state_dict(state[name]))
        self._restore(path, "RNG", lambda: paddle.set_rng_state(state["rng"]))
        self._restore(path, "scalar log", lambda: self.log.set_state_dict(state["scalars"]))
        best = state.get("best")
        if best is not None and not isinstance(best, dict):
            raise IncompatibleStateError(f"-r {path}: its .pdopt records a best model of the wrong kind")
        self.start_epoch = state["last_epoch"] + 1
        self.global_step = state["global_step"]
        self.history, self.best = list(state["history"]), best
        if self.parallel.is_main:
            print(f"resumed from {path}: epoch {self.start_epoch}, step {self.global_step}", flush=True)

    @staticmethod
    def _restore(path, what, load):
        """Run `load` (a set_state_dict); a foreign or damaged state is one IncompatibleStateError."""
        try:
            load()
        except PaddleEMAError:
            raise
        except _FOREIGN_STATE as exc:
            reason = " ".join(str(exc).split())[:160]
            raise IncompatibleStateError(f"-r {path}: the checkpoint's {what} state does not fit this config "
                                         f"({type(exc).__name__}: {reason})") from None

    def _recalibrated(self, weights, what="ema_update_bn"):
        """`weights` with recalibrated BatchNorm statistics; when the recalibration yields NaN or Inf
        (e.g. a huge finite average overflowing) it is refused: `ema_nonfinite: raise` stops the run,
        otherwise a warning says so and the weights keep their averaged statistics (never saved NaN)."""
        recalibrated = with_recalibrated_bn(self.model, weights, self.data["train"],
                                            self.cfg["EvalReader"]["batch_size"], self.cfg["update_bn_batches"])
        statistics = batchnorm_statistic_names(self.model)
        names = [k for k, v in recalibrated.items() if k in statistics and paddle.is_floating_point(v)]
        bad = kernels.first_nonfinite([recalibrated[k] for k in names]) if names else None
        if bad is None:
            return recalibrated
        message = (f"{what}: the recalibrated BatchNorm statistic {names[bad]!r} holds NaN or Inf at step "
                   f"{self.global_step}")
        NonfinitePolicy(self.cfg["ema_nonfinite"], setting="ema_nonfinite").refuse(
            message, raise_note=" (ema_nonfinite: raise)",
            skip_note="; the recalibration is skipped: the averaged statistics are kept and saved")
        return weights

    def _optimizer_state(self):
        return self.optimizer.state_dict()

    def _load_weights_and_optimizer(self, raw, optimizer_state):
        self.model.set_state_dict(raw)
        self.optimizer.set_state_dict(optimizer_state)

    def _raw_state(self):
        return copy_state(self.model.state_dict())

    def _averages(self):
        """The averages this run keeps (engine/averages.py's protocol), in update order."""
        return [a for a in (self.ema, self.swa, self.posthoc) if a is not None]

    def _snapshot(self, epoch, final):
        """A snapshot epoch: take the weights, evaluate them (--eval), keep the best, save."""
        raw, weights, swa = self._snapshot_weights()
        when = f"at step {self.global_step} (epoch {epoch + 1})"
        if self.ema is not None:
            check_finite(weights, f"the EMA weights {when}")
        if swa is not None:
            check_finite(swa, f"the SWA weights {when}")
        row = self._evaluate(epoch, raw, weights, swa) if self.do_eval else None
        improved = self._keep_best(row)
        dump_snapshot(self.parallel, epoch, weights, raw, self.ema)
        self._save(epoch, final, raw, weights, swa, improved)
        if improved:
            key = self._best_key
            self.progress.write(f"best model so far (epoch {epoch + 1}, {key} {row[key]:.4f}) saved")
        return weights

    def _snapshot_weights(self):
        """(raw, EMA or raw, SWA or None) state dicts, BatchNorm-recalibrated where the config asks."""
        raw = self._raw_state()
        weights = raw if self.ema is None else self.ema.snapshot()  # collective when sharded
        if self.ema is not None and self.cfg["ema_update_bn"]:
            weights = self._recalibrated(weights)
        swa = None
        if self.swa is not None and self.swa.started:
            swa = self.swa.snapshot()
            if self.cfg["swa_update_bn"]:
                swa = self._recalibrated(swa, "swa_update_bn")
        return raw, weights, swa

    @property
    def _best_key(self):
        return "ema_acc" if self.ema is not None else "raw_acc"

    def _keep_best(self, row):
        """Record an evaluation row; True when it is the best so far (by EMA accuracy with an EMA)."""
        if row is None:
            return False
        self.history.append(row)
        improved = self.best is None or row[self._best_key] > self.best[self._best_key]
        if improved:
            self.best = row  # the same on every rank: accuracies are summed over ranks
        return improved

    def _save(self, epoch, final, raw, weights, swa, improved):
        """The epoch's checkpoint (and best_model first when it improved); rank 0 writes."""
        stem = os.path.join(self.output_dir, "model_final" if final else str(epoch))
        state = self._train_state(epoch)  # collective when sharded: every rank gathers, rank 0 writes
        info = {"global_step": self.global_step, "epoch": epoch}
        if self.parallel.is_main:
            # best_model first, then the epoch's checkpoint that records it as `best`: killed between
            # the two, the run resumes from the previous checkpoint, evaluates this epoch again and
            # writes the same best_model, so `best` and best_model always agree.
            if improved:
                save_checkpoint(os.path.join(self.output_dir, "best_model"), weights,
                                raw if self.ema is not None else None, info=info)
            save_checkpoint(stem, weights, raw if self.ema is not None else None, state,
                            extra=None if swa is None else {SWA_SUFFIX: swa}, info=info)

    def _evaluate(self, epoch, raw, weights, swa=None):
        row = {"epoch": epoch, "raw_acc": self._accuracy()}
        self.log.add("raw_acc", self.global_step, row["raw_acc"])
        line = f"epoch {epoch + 1}: raw acc {row['raw_acc']:.4f}"
        if self.ema is not None:
            row["ema_acc"] = self._accuracy_of(weights)
            row["distance"] = relative_distance(weights, raw)
            self.log.add("ema_acc", self.global_step, row["ema_acc"])
            self.log.add("distance", self.global_step, row["distance"])
            line += f", EMA acc {row['ema_acc']:.4f}, |ema-raw|/|raw| {row['distance']:.4g}"
        if swa is not None:
            row["swa_acc"] = self._accuracy_of(swa)
            self.log.add("swa_acc", self.global_step, row["swa_acc"])
            line += f", SWA acc {row['swa_acc']:.4f}"
        self.progress.write(line)
        return row

    def _accuracy(self):
        """Eval accuracy of the current (raw) weights, over the whole eval set (gathered across ranks)."""
        return self.parallel.evaluate(self.model, self.data["eval"], self.cfg["EvalReader"]["batch_size"])

    def _accuracy_of(self, weights):
        """`_accuracy()` of `weights` (a state dict), the model's own weights kept."""
        with weights_loaded(self.model, weights):
            return self._accuracy()

    # -- training ----------------------------------------------------------------------------
    def train(self):
        cfg, data = self.cfg, self.data["train"]
        epochs, reader = cfg["epoch"], cfg["TrainReader"]
        self.progress = (Progress(self.steps_per_epoch * epochs, self.global_step, cfg["log_iter"], self.stream)
                         if self.parallel.is_main else SilentProgress())
        self.model.train()
        try:
            try:
                for epoch in range(self.start_epoch, epochs):
                    order = batches(len(data), self.batch_size, reader["shuffle"], reader["drop_last"], cfg["seed"], epoch)
                    for iteration, indices in enumerate(order):
                        part = self.parallel.part(indices)
                        loss = self._step(*data.batch(part), self.parallel.loss_scale(len(part), len(indices)))
                        decay = None if self.ema is None else self.ema.last_decay
                        if self.global_step % cfg["log_iter"] == 0:
                            self.log.add("loss", self.global_step, loss)
                            self.log.add("lr", self.global_step, self.optimizer.get_lr())
                            self.log.add("decay", self.global_step, decay)
                        shown = {"loss": loss, "lr": self.optimizer.get_lr()}
                        if decay is not None:
                            shown["ema_decay"] = decay
                        self.progress.step(epoch, epochs, iteration, len(order), self.batch_size, shown)
                    final = epoch + 1 == epochs
                    if final or (epoch + 1) % cfg["snapshot_epoch"] == 0:
                        self._snapshot(epoch, final)
            finally:
                self.progress.close()
                self.log.close()
            return self.finish()
        finally:
            self.close()

    def _step(self, images, labels, loss_scale=1.0):
        """One optimizer step on this process's part of the batch; returns its mean loss."""
        logits = self.train_model(paddle.to_tensor(images))
        loss = classification_loss(logits, paddle.to_tensor(labels))
        (loss if loss_scale == 1.0 else loss * loss_scale).backward()
        self.optimizer.step()
        self.optimizer.clear_grad()
        self.lr.step()
        self.global_step += 1
        self.parallel.sync_running_stats(self.model)
        for average in self._averages():
            average.update(self.global_step - 1)
        return float(loss)

    def finish(self):
        if not self.parallel.is_main:
            return self.history
        lines = summary_table(self.history)
        for line in lines:
            print(line, flush=True)
        curves = None
        if self.history or self.log.writer is not None:
            curves = plot_curves(self.log.series, self.steps_per_epoch, os.path.join(self.output_dir, "curves.png"))
        for line in output_lines(self.output_dir, self.cfg["epoch"], self.cfg["snapshot_epoch"], self.ema is not None,
                                 self.best, curves, self.log.logdir):
            print(line, flush=True)
        return self.history
