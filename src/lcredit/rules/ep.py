"""Equilibrium propagation (Scellier & Bengio 2017) on the layered energy of docs/rules.md.

States ``s_0..s_L`` relax on

    E(s) = 1/2 ||s_0 - embed(x)||^2 + sum_l 1/2 ||s_{l+1} - F_l(s_l)||^2,    F_l = block l,

nudged by ``beta * C(s_L)`` with ``C`` the *sum* over the batch of the per-sample task loss of
``readout(s_L)`` (a sum, so every sample relaxes on its own and the credit comes out in
per-sample units). The free phase costs nothing: the forward pass ``s^0`` is where E = 0. The
credit is the nudged prediction error per unit nudge,

    a_l = -(s_l^beta - F_{l-1}(s_{l-1}^beta)) / beta,    a_0 = -(s_0^beta - embed(x)) / beta,

which at the nudged equilibrium obeys ``a_L = dC/ds_L`` and ``a_l = J_l^T a_{l+1}``: backprop's
chain, with the Jacobians taken at ``s^beta`` instead of ``s^0`` — so ``a_l`` tends to the
exact per-sample gradient as beta -> 0. Parameters follow Scellier & Bengio's
``(1/beta) dE/dtheta`` at ``s^beta`` (``update_at: nudged``, the default): for block l that is
the shared block-local update with the block evaluated at the nudged state,
``<F_l(sg s_l^beta), sg a_{l+1}>`` (with ``symmetric``, the mean of the two phases').
``update_at: free`` (lcredit's switch) takes ``dF_l/dtheta`` at the free state ``h_l = s_l^0``
instead, the forward pass every other rule uses: an O(beta) difference, of the order of the
credit's own bias, for one forward pass per block less.

``credit: displacement`` is the original study's variant: the raw state displacement
``a_l = -(s_l^beta - s_l^0) / beta`` (sign chosen so that following -a descends) as the credit.
For this energy it is not backprop's chain (it adds up the errors of all layers below), but it
is what EP papers that use the displacement, and the studies reproducing the original, measure.

Relaxation (``relax``):

- ``gd``: synchronous gradient descent on ``E + beta C`` (step ``eta``) from ``s^0``. Slow:
  eta ~0.1 needs several hundred to a thousand steps.
- ``sweep`` (default): block-coordinate steps from the top down. Each iteration sets
  ``s_L <- F_{L-1}(s_{L-1}) - beta dC/ds_L`` and then ``s_l <- F_{l-1}(s_{l-1}) + J_l^T e_{l+1}``
  (``e_{l+1} = s_{l+1} - F_l(s_l)``, ``s_0`` anchored at ``embed(x)``): each is a unit gradient
  step on the one state, using only its neighbours, so every update moves its state by exactly
  minus the gradient of ``E + beta C`` at the point it was made. The first L + 1 sweeps carry
  the nudge down and the states' response back up; they leave a residual of order beta (relative,
  as below), and every further L + 1 sweeps shrink it by about another such factor. The
  iteration is a fixed point of the nudged dynamics, not a descent with a step size: at large
  beta (~0.2 and up on a small ResMLP) it stops converging — use gd with a small eta there.

Residual (logged as ``ep/residual``): how far the final state is from the nudged equilibrium,
in credit units relative to the nudge itself,

    residual = max_l rms_b || d(E + beta C)/ds_l || / (|beta| rms_b || dC/ds_L ||),

``rms_b`` the root mean square over the batch of per-sample norms, both evaluated at the final
``s^beta``. Since ``-grad_l / beta = a_l - J_l^T a_{l+1}`` (and ``a_L - dC/ds_L`` on top), it is
the largest per-layer violation of backprop's recursion, as a fraction of the top credit's
scale: 0 at equilibrium, 1 when the violation is as large as the signal. ``tol`` stops a
relaxation once the gradient the last update followed is below ``tol`` by the same measure
(gd: the gradient at the current state; sweep: the largest move of the last sweep).
With ``symmetric`` the larger residual and iteration count of the two relaxations are logged.

``last_relaxation`` keeps the last relaxation's residual, iteration count and
``ep_displacement`` ``-(s_l^beta - s_l^0) / beta`` (not the credit for this energy: it adds up
the errors of all layers below; kept for comparison with EP papers that use it) with its
per-layer ``rms_b`` norms.
"""
from __future__ import annotations

import torch

from typing import Literal, get_args

from lcredit.errors import ConfigError
from lcredit.models.base import preserved_buffers
from lcredit.options import Count, NonNegative, Positive
from lcredit.rules.base import Pass, Rule
from lcredit.rules.update import at_least_fp32, no_autocast

Relaxation = Literal["sweep", "gd"]
RELAXATIONS = get_args(Relaxation)


def _rms(t: torch.Tensor) -> torch.Tensor:
    """Root mean square over the batch of the per-sample norms."""
    return t.pow(2).sum().div(t.shape[0]).sqrt()


Credit = Literal["prediction_error", "displacement"]
UpdatePoint = Literal["nudged", "free"]
CREDITS, UPDATE_POINTS = get_args(Credit), get_args(UpdatePoint)


class EP(Rule):
    name = "ep"
    # docs/rules.md: ep's default is the literature's EP (Scellier & Bengio); the original study's
    # variant, credit=displacement, is a departure from it that results.json names.
    ORIGINAL = {"update_at": "nudged", "credit": "prediction_error"}
    FORM_REFERENCE = ("the literature's EP (Scellier & Bengio); the original study's variant is "
                      "credit=displacement")

    def __init__(self, model, input_shape, num_classes, optimizer=None, penalty_lam=0.0,
                 beta: Positive = 0.01, T: Count = 30, eta: Positive = 0.1,
                 symmetric: bool = False, relax: Relaxation = "sweep", tol: NonNegative = 1e-2,
                 credit: Credit = "prediction_error", update_at: UpdatePoint = "nudged"):
        super().__init__(model, input_shape, num_classes, optimizer, penalty_lam)
        self.credit_kind, self.update_at = credit, update_at
        self.credit_form = credit  # the option's value, for form()
        self._points = None  # (pass, update points) from the last relaxation
        depth = len(self.model.blocks)
        if relax == "sweep" and T < depth + 1:
            # Fewer sweeps leave the states mid-transient: the credit is not even aligned.
            raise ConfigError(f"method.T={T} is too few for relax=sweep on {depth} blocks: the "
                              f"nudge needs at least L+1 = {depth + 1} sweeps (use ~2(L+1))")
        self.beta, self.T, self.eta = float(beta), int(T), float(eta)
        self.symmetric, self.relax, self.tol = bool(symmetric), relax, float(tol)
        # The last relaxation (credits excluded): residual, steps, ep_displacement.
        self.last_relaxation: dict | None = None
        self._pending = None  # (pass, credits) between top_credit and the layer_credit calls
        # Per-epoch sums of residual, steps, relaxations and the RMS of each layer's
        # ep_displacement, on device: no sync per step.
        self.register_buffer("_ep_sums", torch.zeros(3 + depth + 1, dtype=torch.float64),
                             persistent=False)

    # ---------------------------------------------------------------- credit interface
    def top_credit(self, p: Pass) -> torch.Tensor:
        # top_credit comes first in every pass: relax once, hand out the layers' credits after.
        credits = self.relaxation(p)
        self._pending = (p, credits)
        return credits[-1]

    def layer_credit(self, l: int, p: Pass, vjp) -> torch.Tensor:
        if self._pending is None or self._pending[0] is not p:
            self.top_credit(p)
        credits = self._pending[1]
        if l == 0:  # the last call of the pass: keep no tensors alive between steps
            self._pending = None
        return credits[l]

    def update_points(self, p: Pass):
        points, self._points = self._points, None
        if points is None or points[0] is not p:
            return None
        return points[1]

    # ---------------------------------------------------------------- the relaxation
    def relaxation(self, p: Pass) -> list[torch.Tensor]:
        """Credits a_0..a_L from the nudged phase(s) started at the free state ``p.states``;
        fills ``last_relaxation``. Touches no parameter gradient and no buffer."""
        dev = p.states[0].device
        with torch.enable_grad(), no_autocast(dev), preserved_buffers(self.model):
            free = [at_least_fp32(h.detach()) for h in p.states]
            phases = [self._nudged_phase(free, p.y, b)
                      for b in ((self.beta, -self.beta) if self.symmetric else (self.beta,))]
        # -(s^beta - s^-beta) / 2 beta is the mean of the two phases' -(s - s^0) / (+-beta).
        n = len(phases)
        key = "displacement" if self.credit_kind == "displacement" else "credits"
        credits = [sum(ph[key][l] for ph in phases) / n for l in range(len(free))]
        displacement = [sum(ph["displacement"][l] for ph in phases) / n
                        for l in range(len(free))]
        # (1/beta) dE/dtheta at s^beta is <F_l(s_l^beta), a_{l+1}> per block; symmetric: the
        # mean of the two phases' (their 1/(2 beta) (dE/dtheta(s^beta) - dE/dtheta(s^-beta))).
        self._points = (p, [(1.0 / n, ph["states"], ph[key]) for ph in phases]
                        if self.update_at == "nudged" else None)
        self.last_relaxation = {
            "residual": torch.stack([ph["residual"] for ph in phases]).max(),
            "steps": max(ph["steps"] for ph in phases),
            "ep_displacement": displacement,
            "ep_displacement_norm": [_rms(d) for d in displacement],
        }
        return credits

    def _nudged_phase(self, free, y, beta: float) -> dict:
        anchor = free[0]  # embed(x), as the forward pass computed it
        relax = self._gd if self.relax == "gd" else self._sweep
        s, steps = relax(free, anchor, y, beta)
        grads, errors, dc = self._energy_grad(s, anchor, y, beta)
        return {"credits": [-e / beta for e in errors], "states": [h.detach() for h in s],
                "displacement": [-(h - h0) / beta for h, h0 in zip(s, free)],
                "residual": self._relative(grads, dc, beta),
                "steps": steps}

    def _gd(self, s, anchor, y, beta):
        for step in range(self.T):
            grads, _, dc = self._energy_grad(s, anchor, y, beta)
            if self._converged(grads, dc, beta):
                return s, step
            s = [h - self.eta * g for h, g in zip(s, grads)]
        return s, self.T

    def _sweep(self, s, anchor, y, beta):
        blocks = list(self.model.blocks)
        depth = len(blocks)
        for step in range(1, self.T + 1):
            ins = [h.detach().requires_grad_(True) for h in s[:-1]]
            # One forward per block serves the whole top-down sweep: F_{l-1}(s_{l-1}) is read
            # before s_{l-1} moves, and J_l is taken at the old s_l.
            preds = [anchor] + [block(h) for block, h in zip(blocks, ins)]
            dc = self._cost_grad(s[-1], y)
            new = [None] * (depth + 1)
            new[depth] = preds[depth].detach() - beta * dc
            for l in reversed(range(depth)):
                e_above = new[l + 1] - preds[l + 1].detach()
                (back,) = torch.autograd.grad(preds[l + 1], ins[l], e_above)
                new[l] = preds[l].detach() + back
            moves = [a - b for a, b in zip(new, s)]
            s = new
            # The nudge reaches s_0 in one sweep but its effect on the states climbs back one
            # layer per sweep: no sweep before the (L+1)-th can be converged (skip the check
            # and its host sync).
            if step > depth and self._converged(moves, dc, beta):
                return s, step
        return s, self.T

    def _cost_grad(self, s_top: torch.Tensor, y) -> torch.Tensor:
        """dC/ds_L, C the per-sample loss summed over the batch."""
        top = s_top.detach().requires_grad_(True)
        cost = self.per_sample_loss(self.model.readout(top), y).sum()
        return torch.autograd.grad(cost, [top])[0]

    def _energy_grad(self, s, anchor, y, beta):
        """(d(E + beta C)/ds_l for all l, errors e_l = s_l - F_{l-1}(s_{l-1}), dC/ds_L)."""
        leaves = [h.detach().requires_grad_(True) for h in s]
        preds = [anchor] + [block(h) for block, h in zip(self.model.blocks, leaves[:-1])]
        errors = [h - pred for h, pred in zip(leaves, preds)]
        energy = 0.5 * sum(e.pow(2).sum() for e in errors)
        # Gradients for the states only: nothing reaches a parameter's .grad.
        grads = list(torch.autograd.grad(energy, leaves))
        dc = self._cost_grad(s[-1], y)
        grads[-1] = grads[-1] + beta * dc
        return grads, [e.detach() for e in errors], dc

    @staticmethod
    def _relative(vecs, dc, beta: float) -> torch.Tensor:
        """max_l rms_b ||v_l|| / (|beta| rms_b ||dC/ds_L||): credit units, relative to the nudge."""
        scale = abs(beta) * _rms(dc)
        worst = torch.stack([_rms(v) for v in vecs]).max()
        return worst / scale.clamp_min(torch.finfo(scale.dtype).tiny)

    def _converged(self, vecs, dc, beta: float) -> bool:
        # tol = 0 runs all T iterations without a host sync per iteration.
        return self.tol > 0 and float(self._relative(vecs, dc, beta)) < self.tol

    # ---------------------------------------------------------------- logging
    def compute_gradients(self, x, y):
        out = super().compute_gradients(x, y)
        r, sums = self.last_relaxation, self._ep_sums
        sums[0] += r["residual"].to(sums.dtype)
        sums[1] += r["steps"]
        sums[2] += 1
        sums[3:] += torch.stack(r["ep_displacement_norm"]).to(sums.dtype)
        return out

    def _epoch_means(self) -> dict | None:
        residual, steps, n, *disp = self._ep_sums.tolist()
        return {"residual": residual / n, "steps": steps / n,
                "displacement": [d / n for d in disp]} if n else None

    def on_validation_epoch_end(self):
        rows = len(self.history)
        super().on_validation_epoch_end()
        means = self._epoch_means()
        # Validation ends the training epoch before on_train_epoch_end resets the sums.
        if len(self.history) > rows and means is not None:
            self.history[-1].update(ep_residual=means["residual"], ep_steps=means["steps"],
                                    ep_displacement=means["displacement"])

    def on_train_epoch_end(self):
        super().on_train_epoch_end()
        means = self._epoch_means()
        if means is not None:
            self.log("ep/residual", means["residual"])
            self.log("ep/steps", means["steps"])
            for l, d in enumerate(means["displacement"]):
                self.log(f"ep/displacement/l{l}", d)
        self._ep_sums.zero_()
