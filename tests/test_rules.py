"""The block-local update and the rules' credit: properties every comparison relies on."""
import copy

import pytest
import torch

from conftest import GivenCredit as Oracle
from lcredit.models import ResMLP
from lcredit.rules import BP, DFA, FA, Frozen, exact_gradients

SHAPE, C = (12,), 5


def make_model(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    opts = dict(d=16, depth=3, mlp_ratio=2.0) | kw
    return ResMLP(SHAPE, C, **opts).to(dtype)


def batch(n=32, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g, dtype=dtype), torch.randint(C, (n,), generator=g)


def grads_of(rule, x, y):
    rule.model.zero_grad(set_to_none=True)
    rule.compute_gradients(x, y)
    return {n: (p.grad.clone() if p.grad is not None else None)
            for n, p in rule.model.named_parameters()}


MODEL_VARIANTS = [dict(), dict(out_ln=False), dict(residual=False), dict(act="relu")]


@pytest.mark.parametrize("kw", MODEL_VARIANTS)
def test_oracle_credit_reproduces_backprop(kw):
    x, y = batch()
    model = make_model(**kw)
    ref = grads_of(BP(model, SHAPE, C).double(), x, y)
    _, true = exact_gradients(model, x, y)
    oracle = Oracle(copy.deepcopy(model), SHAPE, C, credits=true).double()
    got = grads_of(oracle, x, y)
    assert set(ref) == set(got)
    for name in ref:
        assert got[name] is not None, name
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-6, msg=name)
    # The credit itself is what the diagnostics will read.
    for a, g in zip(oracle.credit(x, y), true):
        torch.testing.assert_close(a, g, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kw", MODEL_VARIANTS)
def test_layerwise_fa_with_transposed_weights_is_backprop(kw):
    x, y = batch()
    model = make_model(**kw)
    ref = grads_of(BP(model, SHAPE, C).double(), x, y)
    fa = FA(copy.deepcopy(model), SHAPE, C, variant="layerwise").double()
    for layer, buf in fa._sites:  # feedback := forward weight (used where W^T would be)
        getattr(fa, buf).copy_(layer.weight.detach())
    got = grads_of(fa, x, y)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-6, msg=name)
    for a, g in zip(fa.credit(x, y), BP(model, SHAPE, C).credit(x, y)):
        torch.testing.assert_close(a, g, rtol=0, atol=1e-9)


@pytest.mark.parametrize("make", [
    lambda m: DFA(m, SHAPE, C), lambda m: FA(m, SHAPE, C, variant="layerwise"),
    lambda m: FA(m, SHAPE, C, variant="blockwise")], ids=["dfa", "fa-layerwise", "fa-blockwise"])
def test_local_rules_do_not_leak_backprop(make):
    x, y = batch()
    model = make_model()
    ref = grads_of(BP(model, SHAPE, C).double(), x, y)
    rule = make(copy.deepcopy(model)).double()
    got = grads_of(rule, x, y)
    # The readout sees its exact local gradient; the embedding and the lower blocks do not
    # (fa's top block is trained by the exact a_L, as the rule says).
    for name in ref:
        same = torch.allclose(got[name], ref[name], rtol=1e-4, atol=1e-8)
        if name.startswith("readout."):
            assert same, name
        elif name.startswith(("embed.", "blocks.0.", "blocks.1.")):
            assert not same, name
    credit = rule.credit(x, y)
    true = exact_gradients(model, x, y)[1]
    assert len(credit) == len(true) == model.depth + 1
    for a, g in zip(credit, true):
        assert a.shape == g.shape


def test_fa_credit_starts_from_exact_output_gradient():
    x, y = batch()
    model = make_model()
    true = exact_gradients(model, x, y)[1]
    for variant in ("layerwise", "blockwise"):
        credit = FA(copy.deepcopy(model), SHAPE, C, variant=variant).double().credit(x, y)
        torch.testing.assert_close(credit[-1], true[-1])
        assert not torch.allclose(credit[0], true[0], atol=1e-3)


def test_dfa_credit_is_error_times_feedback():
    x, y = batch()
    rule = DFA(make_model(), SHAPE, C).double()
    e = torch.softmax(rule.model(x), -1) - torch.nn.functional.one_hot(y, C)
    for l, a in enumerate(rule.credit(x, y)):
        torch.testing.assert_close(a, e @ rule.feedback(l))


def test_frozen_updates_only_embedding_and_readout():
    x, y = batch()
    model = make_model()
    got = grads_of(Frozen(copy.deepcopy(model), SHAPE, C).double(), x, y)
    ref = grads_of(BP(model, SHAPE, C).double(), x, y)
    for name, g in got.items():
        if name.startswith("blocks."):
            assert g is None, name
        else:  # embedding and readout: exactly backprop's gradient through frozen blocks
            torch.testing.assert_close(g, ref[name], rtol=0, atol=1e-9, msg=name)


def test_feedback_matrices_are_persistent_buffers():
    for rule in (DFA(make_model(), SHAPE, C), FA(make_model(), SHAPE, C, variant="layerwise"),
                 FA(make_model(), SHAPE, C, variant="blockwise")):
        names = [n for n, _ in rule.named_buffers() if "feedback" in n]
        assert names and all(n in rule.state_dict() for n in names)
        assert not any("feedback" in n for n, _ in rule.named_parameters())


@pytest.mark.parametrize("residual", [True, False])
def test_penalty_adds_the_block_local_norm_gradient(residual):
    """penalty_lam adds lam * d/dtheta mean||f_l(h_l)||^2 to block l alone (h_l detached)."""
    x, y = batch()
    lam = 0.03
    model = make_model(residual=residual)
    rule = DFA(copy.deepcopy(model), SHAPE, C, penalty_lam=lam).double()
    with_pen = grads_of(rule, x, y)
    rule.penalty_lam = 0.0
    without = grads_of(rule, x, y)
    hs = [h.detach() for h in model.states(x)]
    for l, block in enumerate(rule.model.blocks):
        out = block(hs[l])
        f = out - hs[l] if residual else out
        expect = torch.autograd.grad(lam * f.pow(2).sum(1).mean(), list(block.parameters()))
        for (name, _), e in zip(block.named_parameters(), expect):
            key = f"blocks.{l}.{name}"
            torch.testing.assert_close(with_pen[key] - without[key], e, rtol=0, atol=1e-9)
    for key in with_pen:  # nothing outside the blocks sees the penalty
        if not key.startswith("blocks."):
            torch.testing.assert_close(with_pen[key], without[key], rtol=0, atol=0)


def test_bp_penalty_is_part_of_the_end_to_end_loss():
    x, y = batch()
    model = make_model()
    lam = 0.03
    got = grads_of(BP(copy.deepcopy(model), SHAPE, C, penalty_lam=lam).double(), x, y)
    hs = model.states(x)
    loss = torch.nn.functional.cross_entropy(model.readout(hs[-1]), y)
    pen = sum((o - i).pow(2).sum(1).mean() for i, o in zip(hs[:-1], hs[1:]))
    (loss + lam * pen).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("make", [lambda m: FA(m, SHAPE, C, variant="layerwise"),
                                  lambda m: Frozen(m, SHAPE, C)],
                         ids=["fa-layerwise", "frozen"])
def test_chained_pass_equals_block_by_block_update(make):
    """The one-call chain for vjp-credit rules gives the block-by-block update's numbers."""
    x, y = batch()
    fused = make(make_model()).double()
    stepwise = copy.deepcopy(fused)
    stepwise.credit_is_vjp = False
    a, b = grads_of(fused, x, y), grads_of(stepwise, x, y)
    for name in a:
        if a[name] is None:
            assert b[name] is None, name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-12, msg=name)
    for u, v in zip(fused.credit(x, y), stepwise.credit(x, y)):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-12)
