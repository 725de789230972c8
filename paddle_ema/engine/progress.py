"""Training progress: a tqdm bar (ETA, loss, throughput) on a terminal, plain log lines otherwise.

Rate and ETA measure training steps only. Not timed: the first step of a run (warm-up: Paddle's
first kernels, a first build of the fused EMA kernel), the first step after an epoch change
(its interval holds the snapshot: evaluation, checkpoints), and anything inside `paused()`.
"""

import contextlib
import shutil
import sys
import time

__all__ = ["Progress"]


def _clock(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


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

            # A pseudo-terminal without a size reports 0 columns and rows, where tqdm draws nothing.
            size = shutil.get_terminal_size((0, 0))
            sized = size.columns > 0 and size.lines > 0
            self.bar = tqdm(total=total_steps, initial=done_steps, file=self.stream, unit="it",
                            dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 24)

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
        text = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_description(f"epoch {epoch + 1}/{epochs}", refresh=False)
            self.bar.set_postfix_str(f"{text} {rate * batch_size:.0f} img/s", refresh=False)
            if not timed:
                self.bar.unpause()  # tqdm's own rate and ETA skip the interval up to now
            self.bar.update(1)
        elif (iteration + 1) % self.log_iter == 0 or iteration + 1 == iterations:
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            print(f"epoch {epoch + 1}/{epochs} iter {iteration + 1}/{iterations} {text} "
                  f"{rate:.1f} it/s {rate * batch_size:.0f} img/s eta {_clock(eta)}", file=self.stream, flush=True)

    def write(self, line):
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
