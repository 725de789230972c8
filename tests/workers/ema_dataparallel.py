"""Worker for tests/test_distributed.py: DataParallel training with an EMA, sharded or not.

    python -m paddle.distributed.launch --nproc_per_node N ema_dataparallel.py OUT {shard,plain} STEPS [nobn]

Every run sees the same global batches (rank r takes rows r::N of each). Without BatchNorm (`nobn`),
runs with different N then differ only by float32 summation order; with it, each rank normalises
with its own half batch. Each rank writes OUT/rank{r}.npz (owned names, the EMA
weights as applied, the raw weights); rank 0 writes OUT/ema_state.pd.
"""

import json
import sys

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn.functional as F

from paddle_ema import ExponentialMovingAverage


class Net(paddle.nn.Layer):
    def __init__(self, batch_norm=True):
        super().__init__()
        self.conv = paddle.nn.Conv2D(1, 6, 3, padding=1)
        self.bn = paddle.nn.BatchNorm2D(6) if batch_norm else paddle.nn.Identity()
        self.fc1 = paddle.nn.Linear(6 * 8 * 8, 32)
        self.fc2 = paddle.nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(F.relu(self.bn(self.conv(x))).flatten(1))))


def main(out, mode, steps, batch_norm):
    paddle.set_device("cpu")
    world = dist.get_world_size()
    if world > 1:
        dist.init_parallel_env()
    rank = dist.get_rank()
    paddle.seed(11)
    net = Net(batch_norm)
    model = paddle.DataParallel(net) if world > 1 else net
    ema = ExponentialMovingAverage(model, 0.9, thres_steps=True, shard=(mode == "shard"))
    opt = paddle.optimizer.Momentum(learning_rate=0.05, momentum=0.9, parameters=model.parameters())
    rng = np.random.default_rng(5)
    for _ in range(steps):
        x = rng.standard_normal((16, 1, 8, 8)).astype("float32")
        y = rng.integers(0, 10, (16,)).astype("int64")
        loss = F.cross_entropy(model(paddle.to_tensor(x[rank::world])), paddle.to_tensor(y[rank::world]))
        loss.backward()
        opt.step()
        opt.clear_grad()
        ema.update()
    owned = [ema.names[i] for i in ema._owned]
    raw = {n: p.numpy() for n, p in net.named_parameters()}
    with ema.apply():
        applied = {n: p.numpy() for n, p in net.named_parameters()}
    restored_exactly = all(np.array_equal(p.numpy(), raw[n]) for n, p in net.named_parameters())
    state = ema.state_dict()  # collective when sharded: every rank calls it
    if rank == 0:
        paddle.save(state, f"{out}/ema_state.pd")
    np.savez(
        f"{out}/rank{rank}.npz",
        meta=json.dumps({"owned": owned, "names": ema.names, "restored_exactly": restored_exactly, "world": world}),
        **{f"applied/{n}": v for n, v in applied.items()},
        **{f"raw/{n}": v for n, v in raw.items()},
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), batch_norm=sys.argv[4:] != ["nobn"])
