"""Measure every per-layer metric of docs/metrics.md for one model and one credit source."""
from __future__ import annotations

import contextlib
import copy
import math
import statistics

import torch

from lcredit.diagnostics import metrics as M
from lcredit.models.base import exact_credit, hidden_states
from lcredit.rules.update import local_update_gradients

# docs/metrics.md: rho on 1024 samples x 32 directions (pooled over as many evaluation batches as it
# takes), null_gamma from 20 fresh feedback draws.
DEFAULTS = dict(rho_samples=1024, rho_directions=32, rho_eps=1e-3, nudge_step=1e-2,
                null_draws=20, seed=0)


def evaluation_batches(x, y, eval_batches: int, stability_batches: int, batch_size: int,
                       seed: int = 0, rho_samples: int = 0):
    """The fixed evaluation batches: (metrics, stability (c), rho's pool) — the same training
    samples at every measurement and in a post-hoc audit, a function of the data and ``seed``
    only. rho pools ``rho_samples`` samples from as many of these batches as that takes, so its
    sample count does not depend on the batch size that (b) and (c) use."""
    rho_batches = -(-int(rho_samples) // batch_size)
    n = min(len(x), max(eval_batches, stability_batches, rho_batches) * batch_size)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(int(seed)))[:n]
    order = order.to(x.device)
    batches = [(x[order[i:i + batch_size]], y[order[i:i + batch_size]])
               for i in range(0, n, batch_size)]
    return batches[:eval_batches], batches[:stability_batches], batches[:max(rho_batches, 1)]


def copy_without_trainer(obj):
    """A deep copy of a module, rule or user's LightningModule (or a view holding one) without
    the Lightning Trainer any LightningModule in it refers to."""
    parts = obj.modules() if isinstance(obj, torch.nn.Module) else [obj]
    held = [(m, m._trainer) for m in parts if getattr(m, "_trainer", None) is not None]
    for m, _ in held:
        m._trainer = None
    try:
        return copy.deepcopy(obj)
    finally:
        for m, trainer in held:
            m._trainer = trainer


def measuring_copy(obj, dtype=torch.float64):
    """An eval-mode deep copy of a model or rule in ``dtype`` (no Trainer copied)."""
    return copy_without_trainer(obj).to(dtype).eval()


class MeasuringCopy:
    """One float64 eval copy of a model, refreshed from its weights at each use instead of
    copied anew: the every-epoch cheap measurement's copy costs a state-dict load, not a
    deepcopy."""

    def __init__(self):
        self.net = None

    def __call__(self, model):
        if self.net is None:
            # the norms and g_l need gradients with respect to the states only: no parameter
            # gradient is computed (the backward costs about half)
            self.net = measuring_copy(model).requires_grad_(False)
        else:
            self.net.load_state_dict(model.state_dict())
        return self.net


def _is_rule(obj) -> bool:
    return hasattr(obj, "credit") and hasattr(obj, "model") and hasattr(obj, "compute_gradients")


def fresh_feedback_copies(rule, draws: int, generator: torch.Generator):
    """Copies of ``rule`` with its fixed random feedback redrawn (``draw_feedback``): what
    alignment looks like by chance. None for a rule whose credit is not its feedback (a learned
    estimator keeps DFA's feedback only as a fallback): it gets a DFA null."""
    if not hasattr(rule, "draw_feedback") or not getattr(rule, "credit_is_feedback", True):
        return None
    if hasattr(rule, "feedback_draws"):  # the draws' credit in one pass, no copies (dfa)
        return rule.feedback_draws(draws, generator)
    out = []
    for _ in range(draws):
        c = copy.deepcopy(rule)
        c.draw_feedback(generator)
        out.append(c)
    return CopiedDraws(out)


class CopiedDraws(list):
    """Copies of a rule with redrawn feedback; their credit one copy at a time (fa: each draw
    is its own backward chain)."""

    def credit_sets(self, x, y):
        return [c.credit(x, y) for c in self]


def dfa_null(model, x, y, states, loss_fn, generator):
    with torch.enable_grad():
        logits = model.readout(states[-1]).detach().requires_grad_(True)
        e = torch.autograd.grad(loss_fn(logits, y).sum(), logits)[0]
    out = []
    for h in states:
        dim = h[0].numel()
        B = torch.randn(e.shape[1], dim, generator=generator, dtype=torch.float64) / dim**0.5
        out.append((e.double() @ B.to(e.device)).view_as(h))
    return out


def block_update_directions(source, model, batches, loss_fn):
    """Per-block parameter-gradient vectors of the rule's update on each batch."""
    vecs = []
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        if _is_rule(source):
            source.aux_training = False  # a measuring copy: no step of its estimator
            with torch.enable_grad():
                source.compute_gradients(x, y)
        else:  # the shared block-local surrogate with the function's credit
            params = [q for b in model.blocks for q in b.parameters()]
            grads = local_update_gradients(model, x, source(model, x, y), params)
            for q, g in zip(params, grads):
                q.grad = g
        per_block = []
        for block in model.blocks:
            gs = [p.grad.flatten() for p in block.parameters() if p.grad is not None]
            per_block.append(torch.cat(gs) if gs else None)
        vecs.append(per_block)
        model.zero_grad(set_to_none=True)
    return vecs


def measure(model, batches, credit=None, *, loss_fn=None, costate=None,
            stability_batches=None, rho_batches=None, model_is_copy: bool = False,
            **opts) -> dict:
    """All per-layer metrics, aggregates and the raw values the protocol judges.

    ``model``: any module with embed / blocks / readout. ``batches``: list of (x, y).
    ``credit``: a rule (anything with ``credit(x, y)``, ``model``, ``compute_gradients``), a
    function ``fn(model, x, y) -> [a_0..a_L]`` called with the float64 copy, or None.
    ``costate``: optional ``fn(model, x, y) -> [p_0..p_L]``, a task's exact adjoint.
    ``rho_batches``: where rho pools its ``rho_samples`` from (default: ``batches``); fewer
    samples than asked for are used as they are and said so in the notes, never silently.
    ``model_is_copy``: ``model`` is already a float64 eval copy the measurement may use as it
    is (``MeasuringCopy``).
    """
    o = DEFAULTS | opts
    if loss_fn is None:  # a rule knows its task's loss (cross-entropy, or lq's quadratic cost)
        loss_fn = credit.per_sample_loss if _is_rule(credit) else M.ce_per_sample
    if costate is None and _is_rule(credit):
        costate = getattr(credit, "costate", None)
    batches = list(batches)
    if not batches:
        raise ValueError("diagnose: no evaluation batches given")
    source = measuring_copy(credit) if _is_rule(credit) else credit
    net = (source.model if _is_rule(source) else model if model_is_copy else
           measuring_copy(model))
    # (c) compares update directions, not credit against a gradient: float32 is ample there
    # and halves its cost (it runs the rule's full update K times).
    orig = next((credit.model if _is_rule(credit) else model).parameters()).dtype
    sdt = torch.float64 if orig == torch.float64 else torch.float32
    stab_source = measuring_copy(credit, sdt) if _is_rule(credit) else credit
    stab_net = (stab_source.model if _is_rule(stab_source) else
                measuring_copy(model, sdt) if credit is not None else None)  # no credit: no (c)
    gen = torch.Generator().manual_seed(int(o["seed"]))
    dev = next(net.parameters()).device
    batches = [(x.to(dev).double(), y.to(dev)) for x, y in batches]
    rho_batches = batches if rho_batches is None else [(x.to(dev).double(), y.to(dev))
                                                       for x, y in rho_batches]
    nulls = fresh_feedback_copies(source, o["null_draws"], gen) if _is_rule(source) else None

    # Never under an outer autocast: the diagnostics are float64 whatever the training runs in.
    ac = torch.autocast(dev.type, enabled=False) if dev.type in ("cuda", "cpu") else contextlib.nullcontext()
    with ac:
        return _measure(net, source, batches, nulls, loss_fn, costate, stability_batches, gen, o,
                        stab_source, stab_net, rho_batches)


def pooled_rho(net, source, batches, loss_fn, gen, samples: int, directions: int, eps: float):
    """rho_l for every layer from ``samples`` samples x ``directions`` directions, pooled over
    as many of ``batches`` as it takes (one Pearson correlation over all the pairs). Returns
    ([(rho, its jackknife standard error) per layer], samples used)."""
    pairs, used = None, 0
    for x, y in batches:
        if used >= samples:
            break
        k = min(samples - used, len(y))
        x, y = x[:k], y[:k]
        states = [h.detach() for h in hidden_states_nograd(net, x)]
        credits = source.credit(x, y) if _is_rule(source) else source(net, x, y)
        got = [M.perturbation_pairs(net, l, states[l], credits[l], y, directions=directions,
                                    eps=eps, generator=gen, loss_fn=loss_fn)
               for l in range(len(states))]
        pairs = got if pairs is None else [(torch.cat([p[0], g[0]], 1), torch.cat([p[1], g[1]], 1))
                                           for p, g in zip(pairs, got)]
        used += k
    return [M.pearson_jackknife(*p) for p in pairs], used


def hidden_states_nograd(net, x):
    with torch.no_grad():
        return hidden_states(net, x)


def _measure(net, source, batches, nulls, loss_fn, costate, stability_batches, gen, o,
             stab_source=None, stab_net=None, rho_batches=None):
    acc = _per_sample(net, source, batches, nulls, loss_fn, costate, gen, o)
    rho, rho_used = None, 0
    if source is not None:
        rho, rho_used = pooled_rho(net, source, rho_batches or batches, loss_fn, gen,
                                   int(o["rho_samples"]), int(o["rho_directions"]),
                                   float(o["rho_eps"]))
    layers = [_layer_row(l, acc, rho, source is not None) for l in range(len(net.blocks) + 1)]
    out = _summary(net, layers, acc, batches, nulls, rho_used, o, source is not None)
    if source is not None:
        sb = stability_batches if stability_batches is not None else batches
        out["stability"] = stability(stab_source, stab_net, sb, loss_fn)
        if math.isnan(out["stability"]["value"]):
            out["notes"].append("direction stability: the rule made no block update")
    else:
        out["stability"] = {"value": math.nan, "per_block": [], "k": 0}
    return out


def _per_sample(net, source, batches, nulls, loss_fn, costate, gen, o) -> dict:
    """Over the evaluation batches, per layer: the norms of h_l and of backprop's g_l, and
    (with a credit source) the cosines of a_l with g_l, with the chance level's draws and the
    task's exact costate, the flattened (a_l, g_l) pairs, and the nudge on the first batch."""
    n_layers = len(net.blocks) + 1
    acc = {k: [[] for _ in range(n_layers)] for k in
           ("norm", "gnorm", "cos", "null", "costate", "flat")}
    acc["missing"] = [0] * n_layers
    acc["nonfinite"] = [0] * n_layers  # samples whose h_l or g_l is not finite (diverged)
    acc["nudge"] = None
    for bi, (x, y) in enumerate(batches):
        states, grads = exact_credit(net, x, y, lambda o, t: loss_fn(o, t).mean())
        n = x.shape[0]
        for l in range(n_layers):
            bad = ~(torch.isfinite(states[l].flatten(1)).all(1) & torch.isfinite(grads[l].flatten(1)).all(1))
            acc["nonfinite"][l] += int(bad.sum())
            acc["norm"][l].append(M.row_norms(states[l]))
            acc["gnorm"][l].append(M.row_norms(grads[l]) / n)  # batch-mean CE, as in training
        if source is None:
            continue
        credits = source.credit(x, y) if _is_rule(source) else source(net, x, y)
        if len(credits) != n_layers:
            raise ValueError(f"diagnose: credit gave {len(credits)} tensors for {n_layers} "
                             f"hidden states h_0..h_{n_layers - 1}")
        for l in range(n_layers):
            cos, miss = M.row_cosines(credits[l], grads[l])
            acc["cos"][l].append(cos)
            acc["missing"][l] += miss
            acc["flat"][l].append((credits[l].detach().double().flatten(),
                                   grads[l].double().flatten()))
        if bi == 0:  # the chance level needs no more than one batch per draw
            null_sets = (nulls.credit_sets(x, y) if nulls is not None else
                         [dfa_null(net, x, y, states, loss_fn, gen)
                          for _ in range(o["null_draws"])])
            for l in range(n_layers):
                acc["null"][l].append(torch.stack([M.row_cosines(ns[l], grads[l])[0]
                                                   for ns in null_sets]))
        if costate is not None:
            exact = costate(net, x, y)
            for l in range(n_layers):
                acc["costate"][l].append(M.row_cosines(credits[l], exact[l])[0])
        if bi == 0:
            acc["nudge"] = [M.nudge(net, l, states[l], credits[l], y, step=o["nudge_step"],
                                    loss_fn=loss_fn) for l in range(n_layers)]
    return acc


def _layer_row(l: int, acc: dict, rho, with_credit: bool) -> dict:
    """docs/metrics.md's per-layer row from the accumulated samples."""
    row = {"layer": l,
           "hidden_norm": float(torch.cat(acc["norm"][l]).mean()),
           "bp_grad_norm": float(torch.cat(acc["gnorm"][l]).mean())}
    if not with_credit:
        return row
    row["gamma"] = _nanmean(torch.cat(acc["cos"][l]))
    row["gamma_missing"] = acc["missing"][l]
    a = torch.cat([f[0] for f in acc["flat"][l]])
    g = torch.cat([f[1] for f in acc["flat"][l]])
    row["gamma_flat"] = M.flat_cosine(a, g)
    row["rho"], row["rho_se"] = rho[l]
    row["nudge"] = acc["nudge"][l]
    nulls_l = torch.cat(acc["null"][l], dim=1)  # draws x samples
    per_draw = [v for v in (_nanmean(d) for d in nulls_l) if math.isfinite(v)]
    row["null_gamma"] = statistics.fmean(per_draw) if per_draw else math.nan
    row["null_gamma_std"] = statistics.stdev(per_draw) if len(per_draw) > 1 else math.nan
    if acc["costate"][l]:
        row["costate_cosine"] = _nanmean(torch.cat(acc["costate"][l]))
    return row


def _summary(net, layers, acc, batches, nulls, rho_used, o, with_credit: bool) -> dict:
    """The measurement's whole-network values (growth, aggregates) and its notes."""
    depth = len(net.blocks)
    out = {"layers": layers, "depth": depth, "n_samples": sum(len(y) for _, y in batches),
           "notes": []}
    for l, bad in enumerate(acc["nonfinite"]):
        if bad:
            layers[l]["missing"] = (f"h_{l} or its gradient is not finite in {bad} of "
                                    f"{out['n_samples']} samples")
            out["notes"].append(f"layer {l}: {layers[l]['missing']}; its metrics are missing "
                                f"(a diverged model has no credit to measure)")
    if with_credit:
        out["rho_samples"], out["rho_directions"] = rho_used, int(o["rho_directions"])
        out["null_draws"] = len(nulls) if nulls is not None else int(o["null_draws"])
        if rho_used < int(o["rho_samples"]):
            out["notes"].append(f"rho: pooled {rho_used} of the {int(o['rho_samples'])} samples "
                                f"asked for (x {int(o['rho_directions'])} directions): the "
                                f"evaluation batches hold no more")
    norms = [r["hidden_norm"] for r in layers]
    ratios = [norms[l + 1] / norms[l] if norms[l] > M.TINY else math.inf for l in range(depth)]
    out["residual_growth"] = max(ratios) if ratios else math.nan
    out["residual_growth_per_block"] = ratios
    out["bp_grad_norm_top"] = layers[-1]["bp_grad_norm"]
    out["aggregates"] = aggregates(layers) if with_credit else {}
    for r in layers if with_credit else []:
        if r["gamma_missing"]:
            out["notes"].append(
                f"gamma_l{r['layer']}: {r['gamma_missing']} of {out['n_samples']} samples "
                f"missing (credit or gradient norm zero, underflowed or not finite)")
        if math.isnan(r["gamma"]):
            out["notes"].append(f"gamma_l{r['layer']} is missing: no sample had both norms "
                                f"finite and above {M.TINY:g}")
    return out


def stability(source, net, batches, loss_fn) -> dict:
    p = next(net.parameters())
    batches = [(x.to(p.device, p.dtype), y.to(p.device)) for x, y in batches]
    if len(batches) < 2:
        return {"value": math.nan, "per_block": [], "k": len(batches)}
    vecs = block_update_directions(source, net, batches, loss_fn)
    per_block = []
    for l in range(len(net.blocks)):
        vs = [v[l] for v in vecs if v[l] is not None]
        per_block.append(M.pairwise_mean_cosine(vs) if len(vs) > 1 else math.nan)
    whole = [torch.cat([b for b in v if b is not None]) for v in vecs
             if any(b is not None for b in v)]
    value = M.pairwise_mean_cosine(whole) if len(whole) > 1 else math.nan
    return {"value": value, "per_block": per_block, "k": len(batches),
            "batch_size": len(batches[0][1])}


def _nanmean(t: torch.Tensor) -> float:
    t = t.double()
    ok = ~torch.isnan(t)
    return float(t[ok].mean()) if ok.any() else math.nan


def aggregates(layers: list[dict]) -> dict:
    L = len(layers) - 1
    deep = [r for r in layers if r["layer"] >= 1]
    hidden = [r for r in layers if 1 <= r["layer"] <= L - 1]

    def mean(rows, key):
        vals = [r[key] for r in rows if key in r and not math.isnan(r[key])]
        return sum(vals) / len(vals) if vals else math.nan

    def median(rows, key):
        vals = [r[key] for r in rows if key in r and not math.isnan(r[key])]
        return statistics.median(vals) if vals else math.nan

    # gamma_hidden first: the layers no rule receives exact credit for (docs/metrics.md).
    # *_all: the mean over every layer 0..L, the aggregation the original study reports
    # ("layer-mean across all" hidden states), so its numbers can be set beside lcredit's;
    # gamma_flat_all with each layer's cosine over the whole batch flattened, the reading of the
    # original's Gamma that docs/reproduction.md compares (Gamma ~ rho for every rule it reports).
    agg = {"gamma_hidden": mean(hidden, "gamma"), "gamma_0": layers[0]["gamma"],
           "gamma_all": mean(layers, "gamma"), "gamma_flat_all": mean(layers, "gamma_flat"),
           "rho_all": mean(layers, "rho"),
           "nudge_all": mean(layers, "nudge"),
           "gamma_deep": mean(deep, "gamma"), "gamma_deep_median": median(deep, "gamma"),
           "gamma_flat_deep": mean(deep, "gamma_flat"), "rho_0": layers[0]["rho"],
           "rho_deep": mean(deep, "rho"), "nudge_deep": mean(deep, "nudge"),
           "null_gamma_deep": mean(deep, "null_gamma")}
    if "costate_cosine" in layers[0]:
        agg["costate_cosine_deep"] = mean(deep, "costate_cosine")
        agg["costate_cosine_all"] = mean(layers, "costate_cosine")
    return agg
