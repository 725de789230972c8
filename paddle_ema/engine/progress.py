"""Training progress: a tqdm bar (ETA, loss, throughput) on a terminal, plain log lines otherwise.

Rate and ETA measure training steps only. Not timed: the first step of a run (warm-up: Paddle's
first kernels, a first build of the fused EMA kernel), the first step after an epoch change
(its interval holds the snapshot: evaluation, checkpoints), and anything inside `paused()`.

On a terminal the line is fitted to its width: the fields in the order of the plain lines (epoch,
iter, loss, lr, ema_decay, img/s, eta), as many whole fields as fit, then the bar itself when at
least MIN_BAR columns are left. Nothing is cut inside a field.
"""

import contextlib
import os
import sys
import time
from typing import List

__all__ = ["Progress"]

# The narrowest bar worth drawing, and the width assumed where a terminal reports none.
MIN_BAR = 10
DEFAULT_COLUMNS = 100
_BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}|"


def _clock(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _terminal_size(stream):
    """(columns, lines) of the terminal `stream` writes to, COLUMNS/LINES first; 0 where unknown
    (a pseudo-terminal that was given no size reports 0 too)."""
    try:
        size = os.get_terminal_size(stream.fileno())
        columns, lines = size.columns, size.lines
    except (AttributeError, OSError, ValueError):
        columns, lines = 0, 0
    for name in ("COLUMNS", "LINES"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            if name == "COLUMNS":
                columns = int(value)
            else:
                lines = int(value)
    return columns, lines


def fit_fields(fields: List[str], columns: int) -> str:
    """The leading whole fields that fit in a width.

    Args:
        fields: the texts to show, in order.
        columns: the width.

    Returns:
        As many leading fields as fit in `columns`, joined by spaces; never a field cut short.
    """
    line = ""
    for field in fields:
        longer = f"{line} {field}" if line else field
        if len(longer) > columns:
            break
        line = longer
    return line


class Progress:
    def __init__(self, total_steps, done_steps, log_iter, stream=None, use_bar=None, clock=time.perf_counter):
        self.stream = stream or sys.stderr
        self.total, self.done, self.log_iter = total_steps, done_steps, log_iter
        self.clock = clock
        self.timed_steps, self.timed_seconds = 0, 0.0
        self._last, self._last_epoch, self._skip_next = None, None, False
        use_bar = self.stream.isatty() if use_bar is None else use_bar
        self.bar = None
        if use_bar:
            from tqdm import tqdm

            # The width is this class's (see columns()); tqdm gets it on every step. A terminal
            # that reports no rows would make tqdm draw nothing.
            lines = _terminal_size(self.stream)[1]
            self.bar = tqdm(total=total_steps, initial=done_steps, file=self.stream, unit="it",
                            dynamic_ncols=False, ncols=self.columns(), nrows=lines or 24, bar_format="{desc}")

    def columns(self):
        """The width the bar's line is fitted to: the terminal's, or DEFAULT_COLUMNS where unknown."""
        return _terminal_size(self.stream)[0] or DEFAULT_COLUMNS

    @contextlib.contextmanager
    def paused(self):
        """Work between steps that is not training (evaluation, saving): kept out of rate and ETA."""
        try:
            yield
        finally:
            self._skip_next = True

    def _time_step(self, epoch):
        now = self.clock()
        timed = self._last is not None and epoch == self._last_epoch and not self._skip_next
        if timed:
            self.timed_steps += 1
            self.timed_seconds += now - self._last
        self._last, self._last_epoch, self._skip_next = now, epoch, False
        return timed

    def rate(self):
        """Training steps per second, over the timed steps (0.0 before the first)."""
        return self.timed_steps / self.timed_seconds if self.timed_seconds > 0 else 0.0

    def step(self, epoch, epochs, iteration, iterations, batch_size, values):
        """Record one finished iteration; `values` are shown as name=value."""
        self.done += 1
        timed = self._time_step(epoch)
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        head = [f"epoch {epoch + 1}/{epochs}", f"iter {iteration + 1}/{iterations}",
                *(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())]
        tail = [f"{rate * batch_size:.0f} img/s", f"eta {_clock(eta)}"]
        if self.bar is not None:
            self._draw(head + tail, timed)
        elif (iteration + 1) % self.log_iter == 0 or iteration + 1 == iterations:
            print(" ".join(head + [f"{rate:.1f} it/s"] + tail), file=self.stream, flush=True)

    def _draw(self, fields, timed):
        columns = self.columns()
        line = fit_fields(fields, columns)
        room = columns - len(line) - len(" 100%||")
        self.bar.ncols = columns
        self.bar.bar_format = _BAR_FORMAT if room >= MIN_BAR and len(line) == len(" ".join(fields)) else "{desc}"
        self.bar.set_description_str(line, refresh=False)
        if not timed:
            self.bar.unpause()  # tqdm's own clock skips the interval up to now
        self.bar.update(1)

    def write(self, line):
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
