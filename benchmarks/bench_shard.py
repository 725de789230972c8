"""Shadow memory per rank and the cost of one gather, for a sharded EMA of ResNet-50.

    python benchmarks/bench_shard.py [--nprocs 1 2 4] [--repeats 5] [--json FILE]

For each process count it launches `paddle.distributed.launch` (CPU/gloo here, GPU/NCCL where
Paddle is a CUDA build), builds ResNet-50 on every rank, and measures with shard=True and without:
the bytes of shadow each rank keeps, and the median time of apply()+restore() (the owner broadcast
that makes the averages whole, plus the local swap back) and of state_dict() (the gather before a
save). Memory is counted from the shadow tensors themselves, not from the process size.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reporting import write_json

ROOT = Path(__file__).resolve().parents[1]


def worker(out, repeats):
    import paddle
    import paddle.distributed as dist

    from paddle_ema import ExponentialMovingAverage

    world = dist.get_world_size()
    if world > 1:
        dist.init_parallel_env()
    rank = dist.get_rank()
    paddle.seed(0)
    model = paddle.vision.models.resnet50()
    results = {}
    for shard in (False, True):
        ema = ExponentialMovingAverage(model, 0.9998, shard=shard)
        ema.update()
        owned = sum(int(ema._shadows[i].numel()) * ema._shadows[i].element_size() for i in ema._owned)
        timings = {"apply_restore": [], "state_dict": []}
        for _ in range(repeats + 1):  # the first round warms up
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            ema.apply()
            ema.restore()
            timings["apply_restore"].append(time.perf_counter() - start)
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            ema.state_dict()
            timings["state_dict"].append(time.perf_counter() - start)
        results["shard" if shard else "full"] = {
            "bytes": owned,
            "tensors": len(ema._owned),
            **{k: statistics.median(v[1:]) for k, v in timings.items()},
        }
    with open(Path(out) / f"rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "world": world, **results}, f)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc, repeats):
    out = Path(tempfile.mkdtemp(prefix=f"bench_shard{nproc}_"))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    script = [str(Path(__file__).resolve()), "--worker", str(out), "--repeats", str(repeats)]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc),
               "--log_dir", str(out / "log"), "--start_port", str(free_port()), *script]
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=out)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.repeats)
        return
    rows = []
    for nproc in args.nprocs:
        ranks = run(nproc, args.repeats)
        full = ranks[0]["full"]["bytes"]
        rows.append({
            "processes": nproc,
            "full_bytes_per_rank": full,
            "shard_bytes_per_rank": [r["shard"]["bytes"] for r in ranks],
            "apply_restore_ms": max(r["shard"]["apply_restore"] for r in ranks) * 1e3,
            "state_dict_ms": max(r["shard"]["state_dict"] for r in ranks) * 1e3,
            "apply_restore_unsharded_ms": max(r["full"]["apply_restore"] for r in ranks) * 1e3,
        })
    print("ResNet-50 EMA shadow (float32), per rank; times are the median over repeats, slowest rank")
    print("| processes | unsharded MiB/rank | sharded MiB/rank (max, min) | max/ideal | apply+restore ms sharded | unsharded | state_dict ms sharded |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        shards = row["shard_bytes_per_rank"]
        ideal = row["full_bytes_per_rank"] / row["processes"]
        print(f"| {row['processes']} | {row['full_bytes_per_rank'] / 2**20:.1f} | "
              f"{max(shards) / 2**20:.1f}, {min(shards) / 2**20:.1f} | {max(shards) / ideal:.3f} | "
              f"{row['apply_restore_ms']:.1f} | {row['apply_restore_unsharded_ms']:.1f} | {row['state_dict_ms']:.1f} |")
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
