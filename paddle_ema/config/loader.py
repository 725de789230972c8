"""YAML config files with `_BASE_` inheritance.

    _BASE_: [../runtime.yml, ../datasets/digits.yml]   # paths relative to this file

Bases load recursively and merge in order: dicts merge key by key, everything else (lists
included) is replaced; a later base overrides an earlier one and the file overrides its bases.
Each leaf remembers the file it came from (`Config.origin`), so validation can name it.
"""

import copy
import os
import re
import stat
from typing import Any, Dict, Optional, Union

import yaml

from .errors import ConfigFileError

__all__ = ["BASE_KEY", "Config", "load_config", "deep_merge", "parse_yaml", "MAX_FILE_BYTES", "MAX_DEPTH", "MAX_NODES"]

# Bounds on what a config may be, so that hostile input ends in a clear error, not a hang.
MAX_FILE_BYTES = 1 << 20  # a config file, or one -o value
MAX_DEPTH = 64  # nesting of mappings and lists
MAX_NODES = 100_000  # values after expanding every YAML alias (a "billion laughs" file has 10**9)


class YAMLLimitError(yaml.YAMLError):
    """A document exceeds MAX_DEPTH or MAX_NODES, or has a recursive alias."""


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names one key twice (YAML would silently keep the last)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-3 and 5E4 as floats (YAML 1.1 wants a dot: 1.0e-3), and bounds
    nesting and alias expansion while composing (before anything walks the values)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth, self._total, self._sizes = 0, 0, {}

    def _count(self, size):
        self._total += size
        if self._total > MAX_NODES:
            raise YAMLLimitError(f"more than {MAX_NODES} values once its aliases (*name) are expanded")

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            anchor = self.peek_event().anchor
            if anchor in self.anchors:
                size = self._sizes.get(id(self.anchors[anchor]))
                if size is None:
                    raise YAMLLimitError(f"the alias *{anchor} refers to a value that contains it (a recursive alias)")
                self._count(size)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise YAMLLimitError(f"values nested more than {MAX_DEPTH} levels deep")
        before = self._total
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._count(1)
        self._sizes[id(node)] = self._total - before
        return node

    def construct_mapping(self, node, deep=False):
        # Explicit keys only: a `<<: *base` merge may be overridden by a key of the mapping itself.
        if isinstance(node, yaml.MappingNode):
            lines = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if not isinstance(key, str):  # refused later as a non-string key
                    continue
                line = key_node.start_mark.line + 1
                if key in lines:
                    raise DuplicateKeyError(f"the key {_shown_key(key)} appears twice in one mapping (lines "
                                            f"{lines[key]} and {line}); write each key once")
                lines[key] = line
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _key_problem(value, dotted="", depth=0):
    """The first mapping key in `value` that is not a string, as a message, or None."""
    if isinstance(value, dict):
        for key, sub in value.items():
            if not isinstance(key, str):
                where = f" under {dotted!r}" if dotted else ""
                return (f"the key {_short(key)} ({type(key).__name__}){where} is not allowed; keys are strings "
                        "(quote it: '1': ...)")
            problem = _key_problem(sub, f"{dotted}.{key}" if dotted else key, depth + 1)
            if problem:
                return problem
    elif isinstance(value, list):
        for item in value:
            problem = _key_problem(item, dotted, depth + 1)
            if problem:
                return problem
    return None


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$")


def _shown_key(key):
    """A key for a message: names as they are; anything else (maybe a line of a file that is not a
    config) not shown."""
    return repr(key) if isinstance(key, str) and _NAME.match(key) else f"({type(key).__name__}, not shown)"


def _yaml_problem(exc):
    """What is wrong in a YAML document, with its position but none of its text: the document may
    be a file that is not a config (`_BASE_: /etc/shadow`)."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return type(exc).__name__
    # PyYAML quotes document text in its problems (a tag, an alias, an anchor: no spaces) with %r;
    # a quoted character, a token kind like '<scalar>' and quoted punctuation (' or ') stay.
    parts = [re.sub(r"'(?!<)[^'\s]{4,}'|\"[^\"\s]{4,}\"", "'...'", part) for part in (exc.context, exc.problem) if part]
    mark = exc.problem_mark or exc.context_mark
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return "; ".join(parts)[:300] + where


def _short(value, limit=60):
    import reprlib

    shown = reprlib.Repr()
    shown.maxstring = shown.maxother = limit
    return shown.repr(value)


def parse_yaml(text: str, where: str = "<yaml>") -> Any:
    """The YAML value of `text`, bounded (see MAX_*); ConfigFileError naming `where` when it is not valid.

    Args:
        text: the YAML document.
        where: the file (or '-o') it came from, for messages.

    Returns:
        The parsed value (None for an empty document); mapping keys are strings.
    """
    if len(text) > MAX_FILE_BYTES:
        raise ConfigFileError(f"{where}: {len(text)} characters; at most {MAX_FILE_BYTES} are read", where)
    try:
        value = yaml.load(text, Loader=_Loader)
    except YAMLLimitError as exc:
        raise ConfigFileError(f"{where}: not accepted: {exc}", where) from None
    except DuplicateKeyError as exc:
        raise ConfigFileError(f"{where}: {exc}", where) from None
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{where}: not valid YAML: {_yaml_problem(exc)}", where) from None
    except ValueError as exc:  # an integer of more than 4300 digits, a date like 2020-13-45
        raise ConfigFileError(f"{where}: a value cannot be read ({' '.join(str(exc).split())[:200]})", where) from None
    except RecursionError:
        raise ConfigFileError(f"{where}: values nested too deeply", where) from None
    problem = _key_problem(value)
    if problem:
        raise ConfigFileError(f"{where}: {problem}", where)
    return value

BASE_KEY = "_BASE_"


class Config(dict):
    """A plain dict of settings plus `origin`: dotted key -> file (or '-o') that set it, and `path`.

    Args:
        data: the settings; None for none.
        origin: {dotted key: file or '-o' that set it}; None for none.
        path: the config file read, for messages; None when there is none.
    """

    def __init__(self, data: Optional[Dict[str, Any]] = None, origin: Optional[Dict[str, str]] = None,
                 path: Optional[str] = None):
        super().__init__(data or {})
        self.origin = dict(origin or {})
        self.path = path

    def where(self, dotted: str) -> str:
        """The file that set `dotted` (or its nearest parent), for messages.

        Args:
            dotted: a dotted key, e.g. 'TrainReader.batch_size'.

        Returns:
            That file (or '-o'); the config's path, or '<config>', when none is recorded.
        """
        key = dotted
        while key:
            if key in self.origin:
                return self.origin[key]
            key = key.rpartition(".")[0]
        return self.path or "<config>"


def _record(origin, value, source, prefix):
    origin[prefix] = source
    if isinstance(value, dict):
        for key, sub in value.items():
            _record(origin, sub, source, f"{prefix}.{key}")


def deep_merge(base: Dict[str, Any], override: Dict[str, Any], origin: Optional[Dict[str, str]] = None,
               source: Optional[str] = None, prefix: str = "") -> Dict[str, Any]:
    """Merge `override` into `base` in place: dicts recursively, other values replaced (deep copies).

    Args:
        base: the dict merged into.
        override: the settings that win.
        origin: {dotted key: source} to update for every key set; None records nothing.
        source: the file (or '-o') that `override` came from.
        prefix: the dotted key of `base` inside the whole config, ending in '.' ('' at the top).

    Returns:
        `base`.
    """
    for key, value in override.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            if origin is not None:
                origin[dotted] = source
            deep_merge(base[key], value, origin, source, dotted + ".")
        else:
            if origin is not None:
                for stale in [k for k in origin if k.startswith(dotted + ".")]:
                    del origin[stale]
                _record(origin, value, source, dotted)
            base[key] = copy.deepcopy(value)
    return base


def _read_bytes(path):
    """The bytes of the regular file `path` (links followed), at most MAX_FILE_BYTES + 1. Opened
    without blocking and checked with fstat, so a FIFO or a device is refused, never waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigFileError(f"config file not found: {path}", path) from None
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot be read ({exc.strerror})", path) from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigFileError(f"{path}: is a folder; a config is a YAML file", path)
        if not stat.S_ISREG(info.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device or socket"
            raise ConfigFileError(f"{path}: is {kind}, not a regular file; a config is a YAML file", path)
        if info.st_size > MAX_FILE_BYTES:
            raise ConfigFileError(f"{path}: {info.st_size} bytes; a config file is at most {MAX_FILE_BYTES} bytes",
                                  path)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as handle:
            fd = None
            return handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot be read ({exc.strerror})", path) from None
    finally:
        if fd is not None:
            os.close(fd)


def _read_text(path):
    data = _read_bytes(path)
    if len(data) > MAX_FILE_BYTES:
        raise ConfigFileError(f"{path}: over {MAX_FILE_BYTES} bytes; a config file is at most {MAX_FILE_BYTES} bytes",
                              path)
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(data) > 1 and b"\0" in data[:2]):
        raise ConfigFileError(f"{path}: is UTF-16 (or binary); save the config as UTF-8", path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"{path}: is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                              "save the config as UTF-8", path) from None
    if "\0" in text:
        raise ConfigFileError(f"{path}: holds NUL bytes (a binary file?); a config is UTF-8 YAML text", path)
    return text


def _read_yaml(path):
    data = parse_yaml(_read_text(path), path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: a config file holds a mapping of keys, got {type(data).__name__}", path)
    return data


def _load(path, chain, data, origin):
    real = os.path.realpath(path)
    if real in chain:
        cycle = " -> ".join(os.path.relpath(p) for p in (*chain, real))
        raise ConfigFileError(f"_BASE_ cycle: {cycle}", path, BASE_KEY)
    raw = _read_yaml(path)
    bases = raw.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigFileError(f"{path}: {BASE_KEY} must be a list of file paths, got {_short(bases)}", path, BASE_KEY)
    for base in bases:
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), os.path.expanduser(base)))
        if os.path.isdir(base_path):
            raise ConfigFileError(f"{path}: {BASE_KEY} {base} is a folder (looked at {base_path}); list YAML files",
                                  path, BASE_KEY)
        if not os.path.exists(base_path):
            raise ConfigFileError(f"{path}: {BASE_KEY} file not found: {base} (looked for {base_path})", path, BASE_KEY)
        _load(base_path, (*chain, real), data, origin)
    deep_merge(data, raw, origin, path)
    return raw


def load_config(path: Union[str, os.PathLike]) -> Config:
    """Read `path` and its bases into a Config. A file without any setting (empty, or comments only)
    is an error: it would silently train every default (EMA off).

    Args:
        path: the YAML config file.

    Returns:
        The merged settings, with each key's origin.
    """
    path = os.fspath(path)
    if not path:
        raise ConfigFileError("-c: an empty config path; give a YAML file", path)
    data, origin = {}, {}
    if not _load(path, (), data, origin) and not data:
        raise ConfigFileError(f"{path}: the config file holds no settings (it is empty); write at least one key, "
                              f"e.g. {BASE_KEY}: [configs/lenet_digits.yml]", path)
    return Config(data, origin, path)
