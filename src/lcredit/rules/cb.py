"""Credit bridge: a value network whose input-gradient is the credit (docs/rules.md)."""
import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch

from lcredit.errors import ConfigError
from lcredit.models.base import preserved_buffers
from lcredit.rules.base import Pass
from lcredit.rules.update import at_least_fp32, no_autocast
from lcredit.options import Count, Fraction, NonNegative, Positive
from lcredit.rules.estimator import (CreditNet, CreditNorm, Estimator, EstimatorOptions,
                                     FieldOptions, LossScale, Scale, credit_rms, per_sample_sq,
                                     relative_sq, unit_directions)


@dataclass(kw_only=True)
class CBOptions(FieldOptions, EstimatorOptions):
    """cb's options (conf/method/cb.yaml says what each does)."""

    credit_norm: CreditNorm = "batch"
    warmup_ratio: Fraction = 0.2
    tgw: NonNegative = 1.0            # terminal gradient matching weight
    K: Count = 4                      # bridge consistency: noise samples
    sigma: NonNegative = 0.05         # bridge consistency: noise std
    sigma_scale: Scale = "absolute"
    bridge_noise: Literal["input", "target"] = "target"
    bridge_slope: NonNegative = 0.0
    terminal_scale: LossScale = "absolute"
    target_ema: Fraction | None = 0.995   # the target network's momentum (None: V itself)
    bridge_temp: Positive | None = 0.1    # the soft-min's temperature (None: the mean)


class CB(Estimator):
    """Defaults are the original study's bridge as reconstructed (docs/reproduction.md): V a
    plain MLP on [LN(h), embed(t), s]; bridge targets at h_{l+1} plus noise of absolute std
    sigma, taken from a target network following V (momentum 0.995) through a soft-min
    (lam 0.1); no slope term; unscaled terminal terms; the credit over its batch RMS.
    lcredit's switches, each measured in the README's ladder table:
    ``bridge_noise: input`` (perturb h_l and map it through block l), ``bridge_slope`` > 0
    (the bridge in differences), ``sigma_scale: relative``, ``terminal_scale: relative``,
    ``field: gated``; ``method=cb_relative`` sets them all."""

    name = "cb"
    ORIGINAL = Estimator.ORIGINAL | {"credit_norm": "batch", "bridge_noise": "target",
                                     "bridge_slope": 0.0,
                                     "sigma_scale": "absolute", "terminal_scale": "absolute",
                                     "field": "concat", "field_ln": True, "layer_code": "embed",
                                     "target_ema": 0.995, "bridge_temp": 0.1}

    Options = CBOptions

    def __init__(self, model, input_shape, num_classes, optimizer=None, penalty_lam=0.0,
                 **options):
        super().__init__(model, input_shape, num_classes, optimizer, penalty_lam, **options)
        if self.target_ema == 1.0:
            raise ConfigError("method.target_ema=1.0 never moves the target network: give a "
                              "momentum in [0, 1), e.g. 0.995, or null (no target network)")
        field, field_ln, layer_code = self.field_form, self.field_ln, self.layer_code
        self.value = CreditNet(self.dims, self.cond_dim(), self.width, out="scalar", form=field,
                               ln=field_ln, layer_code=layer_code)
        # target_ema: the bridge's targets come from a slowly following copy of V (a target
        # network, as in TD learning), updated after every optimizer step; it is part of the
        # rule's state (saved and restored with every checkpoint).
        self.value_target = None
        if self.target_ema is not None:
            self.value_target = copy.deepcopy(self.value).requires_grad_(False)

    def option_applies(self, option: str) -> bool:
        if option in ("layer_code", "field_ln"):  # the gated form always layer-normalises
            return self.field_form == "concat"
        return super().option_applies(option)

    @torch.no_grad()
    def after_step(self) -> None:
        if self.value_target is None:
            return
        m = self.target_ema
        for tgt, src in zip(self.value_target.parameters(), self.value.parameters()):
            tgt.lerp_(src.detach(), 1.0 - m)

    def bridge_value(self, h, l, s):
        """V at layer l for the bridge's targets: the target network's where there is one."""
        net = self.value if self.value_target is None else self.value_target
        return net(h, l, s)

    def soft_min(self, values: torch.Tensor) -> torch.Tensor:
        """The bridge target over the K noise samples (dim 0): their mean, or with
        ``bridge_temp`` = lam the soft minimum -lam log mean_k exp(-V_k / lam) (-> the mean as
        lam -> inf, the minimum as lam -> 0)."""
        if self.bridge_temp is None:
            return values.mean(0)
        lam = self.bridge_temp
        return -lam * (torch.logsumexp(-values / lam, dim=0) - math.log(values.shape[0]))

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
        with no_autocast(p.states[0].device):  # the bridge compares small differences of V
            losses = self.loss_terms(p, self.condition(p))
        return (losses["terminal_value"] + self.tgw * losses["terminal_grad"] + losses["bridge"]
                + self.bridge_slope * losses.get("bridge_slope", 0.0))

    def loss_terms(self, p: Pass, s) -> dict:
        depth = len(p.states) - 1
        target_value = self.per_sample_loss(p.logits, p.y).detach()
        v_top, dv_top = self.value_and_grad(depth, p.states[-1], s, create_graph=self.tgw > 0)
        g_top = at_least_fp32(p.g_top)
        # Output-local: g_L is the exact gradient at h_L, no hidden backprop. ``relative``: over
        # ||g_L||^2, so it still counts when g_L shrinks by orders of magnitude.
        if self.terminal_scale == "relative":
            grad_err = relative_sq(dv_top - g_top, g_top)
        elif self.terminal_scale == "mean":  # F.mse_loss's mean over every entry
            grad_err = (dv_top - g_top).pow(2).mean()
        else:
            grad_err = per_sample_sq(dv_top - g_top).mean()
        out = {"terminal_value": (v_top - target_value).pow(2).mean(), "terminal_grad": grad_err}
        gen = self.generator(p.states[0].device)
        bridge = 0.0
        for l in range(depth):
            here = at_least_fp32(p.states[l].detach())
            cond = None if s is None else s.repeat(self.K, 1)
            with torch.no_grad():
                if self.bridge_noise == "target":
                    nxt = at_least_fp32(p.states[l + 1].detach())
                    noise = torch.randn((self.K, *nxt.shape), generator=gen, device=nxt.device,
                                        dtype=nxt.dtype)
                    noisy = (nxt[None] + self.noise_scale(nxt) * noise).flatten(0, 1)
                    target = self.soft_min(self.bridge_value(noisy, l + 1, cond).view(self.K, -1))
                else:  # input: the same noisy h_l on both sides, through block l (forward only)
                    noise = torch.randn((self.K, *here.shape), generator=gen, device=here.device,
                                        dtype=here.dtype)
                    moved = (here[None] + self.noise_scale(here) * noise).flatten(0, 1)
                    target = self.bridge_value(self.through_block(l, moved, p), l + 1, cond)
            if self.bridge_noise == "target":
                v = self.value(here, l, s)
            else:
                v = self.value(moved, l, cond)
            bridge = bridge + (v - target).pow(2).mean()
        out["bridge"] = bridge
        if self.bridge_slope > 0:
            out["bridge_slope"] = self.slope_consistency(p, s, gen)
        return out

    def slope_consistency(self, p: Pass, s, gen) -> torch.Tensor:
        """The bridge in differences: along K random directions xi of length sigma, the change
        of V_l across h_l +- xi matches (stop-gradient) the change of V_{l+1} across
        F_l(h_l +- xi), relative to the latter's size. Values alone pin V down only at the
        visited states, which leaves its gradient — the credit — free; this term is the first
        order of the same consistency, and trains the gradient directly (forward passes
        through one block only)."""
        total = 0.0
        cond = None if s is None else s.repeat(2 * self.K, 1)
        for l in range(len(p.states) - 1):
            here = at_least_fp32(p.states[l].detach())
            xi = unit_directions(self.K, here, gen)
            step = self.noise_scale(here) * here[0].numel() ** 0.5 * xi
            pair = torch.cat([here[None] + step, here[None] - step]).flatten(0, 1)
            with torch.no_grad():
                up = self.value(self.through_block(l, pair, p), l + 1, cond).view(2, self.K, -1)
                target = up[0] - up[1]
            v = self.value(pair, l, cond).view(2, self.K, -1)
            total = total + relative_sq((v[0] - v[1]) - target, target)
        return total

    def through_block(self, l: int, h: torch.Tensor, p: Pass) -> torch.Tensor:
        """Block l applied to (perturbed) states ``h``, forward only, BatchNorm statistics
        untouched; at least float32 out. It runs outside autocast (the bridge compares small
        differences), so ``h`` goes in the block's own parameter dtype, not the pass's (bf16
        under bf16-mixed, which a float32 LayerNorm refuses)."""
        block = self.model.blocks[l]
        with torch.no_grad(), preserved_buffers(self.model):
            return at_least_fp32(block(h.to(next(block.parameters()).dtype)))

    def noise_scale(self, h):
        """sigma, or (relative) sigma times the per-sample RMS of h: a fixed absolute noise
        vanishes against a residual stream that has grown a hundredfold."""
        if self.sigma_scale == "absolute":
            return self.sigma
        return self.sigma * credit_rms(h, per_sample=True)

    def terminal_gradient_error(self, p: Pass) -> torch.Tensor:
        """Mean ||dV/dh(h_L) - g_L||^2 / ||g_L||^2: how well V's gradient matches at the top."""
        _, dv = self.value_and_grad(len(p.states) - 1, p.states[-1], self.condition(p))
        g = at_least_fp32(p.g_top)
        return (per_sample_sq(dv - g) / per_sample_sq(g).clamp_min(1e-30)).mean()
