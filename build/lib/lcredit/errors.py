"""The one exception type for bad user input: caught by the entry points and shown as one line."""


class ConfigError(ValueError):
    """A configuration key, value, file or combination that lcredit cannot run with.

    The message names the offending key or path and what would work instead.
    """


def check_choice(key: str, value, choices) -> None:
    try:
        known = value in choices
    except TypeError:  # an unhashable value (a list or a mapping) is no choice
        known = False
    if not known:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")


def check_range(key: str, value, lo=None, hi=None, *, lo_open=False, integer=False) -> None:
    """``value`` is a number (a whole one if ``integer``) within [lo, hi] (lo excluded if
    ``lo_open``); anything else is a ConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r} must be a {'whole ' if integer else ''}number")
    if integer and not float(value).is_integer():
        raise ConfigError(f"{key}={value!r} must be a whole number")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(f"{key}={value!r} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}={value!r} must be <= {hi}")
