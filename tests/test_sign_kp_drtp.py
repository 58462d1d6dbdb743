"""The field's other rules against their defining identities (docs/rules.md: usf, brsf, frsf, kp,
drtp): uSF's backward is the hand-written one with sign(W); brSF's magnitudes are fresh every
batch while its signs are always W's; Kolen–Pollack's W - B shrinks by exactly (1 - kp_decay)
per step; DRTP's credit is a function of the label alone. Each rule's 20-step agreement with
its plain loop is in tests/test_reference.py."""
import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_C, SMALL_SHAPE, small_batch, small_resmlp, TINY_LADDER, TINY_MEASURE, assert_resume_exact
from lcredit.diagnostics.measure import fresh_feedback_copies
from lcredit.rules import BRSF, DRTP, FRSF, KP, USF

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE, C = SMALL_SHAPE, SMALL_C
make_model = small_resmlp
batch = small_batch


def sites(rule):
    """The block linears whose backward a layerwise rule substitutes."""
    return rule._sites if isinstance(rule._sites[0], torch.nn.Module) else [m for m, _ in rule._sites]


# ---------------------------------------------------------------- uSF
def test_usf_backward_is_the_hand_written_one_with_sign_w():
    """Credit and block gradients from a backward written out by hand: each block linear's
    input gradient goes through sign(W) / sqrt(3 fan_in); LayerNorm and GELU stay exact."""
    model, (x, y) = make_model(), batch()
    rule = USF(copy.deepcopy(model), SHAPE, C).double()
    rule.zero_grad(set_to_none=True)
    rule.compute_gradients(x, y)
    got_credit = rule.credit(x, y)

    n = len(y)
    with torch.no_grad():
        hs = [model.embed(x)]
        for block in model.blocks:
            hs.append(block(hs[-1]))
    top = hs[-1].clone().requires_grad_(True)
    a = torch.autograd.grad(F.cross_entropy(model.readout(top), y), top)[0] * n
    credits, grads = [a], {}
    for l in reversed(range(len(model.blocks))):
        b = model.blocks[l]
        h = hs[l].clone().requires_grad_(True)
        u = b.ln(h)
        z = b.fc1(u)
        v = b.act(z)
        # the block's parameter gradients: <f_l, a_{l+1}> / n with the substituted backward
        S2 = torch.sign(b.fc2.weight) / math.sqrt(3 * b.fc2.in_features)
        S1 = torch.sign(b.fc1.weight) / math.sqrt(3 * b.fc1.in_features)
        d_v = a @ S2
        d_z = torch.autograd.grad(v, z, d_v, retain_graph=True)[0]   # GELU: exact
        d_u = d_z @ S1
        grads[f"blocks.{l}.fc2.weight"] = a.T @ v.detach() / n
        grads[f"blocks.{l}.fc1.weight"] = d_z.T @ u.detach() / n
        a = a + torch.autograd.grad(u, h, d_u)[0]                    # skip + LayerNorm: exact
        credits.insert(0, a)
    for l, (want, have) in enumerate(zip(credits, got_credit)):
        torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-12, msg=f"a_{l}")
    params = dict(rule.model.named_parameters())
    for name, want in grads.items():
        torch.testing.assert_close(params[name].grad, want, rtol=1e-10, atol=1e-12, msg=name)
    # the control: backprop's credit (W itself) is a different thing
    bp_top = hs[0].clone().requires_grad_(True)
    h = bp_top
    for block in model.blocks:
        h = block(h)
    g0 = torch.autograd.grad(F.cross_entropy(model.readout(h), y), bp_top)[0] * n
    assert not torch.allclose(g0, got_credit[0], rtol=1e-3, atol=1e-6)


def test_usf_has_no_random_feedback_so_its_null_is_dfas():
    rule = USF(make_model(), SHAPE, C).double()
    assert fresh_feedback_copies(rule, 2, torch.Generator().manual_seed(0)) is None


# ---------------------------------------------------------------- brSF and frSF
def test_brsf_magnitudes_change_every_batch_and_its_signs_are_always_ws():
    rule = BRSF(make_model(), SHAPE, C).double()
    rule.run_config = {"seed": 3}
    opt = rule.make_optimizer()
    layers = sites(rule)
    previous = None
    for step in range(6):
        fb = [rule.feedback(i, m) for i, m in enumerate(layers)]
        mags = [rule.magnitude(i, m).clone() for i, m in enumerate(layers)]
        for m, f in zip(layers, fb):
            assert torch.equal(torch.sign(f), torch.sign(m.weight.detach())), step
        if previous is not None:  # every entry fresh (a continuous draw never repeats)
            assert all(not torch.isclose(p, q).any() for p, q in zip(previous, mags)), step
        previous = mags
        x, y = batch(seed=10 + step)
        rule.update(x, y, opt)
    assert int(rule.magnitude_draws) == 6
    # the draws are part of the state: a restored copy draws what the original draws next
    twin = BRSF(make_model(seed=5), SHAPE, C).double()
    twin.run_config = rule.run_config
    twin.load_state_dict(rule.state_dict())
    rule.after_step(), twin.after_step()
    for i, m in enumerate(layers):
        assert torch.equal(rule.magnitude(i, m), twin.magnitude(i, sites(twin)[i]))


def test_frsf_magnitudes_stay_fixed_while_its_signs_follow_w():
    rule = FRSF(make_model(), SHAPE, C).double()
    opt = torch.optim.SGD(rule.parameters(), lr=0.5)  # large steps: some weights change sign
    layers = sites(rule)
    start_m = [rule.magnitude(i, m).clone() for i, m in enumerate(layers)]
    start_sign = [torch.sign(m.weight.detach()) for m in layers]
    for step in range(5):
        rule.update(*batch(seed=20 + step), opt)
    for i, m in enumerate(layers):
        assert torch.equal(rule.magnitude(i, m), start_m[i])
        assert torch.equal(torch.sign(rule.feedback(i, m)), torch.sign(m.weight.detach()))
    assert any(not torch.equal(torch.sign(m.weight), s) for m, s in zip(layers, start_sign))


# ---------------------------------------------------------------- Kolen–Pollack
@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_kolen_pollack_difference_decays_by_exactly_one_minus_lambda_per_step(optim):
    """W_t - B_t = (1 - lambda)^t (W_0 - B_0), for plain SGD (Akrout et al.'s statement) and
    for lcredit's default optimizer alike: B gets whatever change the optimizer gave W."""
    lam, steps = 0.05, 20
    factory = (functools.partial(torch.optim.SGD, lr=0.1) if optim == "sgd"
               else functools.partial(torch.optim.Adam, lr=1e-2))
    rule = KP(make_model(), SHAPE, C, optimizer=factory, kp_decay=lam).double()
    opt = rule.make_optimizer()
    layers = sites(rule)
    feedback = [getattr(rule, buf) for _, buf in rule._sites]
    diff0 = [m.weight.detach() - B for m, B in zip(layers, feedback)]
    B0 = [B.clone() for B in feedback]
    for step in range(steps):
        rule.update(*batch(seed=30 + step), opt)
    for m, B, d0, b0 in zip(layers, feedback, diff0, B0):
        torch.testing.assert_close(m.weight.detach() - B, (1 - lam) ** steps * d0,
                                   rtol=1e-12, atol=1e-14)
        assert not torch.allclose(B, (1 - lam) ** steps * b0)  # B learned, not only decayed


def test_kolen_pollack_feedback_aligns_with_w_and_is_checkpointed():
    rule = KP(make_model(), SHAPE, C, kp_decay=0.1).double()
    opt = rule.make_optimizer()
    layers = sites(rule)

    def alignment():
        return [float(F.cosine_similarity(m.weight.detach().flatten(), getattr(rule, b).flatten(), 0))
                for m, (_, b) in zip(layers, rule._sites)]

    before = alignment()
    for step in range(60):
        rule.update(*batch(seed=40 + step), opt)
    after = alignment()
    assert all(b < 0.2 for b in before) and all(a > 0.5 for a in after), (before, after)
    state = rule.state_dict()
    assert all(torch.equal(state[b], getattr(rule, b)) for _, b in rule._sites)
    # redrawn (the null) the feedback is random again
    null = fresh_feedback_copies(rule, 2, torch.Generator().manual_seed(0))
    c = null[0]
    assert all(abs(float(F.cosine_similarity(m.weight.detach().flatten(),
                                             getattr(c, b).flatten(), 0))) < 0.2
               for m, (_, b) in zip(sites(c), c._sites))


# ---------------------------------------------------------------- DRTP
def test_drtp_credit_is_the_same_for_two_inputs_with_the_same_label():
    rule = DRTP(make_model(), SHAPE, C).double()
    x, y = batch(64)
    credit = rule.credit(x, y)
    i, j = next((i, j) for i in range(64) for j in range(i + 1, 64) if y[i] == y[j])
    assert not torch.equal(x[i], x[j])
    for l, a in enumerate(credit):
        assert torch.equal(a[i], a[j]), l
        # Frenkel et al.'s sign: +onehot(y) B_l (dfa's is (softmax - onehot) B_l)
        torch.testing.assert_close(a, (F.one_hot(y, C).double() @ rule.feedback(l)).view_as(a))
    # ... and of nothing the network computes: other weights, the same credit
    other = DRTP(make_model(seed=9), SHAPE, C).double()
    for l in range(len(credit)):
        other.feedback(l).copy_(rule.feedback(l))
    assert all(torch.equal(a, b) for a, b in zip(credit, other.credit(x, y)))
    assert not torch.equal(credit[1][y == 0][0], credit[1][y == 1][0])


def test_drtps_null_draws_in_one_pass_equal_redrawn_copies():
    rule = DRTP(make_model(), SHAPE, C).double()
    x, y = batch()
    draws = rule.feedback_draws(3, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    for batched in draws.credit_sets(x, y):
        c = copy.deepcopy(rule)
        c.draw_feedback(gen)
        for a, b in zip(batched, c.credit(x, y)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(draws.credit_sets(x, y)[0][1], rule.credit(x, y)[1])


# ---------------------------------------------------------------- state across a resume
@pytest.mark.parametrize("method", ["brsf", "kp"])
def test_a_resumed_run_draws_and_learns_its_feedback_as_an_uninterrupted_one(make_cfg, method):
    """brsf's per-batch draws and kp's learned B are part of the checkpoint."""
    assert_resume_exact(make_cfg, f"method={method}", *TINY_LADDER, "data.n_train=256",
                        "data.n_test=64", "data.batch_size=64", *TINY_MEASURE)
