"""Fidelity (docs/rules.md): every rule's default is the original study's form, each lcredit
improvement is a named switch recorded in results.json, and each form does what its definition
says — checked against hand computations, not against lcredit's own code."""
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_cfg
from lcredit.models import ResMLP
from lcredit.rules import BP, CB, DFA, EP, FA, SB, VEC, Blend, exact_gradients
from lcredit.build import build_rule, fit_task
from lcredit.data import build_task

pytestmark = pytest.mark.usefixtures("one_thread")

from test_estimators import C, SHAPE, batch, make_model
from test_estimators import fit_estimator as fit  # the estimator alone, on the frozen network

CONF = Path(__file__).resolve().parents[1] / "conf" / "method"
PRESETS = {"sb_skip": "sb", "cb_relative": "cb", "vec_gated": "vec", "blend_gated": "blend"}


def grads_of(rule, x, y):
    rule.zero_grad(set_to_none=True)
    rule.compute_gradients(x, y)
    return {n: p.grad.clone() for n, p in rule.model.named_parameters() if p.grad is not None}


def built(tmp_path, *overrides):
    cfg = compose_cfg(tmp_path, "data.n_train=64", "data.n_test=32", "model.d=16",
                      "model.depth=2", *overrides)
    return build_rule(cfg, fit_task(cfg, build_task(cfg.data)))


# ---------------------------------------------------------------- defaults and switches
@pytest.mark.parametrize("method", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_every_method_default_is_the_original_form_and_presets_say_what_they_change(tmp_path,
                                                                                      method):
    rule = built(tmp_path, f"method={method}")
    form = rule.form()
    if method in PRESETS:
        assert not form["original"] and form["departures"], form
        # the preset is its base rule with exactly the switches it lists
        base = built(tmp_path, f"method={PRESETS[method]}",
                     *(f"method.{k}={v}" for k, v in form["departures"].items()))
        assert base.form() == form
    else:
        assert form["original"] and form["departures"] == {}, form
        assert form["original_values"] == dict(type(rule).ORIGINAL)


@pytest.mark.parametrize("cls", [FA, SB, CB, VEC, Blend, EP])
def test_constructor_defaults_are_the_original_forms(cls):
    """The Python API (no Hydra) gives the same forms as the configs."""
    assert cls(make_model(), SHAPE, C).form()["original"]


def test_one_switch_departs_and_is_named(tmp_path):
    rule = built(tmp_path, "method=cb", "method.bridge_noise=input")
    assert rule.form()["departures"] == {"bridge_noise": "input"}
    # an option that does nothing here is no departure (hL_dim without an _hL code)
    assert built(tmp_path, "method=cb", "method.hL_dim=null").form()["original"]
    # ep's reference is the literature's EP; the original study's variant is named
    ep = built(tmp_path, "method=ep", "method.credit=displacement").form()
    assert ep["departures"] == {"credit": "displacement"} and "literature" in ep["reference"]


# ---------------------------------------------------------------- learned, not given
def gamma_per_layer(rule, model, x, y):
    true = exact_gradients(model, x, y)[1]
    return [float(F.cosine_similarity(a.flatten(1), g.flatten(1), dim=1).mean())
            for a, g in zip(rule.credit(x, y), true)]


def hidden(gammas):
    return sum(gammas[1:-1]) / len(gammas[1:-1])


@pytest.mark.parametrize("cls", [SB, CB, VEC])
def test_estimators_start_at_chance_and_learn_to_beat_dfa(cls):
    """The credit must be learned: untrained it is at chance (so a "beats DFA" result cannot
    come from the initialisation), fitted it is far above DFA's on the same layers. The
    control: sb's skip predictor is ~g_L's credit before any training — the first check is
    what exposes it."""
    model = make_model(d=32, depth=4)
    x, y = batch(256, seed=99)
    torch.manual_seed(0)
    rule = cls(copy.deepcopy(model), SHAPE, C, width=64, aux_lr=3e-3, prefit_epochs=1).double()
    untrained = hidden(gamma_per_layer(rule, model, x, y))
    assert abs(untrained) < 0.15, untrained
    dfa = hidden(gamma_per_layer(DFA(copy.deepcopy(model), SHAPE, C).double(), model, x, y))
    trained = hidden(gamma_per_layer(fit(rule, 300), model, x, y))
    assert trained > max(dfa, untrained) + 0.4, (untrained, trained, dfa)
    if cls is SB:
        skip = SB(copy.deepcopy(model), SHAPE, C, width=64, predictor="skip").double()
        assert hidden(gamma_per_layer(skip, model, x, y)) > 0.5  # "aligned" with nothing learned


# ---------------------------------------------------------------- fa, each by its definition
def linear_model(**kw):
    return make_model(act="identity", block_ln=False, **kw)


def block_jacobian(block, h):
    """d block(h) / d h for one sample (the block is linear here: the same for all)."""
    return torch.autograd.functional.jacobian(lambda v: block(v[None])[0], h[0])


def test_fa_blockwise_with_jacobian_transposes_is_backprop():
    """blockwise: a_l = B_l a_{l+1}; with B_l = J_l^T on linear blocks that is backprop's chain,
    so credit and every parameter gradient equal bp's."""
    x, y = batch()
    model = linear_model()
    fa = FA(copy.deepcopy(model), SHAPE, C, variant="blockwise").double()
    hs = [h.detach() for h in model.states(x)]
    for l, block in enumerate(fa.model.blocks):
        getattr(fa, f"feedback_{l}").copy_(block_jacobian(block, hs[l]).T)
    bp = BP(copy.deepcopy(model), SHAPE, C).double()
    for a, g in zip(fa.credit(x, y), bp.credit(x, y)):
        torch.testing.assert_close(a, g, rtol=0, atol=1e-10)
    want, got = grads_of(bp, x, y), grads_of(fa, x, y)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-10, msg=name)
    # and with its own random B_l it is a_l = a_{l+1} B_l^T, not backprop
    rand = FA(copy.deepcopy(model), SHAPE, C, variant="blockwise").double()
    credit = rand.credit(x, y)
    for l in range(len(credit) - 1):
        torch.testing.assert_close(credit[l], credit[l + 1] @ getattr(rand, f"feedback_{l}").T)


def test_fa_layerwise_replaces_each_weight_in_the_backward_by_its_feedback():
    """layerwise (Lillicrap): inside a block h + W2 act(W1 LN(h) + b1) + b2 the backward uses
    B2, B1 where W2^T, W1^T would be; the act derivative, LN backward and skip stay exact. The
    same deltas give the block's weight gradients (fc1's has passed through B2)."""
    x, y = batch()
    model = make_model(depth=2)
    fa = FA(copy.deepcopy(model), SHAPE, C, variant="layerwise").double()
    net = fa.model
    hs = [h.detach() for h in net.states(x)]
    a_above = exact_gradients(net, x, y)[1][-1]  # a_L = g_L (per-sample units)
    n = x.shape[0]
    for l in reversed(range(2)):
        block = net.blocks[l]
        b1 = getattr(fa, f"feedback_{l}_fc1")
        b2 = getattr(fa, f"feedback_{l}_fc2")
        h = hs[l].clone().requires_grad_(True)
        ln = block.ln(h)
        z1 = block.fc1(ln)
        z = z1.detach().requires_grad_(True)
        (act_grad,) = torch.autograd.grad(block.act(z).sum(), z)  # act'(z), elementwise
        delta2 = a_above                       # gradient at fc2's output
        delta1 = (delta2 @ b2) * act_grad      # through B2 (not W2) and act'
        to_ln = delta1 @ b1                    # through B1 (not W1)
        (ln_back,) = torch.autograd.grad(ln, h, to_ln)
        want = a_above + ln_back               # skip path exact
        got = fa.credit(x, y)[l]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        grads = grads_of(fa, x, y)
        torch.testing.assert_close(grads[f"blocks.{l}.fc1.weight"], delta1.T @ ln.detach() / n,
                                   rtol=0, atol=1e-10)
        a_above = want


# ---------------------------------------------------------------- ep, by hand on a linear energy
def lq_like(depth=2):
    """Linear residual blocks, no LayerNorm anywhere, a linear readout: with the quadratic cost
    E + beta*C is quadratic in the states and its minimiser solves a linear system."""
    torch.manual_seed(3)
    model = ResMLP((6,), 3, d=5, depth=depth, mlp_ratio=1.0, act="identity", out_ln=False,
                   block_ln=False, w2_std=0.3).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    y = torch.randn(8, 3, dtype=torch.float64)
    return model, x, y


def nudged_equilibrium(model, x, y, beta):
    """argmin_s E(s) + beta C(s) by one linear solve per sample: s = (s_0, .., s_L) stacked,
    E = 1/2 ||s_0 - embed(x)||^2 + sum_l 1/2 ||s_{l+1} - A_l s_l - c_l||^2 with A_l = I + W2 W1,
    C = 1/2 ||W s_L + b - y||^2."""
    d = model.blocks[0].fc2.out_features
    L = len(model.blocks)
    A, c = [], []
    for blk in model.blocks:
        A.append(torch.eye(d, dtype=torch.float64) + blk.fc2.weight @ blk.fc1.weight)
        c.append(blk.fc2.weight @ blk.fc1.bias + blk.fc2.bias)
    W, b = model.readout.head.weight, model.readout.head.bias
    n = (L + 1) * d
    H = torch.zeros(n, n, dtype=torch.float64)
    I = torch.eye(d, dtype=torch.float64)
    sl = [slice(l * d, (l + 1) * d) for l in range(L + 1)]
    H[sl[0], sl[0]] += I
    for l in range(L):  # 1/2 ||s_{l+1} - A s_l - c||^2
        H[sl[l + 1], sl[l + 1]] += I
        H[sl[l], sl[l]] += A[l].T @ A[l]
        H[sl[l + 1], sl[l]] -= A[l]
        H[sl[l], sl[l + 1]] -= A[l].T
    H[sl[L], sl[L]] += beta * W.T @ W
    with torch.no_grad():
        e0 = model.embed(x)
    rhs = torch.zeros(x.shape[0], n, dtype=torch.float64)
    rhs[:, sl[0]] += e0
    for l in range(L):
        rhs[:, sl[l + 1]] += c[l]
        rhs[:, sl[l]] -= c[l] @ A[l]
    rhs[:, sl[L]] += beta * (y - b) @ W
    s = torch.linalg.solve(H, rhs.T).T
    return [s[:, sl[l]].detach() for l in range(L + 1)], A, c


@pytest.mark.parametrize("credit", ["displacement", "prediction_error"])
def test_ep_credit_equals_the_hand_solved_nudged_equilibrium(credit):
    model, x, y = lq_like()
    beta = 0.05
    ep = EP(copy.deepcopy(model), (6,), 3, beta=beta, T=200, tol=0.0, credit=credit).double()
    ep.loss_kind = "mse"
    s_beta, A, c = nudged_equilibrium(model, x, y, beta)
    s_free = [h.detach() for h in model.states(x)]
    if credit == "displacement":  # -(s^beta - s^0) / beta: descends (the sign the nudge took)
        want = [-(sb - s0) / beta for sb, s0 in zip(s_beta, s_free)]
    else:  # -(s_l^beta - F_{l-1}(s_{l-1}^beta)) / beta
        with torch.no_grad():
            preds = [model.embed(x)] + [s @ a.T + cc for s, a, cc in zip(s_beta[:-1], A, c)]
        want = [-(sb - p) / beta for sb, p in zip(s_beta, preds)]
    for got, w in zip(ep.credit(x, y), want):
        torch.testing.assert_close(got, w, rtol=0, atol=1e-8)
    # the displacement credit points down the loss: following -a lowers C at the top
    top = want[-1]
    with torch.no_grad():
        out = model.readout(s_free[-1])
        moved = model.readout(s_free[-1] - 1e-3 * top)
    assert (0.5 * (moved - y).pow(2).sum()) < (0.5 * (out - y).pow(2).sum())


def test_ep_update_is_one_over_beta_de_dtheta_at_the_nudged_state():
    """Scellier & Bengio: the block parameters follow (1/beta) dE/dtheta at s^beta (per sample
    averaged over the batch, as every update here); update_at=free is lcredit's switch."""
    model, x, y = lq_like()
    beta = 0.05
    ep = EP(copy.deepcopy(model), (6,), 3, beta=beta, T=200, tol=0.0).double()
    ep.loss_kind = "mse"
    s_beta, _, _ = nudged_equilibrium(model, x, y, beta)
    net = copy.deepcopy(model)
    energy = sum(0.5 * (s_beta[l + 1] - blk(s_beta[l])).pow(2).sum()
                 for l, blk in enumerate(net.blocks))
    params = [p for b in net.blocks for p in b.parameters()]
    want = torch.autograd.grad(energy, params)
    got = grads_of(ep, x, y)
    names = [f"blocks.{l}.{n}" for l, b in enumerate(net.blocks) for n, _ in b.named_parameters()]
    for name, w in zip(names, want):
        torch.testing.assert_close(got[name], w / (beta * x.shape[0]), rtol=0, atol=1e-8,
                                   msg=name)
    free = EP(copy.deepcopy(model), (6,), 3, beta=beta, T=200, tol=0.0, update_at="free").double()
    free.loss_kind = "mse"
    other = grads_of(free, x, y)
    assert not torch.allclose(other[names[0]], got[names[0]], rtol=0, atol=1e-12)
    assert free.form()["departures"] == {"update_at": "free"}


# ---------------------------------------------------------------- blend controls
def test_constant_input_gives_one_output_for_every_layer_and_sample():
    rule = Blend(make_model(), SHAPE, C, source="constant_input", alpha=1.0,
                 credit_norm=False).double()
    fit(rule, 5)  # trained, and still one shared output
    x, y = batch()
    credit = rule.credit(x, y)
    for a in credit:
        torch.testing.assert_close(a, credit[0][:1].expand_as(a), rtol=0, atol=0)


def test_zero_target_output_stays_near_zero_and_is_not_renormalised():
    rule = Blend(make_model(), SHAPE, C, source="zero_target", alpha=0.5, aux_lr=1e-2,
                 prefit_epochs=1).double()
    x, y = batch()
    dfa = DFA(copy.deepcopy(rule.model), SHAPE, C).double()
    dfa.load_state_dict({k: v for k, v in rule.state_dict().items()
                         if k.startswith(("model.", "feedback_"))})
    fit(rule, 200)
    blended, d = rule.credit(x, y), dfa.credit(x, y)
    for a, b in zip(blended, d):
        aux = (a - 0.5 * b) / 0.5  # the aux source's own credit
        assert aux.norm() < 0.05 * b.norm(), (aux.norm(), b.norm())
    renorm = copy.deepcopy(rule)
    renorm.zero_target_renorm = True  # the lcredit switch: blown back up to unit RMS
    a = renorm.credit(x, y)[1]
    aux = (a - 0.5 * d[1]) / 0.5
    torch.testing.assert_close(aux.pow(2).mean(1).sqrt(), torch.ones(len(x), dtype=torch.float64),
                               rtol=1e-3, atol=0)


# ---------------------------------------------------------------- codes and clipping
def test_hL_codes_use_a_learned_32_dim_projection():
    rule = CB(make_model(), SHAPE, C, s_type="eT_hL").double()
    assert rule.cond_dim() == C + 32 and rule.hL_proj.out_features == 32
    before = rule.hL_proj.weight.detach().clone()
    fit(rule, 2)
    assert not torch.equal(rule.hL_proj.weight, before)  # trained with the estimator
    raw = CB(make_model(), SHAPE, C, s_type="eT_hL", hL_dim=None).double()
    assert raw.cond_dim() == C + 16 and raw.hL_proj is None
    assert raw.form()["departures"] == {"hL_dim": None}


def test_block_grad_clip_bounds_every_blocks_update(tmp_path):
    from lightning.pytorch.callbacks import Callback

    from lcredit.train import train

    class Norms(Callback):
        seen = []

        def on_before_optimizer_step(self, trainer, rule, optimizer):
            self.seen.append([float(torch.cat([p.grad.flatten() for p in b.parameters()]).norm())
                              for b in rule.model.blocks])

    norms = Norms()
    r = train(compose_cfg(tmp_path, "method=dfa", "model=student", "data.n_train=256",
                          "model.d=16", "model.depth=2", "trainer.max_epochs=1",
                          "block_grad_clip=1e-3"), extra_callbacks=[norms])
    assert r["block_grad_clip"] == 1e-3
    assert norms.seen and all(n <= 1e-3 * (1 + 1e-5) for step in norms.seen for n in step)
