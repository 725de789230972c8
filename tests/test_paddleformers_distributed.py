"""EMACallback under `paddle.distributed.launch` (2 processes, data parallel over gloo).

With shard=True each rank writes its part of the EMA state into every checkpoint; that 2-process
checkpoint is resumed by 1 process, and a 1-process checkpoint by 2 unsharded processes (rank 0
writes); load_ema_weights merges the parts. Every
average is checked against a float64 replay of the raw weights recorded after each step.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("paddleformers", reason="PaddleFormers is installed only in CI's paddleformers leg (.ci/run)")

import json  # noqa: E402

from processes import free_port  # noqa: E402
from test_paddleformers import assert_bitwise, assert_close, fold, numpy_weights  # noqa: E402
from paddle_ema.integrations.paddleformers import load_ema_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "workers" / "paddleformers_train.py"
sys.path.insert(0, str(WORKER.parent))
import paddleformers_train as worker  # noqa: E402


def launch(config):
    out = Path(config["out"])
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(out / "log"),
           "--start_port", str(free_port()), str(WORKER), json.dumps(config)]
    result = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=300)
    logs = "".join(p.read_text(errors="replace")[-3000:] for p in sorted((out / "log").glob("workerlog.*")))
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}\n{logs}"
    return [worker.read_rank(out, rank) for rank in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("pfdist")
    # The same global batch of 8: 4 per rank on 2 processes, 8 on one.
    two = dict(out=str(base / "two"), batch=4, shard=True, keep=[6], keep_dir=str(base / "two"))
    one = dict(out=str(base / "one"), batch=8, keep=[6], keep_dir=str(base / "one"))
    found = {"base": base, "two": launch(two)}
    for key, config in {"one": one, "one_from_two": {**one, "out": str(base / "one_from_two"), "keep": [],
                                                     "resume": str(base / "two" / "checkpoint-6")}}.items():
        os.makedirs(config["out"])
        worker.run(config)
        found[key] = [worker.read_rank(config["out"])]
    # The reverse without sharding: rank 0 alone writes the state.
    found["two_from_one"] = launch({**two, "out": str(base / "two_from_one"), "keep": [], "shard": False,
                                    "resume": str(base / "one" / "checkpoint-6")})
    return found


def test_each_rank_writes_the_part_it_keeps_into_every_checkpoint(runs):
    ranks = runs["two"]
    owned = [set(meta["owned"]) for meta, _, _ in ranks]
    assert owned[0] and owned[1] and not owned[0] & owned[1] and owned[0] | owned[1] == set(ranks[0][0]["names"])
    for checkpoint in (runs["base"] / "two" / "checkpoint-6", runs["base"] / "two" / "run" / "checkpoint-12"):
        files = sorted(p.name for p in checkpoint.glob("paddle_ema_state*"))
        assert files == ["paddle_ema_state.00000-of-00002.npz", "paddle_ema_state.00001-of-00002.npz"]
        for rank, name in enumerate(files):
            with np.load(checkpoint / name) as data:
                assert set(json.loads(str(data["meta"]))["owned"]) == owned[rank]
                assert len([k for k in data.files if k.startswith("average_")]) == len(owned[rank])


def test_the_sharded_ema_equals_the_float64_fold_and_the_export(runs):
    (meta0, steps0, final0), (meta1, steps1, final1) = runs["two"]
    for step in range(13):  # data parallel: both ranks hold the same weights after every step
        assert_bitwise(steps1[step], steps0[step])
    assert meta0["num_updates"] == meta1["num_updates"] == 12
    two = runs["base"] / "two"
    assert_close(numpy_weights(load_ema_weights(two / "checkpoint-6")), fold(steps0, 1, 6))
    final = numpy_weights(load_ema_weights(two / "run" / "checkpoint-12"))
    assert_close(final, fold(steps0, 1, 12))
    # The export gathered every shard (apply() is collective) into the files rank 0 wrote.
    import paddle

    assert_bitwise(numpy_weights(paddle.load(str(two / "run" / "ema" / "model_state.pdparams"))), final)
    # Both ranks evaluated the EMA weights (the gather of the shards) and report the same numbers.
    for e0, e1 in zip(meta0["evaluations"], meta1["evaluations"]):
        assert e0["eval_ema_loss"] == e1["eval_ema_loss"]
        np.testing.assert_allclose(e0["eval_ema_loss"], worker.loss64(fold(steps0, 1, e0["step"])), rtol=2e-6)


def test_a_two_process_checkpoint_resumes_in_one_process(runs):
    two_state = numpy_weights(load_ema_weights(runs["base"] / "two" / "checkpoint-6"))
    meta, steps, _ = runs["one_from_two"][0]
    assert_bitwise(steps[6], runs["two"][0][1][6])  # the trainer resumed the 2-process weights
    assert meta["num_calls"] == meta["num_updates"] == 12
    # The average goes on from the merged 2-process state, with the schedule's step t = 6, 7, ...
    resumed = numpy_weights(load_ema_weights(runs["base"] / "one_from_two" / "run" / "checkpoint-12"))
    assert_close(resumed, fold(steps, 7, 12, start=two_state, calls=6))


def test_a_one_process_checkpoint_resumes_on_two_processes(runs):
    one_state = numpy_weights(load_ema_weights(runs["base"] / "one" / "checkpoint-6"))
    assert_close(one_state, fold(runs["one"][0][1], 1, 6))
    (meta0, steps0, _), (meta1, steps1, _) = runs["two_from_one"]
    assert meta0["num_updates"] == meta1["num_updates"] == 12
    assert meta0["owned"] == meta1["owned"] == meta0["names"]  # unsharded: each rank keeps every average
    checkpoint = runs["base"] / "two_from_one" / "run" / "checkpoint-12"
    assert sorted(p.name for p in checkpoint.glob("paddle_ema_state*")) == ["paddle_ema_state.00000-of-00001.npz"]
    assert_bitwise(steps1[12], steps0[12])
    assert_close(numpy_weights(load_ema_weights(checkpoint)), fold(steps0, 7, 12, start=one_state, calls=6))
