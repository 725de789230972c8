"""What a config may contain, checked before anything runs.

Top-level keys are the runtime settings in `FIELDS` (EMA keys are PaddleDetection's, with the
same meaning and defaults, plus new `ema_*` options for paddle_ema's EMA) and the sections of
registered building blocks (see registry.py). Every message names the file, the key, the value
and what is allowed; an unknown key comes with the closest valid one.
"""

import difflib
import importlib
import inspect
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict

from ..core.schedules import SCHEDULES
from ..core.validation import is_finite_number, is_integer
from .errors import ConfigFileError
from .loader import Config, _short
from .registry import CATEGORIES, LIMITS, REGISTRY, find_category, section_args

# Integers a runtime field may hold at most unless it says otherwise (counts, sizes, steps).
INT_MAX = 2**31 - 1

__all__ = ["FIELDS", "Field", "validate", "with_defaults", "import_user_modules"]

_EMPTY = inspect.Parameter.empty


@dataclass(frozen=True)
class Field:
    """One setting a config may hold: its kind, default and allowed values.

    Args:
        kind: 'bool', 'int', 'float', 'str', 'list' or 'dict'.
        default: the value `with_defaults` fills in.
        nullable: null (None) is allowed too.
        choices: the allowed strings, or a callable returning them (for registries).
        low: the smallest allowed number ('int' and 'float').
        high: the largest allowed number.
        keys: {key: Field} of a 'dict''s entries.
        items: the kind of a 'list''s entries, when checked.
        doc: a note for readers of FIELDS.
    """

    kind: str  # 'bool', 'int', 'float', 'str', 'list', 'dict'
    default: object = None
    nullable: bool = False
    choices: tuple = ()  # allowed strings; a callable returning them for registries
    low: float = -math.inf
    high: float = math.inf
    keys: dict = field(default_factory=dict)  # sub-fields of a 'dict'
    items: str = ""  # the kind of a 'list''s entries, when checked
    doc: str = ""


def _reader(batch_size, shuffle):
    return Field(
        "dict",
        default=None,
        keys={
            "batch_size": Field("int", batch_size, low=1, high=INT_MAX),
            "shuffle": Field("bool", shuffle),
            "drop_last": Field("bool", False),
        },
    )


def _registered(category):
    return lambda: tuple(sorted(REGISTRY[category]))


def _schedules():
    return tuple(sorted(SCHEDULES))


FIELDS = {
    # runtime
    "mode": Field("str", "dygraph", choices=("dygraph", "static"), doc="static needs paddle_ema.static"),
    "device": Field("str", "cpu", doc="'cpu', 'gpu', 'gpu:0', ..."),
    "seed": Field("int", 0, low=0, high=2**32 - 1, doc="numpy's and Paddle's seeds are 32-bit"),
    "epoch": Field("int", 10, low=1, high=1_000_000),
    "snapshot_epoch": Field("int", 1, low=1, high=INT_MAX),
    "log_iter": Field("int", 20, low=1, high=INT_MAX),
    "output_dir": Field("str", "output"),
    "weights": Field("str", None, nullable=True),
    "imports": Field("list", [], items="str", doc="modules to import first, so their @register entries exist"),
    "base_lr": Field("float", 0.1, low=0.0),
    "TrainReader": _reader(32, True),
    "EvalReader": _reader(256, False),
    # what to build
    "architecture": Field("str", "LeNet", choices=_registered("architecture")),
    "dataset": Field("str", "Digits", choices=_registered("dataset")),
    "optimizer": Field("str", "Momentum", choices=_registered("optimizer")),
    "lr_schedule": Field("str", "Constant", choices=_registered("lr_schedule")),
    # EMA: PaddleDetection's keys and defaults
    "use_ema": Field("bool", False),
    "ema_decay": Field("float", 0.9998, low=0.0, high=1.0),
    "ema_decay_type": Field("str", "threshold", choices=_schedules),
    "cycle_epoch": Field("int", -1, low=-1, high=INT_MAX),
    "ema_black_list": Field("list", None, nullable=True, items="str"),
    "ema_filter_no_grad": Field("bool", False),
    # EMA: paddle_ema's own options
    "ema_impl": Field("str", "paddle_ema", choices=("paddle_ema", "ppdet")),
    "ema_update_every": Field("int", 1, low=1, high=INT_MAX),
    "ema_start_step": Field("int", 0, low=0, high=2**62),
    "ema_device": Field("str", None, nullable=True),
    "ema_bias_correction": Field("bool", False),
    "ema_shard": Field("bool", False, doc="under paddle.distributed.launch each process keeps ~1/N of the averages"),
    "ema_include_stop_gradient": Field("bool", True, doc="average BatchNorm statistics (PaddleDetection does)"),
    "ema_tau": Field("float", 2000.0, low=0.0),
    "ema_power": Field("float", 2.0 / 3.0, low=0.0),
    "ema_inv_gamma": Field("float", 1.0, low=0.0),
    "ema_min_decay": Field("float", 0.0, low=0.0, high=1.0),
    "ema_nonfinite": Field("str", "skip", choices=("skip", "raise", "update"),
                           doc="an update on weights holding NaN/Inf: skip it (and count), raise, or average anyway"),
    # Beyond EMA: BatchNorm recalibration, stochastic weight averaging, post-hoc EMA snapshots
    "ema_update_bn": Field("bool", False, doc="recompute BatchNorm statistics for the EMA weights before eval/save"),
    "update_bn_batches": Field("int", None, nullable=True, low=1, high=INT_MAX,
                               doc="training batches per recalibration"),
    "use_swa": Field("bool", False),
    "swa_start_epoch": Field("int", None, nullable=True, low=0, high=INT_MAX,
                             doc="first averaged epoch (0-based); default 3/4"),
    "swa_every_epochs": Field("int", 1, low=1, high=INT_MAX),
    "swa_update_bn": Field("bool", True),
    "ema_posthoc": Field("bool", False, doc="store power-function EMA snapshots for tools/posthoc_ema.py"),
    "ema_posthoc_sigma_rels": Field("list", [0.05, 0.10], items="float"),
    "ema_posthoc_every": Field("int", 100, low=1, high=INT_MAX, doc="snapshot every N updates"),
    "ema_posthoc_dtype": Field("str", "float32", choices=("float32", "float16")),
}


def _error(config, dotted, message):
    source = config.where(dotted)
    return ConfigFileError(f"{source}: {message}", source, dotted)


def _is_kind(value, kind):
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return is_integer(value)
    if kind == "float":  # a finite number: NaN and Inf are never a setting
        return is_finite_number(value)
    return isinstance(value, {"str": str, "list": list, "dict": dict}[kind])


def _allowed(spec):
    choices = spec.choices() if callable(spec.choices) else spec.choices
    if choices:
        return "one of " + ", ".join(map(str, choices))
    text = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
            "list": "a list", "dict": "a mapping"}[spec.kind]
    if spec.kind == "float" and spec.low > -math.inf and spec.high < math.inf:
        text += f" in [{spec.low:g}, {spec.high:g}]"
    elif spec.low > -math.inf:
        text += f" >= {spec.low:g}"
        if spec.high < math.inf:
            text += f" and <= {spec.high}"
    if spec.kind == "float" and spec.high == math.inf:
        text += " (finite)"
    if spec.items:
        text = "a list of " + {"str": "strings", "int": "integers", "float": "numbers"}[spec.items]
    if spec.nullable:
        text += " (or null)"
    return text


def _check_value(config, dotted, value, spec):
    if value is None and (spec.nullable or spec.kind == "dict"):
        return
    choices = spec.choices() if callable(spec.choices) else spec.choices
    ok = _is_kind(value, spec.kind) and (not choices or value in choices)
    if ok and spec.kind in ("int", "float"):
        ok = spec.low <= value <= spec.high
    if ok and spec.items:
        ok = all(_is_kind(item, spec.items) for item in value)
    if not ok:
        raise _error(config, dotted, f"{dotted}: {_short(value)} is not allowed; expected {_allowed(spec)}")
    if spec.kind == "dict" and spec.keys:
        for key, sub in value.items():
            _check_known(config, f"{dotted}.{key}", key, spec.keys)
            _check_value(config, f"{dotted}.{key}", sub, spec.keys[key])


# A key that could be a config key; any other unknown key is not echoed in a message: the file may
# be no config at all (`_BASE_: /etc/shadow` parses as a mapping of whole lines).
_KEY_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def _check_known(config, dotted, key, valid):
    if key not in valid and not (isinstance(key, str) and _KEY_NAME.match(key)):
        parent = dotted[: len(dotted) - len(str(key))].rstrip(".")
        where = f" under {parent!r}" if parent else ""
        raise _error(config, dotted, f"a key{where} is no config key name (not shown: config keys are names of "
                                     "letters, digits and _); is this file a paddle_ema config?")
    if key not in valid:
        close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(map(str, valid)))}"
        raise _error(config, dotted, f"unknown key {dotted!r}{hint}")


def _check_section(config, category, name, section):
    if section is None:
        return
    if not isinstance(section, dict):
        raise _error(config, name, f"{name}: the arguments of {category} {name!r} are a mapping, "
                                   f"got {_short(section)}")
    args = section_args(category, name)
    limits = LIMITS.get(name, {})
    for key, value in section.items():
        dotted = f"{name}.{key}"
        _check_known(config, dotted, key, args)
        default = args[key]
        for kind in ("bool", "int", "float", "str"):
            if default is not None and default is not _EMPTY and _is_kind(default, kind):
                spec = Field(kind)
                if not _is_kind(value, kind):  # null too: leave the key out for the default
                    raise _error(config, dotted, f"{dotted}: {_short(value)} is not allowed; "
                                 f"expected {_allowed(spec)} like the default {default!r}")
                break
        if isinstance(value, float) and not math.isfinite(value):
            raise _error(config, dotted, f"{dotted}: {value!r} is not allowed; expected a finite number")
        if key in limits and value is not None:
            problem = limits[key].problem(value)
            if problem:
                raise _error(config, dotted, f"{dotted}: {_short(value)} is not allowed; {problem}")


def import_user_modules(config: Config) -> None:
    """Import the modules listed under `imports:` (from the working directory too).

    Args:
        config: the loaded Config (its origins name the file in messages).
    """
    modules = config.get("imports") or []
    _check_value(config, "imports", modules, FIELDS["imports"])
    if "" not in sys.path:
        sys.path.insert(0, "")
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise _error(config, "imports", f"imports: cannot import {module!r}: {exc}") from None


def validate(config: Config) -> Config:
    """Raise ConfigFileError for the first unknown key or bad value, after importing `imports:`.

    Args:
        config: the loaded Config (its origins name the file in messages).

    Returns:
        `config`, unchanged.
    """
    import_user_modules(config)
    valid = dict(FIELDS)
    for category in CATEGORIES:
        for name in REGISTRY[category]:
            valid[name] = None
    for key, value in config.items():
        _check_known(config, key, key, valid)
        spec = FIELDS.get(key)
        if spec is not None:
            _check_value(config, key, value, spec)
        else:
            _check_section(config, find_category(key), key, value)
    return config


def with_defaults(config: Dict[str, Any]) -> Dict[str, Any]:
    """Fill in every runtime field's default, in place (readers' sub-fields included).

    Args:
        config: a validated config.

    Returns:
        `config`, every runtime field present.
    """
    for key, spec in FIELDS.items():
        if spec.kind == "dict" and spec.keys:
            section = dict(config.get(key) or {})
            for sub, sub_spec in spec.keys.items():
                section.setdefault(sub, sub_spec.default)
            config[key] = section
        elif key not in config:
            config[key] = list(spec.default) if isinstance(spec.default, list) else spec.default
    return config
