"""End-to-end training through ``lcredit.train.train`` (in-process) and the CLI (subprocess)."""
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import TINY_LADDER, assert_resume_exact, forked_cli
from lcredit.data import build_task
from lcredit.errors import ConfigError
from lcredit.build import build_rule
from lcredit.training import train

REPO = Path(__file__).resolve().parents[1]


def load_ckpt(results):
    return torch.load(results["checkpoint"], map_location="cpu", weights_only=False)


def initial_rule(cfg):
    """The rule exactly as train() builds it before the first step."""
    L.seed_everything(int(cfg.seed), verbose=False)
    return build_rule(cfg, build_task(cfg.data))


@pytest.mark.parametrize("method", ["dfa", "fa", "bp"])
def test_resume_equals_uninterrupted_run(make_cfg, method):
    assert_resume_exact(make_cfg, f"method={method}", *TINY_LADDER, "seed=3")


def test_same_seed_same_metrics_other_seed_differs(make_cfg):
    common = ["method=dfa", *TINY_LADDER, "trainer.max_epochs=1"]
    r1 = train(make_cfg(*common, "seed=7", out="a"))
    r2 = train(make_cfg(*common, "seed=7", out="b"))
    r3 = train(make_cfg(*common, "seed=8", out="c"))
    assert r1["final"] == r2["final"]
    assert r1["final"] != r3["final"]


@pytest.mark.parametrize("method,overrides", [("dfa", []), ("fa", ["method.variant=layerwise"]),
                                              ("fa", ["method.variant=blockwise"])])
def test_feedback_fixed_in_training_and_saved(make_cfg, method, overrides):
    cfg = make_cfg(f"method={method}", *overrides, *TINY_LADDER, "trainer.max_epochs=2")
    results = train(cfg)
    saved = load_ckpt(results)["state_dict"]
    init = initial_rule(cfg).state_dict()
    fb = [k for k in init if "feedback" in k]
    assert fb
    for k in fb:
        assert torch.equal(saved[k], init[k]), k  # never changed, and it is in the checkpoint
    moved = [k for k in init if k.startswith("model.blocks") and not torch.equal(saved[k], init[k])]
    assert moved  # while the blocks did learn


def test_frozen_keeps_blocks_at_init(make_cfg):
    cfg = make_cfg("method=frozen", *TINY_LADDER, "trainer.max_epochs=2")
    saved = load_ckpt(train(cfg))["state_dict"]
    init = initial_rule(cfg).state_dict()
    for k in init:
        if k.startswith("model.blocks"):
            assert torch.equal(saved[k], init[k]), k
        elif k.startswith(("model.embed", "model.readout")) and k.endswith("weight"):
            assert not torch.equal(saved[k], init[k]), k


DIGITS = ["data=digits", "model.d=64", "model.depth=2", "trainer.max_epochs=8"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bp", "dfa", "fa", "frozen"])
def test_each_rule_learns_digits(make_cfg, method):
    results = train(make_cfg(f"method={method}", *DIGITS))
    acc = results["final"]["test_acc"]
    assert acc > 0.5, acc  # chance is 0.1
    if method == "bp":
        assert acc >= 0.90, acc


def test_random_targets_control_stays_at_chance(make_cfg):
    results = train(make_cfg("method=bp", "data=digits", "data.random_targets=true",
                             "trainer.max_epochs=4"))
    assert results["final"]["test_acc"] < 0.25


def test_results_file_contents(make_cfg):
    results = train(make_cfg("method=fa", *TINY_LADDER, "trainer.max_epochs=2", "seed=4"))
    out = Path(results["output_dir"])
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["seed"] == 4 and on_disk["rule"] == "fa" and on_disk["status"] == "completed"
    assert on_disk["config"]["method"]["variant"] == "blockwise"
    assert on_disk["form"]["original"] and on_disk["form"]["departures"] == {}
    assert on_disk["form"]["original_values"] == {"variant": "blockwise"}
    assert {"torch", "lightning", "hydra", "lcredit", "python"} <= set(on_disk["versions"])
    assert [r["epoch"] for r in on_disk["history"]] == [1, 2]
    for row in on_disk["history"]:
        assert {"train_loss", "train_acc", "test_loss", "test_acc", "train_time_s"} <= set(row)
    assert on_disk["final"]["test_acc"] == on_disk["history"][-1]["test_acc"]
    assert on_disk["wall_time_s"] > 0
    assert (out / "config.yaml").exists() and (out / "checkpoints" / "last.ckpt").exists()


@pytest.mark.parametrize("override,needle", [
    ("model.act=swish", "model.act"),
    ("+model.widht=3", "model.widht"),
    ("+method.beta=0.1", "method.beta"),
    ("data.alpha=2", "data.alpha"),
    ("method.penalty_lam=-1", "method.penalty_lam"),
    ("resume=/nonexistent/last.ckpt", "/nonexistent/last.ckpt"),
    ("trainer.precision=16-mixed", "trainer.precision"),
    ("+trainer.max_epoch=3", "trainer.max_epoch"),
])
def test_bad_config_fails_early_naming_the_key(make_cfg, override, needle):
    cfg = make_cfg(override, *TINY_LADDER)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("+", "")):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "results.json").exists()


def run_cli(*args, cwd):
    return forked_cli("lcredit.train", *args, cwd=cwd)


@pytest.mark.slow
def test_cli_default_run_writes_results(tmp_path):
    # The Quickstart's run on its defaults, shortened: same method/model/data, 1 epoch.
    proc = run_cli("trainer.max_epochs=1", "data.n_train=2000", f"hydra.run.dir={tmp_path}/run",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["rule"] == "dfa" and results["task"] == "ladder"
    assert results["config"]["model"]["d"] == 128 and results["config"]["model"]["out_ln"]
    assert "results:" in proc.stdout


# A sweep's job directories: test_protocol_runs' audit CLI sweep.


@pytest.mark.slow
def test_cli_bad_override_is_one_clear_line(tmp_path):
    proc = run_cli("model.act=swish", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert proc.returncode == 2
    assert "model.act" in proc.stderr and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and lines[0].startswith("lcredit: error:"), proc.stderr[-1500:]


def test_path_overrides_with_sweep_syntax_are_quoted():
    from lcredit.cli import quote_path_overrides

    argv = ["prog", "resume=multirun/d/t/method=fa,model.depth=8/seed=1/checkpoints/last.ckpt",
            "model.depth=8", "seed=1,2", "ckpt='already quoted'", "out=plain/dir"]
    quote_path_overrides(argv)
    assert argv[1] == "resume='multirun/d/t/method=fa,model.depth=8/seed=1/checkpoints/last.ckpt'"
    assert argv[2:] == ["model.depth=8", "seed=1,2", "ckpt='already quoted'", "out=plain/dir"]


@pytest.mark.parametrize("method", ["bp", "dfa", "fa"])
def test_bf16_mixed_precision_trains_and_measures_in_float64(make_cfg, method):
    results = train(make_cfg(f"method={method}", *TINY_LADDER, "trainer.max_epochs=1",
                             "trainer.precision=bf16-mixed"))
    assert results["status"] == "completed"
    assert all(v is not None and v == v for v in (results["final"]["train_loss"],
                                                  results["final"]["test_acc"]))
    for row in results["protocol"]["layers"]:
        assert row["gamma"] is not None and abs(row["gamma"]) <= 1


def test_gpu_trainer_without_cuda_is_a_clear_error(make_cfg):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ConfigError, match="trainer=gpu"):
        train(make_cfg("trainer=gpu", *TINY_LADDER))


@pytest.mark.slow
def test_wandb_logger_is_offline_by_default(make_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_SILENT", "true")
    results = train(make_cfg("logger=wandb", *TINY_LADDER, "trainer.max_epochs=1"))
    assert results["config"]["logger"]["wandb"]["offline"] is True
    runs = list((Path(results["output_dir"]) / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run directory written"
