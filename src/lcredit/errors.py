"""The one exception type for bad user input: caught by the entry points and shown as one line."""
import math

from omegaconf import OmegaConf


class ConfigError(ValueError):
    """A configuration key, value, file or combination that lcredit cannot run with.

    The message names the offending key or path and what would work instead.
    """


class DirectoryBusy(ConfigError):
    """The run directory is another live process's: nothing may be written there."""


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
