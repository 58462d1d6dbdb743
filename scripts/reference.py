"""Plain reference loops: each rule's math as a minimal PyTorch step on a ResMLP, with no
Lightning and nothing from lcredit. They are the baseline `scripts/bench.py` times lcredit
against, and the oracle tests/test_reference.py holds lcredit to: from the same initial
network, rule state and batches, 20 steps of lcredit and of the loop end with the same
parameters (an estimator's included).

The model: ``embed``, blocks ``h + fc2(act(fc1(ln(h))))`` and ``readout``; every state h_0..h_L
has the same width d. Unless a rule says otherwise a step is docs/rules.md's block-local update: the
readout gets its exact gradient, block l the gradient of <f_l(sg h_l), sg a_{l+1}> / B and the
embedding that of <h_0, sg a_0> / B, for per-sample credits a_l (B the batch size,
e = softmax(logits) - onehot(y), g_L = B dLoss/dh_L the exact per-sample credit at the top).

- bp: backprop. frozen: backprop, the optimizer holding only the embedding and readout.
- dfa: a_l = e B_l, B_l fixed random (C, d).
- fa_blockwise: a_L = g_L, a_l = a_{l+1} B_l^T, B_l fixed random (d, d).
- fa_layerwise: one backward pass whose block linears send their input gradient through fixed
  random matrices of their weight's shape.
- usf, frsf, brsf (sign symmetry): fa_layerwise's pass with sign(W) / sqrt(3 fan_in) (usf) or
  |M| sign(W) (frsf: M fixed; brsf: M redrawn after every step from a generator seeded by
  (seed, draw), as lcredit's) in place of each block linear's W, signs from the current W.
- kp (Kolen-Pollack): fa_layerwise's pass with feedback B; after the optimizer step
  B <- B + (W - W_before) - kp_decay B and W <- W - kp_decay W_before.
- drtp: dfa's step with onehot(y) in place of e.
- ep: the layered energy E = 1/2 ||s_0 - h_0||^2 + sum_l 1/2 ||s_{l+1} - F_l(s_l)||^2 nudged by
  beta * sum_i CE_i(readout(s_L)), relaxed by top-down sweeps from the forward pass (after the
  first L+1 sweeps, stopped once a sweep's largest move is below tol in units of the nudge);
  credit a_l = -(s_l - F_{l-1}(s_{l-1})) / beta at the nudged states s, blocks evaluated at s.
- sb: a_l = d/dh_l CE(readout(P_l(h_l, e)), y) through an MLP predictor of h_L per layer,
  a_L = g_L; the predictors train on ||P_l - sg h_L||^2 / ||sg h_L||^2.
- cb: a_l = dV/dh(h_l, l, e) for a value net V, which trains on the terminal value
  (V(h_L) - CE)^2, the terminal gradient tgw ||dV/dh(h_L) - g_L||^2 and the bridge
  (V(h_l, l) - sg mean_k V(h_{l+1} + sigma xi_k, l+1))^2.
- vec: a_l = A(h_l, l, e) for a field A, which trains on sum_u (<A, u> - delta_u)^2 over M
  random unit directions u (delta_u the central finite difference of the loss run forward from
  h_l, step eps) plus terminal_weight ||A(h_L) - g_L||^2, each summed and divided by B.
- blend: a_l = alpha a_vec + (1 - alpha) e B_l, the field trained as vec's.

sb, cb, vec and blend divide each sample's learned credit by (its RMS + 1e-6) and step their
estimator in the same optimizer step, in its own parameter group (lr ``aux_lr``).

API: ``STEPS[name](model, state, opt, x, y)`` is one step; ``make_state(name, model,
num_classes, generator=None, **options)`` the state for a fresh run (``options`` override the
defaults in ``DEFAULTS``); ``param_groups(name, model, state)`` what the optimizer holds.
``state`` is None (bp, frozen, usf), the feedback (dfa, drtp and fa_blockwise: a list of
matrices; fa_layerwise: a dict from each block linear to its (out, in) matrix; frsf: that dict of
magnitudes M), or a dict: the hyperparameters, and for the estimators ``net`` (the estimator),
``seed`` and ``step`` (their noise is drawn from a generator seeded per step by both, as
lcredit's), blend's ``feedback``; brsf: ``magnitude`` (frsf's dict), ``seed`` and ``step``;
kp: ``kp_decay`` and ``feedback`` (fa_layerwise's dict, updated in place).
"""
import copy
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

# conf/method/<rule>.yaml's defaults (the original forms).
DEFAULTS = {
    "kp": dict(kp_decay=1e-4),
    "ep": dict(beta=0.01, T=30, tol=0.01),
    "sb": dict(width=256, aux_lr=1e-3),
    "cb": dict(width=256, aux_lr=1e-3, K=4, sigma=0.05, tgw=1.0, target_ema=0.995,
               bridge_temp=0.1),
    "vec": dict(width=256, aux_lr=1e-3, M=4, eps=1e-3, terminal_weight=1.0),
    "blend": dict(width=256, aux_lr=1e-3, M=4, eps=1e-3, terminal_weight=1.0, alpha=0.5),
}
ESTIMATORS = ("sb", "cb", "vec", "blend")


class FeedbackLinearFn(torch.autograd.Function):
    """x W^T + b whose input gradient goes through ``fb`` (shape of W) instead of W."""

    @staticmethod
    def forward(ctx, x, w, b, fb):
        ctx.save_for_backward(x, fb)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, fb = ctx.saved_tensors
        return g @ fb, g.T @ x, g.sum(0), None


def bp_step(model, feedback, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def frozen_step(model, feedback, opt, x, y):
    """Backprop's gradient for the embedding and the readout (``opt`` holds only those), and
    nothing for the blocks."""
    opt.zero_grad(set_to_none=True)
    trained = [q for group in opt.param_groups for q in group["params"]]
    F.cross_entropy(model(x), y).backward(inputs=trained)
    opt.step()


def fa_layerwise_step(model, feedback, opt, x, y):
    """One graph whose block linears send their input gradient through fixed random matrices."""
    opt.zero_grad(set_to_none=True)
    h = model.embed(x)
    for block in model.blocks:
        f = FeedbackLinearFn.apply(block.ln(h), block.fc1.weight, block.fc1.bias,
                                   feedback[block.fc1])
        f = FeedbackLinearFn.apply(block.act(f), block.fc2.weight, block.fc2.bias,
                                   feedback[block.fc2])
        h = h + f
    F.cross_entropy(model.readout(h), y).backward()
    opt.step()


def _substituted_step(model, feedback, opt, x, y):
    """fa_layerwise's step with ``feedback(linear)`` giving each block linear's matrix."""
    return fa_layerwise_step(model, {m: feedback(m) for b in model.blocks for m in (b.fc1, b.fc2)},
                             opt, x, y)


def usf_step(model, state, opt, x, y):
    """sign(W) / sqrt(3 fan_in) in place of every block linear's W (BioTorch's uSF)."""
    _substituted_step(model, lambda m: torch.sign(m.weight.detach()) / math.sqrt(
        3 * m.weight.shape[1]), opt, x, y)


def frsf_step(model, state, opt, x, y):
    """|M| sign(W), M fixed (``state``: each block linear's M)."""
    _substituted_step(model, lambda m: state[m].abs() * torch.sign(m.weight.detach()), opt, x, y)


def brsf_step(model, state, opt, x, y):
    """frsf's step, then fresh magnitudes |U(+-1/sqrt(fan_in))| for the next batch, drawn in
    the block linears' order from the generator of draw ``step``."""
    frsf_step(model, state["magnitude"], opt, x, y)
    state["step"] += 1
    seed = (state["seed"] * 1_000_003 + state["step"] * 7_919 + 17) % (2**63 - 1)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    for b in model.blocks:
        for m in (b.fc1, b.fc2):
            M = state["magnitude"][m]
            M.copy_(torch.rand(M.shape, generator=gen, dtype=M.dtype, device=M.device)
                    / math.sqrt(M.shape[1]))


def kp_step(model, state, opt, x, y):
    """fa_layerwise's step with the learned B; B then gets W's change, and both decay."""
    linears = [m for b in model.blocks for m in (b.fc1, b.fc2)]
    before = [m.weight.detach().clone() for m in linears]
    fa_layerwise_step(model, state["feedback"], opt, x, y)
    lam = state["kp_decay"]
    with torch.no_grad():
        for m, w0 in zip(linears, before):
            B = state["feedback"][m]
            B += m.weight - w0 - lam * B
            m.weight -= lam * w0


def drtp_step(model, feedback, opt, x, y):
    """dfa's step with the target onehot(y) in place of the error e."""
    opt.zero_grad(set_to_none=True)
    h0, outs, top = _cut_forward(model, x)
    logits = model.readout(top)
    loss = F.cross_entropy(logits, y)
    t = F.one_hot(y, logits.shape[-1]).to(logits.dtype) / len(y)
    torch.autograd.backward([loss, h0, *outs], [None] + [t @ B for B in feedback])
    opt.step()


def _cut_forward(model, x):
    """h_0 and every block's output, each block fed a detached input."""
    h0 = model.embed(x)
    outs, h = [], h0.detach()
    for block in model.blocks:
        h = block(h)
        outs.append(h)
        h = h.detach()
    return h0, outs, h.requires_grad_(True)


def dfa_step(model, feedback, opt, x, y):
    """Every block output (and h_0) gets e B_l, e = softmax - onehot over the batch size."""
    opt.zero_grad(set_to_none=True)
    h0, outs, top = _cut_forward(model, x)
    logits = model.readout(top)
    loss = F.cross_entropy(logits, y)
    e = (torch.softmax(logits.detach(), -1) - F.one_hot(y, logits.shape[-1])) / len(y)
    torch.autograd.backward([loss, h0, *outs], [None] + [e @ B for B in feedback])
    opt.step()


def fa_blockwise_step(model, feedback, opt, x, y):
    """a_L the exact gradient at h_L; a_l = a_{l+1} B_l^T down the blocks."""
    opt.zero_grad(set_to_none=True)
    h0, outs, top = _cut_forward(model, x)
    loss = F.cross_entropy(model.readout(top), y)
    loss.backward()                      # the readout's gradient, and top.grad = dLoss/dh_L
    a = top.grad
    credits = [a]
    for B in reversed(feedback):         # B_{L-1} .. B_0
        a = a @ B.T
        credits.append(a)
    credits.reverse()                    # a_0 .. a_L (batch-mean units)
    torch.autograd.backward([h0, *outs], credits)
    opt.step()


# ------------------------------------------------------------------ the rules with a state dict
def _forward(model, x, y):
    """The cut forward pass, the readout's exact gradient into .grad; what credit may use: h_0
    and the block outputs (with their graphs), the detached states hs = h_0..h_L, the logits,
    e and g = g_L (per sample)."""
    h0, outs, top = _cut_forward(model, x)
    logits = model.readout(top)
    F.cross_entropy(logits, y).backward()
    logits = logits.detach()
    e = torch.softmax(logits, -1) - F.one_hot(y, logits.shape[-1])
    return SimpleNamespace(h0=h0, outs=outs, hs=[h0.detach()] + [o.detach() for o in outs],
                           y=y, logits=logits, e=e, g=top.grad * len(y))


def _local_update(p, credits):
    """Block l: <f_l(sg h_l), a_{l+1}> / B; the embedding: <h_0, a_0> / B."""
    torch.autograd.backward([p.h0, *p.outs], [a / len(p.y) for a in credits])


def _normalised(a, per_sample=True):
    """Each sample's credit over its own RMS (+ 1e-6), or the layer's over its batch RMS."""
    if not per_sample:
        return a / (a.pow(2).mean().sqrt() + 1e-6)
    return a / (a.pow(2).mean(1, keepdim=True).sqrt() + 1e-6)


def _noise(state, device):
    """The step's generator, seeded as lcredit's from (seed, step) (its stream 0)."""
    seed = (state["seed"] * 1_000_003 + state["step"] * 7_919) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


def _cost_grad(model, top, y):
    """d/ds_L of sum_i CE_i(readout(s_L))."""
    top = top.detach().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(model.readout(top), y, reduction="sum"), top)[0]


def _rms(t):
    """Root mean square over the batch of the per-sample norms."""
    return t.pow(2).sum().div(len(t)).sqrt()


def _relax(model, p, beta, T, tol):
    """s^beta by top-down sweeps from the forward pass: s_L <- F(s_{L-1}) - beta dC/ds_L, then
    s_l <- F(s_{l-1}) + J_l(s_l)^T (s_{l+1} - F(s_l)), F(s_{l-1}) and J_l taken at the sweep's
    start (F(s_{-1}) = h_0). Past L+1 sweeps, it stops once
    max_l rms(move_l) / (beta rms(dC/ds_L)) < tol, rms over the batch of per-sample norms."""
    blocks, s = list(model.blocks), list(p.hs)
    depth = len(blocks)
    for sweep in range(1, T + 1):
        ins = [h.detach().requires_grad_(True) for h in s[:-1]]
        outs = [block(h) for block, h in zip(blocks, ins)]
        pred = [p.hs[0]] + [o.detach() for o in outs]
        dc = _cost_grad(model, s[-1], p.y)
        new = [None] * depth + [pred[depth] - beta * dc]
        for l in reversed(range(depth)):
            new[l] = pred[l] + torch.autograd.grad(outs[l], ins[l], new[l + 1] - pred[l + 1])[0]
        move = max(_rms(a - b) for a, b in zip(new, s))
        s = new
        if sweep > depth and float(move / (beta * _rms(dc))) < tol:
            break
    return s


def ep_step(model, state, opt, x, y):
    """The nudged prediction errors as credit; block l evaluated at the nudged state s_l, the
    embedding at the forward pass's h_0, the readout at h_L (its exact gradient)."""
    opt.zero_grad(set_to_none=True)
    p = _forward(model, x, y)
    beta = state["beta"]
    s = _relax(model, p, beta, state["T"], state["tol"])
    at = [block(h) for block, h in zip(model.blocks, s[:-1])]   # F_l(s_l), graphs to block l
    errors = [s[0] - p.hs[0]] + [h - f.detach() for h, f in zip(s[1:], at)]
    credits = [-err / beta for err in errors]
    torch.autograd.backward([p.h0, *at], [a / len(y) for a in credits])
    opt.step()


class Predictor(nn.Module):
    """sb's P_l(h_l, e) -> h_L: an MLP on [h_l, e]."""

    def __init__(self, d, c, width):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d + c, width), nn.GELU(), nn.Linear(width, d))

    def forward(self, h, e):
        return self.mlp(torch.cat([h, e], 1))


class ConcatNet(nn.Module):
    """cb's value (out 1) and vec's field (out d): an MLP on [LN(h), embedding(t), e] (a learned
    16-number embedding of the layer index), its first layer written as one linear map per
    input, initialised as one nn.Linear over the concatenation."""

    def __init__(self, d, c, depth, width, out, code=16):
        super().__init__()
        self.embed_in = nn.ModuleList([nn.Linear(d, width)])
        self.layer = nn.Embedding(depth + 1, code)
        self.code = nn.Linear(code, width, bias=False)
        self.trunk = nn.Sequential(nn.GELU(), nn.Linear(width, width), nn.GELU())
        self.cond = nn.Linear(c, width, bias=False)
        self.heads = nn.ModuleList([nn.Linear(width, out)])
        bound = (d + code + c) ** -0.5
        with torch.no_grad():
            for w in (self.embed_in[0].weight, self.embed_in[0].bias, self.code.weight,
                      self.cond.weight):
                w.uniform_(-bound, bound)

    def forward(self, h, t, e):
        z = self.embed_in[0](F.layer_norm(h, h.shape[1:])) + self.code(self.layer.weight[t])
        return self.heads[0](self.trunk(z + self.cond(e)))


def _sb_credits(model, state, p):
    def through(P, h):
        h = h.detach().requires_grad_(True)
        cost = F.cross_entropy(model.readout(P(h, p.e)), p.y, reduction="sum")
        return torch.autograd.grad(cost, h)[0]
    return [_normalised(through(P, h)) for P, h in zip(state["net"], p.hs)] + [_normalised(p.g)]


def _sb_loss(model, state, p):
    top = p.hs[-1]
    return sum(((P(h, p.e) - top).pow(2).sum(1) / top.pow(2).sum(1).clamp_min(1e-12)).mean()
               for P, h in zip(state["net"], p.hs))


def _value_grad(V, l, h, e, create_graph=False):
    """V(h, l, e) per sample and dV/dh."""
    h = h.detach().requires_grad_(True)
    v = V(h, l, e)[:, 0]
    return v, torch.autograd.grad(v.sum(), h, create_graph=create_graph)[0]


def _cb_credits(model, state, p):
    return [_normalised(_value_grad(state["net"], l, h, p.e)[1], per_sample=False)
            for l, h in enumerate(p.hs)]


def _cb_loss(model, state, p):
    V, K, depth = state["net"], state["K"], len(p.hs) - 1
    v, dv = _value_grad(V, depth, p.hs[-1], p.e, create_graph=True)
    loss = ((v - F.cross_entropy(p.logits, p.y, reduction="none")).pow(2).mean()
            + state["tgw"] * (dv - p.g).pow(2).sum(1).mean())
    gen = _noise(state, p.g.device)
    lam = state["bridge_temp"]
    for l in range(depth):
        nxt = p.hs[l + 1]
        with torch.no_grad():   # the target network's soft-min over K noisy next states
            xi = torch.randn((K, *nxt.shape), generator=gen, dtype=nxt.dtype, device=nxt.device)
            noisy = (nxt + state["sigma"] * xi).flatten(0, 1)
            vals = state["target"](noisy, l + 1, p.e.repeat(K, 1))[:, 0].view(K, -1)
            target = -lam * (torch.logsumexp(-vals / lam, 0) - math.log(K))
        loss = loss + (V(p.hs[l], l, p.e)[:, 0] - target).pow(2).mean()
    return loss


def _cb_after(state):
    """The target network follows the value net by its momentum, after every step."""
    m = state["target_ema"]
    with torch.no_grad():
        for t, v in zip(state["target"].parameters(), state["net"].parameters()):
            t.mul_(m).add_(v, alpha=1 - m)


def _vec_credits(model, state, p, per_sample=False):
    with torch.no_grad():
        return [_normalised(state["net"](h, l, p.e), per_sample) for l, h in enumerate(p.hs)]


def _vec_loss(model, state, p):
    A, M, eps, n = state["net"], state["M"], state["eps"], len(p.y)
    gen = _noise(state, p.g.device)
    loss = 0.0
    for l, h in enumerate(p.hs):
        u = torch.randn((M, *h.shape), generator=gen, dtype=h.dtype, device=h.device)
        u = u / u.norm(dim=2, keepdim=True)
        with torch.no_grad():   # the loss run forward from h_l +- eps u (one batch)
            z = torch.cat([h + eps * u, h - eps * u]).flatten(0, 1)
            for block in model.blocks[l:]:
                z = block(z)
            cost = F.cross_entropy(model.readout(z), p.y.repeat(2 * M), reduction="none")
            cost = cost.view(2, M, n)
            delta = (cost[0] - cost[1]) / (2 * eps)
        loss = loss + ((A(h, l, p.e) * u).sum(2) - delta).pow(2).sum() / n
    top = A(p.hs[-1], len(p.hs) - 1, p.e)
    return loss + state["terminal_weight"] * (top - p.g).pow(2).sum() / n


def _blend_credits(model, state, p):
    alpha = state["alpha"]
    return [alpha * a + (1 - alpha) * (p.e @ B)
            for a, B in zip(_vec_credits(model, state, p, per_sample=True), state["feedback"])]


def _estimator_step(credits, aux_loss, after=None):
    """An estimator rule's step: the block-local update from its credits, and its estimator's
    loss gradient, both taken before the one optimizer step (then ``after(state)``)."""
    def step(model, state, opt, x, y):
        opt.zero_grad(set_to_none=True)
        p = _forward(model, x, y)
        _local_update(p, credits(model, state, p))
        aux_loss(model, state, p).backward()   # reaches the estimator's parameters only
        state["step"] += 1
        opt.step()
        if after is not None:
            after(state)
    return step


STEPS = {"bp": bp_step, "frozen": frozen_step, "dfa": dfa_step,
         "fa_layerwise": fa_layerwise_step, "fa_blockwise": fa_blockwise_step, "ep": ep_step,
         "usf": usf_step, "frsf": frsf_step, "brsf": brsf_step, "kp": kp_step, "drtp": drtp_step,
         "sb": _estimator_step(_sb_credits, _sb_loss),
         "cb": _estimator_step(_cb_credits, _cb_loss, _cb_after),
         "vec": _estimator_step(_vec_credits, _vec_loss),
         "blend": _estimator_step(_blend_credits, _vec_loss)}


def make_state(name: str, model, num_classes: int, generator=None, **options):
    """The rule's state for a fresh run on ``model``: feedback drawn from ``generator`` with
    lcredit's scales (dfa N(0, 1/d); fa blockwise N(0, 1/d); fa layerwise U(+-1/sqrt(fan_in))),
    estimators at torch's default init (the global RNG) in the model's dtype and device."""
    d, depth = model.blocks[0].fc1.in_features, len(model.blocks)
    like = next(model.parameters())
    if name in ("bp", "frozen", "usf"):
        return None
    if name in ("dfa", "drtp"):
        return [torch.randn(num_classes, d, generator=generator).to(like) * d**-0.5
                for _ in range(depth + 1)]
    if name == "fa_blockwise":
        return [torch.randn(d, d, generator=generator).to(like) * d**-0.5 for _ in range(depth)]
    if name == "fa_layerwise":
        return {m: (torch.rand(m.weight.shape, generator=generator).to(like) * 2 - 1)
                * m.weight.shape[1] ** -0.5 for b in model.blocks for m in (b.fc1, b.fc2)}
    if name == "frsf":
        return {m: M.abs() for m, M in make_state("fa_layerwise", model, num_classes,
                                                   generator).items()}
    if name == "brsf":
        return {"magnitude": make_state("frsf", model, num_classes, generator),
                "seed": options.get("seed", 0), "step": options.get("step", 0)}
    if name == "kp":
        state = dict(DEFAULTS["kp"], **options)
        state["feedback"] = make_state("fa_layerwise", model, num_classes, generator)
        return state
    state = dict(DEFAULTS[name], **({"seed": 0, "step": 0} if name in ESTIMATORS else {}))
    unknown = set(options) - set(state)
    if unknown:
        raise ValueError(f"{name}: no option {sorted(unknown)}")
    state.update(options)
    if name == "sb":
        width = state["width"]
        state["net"] = nn.ModuleList(Predictor(d, num_classes, width) for _ in range(depth))
    elif name in ESTIMATORS:
        out = 1 if name == "cb" else d
        state["net"] = ConcatNet(d, num_classes, depth, state["width"], out)
    if "net" in state:
        state["net"].to(like)
    if name == "cb":  # the bridge's target network starts as a copy of the value net
        state["target"] = copy.deepcopy(state["net"]).requires_grad_(False)
    if name == "blend":
        state["feedback"] = make_state("dfa", model, num_classes, generator)
    return state


def param_groups(name: str, model, state):
    """The optimizer's groups: the model's trained parameters (frozen: embedding and readout),
    and an estimator's at its own learning rate."""
    if name == "frozen":
        groups = [{"params": [*model.embed.parameters(), *model.readout.parameters()]}]
    else:
        groups = [{"params": list(model.parameters())}]
    if name in ESTIMATORS:
        groups.append({"params": list(state["net"].parameters()), "lr": state["aux_lr"]})
    return groups


def trained_parameters(rule: str, model):
    """The model's parameters the rule's optimizer holds (``param_groups``' first group)."""
    return param_groups(rule, model, None)[0]["params"]
