"""Disk faults end as one line `error: ...` naming the path, exit status 2, no traceback, and lose
nothing: a file-size limit (RLIMIT_FSIZE) hit while best_model and a checkpoint are rewritten, a
path through a file (ENOTDIR), and, where this process may mount (root), a full tmpfs (ENOSPC)
and a read-only one (EROFS). Unwritable outputs are found before anything trains."""

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from paddle_ema import checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": ""}


def tiny(folder, output, epoch=2):
    path = folder / "tiny.yml"
    path.write_text(f"_BASE_: [{REPO / 'configs' / 'lenet_digits.yml'}]\noutput_dir: {output}\n"
                    f"epoch: {epoch}\nlog_iter: 1000\nLeNet: {{width: 4, hidden: 16}}\nTrainReader: {{batch_size: 128}}\n")
    return path


def tool(name, *args, fsize=None):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # as a shell's ulimit -f leaves it: the tool must cope
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, str(REPO / "tools" / name), *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=240, preexec_fn=limit)


def one_line(result, pattern, trained=False):
    """Exit status 2 and one `error:` line, the last on stderr; before it only progress lines when the
    fault came after training had started (`trained`), none otherwise."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result.stderr, result.stderr
    assert trained or len(lines) == 1, result.stderr
    assert all(re.match(r"epoch \d+/\d+ iter ", line) for line in lines[:-1]), result.stderr
    assert re.search(pattern, lines[-1]), lines[-1]
    return lines[-1]


def files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("disk")
    config = tiny(folder, folder / "output")
    result = tool("train.py", "-c", str(config), "--eval")
    assert result.returncode == 0, result.stderr
    return {"folder": folder, "config": config, "out": folder / "output" / "tiny"}


def test_file_size_limit_while_rewriting_best_model_and_checkpoints_loses_nothing(trained, tmp_path):
    out = tmp_path / "output" / "tiny"
    shutil.copytree(trained["out"], out)
    config = tiny(tmp_path, tmp_path / "output", epoch=4)
    before = files(out)
    # 4 KiB: the probe passes, each checkpoint file (5-25 KiB) fails with EFBIG (SIGXFSZ would kill silently)
    result = tool("train.py", "-c", str(config), "--eval", "-r", "auto", fsize=4096)
    one_line(result, r"error: .*/tiny/(best_model|2)\.pdparams: File too large \(the file is larger than this "
                     r"process may write \(ulimit -f\); raise the limit\)", trained=True)
    assert files(out) == before  # the previous best_model and checkpoints byte for byte, no temporary left
    for stem in ("best_model", "0", "model_final"):
        checkpoint.verify(str(out / stem))


def test_a_path_through_a_file_is_refused_before_training_by_every_tool(trained, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    config = tiny(tmp_path, blocker / "sub")
    result = tool("train.py", "-c", str(config))
    one_line(result, rf"error: output_dir: cannot write to {blocker}/sub/tiny: {blocker}: Not a directory")
    assert "epoch 1/" not in result.stdout + result.stderr  # nothing trained
    result = tool("train.py", "-c", str(trained["config"]), "--eval", "-o", f"output_dir={tmp_path / 'o'}",
                  "--use_vdl", "--vdl_log_dir", str(blocker / "vdl"))
    one_line(result, rf"error: --vdl_log_dir: cannot write to {blocker}/vdl: .*Not a directory")
    assert not (tmp_path / "o").exists()  # the run's folder it made for itself is removed again
    result = tool("export_model.py", "-c", str(trained["config"]), "--output_dir", str(blocker / "exp"))
    one_line(result, r"error: --output_dir: cannot write to .*Not a directory")
    result = tool("average_checkpoints.py", str(trained["out"] / "0.pdparams"), str(trained["out"] / "model_final.pdparams"),
                  "--bn", "average", "--output", str(blocker / "avg.pdparams"))
    one_line(result, r"error: --output: cannot write to .*Not a directory")
    result = tool("average_checkpoints.py", str(trained["out"] / "0.pdparams"), "--bn", "average", "--output",
                  str(tmp_path))
    one_line(result, r"error: --output: .* is a folder; give the averaged .pdparams file's path")


def _mount_tmpfs(folder, size):
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"paddle-ema-{uuid.uuid4().hex[:8]}",
                           str(folder)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def make(name, size):
        folder = tmp_path / name
        if not _mount_tmpfs(folder, size):
            pytest.skip("mounting a tmpfs needs root and mount(8); the file-size-limit test covers the same path")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_full_file_system_stops_with_one_line_and_every_committed_checkpoint_loads(tmp_path, tmpfs):
    disk = tmpfs("small", "160k")  # room for about two checkpoints
    config = tiny(tmp_path, disk, epoch=6)
    result = tool("train.py", "-c", str(config), "--eval")
    one_line(result, r"error: .*: No space left on device \(the file system is full; free space or choose another "
                     r"folder\)", trained=True)
    complete = checkpoint.complete_checkpoints(str(disk / "tiny"))
    assert complete  # what was committed before the disk filled is intact ...
    for stem in complete:
        for suffix, path in checkpoint.resolve(stem).items():
            import paddle

            assert paddle.load(path)  # ... and loads
    assert not list((disk / "tiny").glob(".*.tmp-*"))  # the failed write removed its temporary files


def test_a_read_only_file_system_is_refused_before_training(trained, tmp_path, tmpfs):
    disk = tmpfs("ro", "4m")
    shutil.copytree(trained["out"], disk / "tiny")
    assert subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True).returncode == 0
    before = files(disk)
    config = tiny(tmp_path, disk, epoch=4)
    result = tool("train.py", "-c", str(config), "-r", "auto")
    one_line(result, rf"error: output_dir: cannot write to {disk}/tiny: .*Read-only file system \(the file system "
                     r"is read-only; choose a writable folder\)")
    assert "epoch 1/" not in result.stderr and files(disk) == before
    result = tool("export_model.py", "-c", str(trained["config"]), "--output_dir", str(disk / "exp"))
    one_line(result, r"error: --output_dir: cannot write to .*Read-only file system")
    result = tool("average_checkpoints.py", str(trained["out"] / "0.pdparams"), "--bn", "average",
                  "--output", str(disk / "avg.pdparams"))
    one_line(result, r"error: --output: cannot write to .*Read-only file system")
    result = tool("train.py", "-c", str(trained["config"]), "-o", f"output_dir={tmp_path / 'w'}", "--use_vdl",
                  "--vdl_log_dir", str(disk / "vdl"))
    one_line(result, r"error: --vdl_log_dir: cannot write to .*Read-only file system")
    assert files(disk) == before
