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

from conftest import LIGHT_MEASURE

pytestmark = pytest.mark.slow

TINY = ["data=ladder", "data.n_train=1024", "data.n_test=512", "model.d=32", "model.depth=2",
        "trainer.max_epochs=2", "protocol.frozen_baseline=null", "logger=none",
        "protocol.print_report=false", *LIGHT_MEASURE]


def sweep(tmp_path, *args, env=None, check=True):
    cmd = [sys.executable, "-m", "lcredit.train", *TINY, f"hydra.sweep.dir={tmp_path}", *args, "-m"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path.parent,
                         env=dict(os.environ, **(env or {})), timeout=600)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def results(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("**/results.json"))]


def test_joblib_runs_the_jobs_in_parallel_processes(tmp_path):
    from hydra_plugins.lcredit_study.launchers import cores

    root = tmp_path / "joblib"
    sweep(root, "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
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


def test_slurm_launcher_composes_with_its_knobs(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lcredit.train", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
         "hydra.launcher.gpus_per_node=1", "hydra.launcher.array_parallelism=8", "--cfg", "hydra"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    for knob in ("partition: gpu", "gpus_per_node: 1", "array_parallelism: 8", "timeout_min:",
                 "mem_gb:", "cpus_per_task:", "max_num_timeout:"):
        assert knob in out.stdout, knob


def test_a_missing_launcher_plugin_says_how_to_install_it():
    from hydra_plugins.lcredit_study.launchers import _plugin

    with pytest.raises(SystemExit, match=r"pip install -e '\.\[cluster\]'"):
        _plugin("joblib", "no_such_module_here", "JoblibLauncher", "hydra-joblib-launcher")


def test_a_preempted_job_resumes_by_itself_and_a_completed_one_is_not_rerun(tmp_path):
    longer = ["trainer.max_epochs=6", "data.n_train=4096", "seed=3"]
    # the uninterrupted reference
    ref_root = tmp_path / "reference"
    sweep(ref_root, *longer)
    (ref,) = results(ref_root)
    # the same job, sent SIGTERM mid-run (as a scheduler preempting it)
    root = tmp_path / "preempted"
    cmd = [sys.executable, "-m", "lcredit.train", *TINY, f"hydra.sweep.dir={root}", *longer, "-m"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    lines = []
    for line in proc.stdout:  # one line per epoch: stdout is not a terminal
        lines.append(line)
        if line.startswith("epoch 2/6"):  # epoch 3 has begun: stop the job inside it
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    (part,) = results(root)
    assert part["status"] == "interrupted"
    job = Path(part["output_dir"])
    assert (job / "checkpoints" / "last.ckpt").is_file()
    # relaunching the same command (no resume=) finishes it from its own checkpoint
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    (done,) = results(root)
    assert done["status"] == "completed" and done["resumed_from"].endswith("last.ckpt")
    assert done["final"] == ref["final"]
    assert [h["test_acc"] for h in done["history"]] == [h["test_acc"] for h in ref["history"]]
    # a third launch runs nothing: the job completed
    stamp = (job / "results.json").stat().st_mtime_ns
    third = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert third.returncode == 0 and "not run again" in third.stdout + third.stderr
    assert (job / "results.json").stat().st_mtime_ns == stamp
    # the log of a non-terminal run: one line per epoch, no progress-bar redraws
    log = "".join(lines) + rest
    assert "\r" not in log and sum(ln.startswith("epoch ") for ln in log.splitlines()) >= 2


def _wandb_records(run_dir: Path) -> list:
    """The protobuf records of an offline run's .wandb file (W&B's LevelDB-style log: a 7-byte
    ':W&B' header, 32 KiB blocks, each chunk a 7-byte header (crc, length, type) and its bytes)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # full, or the last piece of a record
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_a_wandb_run_carries_config_group_name_metrics_and_the_protocol_table(make_cfg, tmp_path):
    from lcredit.train import train

    cfg = make_cfg(*[o for o in TINY if not o.startswith("logger=")], "logger=wandb",
                   "protocol.every_n_epochs=1", "seed=4", "tags=[pilot]")
    res = train(cfg)
    (run_dir,) = Path(res["output_dir"]).glob("wandb/offline-run-*")
    recs = _wandb_records(run_dir)
    kinds = {r.WhichOneof("record_type") for r in recs}
    assert {"run", "history", "summary"} <= kinds, kinds
    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    assert run.job_type == "dfa" and run.display_name == "seed=4", (run.job_type, run.display_name)
    assert {"pilot", "rule:dfa", "model:resmlp", "data:ladder"} <= set(run.tags)
    assert run.run_group == "" and run.project == "lcredit"  # a lone run: no sweep to group by
    config = {_key(i) for r in recs if r.WhichOneof("record_type") in ("run", "config")
              for i in (r.run.config.update if r.WhichOneof("record_type") == "run" else r.config.update)}
    assert {"method", "model", "data", "protocol", "seed"} <= config, config
    keys = {_key(i) for r in recs if r.WhichOneof("record_type") == "history" for i in r.history.item}
    for k in ("diag/gamma/l1", "diag/hidden_norm/l2", "diag/log10_hidden_norm/l2",
              "diag/bp_grad_norm/l2", "diag/rho/l1", "protocol/a", "protocol/report/_type"):
        assert k in keys, k
    # the protocol report as a table, one row per layer, at each of the 2 measurements
    from lcredit.callbacks.protocol import REPORT_COLUMNS

    tables = sorted(run_dir.glob("files/media/table/protocol/report_*.table.json"))
    assert len(tables) == 2, tables
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == REPORT_COLUMNS and len(table["data"]) == 3  # layers 0..2
    assert {row[8] for row in table["data"]} <= {"trustworthy", "walk back"}
    summary = {_key(i): i.value_json for r in recs if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update}
    assert json.loads(summary["verdict"]) in ("trustworthy", "walk back")
    assert "first_fired" in summary and "abort" in summary


def test_a_study_sweeps_wandb_group_is_the_study(make_cfg):
    from lcredit.train import wandb_run_info

    cfg = make_cfg("experiment=six_rule_audit", "scale=smoke", "++study.arm=bp", "++study.job=bp",
                   "logger=wandb")
    info = wandb_run_info(cfg, cfg.logger.wandb, None)
    assert info["group"] == "six_rule_audit/smoke" and info["name"] == "bp/seed=0"
    assert "study:six_rule_audit" in info["tags"] and info["config"]["scale"] == "smoke"


def test_the_report_uploads_its_figures_and_tables_to_wandb(make_cfg, tmp_path):
    from lcredit.report import report
    from lcredit.train import train

    for seed in (0, 1):
        train(make_cfg(*TINY, f"seed={seed}", out=f"sweep/dfa/seed{seed}"))
    root = tmp_path / "sweep"
    written = report([root], wandb_mode="offline")
    (run_dir,) = (root / "report" / "wandb").glob("offline-run-*")
    images = sorted(p.name for p in run_dir.glob("files/media/images/figures/*.png"))
    pngs = sorted(p.stem for p in written if p.suffix == ".png")
    assert len(images) == len(pngs) == 3, (images, pngs)
    assert list(run_dir.glob("files/media/table/tables/*.table.json"))
    run = next(r.run for r in _wandb_records(run_dir) if r.WhichOneof("record_type") == "run")
    assert run.job_type == "report" and run.run_group.startswith("sweep/")
