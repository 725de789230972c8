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

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.on_step_end(args, state, control, model=model)  # the starting (or resumed) weights

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
    # Fresh names for parameters and optimizer accumulators (linear_0.w_0_moment1_0, ...) in every
    # run of a process: the optimizer's checkpointed state is keyed by them.
    synchronize = paddle.device.synchronize
    if config.get("accumulate", 1) > 1 and not paddle.is_compiled_with_cuda():
        # PaddleFormers 1.2.0 calls paddle.device.synchronize() before the optimizer step under
        # gradient accumulation, and a CPU-only Paddle raises there ("device should be gpu, xpu");
        # on the CPU there is nothing to wait for.
        paddle.device.synchronize = lambda device=None: None
    try:
        with paddle.utils.unique_name.guard():
            return _run(config)
    finally:
        paddle.device.synchronize = synchronize


def _run(config):
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


def read_rank(out, rank=0):
    """What run() wrote for one rank: (meta, {step: {name: weights}}, {name: final raw weights})."""
    with np.load(os.path.join(out, f"rank{rank}.npz")) as data:
        meta = json.loads(str(data["meta"]))
        steps, final = {}, {}
        for key in data.files:
            if key.startswith("step"):
                step, name = key[len("step"):].split("/", 1)
                steps.setdefault(int(step), {})[name] = data[key]
            elif key.startswith("final/"):
                final[key[len("final/"):]] = data[key]
    return meta, steps, final


def loss64(weights, n=16, seed=1):
    """The mean cross entropy of the network with `weights` on the eval set, in float64 numpy."""
    x, y = dataset(n, seed)
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    hidden = np.maximum(x.astype(np.float64) @ w["fc1.weight"] + w["fc1.bias"], 0.0)
    logits = hidden @ w["fc2.weight"] + w["fc2.bias"]
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(n), y].mean())


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))
