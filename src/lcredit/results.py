"""results.json: what a run (or a tool) records, written atomically, read by the report. The
single source of every number a user sees."""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra as _hydra
import lightning
import torch
import torchvision
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

import lcredit
from lcredit import files
from lcredit.diagnostics.protocol import finite
from lcredit.files import atomic_write


def write_json(path: Path, obj) -> None:
    """Atomic write; non-finite floats become null (valid JSON) rather than NaN tokens."""
    atomic_write(path, json.dumps(finite(obj), indent=2))


def write_text(path: Path, text: str) -> None:
    """A report's text, written atomically like results."""
    atomic_write(path, text)


def read_json(path: Path) -> dict | None:
    """A results file, or None when it is missing or unreadable (a job that never finished)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def versions() -> dict:
    """The versions and the commit a result was produced with (saved with every result)."""
    out = {"lcredit": lcredit.__version__, "python": platform.python_version(),
           "torch": torch.__version__, "torchvision": torchvision.__version__,
           "lightning": lightning.__version__, "hydra": _hydra.__version__}
    try:
        repo = Path(__file__).resolve().parents[2]
        out["git_commit"] = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
            timeout=5).stdout.strip() or None
        out["git_dirty"] = bool(subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


# ---- a training run's record ----------------------------------------------------------------

def _status(rule, protocol_state: dict) -> str:
    if any(r.get("status") == "diverged" for r in rule.history):
        return "diverged"
    return "aborted" if protocol_state.get("abort") else "completed"


def run_record(cfg, rule, task, frozen_baseline, branched, resume, out_dir, start,
               interrupted=None, protocol_state: dict | None = None) -> dict:
    """results.json of a run that trained: its rule's history, and what the Protocol callback
    found (``protocol_state``: its state, empty where the run had none)."""
    state = protocol_state or {}
    history = rule.history
    status = "interrupted" if interrupted is not None else _status(rule, state)
    ckpt = out_dir / "checkpoints" / "last.ckpt"
    divergence = rule.divergence()
    final, report = _final(history, divergence), _report(state.get("last"), divergence)
    return {
        "status": status,
        "rule": rule.name,
        # The original study's form of the rule, or the lcredit switches that depart from it.
        "form": rule.form(),
        "block_grad_clip": rule.block_grad_clip,
        # true: the network stayed as initialised; only the rule's estimator trained
        "fixed_network": rule.fixed_network,
        # trainer.compile as it ran: the torch.compile mode, or null (eager)
        "compile_mode": rule.compile_mode,
        "task": task.name,
        "task_notes": list(task.notes),
        "study": study_record(cfg),
        "seed": int(cfg.seed),
        "final": final,
        "divergence": divergence,
        "interrupted": None if interrupted is None else {
            "signal": signal.Signals(interrupted).name, "epochs_done": len(history),
            "resume_with": f"resume={ckpt}"},
        "history": history,
        "wall_time_s": time.perf_counter() - start,
        "train_time_s": sum(r["train_time_s"] for r in history),
        # which process ran it, and when (parallel launchers: the jobs' spans overlap)
        "process": {"pid": os.getpid(), "host": platform.node(), "threads": torch.get_num_threads(),
                    "started": time.time() - (time.perf_counter() - start), "finished": time.time()},
        "protocol": report,
        "protocol_first_fired": state.get("first_fired"),
        "abort": state.get("abort"),
        "previous_aborts": state.get("previous_aborts", []),
        "protocol_time_s": state.get("seconds", 0.0),
        "protocol_cost": {f"{k}_{m}": state.get(f"{k}_{m}", 0)
                          for k in ("cheap", "full") for m in ("seconds", "count")},
        "frozen_baseline": frozen_baseline,
        "resumed_from": str(resume) if resume else None,
        "init_from": branched,
        "checkpoint": str(ckpt) if ckpt.exists() else None,
        "output_dir": str(out_dir),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": versions(),
        "command": " ".join(sys.argv),
    }


FINAL_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc")


def _final(history: list[dict], divergence: dict | None) -> dict:
    """The last epoch's numbers; a diverged model's argmax accuracy is not a result: none, but
    ``divergence`` says where and when it broke."""
    last = history[-1] if history and divergence is None else {}
    return {k: last.get(k) for k in FINAL_KEYS} | {"epochs": len(history)}


def _report(report: dict | None, divergence: dict | None) -> dict | None:
    """The protocol's last report, labelled stale when the run diverged after it."""
    if report is None or divergence is None:
        return report
    return dict(report, stale=True, notes=list(report.get("notes") or []) + [
        f"stale: measured at epoch {report.get('epoch')}, before the run diverged at epoch "
        f"{divergence['epoch']} (step {divergence['step']})"])


def study_record(cfg) -> dict | None:
    """The study, scale, stage, arm and axis point of a study's job (None for a lone run)."""
    study = cfg.get("study")
    if study is None:
        return None
    point = study.get("point")
    return {"name": study.get("name"), "scale": cfg.get("scale", "paper"),
            "stage": study.get("stage", "main"), "arm": study.get("arm"),
            "point": OmegaConf.to_container(point, resolve=True) if point is not None else {},
            "job": study.get("job")}


def final_record(out_dir: Path, record: dict) -> None:
    """The run's results.json, written into the room its reserve kept (a full disk still gets
    its failure record); a record that cannot be written is said on stderr, never lost
    silently."""
    files.release(out_dir)
    try:
        write_json(out_dir / "results.json", record)
    except OSError as err:
        print(f"lcredit: error: {out_dir / 'results.json'}: cannot write the run's record "
              f"({err.strerror or err}); status {record.get('status')}: "
              f"{record.get('error') or ''}", file=sys.stderr, flush=True)
        if record.get("status") == "completed":
            raise


def failure_record(cfg, err: BaseException, rule=None, start=None) -> dict:
    """results.json of a run that failed: the error and what it had done so far."""
    try:
        config_node = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 — the failure may be in the config itself
        config_node = OmegaConf.to_container(cfg, resolve=False)
    seed = cfg.get("seed")
    try:
        study = study_record(cfg)
    except Exception:  # noqa: BLE001
        study = None
    return {"status": "failed", "error": f"{type(err).__name__}: {err}", "study": study,
            "seed": seed if isinstance(seed, int) else None,
            "rule": getattr(rule, "name", None),
            "history": list(getattr(rule, "history", []) or []),
            "abort": None,  # a failed run was not stopped by the protocol
            "wall_time_s": None if start is None else time.perf_counter() - start,
            "output_dir": str(cfg.paths.output_dir) if "paths" in cfg else None,
            "config": config_node, "versions": versions(), "command": " ".join(sys.argv)}


def _num(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def print_summary(results: dict, out_dir: Path) -> None:
    """The run's epochs as a table on the console (what results.json holds, in short)."""
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
