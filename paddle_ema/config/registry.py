"""Named building blocks picked by config: `architecture: LeNet` plus a `LeNet:` section of arguments.

Four categories, each chosen by the top-level key of the same name:

    architecture: LeNet          LeNet: {num_classes: 10}
    dataset: Digits              Digits: {test_size: 450}
    optimizer: Momentum          Momentum: {momentum: 0.9}
    lr_schedule: CosineDecay     CosineDecay: {min_lr: 0.0}

User code adds its own with the decorator (and lists its module under `imports:` in the config):

    from paddle_ema.config import register

    @register("architecture")
    class MyNet(paddle.nn.Layer):
        def __init__(self, num_classes=10, width=32): ...

The trainer passes some arguments itself (`INJECTED`: the parameters and learning rate of an
optimizer, the split of a dataset, ...); a section may not set those. Everything else in the
constructor's signature is a valid section key, type-checked against its default value; numbers
must be finite, and `register(..., limits={arg: Limit(...)})` adds each argument's range (or a
check of its own), validated with the rest of the config before anything is built. An error the
constructor still raises (ValueError, AssertionError, ...) is one ConfigError naming the section.
"""

import difflib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from ..core.validation import is_number
from ..errors import ConfigError

__all__ = ["CATEGORIES", "INJECTED", "REGISTRY", "LIMITS", "Limit", "register", "lookup", "section_args", "create"]


@dataclass(frozen=True)
class Limit:
    """The allowed range of a section argument: [low, high], each end open when told; or `check`,
    a function returning what is wrong with a value (a string) or None.

    Args:
        low: the lower end.
        high: the upper end.
        low_open: exclude `low` itself.
        high_open: exclude `high` itself.
        check: a function value -> message or None, used instead of the range.
        text: how `describe` words the range; '' words it from low and high.
    """

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    check: object = None
    text: str = ""

    def problem(self, value: Any) -> Optional[str]:
        """What is wrong with `value` for this limit.

        Args:
            value: the section argument's value.

        Returns:
            A message, or None when it is allowed (or not a number: the type check reports that).
        """
        if self.check is not None:
            return self.check(value)
        if not is_number(value):
            return None  # the type check reports it
        low_ok = value > self.low if self.low_open else value >= self.low
        high_ok = value < self.high if self.high_open else value <= self.high
        return None if low_ok and high_ok else f"expected {self.describe()}"

    def describe(self) -> str:
        """The allowed values in words, for messages.

        Returns:
            `text` when set, else e.g. 'a value >= 0' or 'a value in [0, 1)'.
        """
        if self.text:
            return self.text
        low = "(" if self.low_open else "["
        high = ")" if self.high_open else "]"
        if self.high == math.inf:
            return f"a value {'>' if self.low_open else '>='} {self.low:g}"
        return f"a value in {low}{self.low:g}, {self.high:g}{high}"


LIMITS = {}  # registered name -> {argument: Limit}

CATEGORIES = ("architecture", "dataset", "optimizer", "lr_schedule")

# Arguments the trainer supplies, per category; a config section cannot set them.
INJECTED = {
    "architecture": (),
    "dataset": ("split",),
    "optimizer": ("parameters", "learning_rate"),
    "lr_schedule": ("base_lr", "total_steps", "steps_per_epoch"),
}

REGISTRY = {category: {} for category in CATEGORIES}


def register(category: str, name: Optional[str] = None,
             limits: Optional[Dict[str, Limit]] = None) -> Callable[[Callable], Callable]:
    """Decorator registering a class or factory function for config sections.

    Args:
        category: one of CATEGORIES.
        name: the name configs use; None for the factory's __name__.
        limits: {argument: Limit} bounding its section's arguments.

    Returns:
        The decorator; it returns the factory unchanged.
    """
    if category not in REGISTRY:
        raise ConfigError(f"register(): unknown category {category!r}; allowed: {', '.join(CATEGORIES)}")

    def decorate(factory):
        key = name or factory.__name__
        for other, entries in REGISTRY.items():
            if key in entries and entries[key] is not factory:
                raise ConfigError(f"register(): the name {key!r} is already taken in category {other!r}")
        REGISTRY[category][key] = factory
        if limits:
            LIMITS[key] = dict(limits)
        return factory

    return decorate


def find_category(name):
    """The category a registered name belongs to, or None."""
    for category, entries in REGISTRY.items():
        if name in entries:
            return category
    return None


def lookup(category: str, name: str) -> Callable:
    """The factory registered as `name`; ConfigError naming the closest match when there is none.

    Args:
        category: one of CATEGORIES.
        name: the registered name.

    Returns:
        The class or factory function.
    """
    entries = REGISTRY[category]
    if name not in entries:
        close = difflib.get_close_matches(str(name), entries, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{category}: {name!r} is not registered{hint}; allowed: {', '.join(sorted(entries))}")
    return entries[name]


def section_args(category: str, name: str) -> Dict[str, Any]:
    """The arguments a config section of `name` may set (not the trainer's `INJECTED` ones).

    Args:
        category: one of CATEGORIES.
        name: the registered name.

    Returns:
        {argument: default, or inspect.Parameter.empty when it has none}.
    """
    factory = lookup(category, name)
    signature = inspect.signature(factory)
    return {
        arg: param.default
        for arg, param in signature.parameters.items()
        if arg not in INJECTED[category]
        and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
    }


def create(category: str, config: Dict[str, Any], **injected: Any) -> Any:
    """Build the `category` entry that `config` selects, with its section's arguments plus `injected`.

    Args:
        category: one of CATEGORIES; `config[category]` names the entry.
        config: the whole config; its section of that name holds the arguments.
        **injected: the trainer's arguments, passed only where the factory accepts them and the
            section does not set them.

    Returns:
        What the factory returns.
    """
    name = config[category]
    factory = lookup(category, name)
    args = dict(config.get(name) or {})
    accepted = inspect.signature(factory).parameters
    for key, value in injected.items():
        if key in accepted:
            args.setdefault(key, value)
    try:
        return factory(**args)
    except (ValueError, AssertionError, OverflowError, ZeroDivisionError) as exc:
        if isinstance(exc, ConfigError):
            raise
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        given = {k: v for k, v in (config.get(name) or {}).items()}
        raise ConfigError(f"{name}: cannot build {category} {name} with {given}: {reason}") from None
