"""Scaling out: Hydra's joblib and submitit launchers, preemption-safe jobs that resume by
themselves, completed jobs skipped on relaunch, W&B runs a dashboard can group, one log line
per epoch off a terminal."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CONF, LIGHT_MEASURE, compose_cfg, forked_cli
from lcredit.train import train

pytestmark = pytest.mark.slow

TINY = ["data=ladder", "data.n_train=1024", "data.n_test=512", "model.d=32", "model.depth=2",
        "trainer.max_epochs=2", "protocol.frozen_baseline=null", "logger=none",
        "protocol.print_report=false", *LIGHT_MEASURE]


def sweep(tmp_path, *args, env=None, check=True):
    out = forked_cli("lcredit.train", *TINY, f"hydra.sweep.dir={tmp_path}", *args, "-m",
                     cwd=tmp_path.parent, env=dict(os.environ, **(env or {})), timeout=600)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def results(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("**/results.json"))]


def test_joblib_runs_the_jobs_in_parallel_processes(tmp_path):
    from hydra_plugins.lcredit_study.launchers import cores

    root = tmp_path / "joblib"
    # jobs long enough (~10 epochs) that the two workers' start-up skew on a loaded machine
    # cannot hide their overlap
    sweep(root, "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
          "trainer.max_epochs=10", "protocol.every_n_epochs=10")
    runs = results(root)
    assert [r["status"] for r in runs] == ["completed", "completed"]
    a, b = (r["process"] for r in runs)
    assert a["pid"] != b["pid"] and os.getpid() not in (a["pid"], b["pid"])
    assert a["started"] < b["finished"] and b["started"] < a["finished"], (a, b)  # overlapping
    assert a["threads"] == b["threads"] == max(1, cores() // 2)  # jobs x threads <= cores


def test_slurm_local_runs_a_sweep_through_submitit(tmp_path):
    root = tmp_path / "slurm_local"
    sweep(root, "seed=0,1", "hydra/launcher=slurm_local")
    runs = results(root)
    assert [r["status"] for r in runs] == ["completed", "completed"]
    assert (root / ".submitit").is_dir()


def test_slurm_launcher_composes_with_its_knobs():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
            "hydra.launcher.gpus_per_node=1", "hydra.launcher.array_parallelism=8"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher)
    assert launcher["partition"] == "gpu" and launcher["gpus_per_node"] == 1
    assert launcher["array_parallelism"] == 8
    for knob in ("timeout_min", "mem_gb", "cpus_per_task", "max_num_timeout"):
        assert knob in launcher, knob
    assert get_class(launcher["_target_"]).__name__ == "SlurmLauncher"


def test_a_missing_launcher_plugin_says_how_to_install_it():
    from hydra_plugins.lcredit_study.launchers import _plugin

    with pytest.raises(SystemExit, match=r"pip install -e '\.\[cluster\]'"):
        _plugin("joblib", "no_such_module_here", "JoblibLauncher", "hydra-joblib-launcher")


def test_a_preempted_job_resumes_by_itself_and_a_completed_one_is_not_rerun(tmp_path):
    longer = ["trainer.max_epochs=5", "data.n_train=3072", "seed=3"]
    # the uninterrupted reference (in-process: the same settings, the same single thread)
    ref = train(compose_cfg(tmp_path / "reference", *TINY, *longer))
    # the same job, sent SIGTERM mid-run (as a scheduler preempting it)
    root = tmp_path / "preempted"
    cmd = [sys.executable, "-m", "lcredit.train", *TINY, f"hydra.sweep.dir={root}", *longer, "-m"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    lines = []
    for line in proc.stdout:  # one line per epoch: stdout is not a terminal
        lines.append(line)
        if line.startswith("epoch 2/5"):  # epoch 3 has begun: stop the job inside it
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    (part,) = results(root)
    assert part["status"] == "interrupted" and part["interrupted"]["signal"] == "SIGTERM"
    job = Path(part["output_dir"])
    assert (job / "checkpoints" / "last.ckpt").is_file()
    # relaunching the same command (no resume=) finishes it from its own checkpoint
    again = forked_cli(*cmd[2:], cwd=tmp_path, timeout=600)  # the same command again
    assert again.returncode == 0, again.stderr[-2000:]
    (done,) = results(root)
    assert done["status"] == "completed" and done["resumed_from"].endswith("last.ckpt")
    assert done["final"] == ref["final"]
    assert [h["test_acc"] for h in done["history"]] == [h["test_acc"] for h in ref["history"]]
    # a third launch runs nothing: the job completed
    stamp = (job / "results.json").stat().st_mtime_ns
    third = forked_cli(*cmd[2:], cwd=tmp_path, timeout=300)
    assert third.returncode == 0 and "not run again" in third.stdout + third.stderr
    assert (job / "results.json").stat().st_mtime_ns == stamp
    # the log of a non-terminal run: one line per epoch, no progress-bar redraws
    log = "".join(lines) + rest
    assert "\r" not in log and sum(ln.startswith("epoch ") for ln in log.splitlines()) >= 2




def test_submitits_requeue_runs_after_the_checkpoint_and_results_are_saved(tmp_path):
    """Under submitit, SLURM's time-limit warning (SIGUSR2) goes to submitit's handler, which
    requeues the job and exits at once. lcredit takes the signal first: it stops at the next
    batch, saves, writes an `interrupted` results.json, and only then hands on to that handler."""
    from lightning.pytorch.callbacks import Callback

    seen = {}

    def submitit_handler(signum, frame):  # what submitit's checkpoint_and_try_requeue does
        out = tmp_path / "run" / "results.json"
        seen["status"] = json.loads(out.read_text())["status"] if out.is_file() else None
        raise SystemExit(-1)

    class Warn(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 0:
                os.kill(os.getpid(), signal.SIGUSR2)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with pytest.raises(SystemExit) as exit_:
            train(compose_cfg(tmp_path / "run", *TINY, "trainer.max_epochs=3"),
                  extra_callbacks=[Warn()])
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert exit_.value.code == -1 and seen["status"] == "interrupted"
    part = json.loads((tmp_path / "run" / "results.json").read_text())
    assert part["interrupted"]["signal"] == "SIGUSR2"
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
