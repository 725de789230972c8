import os
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_ema import CheckpointError
from paddle_ema import checkpoint


def _files(value):
    return {".pdparams": {"w": paddle.full([64], value)}, ".pdopt": {"step": int(value)}}


def test_complete_checkpoint_verifies_and_loads(tmp_path):
    stem = str(tmp_path / "3")
    checkpoint.save_checkpoint(stem, _files(3.0))
    checkpoint.verify(stem)
    assert checkpoint.is_complete(stem)
    assert checkpoint.complete_checkpoints(str(tmp_path)) == [stem]
    assert checkpoint.safe_load(stem + ".pdopt") == {"step": 3}
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # no temporary files left behind


def _values(stem):
    return float(paddle.load(stem + ".pdparams")["w"].numpy()[0]), paddle.load(stem + ".pdopt")["step"]


def _dies_on_second_file(monkeypatch, leave_files=False):
    real = paddle.save
    calls = []

    def save(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # as if the process died between the two files
        real(obj, path)

    monkeypatch.setattr(paddle, "save", save)
    if leave_files:  # a SIGKILL runs no clean-up: the first file stays under its temporary name
        monkeypatch.setattr(checkpoint, "_remove_quietly", lambda path: None)


def test_interrupted_write_leaves_an_incomplete_stem_and_older_ones_intact(tmp_path, monkeypatch):
    checkpoint.save_checkpoint(str(tmp_path / "0"), _files(0.0))
    checkpoint.save_checkpoint(str(tmp_path / "1"), _files(1.0))
    _dies_on_second_file(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(str(tmp_path / "1"), _files(9.0))  # rewriting an existing stem
    monkeypatch.undo()
    # The old checkpoint is replaced only once its successor is complete: stem 1 is still the old one.
    checkpoint.verify(str(tmp_path / "1"))
    assert _values(str(tmp_path / "1")) == (1.0, 1)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n or n.endswith(checkpoint.JOURNAL_SUFFIX)]

    _dies_on_second_file(monkeypatch, leave_files=True)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(str(tmp_path / "2"), _files(2.0))  # a new stem, killed half way
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"checkpoint .*/2 is incomplete \(the run stopped while writing it: "
                                              r".*2.manifest.json is missing\); complete checkpoints there: 0, 1"):
        checkpoint.verify(str(tmp_path / "2"))
    checkpoint.verify(str(tmp_path / "0"))
    assert checkpoint.complete_checkpoints(str(tmp_path)) == [str(tmp_path / "0"), str(tmp_path / "1")]
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoint.verify(str(tmp_path / "7"))


def test_a_commit_killed_after_its_journal_is_read_as_the_new_checkpoint_and_finished(tmp_path, monkeypatch):
    stem = str(tmp_path / "1")
    checkpoint.save_checkpoint(stem, _files(1.0))
    real_replace = os.replace
    renames = []

    def dies_after_one_rename(src, dst):
        if os.path.basename(os.fspath(src)).startswith(".1.pd"):
            renames.append(dst)
            if len(renames) == 2:
                raise KeyboardInterrupt("killed between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_after_one_rename)
    monkeypatch.setattr(checkpoint, "_remove_quietly", lambda path: None)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(stem, _files(9.0))
    monkeypatch.undo()
    # .pdparams is renamed already, .pdopt is still under its temporary name, the old manifest is stale:
    assert os.path.exists(stem + checkpoint.JOURNAL_SUFFIX)
    paths = checkpoint.resolve(stem)
    assert paths[".pdparams"] == stem + ".pdparams" and ".tmp-" in paths[".pdopt"]
    assert paddle.load(paths[".pdopt"]) == {"step": 9}  # readers see the committed new checkpoint
    checkpoint.recover(str(tmp_path))  # what the next run does first, holding the run lock
    assert sorted(os.listdir(tmp_path)) == ["1.manifest.json", "1.pdopt", "1.pdparams"]
    checkpoint.verify(stem)
    assert _values(stem) == (9.0, 9)


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    checkpoint.save_checkpoint(str(tmp_path / "0"), _files(0.0))
    dead = 2**22 + 12345  # above the default pid_max: no such process
    (tmp_path / f".0.pdopt.tmp-{dead}").write_bytes(b"partial")
    (tmp_path / f".best_model.pdparams.tmp-{dead}").write_bytes(b"partial")
    (tmp_path / f".model.tmp-{dead}-abc123").mkdir()  # a staged_prefix folder
    alive = tmp_path / f".1.pdopt.tmp-{os.getpid()}"  # a live writer's file stays
    alive.write_bytes(b"in progress")
    checkpoint.recover(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(["0.manifest.json", "0.pdopt", "0.pdparams", alive.name])


def test_corrupted_and_truncated_files_are_named(tmp_path):
    stem = str(tmp_path / "5")
    checkpoint.save_checkpoint(stem, _files(5.0))
    data = bytearray(open(stem + ".pdparams", "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(stem + ".pdparams", "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=r"5.pdparams is truncated or corrupted \(its checksum does not match\)"):
        checkpoint.verify(stem)
    checkpoint.verify(stem, [".pdopt"])  # the other file is still fine

    loose = tmp_path / "loose.pdparams"  # a file without a manifest, cut short
    paddle.save({"w": paddle.ones([1000])}, str(loose))
    loose.write_bytes(loose.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"weights: .*loose.pdparams cannot be read: it is truncated, corrupted"):
        checkpoint.safe_load(loose, "weights")
    (tmp_path / "bad.manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest .*bad.manifest.json is unreadable"):
        checkpoint.verify(str(tmp_path / "bad"))


def test_atomic_save_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "x.pdparams"
    checkpoint.atomic_save({"w": paddle.ones([2])}, target)

    def broken(obj, file):
        file.write(b"partial")  # paddle.save writes into the file paddle_ema opened, then fails
        raise OSError("disk full")

    monkeypatch.setattr(paddle, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_save({"w": paddle.zeros([2])}, target)
    monkeypatch.undo()
    assert np.array_equal(paddle.load(str(target))["w"].numpy(), [1.0, 1.0])
    assert os.listdir(tmp_path) == ["x.pdparams"]


def test_staged_prefix_publishes_all_files_or_none(tmp_path):
    prefix = tmp_path / "out" / "model"

    def write(staged, value):
        for suffix in (".json", ".pdiparams"):
            Path(staged + suffix).write_text(value)

    with checkpoint.staged_prefix(prefix) as staged:
        write(staged, "first")
    assert sorted(os.listdir(tmp_path / "out")) == ["model.json", "model.pdiparams"]
    with pytest.raises(RuntimeError, match="check failed"):
        with checkpoint.staged_prefix(prefix) as staged:
            write(staged, "second")
            raise RuntimeError("check failed")
    assert sorted(os.listdir(tmp_path / "out")) == ["model.json", "model.pdiparams"]  # no staging left behind
    assert (tmp_path / "out" / "model.json").read_text() == "first"


# -- safe_load: what paddle.load gives, without running anything ---------------------------------

REPO = Path(__file__).resolve().parents[1]


def _same(a, b, where="value"):
    """`a` and `b` are the same objects: types, tensor dtypes, shapes, names and bits."""
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, paddle.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        if not a.name.startswith("generated_tensor"):  # arrays without a name get a new one at each load
            assert a.name == b.name, where
        assert np.array_equal(np.asarray(a.numpy()).view(np.uint8), np.asarray(b.numpy()).view(np.uint8)), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.flags.f_contiguous == b.flags.f_contiguous, where
        assert a.tobytes(order="A") == b.tobytes(order="A"), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif type(a).__name__ == "GeneratorState":
        assert a.__getstate__() == b.__getstate__(), where
    else:
        assert a == b and repr(a) == repr(b), where


def _same_as_paddle_load(path):
    for return_numpy in (False, True):
        _same(paddle.load(str(path), return_numpy=return_numpy),
              checkpoint.safe_load(path, return_numpy=return_numpy), str(path))


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """One epoch of each trainer: dygraph (EMA, SWA, post-hoc snapshots), static, ModelEMA (ppdet)."""
    import io

    from paddle_ema.engine import read_config
    from paddle_ema.engine.runs import build_trainer

    folder = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, extra in (("dygraph", "use_swa: true\nema_posthoc: true\nema_posthoc_every: 5\n"),
                        ("static", "mode: static\n"), ("ppdet", "ema_impl: ppdet\n")):
        config = folder / f"{name}.yml"
        config.write_text(f"_BASE_: [{REPO / 'configs' / 'lenet_digits.yml'}]\noutput_dir: {folder}\nepoch: 1\n"
                          "LeNet: {width: 4, hidden: 16}\nTrainReader: {batch_size: 256}\n" + extra)
        build_trainer(read_config(str(config)), name, stream=io.StringIO()).train()
        runs[name] = folder / name
    return runs


def test_every_file_the_trainers_write_loads_as_paddle_load_gives_it(trained_runs):
    files = [p for run in trained_runs.values() for p in sorted(run.rglob("*.pd*"))]
    suffixes = {p.name.split(".", 1)[1] for p in files}
    assert {"pdparams", "pdema", "pdopt"} <= suffixes and any(p.parent.name == "posthoc" for p in files)
    for path in files:
        _same_as_paddle_load(path)
    state = checkpoint.safe_load(trained_runs["ppdet"] / "model_final.pdopt")
    assert state["ema"]["impl"] == "ppdet" and type(state["rng"][0]).__name__ == "GeneratorState"


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_states_tensors_and_optimizers_load_as_paddle_load_gives_them(tmp_path, protocol):
    import collections

    model = paddle.nn.Linear(3, 2)
    schedule = paddle.optimizer.lr.CosineAnnealingDecay(0.1, T_max=10)
    optimizer = paddle.optimizer.Adam(schedule, parameters=model.parameters())
    model(paddle.randn([4, 3])).mean().backward()
    optimizer.step()
    schedule.step()
    objects = {
        "layer": model.state_dict(),
        "optimizer": optimizer.state_dict(),  # accumulators and the LR scheduler's state
        "half": {"f16": paddle.randn([3, 5]).astype("float16"), "bf16": paddle.randn([7]).astype("bfloat16"),
                 "f64": paddle.randn([2], dtype="float64"), "i64": paddle.arange(4), "b": paddle.to_tensor([True])},
        "tensor": paddle.randn([2, 2]),
        "nested": {"list": [paddle.ones([2]), 3, "x"], "ordered": collections.OrderedDict(a=1, b=[1.5]),
                   "set": {1, 2}, "scalar": np.float64(0.25), "rng": paddle.get_rng_state(), "none": None},
        "fortran": {"w": np.asfortranarray(np.arange(6.0).reshape(2, 3)), "empty": np.zeros((0, 4), np.float32)},
    }
    for name, obj in objects.items():
        path = tmp_path / f"{name}.pd"
        paddle.save(obj, str(path), protocol=protocol)
        _same_as_paddle_load(path)


def test_an_optimizer_state_with_master_weights_loads_as_paddle_load_gives_it(tmp_path):
    # The layout of a multi_precision optimizer's state_dict() for a float16 model (its float16
    # kernels run on GPUs only): float16 accumulators, float32 master weights, the LR scheduler.
    schedule = paddle.optimizer.lr.PiecewiseDecay([2, 4], [0.1, 0.01, 0.001])
    schedule.step()
    state = {"linear_0.w_0_moment1_0": paddle.randn([4, 4]).astype("float16"),
             "linear_0.w_0_beta1_pow_acc_0": paddle.to_tensor([0.9]),
             "master_weights": {"linear_0.w_0": paddle.randn([4, 4])}, "LR_Scheduler": schedule.state_dict()}
    paddle.save(state, str(tmp_path / "opt.pdopt"))
    _same_as_paddle_load(tmp_path / "opt.pdopt")


def test_a_static_mode_tensor_and_sliced_big_arrays_load_as_paddle_load_gives_them(tmp_path):
    import pickle

    paddle.enable_static()
    try:
        main, startup = paddle.static.Program(), paddle.static.Program()
        with paddle.static.program_guard(main, startup):
            weight = paddle.static.create_parameter([2, 3], "float32", name="w")
        scope = paddle.static.global_scope()
        paddle.static.Executor(paddle.CPUPlace()).run(startup)
        # not a state dict: paddle.save pickles the DenseTensor as eval('data', {'data': array})
        paddle.save([scope.find_var(weight.name).get_tensor()], str(tmp_path / "dense.pd"))
    finally:
        paddle.disable_static()
    assert b"eval" in (tmp_path / "dense.pd").read_bytes()
    _same_as_paddle_load(tmp_path / "dense.pd")
    # protocol 2 and 3 split an array over 2**30 bytes into slices; the layout, made with small parts
    whole = np.arange(12, dtype=np.float32).reshape(3, 4)
    saved = {"big@@.0": whole.ravel()[:5], "big@@.1": whole.ravel()[5:], "small": np.ones(2, np.float32),
             "UnpackBigParamInfor@@": {"big": {"OriginShape": (3, 4), "slices": ["big@@.0", "big@@.1"]}},
             "StructuredToParameterName@@": {"big": "big_0", "small": "small_0"}}
    (tmp_path / "big.pd").write_bytes(pickle.dumps(saved, protocol=2))
    _same_as_paddle_load(tmp_path / "big.pd")
    assert checkpoint.safe_load(tmp_path / "big.pd", return_numpy=True)["big"].tolist() == whole.tolist()


def test_safe_load_is_exported_and_refuses_what_paddle_save_never_writes(tmp_path):
    import pickle

    import paddle_ema

    assert paddle_ema.safe_load is checkpoint.safe_load
    cases = {  # a pickle paddle.save never writes, built only from allowed names: refused, not guessed at
        "object array": (np.array([1, "two"], dtype=object), r"numpy.dtype, which describes 'O8'"),
        "eval of another name": (None, r"builtins.eval, which would evaluate 'x'"),
        "structured dtype": (np.zeros(2, dtype=[("a", "f4")]), r"numpy.dtype, which describes 'V4'"),
        "datetime": (np.array(["2020-01-01"], dtype="M8[D]"), r"numpy.dtype, which describes 'M8'"),
    }
    for name, (value, pattern) in cases.items():
        path = tmp_path / f"{name}.pd"
        if value is None:
            path.write_bytes(b"\x80\x04cbuiltins\neval\nX\x01\x00\x00\x00x}\x86R.")  # eval('x', {})
        else:
            path.write_bytes(pickle.dumps({"w": value}, protocol=4))
        with pytest.raises(CheckpointError, match=rf"{name}.pd is refused: its pickle asks for {pattern}"):
            checkpoint.safe_load(path)
    fifo = tmp_path / "fifo.pdparams"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match=r"fifo.pdparams cannot be read \(it is a FIFO, not a regular file\)"):
        checkpoint.safe_load(fifo)  # opened without blocking, refused
    deep = b"\x80\x04" + b"]" * 100_000 + b"a" * 99_999 + b"."  # lists nested 100,000 deep: pickle builds them
    (tmp_path / "deep.pd").write_bytes(deep)
    with pytest.raises(CheckpointError, match=r"deep.pd cannot be read: values nested more than 200 levels deep"):
        checkpoint.safe_load(tmp_path / "deep.pd")
    shared = b"\x80\x04]\x94" + b"(h\x00h\x00l\x94" * 60 + b"."  # 60 levels, each list twice: 2**60 paths
    (tmp_path / "shared.pd").write_bytes(shared)
    assert isinstance(checkpoint.safe_load(tmp_path / "shared.pd", return_numpy=True), list)  # in milliseconds


def test_every_hostile_pickle_is_refused_naming_the_file_and_the_global(tmp_path):
    import pickle

    from hostile_files import KINDS, hostile_bytes

    names = {"os.system": "posix.system", "builtins.eval": "builtins.eval", "builtins.exec": "builtins.exec",
             "subprocess": "subprocess.check_call", "numpy.load": "numpy.load",
             "numpy.testing": "numpy.testing._private.utils.runstring", "getattr": "builtins.getattr",
             "functools.partial": "functools.partial"}
    assert set(names) == set(KINDS)
    for kind in KINDS:
        for protocol in (2, 4):
            marker = tmp_path / f"marker-{kind}-{protocol}"
            path = tmp_path / f"{kind}-{protocol}.pdparams"
            path.write_bytes(hostile_bytes(kind, marker, tmp_path, protocol))
            with pytest.raises(CheckpointError) as info:
                checkpoint.safe_load(path, "weights")
            name = "commands.check_call" if kind == "subprocess" and protocol == 2 else names[kind]  # Python 2's name
            assert str(info.value).startswith(f"weights: {path} is refused: its pickle asks for {name}, which ")
            assert not marker.exists()
            pickle.loads(path.read_bytes())  # the attack is real: pickle (and so paddle.load) runs it
            assert marker.exists(), kind


def test_stray_and_malformed_temporary_names_never_stop_a_recovery(tmp_path):
    checkpoint.save_checkpoint(str(tmp_path / "0"), _files(0.0))
    stray = [".x.tmp-99999999999999999999", ".y.tmp-0", ".z.tmp-4194305-abc", ".w.tmp-99999999999999999999-abc"]
    for name in stray:
        (tmp_path / name).write_bytes(b"?")
    kept = [".x.tmp-abc", ".tmp-5", "x.tmp-5"]  # not the writers' names: left alone
    for name in kept:
        (tmp_path / name).write_bytes(b"?")
    # a journal copied from a manifest (no `staged` names): its files are in place, so it commits
    (tmp_path / "0.manifest.json.next").write_bytes((tmp_path / "0.manifest.json").read_bytes())
    checkpoint.recover(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(["0.manifest.json", "0.pdopt", "0.pdparams", *kept])
    checkpoint.verify(str(tmp_path / "0"))
    assert _values(str(tmp_path / "0")) == (0.0, 0)
