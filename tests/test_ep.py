"""Equilibrium propagation: the nudged errors converge to backprop's credit, with the right sign."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_LADDER, assert_resume_exact
from lcredit.errors import ConfigError
from lcredit.models.base import exact_credit, run_blocks
from lcredit.models.resmlp import ResMLP
from lcredit.models.small_cnn import SmallCNN
from lcredit.rules.update import exact_gradients
from lcredit.rules.bp import BP
from lcredit.rules.dfa import DFA
from lcredit.rules.ep import EP

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE, C = (12,), 5
CONVERGED = dict(relax="sweep", T=60, tol=1e-6)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return ResMLP(SHAPE, C, **(dict(d=16, depth=3, mlp_ratio=2.0, act="gelu") | kw)).double()


def batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *SHAPE, generator=g, dtype=torch.float64),
            torch.randint(C, (n,), generator=g))


def cosines(credit, true):
    """Mean over samples of the per-sample cosine, per layer."""
    return [F.cosine_similarity(a.flatten(1), g.flatten(1), dim=1).mean().item()
            for a, g in zip(credit, true)]


@pytest.mark.parametrize("opts", [dict(relax="gd", eta=0.1, T=300, tol=0.0),
                                  dict(relax="sweep")], ids=["gd", "sweep"])
def test_credit_converges_to_the_true_gradient(opts):
    x, y = batch()
    model = make_model()
    true = exact_gradients(model, x, y)[1]
    rule = EP(copy.deepcopy(model), SHAPE, C, beta=1e-3, **opts).double()
    credit = rule.credit(x, y)
    assert [a.shape for a in credit] == [g.shape for g in true]
    assert min(cosines(credit, true)) > 0.99
    relax = rule.last_relaxation
    assert relax["steps"] <= rule.T and len(relax["ep_displacement"]) == model.depth + 1
    if opts["relax"] == "sweep":  # converged well within T, by tol's measure
        assert relax["residual"] < rule.tol and relax["steps"] < rule.T
        for a, g in zip(credit, true):
            assert (a - g).norm() / g.norm() < 1e-2
    # The credit is read off the states: no gradient reached a parameter.
    assert all(p.grad is None for p in rule.model.parameters())


def test_nudge_moves_down_the_loss():
    x, y = batch()
    model = make_model()
    rule = EP(copy.deepcopy(model), SHAPE, C, beta=1e-3).double()
    credit = rule.credit(x, y)
    assert min(cosines(credit, exact_gradients(model, x, y)[1])) > 0.9  # not ~ -1
    states = [h.detach() for h in model.states(x)]
    with torch.no_grad():
        before = F.cross_entropy(model(x), y, reduction="none")
        for l, (h, a) in enumerate(zip(states, credit)):
            # A small step against each sample's own normalised credit, through the rest.
            step = a / a.flatten(1).norm(dim=1).view(-1, *[1] * (a.dim() - 1))
            after = F.cross_entropy(model.readout(run_blocks(model, h - 1e-3 * step, l)[-1]),
                                    y, reduction="none")
            assert (after < before).all(), l


def test_symmetric_nudging_removes_the_first_order_bias():
    # beta = 0.1 is large enough for a visible one-sided bias and small enough for the sweep
    # to converge in both directions (from ~0.2 on, the -beta phase stops converging here).
    x, y = batch()
    model = make_model()
    true = exact_gradients(model, x, y)[1]
    out = {}
    for symmetric in (False, True):
        rule = EP(copy.deepcopy(model), SHAPE, C, beta=0.1, symmetric=symmetric,
                  **CONVERGED).double()
        out[symmetric] = cosines(rule.credit(x, y), true)
        assert rule.last_relaxation["residual"] < 1e-5
    one_sided, symmetric = (sum(c) / len(c) for c in (out[False], out[True]))
    assert one_sided < 0.995  # the bias is there to remove
    assert symmetric >= one_sided and 1 - symmetric < (1 - one_sided) / 4


def test_update_with_small_beta_is_close_to_backprop():
    x, y = batch()
    model = make_model()
    grads = {}
    for rule in (BP(copy.deepcopy(model), SHAPE, C).double(),
                 EP(copy.deepcopy(model), SHAPE, C, beta=1e-3, **CONVERGED).double()):
        rule.compute_gradients(x, y)
        grads[rule.name] = dict(rule.model.named_parameters())
    for name, p in grads["bp"].items():
        q = grads["ep"][name]
        assert (q.grad - p.grad).norm() <= 1e-2 * p.grad.norm(), name


def test_quadratic_cost_credit():
    """The lq task's regression cost: the same relaxation, C = sum of 1/2 ||out - y||^2."""
    x, _ = batch()
    y = torch.randn(x.shape[0], C, dtype=torch.float64)
    model = make_model(act="identity", out_ln=False, block_ln=False)
    rule = EP(copy.deepcopy(model), SHAPE, C, beta=1e-3).double()
    rule.loss_kind = "mse"
    true = exact_credit(model, x, y, lambda o, t: rule.per_sample_loss(o, t).mean())[1]
    assert min(cosines(rule.credit(x, y), true)) > 0.999


def test_relaxation_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = SmallCNN((3, 8, 8), C, widths=(4, 4, 4), fc_width=8).double().train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(C, (16,), generator=g)
    ep = EP(copy.deepcopy(model), (3, 8, 8), C, beta=1e-3).double()
    dfa = DFA(copy.deepcopy(model), (3, 8, 8), C).double()
    credit = ep.credit(x, y)
    dfa.credit(x, y)
    for rule in (ep, dfa):  # the update's backward still finds the buffers its graph saved
        rule.compute_gradients(x, y)
    bufs = {rule.name: dict(rule.model.named_buffers()) for rule in (ep, dfa)}
    assert bufs["ep"]
    for name, b in bufs["dfa"].items():
        assert torch.equal(bufs["ep"][name], b), name  # the one forward of the pass, no more
    assert not torch.equal(bufs["dfa"]["embed.1.running_mean"],
                           dict(model.named_buffers())["embed.1.running_mean"])
    # Batch statistics couple the samples; the relaxation follows them like backprop does.
    true = exact_gradients(copy.deepcopy(model), x, y)[1]
    assert min(cosines(credit, true)) > 0.99


@pytest.mark.parametrize("key,value", [("relax", "foo"), ("beta", 0.0), ("beta", -0.1),
                                       ("T", 0), ("T", 2.5), ("eta", 0.0), ("tol", -1.0),
                                       ("symmetric", "yes")])
def test_bad_options_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"method\.{key}="):
        EP(make_model(), SHAPE, C, **{key: value})


def test_too_few_sweeps_for_the_depth_fail_early():
    with pytest.raises(ConfigError, match=r"method\.T=3 .* L\+1 = 4"):
        EP(make_model(depth=3), SHAPE, C, T=3)
    EP(make_model(depth=3), SHAPE, C, T=3, relax="gd")  # gd: any T is a valid (if poor) choice


def test_resume_is_exact_and_history_has_the_relaxation(make_cfg, tmp_path):
    assert_resume_exact(make_cfg, "method=ep", *TINY_LADDER, "data.n_train=256")
    history = json.loads((tmp_path / "full" / "results.json").read_text())["history"]
    assert len(history) == 3
    for row in history:
        # model.depth=2: the first L + 1 = 3 sweeps cannot have converged.
        assert 0 <= row["ep_residual"] < 0.01 and 3 < row["ep_steps"] <= 30, row
        # docs/rules.md's ep_displacement, logged beside the credit: one RMS per layer h_0..h_L
        assert len(row["ep_displacement"]) == 3 and all(d > 0 for d in row["ep_displacement"]), row
