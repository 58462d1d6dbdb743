"""Reliability: no result mislabelled, no traceback for a user's mistake, no run lost to a
signal. Each test names the failure it guards against."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import LIGHT_MEASURE, QUIET, TINY_LADDER, compose_cfg, forked_cli
from lcredit.errors import ConfigError
from lcredit.train import RunAborted
from lcredit.training import train

TINY = [*TINY_LADDER, "data.n_train=512"]
EVERY = ["protocol.every_n_epochs=1"]


def cli(*args, cwd, timeout=300, module="lcredit.train"):
    return forked_cli(module, *args, cwd=cwd, timeout=timeout)


# ---------------------------------------------------------------- 1. resume checks its settings
def test_resume_refuses_a_checkpoint_of_other_settings_before_the_baseline_trains(make_cfg,
                                                                                    tmp_path):
    first = train(make_cfg("method=dfa", *TINY, "trainer.max_epochs=1", out="first"))
    ckpt = first["checkpoint"]
    cache = tmp_path / "fresh_cache"
    for overrides, named in [(["model.act=relu", "data.alpha=0.3"], ["model.act", "data.alpha"]),
                             (["method=bp"], ["method._target_"]),
                             (["model.d=16"], ["model.d"]),
                             (["seed=3"], ["seed"])]:
        cfg = make_cfg("method=dfa", *TINY, "trainer.max_epochs=2", f"resume={ckpt}",
                       "protocol.frozen_baseline=auto", f"paths.cache_dir={cache}", *overrides,
                       out="again")
        with pytest.raises(ConfigError) as err:
            train(cfg)
        msg = str(err.value)
        assert "\n" not in msg and all(k in msg for k in named), msg
        assert not cache.exists()  # refused before the frozen baseline trained
        assert not (tmp_path / "again").exists()
    # what a resumed run may change: its length, logging, the protocol
    resumed = train(make_cfg("method=dfa", *TINY, "trainer.max_epochs=2", f"resume={ckpt}",
                             "protocol.thresholds.a=40", out="ok"))
    assert resumed["final"]["epochs"] == 2


# ---------------------------------------------------------------- 2. sweep directory names
def test_job_dirnames_are_short_single_segments_whatever_the_overrides():
    from lcredit.cli import DIRNAME_MAX, job_dirname
    many = [f"method.opt{i}={'x' * 12}" for i in range(14)]
    name = job_dirname(many)
    assert len(name) <= DIRNAME_MAX and "/" not in name
    assert job_dirname(many) == name  # stable
    assert job_dirname(many[:-1] + ["method.opt13=y"]) != name  # the hash tells them apart
    paths = job_dirname(["paths.cache_dir=/a/b", "logger=none", "protocol.measure.rho_samples=8",
                         "seed=3", "method=fa"])
    assert paths.startswith("method=fa,~") and len(paths) == len("method=fa,~") + 6
    # jobs that differ only in a left-out setting still get their own directories
    assert job_dirname(["method=fa", "protocol.measure.rho_samples=16"]) != job_dirname(
        ["method=fa", "protocol.measure.rho_samples=8"])
    assert job_dirname(["method=fa", "seed=3"]) == "method=fa"
    a, b = (job_dirname([f"init_from=/runs/{x}/last.ckpt"]) for x in "ab")
    assert a != b and "/" not in a
    assert job_dirname([]) == "defaults"


@pytest.mark.slow
def test_a_sweep_with_many_overrides_and_a_failed_job_runs_every_job_and_exits_non_zero(tmp_path):
    overrides = ["debug=fast", "data.n_train=256", "model.d=16", "model.depth=2",
                 "model.mlp_ratio=2.0", "data.batch_size=64", "data.eval_batch_size=256",
                 "protocol.frozen_baseline=null", "protocol.eval_batches=1",
                 "protocol.stability_batches=2", "protocol.measure.rho_samples=64",
                 "protocol.measure.null_draws=2", "logger=none", f"paths.cache_dir={tmp_path}/c/d"]
    proc = cli("-m", "method=dfa,bp", "optim.lr=1e-3,-1", *overrides,
               f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    jobs = sorted(p.parent for p in (tmp_path / "sweep").glob("*/seed=0/results.json"))
    assert len(jobs) == 4 and all(len(j.parent.name) <= 80 for j in jobs)
    statuses = sorted(json.loads((j / "results.json").read_text())["status"] for j in jobs)
    assert statuses == ["completed", "completed", "failed", "failed"]
    assert "2 job(s) of the sweep failed" in proc.stderr and "optim.lr=-1" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- 3. signals
def _wait_for(path: Path, proc, seconds=120):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None or time.time() - t0 > seconds:
            raise AssertionError(f"{path} never appeared: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)


@pytest.mark.slow
# SIGINT here; SIGTERM (a scheduler's) in test_cluster's preemption test, through a relaunch
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130)])
def test_a_signal_leaves_a_checkpoint_and_results_and_resume_continues_exactly(tmp_path, signum,
                                                                                code):
    # long enough (~0.1 s an epoch, two measurements) that the signal lands mid-training
    common = ["method=dfa", *TINY, "data.n_train=2048", "trainer.max_epochs=20", "logger=none",
              "protocol.frozen_baseline=null", "trainer.enable_progress_bar=false",
              "protocol.every_n_epochs=10", "protocol.abort.enabled=false",
              "protocol.measure.rho_samples=128",
              "protocol.measure.null_draws=2"]
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "lcredit.train", *common,
                             f"hydra.run.dir={run}"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(run / "checkpoints" / "last.ckpt", proc)  # training has started
    time.sleep(0.5)
    proc.send_signal(signum)
    proc.communicate(timeout=120)
    assert proc.returncode == code
    stopped = json.loads((run / "results.json").read_text())
    assert stopped["status"] == "interrupted"
    assert stopped["interrupted"]["signal"] == signal.Signals(signum).name
    assert stopped["checkpoint"] and Path(stopped["checkpoint"]).is_file()
    assert len(stopped["history"]) < 20
    resumed = train(compose_cfg(tmp_path / "resumed", *common, f"resume={stopped['checkpoint']}"))
    whole = train(compose_cfg(tmp_path / "whole", *common))
    assert resumed["status"] == "completed" and resumed["final"] == whole["final"]
    assert [r["test_acc"] for r in resumed["history"]] == [r["test_acc"] for r in whole["history"]]


def test_the_epoch_0_checkpoint_resumes_exactly(make_cfg):
    """Interrupted before the first epoch ends, a run has only the checkpoint saved at its start:
    resuming from it must be the uninterrupted run."""
    class StopAtStart(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            raise KeyboardInterrupt

    common = ["method=dfa", *TINY, "trainer.max_epochs=2"]
    with pytest.raises(BaseException):
        train(make_cfg(*common, out="stopped"), extra_callbacks=[StopAtStart()])
    ckpt = Path(make_cfg(*common, out="stopped").paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["epoch"] == 0
    resumed = train(make_cfg(*common, f"resume={ckpt}", out="resumed"))
    whole = train(make_cfg(*common, out="whole"))
    assert resumed["final"] == whole["final"]


# ---------------------------------------------------------------- 4. an aborted run stays aborted
def test_resuming_an_aborted_run_keeps_it_aborted_unless_the_abort_is_turned_off(make_cfg):
    common = ["method=dfa", *TINY, *EVERY, "protocol.thresholds.a=1.0001"]  # fires at once
    aborted = train(make_cfg(*common, "trainer.max_epochs=4", out="aborted"))
    assert aborted["status"] == "aborted" and aborted["final"]["epochs"] == 1
    with pytest.raises(RunAborted, match="stays aborted"):
        train(make_cfg(*common, "trainer.max_epochs=4", f"resume={aborted['checkpoint']}",
                       out="again"))
    on = train(make_cfg(*common, "trainer.max_epochs=3", "protocol.abort.enabled=false",
                        f"resume={aborted['checkpoint']}", out="on"))
    assert on["status"] == "completed" and on["final"]["epochs"] == 3
    assert on["previous_aborts"] == [aborted["abort"]]
    assert on["history"][0]["abort"] == aborted["abort"]


@pytest.mark.slow
def test_cli_resume_of_an_aborted_run_says_so_and_exits(tmp_path):
    common = ["method=dfa", *TINY, *EVERY, "protocol.thresholds.a=1.0001", "logger=none",
              "protocol.frozen_baseline=null"]
    first = train(compose_cfg(tmp_path / "a", *common))  # the aborted run (in-process)
    assert first["status"] == "aborted"
    again = cli(*common, *QUIET, *LIGHT_MEASURE, f"resume={first['checkpoint']}",
                f"hydra.run.dir={tmp_path}/b", cwd=tmp_path)
    assert again.returncode == 0 and "stays aborted" in again.stderr
    assert "Traceback" not in again.stderr


# ---------------------------------------------------------------- 5. a user's mistake: one line
def _checkpoint_variants(tmp_path, make_cfg):
    real = Path(train(make_cfg("method=dfa", *TINY, "trainer.max_epochs=1", out="real"))["checkpoint"])
    data = real.read_bytes()
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.ckpt").write_bytes(os.urandom(4096))
    (tmp_path / "pickled.ckpt").write_bytes(b"\x80\x04K\x01.")  # a pickle of 1, no state_dict
    return ["empty", "truncated", "garbage", "pickled"]


BAD = [  # (overrides, key the message must name)
    (["optim.lr=0"], "optim.lr"), (["optim.lr=abc"], "optim.lr"), (["optim.lr=-1e-3"], "optim.lr"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay"), (["seed=-1"], "seed"),
    (["seed=1.5"], "seed"), (["seed=abc"], "seed"),
    (["protocol.every_n_epochs=0"], "protocol.every_n_epochs"),
    (["protocol.eval_batches=0"], "protocol.eval_batches"),
    (["protocol.thresholds.a=-1"], "protocol.thresholds.a"),
    (["protocol.thresholds.b=-1e-7"], "protocol.thresholds.b"),
    (["protocol.measure.rho_samples=0"], "protocol.measure.rho_samples"),
    (["trainer.max_epochs=0"], "trainer.max_epochs"), (["trainer.max_epochs=-1"], "trainer.max_epochs"),
    (["protocol.abort.patience=0"], "protocol.abort.patience"),
    (["+trainer.check_val_every_n_epoch=2"], "trainer.check_val_every_n_epoch"),
    (["protocol.frozen_baseline=1.5"], "protocol.frozen_baseline"),
    (["protocol.frozen_baseline=/no/such/results.json"], "protocol.frozen_baseline"),
    # a key nothing reads (a typo, or behind +) was silently accepted
    (["+protocol.abort.enable=false"], "protocol.abort.enable"),
    (["+protocol.thresholdz.a=5"], "protocol.thresholdz"), (["+foo=1"], "foo"),
    (["+paths.outputdir=x"], "paths.outputdir"),
    (["+optim.lrr=1e-3"], "optim.lr?"), (["+trainer.max_epoch=3"], "trainer.max_epochs?"),
    (["+method.penalty_lamb=1"], "method.penalty_lam?"), (["+model.depht=3"], "model.depth?"),
    # a run that would train nothing and call itself completed
    (["trainer.limit_train_batches=0"], "trainer.limit_train_batches"),
    (["trainer.limit_train_batches=0.0"], "trainer.limit_train_batches"),
    (["trainer.limit_train_batches=1.5"], "trainer.limit_train_batches"),
    (["trainer.limit_train_batches=nan"], "trainer.limit_train_batches"),
    # nan passes every range check, and was saved as null: refused under any key
    (["data.alpha=nan"], "data.alpha"), (["block_grad_clip=nan"], "block_grad_clip"),
    (["method.penalty_lam=inf"], "method.penalty_lam"), (["optim.lr=nan"], "optim.lr"),
    (["protocol.measure.rho_eps=nan"], "protocol.measure.rho_eps"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[b[0][0] for b in BAD])
def test_bad_values_fail_in_one_line_before_anything_exists(make_cfg, tmp_path, overrides, key):
    cache = tmp_path / "cache_here"
    cfg = make_cfg("method=dfa", *TINY, "protocol.frozen_baseline=auto",
                   f"paths.cache_dir={cache}", *overrides, out="run")
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert key in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists() and not cache.exists()


def test_unreadable_resume_files_fail_in_one_line(make_cfg, tmp_path):
    for name in _checkpoint_variants(tmp_path, make_cfg):
        cfg = make_cfg("method=dfa", *TINY, f"resume={tmp_path / name}.ckpt", out="run")
        with pytest.raises(ConfigError) as err:
            train(cfg)
        msg = str(err.value)
        assert msg.startswith("resume=") and f"{name}.ckpt" in msg and "\n" not in msg, msg
        assert "weights_only" not in msg


def test_an_unreadable_checkpoint_found_by_auto_resume_says_how_to_start_afresh(make_cfg):
    cfg = make_cfg("method=dfa", *TINY, "trainer.max_epochs=1")
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(os.urandom(512))
    with pytest.raises(ConfigError) as err:
        train(cfg)
    msg = str(err.value)
    assert "last.ckpt" in msg and "auto_resume=false" in msg and "\n" not in msg, msg
    fresh = train(make_cfg("method=dfa", *TINY, "trainer.max_epochs=1", "auto_resume=false"))
    assert fresh["status"] == "completed"


def test_unwritable_output_and_cache_dirs_fail_in_one_line(make_cfg, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for key in ("paths.output_dir", "paths.cache_dir"):
        cfg = make_cfg("method=dfa", *TINY, "protocol.frozen_baseline=auto",
                       f"{key}={blocker}/sub", out="run")
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            train(cfg)


def test_corrupt_fashion_mnist_files_fail_in_one_line(make_cfg, tmp_path):
    from test_vision_data import write_fashion_mnist
    import numpy as np
    write_fashion_mnist(tmp_path, np.random.default_rng(0))
    raw = next((tmp_path / "FashionMNIST" / "raw").glob("train-images*"))
    raw.write_bytes(raw.read_bytes()[:100])  # truncated
    cfg = make_cfg("method=dfa", "data=fashion_mnist", f"data.root={tmp_path}", out="run")
    with pytest.raises(ConfigError, match="fashion_mnist") as err:
        train(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("module,args,key", [
    ("lcredit.exploit", ["ckpt=/no/such.ckpt", "step_sizes=[0.1,nan]"], "step_sizes[1]"),
    ("lcredit.exploit", ["ckpt=/no/such.ckpt", "seed=-1"], "seed"),
    ("lcredit.probe", ["ckpt=/no/such.ckpt", "steps=nan"], "steps"),
    ("lcredit.audit", ["ckpt=/no/such.ckpt", "thresholds.a=inf"], "thresholds.a"),
    ("lcredit.audit", ["ckpt=/no/such.ckpt", "thresholds.a=-5"], "thresholds.a")])
def test_the_tools_refuse_non_finite_numbers_in_one_line(tmp_path, module, args, key):
    proc = cli(*args, f"hydra.run.dir={tmp_path}/r", cwd=tmp_path, module=module)
    assert proc.returncode == 2, proc.stderr[-1500:]
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and key in lines[0], proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("module,args,key", [
    ("lcredit.study", ["width", "scale=smoke", "arms="], "arms="),
    ("lcredit.study", ["width", "scale=smoke", "seeds="], "seeds="),
    ("lcredit.study", ["width", "scale=smoke", "trainer.max_epoch=3"], "trainer.max_epoch"),
    ("lcredit.audit", ["ckpt=/no/such.ckpt", "out=/proc/q"], "out=/proc/q"),
    ("lcredit.probe", ["ckpt=/no/such.ckpt", "out=/proc/q"], "out=/proc/q"),
    ("lcredit.report", ["/no/such/dir"], "/no/such/dir"),
    ("lcredit.train", ["hydra.run.dir=/proc/x"], "hydra.run.dir=/proc/x"),
    ("lcredit.train", ["hydra.sweep.dir=/proc/x", "seed=0,1", "-m"], "hydra.sweep.dir=/proc/x"),
    ("lcredit.audit", ["ckpt=/no/such.ckpt", "hydra.run.dir=/proc/x"], "hydra.run.dir")])
def test_every_entry_point_says_a_mistake_in_one_line_and_exits_2(tmp_path, module, args, key):
    """An empty arms= ran the whole study; a mistyped study override, an unwritable out= and
    the report's own errors printed tracebacks or exited 1."""
    proc = cli(*args, cwd=tmp_path, module=module)
    assert proc.returncode == 2, proc.stderr[-1500:]
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and key in lines[0], proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "studies").exists()  # no job ran


def test_the_report_never_pools_different_runs_under_one_name(make_cfg, tmp_path):
    """Two sweeps' defaults/seed=0 (one dfa, one bp) under one directory were one arm, n = 2,
    mean ± std across two rules."""
    from lcredit.report import collect, main
    for rule in ("dfa", "bp"):
        cfg = make_cfg(f"method={rule}", *TINY, "trainer.max_epochs=1",
                       out=f"all/{rule}_sweep/defaults/seed_0")
        train(cfg)
    (records,) = collect([tmp_path / "all"]).values()
    arms = sorted(r["study"]["arm"] for r in records)
    assert arms == ["defaults [bp]", "defaults [dfa]"], arms
    assert main([str(tmp_path / "all"), "--out", str(tmp_path / "rep")]) == 0
    md = next((tmp_path / "rep").glob("*.md")).read_text()
    assert "defaults [bp]" in md and "defaults [dfa]" in md and "separate rows" in md


def test_the_report_reads_a_results_file_that_is_not_a_record(tmp_path):
    from lcredit.report import main
    run = tmp_path / "sweep" / "defaults" / "seed=0"
    run.mkdir(parents=True)
    (run / "results.json").write_text("[1, 2]")
    assert main([str(tmp_path / "sweep"), "--out", str(tmp_path / "rep")]) == 0
    assert "unreadable results.json" in next((tmp_path / "rep").glob("*.md")).read_text()


@pytest.mark.slow
def test_cli_mistakes_exit_2_with_one_error_line(tmp_path):
    # lcredit.train's: test_train's bad override (the same handler for every ConfigError, and
    # every bad value in-process: BAD, the unreadable checkpoints); here the audit CLI's
    for args, module in [([], "lcredit.audit")]:
        proc = cli(*args, f"hydra.run.dir={tmp_path}/r", cwd=tmp_path, module=module)
        assert proc.returncode == 2, (args, proc.stderr[-1500:])
        lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
        assert len(lines) == 1 and lines[0].startswith(("lcredit: error:", "lcredit.audit: error:"))
        assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- 6 and 7. divergence
class Poison(Callback):
    """Sets one block weight to NaN after ``step`` optimizer steps."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.blocks[1].fc2.weight[0, 0] = float("nan")


@pytest.mark.parametrize("precision,std", [("32-true", "1e38"), ("64-true", "1e308")])
def test_a_diverged_run_reports_where_it_broke_and_no_accuracy(make_cfg, precision, std):
    """A stream that overflows in block 1 (W2 of std 1e38) breaks at the first step: the run
    says so (epoch, step, h_1), reports no accuracy, cannot be resumed."""
    r = train(make_cfg("method=dfa", *TINY, *EVERY, "trainer.max_epochs=3",
                       "protocol.abort.enabled=false", f"model.w2_std={std}",
                       f"trainer.precision={precision}"))
    assert r["status"] == "diverged" and r["final"]["epochs"] == 1
    assert r["final"]["test_acc"] is None and r["final"]["train_acc"] is None
    assert r["divergence"] == {"epoch": 1, "step": 0, "first_nonfinite_layer": 1}
    assert r["protocol"] is None  # nothing was measured before it broke
    with pytest.raises(ConfigError, match="diverged at epoch 1"):
        train(make_cfg("method=dfa", *TINY, *EVERY, "trainer.max_epochs=3",
                       "protocol.abort.enabled=false", f"model.w2_std={std}",
                       f"trainer.precision={precision}", f"resume={r['checkpoint']}", out="again"))


def test_a_run_diverging_later_keeps_its_last_report_labelled_stale(make_cfg):
    steps_per_epoch = 512 // 128
    r = train(make_cfg("method=dfa", *TINY, *EVERY, "trainer.max_epochs=3",
                       "protocol.abort.enabled=false"),
              extra_callbacks=[Poison(steps_per_epoch + 1)])
    assert r["status"] == "diverged" and r["final"]["test_acc"] is None
    d = r["divergence"]
    assert d["epoch"] == 2 and d["step"] == steps_per_epoch + 1
    # the poison came from outside the rule: a replay of the step stays finite, and says so
    assert d["first_nonfinite_layer"] is None and "stayed finite" in d["note"]
    assert r["protocol"]["epoch"] == 1 and r["protocol"]["stale"]
    assert any("stale" in note for note in r["protocol"]["notes"])


def test_audit_of_a_diverged_checkpoint_reports_missing_layers_with_a_reason(make_cfg):
    from lcredit.audit import audit
    r = train(make_cfg("method=dfa", *TINY, "trainer.max_epochs=2",
                       "protocol.abort.enabled=false"), extra_callbacks=[Poison(2)])
    rep = audit(r["checkpoint"])
    assert rep.layers[2]["missing"].startswith("h_2 or its gradient is not finite")
    assert any("a diverged model" in n for n in rep.notes)


def test_a_diverged_frozen_baseline_is_no_comparator_and_is_not_cached(make_cfg, tmp_path):
    cache = tmp_path / "cache_div"
    r = train(make_cfg("method=dfa", *TINY, "trainer.max_epochs=2", "optim.lr=1e30",
                       "protocol.frozen_baseline=auto", f"paths.cache_dir={cache}"))
    fb = r["frozen_baseline"]
    assert fb["status"] == "diverged" and fb["final_acc"] is None
    from lcredit.baseline import accuracy_at
    assert accuracy_at(fb, 1, 0.5) is None  # (d) gets no comparator
    assert not any((cache / "frozen").glob("*/results.json"))


# ---------------------------------------------------------------- 8. one baseline for two runs
@pytest.mark.slow
def test_concurrent_runs_needing_one_baseline_train_it_once(tmp_path):
    common = ["method=dfa", *TINY, "trainer.max_epochs=2", "logger=none",
              "protocol.frozen_baseline=auto", f"paths.cache_dir={tmp_path}/cache",
              "trainer.enable_progress_bar=false"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([sys.executable, "-m", "lcredit.train", *common,
                               f"hydra.run.dir={tmp_path}/run{i}"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    cached = sorted(json.loads((tmp_path / f"run{i}" / "results.json").read_text())
                    ["frozen_baseline"]["cached"] for i in range(2))
    assert cached == [False, True]
    assert len(list((tmp_path / "cache" / "frozen").glob("*/results.json"))) == 1


# ---------------------------------------------------------------- 9. a failed run leaves results
def test_a_run_that_fails_midway_writes_failed_results_with_its_history(make_cfg):
    class Boom(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise RuntimeError("boom in epoch 2")

    cfg = make_cfg("method=dfa", *TINY, "trainer.max_epochs=3")
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg, extra_callbacks=[Boom()])
    r = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert r["status"] == "failed" and "boom in epoch 2" in r["error"]
    assert [row["epoch"] for row in r["history"]] == [1]


# ---------------------------------------------------------------- 9b. a full disk loses nothing
class FullDisk:
    """A disk that fills up under ``root`` once armed: every write into a file there fails with
    ENOSPC unless unlinking a file there freed the room first. The system's temporary directory
    is another filesystem (a rename from it into ``root`` fails with EXDEV, so shutil.move
    copies, as it does on a cluster's node-local /tmp). Writes go through open() (Python file
    objects, fsspec's local files) and os.sendfile (shutil's copy)."""

    def __init__(self, root: Path, monkeypatch):
        import builtins
        import io

        self.root, self.free, self.armed = str(Path(root).resolve()), 0, False
        real_open, real_sendfile = builtins.open, os.sendfile
        real_rename, real_replace, real_unlink = os.rename, os.replace, os.unlink
        disk = self

        class Quota:
            def __init__(self, f):
                self._f = f

            def write(self, data):
                disk.spend(len(data))
                return self._f.write(data)

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __iter__(self):
                return iter(self._f)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

        def inside(path) -> bool:
            try:
                return os.path.realpath(os.fspath(path)).startswith(self.root)
            except TypeError:  # a file descriptor
                return False

        def fd_inside(fd) -> bool:
            try:
                return inside(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                return False

        def fake_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)  # "w" truncates, as a real open does
            return Quota(f) if self.armed and set(mode) & set("wax+") and inside(file) else f

        def fake_sendfile(out_fd, in_fd, offset, count):
            if self.armed and fd_inside(out_fd):
                self.spend(count)
            return real_sendfile(out_fd, in_fd, offset, count)

        def moved(real):
            def move(src, dst, *args, **kwargs):
                if self.armed and inside(dst) and not inside(src):
                    raise OSError(18, "Invalid cross-device link")  # EXDEV
                return real(src, dst, *args, **kwargs)
            return move

        def fake_unlink(path, *args, **kwargs):
            size = os.path.getsize(path) if self.armed and inside(path) else 0
            real_unlink(path, *args, **kwargs)
            self.free += size

        for mod in (builtins, io):
            monkeypatch.setattr(mod, "open", fake_open)
        monkeypatch.setattr(os, "sendfile", fake_sendfile)
        monkeypatch.setattr(os, "rename", moved(real_rename))
        monkeypatch.setattr(os, "replace", moved(real_replace))
        monkeypatch.setattr(os, "unlink", fake_unlink)
        monkeypatch.setattr(os, "remove", fake_unlink)

    def spend(self, n: int) -> None:
        if n > self.free:
            raise OSError(28, "No space left on device")  # ENOSPC
        self.free -= n


def test_a_full_disk_keeps_the_last_good_checkpoint_and_records_the_failure(make_cfg,
                                                                            monkeypatch):
    """Lightning's writer stages a checkpoint in the temporary directory and copies it over
    last.ckpt when that is another filesystem: a full disk truncated the good checkpoint and
    left no results.json. Now the checkpoint is written beside itself and renamed, and the run's
    reserve makes room for its failure record."""
    cfg = make_cfg("method=dfa", *TINY, "trainer.max_epochs=1")
    out = Path(cfg.paths.output_dir)
    train(cfg)
    ckpt = out / "checkpoints" / "last.ckpt"
    good = ckpt.read_bytes()
    disk = FullDisk(out, monkeypatch)

    class FillTheDisk(Callback):  # after epoch 2's measurement, before its checkpoint
        def on_validation_end(self, trainer, pl_module):
            disk.armed = True

    with pytest.raises(OSError) as err:
        train(make_cfg("method=dfa", *TINY, "trainer.max_epochs=2"),
              extra_callbacks=[FillTheDisk()])
    assert err.value.errno == 28
    monkeypatch.undo()
    assert ckpt.read_bytes() == good  # the previous checkpoint, whole
    assert "state_dict" in torch.load(ckpt, weights_only=False)
    r = json.loads((out / "results.json").read_text())
    assert r["status"] == "failed" and "No space left" in r["error"], r.get("error")
    assert [row["epoch"] for row in r["history"]] == [1]  # epoch 2 never completed
    assert not [p.name for p in out.rglob("*.tmp")]  # no half-written file left behind
    # with room again, the same command resumes from the good checkpoint and completes
    again = train(make_cfg("method=dfa", *TINY, "trainer.max_epochs=2"))
    assert again["status"] == "completed" and again["final"]["epochs"] == 2


def test_a_full_disk_ends_the_cli_run_with_one_line_and_writes_nothing(tmp_path):
    """From the command line, a disk full from the start (the run's reserve cannot be taken):
    one line naming the directory, exit 2, no traceback, nothing written. (A real process: the
    run builds its model first, and torch's thread pool does not survive a fork.)"""
    script = ("import runpy, sys\n"
              "from lcredit import files\n"
              "def full(directory):\n"
              "    raise OSError(28, 'No space left on device')\n"
              "files.reserve = full\n"
              "sys.argv[0] = 'lcredit.train'\n"
              "runpy.run_module('lcredit.train', run_name='__main__')\n")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", script, "method=dfa", *TINY,
                           "trainer.max_epochs=1", *QUIET, f"hydra.run.dir={out}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("lcredit")]
    assert lines and "paths.output_dir" in lines[-1] and "No space left" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "results.json").exists() and not (out / "checkpoints").exists()


# ---------------------------------------------------------------- 9c. one process per directory
def test_a_second_process_on_a_live_run_directory_stops_before_writing(make_cfg, tmp_path):
    """Two processes on one run directory (a command run twice, a sweep relaunched while it
    runs): the second one auto-resumed the first's live checkpoint and both appended to
    metrics.csv. Now it stops with one line naming the holder; once the holder is dead (even
    killed, its lock never released by hand) the directory is free again."""
    from lcredit.errors import DirectoryBusy
    cfg = make_cfg("method=dfa", *TINY, "trainer.max_epochs=1")
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom lcredit.files import RunLock\n"
         f"with RunLock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(300)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryBusy) as err:
            train(cfg)
        msg = str(err.value)
        assert f"pid {holder.pid}" in msg and "paths.output_dir" in msg and "\n" not in msg, msg
        assert sorted(p.name for p in out.iterdir()) == [".lcredit-lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    r = train(cfg)  # the dead holder's lock is gone with it
    assert r["status"] == "completed"
    assert not (out / ".lcredit-lock").exists() and not (out / ".lcredit-reserve").exists()


# ---------------------------------------------------------------- 10. small things
def test_resuming_into_the_same_directory_appends_to_metrics_csv(make_cfg):
    """The first segment's rows stay; rows of a partial epoch after the checkpoint (an
    interrupted run's) go, since the resumed run logs that epoch again."""
    import csv
    common = ["method=dfa", *TINY, "logger=csv", *EVERY, "trainer.log_every_n_steps=1"]
    first = train(make_cfg(*common, "trainer.max_epochs=2", out="same"))
    path = Path(first["output_dir"]) / "csv" / "metrics.csv"
    rows = list(csv.DictReader(path.open()))
    with path.open("a", newline="") as f:  # what a run interrupted in epoch 3 had flushed
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writerow({k: "" for k in rows[0]} | {"epoch": "2", "step": "8", "train/loss_step": "9.9"})
        w.writerow({k: "" for k in rows[0]} | {"epoch": "2", "step": "9", "train/loss_step": "9.9"})
    train(make_cfg(*common, "trainer.max_epochs=3", f"resume={first['checkpoint']}", out="same"))
    rows = list(csv.DictReader(path.open()))
    epochs = sorted({int(float(r["epoch"])) for r in rows if r.get("test/acc")})
    assert epochs == [0, 1, 2]
    assert "9.9" not in {r.get("train/loss_step") for r in rows}
    steps = [(r["epoch"], r["step"]) for r in rows if r.get("train/loss_step")]
    assert len(steps) == len(set(steps))  # no step logged twice


@pytest.mark.slow
def test_a_built_wheel_ships_the_configs(tmp_path):
    import shutil
    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src_copy"  # an in-tree build leaves build/ behind: build a copy
    shutil.copytree(repo / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info",
                                                                              "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path), str(src)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import zipfile
    wheel = next(tmp_path.glob("lcredit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "lcredit/conf/config.yaml" in names and "lcredit/conf/method/dfa.yaml" in names
    assert "lcredit/conf/hydra/default.yaml" in names
    # installed from the wheel (not a checkout), the entry point composes its config
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONWARNINGS="ignore")
    # one process (each costs the torch + Lightning import): where the configs are found, and
    # that the default config composes from there
    script = ("import lcredit.train as t\n"
              "from hydra import compose, initialize_config_dir\n"
              "print(t.CONF_DIR)\n"
              "with initialize_config_dir(config_dir=t.CONF_DIR, version_base='1.3'):\n"
              "    print(compose('config').method._target_)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    conf_dir, target = proc.stdout.split()[-2:] if proc.returncode == 0 else ("", "")
    assert conf_dir.startswith(str(site)), proc.stdout + proc.stderr[-1500:]
    assert target == "lcredit.rules.DFA", proc.stdout
