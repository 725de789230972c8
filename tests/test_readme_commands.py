"""README's "Training tools" commands run as written, in order, in a fresh copy of the repository,
and print what README says; paddle_ema's own commands keep Paddle's ccache warning and glog lines
out of their output, while a user's process that imports paddle_ema keeps Paddle's own notices.

The block runs once (a module fixture: about a minute on 2 cores) and the tests read its output.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Paddle's import-time warning, glog's line head (severity, MMDD, time, thread, file:line]), and
# any library's INFO record through the root handler `import paddle` installs (matplotlib's
# "generated new fontManager" on a machine without its font cache).
NOISE = re.compile(r"ccache|^[IW]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]|\[ +INFO\]", re.M)


def readme_block(heading):
    """The commands of the first ```bash block under `heading` in README.md, comments dropped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(f"\n{heading}\n"):]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def fresh_copy(destination):
    """The repository's tracked files (as they are in the working tree), nothing it generated."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        files = [name for name in listed.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = None
    if not files:  # not a git checkout (an unpacked sdist): everything but what runs leave behind
        shutil.copytree(ROOT, destination, ignore=shutil.ignore_patterns(
            ".git", "output", "output_inference", "__pycache__", "*.egg-info", "build", "dist"))
        return destination
    for name in files:
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def run(argv, cwd, **env):
    environment = {**os.environ, "PYTHONPATH": "", **env}
    for name in ("COLUMNS", "GLOG_minloglevel"):
        environment.pop(name, None)
    return subprocess.run(argv, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    """README's Training tools commands, run one after another in a fresh copy: (clone, [results])."""
    commands = readme_block("## Training tools")
    clone = fresh_copy(tmp_path_factory.mktemp("clone"))
    assert not (clone / "output").exists()
    # A fresh machine: no matplotlib font cache yet (the first run builds it).
    matplotlib_config = tmp_path_factory.mktemp("matplotlib")
    results = []
    for argv in commands:
        assert argv[0] == "python", argv  # run with this interpreter
        result = run([sys.executable, *argv[1:]], clone, MPLCONFIGDIR=str(matplotlib_config))
        assert result.returncode == 0, f"{shlex.join(argv)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        results.append((argv, result))
    return clone, results


def epoch_lines(text):
    return {int(m.group(1)): m.group(0) for m in re.finditer(r"^epoch (\d+): raw acc .*$", text, flags=re.M)}


def final_accuracies(text):
    raw, ema = re.search(r"^final: raw (\S+), EMA (\S+)$", text, flags=re.M).groups()
    return float(raw), float(ema)


def test_readme_commands_are_the_ones_tested(block):
    _, results = block
    scripts = [argv[1] for argv, _ in results]
    assert scripts == ["tools/train.py"] * 3 + ["tools/eval.py", "tools/export_model.py"]


def test_first_run_names_every_output_and_they_exist(block):
    clone, results = block
    (argv, result) = results[0]
    assert "--use_vdl" in argv
    run_dir = "output/lenet_digits"
    summary = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in result.stdout.splitlines()
               if line.startswith(("final weights:", "best weights:", "checkpoints:", "curves:", "VisualDL log:"))}
    assert summary["final weights"].startswith(f"{run_dir}/model_final.pdparams (EMA weights")
    assert summary["best weights"].startswith(f"{run_dir}/best_model.pdparams (epoch ")
    assert summary["checkpoints"] == (f"0, 1, ..., 10 and model_final in {run_dir} "
                                      f"(resume: -r {run_dir}/10, or -r auto for the newest)")
    assert summary["curves"] == f"{run_dir}/curves.png"
    assert summary["VisualDL log"] == f"{run_dir}/vdl (visualdl --logdir {run_dir}/vdl)"
    for name in ["model_final.pdparams", "model_final.pdema", "best_model.pdparams", "curves.png",
                 *(f"{epoch}.pdopt" for epoch in range(11))]:
        assert (clone / run_dir / name).is_file(), name
    assert any((clone / run_dir / "vdl").iterdir())


def test_resume_prints_the_first_runs_last_epochs_again(block):
    _, results = block
    first, resumed = results[0][1].stdout, results[1][1].stdout
    assert "-r" in results[1][0] and "resumed from output/lenet_digits/9: epoch 10, step 850" in resumed
    again = epoch_lines(resumed)
    assert sorted(again) == [11, 12]  # README: "epochs 11 and 12 print the first run's accuracies again"
    assert all(again[epoch] == epoch_lines(first)[epoch] for epoch in again)
    assert final_accuracies(resumed) == final_accuracies(first)


def test_override_changes_what_is_printed(block):
    clone, results = block
    argv, result = results[2]
    assert "ema_decay=0.9" in argv
    # The progress lines (stderr, every log_iter) show the decay capped at 0.9 from step 81 on...
    decays = [float(d) for d in re.findall(r"^epoch \d+/12 iter \d+/85 .*ema_decay (\S+)", result.stderr, re.M)]
    first = [float(d) for d in re.findall(r"^epoch \d+/12 iter \d+/85 .*ema_decay (\S+)", results[0][1].stderr, re.M)]
    assert len(decays) == len(first) == 60 and set(decays[4:]) == {0.9} and min(first[4:]) > 0.9
    # ... the EMA then follows the raw weights closely and ends at their accuracy (README's words)
    raw, ema = final_accuracies(result.stdout)
    assert ema == raw and final_accuracies(results[0][1].stdout)[1] != ema
    assert epoch_lines(result.stdout) != epoch_lines(results[0][1].stdout)
    # ... and its files went to its own output_dir, not the first run's
    assert (clone / "output" / "decay_0.9" / "lenet_digits" / "model_final.pdparams").is_file()


def test_eval_and_export_read_the_first_runs_final_weights(block):
    clone, results = block
    final_ema = final_accuracies(results[1][1].stdout)[1]
    evaluated = results[3][1].stdout.strip()
    assert evaluated == f"output/lenet_digits/model_final.pdparams: accuracy {final_ema:.4f} on 450 Digits eval images"
    exported = results[4][1].stdout.strip()
    assert exported.startswith("exported output_inference/lenet_digits (") and "predictions match" in exported
    assert (clone / "output_inference" / "lenet_digits.pdiparams").is_file()


def test_the_tools_print_no_ccache_warning_and_no_glog_lines(block):
    _, results = block
    for argv, result in results:
        assert not NOISE.search(result.stdout + result.stderr), (shlex.join(argv), result.stderr[-2000:])


CONSOLE_SCRIPT = """import sys
from paddle_ema.engine.cli import {main}
if __name__ == "__main__":
    sys.argv[0] = sys.argv[0].removesuffix(".exe")
    sys.exit({main}())
"""


def test_console_commands_and_the_kernels_command_print_no_noise(block, tmp_path):
    """paddle-ema-export (pip's wrapper script, run from the fresh copy's trained run) prints Paddle's
    executor notices when nothing hides them; python -m paddle_ema.kernels imports Paddle first."""
    clone, _ = block
    script = tmp_path / "paddle-ema-export"
    script.write_text(CONSOLE_SCRIPT.format(main="export_main"))
    exported = run([sys.executable, str(script), "-c", "configs/lenet_digits.yml", "--output_dir",
                    str(tmp_path / "inference")], clone, PYTHONPATH=str(clone))
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.startswith(f"exported {tmp_path / 'inference' / 'lenet_digits'} (")
    assert not NOISE.search(exported.stdout + exported.stderr), exported.stderr
    kernels = run([sys.executable, "-m", "paddle_ema.kernels"], clone, PYTHONPATH=str(clone))
    assert kernels.returncode == 0, kernels.stderr
    assert "kernel:     fused" in kernels.stdout and kernels.stderr == ""


def test_a_users_process_keeps_paddles_own_notices(tmp_path):
    """Importing paddle_ema in your own code hides nothing: Paddle's import warning appears exactly
    when `import paddle` alone prints it, and GLOG_minloglevel is left unset."""
    code = "import os, sys; import {module}; print(os.environ.get('GLOG_minloglevel'))"
    alone = run([sys.executable, "-c", code.format(module="paddle")], tmp_path)
    ours = run([sys.executable, "-c", code.format(module="paddle_ema")], tmp_path, PYTHONPATH=str(ROOT))
    assert alone.returncode == 0 and ours.returncode == 0, ours.stderr
    assert ("No ccache found" in ours.stderr) == ("No ccache found" in alone.stderr)
    assert ours.stdout.strip() == "None"
