"""SWA, BatchNorm recalibration and post-hoc EMA in the training tools, as subprocesses."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_ema.batchnorm import update_bn
from paddle_ema.engine import read_config
from paddle_ema.engine.data import Digits
from paddle_ema.engine.trainer import build_model
from paddle_ema.posthoc import synthesize

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": ""}
EXTRA = ("epoch: 4\nuse_swa: true\nswa_start_epoch: 1\nema_update_bn: true\n"
         "ema_posthoc: true\nema_posthoc_every: 20\nema_posthoc_sigma_rels: [0.05, 0.15]\n")


def tool(name, *args):
    result = subprocess.run([sys.executable, str(REPO / "tools" / name), *args], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def config(folder, extra=EXTRA):
    path = folder / "avg.yml"
    path.write_text(f"_BASE_: [{REPO / 'configs' / 'lenet_digits.yml'}]\noutput_dir: {folder / 'output'}\n"
                    "log_iter: 10\nLeNet: {width: 4, hidden: 16}\nTrainReader: {batch_size: 64}\n" + extra)
    return path


def load(path):
    return {k: v.numpy() for k, v in paddle.load(str(path)).items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("averages")
    cfg = config(folder)
    stdout = tool("train.py", "-c", str(cfg), "--eval")
    return {"cfg": cfg, "out": folder / "output" / "avg", "stdout": stdout, "folder": folder}


def _model_with(cfg_path, state):
    cfg = read_config(str(cfg_path))
    model = build_model(cfg, Digits("train"))
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
    return model


def _recalibrated(cfg_path, state):
    model = _model_with(cfg_path, state)
    train = Digits("train")
    update_bn(model, [paddle.to_tensor(train.batch(np.arange(len(train)))[0])])
    return {k: v.numpy() for k, v in model.state_dict().items()}


def test_swa_is_the_mean_of_the_epoch_end_weights_with_recomputed_bn(run):
    out = run["out"]
    swa = load(out / "model_final_swa.pdparams")
    # Averaged: the raw weights at the end of epochs 1, 2 and 3 (swa_start_epoch 1, every epoch).
    ends = [load(out / "1.pdema"), load(out / "2.pdema"), load(out / "model_final.pdema")]
    for name in ("features.0.weight", "classifier.3.weight", "classifier.3.bias"):
        np.testing.assert_allclose(swa[name], np.mean([e[name] for e in ends], axis=0), rtol=1e-5, atol=1e-6)
    assert not (out / "0_swa.pdparams").exists()  # nothing averaged yet after epoch 0
    # BatchNorm statistics recomputed for the SWA weights (swa_update_bn defaults to true).
    recalibrated = _recalibrated(run["cfg"], swa)
    for name in ("features.1._mean", "features.1._variance", "features.5._mean"):
        np.testing.assert_allclose(swa[name], recalibrated[name], rtol=1e-4, atol=1e-6)
    assert re.search(r"epoch 4: raw acc 0\.\d+, EMA acc 0\.\d+, .* SWA acc 0\.\d+", run["stdout"])
    assert re.search(r"final: raw 0\.\d+, EMA 0\.\d+, SWA 0\.\d+", run["stdout"])


def test_ema_update_bn_recalibrates_the_saved_ema_weights(run):
    ema = load(run["out"] / "model_final.pdparams")
    state = paddle.load(str(run["out"] / "model_final.pdopt"))["ema"]["ema"]
    shadow = {k: v.numpy() for k, v in state["shadow"].items()}
    np.testing.assert_array_equal(ema["features.0.weight"], shadow["features.0.weight"])  # weights: the EMA
    assert not np.allclose(ema["features.1._mean"], shadow["features.1._mean"])  # statistics: not the averaged ones
    recalibrated = _recalibrated(run["cfg"], ema)
    np.testing.assert_allclose(ema["features.1._variance"], recalibrated["features.1._variance"], rtol=1e-4)


def test_resume_keeps_swa_and_posthoc_exact(run, tmp_path):
    cfg = config(tmp_path)
    tool("train.py", "-c", str(cfg), "-o", "epoch=2")  # epochs 0-1, then resume to 4 from epoch 1
    os.remove(tmp_path / "output" / "avg" / "model_final.manifest.json")
    tool("train.py", "-c", str(cfg), "-r", str(tmp_path / "output" / "avg" / "0"))
    for suffix in ("_swa.pdparams", ".pdparams", ".pdema"):
        want, got = load(run["out"] / f"model_final{suffix}"), load(tmp_path / "output" / "avg" / f"model_final{suffix}")
        for name in want:
            assert np.array_equal(got[name], want[name]), (suffix, name)
    snapshots = sorted(p.name for p in (run["out"] / "posthoc").glob("*.pdparams"))
    assert snapshots == sorted(p.name for p in (tmp_path / "output" / "avg" / "posthoc").glob("*.pdparams"))
    for name in snapshots:
        a, b = load(run["out"] / "posthoc" / name), load(tmp_path / "output" / "avg" / "posthoc" / name)
        assert all(np.array_equal(a[k], b[k]) for k in a), name


def test_posthoc_tool_reproduces_a_stored_profile_and_sweeps(run):
    out = run["out"]
    stdout = tool("posthoc_ema.py", "-c", str(run["cfg"]), "--sigma-rel", "0.05", "0.1", "--eval")
    assert re.search(r"best: sigma_rel 0\.\d+ \(gamma [\d.]+\), accuracy 0\.\d+", stdout)
    synthesised = load(out / "posthoc_sigma0.050.pdparams")
    last = max(int(p.stem.split("_")[-1]) for p in (out / "posthoc").glob("posthoc_0_*.pdparams"))
    stored = load(out / "posthoc" / f"posthoc_0_{last:010d}.pdparams")  # the sigma_rel 0.05 profile
    for name in ("features.0.weight", "classifier.3.bias", "features.1._mean"):
        np.testing.assert_allclose(synthesised[name], stored[name], rtol=1e-5, atol=1e-6)
    # An unstored width: equal to the library's synthesis, and the non-averaged entries from the raw weights.
    weights, _ = synthesize(out / "posthoc", sigma_rel=0.1)
    produced = load(out / "posthoc_sigma0.100.pdparams")
    np.testing.assert_allclose(produced["classifier.3.weight"], weights["classifier.3.weight"], rtol=1e-6)
    raw = load(out / "model_final.pdema")
    integer_entries = [k for k in raw if not np.issubdtype(raw[k].dtype, np.floating)]
    assert all(np.array_equal(produced[k], raw[k]) for k in integer_entries)
