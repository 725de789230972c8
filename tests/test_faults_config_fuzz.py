"""A hypothesis fuzzer of configs and -o overrides: encodings, key types, sizes, nesting, YAML
aliases and every argument of every registered section. In process, for many cases: reading the
config and building everything a run trains with (Trainer.check_config, plus one training step
when that succeeds) either works or raises one PaddleEMAError whose message is one bounded line;
no other exception, no hang. As separate processes, for a sample of the hostile files: tools/train.py
exits 0 or 2, with at most one `error:` line, no traceback, and the output folder (holding a
finished run) unchanged byte for byte when it refuses."""

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paddle_ema import PaddleEMAError
from paddle_ema.config.registry import CATEGORIES, REGISTRY, section_args
from paddle_ema.config.schema import FIELDS
from paddle_ema.engine import read_config
from paddle_ema.engine.runs import check_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "configs" / "lenet_digits.yml"
BASE = f"_BASE_: [{DEFAULT}]\nepoch: 1\nLeNet: {{width: 4, hidden: 8}}\nTrainReader: {{batch_size: 64}}\n"
SECTIONS = sorted((category, name, arg) for category in CATEGORIES for name in REGISTRY[category]
                  for arg in section_args(category, name))


def _bomb(depth, width=9):
    lines = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, depth):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


KEYS = ["1", "true", "null", "~", "2020-01-02", "3.5", "-7", "0x1F", "[1, 2]", "{a: 1}"]
ENCODINGS = ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1", "cp1252", "shift_jis"]

hostile_files = st.one_of(
    st.builds(lambda enc: (BASE + "# Grüße, ÿ — コンフィグ\nuse_ema: true\n").encode(enc, "replace"),
              st.sampled_from(ENCODINGS)),
    st.binary(min_size=1, max_size=300),
    st.builds(lambda key, where: (BASE + (f"{key}: 2\n" if where == "top" else f"LeNet:\n  {key}: 2\n")
                                  if not key.startswith(("[", "{")) else BASE + f"? {key}\n: 2\n").encode(),
              st.sampled_from(KEYS), st.sampled_from(["top", "section"])),
    st.builds(lambda digits, key: (BASE + f"{key}: {'9' * digits}\n").encode(),
              st.integers(4301, 8000), st.sampled_from(["epoch", "LeNet.width", "ema_decay", "seed"])),
    st.builds(lambda n, kind: (BASE + "LeNet: " + ("[" * n + "]" * n if kind == "list" else "{a: " * n + "1" + "}" * n)
                               + "\n").encode(), st.integers(65, 6000), st.sampled_from(["list", "dict"])),
    st.builds(lambda depth: (BASE + _bomb(depth)).encode(), st.integers(6, 12)),
    st.sampled_from([b"a: &x [*x]\n", b"a: &x {b: *x}\n", b"", b"# only a comment\n", b"\n\n",
                     (BASE + "epoch: .inf\n").encode(), (BASE + "base_lr: .nan\n").encode(),
                     (BASE + "seed: 4294967296\n").encode(), (BASE + "_BASE_: [.]\n").encode(),
                     (BASE + "LeNet: [1, 2]\n").encode(), b"\xef\xbb\xbf" + BASE.encode()]),
)

section_values = st.one_of(
    st.integers(-3, 3), st.integers(-(2**70), 2**70), st.sampled_from([0, 1, 4, 8, 10, 11, 449, 1797, 4096, 2**31]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(), st.text(max_size=8),
    st.lists(st.integers(-2, 20), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)

def FUZZ(examples):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _yaml(value):
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


COUNTS = {}  # test name -> {'ok': n, 'error': n}; printed at the end (pytest -s) for the docs' table


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    for name, counts in COUNTS.items():
        print(f"\n{name}: {counts}")


def outcome(path, overrides=()):
    """'ok' or 'error' for one config; any other exception fails the test with its traceback."""
    start = time.monotonic()
    try:
        cfg = read_config(str(path), list(overrides))
        trainer = check_config(cfg, do_eval=False)
        trainer.stream = io.StringIO()
        images, labels = trainer.data["train"].batch(np.arange(min(4, len(trainer.data["train"]))))
        trainer._step(images, labels)  # one step: nothing deferred to the first forward pass fails later
        result = "ok"
    except PaddleEMAError as exc:
        message = str(exc)
        assert "\n" not in message and 0 < len(message) < 2500, message[:3000]
        result = "error"
    assert time.monotonic() - start < 60, "a config took over a minute to read and build"
    counts = COUNTS.setdefault(os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0].split("::")[-1], {})
    counts[result] = counts.get(result, 0) + 1
    return result


@FUZZ(150)
@given(body=hostile_files)
def test_hostile_config_files_are_refused_in_one_line(tmp_path, body):
    path = tmp_path / "fuzz.yml"
    path.write_bytes(body)
    assert outcome(path) in ("ok", "error")
    (tmp_path / "main.yml").write_text(f"_BASE_: [{path}]\nepoch: 1\n")  # the same file as a _BASE_
    assert outcome(tmp_path / "main.yml") in ("ok", "error")


@FUZZ(300)
@given(entry=st.sampled_from(SECTIONS), value=section_values)
def test_every_section_argument_is_validated_before_anything_is_built(tmp_path, entry, value):
    category, name, arg = entry
    path = tmp_path / "fuzz.yml"
    path.write_text(BASE + f"{category}: {name}\n{name}: {{{arg}: {_yaml(value)}}}\n")
    assert outcome(path) in ("ok", "error")


override_keys = st.one_of(st.sampled_from(sorted(FIELDS)), st.sampled_from([f"{n}.{a}" for _, n, a in SECTIONS]),
                          st.sampled_from(["TrainReader.batch_size", "EvalReader.batch_size", "TrainReader.x.y",
                                           "epoch.sub", "_BASE_", "LeNet"]),
                          st.text(min_size=1, max_size=12))
override_values = st.one_of(st.text(max_size=30), st.builds(_yaml, section_values),
                            st.sampled_from(["[", "{a: 1", "&a [*a]", "!!python/object:os.system", "1e999",
                                             "9" * 5000, "[" * 3000, "{1: 2}", "2020-13-45", "\x00", "- a\n- b"]))


@FUZZ(200)
@given(items=st.lists(st.tuples(override_keys, override_values), min_size=1, max_size=3))
def test_overrides_are_refused_in_one_line(tmp_path, items):
    path = tmp_path / "fuzz.yml"
    path.write_text(BASE)
    assert outcome(path, [f"{k}={v}" for k, v in items]) in ("ok", "error")


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_out")
    cfg = read_config(str(DEFAULT), ["epoch=1", f"output_dir={folder}", "LeNet.width=4", "LeNet.hidden=8",
                                     "TrainReader.batch_size=128"])
    from paddle_ema.engine.runs import build_trainer

    build_trainer(cfg, "fuzz", stream=io.StringIO()).train()
    return folder


@FUZZ(8)
@given(body=hostile_files)
def test_a_sample_as_separate_processes(tmp_path, finished_run, body):
    path = tmp_path / "fuzz.yml"
    path.write_bytes(body)
    before = _files(finished_run)
    result = subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), "-c", str(path), "-o",
                             f"output_dir={finished_run}", "epoch=1"],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""}, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode in (0, 2), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    if result.returncode == 2:
        assert result.stderr.strip().splitlines() == errors and len(errors) == 1, result.stderr[-3000:]
        assert _files(finished_run) == before
    else:
        assert not errors
