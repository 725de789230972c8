"""No file the tools or the library read runs code: a pickle whose unpickling would write a marker
file (os.system, eval, exec, subprocess, numpy.load of a second pickle, numpy's runstring, a
getattr/__import__ chain, functools.partial) planted in a run folder, with the manifest's size and
SHA-256 rewritten to match, is refused by every reader: -r STEM, -r auto, eval -o weights=,
export, average_checkpoints, post-hoc (the final raw weights and a snapshot) and the library's
loaders. Each refusal is one line and exit status 2, no marker is written, nothing changes on disk.
(tests/test_checkpoint.py shows that each payload does run under pickle.)"""

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hostile_files import KINDS, plant
from paddle_ema import safe_load
from paddle_ema.engine import read_config
from paddle_ema.engine.cli import average_main, eval_main, export_main, posthoc_main, train_main
from paddle_ema.engine.run_checkpoints import load_resume_state, load_state_dict, load_weights
from paddle_ema.engine.runs import build_trainer
from paddle_ema.errors import CheckpointError
from paddle_ema.posthoc import synthesize

REPO = Path(__file__).resolve().parents[1]
BODY = ("epoch: 2\nlog_iter: 1000\nLeNet: {width: 4, hidden: 16}\nTrainReader: {batch_size: 256}\n"
        "ema_posthoc: true\nema_posthoc_every: 3\n")
GLOBALS = {"os.system": "posix.system", "builtins.eval": "builtins.eval", "builtins.exec": "builtins.exec",
           "subprocess": "subprocess.check_call", "numpy.load": "numpy.load",
           "numpy.testing": "numpy.testing._private.utils.runstring", "getattr": "builtins.getattr",
           "functools.partial": "functools.partial"}


def _config(folder):
    path = folder / "tiny.yml"
    path.write_text(f"_BASE_: [{REPO / 'configs' / 'lenet_digits.yml'}]\noutput_dir: {folder / 'output'}\n" + BODY)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pickle_run")
    build_trainer(read_config(str(_config(folder))), "tiny", stream=io.StringIO()).train()
    return folder / "output" / "tiny"


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run folder of its own, and its config."""
    shutil.copytree(trained, tmp_path / "output" / "tiny")
    return {"config": str(_config(tmp_path)), "dir": tmp_path / "output" / "tiny", "tmp": tmp_path}


def _files(folder):
    return {p: p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _snapshot(run):
    return sorted((run["dir"] / "posthoc").glob("posthoc_*.pdparams"))[-1]


# (name, file to plant relative to the run folder (None: a loose file), the tool's arguments)
TOOLS = {
    "-r STEM": ("0.pdopt", lambda r, f: train_main(["-c", r["config"], "-r", str(r["dir"] / "0")])),
    "-r auto": ("model_final.pdema", lambda r, f: train_main(["-c", r["config"], "-r", "auto"])),
    "eval -o weights=": ("model_final.pdparams",
                         lambda r, f: eval_main(["-c", r["config"], "-o", f"weights={f}"])),
    "eval, a loose file": (None, lambda r, f: eval_main(["-c", r["config"], "-o", f"weights={f}"])),
    "export": ("model_final.pdparams",
               lambda r, f: export_main(["-c", r["config"], "-o", f"weights={f}", "--output_dir",
                                         str(r["tmp"] / "exported")])),
    "average_checkpoints": ("0.pdparams", lambda r, f: average_main([str(r["dir"] / "0.pdparams"),
                                                                      str(r["dir"] / "model_final.pdparams"),
                                                                      "--output", str(r["tmp"] / "avg.pdparams")])),
    "posthoc, raw weights": ("model_final.pdema", lambda r, f: posthoc_main(["-c", r["config"], "--sigma-rel", "0.1"])),
    "posthoc, a snapshot": ("snapshot", lambda r, f: posthoc_main(["-c", r["config"], "--sigma-rel", "0.1"])),
}


@pytest.mark.parametrize("tool", list(TOOLS))
def test_every_tool_refuses_a_code_running_checkpoint_in_one_line(run, capsys, tool):
    relative, main = TOOLS[tool]
    # os.system against every tool, and each other payload against at least one
    for kind in ("os.system", KINDS[1 + list(TOOLS).index(tool) % (len(KINDS) - 1)]):
        marker = run["tmp"] / f"marker-{kind}"
        if relative is None:
            target = run["tmp"] / "loose.pdparams"
        elif relative == "snapshot":
            target = _snapshot(run)
        else:
            target = run["dir"] / relative
        plant(target, kind, marker, run["tmp"])
        before = _files(run["dir"])
        capsys.readouterr()
        assert main(run, target) == 2, tool
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith("error: ") and f"{target.name} is refused: its pickle asks for {GLOBALS[kind]}, " \
            "which " in lines[0], lines[0]
        assert not marker.exists(), f"{tool} ran the {kind} payload"
        assert _files(run["dir"]) == before  # nothing written, nothing removed
        assert not (run["tmp"] / "avg.pdparams").exists() and not list((run["tmp"] / "exported").glob("*"))


def test_every_library_loader_refuses_a_code_running_checkpoint(run):
    pristine = _files(run["dir"])
    stem = run["dir"] / "0"
    loaders = {
        "safe_load": (f"{stem}.pdparams", lambda path: safe_load(path)),
        "load_state_dict": (f"{stem}.pdparams", lambda path: load_state_dict(path, "weights")),
        "load_weights": (f"{stem}.pdema", lambda path: load_weights(_model(run), path)),
        "load_resume_state": (f"{stem}.pdopt", lambda path: load_resume_state(str(stem), use_ema=True)),
        "posthoc.synthesize": (str(_snapshot(run)), lambda path: synthesize(run["dir"] / "posthoc", sigma_rel=0.1)),
    }
    for kind in KINDS:
        marker = run["tmp"] / f"marker-{kind}"
        for name, (path, load) in loaders.items():
            plant(path, kind, marker, run["tmp"])
            with pytest.raises(CheckpointError, match=rf"{Path(path).name} is refused: its pickle asks for "
                                                      rf"{GLOBALS[kind]}, which "):
                load(path)
            assert not marker.exists(), f"{name} ran the {kind} payload"
            for file, data in pristine.items():  # the next loader reads an intact run
                file.write_bytes(data)


def _model(run):
    from paddle_ema.engine.builders import build_model
    from paddle_ema.engine.data import Digits

    return build_model(read_config(run["config"]), Digits("eval"))


def test_resume_of_a_code_running_pdopt_is_refused_by_the_tool_itself(run):
    # The case as it was found: `tools/train.py -r STEM` ran the payload, trained on and exited 0.
    marker = run["tmp"] / "marker"
    plant(run["dir"] / "0.pdopt", "os.system", marker, run["tmp"])
    before = _files(run["dir"])
    result = subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), "-c", run["config"], "-r",
                             str(run["dir"] / "0")], cwd=REPO, env={**os.environ, "PYTHONPATH": ""},
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: resume checkpoint (-r): {run['dir'] / '0.pdopt'} is refused: its pickle asks for posix.system, which "
        "is not in what paddle.save writes; nothing in it was run (paddle_ema loads only what paddle.save writes)"]
    assert not marker.exists() and _files(run["dir"]) == before
