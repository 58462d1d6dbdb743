"""Checks on a run's configuration and the files it names, made before anything runs.

A user's mistake must be one ``lcredit: error:`` line naming the key or file, before any
training, directory or cache entry exists — never a traceback from deep inside torch or
Lightning, never a run that silently does something else.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Literal, TypedDict

import torch
from omegaconf import DictConfig, OmegaConf

from lcredit.diagnostics.protocol import ProtocolOptions
from lcredit.errors import ConfigError, check_config_finite
from lcredit.options import Index, NonNegative, Positive, Range, Seed, check_options, unknown_key

# What a resumed run may change: how long it trains, how it logs, where it writes, and how the
# protocol watches it. Everything else (model, method, data, seed, optimiser, precision, ...)
# must be the checkpoint's, or the results would carry settings the run did not have.
RESUME_MAY_CHANGE = {
    "trainer": {"max_epochs", "min_epochs", "max_steps", "min_steps", "max_time",
                "log_every_n_steps", "enable_progress_bar", "enable_model_summary",
                "accelerator", "devices", "compile", "limit_val_batches", "val_check_interval",
                "check_val_every_n_epoch"},
    "top": {"resume", "init_from", "paths", "logger", "callbacks", "protocol", "hydra", "tags",
            "debug", "experiment", "threads", "auto_resume", "skip_completed", "snapshot_epochs"},
}


# The run's own options (conf/config.yaml) that are numbers or switches; the groups' options are
# declared by the constructors they configure (lcredit.options).
class RunOptions(TypedDict, total=False):
    seed: Seed
    snapshot_epochs: list[Index]
    block_grad_clip: Positive | None
    fixed_network: bool
    lr_schedule: Literal["constant", "cosine"]
    auto_resume: bool
    skip_completed: bool | Literal["auto"]


# What lcredit asks of Lightning's Trainer options beyond their types (which Lightning's
# signature declares): a run that trains, and trains at least one batch.
class TrainerLimits(TypedDict, total=False):
    max_epochs: Annotated[int, Range(1)] | Literal[-1] | None
    max_steps: Annotated[int, Range(1)] | Literal[-1]
    limit_train_batches: (Annotated[int, Range(1)] | Annotated[float, Range(0.0, 1.0, lo_open=True)]
                          | None)


# ... and of an optimiser's (torch's signatures say float, not which floats).
class OptimLimits(TypedDict, total=False):
    lr: Positive
    weight_decay: NonNegative
    momentum: NonNegative


CONF = Path(__file__).resolve().parent / "conf"
GROUPS = {"method", "model", "data", "trainer", "logger", "callbacks", "protocol", "hydra",
          "optim", "experiment", "debug"}


def _keys(node) -> dict:
    """A yaml node's key tree: {key: subtree or None for a leaf}."""
    return {k: _keys(v) if isinstance(v, dict) else None for k, v in node.items()}


def known_keys() -> dict:
    """The keys lcredit's run config may hold outside the instantiated groups (whose keys
    their classes' signatures check when built): the top level and the protocol and paths
    nodes, read from the yaml that defines them."""
    base = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))
    base.pop("defaults", None)
    top = _keys(base) | {g: None for g in GROUPS}
    top["protocol"] = _keys(OmegaConf.to_container(OmegaConf.load(CONF / "protocol" /
                                                                  "default.yaml")))
    top["study"] = None  # a study's node is its own (lcredit.jobs reads it)
    top["arm"] = None    # `arm=<arm>` with experiment=<study>: one job of it
    return top


def check_keys(node, known: dict, prefix: str = "") -> None:
    """Every key of ``node`` is one ``known`` has (where known has a subtree): a typo or a
    ``+key`` that nothing reads is refused, naming the nearest known key."""
    for k, v in node.items():
        if k not in known:
            raise unknown_key(k, known, prefix, "no such option (nothing reads it)")
        if isinstance(known[k], dict) and isinstance(v, dict) and known[k]:
            check_keys(v, known[k], f"{prefix}{k}.")


def validate(cfg: DictConfig) -> None:
    """The run-level options (seed, optimiser, trainer length, protocol) are usable, every key
    is one lcredit reads, and no number anywhere in the config is nan or infinite."""
    check_keys(OmegaConf.to_container(cfg, resolve=False), known_keys())
    check_config_finite(cfg)
    check_options(RunOptions, {k: _get(cfg, k) for k in RunOptions.__annotations__ if k in cfg})
    optim = cfg.get("optim")
    if optim:
        check_options(OptimLimits, {k: _get(optim, k, "optim.") for k in
                                    OptimLimits.__annotations__ if k in optim}, "optim")
    trainer = cfg.get("trainer") or {}
    check_options(TrainerLimits, {k: _get(trainer, k, "trainer.") for k in
                                  TrainerLimits.__annotations__ if k in trainer}, "trainer")
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    bounded = (max_steps is not None and max_steps not in (-1,)) or trainer.get("max_time")
    if (max_epochs is None or max_epochs == -1) and not bounded:
        raise ConfigError(f"trainer.max_epochs={max_epochs} runs forever: give a number of "
                          f"epochs >= 1 (or bound the run with trainer.max_steps)")
    protocol = cfg.get("protocol")
    if protocol:
        validate_protocol(protocol)
    validate_study(cfg)


def validate_study(cfg: DictConfig) -> None:
    """``scale`` names a scale; a study's config runs as a study's job, never as one odd run
    (without its sweep it would train the base config's rule at seed 0 and call it the study);
    snapshot epochs are epochs of the run."""
    scale = cfg.get("scale", "paper")
    if scale not in ("paper", "smoke"):
        raise ConfigError(f"scale={scale!r}: the scales are paper (the original settings) and "
                          f"smoke (the offline version)")
    study = cfg.get("study")
    if study is not None and study.get("arm") is None:
        name = study.get("name", "?")
        raise ConfigError(f"experiment={name} is a study: run all of it with "
                          f"`python -m lcredit.train experiment={name} -m` (or `python -m "
                          f"lcredit.study {name}`); its jobs are the arms of its study node")
    snaps = cfg.get("snapshot_epochs") or []
    max_epochs = (cfg.get("trainer") or {}).get("max_epochs")
    for e in snaps:
        if isinstance(max_epochs, int) and max_epochs > 0 and e > max_epochs:
            raise ConfigError(f"snapshot_epochs: {e} is after the run's last epoch "
                              f"(trainer.max_epochs={max_epochs})")


def _get(node, key, prefix=""):
    """A value, with an interpolation that cannot resolve reported as a ConfigError."""
    try:
        return node[key]
    except Exception as err:  # noqa: BLE001 — omegaconf's resolution errors vary by version
        raise ConfigError(f"{prefix}{key}: {err}") from None


def validate_protocol(p) -> None:
    """The protocol's options (``ProtocolOptions``): the run's, or an audit's thresholds."""
    check_options(ProtocolOptions, p, "protocol")


def writable_dir(path, key: str) -> Path:
    """``path`` as a directory this process can write into (created if need be)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".lcredit-write-check-"):
            pass
    except OSError as err:
        raise ConfigError(f"{key}={path}: cannot write there ({err.strerror or err})") from None
    return path


def read_checkpoint(path, key: str) -> dict:
    """A Lightning checkpoint written by lcredit, or a ConfigError naming ``key`` and the file."""
    if path is None or str(path) == "":
        raise ConfigError(f"{key} is empty: give a checkpoint file (<run dir>/checkpoints/last.ckpt)")
    path = Path(str(path))
    if not path.is_file():
        raise ConfigError(f"{key}={path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise ConfigError(f"{key}={path}: the file is empty (an interrupted copy or write?)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 — truncated zip, pickle garbage, wrong format
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{key}={path}: not a readable checkpoint ({first[:160]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"{key}={path}: not a Lightning checkpoint (no state_dict)")
    if not (ckpt.get("lcredit") or {}).get("config"):
        raise ConfigError(f"{key}={path}: not an lcredit checkpoint (no saved run config)")
    return ckpt


def config_differences(theirs: dict, ours: dict) -> list[str]:
    """Dotted keys whose values differ between a checkpoint's run config and this run's,
    leaving out what a resumed run may change (RESUME_MAY_CHANGE)."""
    diffs: list[str] = []

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k, _MISSING), b.get(k, _MISSING), f"{prefix}{k}.")
        elif a != b and not ({a, b} <= {None, _MISSING} if _hashable(a, b) else False):
            diffs.append(prefix[:-1])  # (a key absent on one side and null on the other is no change)

    for k in sorted(set(theirs) | set(ours), key=str):
        if k in RESUME_MAY_CHANGE["top"]:
            continue
        a, b = theirs.get(k, _MISSING), ours.get(k, _MISSING)
        if k == "trainer" and isinstance(a, dict) and isinstance(b, dict):
            a = {x: y for x, y in a.items() if x not in RESUME_MAY_CHANGE["trainer"]}
            b = {x: y for x, y in b.items() if x not in RESUME_MAY_CHANGE["trainer"]}
        walk(a, b, f"{k}.")
    return diffs


def _hashable(*values) -> bool:
    try:
        set(values)
    except TypeError:
        return False
    return True


class _Missing:
    def __repr__(self):
        return "(absent)"


_MISSING = _Missing()


def check_resume(ckpt: dict, resolved: dict, path) -> None:
    """Refuse to resume a checkpoint written under other settings, naming what differs."""
    theirs = ckpt["lcredit"]["config"]
    diffs = config_differences(theirs, resolved)
    if diffs:
        def value(cfg, dotted):
            node = cfg
            for part in dotted.split("."):
                node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
            return node

        shown = "; ".join(f"{k}: {value(theirs, k)!r} there, {value(resolved, k)!r} here"
                          for k in diffs[:4])
        more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
        raise ConfigError(f"resume={path}: the checkpoint was trained with other settings "
                          f"({shown}{more}); resume with the same settings, or start a new run")

