"""The toy linear-quadratic task: regression by linear residual dynamics, with an exact costate.

The learner is a ResMLP with identity activation and no LayerNorm, so block l is
``h_{l+1} = h_l + A_l h_l + c_l`` with ``A_l = W2 W1``; the terminal cost is
``1/2 ||W h_L + b - y||^2``. The adjoint is computed in closed form from the current weights —
``p_L = W^T (W h_L + b - y)``, ``p_l = (I + A_l)^T p_{l+1}`` — with matrix products only, so
credit quality is measured against a ground truth that shares no code with autograd.
"""
import torch
from torch import nn

from lcredit.data import Task
from lcredit.models.base import hidden_states
from lcredit.errors import ConfigError
from lcredit.options import Count, NonNegative, Seed, checked


def check_linear_resmlp(model) -> None:
    blocks = list(getattr(model, "blocks", []))
    ok = bool(blocks) and all(
        getattr(b, "residual", False) and isinstance(getattr(b, "ln", None), nn.Identity)
        and isinstance(getattr(b, "act", None), nn.Identity) for b in blocks)
    ok = ok and isinstance(getattr(model.readout, "ln", None), nn.Identity)
    if not ok:
        raise ConfigError(
            "data=lq needs linear residual dynamics: model=linear_resmlp (resmlp with "
            "act=identity, block_ln=false, out_ln=false, residual=true)")


@torch.no_grad()
def lq_costate(model, x, y):
    """Exact per-sample adjoint p_0..p_L of 1/2||W h_L + b - y||^2 (row-vector convention)."""
    hs = hidden_states(model, x)
    head = model.readout.head
    p = (head(hs[-1]) - y) @ head.weight
    out = [p]
    for block in reversed(list(model.blocks)):
        A = block.fc2.weight @ block.fc1.weight
        p = p + p @ A
        out.append(p)
    return out[::-1]


@checked("data")
def lq(d_in: Count = 16, d_out: Count = 8, n_train: Count = 4096, n_test: Count = 1024,
       noise: NonNegative = 0.0, seed: Seed = 0, fresh: bool = False) -> Task:
    """Targets y = T x (+ noise) for a fixed random T; Gaussian inputs. ``fresh``: every epoch
    trains on ``n_train`` new samples (a function of ``seed`` and the epoch; the epoch-0 set
    and the test set are the fixed ones), so a run of k steps sees k fresh batches."""
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(n_train + n_test, d_in, generator=g)
    T = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    y = x @ T.T + noise * torch.randn(n_train + n_test, d_out, generator=g)

    def resample(epoch: int):
        if epoch == 0:
            return x[:n_train], y[:n_train]
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + 7_919 * int(epoch)) % 2**63)
        fx = torch.randn(n_train, d_in, generator=gen)
        return fx, fx @ T.T + noise * torch.randn(n_train, d_out, generator=gen)

    return Task("lq", x[:n_train], y[:n_train], x[n_train:], y[n_train:], d_out, loss="mse",
                costate=lq_costate, check_model=check_linear_resmlp,
                resample=resample if fresh else None)
