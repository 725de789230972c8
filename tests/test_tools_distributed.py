"""tools/train.py under `python -m paddle.distributed.launch` on CPU/gloo: the default config, one epoch.

Launches (about 5 s each here): A = 2 processes, B = 2 processes with ema_shard, C = 1 process
resuming A's checkpoint for a second epoch, D = 2 sharded processes resuming C's (1-process)
checkpoint for a third. Every rank dumps what it holds at each snapshot (PADDLE_EMA_DUMP_DIR), and
a start-up audit hook (tests/workers/write_audit) records every file each process writes.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_ema.checkpoint import MANIFEST_SUFFIX
from paddle_ema.engine import read_config
from paddle_ema.engine.run_checkpoints import load_weights
from paddle_ema.engine.distributed import DUMP_ENV, Parallel
from paddle_ema.engine.evaluation import evaluate
from paddle_ema.engine.trainer import Trainer, build_datasets, build_model
from paddle_ema.errors import ConfigError
from processes import free_port

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "lenet_digits.yml"
AUDIT = Path(__file__).parent / "workers" / "write_audit"
STEPS_PER_EPOCH = 85  # ceil(1347 / 16): the global batch of 16 is split over the processes
NUM_EVAL = 450



def train(base, name, nproc, *options, resume=None):
    """Run tools/train.py with --eval --use_vdl; returns what the run left behind."""
    run = base / name
    out, dump, audit = run / "output", run / "dump", run / "audit"
    for folder in (out, dump, audit):
        folder.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(AUDIT), DUMP_ENV: str(dump),
           "PADDLE_EMA_AUDIT_DIR": str(audit), "PADDLE_EMA_AUDIT_UNDER": str(out)}
    args = [str(REPO / "tools" / "train.py"), "-c", str(CONFIG), "--eval", "--use_vdl",
            "-o", f"output_dir={out}", *options, *(["-r", str(resume)] if resume else [])]
    if nproc > 1:
        args = ["-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc), "--log_dir", str(run / "log"),
                "--start_port", str(free_port()), *args]
    result = subprocess.run([sys.executable, *args], cwd=run, env=env, capture_output=True, text=True, timeout=240)
    logs = {int(p.name.rsplit(".", 1)[1]): p.read_text(errors="replace") for p in (run / "log").glob("workerlog.*")}
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + "".join(logs.values())[-3000:]
    dumps = {}
    for file in sorted(dump.glob("rank*_epoch*.npz")):
        rank, epoch = map(int, re.match(r"rank(\d+)_epoch(\d+)", file.stem).groups())
        data = np.load(file)
        dumps[rank, epoch] = {"meta": json.loads(str(data["meta"])),
                              **{k: data[k] for k in data.files if k != "meta"}}
    return {"out": out / "lenet_digits", "dumps": dumps, "audit": audit, "nproc": nproc,
            "stdout": logs[0] if nproc > 1 else result.stdout, "logs": logs}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist_tools")
    a = train(base, "A", 2, "epoch=1")
    b = train(base, "B", 2, "epoch=1", "ema_shard=true")
    c = train(base, "C", 1, "epoch=2", resume=a["out"] / "model_final")
    d = train(base, "D", 2, "epoch=3", "ema_shard=true", resume=c["out"] / "model_final")
    return {"A": a, "B": b, "C": c, "D": d}


def load(path):
    return {k: v.numpy() for k, v in paddle.load(str(path)).items()}


def weights(dump, kind):
    return {k.split("/", 1)[1]: v for k, v in dump.items() if k.startswith(kind + "/")}


def assert_same(left, right, what):
    assert sorted(left) == sorted(right), what
    for name in left:
        assert np.array_equal(left[name], right[name]), f"{what}: {name}"


def test_every_rank_holds_the_same_ema_and_weights(runs):
    for key, epoch in (("A", 0), ("B", 0), ("D", 2)):
        first, second = runs[key]["dumps"][0, epoch], runs[key]["dumps"][1, epoch]
        for kind in ("ema", "raw"):  # raw includes BatchNorm statistics, averaged over ranks each step
            assert_same(weights(first, kind), weights(second, kind), f"{key} {kind}")
        # and rank 0 saved what every rank holds
        final = runs[key]["out"] / "model_final"
        assert_same(load(f"{final}.pdparams"), weights(first, "ema"), f"{key} pdparams")
        assert_same(load(f"{final}.pdema"), weights(first, "raw"), f"{key} pdema")
    ema, raw = weights(runs["A"]["dumps"][0, 0], "ema"), weights(runs["A"]["dumps"][0, 0], "raw")
    assert any(not np.array_equal(ema[k], raw[k]) for k in raw)  # the EMA is not the raw weights


def test_shards_are_disjoint_and_cover_every_averaged_tensor(runs):
    for key, epoch in (("B", 0), ("D", 2)):
        meta = [runs[key]["dumps"][rank, epoch]["meta"] for rank in (0, 1)]
        owned = [set(m["owned"]) for m in meta]
        averaged = set(meta[0]["averaged"])
        assert owned[0] and owned[1] and not owned[0] & owned[1]
        assert owned[0] | owned[1] == averaged
        # every parameter and BatchNorm statistic is averaged (ema_include_stop_gradient: true)
        assert averaged == set(weights(runs[key]["dumps"][0, epoch], "raw"))
    for rank in (0, 1):  # unsharded: every rank keeps every average
        meta = runs["A"]["dumps"][rank, 0]["meta"]
        assert meta["owned"] == meta["averaged"]


def test_sharded_and_unsharded_runs_give_bitwise_equal_files(runs):
    a, b = runs["A"]["out"] / "model_final", runs["B"]["out"] / "model_final"
    for suffix in (".pdparams", ".pdema"):
        assert_same(load(f"{a}{suffix}"), load(f"{b}{suffix}"), suffix)
    state_a, state_b = paddle.load(f"{a}.pdopt"), paddle.load(f"{b}.pdopt")
    shadow_a, shadow_b = state_a["ema"]["ema"]["shadow"], state_b["ema"]["ema"]["shadow"]
    assert_same({k: v.numpy() for k, v in shadow_a.items()}, {k: v.numpy() for k, v in shadow_b.items()}, "shadow")
    for key in ("num_updates", "decay_product", "last_decay"):
        assert state_a["ema"]["ema"][key] == state_b["ema"]["ema"][key]
    assert state_a["ema"]["ema"]["num_updates"] == STEPS_PER_EPOCH


def test_only_rank_zero_writes_files(runs):
    for key in ("A", "B", "D"):
        run = runs[key]
        files = sorted(p.name for p in run["out"].iterdir())
        best = ["best_model.pdema", "best_model.pdparams", f"best_model{MANIFEST_SUFFIX}"]
        if key == "D":  # resumed at epoch 3: best_model is written only if epoch 3 beats C's best
            best = [f for f in best if f in files]
        assert files == sorted([*best, "curves.png", "model_final.pdema", "model_final.pdopt",
                                "model_final.pdparams", f"model_final{MANIFEST_SUFFIX}", "vdl"]), key
        assert len(list((run["out"] / "vdl").iterdir())) == 1  # one VisualDL record file, not one per rank
        audit = {p.name: p.read_text().splitlines() for p in run["audit"].iterdir()}
        assert "writes.1.txt" not in audit, audit.get("writes.1.txt")  # rank 1 wrote nothing under output
        assert "writes.launcher.txt" not in audit
        renamed = {os.path.basename(line.split(" ", 1)[1]) for line in audit["writes.0.txt"] if line.startswith("os.rename")}
        assert {f for f in files if f.endswith((".pdparams", ".pdema", ".pdopt", MANIFEST_SUFFIX))} <= renamed
        # rank 1 prints no progress, evaluation or summary
        assert "raw acc" in run["logs"][0] and not re.search(r"iter \d+/|raw acc|checkpoints:", run["logs"][1])


def eval_lines(stdout):
    return [(int(e), float(r), float(m)) for e, r, m in
            re.findall(r"epoch (\d+): raw acc ([0-9.]+), EMA acc ([0-9.]+)", stdout)]


def test_printed_accuracy_covers_the_whole_test_set(runs):
    cfg = read_config(str(CONFIG), [])
    dataset = build_datasets(cfg, ("eval",))["eval"]
    assert len(dataset) == NUM_EVAL
    model = build_model(cfg, dataset)
    for key in ("A", "B", "C", "D"):
        run = runs[key]
        (epoch, raw_acc, ema_acc), = eval_lines(run["stdout"])
        for rank in range(run["nproc"]):
            counts = run["dumps"][rank, epoch - 1]["meta"]["evaluations"]
            assert [total for _, total in counts] == [NUM_EVAL, NUM_EVAL], (key, rank)  # summed over ranks
            assert (f"{counts[0][0] / NUM_EVAL:.4f}", f"{counts[1][0] / NUM_EVAL:.4f}") == (f"{raw_acc:.4f}", f"{ema_acc:.4f}")
        # one process evaluating the saved weights on all 450 images finds the same accuracies
        load_weights(model, str(run["out"] / "model_final.pdema"))
        assert f"{evaluate(model, dataset, NUM_EVAL):.4f}" == f"{raw_acc:.4f}", key
        load_weights(model, str(run["out"] / "model_final.pdparams"))
        assert f"{evaluate(model, dataset, NUM_EVAL):.4f}" == f"{ema_acc:.4f}", key


def test_two_process_checkpoint_resumes_in_one_process_with_the_same_ema(runs):
    for key, options in (("A", []), ("B", ["ema_shard=true"])):
        run = runs[key]
        cfg = read_config(str(CONFIG), ["epoch=2", f"output_dir={run['out'].parent}", *options])
        trainer = Trainer(cfg, "lenet_digits", resume=str(run["out"] / "model_final"))
        assert trainer.parallel.world_size == 1 and trainer.global_step == STEPS_PER_EPOCH
        state = trainer.ema.state_dict()["ema"]
        assert state["num_updates"] == STEPS_PER_EPOCH
        assert_same({k: v.numpy() for k, v in state["shadow"].items()}, weights(run["dumps"][0, 0], "ema"), key)
        assert_same({k: v.numpy() for k, v in trainer.model.state_dict().items()}, weights(run["dumps"][0, 0], "raw"), key)
    # C continued A's checkpoint for one more epoch in one process
    c = runs["C"]
    assert f"resumed from {runs['A']['out'] / 'model_final'}: epoch 1, step {STEPS_PER_EPOCH}" in c["stdout"]
    state = paddle.load(str(c["out"] / "model_final.pdopt"))
    assert state["global_step"] == 2 * STEPS_PER_EPOCH and state["ema"]["ema"]["num_updates"] == 2 * STEPS_PER_EPOCH
    ema_a, ema_c = weights(runs["A"]["dumps"][0, 0], "ema"), weights(c["dumps"][0, 1], "ema")
    assert any(not np.array_equal(ema_a[k], ema_c[k]) for k in ema_a)
    # the table covers both epochs: the history came with the checkpoint
    assert re.search(r"^\s+1\s+[0-9.]+\s+[0-9.]+.*\n\s+2\s+", c["stdout"], re.M)


def test_one_process_checkpoint_resumes_on_two_sharded_processes(runs):
    d = runs["D"]
    assert f"epoch 2, step {2 * STEPS_PER_EPOCH}" in d["stdout"]
    state = paddle.load(str(d["out"] / "model_final.pdopt"))
    assert state["global_step"] == 3 * STEPS_PER_EPOCH and state["ema"]["ema"]["num_updates"] == 3 * STEPS_PER_EPOCH
    assert [row["epoch"] for row in state["history"]] == [0, 1, 2]


def test_global_batch_parts_cover_it_and_scaled_losses_average_to_its_mean():
    parallel = Parallel.__new__(Parallel)
    losses = np.random.default_rng(0).standard_normal(13)
    for world in (1, 2, 3, 4):
        parallel.world_size = world
        parts = []
        for rank in range(world):
            parallel.rank = rank
            parts.append(parallel.part(np.arange(13)))
        assert np.array_equal(np.concatenate(parts), np.arange(13))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        # DataParallel averages the ranks' gradients: the mean of the scaled losses is the batch's mean loss
        scaled = [losses[p].mean() * parallel.loss_scale(len(p), 13) for p in parts]
        np.testing.assert_allclose(np.mean(scaled), losses.mean(), rtol=1e-12)


def test_a_batch_too_small_for_every_process_is_a_config_error():
    parallel = Parallel.__new__(Parallel)
    parallel.world_size = 4
    with pytest.raises(ConfigError, match=r"1347 % 16 = 3 samples\) cannot be split over 4 processes; set TrainReader"):
        parallel._check_batches(1347, 16, drop_last=False)
    parallel._check_batches(1347, 16, drop_last=True)
    with pytest.raises(ConfigError, match="TrainReader.batch_size 2 cannot be split over 4 processes.*at least 4"):
        parallel._check_batches(1347, 2, drop_last=True)
    parallel._check_batches(1348, 16, drop_last=False)  # 1348 % 16 = 4: one sample each


def test_a_config_error_under_the_launcher_is_one_line_and_exit_status_2(tmp_path):
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path / "log"),
           "--start_port", str(free_port()), str(REPO / "tools" / "train.py"), "-c", str(CONFIG),
           "-o", "TrainReader.batch_size=1", f"output_dir={tmp_path / 'output'}"]
    result = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""}, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 2
    log = (tmp_path / "log" / "workerlog.0").read_text()
    assert "error: TrainReader.batch_size 1 cannot be split over 2 processes" in log and "Traceback" not in log
    assert not (tmp_path / "output").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_an_error_on_a_rank_above_0_waits_so_the_launcher_reports_rank_0s_status(monkeypatch, capsys, rank):
    # Paddle's launcher exits with the status of the lowest-ranked failed worker and SIGTERMs the rest:
    # a rank above 0 that exited first would make the launch exit 241 (rank 0 killed), not 2.
    from paddle_ema.engine import cli

    waits = []
    monkeypatch.setattr(cli.time, "sleep", waits.append)
    monkeypatch.setenv("PADDLE_TRAINER_ID", str(rank))
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")

    def main(argv):
        raise ConfigError("TrainReader.batch_size 1 cannot be split over 2 processes")

    assert cli._run(main, []) == 2
    assert capsys.readouterr().err == "error: TrainReader.batch_size 1 cannot be split over 2 processes\n"
    assert waits == ([cli.PEER_ERROR_GRACE_S] if rank else [])
