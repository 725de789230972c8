"""Post-hoc EMA inputs that are refused, through tools/posthoc_ema.py and the library.

A snapshot index (posthoc_index.json) that is not what PostHocEMA writes, a snapshot that lacks an
entry, changes shape or holds NaN, an index entry that names a file outside the snapshot folder
(a path, '..', a link), flags that ask for what the snapshots cannot express (--gamma 1e300,
--sigma-rel 1e-9, --at past the last snapshot): each is one line and exit 2, with the snapshot
folder and the run's files unchanged and no output written. Widths that round to one name get
files of their own. The index is also fuzzed (hypothesis): whatever it holds, synthesis returns
finite weights from the folder's own files, or one PaddleEMAError line."""

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import paddle
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from paddle_ema.engine.cli import posthoc_main, train_main
from paddle_ema.errors import CheckpointError, ConfigError, PaddleEMAError
from paddle_ema.posthoc import INDEX, MAX_PROFILE_ERROR, profile_fit, read_index, sigma_rel_to_gamma, synthesize

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run with post-hoc snapshots at updates 10, 20, 30 and 40 (sigma_rel 0.05 and 0.10)."""
    folder = tmp_path_factory.mktemp("posthoc-run")
    config = folder / "tiny.yml"
    config.write_text(f"_BASE_: [{REPO / 'configs' / 'lenet_digits.yml'}]\noutput_dir: {folder / 'out'}\nepoch: 2\n"
                      "log_iter: 1000\nLeNet: {width: 4, hidden: 8}\nTrainReader: {batch_size: 64}\n"
                      "ema_posthoc: true\nema_posthoc_every: 10\n")
    assert train_main(["-c", str(config)]) == 0
    run_dir = folder / "out" / "tiny"
    return {"config": config, "run_dir": run_dir, "posthoc": run_dir / "posthoc", "tmp": folder}


def files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture
def snapshots(run, tmp_path):
    """A copy of the run's snapshot folder to break."""
    copy = tmp_path / "snapshots"
    shutil.copytree(run["posthoc"], copy)
    return copy


def index_of(folder):
    return json.loads((folder / INDEX).read_text())


def refused(run, capsys, *args, pattern):
    """tools/posthoc_ema.py with `args`: exit 2, one line matching `pattern`, nothing written or changed."""
    before = files(run["run_dir"])
    capsys.readouterr()
    code = posthoc_main(["-c", str(run["config"]), *args])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert "Traceback" not in err
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert files(run["run_dir"]) == before
    return lines[0]


# (index text, what the one line says)
BAD_INDEXES = [
    ("{}", r"posthoc_index.json is not a snapshot index: it must be an object \{\"snapshots\": \[...\]\}, got \{\}"),
    ("[]", r"not a snapshot index: it must be an object .*, got \[\]"),
    ('{"snapshots": {}}', r"not a snapshot index"),
    ('{"snapshots": []}', r"posthoc_index.json lists no snapshots"),
    ('{"snapshots": [7]}', r"snapshot 0 is a int, not an object with 'file', 't' and 'gamma'"),
    ('{"snapshots": [{"t": 10, "gamma": 6.9}]}', r"snapshot 0 lacks \['file'\]"),
    ('{"snapshots": [{"file": "posthoc_1_0000000010.pdparams", "t": "10", "gamma": 6.9}]}',
     r"snapshot 0 has 't' '10'; it must be an integer from 1 to 2\*\*62"),
    ('{"snapshots": [{"file": "posthoc_1_0000000010.pdparams", "t": 10.0, "gamma": 6.9}]}', r"has 't' 10.0"),
    ('{"snapshots": [{"file": "posthoc_1_0000000010.pdparams", "t": 0, "gamma": 6.9}]}', r"has 't' 0"),
    ('{"snapshots": [{"file": "posthoc_1_0000000010.pdparams", "t": true, "gamma": 6.9}]}', r"has 't' True"),
    ('{"snapshots": [{"file": "posthoc_1_0000000010.pdparams", "t": 10, "gamma": -5}]}',
     r"has 'gamma' -5; it must be a finite number >= 0"),
    ('{"snapshots": [{"file": "posthoc_1_0000000010.pdparams", "t": 10, "gamma": NaN}]}', r"has 'gamma' nan"),
    ('{"snapshots": [{"file": "posthoc_1_0000000010.pdparams", "t": 10, "gamma": Infinity}]}', r"has 'gamma' inf"),
    ('{"snapshots": [{"file": "posthoc_1_0000000010.pdparams", "t": 10, "gamma": "7"}]}', r"has 'gamma' '7'"),
    ('{"snapshots": [{"file": "posthoc_1_0000000010.pdparams", "t": 10, "gamma": 6.9, "sigma_rel": 3}]}',
     r"has 'sigma_rel' 3; it must be in \(0, 0.2887\]"),
    ('{"snapshots": [{"file": null, "t": 10, "gamma": 6.9}]}', r"has 'file' None; it must name a file in the snapshot"),
    ('{"snapshots": [{"file": "../../../../etc/passwd", "t": 10, "gamma": 6.9}]}', r"has 'file' '../../../../etc/passwd'"),
    ('{"snapshots": [{"file": "/etc/passwd", "t": 10, "gamma": 6.9}]}', r"has 'file' '/etc/passwd'"),
    ('{"snapshots": [{"file": "..", "t": 10, "gamma": 6.9}]}', r"has 'file' '..'"),
    ('{"snapshots": [{"file": "missing.pdparams", "t": 10, "gamma": 6.9}]}', r"names 'missing.pdparams', which is not in"),
    ('{"snapshots": [{"file": "posthoc_1_0000000010.pdparams", "t": 10, "gamma": 6.9}, '
     '{"file": "posthoc_1_0000000010.pdparams", "t": 20, "gamma": 6.9}]}',
     r"snapshot 1 names 'posthoc_1_0000000010.pdparams' a second time"),
    ("{not json", r"is not a snapshot index: it is not valid JSON \(Expecting property name"),
    ('{"snapshots": ' + "[" * 100_000 + "]" * 100_000 + "}", r"not valid JSON \(RecursionError\)"),
    (b"\xff\xfe{}", r"not valid JSON \(UnicodeDecodeError\)"),
    ("", r"not valid JSON \(Expecting value"),
]


@pytest.mark.parametrize("text, pattern", BAD_INDEXES, ids=[str(i) for i in range(len(BAD_INDEXES))])
def test_a_bad_index_is_one_line(run, snapshots, capsys, text, pattern):
    path = snapshots / INDEX
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = files(snapshots)
    refused(run, capsys, "--snapshots", str(snapshots), "--sigma-rel", "0.1", pattern=pattern)
    assert files(snapshots) == before
    with pytest.raises(CheckpointError, match=pattern):  # the library's reader says the same
        read_index(snapshots)


def test_links_and_special_files_in_the_snapshot_folder_are_refused(run, snapshots, capsys, tmp_path):
    outside = tmp_path / "outside.pdparams"
    shutil.copy(snapshots / "posthoc_1_0000000040.pdparams", outside)
    os.remove(snapshots / "posthoc_1_0000000040.pdparams")
    os.symlink(outside, snapshots / "posthoc_1_0000000040.pdparams")  # a link out, to a readable snapshot
    refused(run, capsys, "--snapshots", str(snapshots), "--sigma-rel", "0.1",
            pattern=r"snapshot 7 names 'posthoc_1_0000000040.pdparams', which is a link; snapshots are regular files")
    os.remove(snapshots / "posthoc_1_0000000040.pdparams")
    os.mkdir(snapshots / "posthoc_1_0000000040.pdparams")
    refused(run, capsys, "--snapshots", str(snapshots), "--sigma-rel", "0.1",
            pattern=r"'posthoc_1_0000000040.pdparams', which is not a regular file")
    index = snapshots / INDEX
    real = tmp_path / "index.json"
    shutil.move(index, real)
    os.symlink(real, index)
    refused(run, capsys, "--snapshots", str(snapshots), pattern=r"posthoc_index.json is not a regular file")
    os.remove(index)
    os.mkfifo(index)  # would block a reader that opens it
    refused(run, capsys, "--snapshots", str(snapshots), pattern=r"posthoc_index.json is not a regular file")


def _rewrite(path, change):
    state = paddle.load(str(path))
    change(state)
    paddle.save(state, str(path))


@pytest.mark.parametrize("case, change, pattern", [
    ("missing entry", lambda s: s.pop("classifier.3.bias"), r"holds other entries than the first snapshot used: "
                                                             r"missing \['classifier.3.bias'\]"),
    ("NaN", lambda s: s.__setitem__("features.0.weight", paddle.full_like(s["features.0.weight"], float("nan"))),
     r"posthoc_1_0000000040.pdparams \(t 40\): 'features.0.weight' holds NaN or Inf"),
    ("Inf", lambda s: s.__setitem__("classifier.3.bias", paddle.full_like(s["classifier.3.bias"], float("inf"))),
     r"'classifier.3.bias' holds NaN or Inf"),
    ("int64", lambda s: s.__setitem__("classifier.3.bias", s["classifier.3.bias"].astype("int64")),
     r"'classifier.3.bias' is int64; it must be floating point"),
    ("reshaped", lambda s: s.__setitem__("classifier.3.bias", s["classifier.3.bias"].reshape([1, -1])),
     r"'classifier.3.bias' has shape \[1, 10\], \[10\] here"),
    ("a list", None, r"is not a state dict of averaged weights"),
])
def test_a_bad_snapshot_is_refused_not_zero_filled(run, snapshots, capsys, case, change, pattern):
    if change is None:
        paddle.save([paddle.ones([2])], str(snapshots / "posthoc_1_0000000040.pdparams"))
    else:
        _rewrite(snapshots / "posthoc_1_0000000040.pdparams", change)
    before = files(snapshots)
    refused(run, capsys, "--snapshots", str(snapshots), "--sigma-rel", "0.1", pattern=pattern)
    with pytest.raises(CheckpointError, match=pattern):
        synthesize(snapshots, sigma_rel=0.1)
    assert files(snapshots) == before


@pytest.mark.parametrize("args, pattern", [
    (["--gamma", "1e300"], r"sigma_rel 1e-300 \(gamma 1e\+300\) at update 40 is beyond what the snapshots in .* express "
                           r"\(the closest combination misses the profile by 100%, more than 25%\); they synthesise "
                           r"sigma_rel 0\.0\d+ to 0\.\d+ there"),
    (["--sigma-rel", "1e-9"], r"sigma_rel 1e-09 \(gamma 1e\+09\) at update 40 is beyond what the snapshots .* they "
                              r"synthesise sigma_rel"),
    (["--at", "1000000000000"], r"at 1000000000000 is outside the stored snapshots' steps 10 to 40"),
    (["--at", "1000000000000", "--sigma-rel", "0.1"], r"at 1000000000000 is outside the stored snapshots' steps 10 to 40"),
    (["--at", "5"], r"at 5 is outside the stored snapshots' steps 10 to 40"),
    (["--gamma", "inf"], r"gamma must be a finite number >= 0, got inf"),
    (["--gamma", "nan"], r"gamma must be a finite number >= 0, got nan"),
    (["--gamma", "-1"], r"gamma must be a finite number >= 0, got -1.0"),
    (["--sigma-rel", "0.5"], r"sigma_rel must be in \(0, 0.2887\]"),
    (["--sigma-rel", "1e-320"], r"sigma_rel 1e-320 is too small"),
    (["--sigma-rel", "0.1", "0.1"], r"ask for sigma_rel 0.1 \(gamma 6.937\d*\) twice .* to posthoc_sigma0.100.pdparams"),
])
def test_flags_beyond_what_the_snapshots_express_are_one_line(run, capsys, args, pattern):
    refused(run, capsys, *args, pattern=pattern)


def test_the_allowed_range_is_what_the_closed_form_fit_allows(run):
    """The range a refusal names is where the fit's error is at most MAX_PROFILE_ERROR: checked
    here by evaluating the fit just inside and just outside both ends."""
    entries = read_index(run["posthoc"])
    with pytest.raises(ConfigError, match=r"synthesise sigma_rel ([\d.]+) to ([\d.]+) there") as caught:
        synthesize(run["posthoc"], sigma_rel=1e-3)
    import re

    low, high = map(float, re.search(r"sigma_rel ([\d.]+) to ([\d.]+) there", str(caught.value)).groups())
    used = [(e["t"], e["gamma"]) for e in entries]
    error = {s: profile_fit(used, 40, sigma_rel_to_gamma(s))[1] for s in (low * 0.999, low * 0.9, high, high * 1.1)}
    assert error[low * 0.999] <= MAX_PROFILE_ERROR * 1.05 and error[high] <= MAX_PROFILE_ERROR * 1.05
    assert error[low * 0.9] > MAX_PROFILE_ERROR
    if high * 1.1 <= math.sqrt(1 / 12):
        assert error[high * 1.1] > MAX_PROFILE_ERROR
    # a stored profile is reproduced exactly, the middle of the range closely
    assert profile_fit(used, 40, sigma_rel_to_gamma(0.05))[1] < 1e-6
    assert profile_fit(used, 40, sigma_rel_to_gamma(0.07))[1] < MAX_PROFILE_ERROR


def test_widths_that_round_to_one_name_write_two_files(run, capsys):
    capsys.readouterr()
    assert posthoc_main(["-c", str(run["config"]), "--sigma-rel", "0.1001", "0.1004"]) == 0
    out = capsys.readouterr().out
    a, b = (run["run_dir"] / f"posthoc_sigma{s}.pdparams" for s in ("0.1001", "0.1004"))
    assert str(a) in out and str(b) in out and "0.1001" in out and "0.1004" in out
    wa, wb = paddle.load(str(a)), paddle.load(str(b))
    want_a, _ = synthesize(run["posthoc"], sigma_rel=0.1001)
    want_b, _ = synthesize(run["posthoc"], sigma_rel=0.1004)
    np.testing.assert_array_equal(wa["features.0.weight"].numpy(), want_a["features.0.weight"])
    np.testing.assert_array_equal(wb["features.0.weight"].numpy(), want_b["features.0.weight"])
    assert not np.array_equal(want_a["features.0.weight"], want_b["features.0.weight"])


def test_the_default_sweep_leaves_out_what_the_snapshots_cannot_express(run, capsys):
    capsys.readouterr()
    assert posthoc_main(["-c", str(run["config"])]) == 0
    out = capsys.readouterr().out
    assert "left out of the sweep (beyond what the snapshots express): sigma_rel 0.02, 0.25" in out
    assert not (run["run_dir"] / "posthoc_sigma0.020.pdparams").exists()
    assert (run["run_dir"] / "posthoc_sigma0.040.pdparams").exists()
    used = [(e["t"], e["gamma"]) for e in read_index(run["posthoc"])]
    for sigma, kept in ((0.02, False), (0.04, True), (0.2, True), (0.25, False)):
        assert (profile_fit(used, 40, sigma_rel_to_gamma(sigma))[1] <= MAX_PROFILE_ERROR) == kept


def test_a_nan_average_is_never_written_as_a_snapshot(tmp_path):
    from paddle_ema.errors import NonFiniteError
    from paddle_ema.posthoc import PostHocEMA

    model = paddle.nn.Linear(3, 2)
    posthoc = PostHocEMA(model, tmp_path, sigma_rels=(0.1,), snapshot_every=1, snapshot_dtype="float16", nonfinite="update")
    posthoc.update()
    before = files(tmp_path)
    with paddle.no_grad():
        model.weight.set_value(paddle.full([3, 2], 1e6))  # finite in float32, beyond float16's range
    with pytest.raises(NonFiniteError, match=r"snapshot at update 2: the sigma_rel 0.1 average of 'weight' holds NaN "
                                             r"or Inf as float16; nothing is written"):
        posthoc.update()
    assert files(tmp_path) == before


# -- the index, fuzzed -------------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
FILES = st.sampled_from(["posthoc_0_0000000010.pdparams", "posthoc_1_0000000040.pdparams", "../posthoc/" + INDEX,
                         "/etc/passwd", "..", ".", "", "sub/x.pdparams", "missing.pdparams", INDEX, "a\0b"])
ENTRY = st.fixed_dictionaries({"file": FILES | JSON, "t": st.integers(-5, 60) | JSON,
                               "gamma": st.floats(-10, 40) | JSON},
                              optional={"sigma_rel": st.floats(-1, 1) | JSON})


# A change to the run's own index: (entry, key, new value), key None dropping the entry.
MUTATION = st.tuples(st.integers(0, 7), st.sampled_from(["file", "t", "gamma", "sigma_rel", "extra", None]),
                     FILES | st.integers(-3, 60) | st.floats(-1, 30) | JSON)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=st.one_of(JSON, st.fixed_dictionaries({"snapshots": st.lists(ENTRY, max_size=4)}),
                          st.fixed_dictionaries({"snapshots": st.lists(ENTRY | JSON, max_size=3)})),
       mutations=st.lists(MUTATION, max_size=3), mutate=st.booleans(), sigma_rel=st.sampled_from([0.05, 0.07, 0.1]))
def test_any_index_gives_finite_weights_from_the_folder_or_one_error_line(run, snapshots, document, mutations, mutate,
                                                                           sigma_rel):
    if mutate:  # the run's own index, changed in a few places
        document = index_of(run["posthoc"])
        for number, key, value in mutations:
            entries = document["snapshots"]
            if key is None:
                entries.pop(number % len(entries)) if entries else None
            elif entries:
                entries[number % len(entries)][key] = value
    (snapshots / INDEX).write_text(json.dumps(document))
    try:
        weights, info = synthesize(snapshots, sigma_rel=sigma_rel)
    except PaddleEMAError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 600
        event(f"refused: {type(exc).__name__}")
        return
    event("synthesised")
    for entry in info["snapshots"]:
        assert (snapshots / entry["file"]).resolve().parent == snapshots.resolve()
        assert entry["file"].startswith("posthoc_")
    assert weights and all(np.isfinite(v).all() for v in weights.values())
