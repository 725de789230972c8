"""What EMACallback adds to a PaddleFormers training step on the CPU, and its memory
(the figures of docs/paddleformers.md, "Cost").

    python tests/workers/paddleformers_step_cost.py {tiny,100m} ROUNDS STEPS

Each round trains the same model from the same weights twice, without and with EMACallback
(alternating which goes first), for STEPS optimizer steps. A step's time is the interval between
two consecutive `on_step_end` events of a timing callback listed last (data, forward, backward,
optimizer, every callback), in wall time and in this process's CPU time; the first 2 steps of each
run are left out. Prints one JSON line: the
median step time of each kind over all rounds, the median time of the callback's own on_step_end
(the EMA update), and the memory the EMA holds (its averages, plus the spare buffers that the
guarded update and apply() share) with the process's resident-memory growth when it was built.
"""

import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import paddle
from paddleformers.trainer import Trainer, TrainerCallback, TrainingArguments

from paddle_ema.integrations.paddleformers import EMACallback

SIZES = {"tiny": (6, 16, 1), "100m": (4096, 4096, 6)}  # features, width, hidden layers


class MLP(paddle.nn.Layer):
    def __init__(self, features, width, layers):
        super().__init__()
        dims = [features] + [width] * layers
        self.layers = paddle.nn.LayerList([paddle.nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])
        self.head = paddle.nn.Linear(width, 4)

    def forward(self, x, labels=None):
        for layer in self.layers:
            x = paddle.nn.functional.relu(layer(x))
        logits = self.head(x)
        return paddle.nn.functional.cross_entropy(logits, labels), logits


class Samples(paddle.io.Dataset):
    def __init__(self, n, features):
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((n, features)).astype("float32")
        self.y = rng.integers(0, 4, (n,)).astype("int64")

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class StepTimer(TrainerCallback):
    def __init__(self):
        self.ends, self.cpu_ends = [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())


class TimedEMACallback(EMACallback):
    """EMACallback that also times its own on_step_end and notes the memory at its build."""

    updates, built_rss = [], None

    def on_train_begin(self, args, state, control, **kwargs):
        before = rss()
        super().on_train_begin(args, state, control, **kwargs)
        self.ema.update()  # the first update allocates the guard's buffers; a copy, not counted
        self.ema.register()
        TimedEMACallback.built_rss = rss() - before

    def on_step_end(self, args, state, control, **kwargs):
        start = time.perf_counter()
        super().on_step_end(args, state, control, **kwargs)
        TimedEMACallback.updates.append(time.perf_counter() - start)


def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def train(size, steps, with_ema, folder):
    features, width, layers = SIZES[size]
    with paddle.utils.unique_name.guard():
        paddle.seed(0)
        model = MLP(features, width, layers)
        args = TrainingArguments(output_dir=folder, device="cpu", amp_master_grad=False, max_steps=steps,
                                 per_device_train_batch_size=4, learning_rate=1e-4, save_strategy="no",
                                 evaluation_strategy="no", logging_steps=10**6, report_to=[], disable_tqdm=True,
                                 save_checkpoint_format=None, load_checkpoint_format=None, sharding="")
        timer = StepTimer()
        callbacks = ([TimedEMACallback(decay=0.999, export_dir=None)] if with_ema else []) + [timer]
        trainer = Trainer(model=model, args=args, train_dataset=Samples(4 * steps, features), callbacks=callbacks)
        trainer.train()
    # from step 2 to step 3 on: wall time, and this process's CPU time (all its threads)
    return list(np.diff(timer.ends)[1:]), list(np.diff(timer.cpu_ends)[1:]), sum(int(p.numel()) for p in model.parameters())


def main(size, rounds, steps):
    paddle.set_device("cpu")
    import logging

    logging.getLogger("PaddleFormers").setLevel(logging.ERROR)
    times, cpu = {False: [], True: []}, {False: [], True: []}
    with tempfile.TemporaryDirectory() as folder:
        for index in range(rounds):
            order = (False, True) if index % 2 == 0 else (True, False)
            for with_ema in order:
                intervals, cpu_intervals, numel = train(size, steps, with_ema, folder)
                times[with_ema].extend(intervals)
                cpu[with_ema].extend(cpu_intervals)
    base, ema = statistics.median(times[False]), statistics.median(times[True])
    cpu_base, cpu_ema = statistics.median(cpu[False]), statistics.median(cpu[True])
    print(json.dumps({
        "size": size, "parameters": numel, "rounds": rounds, "steps": steps, "threads": paddle.get_flags(
            ["FLAGS_paddle_num_threads"]).get("FLAGS_paddle_num_threads"),
        "step_ms_without": round(base * 1e3, 3), "step_ms_with": round(ema * 1e3, 3),
        "added_ms": round((ema - base) * 1e3, 3), "added_percent": round(100 * (ema - base) / base, 2),
        "step_cpu_ms_without": round(cpu_base * 1e3, 3), "step_cpu_ms_with": round(cpu_ema * 1e3, 3),
        "update_ms_median": round(statistics.median(TimedEMACallback.updates) * 1e3, 3),
        "ema_bytes_expected": 2 * 4 * numel, "rss_growth_at_build": TimedEMACallback.built_rss,
    }))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
