"""EMACallback in PaddleFormers' Trainer, one process: averaging, evaluation, checkpoints, resume, export.

A tiny model trains for 12 optimizer steps (tests/workers/paddleformers_train.py); every number is
checked against a float64 replay of the raw weights recorded after each optimizer step
(tests/ema_model.py) or against a second run.
"""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("paddleformers", reason="PaddleFormers is installed only in CI's paddleformers leg (.ci/run)")

import paddle  # noqa: E402

from ema_model import EMAModel, decay_closed_form  # noqa: E402
from paddle_ema import CheckpointError, ConfigError  # noqa: E402
from paddle_ema.integrations import paddleformers as integration  # noqa: E402
from paddle_ema.integrations.paddleformers import EMACallback, load_ema_weights  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "workers"))
import paddleformers_train as worker  # noqa: E402

DECAY = 0.9  # threshold schedule: d_t = min(0.9, (1 + t) / (10 + t))


def fold(steps, first, last, start=None, calls=0):
    """The float64 EMA of the recorded weights after steps first..last, from `start` (default:
    the weights recorded at step first - 1) with `calls` updates already made."""
    reference = EMAModel(start if start is not None else steps[first - 1],
                         lambda t: decay_closed_form("threshold", t, DECAY))
    reference.calls = calls
    for step in range(first, last + 1):
        reference.update(steps[step])
    return reference.average()


def assert_close(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(np.asarray(got[name], np.float64), want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def assert_bitwise(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        assert np.array_equal(np.asarray(got[name]), np.asarray(want[name])), name


def numpy_weights(weights):
    return {name: value.numpy() for name, value in weights.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("pf")
    # 12 steps, checkpoints every 3 (the last 2 kept), evaluations at 6 and 12.
    full = dict(out=str(base / "full"), save_steps=3, save_total_limit=2, keep=[6])
    found = {"base": base}
    for key, config in {
        "full": full,
        "resumed": {**full, "out": str(base / "resumed"), "keep": [], "resume": str(base / "full" / "checkpoint-6")},
        "accumulated": dict(out=str(base / "accumulated"), steps=6, batch=4, accumulate=2, eval_steps=0),
        "pretrained": dict(out=str(base / "pretrained"), steps=4, save_steps=4, eval_steps=0, pretrained=True),
        "best": dict(out=str(base / "best"), steps=6, save_steps=2, eval_steps=2, metric_for_best_model="ema_loss"),
        "flex": dict(out=str(base / "flex"), steps=4, save_steps=4, eval_steps=0, format="flex_checkpoint"),
    }.items():
        os.makedirs(config["out"])
        trainer, callback, _ = worker.run(config)
        meta, steps, final = worker.read_rank(config["out"])
        found[key] = dict(trainer=trainer, callback=callback, meta=meta, steps=steps, final=final,
                          run=Path(config["out"]) / "run", out=Path(config["out"]))
    return found


def test_the_ema_equals_a_float64_fold_of_the_weights_after_every_optimizer_step(runs):
    full = runs["full"]
    assert full["meta"]["global_step"] == 12 and sorted(full["steps"]) == list(range(13))
    assert full["meta"]["num_calls"] == full["meta"]["num_updates"] == 12
    ema = full["callback"].ema
    assert_close(numpy_weights({n: ema.average(n) for n in ema.names}), fold(full["steps"], 1, 12))
    # The middle checkpoint holds the average of steps 1..6.
    assert_close(numpy_weights(load_ema_weights(full["out"] / "checkpoint-6")), fold(full["steps"], 1, 6))
    # The weights moved: the average is not the last weights.
    assert not np.allclose(ema.average("fc1.weight").numpy(), full["final"]["fc1.weight"], atol=1e-3)


def test_eval_ema_loss_is_the_ema_weights_loss_and_the_raw_weights_come_back_bitwise(runs):
    full = runs["full"]
    evaluations = full["meta"]["evaluations"]
    assert [e["step"] for e in evaluations] == [6, 12]
    for evaluation in evaluations:
        step = evaluation["step"]
        np.testing.assert_allclose(evaluation["eval_ema_loss"], worker.loss64(fold(full["steps"], 1, step)), rtol=2e-6)
        np.testing.assert_allclose(evaluation["eval_loss"], worker.loss64(full["steps"][step]), rtol=2e-6)
        assert evaluation["eval_ema_loss"] != evaluation["eval_loss"]
    # The evaluation at step 12 ran between the step and the end: the raw weights are the step's, bit for bit.
    assert_bitwise(full["final"], full["steps"][12])
    # trainer.evaluate() after training: both sets of metrics, the same numbers, the raw weights untouched.
    trainer = full["trainer"]
    metrics = trainer.evaluate()
    assert metrics["eval_ema_loss"] == evaluations[-1]["eval_ema_loss"]
    assert metrics["eval_loss"] == evaluations[-1]["eval_loss"]
    assert_bitwise({n: p.numpy() for n, p in trainer.model.named_parameters()}, full["steps"][12])


def test_the_best_checkpoint_can_be_chosen_by_the_ema_weights_loss(runs):
    best = runs["best"]
    evaluations = best["meta"]["evaluations"]
    assert [e["step"] for e in evaluations] == [2, 4, 6]
    assert best["meta"]["best_metric"] == min(e["eval_ema_loss"] for e in evaluations)
    assert min(e["eval_ema_loss"] for e in evaluations) != min(e["eval_loss"] for e in evaluations)
    chosen = min(evaluations, key=lambda e: e["eval_ema_loss"])["step"]
    assert best["trainer"].state.best_model_checkpoint == str(best["run"] / f"checkpoint-{chosen}")


def test_metric_prefixes_for_named_datasets_and_other_prefixes():
    assert integration._ema_prefix("eval") == "eval_ema"
    assert integration._ema_prefix("eval_valid") == "eval_ema_valid"
    assert integration._ema_prefix("test") == "test_ema"
    assert integration._metric_prefix({"eval_valid_loss": 1.0, "eval_valid_runtime": 0.1}) == "eval_valid"


def test_checkpoints_hold_the_ema_state_and_rotation_removes_it_with_them(runs):
    run = runs["full"]["run"]
    kept = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-"))
    assert kept == ["checkpoint-12", "checkpoint-9"]  # save_total_limit=2 of checkpoints 3, 6, 9, 12
    for name in kept:
        assert sorted(p.name for p in (run / name).glob("paddle_ema_state*")) == ["paddle_ema_state.00000-of-00001.npz"]
        step = int(name.split("-")[1])
        assert_close(numpy_weights(load_ema_weights(run / name)), fold(runs["full"]["steps"], 1, step))
    # Nothing of the rotated checkpoints is left, and no EMA file outside a kept checkpoint.
    assert sorted(str(p.relative_to(run)) for p in run.rglob("paddle_ema_state*")) == sorted(
        f"{name}/paddle_ema_state.00000-of-00001.npz" for name in kept)


def test_resuming_the_middle_checkpoint_ends_bitwise_equal_to_the_uninterrupted_run(runs):
    full, resumed = runs["full"], runs["resumed"]
    assert sorted(resumed["steps"]) == list(range(6, 13))
    assert_bitwise(resumed["steps"][6], full["steps"][6])
    for step in range(7, 13):
        assert_bitwise(resumed["steps"][step], full["steps"][step])
    for key in ("num_calls", "num_updates", "decay_product", "last_decay"):
        assert resumed["meta"][key] == full["meta"][key], key
    assert_bitwise(numpy_weights(load_ema_weights(resumed["run"] / "checkpoint-12")),
                   numpy_weights(load_ema_weights(full["run"] / "checkpoint-12")))
    assert resumed["meta"]["evaluations"][-1]["eval_ema_loss"] == full["meta"]["evaluations"][-1]["eval_ema_loss"]


def test_gradient_accumulation_updates_once_per_optimizer_step(runs):
    accumulated = runs["accumulated"]
    meta = accumulated["meta"]
    # 12 micro-batches of 4, 2 per optimizer step: 6 steps, 6 micro-steps without a step.
    assert meta["global_step"] == 6 and meta["substeps"] == 6
    assert meta["num_calls"] == meta["num_updates"] == 6
    ema = accumulated["callback"].ema
    assert_close(numpy_weights({n: ema.average(n) for n in ema.names}), fold(accumulated["steps"], 1, 6))


def test_the_export_loads_with_the_models_own_loader(runs):
    # A plain Layer: model_state.pdparams for set_state_dict.
    full = runs["full"]
    ema = full["callback"].ema
    net = worker.Net()
    net.set_state_dict(paddle.load(str(full["run"] / "ema" / "model_state.pdparams")))
    assert_bitwise({n: p.numpy() for n, p in net.named_parameters()}, {n: ema.average(n).numpy() for n in ema.names})
    # A PretrainedModel: save_pretrained, read back by from_pretrained, both in the run's format
    # (the classic one here; a flex export needs a model with PaddleFormers' _gen_aoa_config).
    pretrained = runs["pretrained"]
    ema = pretrained["callback"].ema
    loaded = worker.TinyPretrained.from_pretrained(str(pretrained["run"] / "ema"), load_checkpoint_format=None)
    assert_bitwise({n: p.numpy() for n, p in loaded.named_parameters()}, {n: ema.average(n).numpy() for n in ema.names})
    assert_close(numpy_weights({n: ema.average(n) for n in ema.names}), fold(pretrained["steps"], 1, 4))


def test_flex_checkpoints_hold_the_ema_state_too(runs):
    flex = runs["flex"]
    checkpoint = flex["run"] / "checkpoint-4"
    assert list((checkpoint / "model_state").glob("*.distcp")), "not a flex checkpoint"
    assert_close(numpy_weights(load_ema_weights(checkpoint)), fold(flex["steps"], 1, 4))


# -- bad input -------------------------------------------------------------------------------------


def one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_resuming_a_checkpoint_without_ema_state_fails_or_restarts_as_asked(runs, tmp_path):
    bare = tmp_path / "checkpoint-6"
    shutil.copytree(runs["base"] / "full" / "checkpoint-6", bare)
    (bare / "paddle_ema_state.00000-of-00001.npz").unlink()
    config = dict(out=str(tmp_path / "a"), resume=str(bare), eval_steps=0, save_steps=12)
    os.makedirs(config["out"])
    with pytest.raises(CheckpointError) as excinfo:
        worker.run(config)
    assert "has no EMA state" in one_line(excinfo) and "missing_state='restart'" in str(excinfo.value)
    config = dict(config, out=str(tmp_path / "b"), ema={"decay": DECAY, "missing_state": "restart"})
    os.makedirs(config["out"])
    with pytest.warns(RuntimeWarning, match="starts from the resumed weights"):
        _, callback, _ = worker.run(config)
    _, steps, _ = worker.read_rank(config["out"])
    assert callback.ema.num_updates == 6
    assert_close(numpy_weights({n: callback.ema.average(n) for n in callback.ema.names}), fold(steps, 7, 12))


def test_state_files_that_are_damaged_or_mixed_are_refused_in_one_line(runs, tmp_path):
    source = runs["base"] / "full" / "checkpoint-6" / "paddle_ema_state.00000-of-00001.npz"
    folder = tmp_path / "checkpoint-6"
    folder.mkdir()
    with pytest.raises(CheckpointError) as excinfo:
        load_ema_weights(folder)
    assert "has no EMA state" in one_line(excinfo)
    target = folder / source.name
    target.write_bytes(source.read_bytes()[:200])  # truncated
    with pytest.raises(CheckpointError) as excinfo:
        load_ema_weights(folder)
    assert "cannot be read as an EMA state" in one_line(excinfo)
    shutil.copy(source, target)
    shutil.copy(source, folder / "paddle_ema_state.00001-of-00002.npz")
    with pytest.raises(CheckpointError) as excinfo:
        load_ema_weights(folder)
    assert "sets of [1, 2] parts" in one_line(excinfo)
    target.unlink()
    with pytest.raises(CheckpointError) as excinfo:
        load_ema_weights(folder)
    assert "lacks ['paddle_ema_state.00000-of-00002.npz']" in one_line(excinfo)


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_reading_a_state_file_runs_no_code(tmp_path):
    marker = tmp_path / "marker"
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    meta = {"format": integration._FORMAT, "version": 1, "names": ["w"], "owned": ["w"]}
    # A pickled object where the averages should be: unpickling it would create the marker file.
    with open(folder / "paddle_ema_state.00000-of-00001.npz", "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), average_0=np.array([_Marker(str(marker))], dtype=object))
    with pytest.raises(CheckpointError) as excinfo:
        load_ema_weights(folder)
    assert "cannot be read as an EMA state" in one_line(excinfo)
    assert not marker.exists()


def test_writing_the_state_does_not_follow_links(runs, tmp_path):
    folder = tmp_path / "checkpoint-6"
    folder.mkdir()
    outside = tmp_path / "outside"
    outside.write_text("keep")
    name = "paddle_ema_state.00000-of-00001.npz"
    (folder / name).symlink_to(outside)
    (folder / f".{name}.tmp-{os.getpid()}").symlink_to(outside)
    ema = runs["full"]["callback"].ema
    integration._write_state(ema, str(folder), 12)
    assert outside.read_text() == "keep"
    assert not (folder / name).is_symlink()
    assert sorted(p.name for p in folder.iterdir()) == [name]
    assert_bitwise(numpy_weights(load_ema_weights(folder)), {n: ema.average(n).numpy() for n in ema.names})


def test_bad_options_and_unsupported_layouts_are_refused_in_one_line():
    with pytest.raises(ConfigError) as excinfo:
        EMACallback(decay=0.9, decya=0.9)
    assert "unknown option(s) ['decya']" in one_line(excinfo)
    with pytest.raises(ConfigError) as excinfo:
        EMACallback(missing_state="ignore")
    assert "missing_state must be one of ['error', 'restart']" in one_line(excinfo)

    class Args:
        tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size = 2, 1, 1
        sharding, world_size, enable_auto_parallel = [], 2, False

    with pytest.raises(ConfigError) as excinfo:
        integration._check_parallelism(Args())
    assert "tensor parallel (tensor_model_parallel_size=2)" in one_line(excinfo)
    callback = EMACallback(decay=0.9)
    with pytest.raises(ConfigError) as excinfo:
        callback.on_train_begin(None, None, None, model=paddle.nn.Linear(2, 2))
    assert "must be called by a paddleformers Trainer" in one_line(excinfo)


def test_the_docs_example_runs(tmp_path, monkeypatch):
    page = Path(__file__).resolve().parents[1] / "docs" / "paddleformers.md"
    blocks = re.findall(r"```py\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    with paddle.utils.unique_name.guard():
        exec(compile(blocks[0], str(page), "exec"), namespace)
    metrics = namespace["metrics"]
    assert "eval_ema_loss" in metrics and metrics["eval_ema_loss"] != metrics["eval_loss"]
    callback, = [cb for cb in namespace["trainer"].callback_handler.callbacks if isinstance(cb, EMACallback)]
    assert callback.ema.num_updates == 8
    assert_bitwise(numpy_weights(namespace["weights"]), {n: callback.ema.average(n).numpy() for n in callback.ema.names})


def test_importing_paddle_ema_imports_no_paddleformers():
    import subprocess

    code = "import sys, paddle_ema, paddle_ema.integrations; print(sorted(m for m in sys.modules if 'paddleformers' in m))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
