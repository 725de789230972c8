"""YAML config files with `_BASE_` inheritance.

    _BASE_: [../runtime.yml, ../datasets/digits.yml]   # paths relative to this file

Bases load recursively and merge in order: dicts merge key by key, everything else (lists
included) is replaced; a later base overrides an earlier one and the file overrides its bases.
Each leaf remembers the file it came from (`Config.origin`), so validation can name it.
"""

import copy
import os
import re

import yaml

from .errors import ConfigFileError

__all__ = ["BASE_KEY", "Config", "load_config", "deep_merge", "parse_yaml"]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-3 and 5E4 as floats (YAML 1.1 wants a dot: 1.0e-3)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text):
    return yaml.load(text, Loader=_Loader)

BASE_KEY = "_BASE_"


class Config(dict):
    """A plain dict of settings plus `origin`: dotted key -> file (or '-o') that set it, and `path`."""

    def __init__(self, data=None, origin=None, path=None):
        super().__init__(data or {})
        self.origin = dict(origin or {})
        self.path = path

    def where(self, dotted):
        """The file that set `dotted` (or its nearest parent), for messages."""
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


def deep_merge(base, override, origin=None, source=None, prefix=""):
    """Merge `override` into `base` in place: dicts recursively, other values replaced. Returns base."""
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


def _read_yaml(path):
    try:
        with open(path, encoding="utf-8") as handle:
            data = parse_yaml(handle)
    except FileNotFoundError:
        raise ConfigFileError(f"config file not found: {path}", path) from None
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{path}: not valid YAML: {' '.join(str(exc).split())}", path) from None
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
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigFileError(f"{path}: {BASE_KEY} must be a list of file paths, got {bases!r}", path, BASE_KEY)
    for base in bases:
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), os.path.expanduser(base)))
        if not os.path.isfile(base_path):
            raise ConfigFileError(f"{path}: {BASE_KEY} file not found: {base} (looked for {base_path})", path, BASE_KEY)
        _load(base_path, (*chain, real), data, origin)
    deep_merge(data, raw, origin, path)


def load_config(path):
    """Read `path` and its bases into a Config."""
    data, origin = {}, {}
    _load(os.fspath(path), (), data, origin)
    return Config(data, origin, os.fspath(path))
