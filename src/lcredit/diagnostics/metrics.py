"""Per-layer credit-quality metrics (docs/metrics.md): pure functions of tensors and a block model.

Conventions: ``states`` are h_0..h_L; ``credits`` and ``grads`` are per-sample credit (an
estimate of d(per-sample loss)/dh_l, see ``lcredit.rules.base``) — BP's is ``B * g_l``. All
reductions run in float64. A cosine is never clamped: where a norm is zero or underflows the
value is missing (NaN) and the reason is recorded.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lcredit.models.base import run_blocks

# Below this a norm is treated as underflowed: a cosine against it is noise, not alignment.
TINY = 1e-30


def row_norms(t: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm over all feature dims (``t.norm(-1)`` would be the p=-1 norm of the
    whole tensor, and ``t.norm(dim=-1)`` only the last dim of a token sequence)."""
    return t.detach().double().flatten(1).norm(dim=1)


def mean_row_norm(t: torch.Tensor) -> float:
    return float(row_norms(t).mean())


def row_cosines(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-sample cosine in float64; NaN where either norm is zero or underflows.

    Returns the cosines and how many were missing.
    """
    a64, g64 = a.detach().double().flatten(1), g.detach().double().flatten(1)
    na, ng = a64.norm(dim=1), g64.norm(dim=1)
    ok = (na > TINY) & (ng > TINY) & torch.isfinite(na) & torch.isfinite(ng)
    cos = torch.full_like(na, math.nan)
    cos[ok] = (a64[ok] * g64[ok]).sum(1) / (na[ok] * ng[ok])
    return cos, int((~ok).sum())


def flat_cosine(a: torch.Tensor, g: torch.Tensor) -> float:
    """Cosine of the whole batch flattened into one vector (the 'batch-flattened' aggregation)."""
    a64, g64 = a.detach().double().flatten(), g.detach().double().flatten()
    na, ng = a64.norm(), g64.norm()
    if not (na > TINY and ng > TINY):
        return math.nan
    return float(a64 @ g64 / (na * ng))


def forward_from(model, l: int, h: torch.Tensor) -> torch.Tensor:
    """Logits obtained by running the rest of the network forward from h_l."""
    return model.readout(run_blocks(model, h, start=l)[-1])


def per_sample_loss(model, l, h, y, loss_fn) -> torch.Tensor:
    return loss_fn(forward_from(model, l, h), y)


def ce_per_sample(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def perturbation_pairs(model, l, h, a, y, *, directions=32, eps=1e-3, generator=None,
                       loss_fn=ce_per_sample) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted, real) loss changes for ``directions`` random deltas of norm eps per sample:
    ``<a_l, delta>`` and ``loss(forward from h_l + delta) - loss(forward from h_l)``, each of
    shape (directions, samples). All directions of the batch go through the network as one
    batch."""
    n = h.shape[0]
    hd, ad = h.detach().double(), a.detach().double()
    delta = torch.randn((directions, *hd.shape), generator=generator, dtype=hd.dtype,
                        device="cpu").to(hd.device)
    delta = delta * (eps / delta.flatten(2).norm(dim=2).clamp_min(TINY))[..., None].view(
        directions, n, *([1] * (hd.ndim - 1)))
    with torch.no_grad():
        base = per_sample_loss(model, l, hd, y, loss_fn)
        moved = per_sample_loss(model, l, (hd[None] + delta).flatten(0, 1),
                                y.repeat(directions, *([1] * (y.ndim - 1))),
                                loss_fn).view(directions, n)
    real = moved - base[None]
    pred = (ad[None] * delta).flatten(2).sum(2)
    return pred, real


def perturbation_correlation(model, l, h, a, y, *, directions=32, eps=1e-3, generator=None,
                             loss_fn=ce_per_sample) -> float:
    """rho_l on one batch: Pearson correlation of ``perturbation_pairs``. Uses no cosine."""
    pred, real = perturbation_pairs(model, l, h, a, y, directions=directions, eps=eps,
                                    generator=generator, loss_fn=loss_fn)
    return pearson(pred.flatten(), real.flatten())


def pearson_jackknife(pred: torch.Tensor, real: torch.Tensor, groups: int = 16):
    """Pearson correlation of all (directions, samples) pairs and its jackknife standard error
    over ``groups`` disjoint sets of samples. The directions of one sample share its credit and
    gradient, so its pairs are not independent: the error is resampled over samples, not pairs."""
    r = pearson(pred.flatten(), real.flatten())
    n = pred.shape[1]
    groups = min(groups, n)
    if groups < 2:
        return r, math.nan
    ids = torch.arange(n, device=pred.device) % groups
    loo = [pearson(pred[:, ids != g].flatten(), real[:, ids != g].flatten())
           for g in range(groups)]
    loo = torch.tensor(loo, dtype=torch.float64)
    se = float(((groups - 1) / groups * (loo - loo.mean()).pow(2).sum()).sqrt())
    return r, se


def pearson(u: torch.Tensor, v: torch.Tensor) -> float:
    u, v = u.double() - u.double().mean(), v.double() - v.double().mean()
    den = u.norm() * v.norm()
    if not den > TINY:
        return math.nan
    return float((u @ v) / den)


def nudge(model, l, h, a, y, *, step=1e-2, loss_fn=ce_per_sample) -> float:
    """Mean real change of the loss when each h_l moves by ``step * ||h_l||`` against its
    normalised credit (negative: following the credit lowers the loss)."""
    hd, ad = h.detach().double(), a.detach().double()
    an = row_norms(ad)
    ok = an > TINY
    if not ok.any():
        return math.nan
    shape = (-1, *([1] * (hd.ndim - 1)))
    move = (step * row_norms(hd) / an.clamp_min(TINY)).view(shape) * ad
    with torch.no_grad():
        base = per_sample_loss(model, l, hd, y, loss_fn)
        moved = per_sample_loss(model, l, hd - move, y, loss_fn)
    return float((moved - base)[ok].mean())


def pairwise_mean_cosine(vectors: list[torch.Tensor]) -> float:
    """Mean cosine over all pairs (the cross-batch direction stability of diagnostic (c))."""
    vs = [v.double().flatten() for v in vectors]
    norms = [v.norm() for v in vs]
    vals = []
    for i in range(len(vs)):
        for j in range(i + 1, len(vs)):
            if norms[i] > TINY and norms[j] > TINY:
                vals.append(float(vs[i] @ vs[j] / (norms[i] * norms[j])))
    return sum(vals) / len(vals) if vals else math.nan
