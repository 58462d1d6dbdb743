"""Credit bridge: a value network whose input-gradient is the credit (SPEC §3)."""
import torch

from lcredit.errors import check_range
from lcredit.rules.base import Pass, at_least_fp32
from lcredit.rules.estimator import CreditNet, Estimator, per_sample_sq


class CB(Estimator):
    name = "cb"
    default_warmup = 0.2

    def __init__(self, model, input_shape, num_classes, optimizer=None, penalty_lam=0.0,
                 feedback_std=None, s_type="eT", width=256, aux_lr=1e-3, credit_norm=True,
                 warmup_ratio=None, prefit_epochs=0, periodic_refit=None, topdown=None,
                 tgw=1.0, K=4, sigma=0.05):
        super().__init__(model, input_shape, num_classes, optimizer, penalty_lam, feedback_std,
                         s_type, width, aux_lr, credit_norm, warmup_ratio, prefit_epochs,
                         periodic_refit, topdown)
        check_range("method.tgw", tgw, 0.0)
        check_range("method.K", K, 1)
        check_range("method.sigma", sigma, 0.0)
        self.tgw, self.K, self.sigma = float(tgw), int(K), float(sigma)
        self.value = CreditNet(self.dims, self.cond_dim(), self.width, out="scalar")

    def value_and_grad(self, l, h, s, create_graph=False):
        """V(h, l, s) per sample and dV/dh (the credit)."""
        h = h.detach().requires_grad_(True)
        v = self.value(at_least_fp32(h), l, s)
        # The value itself is trained too: keep its graph past the gradient.
        g = torch.autograd.grad(v.sum(), h, create_graph=create_graph, retain_graph=True)[0]
        return v, g

    def estimator_credit(self, l, p: Pass):
        return self.value_and_grad(l, p.states[l], self.condition(p))[1]

    def estimator_loss(self, p: Pass):
        losses = self.loss_terms(p, self.condition(p))
        return losses["terminal_value"] + self.tgw * losses["terminal_grad"] + losses["bridge"]

    def loss_terms(self, p: Pass, s) -> dict:
        depth = len(p.states) - 1
        target_value = self.per_sample_loss(p.logits, p.y).detach()
        v_top, dv_top = self.value_and_grad(depth, p.states[-1], s, create_graph=self.tgw > 0)
        out = {"terminal_value": (v_top - target_value).pow(2).mean(),
               # Output-local: g_L is the exact gradient at h_L, no hidden backprop.
               "terminal_grad": per_sample_sq(dv_top - at_least_fp32(p.g_top)).mean()}
        gen = self.generator(p.states[0].device)
        bridge = 0.0
        for l in range(depth):
            nxt = at_least_fp32(p.states[l + 1].detach())
            with torch.no_grad():
                noise = torch.randn((self.K, *nxt.shape), generator=gen, device=nxt.device,
                                    dtype=nxt.dtype)
                noisy = (nxt[None] + self.sigma * noise).flatten(0, 1)
                cond = None if s is None else s.repeat(self.K, 1)
                target = self.value(noisy, l + 1, cond).view(self.K, -1).mean(0)
            v = self.value(at_least_fp32(p.states[l].detach()), l, s)
            bridge = bridge + (v - target).pow(2).mean()
        out["bridge"] = bridge
        return out

    def terminal_gradient_error(self, p: Pass) -> torch.Tensor:
        """Mean ||dV/dh(h_L) - g_L||^2 / ||g_L||^2: how well V's gradient matches at the top."""
        _, dv = self.value_and_grad(len(p.states) - 1, p.states[-1], self.condition(p))
        g = at_least_fp32(p.g_top)
        return (per_sample_sq(dv - g) / per_sample_sq(g).clamp_min(1e-30)).mean()
