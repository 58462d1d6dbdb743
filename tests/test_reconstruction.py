"""The options the reconstruction of the original study adds (docs/reproduction.md): each does
what its documentation says, and the one-arm job and the published values reach the user."""
import copy
import json
import math

import pytest
import torch

from conftest import TINY_LADDER, TINY_MEASURE, forked_cli
from lcredit.models import Student
from lcredit.models.base import exact_credit, hidden_states
from lcredit.rules import CB, DFA, VEC
from lcredit.rules.estimator import EMBED_DIM, CreditNet
from lcredit.build import build_rule, fit_task
from lcredit.training import train
from lcredit.data import build_task

from test_estimators import C, SHAPE, batch, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the estimator network
@pytest.mark.parametrize("code", ["add", "embed", "scalar", "onehot"])
def test_every_layer_code_tells_the_layers_apart(code):
    torch.manual_seed(0)
    net = CreditNet([16] * 4, cond_dim=5, width=32, layer_code=code, ln=True).double()
    h, s = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    outs = [net(h, t, s) for t in range(4)]
    assert all(o.shape == h.shape for o in outs)
    for a, b in zip(outs, outs[1:]):  # the same input at another layer index: another output
        assert not torch.allclose(a, b)


def test_a_concatenated_code_is_initialised_as_one_linear_layer_over_the_concatenation():
    torch.manual_seed(0)
    net = CreditNet([16] * 3, cond_dim=10, width=256, layer_code="embed")
    bound = (16 + EMBED_DIM + 10) ** -0.5
    for w in (net.embed_in[0].weight, net.code.weight, net.cond.weight):
        assert w.abs().max() <= bound + 1e-7
        assert w.abs().max() > 0.9 * bound
    assert net.layer.weight.shape == (3, EMBED_DIM)  # the learned embedding itself


def test_a_layer_normalised_input_gives_the_same_output_for_a_rescaled_state():
    torch.manual_seed(0)
    net = CreditNet([16] * 2, cond_dim=5, width=32, ln=True, layer_code="embed").double()
    h, s = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    assert torch.allclose(net(h, 1, s), net(50 * h, 1, s), atol=1e-4)  # (LayerNorm's eps)
    plain = CreditNet([16] * 2, cond_dim=5, width=32, ln=False, layer_code="embed").double()
    assert not torch.allclose(plain(h, 1, s), plain(50 * h, 1, s))


# ---------------------------------------------------------------- cb's bridge
def test_cb_target_network_follows_the_value_net_by_its_momentum_after_each_step():
    rule = CB(make_model(), SHAPE, C, width=32, target_ema=0.9, aux_lr=1e-2).double()
    before = copy.deepcopy(rule.value_target.state_dict())
    opt = rule.make_optimizer()
    x, y = batch()
    rule.update(x, y, opt)
    for name, tgt in rule.value_target.state_dict().items():
        want = 0.9 * before[name] + 0.1 * rule.value.state_dict()[name]
        assert torch.allclose(tgt, want), name
    assert not any(q.requires_grad for q in rule.value_target.parameters())
    # part of the rule's state: every checkpoint carries it
    assert any(k.startswith("value_target.") for k in rule.state_dict())
    assert CB(make_model(), SHAPE, C, width=32, target_ema=None).value_target is None


def test_cb_bridge_targets_come_from_the_target_network():
    rule = CB(make_model(), SHAPE, C, width=32, target_ema=0.99).double()
    with torch.no_grad():
        for q in rule.value_target.parameters():
            q.add_(1.0)  # a target network unlike the value net
    h = torch.randn(4, 16, dtype=torch.float64)
    assert not torch.allclose(rule.bridge_value(h, 1, None), rule.value(h, 1, None))
    assert torch.allclose(rule.bridge_value(h, 1, None), rule.value_target(h, 1, None))


def test_soft_min_lies_between_the_minimum_and_the_mean_and_reaches_both():
    rule = CB(make_model(), SHAPE, C, width=8, bridge_temp=None).double()
    v = torch.tensor([[0.1, 2.0], [0.5, 1.0], [3.0, 1.5]], dtype=torch.float64)  # K=3 x 2
    assert torch.equal(rule.soft_min(v), v.mean(0))  # bridge_temp null: the mean
    for lam, close_to in ((1e-4, v.min(0).values), (1e4, v.mean(0))):
        rule.bridge_temp = lam
        assert torch.allclose(rule.soft_min(v), close_to, atol=1e-3)
    rule.bridge_temp = 0.3
    m = rule.soft_min(v)
    assert (m <= v.mean(0)).all() and (m >= v.min(0).values).all()


@pytest.mark.parametrize("bad", ["method.target_ema=1.0", "method.target_ema=-0.1",
                                 "method.bridge_temp=0", "method.layer_code=sinus",
                                 "method.field_ln=maybe", "method.terminal_scale=median"])
def test_bad_reconstruction_options_name_the_key(make_cfg, bad):
    from lcredit.errors import ConfigError

    cfg = make_cfg("method=cb", *TINY_LADDER, bad)
    with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
        build_rule(cfg, fit_task(cfg, build_task(cfg.data)))


# ---------------------------------------------------------------- losses as means
def test_mean_loss_scale_is_the_mean_over_every_entry():
    rule = VEC(make_model(), SHAPE, C, width=16, loss_scale="mean").double()
    err, tgt = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    assert torch.allclose(rule.sq_error(err, tgt, 7), err.pow(2).mean())
    rule.loss_scale = "absolute"
    assert torch.allclose(rule.sq_error(err, tgt, 7), err.pow(2).sum() / 7)


def test_cb_mean_terminal_scale_divides_the_gradient_error_by_the_state_size():
    from lcredit.rules.base import Pass

    model = make_model()
    x, y = batch()
    a = CB(copy.deepcopy(model), SHAPE, C, width=16, terminal_scale="absolute").double()
    m = CB(copy.deepcopy(model), SHAPE, C, width=16, terminal_scale="mean").double()
    m.value.load_state_dict(a.value.state_dict())
    states, grads = exact_credit(a.model, x, y, a.task_loss)
    p = Pass(x, y, a.model(x).detach(), states, grads[-1], [None] * len(states), "ce")
    la, lm = (r.loss_terms(p, r.condition(p))["terminal_grad"] for r in (a, m))
    assert torch.allclose(la, lm * states[-1].shape[1])


# ---------------------------------------------------------------- the student's input layer
def test_identity_input_layer_makes_h0_the_input_and_every_rule_still_trains():
    model = Student((16,), C, d=16, depth=2, input_layer="identity").double()
    x = torch.randn(32, 16, dtype=torch.float64)
    y = torch.randint(C, (32,))
    assert torch.equal(hidden_states(model, x)[0], x)
    assert not list(model.embed.parameters())
    _, grads = exact_credit(model, x, y, lambda o, t: torch.nn.functional.cross_entropy(o, t))
    assert grads[0].shape == x.shape and grads[0].abs().sum() > 0
    for cls in (DFA, CB, VEC):
        rule = cls(copy.deepcopy(model), (16,), C).double()
        before = [q.clone() for q in rule.model.blocks.parameters()]
        rule.update(x, y, rule.make_optimizer())
        assert any(not torch.equal(a, b) for a, b in zip(before, rule.model.blocks.parameters()))


def test_identity_input_layer_needs_the_input_to_have_d_features():
    from lcredit.errors import ConfigError

    with pytest.raises(ConfigError, match="model.input_layer"):
        Student((12,), C, d=16, input_layer="identity")


# ---------------------------------------------------------------- fixed network, schedule
@pytest.mark.parametrize("method", ["dfa", "bp", "cb"])
def test_fixed_network_trains_only_the_estimator(make_cfg, method):
    cfg = make_cfg(f"method={method}", *TINY_LADDER, *TINY_MEASURE, "trainer.max_epochs=1",
                   "fixed_network=true", "method.warmup_ratio=0.0" if method == "cb" else "seed=0")
    task = fit_task(cfg, build_task(cfg.data))
    torch.manual_seed(int(cfg.seed))
    init = build_rule(cfg, task).model.state_dict()
    r = train(cfg)
    assert r["fixed_network"] is True
    state = torch.load(r["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    for k, v in init.items():
        assert torch.equal(state[f"model.{k}"], v), k
    if method == "cb":  # ... and the estimator did train
        torch.manual_seed(int(cfg.seed))
        value = build_rule(cfg, task).value.state_dict()
        assert any(not torch.equal(state[f"value.{k}"], v) for k, v in value.items())


def test_cosine_schedule_anneals_the_network_and_keeps_the_estimators_rate(make_cfg):
    r = train(make_cfg("method=sb", *TINY_LADDER, *TINY_MEASURE, "trainer.max_epochs=4",
                       "lr_schedule=cosine", "optim.lr=1e-3", "method.aux_lr=2e-3"))
    ckpt = torch.load(r["checkpoint"], map_location="cpu", weights_only=False)
    groups = {g["name"]: g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]}
    assert groups["network"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 4)), abs=1e-12)
    assert groups["estimator"] == pytest.approx(2e-3)
    assert ckpt["lr_schedulers"], "the schedule is saved with the checkpoint (resume continues it)"


def test_cosine_schedule_needs_an_epoch_count(make_cfg):
    from lcredit.errors import ConfigError

    cfg = make_cfg("method=dfa", *TINY_LADDER, "lr_schedule=cosine", "trainer.max_epochs=null",
                   "+trainer.max_steps=10")
    with pytest.raises(ConfigError, match="lr_schedule"):
        train(cfg)


# ---------------------------------------------------------------- aggregates and reports
def test_all_layer_aggregates_are_means_over_every_layer():
    from lcredit.diagnostics.measure import aggregates

    layers = [{"layer": l, "gamma": g, "rho": r, "nudge": -r, "gamma_flat": f, "null_gamma": 0.0}
              for l, (g, r, f) in enumerate([(0.1, 0.2, 0.3), (0.3, 0.5, 0.5), (0.5, 0.4, 0.6),
                                             (1.0, 1.0, 1.0)])]
    agg = aggregates(layers)
    assert agg["gamma_all"] == pytest.approx(0.475)
    assert agg["gamma_flat_all"] == pytest.approx(0.6)  # the published Gamma's reading
    assert agg["rho_all"] == pytest.approx(0.525)
    assert agg["gamma_hidden"] == pytest.approx(0.4)  # unchanged: layers 1..L-1


def test_the_report_prints_the_published_value_beside_its_cell(tmp_path):
    from lcredit.report import report_study

    def rec(arm, seed, g):
        return {"status": "completed", "seed": seed, "_path": str(tmp_path / arm / f"{seed}.json"),
                "study": {"name": "s", "stage": "main", "arm": arm, "point": {"depth": "4"},
                          "job": f"{arm},depth=4", "scale": "paper"},
                "config": {"study": {"reported": ["gamma_all"], "arms": {"a": [], "b": []},
                                     "reference": {"source": "the test", "values": [
                                         {"arm": "a", "point": {"depth": 4}, "gamma_all": 0.45}]}}},
                "protocol": {"aggregates": {"gamma_all": g}, "layers": []}, "final": {}}

    files = report_study("s", [rec("a", 1, 0.4), rec("a", 2, 0.5), rec("b", 1, 0.1)], tmp_path)
    md = files[0].read_text()
    row_a = next(l for l in md.splitlines() if l.startswith("| a |"))
    row_b = next(l for l in md.splitlines() if l.startswith("| b |"))
    assert "(published 0.450)" in row_a and "published" not in row_b
    csv_text = next(f for f in files if f.suffix == ".csv").read_text()
    assert "gamma_all_published" in csv_text.splitlines()[0]


# ---------------------------------------------------------------- one arm as one job
def test_one_arm_of_a_study_runs_as_one_job_of_that_study(tmp_path):
    r = forked_cli("lcredit.train", "experiment=vector_field_pilot", "arm=vec_m8", "scale=smoke",
                   "seed=3", "trainer.max_epochs=1", "protocol.frozen_baseline=null",
                   "logger=none", *TINY_MEASURE, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    path = tmp_path / "studies/vector_field_pilot/smoke/vec_m8,depth=4/seed=3/results.json"
    rec = json.loads(path.read_text())
    assert rec["study"] == {"name": "vector_field_pilot", "scale": "smoke", "stage": "main",
                            "arm": "vec_m8", "point": {"depth": "4"}, "job": "vec_m8,depth=4"}
    assert rec["config"]["method"]["M"] == 8 and rec["config"]["model"]["d"] == 32  # smoke's d
    # the study's own runner sees it as done
    from lcredit.jobs import DONE
    assert rec["status"] in DONE


@pytest.mark.parametrize("args, message", [
    (["arm=vec_m8"], "experiment=<study>"),
    (["experiment=vector_field_pilot", "arm=nope"], "arm=nope is not an arm"),
    (["experiment=snapshot_recovery", "arm=dfa"], "has stages"),
])
def test_a_bad_arm_is_one_line_and_exit_2(tmp_path, args, message):
    r = forked_cli("lcredit.train", *args, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "studies").exists()


def test_lq_fresh_samples_are_new_every_epoch_and_follow_the_same_map():
    from lcredit.data.lq import lq

    task = lq(d_in=8, d_out=3, n_train=64, n_test=16, fresh=True)
    x0, y0 = task.resample(0)
    x1, y1 = task.resample(1)
    assert torch.equal(x0, task.x_train) and not torch.allclose(x0, x1)
    T = torch.linalg.lstsq(x0, y0).solution
    assert torch.allclose(x1 @ T, y1, atol=1e-5)


def test_the_flattened_cosine_weights_samples_by_their_size_and_the_per_sample_mean_does_not():
    """The two readings of a layer's Gamma (docs/reproduction.md): a credit right on the samples
    with large gradients and wrong on those the network already fits (tiny gradients) has a
    flattened cosine near 1 and a per-sample mean near 0.5, as rho (pooled over samples) does."""
    from lcredit.diagnostics import metrics as M

    torch.manual_seed(0)
    g = torch.randn(200, 16, dtype=torch.float64)
    g[100:] *= 1e-3                       # samples the network already fits
    a = g.clone()
    a[100:] = torch.randn(100, 16, dtype=torch.float64)  # wrong where the gradient is tiny
    a[100:] *= 1e-3
    per_sample = float(M.row_cosines(a, g)[0].mean())
    assert M.flat_cosine(a, g) > 0.99
    assert 0.4 < per_sample < 0.6
