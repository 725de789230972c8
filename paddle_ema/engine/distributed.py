"""Data-parallel training under `python -m paddle.distributed.launch --nproc_per_node N tools/train.py`.

What the trainer needs to know and do when it is one of N processes:
- its part of every batch: `TrainReader.batch_size` is the GLOBAL batch (unlike PaddleDetection,
  where it is per GPU), cut into N contiguous parts; the epoch's order still depends on
  (seed, epoch) alone, so the same config trains on the same batches, in the same number of steps,
  with any N, and a checkpoint resumes with a different N on the same schedule;
- the gradient of the global batch's mean loss: each rank scales its mean loss by its share of the
  batch, so DataParallel's average over ranks is the global mean even when parts are uneven;
- the same non-trained state everywhere: DataParallel averages gradients only, so each rank's
  BatchNorm running statistics follow its own part of the batch. They are averaged across ranks
  after every step (one small all_reduce), before the EMA reads them. Their update is linear, so
  averaging every step gives the same statistics as averaging once at the end; and every rank then
  holds identical weights, so every rank's EMA (or shard of it) sees the same numbers;
- evaluation on its part of the test set, with the counts summed over ranks.
Only rank 0 writes (checkpoints, VisualDL, curves, the summary); collective calls (the sharded
EMA's apply/state_dict, evaluation) are made by every rank.

Set PADDLE_EMA_DUMP_DIR to have every rank write, at each snapshot, the EMA and raw weights it
holds, the names whose average it keeps and its evaluation counts (`dump_snapshot`), for tests
and debugging; nothing is written otherwise.
"""

import json
import os

import numpy as np
import paddle

from .. import kernels
from ..core.selection import batchnorm_statistic_names
from ..errors import ConfigError
from .data import ArrayDataset
from .evaluation import num_correct, predict

__all__ = ["Parallel", "SilentProgress", "DUMP_ENV", "dump_snapshot"]

DUMP_ENV = "PADDLE_EMA_DUMP_DIR"


class Parallel:
    """This process's place among the launched ones (world_size 1 without a launcher)."""

    def __init__(self, cfg, num_train, batch_size, drop_last):
        import paddle.distributed as dist

        self.world_size = dist.get_world_size()
        if self.world_size > 1:
            if cfg["device"].startswith("gpu:"):
                raise ConfigError(f"device: {cfg['device']!r} puts every launched process on the same GPU; "
                                  "use device: gpu (each process takes the GPU the launcher assigns it)")
            self._check_batches(num_train, batch_size, drop_last)
            dist.init_parallel_env()
        self.rank = dist.get_rank() if self.world_size > 1 else 0
        self.is_main = self.rank == 0
        self.evaluations = []  # (correct, total) of each evaluate() since the last dump

    def _check_batches(self, num_train, batch_size, drop_last):
        # The batch size is the global one and every process needs a sample of every batch.
        n = self.world_size
        if batch_size < n:
            raise ConfigError(f"TrainReader.batch_size {batch_size} cannot be split over {n} processes: it is the "
                              f"global batch, so it must be at least {n}")
        tail = 0 if drop_last else num_train % batch_size
        if 0 < tail < n:
            raise ConfigError(f"the last batch of each epoch ({num_train} % {batch_size} = {tail} samples) cannot be "
                              f"split over {n} processes; set TrainReader.drop_last: true or another batch_size")

    def wrap(self, model):
        """The model to train: paddle.DataParallel (gradients averaged over ranks) when launched."""
        return paddle.DataParallel(model) if self.world_size > 1 else model

    def part(self, indices):
        """This rank's contiguous part of a global batch (sizes differ by at most one)."""
        if self.world_size == 1:
            return indices
        return np.array_split(indices, self.world_size)[self.rank]

    def loss_scale(self, part_size, batch_size):
        """Factor on this rank's mean loss so that the average over ranks is the batch's mean loss."""
        return part_size * self.world_size / batch_size

    @paddle.no_grad()
    def sync_running_stats(self, model):
        """Average the running statistics of the BatchNorm layers (selection.batchnorm_statistic_names) over ranks.

        Only those: frozen weights are equal on every rank already, and a sum of N equal values
        divided by N is not always the value again in floating point (N = 3), so they are left alone.
        """
        if self.world_size == 1:
            return
        import paddle.distributed as dist

        statistics = batchnorm_statistic_names(model)
        tensors = [p for name, p in model.named_parameters() if name in statistics and paddle.is_floating_point(p)]
        by_dtype = {}
        for tensor in tensors:
            by_dtype.setdefault(str(tensor.dtype), []).append(tensor)
        for group in by_dtype.values():
            flat = paddle.concat([t.reshape([-1]) for t in group])
            dist.all_reduce(flat)
            flat = flat / self.world_size
            pieces = paddle.split(flat, [int(t.numel()) for t in group])
            kernels.copy_(group, [p.reshape(t.shape) for p, t in zip(pieces, group)])

    def evaluate(self, model, dataset, batch_size):
        """Top-1 accuracy on the whole of `dataset`: each rank predicts its part, the counts are summed."""
        start, stop = _bounds(len(dataset), self.world_size, self.rank)
        was_training = model.training
        correct = 0
        if stop > start:
            part = ArrayDataset(dataset.images[start:stop], dataset.labels[start:stop], dataset.num_classes,
                                dataset.scale, dataset.mean, dataset.std)
            correct = num_correct(predict(model, part, batch_size), part.labels)
        if was_training:
            model.train()
        counts = [correct, stop - start]
        if self.world_size > 1:
            import paddle.distributed as dist

            summed = paddle.to_tensor(np.array(counts, dtype="int64"))
            dist.all_reduce(summed)
            counts = [int(v) for v in summed.numpy()]
        self.evaluations.append(counts)
        return counts[0] / counts[1]


def _bounds(n, world_size, rank):
    sizes = [n // world_size + (r < n % world_size) for r in range(world_size)]
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


class SilentProgress:
    """The progress display of ranks other than 0: they train in step and show nothing."""

    def step(self, *args):
        pass

    def write(self, line):
        pass

    def close(self):
        pass


def dump_snapshot(parallel, epoch, weights, raw, ema):
    """With PADDLE_EMA_DUMP_DIR set: <dir>/rank<r>_epoch<e>.npz with this rank's view of a snapshot."""
    folder = os.environ.get(DUMP_ENV)
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    meta = {"rank": parallel.rank, "world_size": parallel.world_size, "epoch": epoch,
            "evaluations": parallel.evaluations, "owned": getattr(ema, "owned_names", None),
            "averaged": getattr(ema, "names", None)}
    arrays = {f"ema/{k}": v.numpy() for k, v in weights.items()}
    arrays.update({f"raw/{k}": v.numpy() for k, v in raw.items()})
    np.savez(os.path.join(folder, f"rank{parallel.rank}_epoch{epoch}.npz"), meta=json.dumps(meta), **arrays)
    parallel.evaluations = []
