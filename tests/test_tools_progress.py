"""Progress output: a tqdm bar on a terminal, periodic plain lines otherwise; the summary table."""

import io
import os
import re

import pytest

from paddle_ema.engine.progress import Progress, fit_fields
from paddle_ema.engine.report import output_lines, summary_table


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
    last = text.replace("\n", "\r").split("\r")[-2]
    assert re.fullmatch(r"epoch 2/2 iter 3/3 loss 0\.2500 \d+ img/s eta 0:00:00 100%\|#+\|", last), last
    assert len(last) == 100  # a stream that is no terminal has no width: the default


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


def _bar_frames(text):
    """The lines a terminal was last shown: tqdm redraws with carriage returns."""
    return [frame for frame in text.replace("\n", "\r").split("\r") if frame.strip()]


def _train_on(stream, epochs=2, iterations=85, decay=0.9883):
    clock = _Clock()
    progress = Progress(total_steps=epochs * iterations, done_steps=0, log_iter=20, stream=stream, clock=clock)
    for epoch in range(epochs):
        for i in range(iterations):
            clock.now += 1 / 160  # 160 it/s, batches of 16: 2560 img/s
            progress.step(epoch, epochs, i, iterations, 16, {"loss": 0.0372, "lr": 0.08, "ema_decay": decay})
    progress.close()
    return progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


FIELDS_80 = "epoch 2/2 iter 85/85 loss 0.0372 lr 0.0800 ema_decay 0.9883 2560 img/s"


@pytest.mark.parametrize("columns", [80, 120])
def test_bar_fits_the_terminal_width_with_whole_fields(monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    stream = _Terminal()
    _train_on(stream)
    frames = _bar_frames(stream.getvalue())
    assert frames and all(len(frame) <= columns for frame in frames), max(frames, key=len)
    last = frames[-1]
    if columns == 80:
        # epoch, iter, loss, lr, ema_decay and img/s fit; the ETA and the bar do not, and are left out whole
        assert last == FIELDS_80, last
    else:
        assert re.fullmatch(re.escape(FIELDS_80 + " eta 0:00:00 100%|") + r"#{31}\|", last) and len(last) == 120, last


def test_bar_on_a_pseudo_terminal_reads_its_width(monkeypatch):
    """The width comes from the terminal itself (TIOCSWINSZ on a pty) when COLUMNS is not set."""
    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios
    import threading

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    chunks = []

    def read():
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    with os.fdopen(slave, "w", encoding="utf-8") as stream:
        progress = _train_on(stream)
        assert progress.columns() == 80
    reader.join(timeout=10)
    os.close(master)
    frames = _bar_frames(b"".join(chunks).decode("utf-8"))
    assert frames[-1] == FIELDS_80 and all(len(frame) <= 80 for frame in frames)


def test_fields_are_never_cut_inside():
    fields = ["epoch 1/2", "iter 3/4", "loss 0.5000"]
    assert fit_fields(fields, 19) == "epoch 1/2 iter 3/4"
    assert fit_fields(fields, 17) == "epoch 1/2"
    assert fit_fields(fields, 30) == "epoch 1/2 iter 3/4 loss 0.5000"
    assert fit_fields(fields, 5) == ""


def test_outputs_named_with_eval_and_vdl():
    run = os.path.join("output", "lenet_digits")
    lines = output_lines(run, epochs=12, snapshot_epoch=1, has_ema=True, best={"epoch": 5, "ema_acc": 0.98},
                         curves=os.path.join(run, "curves.png"), vdl_log_dir=os.path.join(run, "vdl"))
    assert lines == [
        "final weights:  output/lenet_digits/model_final.pdparams (EMA weights; the raw weights: model_final.pdema)",
        "best weights:   output/lenet_digits/best_model.pdparams (epoch 6, EMA acc 0.9800)",
        "checkpoints:    0, 1, ..., 10 and model_final in output/lenet_digits "
        "(resume: -r output/lenet_digits/10, or -r auto for the newest)",
        "curves:         output/lenet_digits/curves.png",
        "VisualDL log:   output/lenet_digits/vdl (visualdl --logdir output/lenet_digits/vdl)",
    ]


def test_outputs_named_without_eval_say_what_writes_the_missing_ones():
    lines = output_lines("out/run", epochs=6, snapshot_epoch=2, has_ema=False)
    assert lines == [
        "final weights:  out/run/model_final.pdparams (the weights)",
        "best weights:   none (--eval evaluates every snapshot and keeps the best as best_model)",
        "checkpoints:    1, 3 and model_final in out/run (resume: -r out/run/3, or -r auto for the newest)",
        "curves:         none (drawn with --eval or --use_vdl)",
        "VisualDL log:   none (--use_vdl writes one)",
    ]
    assert output_lines("r", epochs=1, snapshot_epoch=1, has_ema=False)[2] == (
        "checkpoints:    model_final in r (resume: -r r/model_final, or -r auto for the newest)")
