"""Worker for tests/test_paddleformers*.py: a tiny model trained by PaddleFormers' Trainer with EMACallback.

    python [-m paddle.distributed.launch --nproc_per_node N] paddleformers_train.py CONFIG_JSON

`run(config)` is also called in-process by the one-process tests. Each rank writes
OUT/rank<r>.npz: the raw weights after every optimizer step (`step<k>/<name>`), the final raw
weights, and `meta` (JSON: every evaluation's metrics, the EMA's counters and owned names).
"""

import json
import os
import shutil
import sys

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn.functional as F
from paddleformers.trainer import Trainer, TrainerCallback, TrainingArguments
from paddleformers.transformers import PretrainedConfig, PretrainedModel

from paddle_ema.integrations.paddleformers import EMACallback

FEATURES, HIDDEN, CLASSES = 6, 16, 4


def forward(layer, x, labels):
    logits = layer.fc2(F.relu(layer.fc1(x)))
    return F.cross_entropy(logits, labels), logits


class Net(paddle.nn.Layer):
    """A plain Layer; `forward(x, labels)` returns (loss, logits) as the Trainer expects."""

    def __init__(self):
        super().__init__()
        self.fc1 = paddle.nn.Linear(FEATURES, HIDDEN)
        self.fc2 = paddle.nn.Linear(HIDDEN, CLASSES)

    def forward(self, x, labels=None):
        return forward(self, x, labels)


class TinyConfig(PretrainedConfig):
    model_type = "paddle_ema_tiny"


class TinyPretrained(PretrainedModel):
    """The same network as a PretrainedModel (exported with save_pretrained, read by from_pretrained)."""

    config_class = TinyConfig
    base_model_prefix = "tiny"

    def __init__(self, config):
        super().__init__(config)
        self.fc1 = paddle.nn.Linear(FEATURES, HIDDEN)
        self.fc2 = paddle.nn.Linear(HIDDEN, CLASSES)

    def forward(self, x, labels=None):
        return forward(self, x, labels)


def dataset(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, (n,)).astype("int64")
    return x, y


class Samples(paddle.io.Dataset):
    def __init__(self, n, seed):
        self.x, self.y = dataset(n, seed)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class Recorder(TrainerCallback):
    """Records the raw weights after every optimizer step and every evaluation's metrics; copies
    the checkpoints named in `keep` (they may be rotated away later). Listed after EMACallback, so
    it sees the metrics with the EMA's added and the checkpoints with the EMA state in them."""

    def __init__(self, keep, keep_dir):
        self.steps, self.evaluations, self.substeps = {}, [], 0
        self.keep, self.keep_dir = keep, keep_dir

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps[state.global_step] = {n: p.numpy().copy() for n, p in model.named_parameters()}

    def on_substep_end(self, args, state, control, **kwargs):
        self.substeps += 1

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluations.append({"step": state.global_step, **metrics})

    def on_save(self, args, state, control, **kwargs):
        if state.global_step in self.keep and dist.get_rank() == 0:
            shutil.copytree(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"),
                            os.path.join(self.keep_dir, f"checkpoint-{state.global_step}"))


def run(config):
    """Train as `config` says; returns (trainer, callback, recorder) and writes OUT/rank<r>.npz."""
    paddle.set_device("cpu")
    out = config["out"]
    paddle.seed(config.get("model_seed", 3))
    model = TinyPretrained(TinyConfig()) if config.get("pretrained") else Net()
    checkpoint_format = config.get("format")  # None: the classic format; "flex_checkpoint": the default
    args = TrainingArguments(
        output_dir=os.path.join(out, "run"),
        device="cpu",
        amp_master_grad=False,
        max_steps=config.get("steps", 12),
        per_device_train_batch_size=config.get("batch", 8),
        per_device_eval_batch_size=8,
        gradient_accumulation_steps=config.get("accumulate", 1),
        learning_rate=0.2,
        lr_scheduler_type="constant",
        warmup_steps=0,
        save_steps=config.get("save_steps", 6),
        save_total_limit=config.get("save_total_limit"),
        eval_steps=config.get("eval_steps", 6),
        evaluation_strategy="steps" if config.get("eval_steps", 6) else "no",
        metric_for_best_model=config.get("metric_for_best_model"),
        greater_is_better=False,
        logging_steps=1000,
        save_checkpoint_format=checkpoint_format,
        load_checkpoint_format=checkpoint_format,
        sharding="",
        report_to=[],
        disable_tqdm=True,
        seed=7,
    )
    callback = EMACallback(**config.get("ema", {"decay": 0.9, "shard": config.get("shard", False)}))
    recorder = Recorder(config.get("keep", []), config.get("keep_dir", out))
    trainer = Trainer(model=model, args=args, train_dataset=Samples(96, 0), eval_dataset=Samples(16, 1),
                      callbacks=[callback, recorder])
    trainer.train(resume_from_checkpoint=config.get("resume"))
    ema = callback.ema
    meta = {
        "evaluations": recorder.evaluations,
        "substeps": recorder.substeps,
        "owned": ema.owned_names,
        "names": ema.names,
        **{key: getattr(ema, key) for key in ("num_calls", "num_updates", "decay_product", "last_decay")},
        "global_step": trainer.state.global_step,
        "best_metric": trainer.state.best_metric,
    }
    arrays = {f"step{k}/{n}": v for k, steps in recorder.steps.items() for n, v in steps.items()}
    arrays.update({f"final/{n}": p.numpy() for n, p in model.named_parameters()})
    np.savez(os.path.join(out, f"rank{dist.get_rank()}.npz"), meta=np.array(json.dumps(meta)), **arrays)
    return trainer, callback, recorder


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))
