"""tools/*.py end to end, as subprocesses on a tiny digits config: train, resume, eval, export, average."""

import os
import re
import subprocess
import sys

import numpy as np
import paddle
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ""}  # the tools find paddle_ema themselves, from the repo root


def tool(name, *args, cwd=REPO):
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *args], cwd=cwd, env=ENV,
                            capture_output=True, text=True, timeout=300)
    return result


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def tiny_config(folder, name="tiny.yml", extra=""):
    path = folder / name
    defaults = (f"_BASE_: [{os.path.join(REPO, 'configs', 'lenet_digits.yml')}]\n"
                f"output_dir: {folder / 'output'}\n"
                "epoch: 2\nlog_iter: 10\nbase_lr: 0.1\n"
                "LeNet: {width: 4, hidden: 16}\n"
                "TrainReader: {batch_size: 64}\n")
    # A key set in `extra` replaces the default's line: a config names each key once.
    keys = {line.split(":", 1)[0] for line in extra.splitlines() if line[:1].strip()}
    path.write_text("".join(f"{line}\n" for line in defaults.splitlines() if line.split(":", 1)[0] not in keys) + extra)
    return path


def load(path):
    return {k: v.numpy() for k, v in paddle.load(str(path)).items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tools")
    config = tiny_config(folder)
    vdl = folder / "vdl"
    result = tool("train.py", "-c", str(config), "--eval", "--use_vdl", "--vdl_log_dir", str(vdl))
    return {"folder": folder, "config": config, "out": folder / "output" / "tiny", "vdl": vdl,
            "stdout": ok(result), "stderr": result.stderr}


def test_train_writes_checkpoints_in_paddledetection_layout(run):
    files = sorted(os.listdir(run["out"]))
    for stem in ("0", "model_final"):
        for suffix in (".pdparams", ".pdema", ".pdopt"):
            assert stem + suffix in files
    assert "best_model.pdparams" in files and "curves.png" in files
    assert not [f for f in files if ".tmp" in f]  # atomic writes leave no temporary files
    assert "1.pdparams" not in files  # the last epoch is model_final, as in PaddleDetection


def test_pdparams_hold_the_ema_weights_and_pdema_the_raw_ones(run):
    ema_weights, raw = load(run["out"] / "model_final.pdparams"), load(run["out"] / "model_final.pdema")
    state = paddle.load(str(run["out"] / "model_final.pdopt"))
    shadow = state["ema"]["ema"]["shadow"]
    assert state["last_epoch"] == 1 and state["global_step"] == 2 * 22
    assert state["ema"]["ema"]["num_updates"] == 44
    assert set(shadow) == set(ema_weights)  # BN statistics are averaged too (PaddleDetection's default)
    for name, value in shadow.items():
        assert np.array_equal(ema_weights[name], value.numpy()), name
    assert any(not np.array_equal(ema_weights[k], raw[k]) for k in raw)
    # a different run of the same EMA: 0.pdparams holds the EMA after epoch 0, not the final one
    assert any(not np.array_equal(load(run["out"] / "0.pdparams")[k], ema_weights[k]) for k in raw)


def test_eval_output_table_and_best_model(run):
    out = run["stdout"]
    accs = [(float(r), float(e)) for r, e in re.findall(r"raw acc ([0-9.]+), EMA acc ([0-9.]+)", out)]
    assert len(accs) == 2
    assert re.search(r"best EMA acc ([0-9.]+) \(epoch \d\)", out)
    log_line = r"epoch 1/2 iter 10/22 loss [0-9.]+ lr 0\.1000 ema_decay 0\.\d+ .* it/s .* img/s eta"
    assert re.search(log_line, run["stderr"])
    best = max(range(2), key=lambda i: accs[i][1])
    best_file = "0.pdparams" if best == 0 else "model_final.pdparams"
    for name, value in load(run["out"] / "best_model.pdparams").items():
        assert np.array_equal(value, load(run["out"] / best_file)[name])
    # tools/eval.py on model_final reproduces the EMA accuracy the trainer printed
    evaluated = ok(tool("eval.py", "-c", str(run["config"])))
    assert f"accuracy {accs[1][1]:.4f}" in evaluated
    raw = ok(tool("eval.py", "-c", str(run["config"]), "-o", f"weights={run['out'] / 'model_final.pdema'}"))
    assert f"accuracy {accs[1][0]:.4f}" in raw  # .pdema: the raw weights


def test_resume_continues_bit_for_bit(run):
    other = run["folder"] / "resumed"
    result = tool("train.py", "-c", str(run["config"]), "-r", str(run["out"] / "0"), "-o", f"output_dir={other}")
    assert "resumed from" in ok(result)
    for suffix in (".pdparams", ".pdema"):
        straight, resumed = load(run["out"] / f"model_final{suffix}"), load(other / "tiny" / f"model_final{suffix}")
        assert set(straight) == set(resumed)
        for name in straight:
            assert np.array_equal(straight[name], resumed[name]), (suffix, name)
    a = paddle.load(str(run["out"] / "model_final.pdopt"))["ema"]["ema"]
    b = paddle.load(str(other / "tiny" / "model_final.pdopt"))["ema"]["ema"]
    assert (a["num_updates"], a["decay_product"], a["last_decay"]) == (b["num_updates"], b["decay_product"],
                                                                       b["last_decay"])


def test_visualdl_scalars_read_back(run):
    from visualdl import LogReader

    files = [os.path.join(run["vdl"], f) for f in os.listdir(run["vdl"]) if f.startswith("vdlrecords")]
    assert len(files) == 1
    reader = LogReader(file_path=files[0])
    tags = reader.get_tags()["scalar"]
    assert set(tags) >= {"train/loss", "train/lr", "ema/decay", "eval/raw_acc", "eval/ema_acc",
                         "ema/relative_distance"}
    lr = reader.get_data("scalar", "train/lr")
    assert [r.id for r in lr] == [10, 20, 30, 40] and all(abs(r.value - 0.1) < 1e-7 for r in lr)
    decays = reader.get_data("scalar", "ema/decay")  # threshold schedule, decay bound 0.99
    assert [round(r.value, 6) for r in decays] == [round(min(0.99, t / (9 + t)), 6) for t in (10, 20, 30, 40)]
    printed = [float(v) for v in re.findall(r"EMA acc ([0-9.]+)", run["stdout"])[:2]]
    assert [round(r.value, 4) for r in reader.get_data("scalar", "eval/ema_acc")] == printed


def test_export_matches_checkpoint_predictions(run, tmp_path):
    out = ok(tool("export_model.py", "-c", str(run["config"]), "--output_dir", str(tmp_path)))
    assert "reloaded predictions match" in out
    sys.path.insert(0, REPO)
    from paddle_ema.engine import read_config
    from paddle_ema.engine.evaluation import predict
    from paddle_ema.engine.builders import build_datasets, build_model

    cfg = read_config(str(run["config"]))
    dataset = build_datasets(cfg, ("eval",))["eval"]
    model = build_model(cfg, dataset)
    model.set_state_dict(paddle.load(str(run["out"] / "model_final.pdparams")))
    expected = predict(model, dataset, 450)
    loaded = paddle.jit.load(str(tmp_path / "tiny"))
    loaded.eval()
    got = loaded(paddle.to_tensor(dataset.batch(np.arange(len(dataset)))[0])).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_average_checkpoints(run, tmp_path):
    a, b = run["out"] / "0.pdparams", run["out"] / "model_final.pdparams"
    refused = tool("average_checkpoints.py", str(a), str(b), "--output", str(tmp_path / "x.pdparams"))
    assert refused.returncode == 2 and "choose how to handle them with --bn" in refused.stderr
    ok(tool("average_checkpoints.py", str(a), str(b), "--weights", "1", "3", "--bn", "average",
            "--output", str(tmp_path / "avg.pdparams")))
    avg, sa, sb = load(tmp_path / "avg.pdparams"), load(a), load(b)
    for name in sa:
        expected = (sa[name].astype(np.float64) + 3 * sb[name].astype(np.float64)) / 4
        np.testing.assert_allclose(avg[name], expected, rtol=1e-6, atol=1e-6, err_msg=name)
    # first: BN statistics of the first checkpoint, weights averaged uniformly
    ok(tool("average_checkpoints.py", str(a), str(b), "--bn", "first", "--output", str(tmp_path / "first.pdparams")))
    first = load(tmp_path / "first.pdparams")
    for name in sa:
        if name.endswith(("_mean", "_variance")):
            assert np.array_equal(first[name], sa[name])
        else:
            np.testing.assert_allclose(first[name], (sa[name] + sb[name]) / 2, rtol=1e-6, atol=1e-6)


def test_average_with_recomputed_bn_statistics(run, tmp_path):
    a, b = run["out"] / "0.pdparams", run["out"] / "model_final.pdparams"
    ok(tool("average_checkpoints.py", "-c", str(run["config"]), str(a), str(b), "--bn", "recompute",
            "--output", str(tmp_path / "swa.pdparams")))
    swa, sa, sb = load(tmp_path / "swa.pdparams"), load(a), load(b)
    np.testing.assert_allclose(swa["features.0.weight"], (sa["features.0.weight"] + sb["features.0.weight"]) / 2,
                               rtol=1e-6, atol=1e-6)
    # first BN layer: the exact mean and (population) variance over all training images of the first
    # convolution's output, computed here with numpy
    sys.path.insert(0, REPO)
    from paddle_ema.engine.data import Digits

    train = Digits("train")
    weight = swa["features.0.weight"].astype(np.float64)  # (4, 1, 3, 3), no bias
    images = train.batch(np.arange(len(train)))[0].astype(np.float64)
    padded = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # N,1,8,8,3,3
    conv = np.einsum("nchwij,ocij->nohw", windows, weight)
    np.testing.assert_allclose(swa["features.1._mean"], conv.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(swa["features.1._variance"], conv.var(axis=(0, 2, 3)), rtol=1e-5)
    assert not np.allclose(swa["features.1._mean"], (sa["features.1._mean"] + sb["features.1._mean"]) / 2)


def test_ppdet_ema_impl_trains_and_resumes_exactly(tmp_path):
    config = tiny_config(tmp_path, "pp.yml", "ema_impl: ppdet\nepoch: 2\n")
    ok(tool("train.py", "-c", str(config)))
    out = tmp_path / "output" / "pp"
    state = paddle.load(str(out / "model_final.pdopt"))["ema"]
    assert state["impl"] == "ppdet" and state["ema"]["step"] == 44 and state["ema"]["epoch"] == 2
    ok(tool("train.py", "-c", str(config), "-r", str(out / "0"), "-o", f"output_dir={tmp_path / 'again'}"))
    for suffix in (".pdparams", ".pdema"):
        straight, resumed = load(out / f"model_final{suffix}"), load(tmp_path / "again" / "pp" / f"model_final{suffix}")
        for name in straight:
            assert np.array_equal(straight[name], resumed[name]), (suffix, name)
    # .pdparams is ModelEMA.apply(): shadow / (1 - d_last**t), d_last = min(0.99, 44/53) at t = 44
    shadow = state["ema"]["shadow"]["features.0.weight"].numpy()
    np.testing.assert_allclose(load(out / "model_final.pdparams")["features.0.weight"],
                               shadow / (1 - (44 / 53) ** 44), rtol=1e-6)
