"""Branching (init_from, prefit, periodic refit) and the probe / exploit tools."""
import json

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import TINY_LADDER, TINY_MEASURE, forked_cli
from lcredit.data import build_task
from lcredit.errors import ConfigError
from lcredit.exploit import exploit
from lcredit.models import ResMLP
from lcredit.probe import probe
from lcredit.rules import SB
from lcredit.rules.blend import SOURCES
from lcredit.build import build_rule, fit_task
from lcredit.training import train

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = [*TINY_LADDER, "data.n_train=256", "method.width=32"]


class StartState(Callback):
    def on_train_start(self, trainer, rule):
        self.state = {k: v.clone() for k, v in rule.state_dict().items()}


class EpochStates(Callback):
    def __init__(self):
        self.states = []

    def on_train_epoch_end(self, trainer, rule):
        self.states.append({k: v.clone() for k, v in rule.state_dict().items()})


@pytest.fixture(scope="module")
def dfa_run(tmp_path_factory):
    from conftest import compose_cfg
    out = tmp_path_factory.mktemp("dfa")
    return train(compose_cfg(out / "run", "method=dfa", *TINY_LADDER, "data.n_train=256",
                             "trainer.max_epochs=2"))


@pytest.mark.xdist_group("dfa_run")
def test_init_from_starts_from_the_checkpoints_network_and_feedback(make_cfg, dfa_run):
    seen = StartState()
    r = train(make_cfg("method=blend", *SMALL, "trainer.max_epochs=1",
                       f"init_from={dfa_run['checkpoint']}"), extra_callbacks=[seen])
    source = torch.load(dfa_run["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    for k, v in source.items():
        assert torch.equal(seen.state[k], v), k   # network and DFA feedback both carried over
    assert r["init_from"]["rule"] == "dfa" and r["init_from"]["epoch"] == 2
    assert "model" in r["init_from"]["loaded"]


@pytest.fixture(scope="module")
def vec_blend_run(tmp_path_factory):
    from conftest import compose_cfg
    out = tmp_path_factory.mktemp("vec")
    return train(compose_cfg(out / "run", "method=blend", *SMALL, "trainer.max_epochs=1"))


@pytest.mark.xdist_group("vec_blend_run")
@pytest.mark.parametrize("source", SOURCES)
def test_only_the_vec_field_itself_is_taken_when_branching(make_cfg, vec_blend_run, source):
    """Controls (random_trainable, frozen_random, ...) start from their own random init: taken
    from a trained vec run they would start from the answer."""
    from lcredit.training import branch_from
    ckpt = vec_blend_run["checkpoint"]
    src = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    cfg = make_cfg("method=blend", *SMALL, f"method.source={source}")
    task = fit_task(cfg, build_task(cfg.data))
    torch.manual_seed(123)
    rule = build_rule(cfg, task)
    taken = branch_from(rule, ckpt)
    own = rule.state_dict()
    assert all(torch.equal(own[k], src[k]) for k in own if k.startswith(("model.", "feedback_")))
    shared = [k for k in own if k.startswith("field.") and k in src and own[k].shape == src[k].shape]
    loaded = shared and all(torch.equal(own[k], src[k]) for k in shared)
    assert bool(loaded) == (source in ("vec", "dfa_norm_matched")), taken


@pytest.mark.xdist_group("vec_blend_run")
def test_a_module_that_only_partly_fits_is_kept_fresh_whole(make_cfg, vec_blend_run):
    """Another conditioning code changes some of the field's shapes: the field must then start
    wholly fresh (not a trained trunk behind a fresh input layer), and results say so."""
    from lcredit.training import branch_from
    cfg = make_cfg("method=blend", *SMALL, "method.s_type=deltaL_hL")
    task = fit_task(cfg, build_task(cfg.data))
    torch.manual_seed(123)
    rule = build_rule(cfg, task)
    init = {k: v.clone() for k, v in rule.state_dict().items()}
    taken = branch_from(rule, vec_blend_run["checkpoint"])
    src = torch.load(vec_blend_run["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    own = rule.state_dict()
    field = [k for k in own if k.startswith("field.")]
    assert any(k in src and src[k].shape == own[k].shape for k in field)  # some would fit...
    assert all(torch.equal(own[k], init[k]) for k in field)               # ...none was taken
    assert "field" in taken["kept_fresh"] and "field" not in taken["loaded"], taken
    assert "model" in taken["loaded"]


@pytest.mark.xdist_group("dfa_run")
def test_init_from_a_different_model_is_a_clear_error(make_cfg, dfa_run):
    with pytest.raises(ConfigError, match="init_from"):
        train(make_cfg("method=vec", *SMALL, "model.d=48", f"init_from={dfa_run['checkpoint']}"))
    for same_shapes in ("model.residual=false", "model.out_ln=false", "model.act=relu"):
        key = same_shapes.split("=")[0]
        with pytest.raises(ConfigError, match=rf"init_from=.*{key}="):
            train(make_cfg("method=vec", *SMALL, same_shapes, f"init_from={dfa_run['checkpoint']}"))
    with pytest.raises(ConfigError, match="init_from=nope.ckpt"):
        train(make_cfg("method=vec", *SMALL, "init_from=nope.ckpt"))


def test_prefit_epochs_train_only_the_estimator_first(make_cfg):
    epochs = EpochStates()
    r = train(make_cfg("method=sb", *SMALL, "trainer.max_epochs=2", "method.prefit_epochs=1"),
              extra_callbacks=[start := StartState(), epochs])
    after_prefit, after_rule = epochs.states
    model = [k for k in after_prefit if k.startswith("model.")]
    pred = [k for k in after_prefit if k.startswith("predictors.")]
    assert all(torch.equal(after_prefit[k], start.state[k]) for k in model)
    assert not all(torch.equal(after_prefit[k], start.state[k]) for k in pred)
    assert not all(torch.equal(after_rule[k], after_prefit[k]) for k in model)
    assert [row["phase"] for row in r["history"]] == ["fit", "rule"]


def test_periodic_refit_and_warmup_schedule():
    rule = SB(ResMLP((12,), 5, d=16, depth=2), (12,), 5, prefit_epochs=1,
              periodic_refit={"every": 2, "epochs": 1}, warmup_ratio=0.25)
    rule.max_epochs = lambda: 9
    assert [rule.phase(e) for e in range(9)] == [
        "fit", "warmup", "warmup", "fit", "rule", "rule", "fit", "rule", "rule"]
    with pytest.raises(ConfigError, match="method.periodic_refit"):
        SB(ResMLP((12,), 5, d=16, depth=2), (12,), 5, periodic_refit={"every": 2})


# ---------------------------------------------------------------- probe and exploit
@pytest.fixture(scope="module")
def bp_snapshot(tmp_path_factory):
    from conftest import compose_cfg
    out = tmp_path_factory.mktemp("bp")
    return train(compose_cfg(out / "run", "method=bp", "data.n_train=4096", "data.n_test=512",
                             "model.d=64", "model.depth=3", "trainer.max_epochs=3"))


@pytest.mark.xdist_group("bp_snapshot")
def test_probe_on_a_bp_snapshot_recovers_credit_beyond_dfa(bp_snapshot):
    res = probe(bp_snapshot["checkpoint"], ["dfa", "sb", "vec"], steps=300,
                overrides={"vec": {"aux_lr": 3e-3}, "sb": {"aux_lr": 3e-3}})
    g = {r: res["rules"][r]["aggregates"]["gamma_deep"] for r in res["rules"]}
    assert g["vec"] > g["dfa"] + 0.2 and g["sb"] > g["dfa"] + 0.2, g
    first, last = res["rules"]["vec"]["estimator_loss_first_last"]
    assert last < first
    assert all(set(row) >= {"gamma", "rho", "nudge"} for row in res["rules"]["sb"]["layers"])


@pytest.mark.xdist_group("bp_snapshot")
def test_exploit_with_bp_credit_lowers_the_same_batch_loss(bp_snapshot):
    res = exploit(bp_snapshot["checkpoint"], ["bp", "own", "dfa"], k=3, step_sizes=[1e-3, 1e-2],
                  fit_steps=0)
    rows = {(r["source"], r["credit"], r["step_size"]): r for r in res["rows"]}
    assert len(rows) == 3 * 2 * 2
    for credit in ("raw", "normalised"):
        assert rows[("bp", credit, 1e-3)]["same_batch_delta"] < 0
    # the snapshot's rule is bp: its own credit is the oracle's, step for step
    assert rows[("own", "raw", 1e-2)]["same_batch_delta"] == pytest.approx(
        rows[("bp", "raw", 1e-2)]["same_batch_delta"], rel=1e-4)


@pytest.mark.parametrize("tool,kwargs,needle", [
    (exploit, {"batch_size": 10**6}, "batch_size=1000000: the task has"),
    (exploit, {"batch_size": 0}, "batch_size=0"),
    (exploit, {"step_sizes": []}, "step_sizes"),
    (exploit, {"step_sizes": [0.1, -1.0]}, "step_sizes[1]=-1.0"),
    (exploit, {"fit_steps": -1}, "fit_steps=-1"),
    (exploit, {"k": 1.5}, "k=1.5 must be a whole number"),
    (probe, {"rules": []}, "rules=[]"),
    (probe, {"steps": -5}, "steps=-5"),
    (probe, {"batch_size": -3}, "batch_size=-3"),
    (probe, {"rules": ["dfa"], "overrides": {"vecc": {"M": 8}}}, "overrides.vecc"),
    (probe, {"rules": ["dfa"], "optim": "nope"}, "estimator_optim='nope'"),
])
@pytest.mark.xdist_group("bp_snapshot")
def test_snapshot_tools_refuse_bad_options_by_name(bp_snapshot, tool, kwargs, needle):
    with pytest.raises(ConfigError) as err:
        tool(bp_snapshot["checkpoint"], **kwargs)
    assert needle in str(err.value)


def test_a_snapshot_result_never_overwrites_another(tmp_path):
    from lcredit.cli import free_path
    first = free_path(tmp_path, "probe")
    first.write_text("{}")
    second = free_path(tmp_path, "probe")
    assert first.name == "probe.json" and second.name == "probe-2.json"


def test_exploit_report_says_diverged_rather_than_nan():
    from lcredit.exploit import to_markdown

    row = {"source": "dfa", "credit": "normalised", "step_size": 1.0, "finite": False,
           "same_batch_delta": float("nan"), "held_out_delta": float("inf")}
    text = to_markdown({"snapshot": "s.ckpt", "snapshot_rule": "dfa", "k": 1, "batch_size": 8,
                        "loss_before": {"same_batch": 1.0, "held_out": 1.0}, "rows": [row]})
    assert "| dfa | normalised | 1 | diverged | diverged |" in text and "nan" not in text


@pytest.mark.xdist_group("bp_snapshot")
def test_probe_and_exploit_clis_write_their_files(bp_snapshot, tmp_path):
    for tool, args, name in [("probe", ["rules=[dfa]", "steps=0"], "probe"),
                             ("exploit", ["sources=[bp]", "k=1", "step_sizes=[0.01]"], "exploit")]:
        proc = forked_cli(f"lcredit.{tool}", f"ckpt={bp_snapshot['checkpoint']}",
                          f"out={tmp_path}", *args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["snapshot_rule"] == "bp"
        assert (tmp_path / f"{name}.md").read_text().startswith("#")
    # a bad option names itself (the CLIs' exit 2 without a traceback: test_reliability)
    with pytest.raises(ConfigError, match="nope"):
        probe(bp_snapshot["checkpoint"], ["nope"], steps=0)


def test_probe_keeps_a_batchnorm_snapshot_frozen(make_cfg):
    """BatchNorm's running statistics are part of the snapshot: fitting an estimator on it
    must not move them (the probe refuses a snapshot that changed)."""
    snap = train(make_cfg("method=bp", "model=small_cnn", "data=gaussian_images",
                          "data.n_train=64", "data.n_test=32", "trainer.max_epochs=1",
                          *TINY_MEASURE))
    res = probe(snap["checkpoint"], ["sb", "vec"], steps=3, overrides={"vec": {"width": 16},
                                                                      "sb": {"width": 16}})
    assert set(res["rules"]) == {"sb", "vec"}
