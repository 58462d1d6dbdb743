"""The protocol during training: measuring, logging, aborting, the comparator, the audit."""
import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import LIGHT_MEASURE, TINY_LADDER, forked_cli
from lcredit.audit import audit
from lcredit.errors import ConfigError
from lcredit.train import train

EVERY = ["protocol.every_n_epochs=1"]


def test_bp_on_the_ladder_raises_no_alarm(make_cfg):
    """No diagnostic fires at any measurement of a healthy bp run, (d) included: it is
    compared with the frozen-blocks run trained alongside (protocol.frozen_baseline=auto)."""
    results = train(make_cfg("method=bp", *TINY_LADDER, *EVERY, "trainer.max_epochs=4",
                             "protocol.frozen_baseline=auto"))
    measured = [r["protocol"] for r in results["history"]]
    assert len(measured) == 4  # every epoch, as configured
    for m in measured:
        for k in ("a", "b", "d"):
            assert not m["diagnostics"][k]["fired"], (k, m["diagnostics"][k])
        assert m["diagnostics"]["d"]["value"] is not None  # (d) was evaluated, not skipped
        assert m["aggregates"]["gamma_deep"] == pytest.approx(1, abs=1e-6)
        assert m["verdict"] == "trustworthy"
    assert results["status"] == "completed" and results["abort"] is None
    assert results["protocol"]["verdict"] == "trustworthy"
    assert all(results["protocol_first_fired"][k] is None for k in "abd")


def test_abort_stops_early_and_reports_when_and_why(make_cfg):
    # Threshold (a) at 1.0: any residual stream that grows at all fires at the first check.
    results = train(make_cfg("method=dfa", *TINY_LADDER, *EVERY, "trainer.max_epochs=6",
                             "protocol.thresholds.a=1.0"))
    assert results["status"] == "aborted"
    assert len(results["history"]) == 1
    abort = results["abort"]
    assert abort["epoch"] == 1 and abort["diagnostics"] == ["a"]
    assert abort["epochs_planned"] == 6 and abort["epochs_saved"] == 5
    assert abort["est_seconds_saved"] > 0 and "(a)" in abort["reasons"][0]
    assert results["protocol_first_fired"]["a"] == 1
    assert results["protocol"]["verdict"] == "walk back"
    on_disk = json.loads((Path(results["output_dir"]) / "results.json").read_text())
    assert on_disk["abort"] == abort and on_disk["checkpoint"]


def test_abort_respects_min_epochs_patience_and_switch(make_cfg):
    common = ["method=dfa", *TINY_LADDER, *EVERY, "trainer.max_epochs=4",
              "protocol.thresholds.a=1.0"]
    r = train(make_cfg(*common, "protocol.abort.min_epochs=2", "protocol.abort.patience=2",
                       out="late"))
    assert r["abort"]["epoch"] == 2
    r = train(make_cfg(*common, "protocol.abort.enabled=false", out="off"))
    assert r["status"] == "completed" and len(r["history"]) == 4
    assert r["protocol_first_fired"]["a"] == 1  # still measured and reported


@pytest.mark.slow
def test_default_dfa_run_is_aborted_by_residual_growth(make_cfg):
    """The failure shape of docs/diagnostics.md on the default task: DFA's residual stream explodes."""
    results = train(make_cfg("method=dfa", *EVERY))
    assert results["status"] == "aborted", results["history"][-1]["protocol"]["diagnostics"]
    assert "a" in results["abort"]["diagnostics"]
    assert results["abort"]["epoch"] < 15
    layers = results["protocol"]["layers"]
    assert layers[-1]["hidden_norm"] > 50 * layers[0]["hidden_norm"]


def test_diagnostics_are_logged_per_layer(make_cfg):
    results = train(make_cfg("method=fa", *TINY_LADDER, *EVERY, "trainer.max_epochs=2",
                             "logger=csv"))
    rows = list(csv.DictReader(open(Path(results["output_dir"]) / "csv" / "metrics.csv")))
    keys = set(rows[0])
    for k in ("diag/gamma/l0", "diag/gamma/l2", "diag/rho/l1", "diag/hidden_norm/l2",
              "diag/bp_grad_norm/l2", "diag/null_gamma/l1", "diag/gamma_deep", "protocol/a",
              "protocol/b", "protocol/c", "protocol/a_fired", "protocol/trustworthy",
              "test/acc", "train/loss"):
        assert k in keys, k
    logged = [float(r["diag/gamma/l2"]) for r in rows if r["diag/gamma/l2"]]
    assert len(logged) == 2 and logged[-1] == pytest.approx(
        results["protocol"]["layers"][2]["gamma"])


def test_frozen_baseline_number_and_path(make_cfg, tmp_path):
    common = ["method=dfa", *TINY_LADDER, "trainer.max_epochs=1"]
    r = train(make_cfg(*common, "protocol.frozen_baseline=0.25", out="num"))
    d = r["protocol"]["diagnostics"]["d"]
    assert d["value"] == pytest.approx(100 * (r["final"]["test_acc"] - 0.25))
    frozen = train(make_cfg("method=frozen", *TINY_LADDER, "trainer.max_epochs=1", out="fz"))
    path = Path(frozen["output_dir"]) / "results.json"
    r = train(make_cfg(*common, f"protocol.frozen_baseline={path}", out="path"))
    assert r["frozen_baseline"]["final_acc"] == frozen["final"]["test_acc"]
    assert r["frozen_baseline"]["check"] == "matched"
    # a comparator of another run (here another seed and length; a digits run compared with a
    # ladder baseline gave (d) = -20 pp) is refused, naming the fields ...
    with pytest.raises(ConfigError) as err:
        train(make_cfg(*common, f"protocol.frozen_baseline={path}", "seed=1",
                       "trainer.max_epochs=2", out="other"))
    assert "seed" in str(err.value) and "trainer.max_epochs" in str(err.value)
    assert not (tmp_path / "other").exists()
    # ... unless the user says so, and then the results say it was not checked
    r2 = train(make_cfg(*common, f"protocol.frozen_baseline={path}", "seed=1",
                        "protocol.frozen_baseline_check=false", out="unchecked"))
    assert r2["frozen_baseline"]["check"] == "off"
    assert r2["frozen_baseline"]["mismatched"] == ["seed"]
    from lcredit.report import report
    md = next(p for p in report([r2["output_dir"]], tmp_path / "rep") if p.suffix == ".md")
    assert "not checked" in md.read_text() and "seed" in md.read_text()
    with pytest.raises(ConfigError, match="frozen_baseline"):
        train(make_cfg(*common, f"protocol.frozen_baseline={tmp_path}/nope.json", out="bad"))
    with pytest.raises(ConfigError, match="not a frozen-blocks run"):
        train(make_cfg(*common, f"protocol.frozen_baseline={Path(r['output_dir'])}/results.json",
                       out="bad2"))
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        train(make_cfg(*common, "protocol.frozen_baseline=42", out="bad3"))


def test_frozen_baseline_auto_trains_once_and_is_reused(make_cfg):
    common = [*TINY_LADDER, "trainer.max_epochs=2", "protocol.frozen_baseline=auto", "seed=2"]
    first = train(make_cfg("method=dfa", *common, out="one"))
    fb = first["frozen_baseline"]
    assert fb["cached"] is False and len(fb["history_acc"]) == 2
    cache = Path(first["config"]["paths"]["cache_dir"]) / "frozen"
    entries = list(cache.iterdir())
    assert len(entries) == 1
    stamp = (entries[0] / "results.json").stat().st_mtime_ns
    second = train(make_cfg("method=fa", *common, out="two"))  # same task, model, seed, epochs
    assert second["frozen_baseline"]["cached"] is True
    assert second["frozen_baseline"]["final_acc"] == fb["final_acc"]
    assert (entries[0] / "results.json").stat().st_mtime_ns == stamp
    cached_run = json.loads((entries[0] / "results.json").read_text())
    assert cached_run["rule"] == "frozen" and cached_run["seed"] == 2
    # The frozen run keeps its own checkpoint; the calling run's is the calling rule's.
    assert Path(cached_run["checkpoint"]) == entries[0] / "checkpoints" / "last.ckpt"
    own = torch.load(first["checkpoint"], map_location="cpu", weights_only=False)
    assert own["lcredit"]["rule"] == "dfa"
    third = train(make_cfg("method=dfa", *common, "seed=3", out="three"))  # another seed
    assert third["frozen_baseline"]["cached"] is False
    d = second["protocol"]["diagnostics"]["d"]
    assert d["value"] == pytest.approx(100 * (second["final"]["test_acc"] - fb["history_acc"][-1]))
    # A branched run's baseline starts from its checkpoint: its own entry, never the plain one.
    branched = train(make_cfg("method=dfa", *common, f"init_from={first['checkpoint']}", out="four"))
    assert branched["frozen_baseline"]["cached"] is False
    assert branched["frozen_baseline"]["source"] != fb["source"]


def test_a_frozen_run_is_not_judged_by_d_against_itself(make_cfg):
    """The frozen-blocks run is the comparator: compared with itself (d) would be 0 and fire
    on every frozen run ("walk back — (d) 0.0000 < 2.0000")."""
    r = train(make_cfg("method=frozen", *TINY_LADDER, "trainer.max_epochs=1",
                       "protocol.frozen_baseline=auto"))
    d = r["protocol"]["diagnostics"]["d"]
    assert d["value"] is None and not d["fired"] and not d["measured"]
    assert "(d)" not in " ".join(r["protocol"]["reasons"])
    assert any("frozen-blocks run, the comparator itself" in n for n in r["protocol"]["notes"])


@pytest.mark.parametrize("method", ["dfa", "fa"])
def test_audit_reproduces_the_in_run_report(make_cfg, method):
    results = train(make_cfg(f"method={method}", *TINY_LADDER, "trainer.max_epochs=2",
                             "protocol.frozen_baseline=0.2"))
    report = audit(results["checkpoint"]).to_dict()
    in_run = results["protocol"]
    for key in ("layers", "diagnostics", "aggregates", "verdict", "reasons", "submode",
                "headline_acc", "frozen_baseline_acc", "epoch"):
        assert report[key] == in_run[key], key


def test_audit_refuses_a_checkpoint_without_feedback(make_cfg, tmp_path):
    results = train(make_cfg("method=dfa", *TINY_LADDER, "trainer.max_epochs=1"))
    ckpt = torch.load(results["checkpoint"], map_location="cpu", weights_only=False)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if "feedback" not in k}
    stripped = tmp_path / "stripped.ckpt"
    torch.save(ckpt, stripped)
    with pytest.raises(ConfigError, match="feedback_0.*backprop"):
        audit(stripped)
    with pytest.raises(ConfigError, match="no such checkpoint"):
        audit(tmp_path / "missing.ckpt")


@pytest.mark.slow
def test_audit_cli_and_two_job_sweep_with_one_abort(tmp_path):
    proc = forked_cli(
        "lcredit.train", "-m", "method=dfa", "debug=fast", "protocol.every_n_epochs=1",
        "protocol.frozen_baseline=null", "protocol.thresholds.a=1.0,50",
        "trainer.max_epochs=3", f"hydra.sweep.dir={tmp_path}/sweep", *LIGHT_MEASURE, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = {p.parent.parent.name: json.loads(p.read_text())
            for p in (tmp_path / "sweep").glob("*/*/results.json")}
    assert len(jobs) == 2, list(jobs)
    # one directory per job, named by its overrides, each with its config and checkpoint
    for a in ("1.0", "50"):
        (name,) = [n for n in jobs if f"protocol.thresholds.a={a}" in n.split(",")]
        assert name.startswith("debug=fast,method=dfa,"), name
        job = tmp_path / "sweep" / name / "seed=0"
        assert (job / "config.yaml").exists() and (job / "checkpoints" / "last.ckpt").exists()
    aborted = [j for j in jobs.values() if j["status"] == "aborted"]
    completed = [j for j in jobs.values() if j["status"] == "completed"]
    assert len(aborted) == 1 and len(completed) == 1
    assert len(completed[0]["history"]) == 3 and aborted[0]["abort"]["epoch"] == 1

    ckpt = aborted[0]["checkpoint"]
    proc = forked_cli("lcredit.audit", f"ckpt={ckpt}", f"out={tmp_path}/audit", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    audited = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert audited["layers"] == aborted[0]["protocol"]["layers"]
    assert "verdict" in proc.stdout and (tmp_path / "audit" / "audit.md").exists()

    # a missing checkpoint through the CLI: test_reliability's test_cli_mistakes_exit_2...


def test_a_run_stops_at_the_first_epoch_a_fires_not_at_the_full_cadence(make_cfg):
    """(a) and (b) are measured every epoch (protocol.cheap_every=1), so a run stops at the
    first epoch they fire, between the full measurements (every 5); the run then ends with the
    full report of that epoch."""
    base = ["method=dfa", *TINY_LADDER, "model.depth=4", "trainer.max_epochs=6",
            "protocol.frozen_baseline=null", *LIGHT_MEASURE]
    watch = train(make_cfg(*base, "protocol.abort.enabled=false", out="watch"))
    rows = watch["history"]
    kinds = [r["protocol"]["kind"] for r in rows]
    assert kinds == ["cheap"] * 4 + ["full", "full"], kinds
    growth = [r["protocol"]["diagnostics"]["a"]["value"] for r in rows]
    a = max(growth[:2]) * 1.0001  # crossed after the second epoch, before the fifth if at all
    first = next((e for e, g in enumerate(growth, start=1) if g > a), None)
    assert first in (3, 4), growth  # a cheap epoch: the old cadence would have waited for 5

    r = train(make_cfg(*base, f"protocol.thresholds.a={a}", out="stop"))
    assert r["status"] == "aborted" and r["abort"]["epoch"] == first
    assert len(r["history"]) == first and r["protocol"]["epoch"] == first
    assert "gamma_hidden" in r["protocol"]["aggregates"]  # the full report of that epoch
    assert r["protocol_first_fired"]["a"] == first


def test_one_protocol_implementation_its_state_in_the_checkpoint(make_cfg):
    """lcredit's runs measure with the same Protocol callback a user adds to their own code;
    what it found is its state, which the checkpoint carries and results.json reports."""
    import torch

    from lcredit.callbacks.protocol import saved_state

    cfg = make_cfg("method=dfa", *TINY_LADDER, "trainer.max_epochs=2", "protocol.frozen_baseline=null")
    assert cfg.callbacks.protocol_monitor._target_ == "lcredit.callbacks.Protocol"
    r = train(cfg)
    state = saved_state(torch.load(r["checkpoint"], map_location="cpu", weights_only=False))
    assert state["first_fired"] == r["protocol_first_fired"]
    assert state["last"]["epoch"] == r["protocol"]["epoch"] == 2
    assert [x["epoch"] for x in state["reports"]] == [1, 2]
    assert [x["kind"] for x in state["reports"]] == ["cheap", "full"]
