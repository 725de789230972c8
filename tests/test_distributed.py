"""Data-parallel EMA across processes: paddle.distributed.launch on CPU over gloo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_ema import EMAStateError, ExponentialMovingAverage
from paddle_ema.sharding import partition
from processes import free_port

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "workers" / "ema_dataparallel.py"
STEPS = 6



def launch(out, mode, nproc, *extra):
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(out), mode, str(STEPS), *extra]
    else:
        cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc),
               "--log_dir", str(out / "log"), "--start_port", str(free_port()),
               str(WORKER), str(out), mode, str(STEPS), *extra]
    result = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=240)
    logs = "".join(p.read_text(errors="replace")[-3000:] for p in sorted((out / "log").glob("workerlog.*"))) if nproc > 1 else ""
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{logs}"
    ranks = []
    for rank in range(nproc):
        data = np.load(out / f"rank{rank}.npz")
        meta = json.loads(str(data["meta"]))
        meta["applied"] = {k[len("applied/"):]: data[k] for k in data.files if k.startswith("applied/")}
        meta["raw"] = {k[len("raw/"):]: data[k] for k in data.files if k.startswith("raw/")}
        ranks.append(meta)
    return ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    return {
        "shard2": launch(base / "shard2", "shard", 2),
        "plain2": launch(base / "plain2", "plain", 2),
        "nobn2": launch(base / "nobn2", "plain", 2, "nobn"),
        "nobn1": launch(base / "nobn1", "plain", 1, "nobn"),
        "dirs": base,
    }


def test_partition_is_balanced_disjoint_and_covering():
    sizes = [2359296, 1024, 589824, 64, 64, 147456, 1000, 512000, 7, 36864]
    for world in (1, 2, 3, 4, 16):
        owners = partition(sizes, world)
        loads = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(world)]
        assert sum(loads) == sum(sizes) and all(0 <= o < world for o in owners)
        # Largest-first greedy: no rank exceeds the ideal share by more than the largest tensor.
        assert max(loads) <= sum(sizes) / world + max(sizes)
    assert partition([5, 3, 3, 1], 2) == [0, 1, 1, 0]  # 5+1 | 3+3


def test_shards_are_disjoint_and_cover_every_parameter(runs):
    owned = [set(rank["owned"]) for rank in runs["shard2"]]
    assert owned[0] and owned[1] and not owned[0] & owned[1]
    assert owned[0] | owned[1] == set(runs["shard2"][0]["names"])
    assert all(set(rank["owned"]) == set(rank["names"]) for rank in runs["plain2"])


def test_ema_agrees_across_ranks_and_restores_exactly(runs):
    for key in ("shard2", "plain2"):
        first, second = runs[key]
        assert first["restored_exactly"] and second["restored_exactly"]
        # Averaged weights only: BatchNorm's running statistics are each rank's own live state.
        for name in first["names"]:
            assert np.array_equal(first["applied"][name], second["applied"][name]), (key, name)


def test_sharded_equals_unsharded_bitwise(runs):
    for name in runs["plain2"][0]["names"]:
        assert np.array_equal(runs["shard2"][0]["applied"][name], runs["plain2"][0]["applied"][name]), name


def test_two_processes_match_one_process(runs):
    one, two = runs["nobn1"][0], runs["nobn2"][0]
    for name in one["names"]:
        np.testing.assert_allclose(two["applied"][name], one["applied"][name], rtol=1e-4, atol=1e-5)
    assert any(not np.allclose(one["applied"][n], one["raw"][n]) for n in one["names"])


def test_only_rank_zero_wrote_the_state_and_it_resumes_in_one_process(runs):
    for key in ("shard2", "plain2"):
        assert sorted(p.name for p in (runs["dirs"] / key).iterdir() if p.suffix == ".pd") == ["ema_state.pd"]
    sys.path.insert(0, str(WORKER.parent))
    try:
        from ema_dataparallel import Net
    finally:
        sys.path.pop(0)
    state = paddle.load(str(runs["dirs"] / "shard2" / "ema_state.pd"))
    ema = ExponentialMovingAverage(Net(), 0.9, thres_steps=True)
    ema.set_state_dict(state)
    assert ema.num_updates == STEPS
    for name in ema.names:
        assert np.array_equal(ema.average(name).numpy(), runs["shard2"][0]["applied"][name]), name


def test_sharded_ema_in_one_process_owns_everything_and_names_owners():
    layer = paddle.nn.Linear(3, 3)
    ema = ExponentialMovingAverage(layer, 0.9, shard=True)
    assert ema.is_sharded and len(ema._owned) == 2
    ema.update()
    with ema.apply():
        assert np.array_equal(layer.weight.numpy(), ema.average("weight").numpy())
    ema._sharding.owners[0] = 1  # as if another rank owned it
    ema._shadows[0] = None
    with pytest.raises(EMAStateError, match="kept on rank 1"):
        ema.average("weight")
