"""The package's value checks, each written once: what an integer, a number and a choice are, and
the one-line ConfigError that names the setting and what it may hold.

Every front-end, the config schema, the environment reader and the engine call these instead of
their own isinstance tests, so that a bool is never an integer and a numpy integer always is.
"""

import math
from typing import Any, Dict, Iterable, Optional

import numpy as np

from ..errors import ConfigError

__all__ = ["is_integer", "check_int", "is_number", "is_finite_number", "check_number", "check_choice",
           "check_object_or_keywords"]


def is_integer(value: Any, minimum: Optional[int] = None) -> bool:
    """The package's one integer test: a Python or numpy integer (a bool is not one), >= `minimum`.

    Args:
        value: the value to test.
        minimum: the least value allowed; None for any integer.

    Returns:
        True when `value` passes.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return False
    return minimum is None or value >= minimum


def check_int(name: str, value: Any, minimum: Optional[int] = None) -> int:
    """`value` as an int, or a one-line ConfigError naming the setting.

    Args:
        name: the setting's name, as the message shows it.
        value: the value given.
        minimum: the least value allowed; None for any integer.

    Returns:
        int(value).
    """
    if not is_integer(value, minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ConfigError(f"{name} must be an integer{bound}, got {value!r}")
    return int(value)


def is_number(value: Any) -> bool:
    """A Python int or float (numpy's float64, a float, included); a bool is not a number here.

    Args:
        value: the value to test.

    Returns:
        True when `value` is one.
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """`is_number` and neither NaN nor infinite.

    Args:
        value: the value to test.

    Returns:
        True when `value` is one.
    """
    return is_number(value) and math.isfinite(value)


def check_number(name: str, value: Any, *, at_least: Optional[float] = None, above: Optional[float] = None,
                 at_most: Optional[float] = None) -> Any:
    """`value` when it is a number within the bounds given, else a one-line ConfigError naming the
    setting: "NAME must be a number in [LO, HI]" (at_least and at_most), "> LO" (above) or ">= LO".

    Args:
        name: the setting's name, as the message shows it.
        value: the value given.
        at_least: the least value allowed.
        above: the value must be greater than this.
        at_most: the greatest value allowed.

    Returns:
        `value`, unchanged.
    """
    ok = is_number(value)
    ok = ok and (at_least is None or value >= at_least) and (above is None or value > above)
    ok = ok and (at_most is None or value <= at_most)  # NaN fails every comparison
    if not ok:
        if at_least is not None and at_most is not None:
            allowed = f"in [{at_least:g}, {at_most:g}]"
        else:
            allowed = " and ".join(part for part in (
                f"> {above:g}" if above is not None else "", f">= {at_least:g}" if at_least is not None else "",
                f"<= {at_most:g}" if at_most is not None else "") if part)
        raise ConfigError(f"{name} must be a number {allowed}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any], shown: Optional[str] = None) -> Any:
    """`value` when it is one of `choices`, else a one-line ConfigError naming the setting.

    Args:
        name: the setting's name, as the message shows it.
        value: the value given.
        choices: the values allowed.
        shown: how the message lists them; default the list's repr, e.g. ['skip', 'raise'].

    Returns:
        `value`, unchanged.
    """
    choices = list(choices)
    try:
        allowed = value in choices
    except (TypeError, ValueError):  # an array's truth value, an unhashable value
        allowed = False
    if not allowed:
        raise ConfigError(f"{name} must be one of {list(choices) if shown is None else shown}, got {value!r}")
    return value


def check_object_or_keywords(name: str, value: Any, kind: type, keywords: Dict[str, Any]) -> None:
    """ConfigError unless an object argument (`rule=`, `policy=`) is None or a `kind`, given without
    the keywords it replaces (those not None).

    Args:
        name: the argument's name, e.g. 'rule'.
        value: the object given, or None.
        kind: the class it must be.
        keywords: keyword name -> value given (None when not given).
    """
    if value is None:
        return
    if not isinstance(value, kind):
        raise ConfigError(f"{name} must be of type {kind.__name__}, got {value!r}")
    given = [key for key, given_value in keywords.items() if given_value is not None]
    if given:
        raise ConfigError(f"{name}= replaces the keywords {sorted(keywords)}; give either {name}= or those, "
                          f"not both (also given: {', '.join(given)})")
