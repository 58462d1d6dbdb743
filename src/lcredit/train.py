"""Train one learning rule: ``python -m lcredit.train method=fa model.depth=8 seed=1,2 -m``.

``train(cfg)`` is a plain function (tests call it in-process); ``main`` is the Hydra entry.
Models, rules and optimisers are built by lcredit.build; loggers and callbacks here.
"""
from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from lcredit import baseline, config, files
from lcredit.callbacks import EarlyAbort
from lcredit.callbacks.protocol import find as find_protocol
from lcredit.callbacks.protocol import saved_state
from lcredit.callbacks.checkpoint_io import AtomicCheckpointIO
from lcredit.data import DeviceBatches, batching, build_task
from lcredit.diagnostics import Report
from lcredit.build import CONF_DIR, build_rule, fit_task
from lcredit.results import failure_record, final_record, read_json, run_record, write_json
from lcredit.cli import check_hydra_dirs, hydra_entry, job_dirname, quote_path_overrides
from lcredit.config import TrainerLimits
from lcredit.errors import ConfigError, DirectoryBusy
from lcredit.models.base import compile_mode
from lcredit.signals import (STOP_SIGNALS, Interrupted, SignalStop, hand_on, preserved_rng,
                             stop_on_signals)
from lcredit.options import check_options

log = logging.getLogger("lcredit")
SUPPORTED_PRECISION = ("32-true", "32", "bf16-mixed", "64-true", "64")

# Sweep job dirs read `method=fa,model.depth=8/seed=1`; a sweep over seeds alone: `defaults/seed=1`
# (short and one path segment whatever the overrides: cli.job_dirname).
if not OmegaConf.has_resolver("lcredit_subdir"):
    OmegaConf.register_new_resolver(
        "lcredit_subdir", lambda overrides: job_dirname(OmegaConf.to_container(overrides)
                                                        if OmegaConf.is_config(overrides)
                                                        else overrides))


def _check_trainer(tcfg: dict) -> None:
    import lightning as L

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


def _loggers(cfg, resume_ckpt=None, rule=None):
    from lightning.pytorch.loggers import WandbLogger

    from lcredit.loggers import CSVLogger

    point = None
    if resume_ckpt is not None:  # a resumed run continues the metrics.csv of the run it resumes
        point = (int(resume_ckpt.get("global_step", 0)),
                 len((resume_ckpt.get("lcredit") or {}).get("history") or []))
    out = []
    for node in (cfg.get("logger") or {}).values():
        if node is not None and "_target_" in node:
            cls = get_class(node._target_)
            extra = {"resume_point": point} if cls is CSVLogger else {}
            if issubclass(cls, WandbLogger):  # `config` is also instantiate()'s own argument
                opts = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items()
                        if not k.startswith("_")}
                out.append(cls(**(opts | wandb_run_info(cfg, node, rule))))
                continue
            out.append(instantiate(node, **extra))
    return out or False


def wandb_run_info(cfg, node, rule) -> dict:
    """What a researcher sets by hand on a W&B run, where the config leaves it null: the resolved
    config, the group (the study, or the sweep), a name (the job's overrides and seed), the job
    type (the rule) and tags (the config's, plus rule, model and data)."""
    study = cfg.get("study")
    multirun = HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"
    group = node.get("group")
    if group is None and study is not None:
        group = f"{study.get('name')}/{cfg.get('scale', 'paper')}"
    elif group is None and multirun:
        group = Path(str(HydraConfig.get().sweep.dir)).as_posix()
    name = node.get("name")
    if name is None:
        job = (study.get("job") if study is not None else None) or (
            job_dirname(list(HydraConfig.get().overrides.task)) if HydraConfig.initialized()
            else None)
        name = f"{job}/seed={cfg.seed}" if job and job != "defaults" else f"seed={cfg.seed}"
    rule_name = getattr(rule, "name", None) or str(cfg.method.get("_target_", "")).rsplit(".", 1)[-1]
    data = cfg.data.get("name") or str(cfg.data.get("_target_", "")).rsplit(".", 1)[-1]
    model = str(cfg.model.get("_target_", "")).rsplit(".", 1)[-1].lower()
    tags = [str(t) for t in (node.get("tags") or [])] + [f"rule:{rule_name}", f"model:{model}",
                                                          f"data:{data}"]
    if study is not None:
        tags.append(f"study:{study.get('name')}")
    return {"group": group, "name": name, "job_type": node.get("job_type") or rule_name,
            "tags": sorted(set(tags)), "config": OmegaConf.to_container(cfg, resolve=True)}


def _plugins():
    """Checkpoints written whole or not at all (lcredit.files). Under SLURM, Lightning's own
    SIGUSR1 requeue would race submitit's (which requeues the job, while lcredit saves the
    checkpoint it resumes from): Lightning's is turned off."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [AtomicCheckpointIO(),
            *([SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else [])]


def _callbacks(cfg, progress_bar: bool):
    from lightning.pytorch.callbacks import ProgressBar

    cbs = [instantiate(node) for node in (cfg.get("callbacks") or {}).values()
           if node is not None and "_target_" in node]
    # trainer.enable_progress_bar=false wins over a progress bar in the callbacks group.
    return [cb for cb in cbs if progress_bar or not isinstance(cb, ProgressBar)]


# Lightning's messages a user of lcredit cannot act on: advertising tips, the checkpoint
# loader's note on `weights_only` (lcredit reads its own checkpoints), and a deprecation inside
# Lightning's own code. Everything else Lightning says is kept.
UNACTIONABLE = (r"💡 Tip", r"`weights_only` was not set")
UNACTIONABLE_WARNINGS = (r".*isinstance\(treespec, LeafSpec\)` is deprecated",)


class _Unactionable(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(p) for p in UNACTIONABLE)


def quiet_lightning() -> None:
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero",
                 "lightning.pytorch.trainer.connectors.checkpoint_connector"):
        log_ = logging.getLogger(name)
        if not any(isinstance(f, _Unactionable) for f in log_.filters):
            log_.addFilter(_Unactionable())
    for pattern in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def train(cfg: DictConfig, extra_callbacks=()) -> dict:
    """Train ``cfg.method`` on ``cfg.data`` with ``cfg.model``; write and return results.

    Every user mistake is a ConfigError before any training (and before the frozen baseline
    trains). A run that fails after its directory exists still writes results.json (status
    ``failed``, the error, the history so far); one stopped by SIGINT/SIGTERM writes it with
    status ``interrupted`` and exits 130/143, resumable exactly from its last checkpoint."""
    import lightning as L

    start = time.perf_counter()
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
    resume = cfg.get("resume")
    if resume is None and cfg.get("auto_resume", True):
        # a requeued, relaunched or restarted job continues its own unfinished run
        last = out_path / "checkpoints" / "last.ckpt"
        if last.is_file() and (prior is None or prior.get("status") == "interrupted"):
            resume = str(last)
            log.info("resuming the unfinished run in %s from %s", out_path, last)
    try:
        resume_ckpt = config.read_checkpoint(resume, "resume") if resume is not None else None
    except ConfigError as err:
        if cfg.get("resume") is not None:
            raise
        # found by auto_resume, not named by the user: say how to start afresh
        raise ConfigError(f"auto_resume: {err} — move it away, or run with auto_resume=false "
                          f"to start afresh in {out_path}") from None
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    # lcredit's own trainer key (not Lightning's): compile the model's blocks (checked below)
    compile_as = tcfg.pop("compile", False)
    compile_mode(compile_as, _device(tcfg))
    _check_trainer(tcfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if resume_ckpt is not None:
        config.check_resume(resume_ckpt, resolved, resume)
        _refuse_aborted(resume_ckpt, cfg, resume)
    # Everything that can be wrong with the task, model, rule or branch fails here, before any
    # directory, cache entry or frozen baseline exists.
    bcfg = batching(cfg.data)
    task = fit_task(cfg, build_task(cfg.data)).to(_device(tcfg))
    L.seed_everything(int(cfg.seed), workers=False, verbose=False)
    rule = build_rule(cfg, task)
    rule.check_trainer(tcfg)
    rule.compile_model(compile_mode(compile_as, _device(tcfg), rule.model))
    if rule.compile_mode is not None:
        log.info("trainer.compile: torch.compile mode %s", rule.compile_mode)
    rule.run_config = resolved
    branched = branch_from(rule, cfg.get("init_from"))
    # a bar only on a terminal; a log (SLURM, joblib, CI) gets one line per epoch instead
    bar = bool(tcfg.get("enable_progress_bar", True)) and sys.stdout.isatty()
    tcfg["enable_progress_bar"] = bar
    callbacks = _callbacks(cfg, bar) + list(extra_callbacks)
    if not bar:
        from lcredit.callbacks.progress import EpochLine

        callbacks.append(EpochLine())
    if cfg.get("snapshot_epochs"):
        from lcredit.callbacks.snapshots import Snapshots

        callbacks.append(Snapshots(cfg.snapshot_epochs, Path(cfg.paths.output_dir) / "checkpoints"))
    # (d) compares accuracies: a regression task (lq) has none, so it gets no comparator. A
    # number or a results file is checked now; `auto` trains (or reuses) the frozen run below.
    auto = cfg.get("protocol", {}).get("frozen_baseline") == "auto" and task.loss == "ce"
    frozen_baseline = (baseline.resolve(cfg, train) if task.loss == "ce" and not auto else None)
    if auto:
        config.writable_dir(cfg.paths.cache_dir, "paths.cache_dir")
    out_dir = config.writable_dir(cfg.paths.output_dir, "paths.output_dir")
    # one process per run directory: a second one on it stops here, before it writes anything
    with files.RunLock(out_dir):
        try:  # the room for a failure record, taken before anything else is written
            files.reserve(out_dir)
            files.atomic_write(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        except OSError as err:
            files.release(out_dir)
            raise ConfigError(f"paths.output_dir={out_dir}: cannot write there "
                              f"({err.strerror or err})") from None

        try:
            if auto:  # training it here (when not cached) must not move this run's random streams
                with preserved_rng():
                    frozen_baseline = baseline.resolve(cfg, train)
            rule.recorder.frozen_baseline = frozen_baseline

            train_batches = DeviceBatches(task.x_train, task.y_train, bcfg["batch_size"], shuffle=True,
                                          seed=int(cfg.seed), random_targets=bcfg["random_targets"],
                                          num_classes=task.num_classes, resample=task.resample)
            test_batches = DeviceBatches(task.x_test, task.y_test, bcfg["eval_batch_size"],
                                         shuffle=False)
            protocol = find_protocol(callbacks)
            if protocol is not None:
                protocol.frozen_baseline = frozen_baseline
                # a resumed aborted run trained on on purpose keeps its abort record
                protocol.continue_after_abort = bool(
                    resume_ckpt and saved_state(resume_ckpt).get("abort"))
            if not cfg.get("protocol", {}).get("abort", {}).get("enabled", True):
                callbacks = [cb for cb in callbacks if not isinstance(cb, EarlyAbort)]
            with stop_on_signals() as signals:
                callbacks.append(SignalStop(signals))
                trainer = L.Trainer(**tcfg, logger=_loggers(cfg, resume_ckpt, rule),
                                    callbacks=callbacks, default_root_dir=str(out_dir),
                                    num_sanity_val_steps=0, enable_model_summary=False,
                                    plugins=_plugins())
                signum = None  # a signal after the last batch: the run completed all the same
                try:
                    trainer.fit(rule, train_dataloaders=train_batches,
                                val_dataloaders=test_batches, ckpt_path=resume)
                except (Interrupted, SystemExit, KeyboardInterrupt):
                    # ours between batches; Lightning's SIGTERMException or sys.exit on a 2nd ^C
                    if signals["signum"] is None:
                        raise
                    signum = signals["signum"]
        except SystemExit as err:
            if err.code in {128 + s for s in STOP_SIGNALS}:  # the frozen baseline's run
                final_record(out_dir, failure_record(cfg, err, rule, start) | {
                    "status": "interrupted", "error": None,
                    "interrupted": {"signal": signal.Signals(err.code - 128).name, "epochs_done": 0,
                                    "while": "training the frozen baseline"}})
            else:
                final_record(out_dir, failure_record(cfg, err, rule, start))
            raise
        except BaseException as err:
            final_record(out_dir, failure_record(cfg, err, rule, start))
            raise
        results = run_record(cfg, rule, task, frozen_baseline, branched, resume, out_dir, start,
                             interrupted=signum,
                             protocol_state=protocol.state if protocol is not None else {})
        final_record(out_dir, results)
        wandb_summary(trainer, results)
        print_summary(results, out_dir)
        report = results["protocol"]
        if report is not None and cfg.get("protocol", {}).get("print_report", True):
            Report.from_dict(report).print()
        if signum is not None:
            hand_on(signals)
            raise SystemExit(128 + signum)
        return results


def _skip_completed(cfg) -> bool:
    value = cfg.get("skip_completed", "auto")
    if value == "auto":  # on in sweeps: relaunching a half-finished sweep runs what is missing
        return HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"
    return bool(value)


def wandb_summary(trainer, results: dict) -> None:
    """The run's verdict, first-fire epochs and abort record in the W&B run summary."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            report = results.get("protocol") or {}
            logger.experiment.summary.update({
                "status": results["status"], "verdict": report.get("verdict"),
                "reasons": report.get("reasons"),
                "first_fired": results.get("protocol_first_fired"),
                "abort": results.get("abort"), "final": results.get("final"),
                "gamma_hidden": (report.get("aggregates") or {}).get("gamma_hidden")})
            logger.experiment.finish()


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


def _num(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def print_summary(results: dict, out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['rule']} on {results['task']} (seed {results['seed']}) "
                        f"— {results['status']}")
    # gamma_hidden leads (docs/metrics.md), at the epochs with a full measurement; (a)'s growth
    # at every measured epoch. Seven columns fit an 80-column log (test loss: results.json).
    for col in ("epoch", "gamma_hidden", "growth (a)", "train loss", "train acc", "test acc",
                "sec"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in results["history"]:
        p = r.get("protocol") or {}
        hidden = (p.get("aggregates") or {}).get("gamma_hidden")
        growth = ((p.get("diagnostics") or {}).get("a") or {}).get("value")
        table.add_row(str(r["epoch"]), "" if hidden is None else _num(hidden),
                      "" if growth is None else f"{growth:.4g}",
                      *(_num(r[k]) for k in ("train_loss", "train_acc", "test_acc")),
                      f"{r['train_time_s']:.1f}")
    console = Console()
    console.print(table)
    if results.get("abort"):
        a = results["abort"]
        console.print(f"[bold red]aborted[/] at epoch {a['epoch']} by the protocol: "
                      f"{'; '.join(a['reasons'])} — saved {a['epochs_saved']} of "
                      f"{a['epochs_planned']} epochs")
    console.print(f"results: {out_dir / 'results.json'}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    try:
        train(cfg)
    except RunAborted as err:  # nothing to do, and nothing wrong
        print(f"lcredit: {err}", file=sys.stderr)
    except ConfigError as err:
        print(f"lcredit: error: {err}", file=sys.stderr)
        if not multirun:
            raise SystemExit(2) from None
        if not isinstance(err, DirectoryBusy):  # never a record into a live run's directory
            _record_failure(cfg, err)
    except Exception as err:  # noqa: BLE001 — one failed job must not end a sweep
        if files.is_disk_full(err):  # the record is written; a traceback would tell nothing more
            print(f"lcredit: error: {cfg.paths.output_dir}: no space left on the device; the run "
                  f"is recorded as failed and its last checkpoint is intact", file=sys.stderr)
            if not multirun:
                raise SystemExit(1) from None
            _record_failure(cfg, err)
            return
        if not multirun:
            raise
        log.exception("job failed; the sweep carries on")
        _record_failure(cfg, err)


def _record_failure(cfg: DictConfig, err: Exception) -> None:
    """A failed sweep job's results.json (unless train() already wrote one with its history)."""
    out_dir = Path(cfg.paths.output_dir)
    path = out_dir / "results.json"
    try:
        if path.is_file() and json.loads(path.read_text()).get("status") == "failed":
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(path, failure_record(cfg, err))
    except OSError as io_err:
        log.error("could not record the failure in %s: %s", path, io_err)


if __name__ == "__main__":
    quote_path_overrides()
    check_hydra_dirs("lcredit")
    try:  # experiment=<study> arm=<arm>: one job of the study, as its sweep would run it
        from lcredit.jobs import single_job_argv

        sys.argv = single_job_argv(sys.argv)
    except ConfigError as err:
        print(f"lcredit: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    hydra_entry("lcredit", main)
