"""Checks on a run's configuration and the files it names, made before anything runs.

A user's mistake must be one ``lcredit: error:`` line naming the key or file, before any
training, directory or cache entry exists — never a traceback from deep inside torch or
Lightning, never a run that silently does something else.
"""
from __future__ import annotations

import difflib
import math
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lcredit.errors import ConfigError, check_config_finite, check_range

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
THRESHOLD_RANGES = {"a": (0.0, None, True), "b": (0.0, None, False), "c": (-1.0, 1.0, False),
                    "d": (None, None, False)}


def _num(key: str, value, lo=None, hi=None, *, lo_open=False, integer=False):
    check_range(key, value, lo, hi, lo_open=lo_open, integer=integer)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a finite number")


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
            near = difflib.get_close_matches(str(k), [str(x) for x in known], n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else \
                f"; the keys here: {', '.join(sorted(map(str, known)))}"
            raise ConfigError(f"{prefix}{k}: no such option (nothing reads it){hint}")
        if isinstance(known[k], dict) and isinstance(v, dict) and known[k]:
            check_keys(v, known[k], f"{prefix}{k}.")


def validate(cfg: DictConfig) -> None:
    """The run-level options (seed, optimiser, trainer length, protocol) are usable, every key
    is one lcredit reads, and no number anywhere in the config is nan or infinite."""
    check_keys(OmegaConf.to_container(cfg, resolve=False), known_keys())
    check_config_finite(cfg)
    _num("seed", _get(cfg, "seed"), 0, integer=True)
    optim = cfg.get("optim")
    if optim:
        if "lr" in optim:
            _num("optim.lr", _get(optim, "lr", "optim."), 0.0, lo_open=True)
        for key in ("weight_decay", "momentum"):
            if key in optim:
                _num(f"optim.{key}", _get(optim, key, "optim."), 0.0)
    trainer = cfg.get("trainer") or {}
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    bounded = (max_steps is not None and max_steps not in (-1,)) or trainer.get("max_time")
    if max_steps not in (None, -1):
        _num("trainer.max_steps", max_steps, 1, integer=True)
    if max_epochs is None or max_epochs == -1:
        if not bounded:
            raise ConfigError(f"trainer.max_epochs={max_epochs} runs forever: give a number of "
                              f"epochs >= 1 (or bound the run with trainer.max_steps)")
    else:
        _num("trainer.max_epochs", max_epochs, 1, integer=True)
    limit = trainer.get("limit_train_batches")
    if limit is not None:  # a run that trains on nothing is not a run
        if isinstance(limit, float):
            _num("trainer.limit_train_batches", limit, 0.0, 1.0, lo_open=True)
        else:
            _num("trainer.limit_train_batches", limit, 1, integer=True)
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
        _num("snapshot_epochs", e, 0, integer=True)
        if isinstance(max_epochs, int) and max_epochs > 0 and e > max_epochs:
            raise ConfigError(f"snapshot_epochs: {e} is after the run's last epoch "
                              f"(trainer.max_epochs={max_epochs})")


def _get(node, key, prefix=""):
    """A value, with an interpolation that cannot resolve reported as a ConfigError."""
    try:
        return node[key]
    except Exception as err:  # noqa: BLE001 — omegaconf's resolution errors vary by version
        raise ConfigError(f"{prefix}{key}: {err}") from None


def validate_protocol(p: DictConfig) -> None:
    for key, lo in (("every_n_epochs", 1), ("eval_batches", 1), ("stability_batches", 2),
                    ("batch_size", 1)):
        if key in p:
            _num(f"protocol.{key}", p[key], lo, integer=True)
    if "seed" in p:
        _num("protocol.seed", p.seed, 0, integer=True)
    for k, v in (p.get("thresholds") or {}).items():
        if k not in THRESHOLD_RANGES:
            raise ConfigError(f"protocol.thresholds.{k}: unknown diagnostic; the ids are a, b, c, d")
        lo, hi, lo_open = THRESHOLD_RANGES[k]
        _num(f"protocol.thresholds.{k}", v, lo, hi, lo_open=lo_open)
    measure = p.get("measure") or {}
    for key, lo, integer, lo_open in (("rho_samples", 1, True, False),
                                      ("rho_directions", 2, True, False),
                                      ("rho_eps", 0.0, False, True),
                                      ("nudge_step", 0.0, False, True),
                                      ("null_draws", 1, True, False)):
        if key in measure:
            _num(f"protocol.measure.{key}", measure[key], lo, integer=integer, lo_open=lo_open)
    abort = p.get("abort") or {}
    if "min_epochs" in abort:
        _num("protocol.abort.min_epochs", abort.min_epochs, 0, integer=True)
    if "patience" in abort:
        _num("protocol.abort.patience", abort.patience, 1, integer=True)
    monitor = abort.get("monitor")
    if monitor is not None:
        ids = list(monitor) if OmegaConf.is_list(monitor) or isinstance(monitor, list) else [monitor]
        bad = [m for m in ids if m not in THRESHOLD_RANGES]
        if bad:
            raise ConfigError(f"protocol.abort.monitor={ids}: unknown diagnostic(s) {bad}; "
                              f"the ids are a, b, c, d")


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
    import torch

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

