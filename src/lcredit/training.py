"""The training path: ``train(cfg)`` reads as prepare → build → fit → record
(docs/architecture.md). A plain function: the command line (``lcredit.train``), the study, the
scripts and the tests call it. Models, rules and optimisers are built by lcredit.build, the
loggers by lcredit.loggers, the records by lcredit.results.
"""
from __future__ import annotations

import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from lcredit import baseline, config, files
from lcredit.build import build_rule, fit_task
from lcredit.callbacks import EarlyAbort
from lcredit.callbacks.checkpoint_io import AtomicCheckpointIO
from lcredit.callbacks.progress import EpochLine
from lcredit.callbacks.protocol import find as find_protocol, saved_state
from lcredit.callbacks.snapshots import Snapshots
from lcredit.config import TrainerLimits
from lcredit.data import DeviceBatches, batching, build_task
from lcredit.diagnostics import Report
from lcredit.errors import ConfigError
from lcredit.loggers import quiet_lightning, run_loggers, wandb_summary
from lcredit.models.base import compile_mode
from lcredit.options import check_options
from lcredit.results import failure_record, final_record, print_summary, read_json, run_record
from lcredit.signals import (STOP_SIGNALS, Interrupted, SignalStop, hand_on, preserved_rng,
                             stop_on_signals)

log = logging.getLogger("lcredit")
SUPPORTED_PRECISION = ("32-true", "32", "bf16-mixed", "64-true", "64")


def _check_trainer(tcfg: dict) -> None:
    check_options(L.Trainer.__init__, tcfg, "trainer", also=TrainerLimits)
    precision = str(tcfg.get("precision", "32-true"))
    if precision not in SUPPORTED_PRECISION:
        raise ConfigError(
            f"trainer.precision={precision!r} is not supported: local rules write gradients "
            f"directly, so fp16 loss scaling cannot apply. Use one of "
            f"{', '.join(SUPPORTED_PRECISION)}.")
    for key, every in (("check_val_every_n_epoch", 1), ("val_check_interval", 1.0)):
        if tcfg.get(key) not in (None, every):
            raise ConfigError(f"trainer.{key}={tcfg[key]!r}: lcredit evaluates (and records a "
                              f"history row) after every epoch; leave it at {every}")
    if tcfg.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer=gpu but no CUDA device is available here; use trainer=cpu")


def _device(tcfg: dict) -> torch.device:
    return torch.device("cuda" if tcfg.get("accelerator") in ("gpu", "cuda") else "cpu")


def branch_from(rule, path) -> dict | None:
    """Start ``rule`` from another run's checkpoint: the network always (same architecture
    required), and every other tensor of the rule's state the checkpoint holds with the same
    shape (feedback matrices, estimators), except what the rule keeps fresh
    (``fresh_on_branch`` prefixes). Returns what was taken, for results.json."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise ConfigError(f"init_from={path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        state = ckpt["state_dict"]
    except Exception as err:  # noqa: BLE001 — any unreadable file gets the same clear message
        raise ConfigError(f"init_from={path}: not a readable Lightning checkpoint ({err})") from None
    # Same shapes are not the same network (residual, act, out_ln change what the weights do).
    theirs = (((ckpt.get("lcredit") or {}).get("config")) or {}).get("model")
    ours = (getattr(rule, "run_config", None) or {}).get("model")
    if isinstance(theirs, dict) and isinstance(ours, dict):
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        if diff:
            shown = ", ".join(f"model.{k}={theirs.get(k)!r} there, {ours.get(k)!r} here"
                              for k in diff[:3])
            raise ConfigError(f"init_from={path}: its model differs ({shown}); branch with the "
                              f"same model settings")
    own = rule.state_dict()
    # Module by module, all or nothing: half a value network (its trunk from the checkpoint,
    # a conditioning layer of another shape fresh) would be neither trained nor fresh.
    fresh = tuple(getattr(rule, "fresh_on_branch", ()))
    modules: dict[str, list[str]] = {}
    for k in own:
        if not k.startswith(fresh):
            modules.setdefault(k.split(".")[0], []).append(k)
    taken, skipped = [], {}
    for name, keys in modules.items():
        odd = next((k for k in keys if k not in state or state[k].shape != own[k].shape), None)
        if odd is None:
            taken += keys
        elif name == "model":
            raise ConfigError(f"init_from={path}: its network does not match this model "
                              f"(e.g. {odd}); branch with the same model settings")
        else:
            skipped[name] = f"{odd}: {'absent' if odd not in state else 'other shape'}"
    rule.load_state_dict({k: state[k] for k in taken}, strict=False)
    src = ckpt.get("lcredit", {})
    history = src.get("history") or []
    return {"checkpoint": str(path), "rule": src.get("rule"),
            "epoch": history[-1]["epoch"] if history else 0,
            "loaded": sorted({k.split(".")[0] for k in taken}), "kept_fresh": skipped}


def _plugins():
    """Checkpoints written whole or not at all (lcredit.files). Under SLURM, Lightning's own
    SIGUSR1 requeue would race submitit's (which requeues the job, while lcredit saves the
    checkpoint it resumes from): Lightning's is turned off."""
    return [AtomicCheckpointIO(),
            *([SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else [])]


def _callbacks(cfg, progress_bar: bool):
    cbs = [instantiate(node) for node in (cfg.get("callbacks") or {}).values()
           if node is not None and "_target_" in node]
    # trainer.enable_progress_bar=false wins over a progress bar in the callbacks group.
    return [cb for cb in cbs if progress_bar or not isinstance(cb, ProgressBar)]


@dataclass
class Run:
    """One training run as it is put together: what ``prepare`` settles from the config, what
    ``build`` makes, what ``fit`` leaves for ``record``."""

    cfg: DictConfig
    start: float
    out_path: Path
    tcfg: dict                     # the trainer's options (Lightning's own keys)
    compile_as: object             # trainer.compile (lcredit's key)
    resolved: dict                 # the resolved config (the checkpoint's record)
    resume: str | None = None
    resume_ckpt: dict | None = None
    task: object = None
    rule: object = None
    branched: dict | None = None
    callbacks: list = field(default_factory=list)
    frozen_auto: bool = False      # protocol.frozen_baseline=auto: trained (or reused) in fit
    frozen_baseline: dict | None = None
    out_dir: Path | None = None
    protocol: object = None
    trainer: object = None
    signals: dict | None = None
    signum: int | None = None      # the signal that stopped the run (None: it ran to its end)


def train(cfg: DictConfig, extra_callbacks=()) -> dict:
    """Train ``cfg.method`` on ``cfg.data`` with ``cfg.model``; write and return results:
    prepare → build → fit → record.

    Every user mistake is a ConfigError before any training (and before the frozen baseline
    trains). A run that fails after its directory exists still writes results.json (status
    ``failed``, the error, the history so far); one stopped by SIGINT/SIGTERM writes it with
    status ``interrupted`` and exits 130/143, resumable exactly from its last checkpoint."""
    run = prepare(cfg, time.perf_counter())
    if isinstance(run, dict):  # a completed run, not run again
        return run
    build(run, extra_callbacks)
    # one process per run directory: a second one on it stops here, before it writes anything
    with files.RunLock(run.out_dir):
        open_run_dir(run)
        try:
            fit(run)
        except SystemExit as err:
            final_record(run.out_dir, _stopped_record(run, err))
            raise
        except BaseException as err:
            final_record(run.out_dir, failure_record(cfg, err, run.rule, run.start))
            raise
        return record(run)


def prepare(cfg: DictConfig, start: float) -> Run | dict:
    """Check the config, the trainer's options and what the run resumes from; a completed run
    in the output directory is returned as it is (``skip_completed``)."""
    # Hydra's root handler already prints Lightning's messages; don't print them twice.
    logging.getLogger("lightning.pytorch").propagate = False
    quiet_lightning()
    config.validate(cfg)
    if cfg.get("threads") not in (None, "null"):
        torch.set_num_threads(int(cfg.threads))
    out_path = Path(str(cfg.paths.output_dir))
    prior = read_json(out_path / "results.json")
    if prior is not None and prior.get("status") in ("completed", "aborted") and _skip_completed(cfg):
        print(f"lcredit: {out_path} already holds a {prior['status']} run; not run again "
              f"(skip_completed=false runs it anew)")
        return prior
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    # lcredit's own trainer key (not Lightning's): compile the model's blocks (checked below)
    compile_as = tcfg.pop("compile", False)
    compile_mode(compile_as, _device(tcfg))
    _check_trainer(tcfg)
    run = Run(cfg, start, out_path, tcfg, compile_as, OmegaConf.to_container(cfg, resolve=True))
    run.resume, run.resume_ckpt = _resume_point(cfg, out_path, prior)
    if run.resume_ckpt is not None:
        config.check_resume(run.resume_ckpt, run.resolved, run.resume)
        _refuse_aborted(run.resume_ckpt, cfg, run.resume)
    return run


def _resume_point(cfg, out_path: Path, prior: dict | None) -> tuple[str | None, dict | None]:
    """The checkpoint the run continues from: ``resume``, or (``auto_resume``) the directory's
    own unfinished run — a requeued, relaunched or restarted job continues it."""
    resume = cfg.get("resume")
    if resume is None and cfg.get("auto_resume", True):
        last = out_path / "checkpoints" / "last.ckpt"
        if last.is_file() and (prior is None or prior.get("status") == "interrupted"):
            resume = str(last)
            log.info("resuming the unfinished run in %s from %s", out_path, last)
    try:
        return resume, config.read_checkpoint(resume, "resume") if resume is not None else None
    except ConfigError as err:
        if cfg.get("resume") is not None:
            raise
        # found by auto_resume, not named by the user: say how to start afresh
        raise ConfigError(f"auto_resume: {err} — move it away, or run with auto_resume=false "
                          f"to start afresh in {out_path}") from None


def build(run: Run, extra_callbacks=()) -> None:
    """The task, the rule (compiled, branched), the callbacks and the frozen comparator: all
    that can be wrong with them fails here, before any directory, cache entry or frozen
    baseline exists."""
    cfg, tcfg = run.cfg, run.tcfg
    run.task = fit_task(cfg, build_task(cfg.data)).to(_device(tcfg))
    L.seed_everything(int(cfg.seed), workers=False, verbose=False)
    rule = run.rule = build_rule(cfg, run.task)
    rule.check_trainer(tcfg)
    rule.compile_model(compile_mode(run.compile_as, _device(tcfg), rule.model))
    if rule.compile_mode is not None:
        log.info("trainer.compile: torch.compile mode %s", rule.compile_mode)
    rule.run_config = run.resolved
    run.branched = branch_from(rule, cfg.get("init_from"))
    # a bar only on a terminal; a log (SLURM, joblib, CI) gets one line per epoch instead
    bar = bool(tcfg.get("enable_progress_bar", True)) and sys.stdout.isatty()
    tcfg["enable_progress_bar"] = bar
    run.callbacks = _callbacks(cfg, bar) + list(extra_callbacks)
    if not bar:
        run.callbacks.append(EpochLine())
    if cfg.get("snapshot_epochs"):
        run.callbacks.append(Snapshots(cfg.snapshot_epochs, run.out_path / "checkpoints"))
    if not cfg.get("protocol", {}).get("abort", {}).get("enabled", True):
        run.callbacks = [cb for cb in run.callbacks if not isinstance(cb, EarlyAbort)]
    # (d) compares accuracies: a regression task (lq) has none, so it gets no comparator. A
    # number or a results file is checked now; `auto` trains (or reuses) the frozen run in fit.
    classify = run.task.loss == "ce"
    run.frozen_auto = classify and cfg.get("protocol", {}).get("frozen_baseline") == "auto"
    if classify and not run.frozen_auto:
        run.frozen_baseline = baseline.resolve(cfg, train)
    if run.frozen_auto:
        config.writable_dir(cfg.paths.cache_dir, "paths.cache_dir")
    run.out_dir = config.writable_dir(cfg.paths.output_dir, "paths.output_dir")


def open_run_dir(run: Run) -> None:
    """The room for a failure record, taken before anything else is written; the config."""
    try:
        files.reserve(run.out_dir)
        files.atomic_write(run.out_dir / "config.yaml", OmegaConf.to_yaml(run.cfg, resolve=True))
    except OSError as err:
        files.release(run.out_dir)
        raise ConfigError(f"paths.output_dir={run.out_dir}: cannot write there "
                          f"({err.strerror or err})") from None


def fit(run: Run) -> None:
    """The frozen comparator (when ``auto``), then the rule trained by Lightning on the task's
    on-device batches, until its last epoch, an abort, a divergence or a stop signal."""
    cfg, task, rule = run.cfg, run.task, run.rule
    if run.frozen_auto:  # training it here (when not cached) must not move this run's streams
        with preserved_rng():
            run.frozen_baseline = baseline.resolve(cfg, train)
    rule.recorder.frozen_baseline = run.frozen_baseline
    bcfg = batching(cfg.data)
    train_batches = DeviceBatches(task.x_train, task.y_train, bcfg["batch_size"], shuffle=True,
                                  seed=int(cfg.seed), random_targets=bcfg["random_targets"],
                                  num_classes=task.num_classes, resample=task.resample)
    test_batches = DeviceBatches(task.x_test, task.y_test, bcfg["eval_batch_size"], shuffle=False)
    run.protocol = find_protocol(run.callbacks)
    if run.protocol is not None:
        run.protocol.frozen_baseline = run.frozen_baseline
        # a resumed aborted run trained on on purpose keeps its abort record
        run.protocol.continue_after_abort = bool(
            run.resume_ckpt and saved_state(run.resume_ckpt).get("abort"))
    with stop_on_signals() as signals:
        run.signals = signals
        run.trainer = L.Trainer(**run.tcfg, logger=run_loggers(cfg, run.resume_ckpt, rule),
                                callbacks=[*run.callbacks, SignalStop(signals)],
                                default_root_dir=str(run.out_dir), num_sanity_val_steps=0,
                                enable_model_summary=False, plugins=_plugins())
        try:
            run.trainer.fit(rule, train_dataloaders=train_batches,
                            val_dataloaders=test_batches, ckpt_path=run.resume)
        except (Interrupted, SystemExit, KeyboardInterrupt):
            # ours between batches; Lightning's SIGTERMException or sys.exit on a 2nd ^C
            if signals["signum"] is None:
                raise
            run.signum = signals["signum"]  # (a signal after the last batch: completed)


def _stopped_record(run: Run, err: SystemExit) -> dict:
    """The record of a run a SystemExit ended before it trained: a stop signal while the
    frozen baseline trained, or a failure."""
    record = failure_record(run.cfg, err, run.rule, run.start)
    if err.code not in {128 + s for s in STOP_SIGNALS}:
        return record
    return record | {"status": "interrupted", "error": None,
                     "interrupted": {"signal": signal.Signals(err.code - 128).name,
                                     "epochs_done": 0, "while": "training the frozen baseline"}}


def record(run: Run) -> dict:
    """results.json, the W&B summary and the console's summary and report; a run a signal
    stopped exits 128 + the signal, after its record."""
    state = run.protocol.state if run.protocol is not None else {}
    results = run_record(run.cfg, run.rule, run.task, run.frozen_baseline, run.branched,
                         run.resume, run.out_dir, run.start, interrupted=run.signum,
                         protocol_state=state)
    final_record(run.out_dir, results)
    wandb_summary(run.trainer, results)
    print_summary(results, run.out_dir)
    report = results["protocol"]
    if report is not None and run.cfg.get("protocol", {}).get("print_report", True):
        Report.from_dict(report).print()
    if run.signum is not None:
        hand_on(run.signals)
        raise SystemExit(128 + run.signum)
    return results


def _skip_completed(cfg) -> bool:
    value = cfg.get("skip_completed", "auto")
    if value == "auto":  # on in sweeps: relaunching a half-finished sweep runs what is missing
        return HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"
    return bool(value)


def _refuse_aborted(ckpt: dict, cfg: DictConfig, path) -> None:
    """An aborted run stays aborted: resuming it trains only with the abort turned off. A
    diverged one cannot go on at all (its weights are not finite)."""
    diverged = (ckpt.get("lcredit") or {}).get("divergence")
    if diverged:
        raise ConfigError(f"resume={path}: that run diverged at epoch {diverged['epoch']} "
                          f"(step {diverged['step']}); its weights are not finite, there is "
                          f"nothing to resume. Start again with other settings.")
    abort = saved_state(ckpt).get("abort")
    if abort and cfg.get("protocol", {}).get("abort", {}).get("enabled", True):
        raise RunAborted(
            f"resume={path}: the protocol aborted this run at epoch {abort['epoch']} "
            f"({'; '.join(abort.get('reasons') or [])}); it stays aborted. To train it on "
            f"regardless, resume with protocol.abort.enabled=false (the abort record is kept).")


class RunAborted(ConfigError):
    """Resuming a run the protocol aborted (not a mistake in the config; exits 0)."""
