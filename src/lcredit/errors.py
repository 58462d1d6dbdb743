"""The one exception type for bad user input: caught by the entry points and shown as one line."""


class ConfigError(ValueError):
    """A configuration key, value, file or combination that lcredit cannot run with.

    The message names the offending key or path and what would work instead.
    """


def check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")


def check_range(key: str, value, lo=None, hi=None, *, lo_open=False) -> None:
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(f"{key}={value!r} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}={value!r} must be <= {hi}")
