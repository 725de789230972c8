"""What a run reports: VisualDL scalars, the end-of-run summary table and a PNG of the curves."""

import logging
import os
from typing import Any, Dict, List, Optional

from ..infra.checkpoint import atomic_write

__all__ = ["ScalarLog", "summary_table", "output_lines", "plot_curves", "TAGS"]

TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "decay": "ema/decay",
    "raw_acc": "eval/raw_acc",
    "ema_acc": "eval/ema_acc",
    "swa_acc": "eval/swa_acc",
    "distance": "ema/relative_distance",
}


class ScalarLog:
    """Scalars kept in memory (for the table and plot) and, with a log dir, written to VisualDL."""

    def __init__(self, vdl_log_dir=None):
        self.series = {tag: [] for tag in TAGS.values()}
        self.logdir = vdl_log_dir or None
        self.writer = None
        if vdl_log_dir:
            from visualdl import LogWriter

            self.writer = LogWriter(logdir=vdl_log_dir)

    def add(self, key, step, value):
        if value is None:
            return
        tag = TAGS[key]
        self.series[tag].append((int(step), float(value)))
        if self.writer is not None:
            self.writer.add_scalar(tag=tag, step=int(step), value=float(value))

    def state_dict(self):
        return {tag: list(points) for tag, points in self.series.items()}

    def set_state_dict(self, state):
        for tag, points in state.items():
            self.series[tag] = [tuple(p) for p in points]

    def close(self):
        if self.writer is not None:
            self.writer.close()


def summary_table(history):
    """Lines of a table of the evaluated epochs, then best raw vs best EMA accuracy."""
    if not history:
        return []
    has_ema = any(row.get("ema_acc") is not None for row in history)
    head = f"{'epoch':>5}  {'raw acc':>8}"
    if has_ema:
        head += f"  {'EMA acc':>8}  {'EMA-raw':>8}  {'|ema-raw|/|raw|':>15}"
    lines = [head, "-" * len(head)]
    for row in history:
        line = f"{row['epoch'] + 1:>5}  {row['raw_acc']:>8.4f}"
        if has_ema:
            line += (f"  {row['ema_acc']:>8.4f}  {row['ema_acc'] - row['raw_acc']:>+8.4f}"
                     f"  {row['distance']:>15.4g}")
        if row.get("swa_acc") is not None:
            line += f"  SWA {row['swa_acc']:.4f}"
        lines.append(line)
    best_raw = max(history, key=lambda r: r["raw_acc"])
    lines.append(f"best raw acc {best_raw['raw_acc']:.4f} (epoch {best_raw['epoch'] + 1})")
    if has_ema:
        best_ema = max(history, key=lambda r: r["ema_acc"])
        lines.append(f"best EMA acc {best_ema['ema_acc']:.4f} (epoch {best_ema['epoch'] + 1})")
        final = history[-1]
        lines.append(f"final: raw {final['raw_acc']:.4f}, EMA {final['ema_acc']:.4f}"
                     + (f", SWA {final['swa_acc']:.4f}" if final.get("swa_acc") is not None else ""))
    return lines


def output_lines(run_dir: str, epochs: int, snapshot_epoch: int, has_ema: bool, best: Optional[Dict[str, Any]] = None,
                 curves: Optional[str] = None, vdl_log_dir: Optional[str] = None) -> List[str]:
    """The end-of-run lines that name every output of a run, and say how to get the missing ones.

    Args:
        run_dir: the run folder (<output_dir>/<config name>).
        epochs: the config's `epoch`.
        snapshot_epoch: the config's `snapshot_epoch` (a checkpoint every that many epochs).
        has_ema: whether the run keeps an EMA (then .pdparams hold it and .pdema the raw weights).
        best: the best evaluation row ({'epoch', 'ema_acc' or 'raw_acc'}), None without --eval.
        curves: the path of curves.png, None when none was drawn.
        vdl_log_dir: the VisualDL log folder, None without one.

    Returns:
        Lines "what:  path (note)".
    """
    def path(name):
        return os.path.join(run_dir, name)

    numbered = [str(epoch) for epoch in range(epochs - 1) if (epoch + 1) % snapshot_epoch == 0]
    shown = numbered if len(numbered) <= 3 else numbered[:2] + ["...", numbered[-1]]
    last = path(numbered[-1]) if numbered else path("model_final")
    kind = "EMA weights; the raw weights: model_final.pdema" if has_ema else "the weights"
    lines = [f"final weights:  {path('model_final.pdparams')} ({kind})"]
    if best is not None:
        key = "ema_acc" if has_ema else "raw_acc"
        label = "EMA acc" if has_ema else "acc"
        lines.append(f"best weights:   {path('best_model.pdparams')} (epoch {best['epoch'] + 1}, {label} "
                     f"{best[key]:.4f})")
    else:
        lines.append("best weights:   none (--eval evaluates every snapshot and keeps the best as best_model)")
    names = f"{', '.join(shown)} and model_final" if shown else "model_final"
    lines.append(f"checkpoints:    {names} in {run_dir} (resume: -r {last}, or -r auto for the newest)")
    lines.append(f"curves:         {curves}" if curves else "curves:         none (drawn with --eval or --use_vdl)")
    lines.append(f"VisualDL log:   {vdl_log_dir} (visualdl --logdir {vdl_log_dir})" if vdl_log_dir else
                 "VisualDL log:   none (--use_vdl writes one)")
    return lines


def plot_curves(series, steps_per_epoch, path):
    """Training loss, raw vs EMA accuracy and EMA distance against epochs, saved as a PNG."""
    # On a machine without matplotlib's font cache the first import builds it and logs that at INFO,
    # which reaches the terminal through the root handler `import paddle` installs at INFO.
    logging.getLogger("matplotlib.font_manager").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))

    def draw(ax, tag, label, per_step=True):
        points = series.get(tag) or []
        if points:
            xs = [s / steps_per_epoch if per_step else s for s, _ in points]
            ax.plot(xs, [v for _, v in points], label=label, marker=None if per_step else "o")

    draw(axes[0], TAGS["loss"], "train loss")
    axes[0].set_title("training loss")
    draw(axes[1], TAGS["raw_acc"], "raw weights")
    draw(axes[1], TAGS["ema_acc"], "EMA weights")
    draw(axes[1], TAGS["swa_acc"], "SWA weights")
    axes[1].set_title("test accuracy")
    draw(axes[2], TAGS["distance"], "|ema - raw| / |raw|")
    axes[2].set_title("EMA vs raw weights")
    for ax in axes:
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    try:  # crash-safe, and never through a link: a failed write keeps the old plot
        atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return path
