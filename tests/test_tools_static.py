"""`mode: static` of tools/train.py end to end: the Executor trainer with paddle_ema.static's EMA."""

import io
import math
import os
import re
import subprocess
import sys

import numpy as np
import paddle
import pytest

from test_tools_train import ENV, REPO, load, ok, tiny_config, tool

# A learning rate that changes every step (warm-up, then cosine), so that the LR schedule the
# Executor reads each run is checked too.
STATIC = "mode: static\nlr_schedule: CosineDecay\nCosineDecay: {warmup_steps: 5}\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("static")
    config = tiny_config(folder, extra=STATIC)
    result = tool("train.py", "-c", str(config), "--eval", "--use_vdl", "--vdl_log_dir", str(folder / "vdl"))
    return {"folder": folder, "config": config, "out": folder / "output" / "tiny", "vdl": folder / "vdl",
            "stdout": ok(result), "stderr": result.stderr}


def test_checkpoints_hold_the_static_ema_shadows_under_structured_names(run):
    files = sorted(os.listdir(run["out"]))
    for stem in ("0", "model_final"):
        assert {stem + s for s in (".pdparams", ".pdema", ".pdopt")} <= set(files)
    assert "best_model.pdparams" in files and "curves.png" in files
    weights, raw = load(run["out"] / "model_final.pdparams"), load(run["out"] / "model_final.pdema")
    state = paddle.load(str(run["out"] / "model_final.pdopt"))
    ema = state["ema"]["ema"]
    assert state["ema"]["impl"] == "paddle_ema.static" and state["last_epoch"] == 1 and state["global_step"] == 44
    assert ema["num_calls"] == ema["num_updates"] == 44
    # The product of the 44 decays applied, the threshold schedule's (1 + t) / (10 + t) (all below
    # ema_decay here): 9! 44! / 53!. It is only tracked: ema_bias_correction: false leaves it unused.
    assert ema["settings"]["bias_correction"] is False
    np.testing.assert_allclose(ema["decay_product"], math.factorial(9) * math.factorial(44) / math.factorial(53),
                               rtol=1e-12)
    assert set(ema["shadow"]) == set(weights) == set(raw)  # BatchNorm statistics averaged too
    assert "features.1._mean" in weights and "classifier.3.weight" in weights
    for name, shadow in ema["shadow"].items():
        assert np.array_equal(weights[name], shadow.numpy()), name
    assert all(not np.array_equal(weights[k], raw[k]) for k in raw)
    # Momentum velocities under the structured names, plus the LR schedule after 44 steps
    assert {k for k in state["optimizer"] if k != "LR_Scheduler"} == {f"{k}_velocity_0" for k in raw
                                                                     if not k.endswith(("_mean", "_variance"))}
    assert state["optimizer"]["LR_Scheduler"]["last_epoch"] == 44


def test_eval_tool_reproduces_the_printed_accuracies(run):
    accs = [(float(r), float(e)) for r, e in re.findall(r"raw acc ([0-9.]+), EMA acc ([0-9.]+)", run["stdout"])]
    assert len(accs) == 2
    assert f"accuracy {accs[1][1]:.4f}" in ok(tool("eval.py", "-c", str(run["config"])))
    raw = ok(tool("eval.py", "-c", str(run["config"]), "-o", f"weights={run['out'] / 'model_final.pdema'}"))
    assert f"accuracy {accs[1][0]:.4f}" in raw


def test_visualdl_decay_is_the_threshold_schedule(run):
    from visualdl import LogReader

    files = [os.path.join(run["vdl"], f) for f in os.listdir(run["vdl"]) if f.startswith("vdlrecords")]
    reader = LogReader(file_path=files[0])
    decays = reader.get_data("scalar", "ema/decay")  # update t = step - 1
    assert [round(r.value, 6) for r in decays] == [round(min(0.99, t / (9 + t)), 6) for t in (10, 20, 30, 40)]
    lrs = [r.value for r in reader.get_data("scalar", "train/lr")]
    assert lrs[0] > lrs[-1] > 0  # cosine decay after the warm-up
    printed = [float(v) for v in re.findall(r"EMA acc ([0-9.]+)", run["stdout"])[:2]]
    assert [round(r.value, 4) for r in reader.get_data("scalar", "eval/ema_acc")] == printed


def test_resume_is_bitwise_equal_to_the_uninterrupted_run(run):
    other = run["folder"] / "resumed"
    result = ok(tool("train.py", "-c", str(run["config"]), "-r", str(run["out"] / "0"), "-o", f"output_dir={other}"))
    assert "resumed from" in result
    for suffix in (".pdparams", ".pdema"):
        straight, resumed = load(run["out"] / f"model_final{suffix}"), load(other / "tiny" / f"model_final{suffix}")
        assert set(straight) == set(resumed)
        for name in straight:
            assert np.array_equal(straight[name], resumed[name]), (suffix, name)
    a = paddle.load(str(run["out"] / "model_final.pdopt"))
    b = paddle.load(str(other / "tiny" / "model_final.pdopt"))
    for key, value in a["optimizer"].items():
        if key != "LR_Scheduler":
            assert np.array_equal(value.numpy(), b["optimizer"][key].numpy()), key
    assert a["optimizer"]["LR_Scheduler"] == b["optimizer"]["LR_Scheduler"]
    ea, eb = a["ema"]["ema"], b["ema"]["ema"]
    assert (ea["num_calls"], ea["decay_product"], ea["last_decay"]) == (eb["num_calls"], eb["decay_product"],
                                                                       eb["last_decay"])


def test_static_and_dygraph_runs_of_one_config_end_equal(run):
    # Both modes start from the dygraph model's initial weights for the seed, read the batches in
    # the same order and run the same CPU kernels, so the raw weights agree bit for bit. The EMAs
    # do too here: the threshold decay (1+t)/(10+t), float64 in both, stays below the cap 0.99 for
    # these 44 updates, so the static EMA's float32 copy of the cap never enters.
    dygraph = run["folder"] / "dygraph"
    ok(tool("train.py", "-c", str(run["config"]), "-o", "mode=dygraph", f"output_dir={dygraph}"))
    for suffix in (".pdema", ".pdparams"):
        static, dynamic = load(run["out"] / f"model_final{suffix}"), load(dygraph / "tiny" / f"model_final{suffix}")
        for name in static:
            assert np.array_equal(static[name], dynamic[name]), (suffix, name)


def test_legacy_programs_train_the_same_run(run):
    legacy = run["folder"] / "legacy"
    # FLAGS_enable_pir_api=0 at process start: legacy ProgramDesc programs instead of PIR
    ok(subprocess.run([sys.executable, os.path.join(REPO, "tools", "train.py"), "-c", str(run["config"]),
                       "-o", f"output_dir={legacy}"], cwd=REPO, env={**ENV, "FLAGS_enable_pir_api": "0"},
                      capture_output=True, text=True, timeout=300))
    for suffix in (".pdema", ".pdparams"):
        pir, old = load(run["out"] / f"model_final{suffix}"), load(legacy / "tiny" / f"model_final{suffix}")
        for name in pir:
            assert np.array_equal(pir[name], old[name]), (suffix, name)
    optimizer = paddle.load(str(legacy / "tiny" / "model_final.pdopt"))["optimizer"]
    assert set(optimizer) == set(paddle.load(str(run["out"] / "model_final.pdopt"))["optimizer"])


def test_static_ema_follows_a_float64_model_of_the_recorded_raw_weights(tmp_path):
    # One step per epoch (100 training images, batches of 100), so the checkpoint of every epoch
    # holds the raw weights after every step (.pdema) and the EMA after it (.pdparams). Zero start
    # with bias correction, averaging every 2nd run, the decay capped at 0.2 from the third
    # update on (as float32, the program's constant), the last layer black-listed.
    extra = ("mode: static\nepoch: 6\nDigits: {test_size: 1697}\nTrainReader: {batch_size: 100}\n"
             "ema_decay: 0.2\nema_bias_correction: true\nema_update_every: 2\nema_black_list: [classifier.3]\n")
    config = tiny_config(tmp_path, "onestep.yml", extra)
    ok(tool("train.py", "-c", str(config)))
    out = tmp_path / "output" / "onestep"
    stems = [str(e) for e in range(5)] + ["model_final"]
    raws = [load(out / f"{s}.pdema") for s in stems]
    emas = [load(out / f"{s}.pdparams") for s in stems]
    cap = float(np.float32(0.2))
    for name in raws[0]:
        average, product = None, 1.0
        for run_index, (raw, ema) in enumerate(zip(raws, emas)):
            if name.startswith("classifier.3."):
                assert np.array_equal(ema[name], raw[name])  # not averaged: the live weights
                continue
            if run_index % 2 == 0:
                t = run_index // 2
                decay = min(cap, (1 + t) / (10 + t))
                product *= decay
                weight = (1 - decay) / (1 - product)
                x = raw[name].astype(np.float64)
                average = x if average is None else average + weight * (x - average)
            np.testing.assert_allclose(ema[name], average, rtol=2e-6, atol=1e-7, err_msg=f"{name} run {run_index}")
    final = paddle.load(str(out / "model_final.pdopt"))["ema"]["ema"]
    assert (final["num_calls"], final["num_updates"]) == (6, 3)
    assert final["decay_product"] == pytest.approx(0.1 * (2 / 11) * cap, rel=1e-12)


def test_ppdet_ema_is_refused_in_static_mode(tmp_path):
    config = tiny_config(tmp_path, "bad.yml", "mode: static\nema_impl: ppdet\n")
    result = tool("train.py", "-c", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: ema_impl: ppdet (PaddleDetection's ModelEMA is a dygraph class) is not available "
                     "with mode: static; use ema_impl: paddle_ema, or mode: dygraph"]


def test_paddle_is_back_in_dygraph_mode_after_static_training(tmp_path):
    from paddle_ema.engine import read_config
    from paddle_ema.engine.runs import build_trainer
    from paddle_ema.errors import CheckpointError

    config = tiny_config(tmp_path, "inproc.yml", "mode: static\nepoch: 1\n")
    cfg = read_config(str(config))
    history = build_trainer(cfg, "inproc", do_eval=True, stream=io.StringIO()).train()
    assert paddle.in_dynamic_mode()
    assert len(history) == 1 and 0.0 <= history[0]["ema_acc"] <= 1.0
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        build_trainer(cfg, "inproc", resume=str(tmp_path / "missing"), stream=io.StringIO())
    assert paddle.in_dynamic_mode()
    assert float(paddle.to_tensor([2.0]).sum()) == 2.0  # dygraph ops run
