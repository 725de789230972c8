"""Progress output: a tqdm bar on a terminal, periodic plain lines otherwise; the summary table."""

import io
import re

from paddle_ema.engine.progress import Progress
from paddle_ema.engine.report import summary_table


def test_plain_lines_every_log_iter_and_at_epoch_end():
    stream = io.StringIO()
    progress = Progress(total_steps=10, done_steps=0, log_iter=3, stream=stream, use_bar=False)
    for i in range(5):
        progress.step(0, 2, i, 5, 16, {"loss": 0.5, "lr": 0.1})
    lines = stream.getvalue().splitlines()
    pattern = r"epoch 1/2 iter (\d)/5 loss 0\.5000 lr 0\.1000 [0-9.]+ it/s \d+ img/s eta \d:\d\d:\d\d"
    assert [re.match(pattern, line).group(1) for line in lines] == ["3", "5"]


def test_bar_shows_epoch_loss_and_throughput():
    stream = io.StringIO()
    progress = Progress(total_steps=4, done_steps=1, log_iter=100, stream=stream, use_bar=True)
    for i in range(3):
        progress.step(1, 2, i, 3, 8, {"loss": 0.25})
    progress.close()
    text = stream.getvalue()
    assert "epoch 2/2" in text and "loss 0.2500" in text and "img/s" in text and "4/4" in text


def test_summary_table_names_best_raw_and_best_ema():
    history = [
        {"epoch": 0, "raw_acc": 0.80, "ema_acc": 0.85, "distance": 0.1},
        {"epoch": 1, "raw_acc": 0.90, "ema_acc": 0.84, "distance": 0.05},
    ]
    lines = summary_table(history)
    assert lines[2].split() == ["1", "0.8000", "0.8500", "+0.0500", "0.1"]
    assert "best raw acc 0.9000 (epoch 2)" in lines and "best EMA acc 0.8500 (epoch 1)" in lines
    assert summary_table([{"epoch": 0, "raw_acc": 0.5}])[-1] == "best raw acc 0.5000 (epoch 1)"


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_rate_and_eta_measure_training_steps_only():
    """A 50 s first step (a kernel build) and a 30 s snapshot between epochs leave rate and ETA
    at the steps' own 0.5 s: 2 it/s, and 10 steps left take 0:00:05."""
    stream, clock = io.StringIO(), _Clock()
    progress = Progress(total_steps=20, done_steps=0, log_iter=5, stream=stream, use_bar=False, clock=clock)
    clock.now += 50.0
    progress.step(0, 2, 0, 10, 4, {"loss": 1.0})
    for i in range(1, 10):
        clock.now += 0.5
        progress.step(0, 2, i, 10, 4, {"loss": 1.0})
    with progress.paused():
        clock.now += 30.0  # evaluation and checkpoints
    clock.now += 0.5
    progress.step(1, 2, 0, 10, 4, {"loss": 1.0})
    assert progress.timed_steps == 9 and progress.rate() == 2.0
    last = stream.getvalue().splitlines()[-1]
    assert last.endswith("2.0 it/s 8 img/s eta 0:00:05"), last
