"""Bad input never gets a traceback: hypothesis-generated configs raise ConfigError naming the key,
and corrupted, truncated or mismatched checkpoints make the tools exit 2 with one line, touching no file."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paddle_ema import PaddleEMAError
from paddle_ema.config.schema import FIELDS
from paddle_ema.engine import read_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "configs" / "lenet_digits.yml"
SCALARS = {k: f for k, f in FIELDS.items() if f.kind in ("bool", "int", "float", "str") and not f.nullable}

# Values that are never of the field's kind (a bool is no number here, a number no string).
WRONG_FOR = {
    "bool": st.one_of(st.integers(), st.text(min_size=1).filter(lambda s: s.lower() not in ("true", "false")), st.lists(st.integers(), max_size=2)),
    "int": st.one_of(st.booleans(), st.floats(allow_nan=False).filter(lambda x: x != int(x) if x == x and abs(x) < 1e300 else True), st.text(min_size=1), st.dictionaries(st.text(), st.integers(), max_size=2)),
    "float": st.one_of(st.booleans(), st.text(min_size=1), st.lists(st.floats(), max_size=2)),
    "str": st.one_of(st.integers(), st.booleans(), st.lists(st.text(), max_size=2), st.dictionaries(st.text(), st.integers(), max_size=2)),
}


def _write(tmp_path, body, name="bad.yml"):
    path = tmp_path / name
    path.write_text(body)
    return path


def _config_with(tmp_path, extra):
    body = f"_BASE_: [{DEFAULT}]\n" + yaml.safe_dump(extra, default_flow_style=False)
    return _write(tmp_path, body)


def _raises_config_error_naming(path, overrides, key):
    with pytest.raises(PaddleEMAError) as info:
        read_config(str(path), overrides)
    assert key in str(info.value), str(info.value)


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=st.data())
def test_wrong_types_name_the_key(tmp_path, data):
    key = data.draw(st.sampled_from(sorted(SCALARS)))
    value = data.draw(WRONG_FOR[SCALARS[key].kind])
    _raises_config_error_naming(_config_with(tmp_path, {key: value}), [], key)


@SETTINGS
@given(key=st.sampled_from(["ema_decay", "ema_min_decay"]), value=st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0 + 1e-9)).filter(lambda v: v == v))
def test_out_of_range_values_name_the_key(tmp_path, key, value):
    _raises_config_error_naming(_config_with(tmp_path, {key: value}), [], key)


@SETTINGS
@given(key=st.from_regex(r"[a-z][a-z_]{2,14}", fullmatch=True).filter(lambda k: k not in FIELDS and not k[0].isupper()))
def test_unknown_keys_name_the_key_in_the_file_and_override(tmp_path, key):
    _raises_config_error_naming(_config_with(tmp_path, {key: 1}), [], key)
    _raises_config_error_naming(DEFAULT, [f"{key}=1"], key)


@SETTINGS
@given(body=st.sampled_from(["a: [1, 2\n", "a: {b: 1\n", "\tepoch: 3\n", "epoch: 3\n epoch 4:\n- x\n", "key: 'unterminated\n", "- just\n- a list\n"]))
def test_broken_yaml_is_a_config_error(tmp_path, body):
    with pytest.raises(PaddleEMAError, match="bad.yml"):
        read_config(str(_write(tmp_path, body)), [])


@SETTINGS
@given(length=st.integers(1, 4))
def test_base_cycles_of_any_length_and_missing_bases(tmp_path, length):
    for i in range(length):
        _write(tmp_path, f"_BASE_: [c{(i + 1) % length}.yml]\n", f"c{i}.yml")
    with pytest.raises(PaddleEMAError, match="_BASE_ cycle: .*c0.yml"):
        read_config(str(tmp_path / "c0.yml"), [])
    _write(tmp_path, "_BASE_: [missing_base.yml]\n", "m.yml")
    with pytest.raises(PaddleEMAError, match="missing_base.yml"):
        read_config(str(tmp_path / "m.yml"), [])


# -- checkpoints, through the tools ---------------------------------------------------------------

def _tool(name, *args):
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": ""}, capture_output=True, text=True, timeout=240)


def _files(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_exit_2(result, pattern):
    import re

    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    result = _tool("train.py", "-c", str(DEFAULT), "-o", "epoch=2", f"output_dir={out}")
    assert result.returncode == 0, result.stderr
    return out / "lenet_digits"


def test_corrupted_truncated_and_mismatched_checkpoints(trained, tmp_path):
    before = _files(trained)
    # -r from another config: other architecture
    result = _tool("train.py", "-c", str(DEFAULT), "-o", "epoch=3", f"output_dir={trained.parent}",
                   "architecture=ResNet18", "-r", str(trained / "0"))
    _one_line_exit_2(result, r"-r .*/0: the checkpoint comes from another config \(.*architecture: 'LeNet' there, 'ResNet18' here")
    # -r from a run without EMA into one with it (missing EMA state)
    result = _tool("train.py", "-c", str(DEFAULT), "-o", "epoch=3", "use_ema=false", f"output_dir={trained.parent}",
                   "-r", str(trained / "0"))
    _one_line_exit_2(result, r"use_ema: True there, False here")
    assert _files(trained) == before  # nothing on disk was touched by the failed runs

    # a truncated copy of a complete checkpoint: the manifest's checksum catches it
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in trained.glob("0.*"):
        (broken / path.name).write_bytes(path.read_bytes())
    data = (broken / "0.pdopt").read_bytes()
    (broken / "0.pdopt").write_bytes(data[: len(data) // 2])
    result = _tool("train.py", "-c", str(DEFAULT), "-o", "epoch=3", f"output_dir={tmp_path}", "-r", str(broken / "0"))
    _one_line_exit_2(result, r"0.pdopt is truncated or corrupted \(its checksum does not match\)")

    # weights that are not a Paddle file at all, and weights of another model
    (tmp_path / "junk.pdparams").write_bytes(os.urandom(3000))
    result = _tool("eval.py", "-c", str(DEFAULT), "-o", f"weights={tmp_path / 'junk.pdparams'}")
    _one_line_exit_2(result, r"junk.pdparams cannot be read: it is truncated, corrupted or not a Paddle file")
    result = _tool("eval.py", "-c", str(DEFAULT), "-o", f"weights={trained / 'model_final.pdparams'}", "LeNet.width=8")
    _one_line_exit_2(result, r"model_final.pdparams do not fit the model: .*shape mismatches")
