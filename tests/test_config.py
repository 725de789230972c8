"""Config loading: _BASE_ merging, -o overrides, registry, validation messages."""

import os
import textwrap

import pytest

import paddle_ema.engine  # noqa: F401  (built-in registry entries)
from paddle_ema.config import ConfigFileError, apply_overrides, create, load_config, read_config, register
from paddle_ema.config.registry import REGISTRY
from paddle_ema.errors import ConfigError

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_bases_merge_in_order_dicts_deep_lists_replaced(tmp_path):
    write(tmp_path / "base" / "a.yml", """
        epoch: 3
        TrainReader: {batch_size: 8, shuffle: true}
        ema_black_list: [x, y]
        LeNet: {width: 4, hidden: 8}
    """)
    write(tmp_path / "base" / "b.yml", """
        _BASE_: [deeper/c.yml]
        epoch: 5
        TrainReader: {batch_size: 16}
    """)
    write(tmp_path / "base" / "deeper" / "c.yml", "seed: 7\nLeNet: {hidden: 32}\n")
    cfg = load_config(write(tmp_path / "main.yml", """
        _BASE_: [base/a.yml, base/b.yml]
        ema_black_list: [z]
        LeNet: {width: 6}
    """))
    assert cfg["epoch"] == 5  # later base wins
    assert cfg["TrainReader"] == {"batch_size": 16, "shuffle": True}  # dicts deep-merge
    assert cfg["ema_black_list"] == ["z"]  # lists replace
    assert cfg["seed"] == 7  # recursive, path relative to the including file
    assert cfg["LeNet"] == {"width": 6, "hidden": 32}  # file over bases; c.yml (in b) over a.yml
    assert cfg.where("LeNet.width").endswith("main.yml")
    assert cfg.where("LeNet.hidden").endswith("c.yml")
    assert cfg.where("TrainReader.shuffle").endswith("a.yml")


def test_base_cycle_is_an_error_naming_the_chain(tmp_path):
    write(tmp_path / "a.yml", "_BASE_: [b.yml]\n")
    write(tmp_path / "b.yml", "_BASE_: [a.yml]\n")
    with pytest.raises(ConfigError, match=r"_BASE_ cycle: .*a\.yml -> .*b\.yml -> .*a\.yml"):
        load_config(tmp_path / "a.yml")


def test_missing_base_names_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.yml"):
        load_config(write(tmp_path / "a.yml", "_BASE_: [nope.yml]\n"))


def test_overrides_under_one_parent_all_apply(tmp_path):
    cfg = load_config(write(tmp_path / "a.yml", "A: {B: {c: 0, d: 0, e: 0}}\n"))
    apply_overrides(cfg, ["A.B.c=1", "A.B.d=2", "f=[1, 2]", "g=text", "h=null", "i=1e-3"])
    # PaddleDetection's merge of {'A': {'B': {'c': 1}}} then {'A': {'B': {'d': 2}}} loses c.
    assert cfg["A"]["B"] == {"c": 1, "d": 2, "e": 0}
    assert cfg["f"] == [1, 2] and cfg["g"] == "text" and cfg["h"] is None and cfg["i"] == 1e-3
    assert cfg.where("A.B.c") == "-o" and cfg.where("A.B.e").endswith("a.yml")


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1", "x=[1,"])
def test_malformed_override(tmp_path, bad):
    cfg = load_config(write(tmp_path / "a.yml", "epoch: 1\n"))
    with pytest.raises(ConfigError, match="-o"):
        apply_overrides(cfg, [bad])


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("ema_decya: 0.9\n", r"cfg\.yml: unknown key 'ema_decya'; did you mean 'ema_decay'\?"),
        ("LeNet: {widht: 3}\n", r"cfg\.yml: unknown key 'LeNet\.widht'; did you mean 'width'\?"),
        ("TrainReader: {batch_sise: 3}\n", r"unknown key 'TrainReader\.batch_sise'; did you mean 'batch_size'"),
        ("ema_decay: 1.5\n", r"ema_decay: 1\.5 is not allowed; expected a number in \[0, 1\]"),
        ("ema_decay_type: expo\n", r"ema_decay_type: 'expo' is not allowed; expected one of .*exponential.*threshold"),
        ("use_ema: 3\n", r"use_ema: 3 is not allowed; expected true or false"),
        ("architecture: LeNt\n", r"architecture: 'LeNt' is not allowed; expected one of .*LeNet"),
        ("LeNet: {width: wide}\n", r"LeNet\.width: 'wide' is not allowed; expected an integer"),
        ("Momentum: {parameters: 3}\n", r"unknown key 'Momentum\.parameters'"),
        ("epoch: 0\n", r"epoch: 0 is not allowed; expected an integer >= 1"),
        ("ema_black_list: [fc, 3]\n", r"ema_black_list: \['fc', 3\] is not allowed; expected a list of strings \(or null\)"),
    ],
)
def test_validation_messages(tmp_path, text, pattern):
    path = write(tmp_path / "cfg.yml", "_BASE_: [base.yml]\n" + text)
    write(tmp_path / "base.yml", "epoch: 2\n")
    with pytest.raises(ConfigError, match=pattern):
        read_config(path)


def test_unknown_key_in_a_base_names_the_base(tmp_path):
    write(tmp_path / "base.yml", "use_emma: true\n")
    with pytest.raises(ConfigError, match=r"base\.yml: unknown key 'use_emma'; did you mean 'use_ema'"):
        read_config(write(tmp_path / "cfg.yml", "_BASE_: [base.yml]\n"))


def test_override_errors_name_the_command_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^-o: ema_decay: 2 is not allowed"):
        read_config(write(tmp_path / "cfg.yml", "epoch: 1\n"), ["ema_decay=2"])


def test_defaults_are_paddledetections(tmp_path):
    cfg = read_config(write(tmp_path / "cfg.yml", "epoch: 1\n"))
    assert (cfg["use_ema"], cfg["ema_decay"], cfg["ema_decay_type"], cfg["cycle_epoch"]) == (
        False, 0.9998, "threshold", -1)
    assert cfg["ema_black_list"] is None and cfg["ema_filter_no_grad"] is False
    assert cfg["TrainReader"] == {"batch_size": 32, "shuffle": True, "drop_last": False}


def test_register_extends_registry_and_create_builds_with_section(tmp_path):
    @register("architecture")
    class TinyNetForTest:
        def __init__(self, num_classes=10, in_channels=1, depth=2):
            self.args = (num_classes, in_channels, depth)

    try:
        cfg = read_config(write(tmp_path / "cfg.yml", "architecture: TinyNetForTest\nTinyNetForTest: {depth: 5}\n"))
        built = create("architecture", cfg, num_classes=3, in_channels=4)
        assert built.args == (3, 4, 5)
        with pytest.raises(ConfigError, match="did you mean 'depth'"):
            read_config(write(tmp_path / "bad.yml", "TinyNetForTest: {deep: 5}\n"))
    finally:
        del REGISTRY["architecture"]["TinyNetForTest"]
    with pytest.raises(ConfigError, match="already taken"):
        register("dataset", "LeNet")(lambda: None)


def test_imports_key_loads_user_registrations(tmp_path, monkeypatch):
    write(tmp_path / "my_blocks_for_test.py", """
        from paddle_ema.config import register

        @register("optimizer")
        def MyOptForTest(parameters, learning_rate, rho=0.5):
            return rho
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        cfg = read_config(write(tmp_path / "cfg.yml", """
            imports: [my_blocks_for_test]
            optimizer: MyOptForTest
            MyOptForTest: {rho: 0.25}
        """))
        assert create("optimizer", cfg, parameters=[], learning_rate=0.1) == 0.25
    finally:
        REGISTRY["optimizer"].pop("MyOptForTest", None)
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_x'"):
        read_config(write(tmp_path / "bad.yml", "imports: [no_such_module_x]\n"))


def test_errors_are_typed_and_carry_source_and_key(tmp_path):
    path = write(tmp_path / "cfg.yml", "TrainReader: {batch_size: 0}\n")
    with pytest.raises(ConfigFileError) as info:
        read_config(path)
    assert (info.value.source, info.value.key) == (str(path), "TrainReader.batch_size")
    assert isinstance(info.value, ConfigError)
    with pytest.raises(ConfigFileError) as info:
        read_config(path, ["TrainReader.batch_size=4", "LeNet.depth=3"])
    assert (info.value.source, info.value.key) == ("-o", "LeNet.depth")


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.endswith(".yml")))
def test_shipped_configs_validate(name):
    path = os.path.join(CONFIGS, name)
    cfg = read_config(path)
    assert cfg["architecture"] in REGISTRY["architecture"] and cfg["dataset"] in REGISTRY["dataset"]


# Hand-written probes of bad settings: each is one ConfigError naming the key, before anything is built.
@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["LeNet.width=0"], r"LeNet\.width: 0 is not allowed; expected a value in \[1, 512\]"),
        (["LeNet.num_classes=3"], r"LeNet\.num_classes: 3 does not fit the data: dataset Digits has 10 classes"),
        (["LeNet.image_size=4"], r"LeNet\.image_size: 4 does not fit the data: dataset Digits has 8 pixels a side"),
        (["Digits.test_size=0"], r"Digits\.test_size: 0 is not allowed; expected an integer in \[10, 1787\]"),
        (["optimizer=Adam", "Adam.beta1=2"], r"Adam\.beta1: 2 is not allowed; expected a value in \[0, 1\)"),
        (["Constant.warmup_steps=-5"], r"Constant\.warmup_steps: -5 is not allowed; expected a value in \[0, "),
        (["lr_schedule=PiecewiseDecay"], r"PiecewiseDecay\.milestones: None is not allowed; expected a non-empty list"),
        (["lr_schedule=PiecewiseDecay", "PiecewiseDecay.milestones=[5, 2]"],
         r"PiecewiseDecay\.milestones: \[5, 2\] is not allowed; expected a non-empty list of increasing epochs"),
        (["seed=4294967296"], r"seed: 4294967296 is not allowed; expected an integer >= 0 and <= 4294967295"),
        (["base_lr=.inf"], r"base_lr: inf is not allowed; expected a number >= 0 \(finite\)"),
        (["LeNet.width=null"], r"LeNet\.width: None is not allowed; expected an integer"),
        ([f"epoch={'9' * 5000}"], r"-o .*: the value is .*a value cannot be read \(Exceeds the limit \(4300 digits\)"),
        (["LeNet=" + "[" * 5000], r"-o .*: the value is not accepted: values nested more than 64 levels deep"),
        (["x={1: 2}"], r"-o .*: the value is the key 1 \(int\) is not allowed; keys are strings"),
    ],
)
def test_hand_written_probes_are_one_config_error(overrides, pattern):
    from paddle_ema.engine.runs import check_config

    with pytest.raises(ConfigError, match=pattern) as info:
        check_config(read_config(os.path.join(CONFIGS, "lenet_digits.yml"), overrides), do_eval=False)
    assert "\n" not in str(info.value) and len(str(info.value)) < 600


@pytest.mark.parametrize(
    "body, pattern",
    [
        ("# nothing but a comment\n".encode(), r"the config file holds no settings \(it is empty\)"),
        ("epoch: 1\n# Grüße\n".encode("utf-16"), r"is UTF-16 \(or binary\); save the config as UTF-8"),
        ("epoch: 1\n# Grüße\n".encode("latin-1"), r"is not UTF-8 text \(byte 0xfc at offset 13\)"),
        (b"epoch: 1\n\x00\x01\x02", r"holds NUL bytes"),
        (b"1: 2\n", r"the key 1 \(int\) is not allowed; keys are strings"),
        (b"LeNet: {true: 2}\n", r"the key True \(bool\) under 'LeNet' is not allowed"),
        (b"2020-01-02: 2\n", r"the key datetime.date\(2020, 1, 2\) \(date\) is not allowed"),
        ("\n".join([f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}" if i else "x"] * 9) + "]" for i in range(10)]).encode(),
         r"not accepted: more than 100000 values once its aliases \(\*name\) are expanded"),
        (b"a: &x [1, *x]\n", r"the alias \*x refers to a value that contains it"),
    ],
)
def test_hostile_files_are_one_config_error_also_as_a_base(tmp_path, body, pattern):
    import time

    (tmp_path / "bad.yml").write_bytes(body)
    (tmp_path / "main.yml").write_text("_BASE_: [bad.yml]\nepoch: 2\n")
    for path in (tmp_path / "bad.yml", tmp_path / "main.yml"):
        if path.name == "main.yml" and b"nothing but" in body:
            assert read_config(path)["epoch"] == 2  # an empty base is fine: the including file has settings
            continue
        start = time.monotonic()
        with pytest.raises(ConfigError, match=pattern):
            read_config(path)
        assert time.monotonic() - start < 5  # the alias bomb is refused while composing, not expanded
    with pytest.raises(ConfigError, match=r"is a folder; a config is a YAML file"):
        read_config(tmp_path)


@pytest.mark.parametrize(
    "body, overrides, pattern",
    [
        ("epoch: 3\nuse_ema: true\nepoch: 4\n", [],
         r"main\.yml: the key 'epoch' appears twice in one mapping \(lines 1 and 3\); write each key once"),
        ("LeNet:\n  width: 4\n  hidden: 8\n  width: 6\n", [], r"the key 'width' appears twice in one mapping \(lines 2 and 4\)"),
        ("LeNet: {width: 4, width: 6}\n", [], r"the key 'width' appears twice in one mapping \(lines 1 and 1\)"),
        ("epoch: 3\n", ["LeNet={width: 4, width: 6}"], r"-o .*the key 'width' appears twice in one mapping"),
    ],
)
def test_a_duplicate_key_is_an_error_naming_it(tmp_path, body, overrides, pattern):
    write(tmp_path / "main.yml", body + f"_BASE_: [{os.path.join(CONFIGS, 'lenet_digits.yml')}]\n")
    with pytest.raises(ConfigError, match=pattern):
        read_config(tmp_path / "main.yml", overrides)
    write(tmp_path / "base.yml", body)  # the same in a base
    write(tmp_path / "uses_base.yml", "_BASE_: [base.yml]\nseed: 1\n")
    if not overrides:
        with pytest.raises(ConfigError, match=r"base\.yml: the key '\w+' appears twice"):
            read_config(tmp_path / "uses_base.yml")


def test_a_merge_key_may_be_overridden_once(tmp_path):
    cfg = load_config(write(tmp_path / "main.yml", """
        defaults: &defaults {width: 4, hidden: 8}
        LeNet:
          <<: *defaults
          width: 6
    """))
    assert cfg["LeNet"] == {"width": 6, "hidden": 8}


@pytest.mark.timeout(60)
def test_a_fifo_as_config_or_base_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo.yml")
    with pytest.raises(ConfigError, match=r"fifo\.yml: is a FIFO, not a regular file; a config is a YAML file"):
        read_config(tmp_path / "fifo.yml")
    write(tmp_path / "main.yml", "_BASE_: [fifo.yml]\nepoch: 2\n")
    with pytest.raises(ConfigError, match=r"fifo\.yml: is a FIFO, not a regular file"):
        read_config(tmp_path / "main.yml")
    with pytest.raises(ConfigError, match=r"null: is a device or socket, not a regular file"):
        read_config("/dev/null")


SECRET = "hunter2-Zq8vX"
NOT_CONFIGS = {  # files a _BASE_ might name by mistake or malice; none of their text may be shown
    "shadow": f"root:$6$salt${SECRET}:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n",
    "passwd-like": f"{SECRET}:x:1000:1000::/home/{SECRET}:/bin/sh\n",
    "ini": f"[server]\npassword = {SECRET}\n",
    "private key": f"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA{SECRET}\n-----END OPENSSH PRIVATE KEY-----\n",
    "netrc": f"machine example.com login me password {SECRET}\n",
    "json": f'{{"token": "{SECRET}", "nested": {{"{SECRET}": 1}}}}\n',
    "yaml with a tag": f"token: !{SECRET} value\n",
    "yaml with an alias": f"token: *{SECRET}\n",
    "broken yaml": f"a: [1, 2\n{SECRET}: 3\n",
    "env file": f"export API_KEY={SECRET}\nexport {SECRET}_X=1\n",
}


@pytest.mark.parametrize("kind", list(NOT_CONFIGS))
def test_no_error_shows_text_of_a_file_that_is_not_a_config(tmp_path, kind):
    write(tmp_path / "secret", NOT_CONFIGS[kind])
    write(tmp_path / "main.yml", f"_BASE_: {tmp_path / 'secret'}\nepoch: 2\n")
    for path in (tmp_path / "main.yml", tmp_path / "secret"):
        with pytest.raises(ConfigError) as info:
            read_config(path)
        assert SECRET not in str(info.value) and "root:" not in str(info.value), str(info.value)
        assert "\n" not in str(info.value)


def test_the_real_etc_shadow_as_a_base_shows_none_of_it(tmp_path):
    if not os.access("/etc/shadow", os.R_OK):
        pytest.skip("/etc/shadow is not readable by this user: nothing of it can be shown")
    with open("/etc/shadow", encoding="utf-8", errors="replace") as f:
        fields = {field for line in f for field in line.strip().split(":") if len(field) >= 3}
    write(tmp_path / "main.yml", "_BASE_: /etc/shadow\nepoch: 2\n")
    with pytest.raises(ConfigError) as info:
        read_config(tmp_path / "main.yml")
    assert str(info.value).startswith("/etc/shadow: ")
    assert not [field for field in fields if field in str(info.value)[len("/etc/shadow: "):]], str(info.value)


def test_yaml_errors_give_the_position(tmp_path):
    write(tmp_path / "main.yml", "epoch: 3\nLeNet: [1, 2\nseed: 4\n")
    with pytest.raises(ConfigError, match=r"main\.yml: not valid YAML: while parsing a flow sequence; expected ',' or "
                                          r"'\]', but got ':' \(line 3, column 5\)"):
        read_config(tmp_path / "main.yml")
