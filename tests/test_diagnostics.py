"""Credit-quality metrics and the protocol verdict: the numbers a researcher will quote."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import lcredit
import lcredit.models
from lcredit.diagnostics import judge, measure
from lcredit.diagnostics import metrics as M
from lcredit.models import ResMLP
from lcredit.rules import BP, DFA, FA, Frozen, exact_gradients

SHAPE, C = (16,), 6


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return ResMLP(SHAPE, C, **(dict(d=32, depth=3, mlp_ratio=2.0) | kw))


def batches(k=4, n=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *SHAPE, generator=g), torch.randint(C, (n,), generator=g))
            for _ in range(k)]


def test_bp_credit_is_perfectly_aligned_and_predictive():
    # rho at docs/metrics.md's sizes: 1024 samples x 32 directions, pooled over eight batches of 128.
    rep = lcredit.diagnose(None, batches(k=8), credit=BP(model(), SHAPE, C))
    for row in rep.layers:
        assert abs(row["gamma"] - 1) < 1e-6, row
        assert abs(row["gamma_flat"] - 1) < 1e-6, row
        assert row["rho"] > 0.99 and row["rho_se"] < 0.01, row
        assert row["nudge"] < 0, row  # following the gradient lowers the loss
    assert rep.aggregates["gamma_deep"] == pytest.approx(1, abs=1e-6)
    assert rep.extra["rho_samples"] == 1024 and rep.extra["rho_directions"] == 32


def test_random_credit_scores_zero_within_its_standard_error():
    gen = torch.Generator().manual_seed(5)

    def random_credit(net, x, y):
        return [torch.randn(h.shape, generator=gen, dtype=h.dtype) for h in net.states(x)]

    rep = lcredit.diagnose(model(), batches(k=8), credit=random_credit)
    for row in rep.layers:
        assert abs(row["gamma"]) < 0.05, row
        assert 0 < row["rho_se"] < 0.1, row
        assert abs(row["rho"]) < 3 * row["rho_se"], row


def test_rho_pools_its_samples_whatever_the_batch_size_and_says_when_short():
    """1024 samples whether the evaluation batches hold 64 or 256 each; fewer are used as they
    are and the report says so (never a silent cap)."""
    for n in (64, 256):
        rep = lcredit.diagnose(None, batches(k=1024 // n + 1, n=n), credit=BP(model(), SHAPE, C))
        assert rep.extra["rho_samples"] == 1024, n
        assert not any(note.startswith("rho:") for note in rep.notes)
    short = lcredit.diagnose(None, batches(k=2, n=100), credit=BP(model(), SHAPE, C))
    assert short.extra["rho_samples"] == 200
    assert any("rho: pooled 200 of the 1024 samples" in note for note in short.notes)


def test_null_gamma_of_dfa_is_chance_level():
    # One draw's mean cosine spreads ~1/sqrt(width) around 0 (every sample shares B), so the
    # chance level is measured wide and over several draws.
    rep = lcredit.diagnose(None, batches(k=2), credit=DFA(model(d=256), SHAPE, C))
    assert rep.extra["null_draws"] == 20
    for row in rep.layers:
        assert abs(row["null_gamma"]) < 0.05, row
        assert row["null_gamma_std"] > 0


def test_null_gamma_redraws_feedback_of_the_same_family():
    """fa's chance level keeps the skip path, so it is far from 0: null_gamma shows that."""
    rule = FA(model(), SHAPE, C, variant="layerwise")
    rep = lcredit.diagnose(None, batches(), credit=rule)
    assert rep.layers[-1]["null_gamma"] == pytest.approx(1.0)  # a_L is exact for any draw
    assert all(math.isfinite(r["null_gamma_std"]) for r in rep.layers)


def test_row_norms_are_per_sample_over_all_feature_dims():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)  # (batch, tokens, dim)
    expect = torch.stack([x[i].flatten().norm() for i in range(2)]).double()
    torch.testing.assert_close(M.row_norms(x), expect)
    assert not torch.allclose(x.norm(-1).double().mean(), expect.mean())  # the p=-1 trap
    assert x.norm(dim=-1).shape != expect.shape  # a last-dim norm is per token, not per sample


def test_cosine_survives_tiny_gradients():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 64, generator=g)
    grad = (a + 0.3 * torch.randn(8, 64, generator=g))
    grad = grad / grad.norm(dim=1, keepdim=True) * 5e-10  # ||g|| = 5e-10, as under a floor
    ref = torch.stack([(a[i].double() @ grad[i].double()) /
                       (a[i].double().norm() * grad[i].double().norm()) for i in range(8)])
    ours, missing = M.row_cosines(a, grad)
    torch.testing.assert_close(ours, ref)
    assert missing == 0
    clamped = F.cosine_similarity(a, grad, dim=1)  # eps clamp makes this up
    assert (clamped.double() - ref).abs().max() > 0.5


def test_zero_norm_is_missing_with_a_reason_not_a_number():
    a = torch.randn(4, 10)
    g = torch.randn(4, 10)
    g[1] = 0
    cos, missing = M.row_cosines(a, g)
    assert missing == 1 and math.isnan(cos[1]) and not torch.isnan(cos[[0, 2, 3]]).any()

    def zero_credit(net, x, y):
        return [torch.zeros_like(h) for h in net.states(x)]
    rep = lcredit.diagnose(model(), batches(k=2), credit=zero_credit)
    assert all(math.isnan(r["gamma"]) for r in rep.layers)
    assert any("missing" in n for n in rep.notes)


def test_half_precision_model_is_measured_in_float64():
    rule32 = DFA(model(), SHAPE, C)
    with torch.no_grad():  # weights and feedback exactly representable in fp16
        for t in list(rule32.parameters()) + list(rule32.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())
    rule16 = copy.deepcopy(rule32).half()
    assert next(rule16.model.parameters()).dtype == torch.float16
    b = batches(k=2)
    r32 = lcredit.diagnose(None, b, credit=rule32)
    r16 = lcredit.diagnose(None, b, credit=rule16)
    for a, h in zip(r32.layers, r16.layers):
        for key in ("hidden_norm", "bp_grad_norm", "gamma", "gamma_flat", "rho", "nudge"):
            assert math.isfinite(h[key]), (key, h)
            assert h[key] == pytest.approx(a[key], rel=1e-3, abs=1e-3), key


# ------------------------------------------------------------------- the protocol verdict
@pytest.mark.parametrize("make", [BP, DFA, FA, Frozen, lambda *a: FA(*a, variant="blockwise")])
def test_random_init_is_trustworthy(make):
    rep = lcredit.diagnose(None, batches(), credit=make(model(), SHAPE, C))
    assert rep.verdict == "trustworthy", rep.reasons
    assert not any(d["fired"] for k, d in rep.diagnostics.items() if k in "abd")


def test_no_credit_measures_norms_and_floor_only():
    rep = lcredit.diagnose(model(), batches(k=1))
    assert rep.verdict == "trustworthy"
    assert "gamma" not in rep.layers[0] and rep.layers[0]["hidden_norm"] > 0
    assert rep.diagnostics["b"]["measured"] and not rep.diagnostics["c"]["measured"]


def test_blocks_scaled_by_100_fire_residual_growth():
    net = model()
    with torch.no_grad():
        for block in net.blocks:
            for layer in (block.fc1, block.fc2):
                layer.weight.mul_(100)
                layer.bias.mul_(100)
    rep = lcredit.diagnose(net, batches(k=1))
    assert rep.diagnostics["a"]["fired"] and rep.diagnostics["a"]["value"] > 50
    assert rep.verdict == "walk back" and any("(a)" in r for r in rep.reasons)


def test_huge_residual_stream_under_terminal_ln_fires_gradient_floor():
    net = model(out_ln=True)
    with torch.no_grad():
        net.embed[1].weight.mul_(1e9)
        net.embed[1].bias.mul_(1e9)
    rep = lcredit.diagnose(None, batches(k=1), credit=DFA(net, SHAPE, C))
    assert rep.diagnostics["b"]["fired"], rep.diagnostics["b"]
    assert not rep.diagnostics["a"]["fired"]  # the stream is huge from layer 0: no growth
    assert rep.verdict == "walk back"
    # The cosines stay honest numbers (float64, unclamped), not a clamp's artefact.
    assert all(math.isfinite(r["gamma"]) for r in rep.layers)


def test_huge_stream_without_terminal_ln_has_no_floor():
    net = model(out_ln=False)
    with torch.no_grad():
        net.embed[1].weight.mul_(1e9)
    rep = lcredit.diagnose(net, batches(k=1))
    assert not rep.diagnostics["b"]["fired"]


def test_frozen_comparator_fires_at_equal_accuracy():
    measured = measure(model(), batches(k=1))
    assert judge(measured, headline_acc=0.61, frozen_baseline_acc=0.61).diagnostics["d"]["fired"]
    assert judge(measured, headline_acc=0.62, frozen_baseline_acc=0.61).diagnostics["d"]["fired"]
    ok = judge(measured, headline_acc=0.70, frozen_baseline_acc=0.61)
    assert not ok.diagnostics["d"]["fired"] and ok.verdict == "trustworthy"
    assert judge(measured, 0.61, 0.61).verdict == "walk back"


def test_stability_names_a_submode_but_never_decides():
    rep = lcredit.diagnose(None, batches(k=3), credit=DFA(model(), SHAPE, C),
                           thresholds={"c": -1.0})
    assert rep.diagnostics["c"]["fired"] and rep.submode == "drift"
    assert rep.verdict == "trustworthy"
    rep = lcredit.diagnose(None, batches(k=3), credit=DFA(model(), SHAPE, C),
                           thresholds={"c": 1.0})
    assert rep.submode == "noise"


def test_report_renders_text_markdown_json_and_template():
    import json

    rep = lcredit.diagnose(None, batches(k=2), credit=DFA(model(), SHAPE, C),
                           headline_acc=0.5, frozen_baseline_acc=0.3)
    d = json.loads(rep.to_json())
    assert d["verdict"] == rep.verdict and len(d["layers"]) == 4
    md = rep.to_markdown()
    assert "| layer |" in md and "Verdict" in md
    text = rep.to_text()
    assert "verdict" in text
    # every rendering leads with gamma_hidden (docs/metrics.md: the layers no rule gets exactly)
    hidden = f"{rep.aggregates['gamma_hidden']:.4f}"
    assert list(rep.aggregates)[0] == "gamma_hidden"
    assert text.splitlines()[0].startswith(f"gamma_hidden = {hidden}")
    assert md.splitlines()[2].startswith(f"**gamma_hidden = {hidden}**")
    assert rep.TEMPLATE_HEADER.startswith("| rule | gamma_hidden |")
    row = rep.template_row()
    assert row.startswith(f"| dfa | {hidden} | 0.5000 | 0.3000 |") and rep.verdict in row
    assert rep.template().count("\n") == 3


def test_costate_hook_reports_costate_cosine():
    def exact(net, x, y):
        return exact_gradients(net, x, y)[1]
    rep = lcredit.diagnose(None, batches(k=1), credit=BP(model(), SHAPE, C), costate=exact)
    assert all(abs(r["costate_cosine"] - 1) < 1e-9 for r in rep.layers)
    rep = lcredit.diagnose(None, batches(k=2), credit=DFA(model(), SHAPE, C), costate=exact)
    assert abs(rep.aggregates["costate_cosine_deep"]) < 0.2


def test_bad_thresholds_are_named():
    from lcredit.errors import ConfigError

    with pytest.raises(ConfigError, match="thresholds.e"):
        lcredit.diagnose(model(), batches(k=1), thresholds={"e": 1})


def test_diagnose_takes_any_module_with_embed_blocks_readout():
    """docs/diagnostics.md: no lcredit base class needed — a plain nn.Module with the three parts."""
    from torch import nn

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(SHAPE[0], 24)
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(24, 24), nn.Tanh())
                                        for _ in range(3))
            self.readout = nn.Linear(24, C)

    net = Plain()
    assert not isinstance(net, lcredit.models.BlockModel)

    def true_credit(m, x, y):
        return exact_gradients(m, x, y)[1]
    rep = lcredit.diagnose(net, batches(k=2), credit=true_credit)
    assert len(rep.layers) == 4
    assert all(r["gamma"] == pytest.approx(1, abs=1e-9) for r in rep.layers)
    assert rep.verdict == "trustworthy"


def test_a_run_measures_at_spec_sizes_by_default(make_cfg):
    """The protocol's own defaults are docs/metrics.md's, and a run reports what it pooled."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from conftest import TINY_LADDER
    from lcredit.train import train
    conf = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/protocol/default.yaml")
    assert (conf.measure.rho_samples, conf.measure.rho_directions, conf.measure.null_draws) == (1024, 32, 20)
    r = train(make_cfg("method=dfa", *TINY_LADDER, "trainer.max_epochs=1",
                       *(f"protocol.measure.{k}={v}" for k, v in conf.measure.items())))
    extra = r["protocol"]["extra"]
    assert (extra["rho_samples"], extra["rho_directions"], extra["null_draws"]) == (1024, 32, 20)
    assert list(r["protocol"]["aggregates"])[0] == "gamma_hidden"


def test_dfas_null_draws_in_one_pass_equal_redrawn_copies():
    """The chance level's feedback draws: batched (one forward, every draw's e B_l at once)
    they give what copies of the rule with redrawn feedback give, draw for draw."""
    rule = DFA(model(), SHAPE, C).double()
    x, y = batches(1)[0]
    x = x.double()
    draws = rule.feedback_draws(5, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    copies = []
    for _ in range(5):
        c = copy.deepcopy(rule)
        c.draw_feedback(gen)
        copies.append(c.credit(x, y))
    assert len(draws) == 5
    for batched, one in zip(draws.credit_sets(x, y), copies):
        for a, b in zip(batched, one):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(copies[0][1], copies[1][1])  # the draws do differ
