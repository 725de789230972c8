"""Command-line overrides: `-o a.b=c d=[1,2]`, values parsed as YAML.

Overrides merge into the config one dotted key at a time, so `-o A.B.c=1 A.B.d=2` sets both
(PaddleDetection builds {'A': {'B': {'c': 1}}} per option and the second replaces the first).
"""

from typing import Any, Dict, Iterable, List, Optional, Tuple

from .errors import ConfigFileError
from .loader import Config, _short, deep_merge, parse_yaml

__all__ = ["parse_overrides", "apply_overrides", "OVERRIDE_SOURCE"]

OVERRIDE_SOURCE = "-o"


def parse_overrides(items: Optional[Iterable[str]]) -> List[Tuple[List[str], Any]]:
    """Split `-o` items into dotted keys and YAML values; a malformed item is a ConfigFileError.

    Args:
        items: ['a.b=value', ...]; None for none.

    Returns:
        [(['a', 'b'], value), ...], in order; an empty value is None.
    """
    parsed = []
    for item in items or []:
        key, sep, text = item.partition("=")
        path = key.strip().split(".")
        shown = _short(item)
        if not sep or not all(path) or len(key) > 200:
            raise ConfigFileError(f"-o {shown}: an override is KEY=VALUE with a dotted KEY, e.g. -o ema_decay=0.999",
                                  OVERRIDE_SOURCE)
        if "\0" in item:
            raise ConfigFileError(f"-o {shown}: holds a NUL character", OVERRIDE_SOURCE, key.strip())
        try:
            value = parse_yaml(text, "-o") if text.strip() else None
        except ConfigFileError as exc:
            reason = str(exc)[len("-o: "):]
            raise ConfigFileError(f"-o {shown}: the value is {reason}", OVERRIDE_SOURCE, key.strip()) from None
        parsed.append((path, value))
    return parsed


def apply_overrides(config: Dict[str, Any], items: Optional[Iterable[str]]) -> Config:
    """Merge the `-o` items into `config` in order, recording '-o' as their origin.

    Args:
        config: a Config (merged in place), or a plain dict (copied into a new Config).
        items: ['a.b=value', ...]; None for none.

    Returns:
        The Config merged into.
    """
    if not isinstance(config, Config):
        config = Config(config)
    for path, value in parse_overrides(items):
        nested = value
        for key in reversed(path):
            nested = {key: nested}
        deep_merge(config, nested, config.origin, OVERRIDE_SOURCE)
    return config
