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
constructor's signature is a valid section key, type-checked against its default value.
"""

import difflib
import inspect

from ..errors import ConfigError

__all__ = ["CATEGORIES", "INJECTED", "REGISTRY", "register", "lookup", "section_args", "create"]

CATEGORIES = ("architecture", "dataset", "optimizer", "lr_schedule")

# Arguments the trainer supplies, per category; a config section cannot set them.
INJECTED = {
    "architecture": (),
    "dataset": ("split",),
    "optimizer": ("parameters", "learning_rate"),
    "lr_schedule": ("base_lr", "total_steps", "steps_per_epoch"),
}

REGISTRY = {category: {} for category in CATEGORIES}


def register(category, name=None):
    """Decorator registering a class or factory function under `name` (default: its __name__)."""
    if category not in REGISTRY:
        raise ConfigError(f"register(): unknown category {category!r}; allowed: {', '.join(CATEGORIES)}")

    def decorate(factory):
        key = name or factory.__name__
        for other, entries in REGISTRY.items():
            if key in entries and entries[key] is not factory:
                raise ConfigError(f"register(): the name {key!r} is already taken in category {other!r}")
        REGISTRY[category][key] = factory
        return factory

    return decorate


def find_category(name):
    """The category a registered name belongs to, or None."""
    for category, entries in REGISTRY.items():
        if name in entries:
            return category
    return None


def lookup(category, name):
    entries = REGISTRY[category]
    if name not in entries:
        close = difflib.get_close_matches(str(name), entries, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{category}: {name!r} is not registered{hint}; allowed: {', '.join(sorted(entries))}")
    return entries[name]


def section_args(category, name):
    """{argument: default or inspect.Parameter.empty} that a config section of `name` may set."""
    factory = lookup(category, name)
    signature = inspect.signature(factory)
    return {
        arg: param.default
        for arg, param in signature.parameters.items()
        if arg not in INJECTED[category]
        and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
    }


def create(category, config, **injected):
    """Build the `category` entry that `config` selects, with its section's arguments plus `injected`."""
    name = config[category]
    factory = lookup(category, name)
    args = dict(config.get(name) or {})
    accepted = inspect.signature(factory).parameters
    for key, value in injected.items():
        if key in accepted:
            args.setdefault(key, value)
    return factory(**args)
