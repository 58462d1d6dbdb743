"""The one exception type for bad user input: caught by the entry points and shown as one line."""
import math

from omegaconf import OmegaConf


class ConfigError(ValueError):
    """A configuration key, value, file or combination that lcredit cannot run with.

    The message names the offending key or path and what would work instead.
    """


class DirectoryBusy(ConfigError):
    """The run directory is another live process's: nothing may be written there."""


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
    if not math.isfinite(value):  # nan passes every comparison below
        raise ConfigError(f"{key}={value!r} must be a finite number")
    if integer and not float(value).is_integer():
        raise ConfigError(f"{key}={value!r} must be a whole number")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(f"{key}={value!r} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}={value!r} must be <= {hi}")


def check_finite(node, prefix: str = "") -> None:
    """Every number in a (resolved) config is finite: a nan or inf under any key is refused,
    naming the key (a nan passes any range check; saved as null, it would hide what ran)."""
    if isinstance(node, dict):
        for k, v in node.items():
            check_finite(v, f"{prefix}{k}.")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            check_finite(v, f"{prefix[:-1]}[{i}].")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{prefix[:-1]}={node!r} must be a finite number")


def check_config_finite(cfg) -> None:
    """check_finite over the resolved config (an interpolation that cannot resolve is left to
    the check that reads its key)."""
    if not OmegaConf.is_config(cfg):
        return check_finite(cfg)
    # the keys as written first (the message names the key the user set, not a copy of it
    # made by an interpolation), then what interpolations resolve to
    check_finite({k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items()
                  if k != "hydra"})
    try:
        node = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 — omegaconf's resolution errors vary by version
        return
    check_finite({k: v for k, v in node.items() if k != "hydra"})
