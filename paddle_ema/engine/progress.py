"""Training progress: a tqdm bar (ETA, loss, throughput) on a terminal, plain log lines otherwise."""

import shutil
import sys
import time

__all__ = ["Progress"]


def _clock(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total_steps, done_steps, log_iter, stream=None, use_bar=None):
        self.stream = stream or sys.stderr
        self.total, self.done, self.log_iter = total_steps, done_steps, log_iter
        self.start_done, self.start_time = done_steps, time.perf_counter()
        use_bar = self.stream.isatty() if use_bar is None else use_bar
        self.bar = None
        if use_bar:
            from tqdm import tqdm

            # A pseudo-terminal without a size reports 0 columns and rows, where tqdm draws nothing.
            size = shutil.get_terminal_size((0, 0))
            sized = size.columns > 0 and size.lines > 0
            self.bar = tqdm(total=total_steps, initial=done_steps, file=self.stream, unit="it",
                            dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 24)

    def step(self, epoch, epochs, iteration, iterations, batch_size, values):
        """Record one finished iteration; `values` are shown as name=value."""
        self.done += 1
        elapsed = time.perf_counter() - self.start_time
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        text = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_description(f"epoch {epoch + 1}/{epochs}", refresh=False)
            self.bar.set_postfix_str(f"{text} {rate * batch_size:.0f} img/s", refresh=False)
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
