"""Direct vector credit field: a network that outputs the credit itself, trained on
finite-difference directional derivatives of the forward loss (docs/rules.md)."""
from dataclasses import dataclass

import torch

from lcredit.models.base import preserved_buffers, run_blocks
from lcredit.rules.base import Pass
from lcredit.rules.update import at_least_fp32, no_autocast
from lcredit.options import Count, Fraction, NonNegative, Positive
from lcredit.rules.estimator import (CreditNet, CreditNorm, Estimator, EstimatorOptions,
                                     FieldOptions, LossScale, Scale, relative_sq,
                                     unit_directions)


def directional_targets(model, l, h, y, u, eps, loss_fn, one_sided=False) -> torch.Tensor:
    """delta_u = (Lfwd(h + eps u) - Lfwd(h - eps u)) / (2 eps) for directions ``u`` (M, *h.shape);
    one-sided: (Lfwd(h + eps u) - Lfwd(h)) / eps. Lfwd runs the rest of the network *forward*
    from layer l: no backward pass. ``eps``: a number or one step per sample. Returns (M, B)."""
    m, n = u.shape[0], h.shape[0]
    eps = torch.as_tensor(eps, dtype=h.dtype, device=h.device).expand(n)
    step = eps.view(1, n, *([1] * (h.ndim - 1)))
    # every perturbed state in one forward pass, stacked in the batch dimension: h + eps u for
    # the M directions, then h - eps u (central) or h itself (one-sided)
    other = h[None] if one_sided else h[None] - step * u
    states = torch.cat([h[None] + step * u, other]).flatten(0, 1)
    k = states.shape[0] // n
    ys = y.repeat(k, *([1] * (y.ndim - 1)))

    with torch.no_grad(), preserved_buffers(model), no_autocast(h.device):
        loss = loss_fn(model.readout(run_blocks(model, states, start=l)[-1]), ys).view(k, n)
    plus, rest = loss[:m], loss[m:]
    return (plus - rest) / (eps if one_sided else 2 * eps)


@dataclass(kw_only=True)
class VECOptions(FieldOptions, EstimatorOptions):
    """vec's options (conf/method/vec.yaml says what each does)."""

    credit_norm: CreditNorm = "batch"
    # The original's online vec followed DFA for the first 20 % of the epochs (trained from
    # epoch 0 it stayed near chance; here it diverges): docs/reproduction.md.
    warmup_ratio: Fraction = 0.2
    M: Count = 4                      # directions per sample
    eps: Positive = 1e-3              # the finite-difference step
    eps_scale: Scale = "absolute"
    one_sided: bool = False
    terminal_weight: NonNegative = 1.0
    shuffle_targets: bool = False
    loss_scale: LossScale = "absolute"


class VEC(Estimator):
    """Defaults are the original study's form as reconstructed (docs/reproduction.md): an
    absolute finite-difference step, the unscaled loss sum_u (<A, u> - delta_u)^2 (+ the
    unscaled terminal term), A a plain MLP on [LN(h), embed(t), s], a 20 % DFA warm-up, the
    credit over its batch RMS. lcredit's switches, each measured in the README's ladder table:
    ``eps_scale: relative``, ``loss_scale: relative``, ``field: gated``; ``method=vec_gated``
    sets them all."""

    name = "vec"
    ORIGINAL = Estimator.ORIGINAL | {"credit_norm": "batch", "eps_scale": "absolute",
                                     "loss_scale": "absolute",
                                     "field": "concat", "field_ln": True, "layer_code": "embed"}

    Options = VECOptions

    def __init__(self, model, input_shape, num_classes, optimizer=None, penalty_lam=0.0,
                 **options):
        super().__init__(model, input_shape, num_classes, optimizer, penalty_lam, **options)
        self.field = self.make_field()

    def make_field(self, inputs="full"):
        return CreditNet(self.dims, self.cond_dim(), self.width, out="vector", inputs=inputs,
                         form=self.field_form, ln=self.field_ln, layer_code=self.layer_code)

    def option_applies(self, option: str) -> bool:
        if option in ("layer_code", "field_ln"):  # the gated form always layer-normalises
            return self.field_form == "concat"
        return super().option_applies(option)

    def field_output(self, l, h, s):
        return self.field(at_least_fp32(h), l, s)

    def estimator_credit(self, l, p: Pass):
        return self.field_output(l, p.states[l].detach(), self.condition(p))

    def estimator_loss(self, p: Pass):
        return self.field_loss(p, self.condition(p), self.field_output)

    def step(self, h: torch.Tensor):
        """The finite-difference step: ``eps``, or (relative) ``eps * ||h||`` per sample. An
        absolute step on a residual stream grown to norm ~1e4 changes the loss by less than
        float32 can resolve: the targets would be rounding noise."""
        if self.eps_scale == "absolute":
            return self.eps
        return self.eps * h.flatten(1).norm(dim=1).clamp_min(1e-12)

    def sq_error(self, err: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
        """The squared error summed over all entries and divided by the batch size ``n``
        (``absolute``), relative to the target's own size over the batch (``relative``), or
        the mean over every entry (``mean``, F.mse_loss's: the M directional terms of a sample
        and the d entries of its terminal term each weigh as one mean)."""
        if self.loss_scale == "relative":
            return relative_sq(err, target)
        if self.loss_scale == "mean":
            return err.pow(2).mean()
        return err.pow(2).sum() / n

    def field_loss(self, p: Pass, s, output, shuffle=None):
        """Per layer l = 0..L, sum_u (<A, u> - delta_u)^2, plus the terminal term
        ``terminal_weight`` ||A(h_L) - g_L||^2 (output-local); mean over the batch.

        (dim/M) sum_u (<A, u> - delta_u)^2 is an unbiased estimate of ||A - g||^2 up to the
        finite-difference error. ``loss_scale: relative`` takes each term relative to its
        targets' own size, which keeps the field learning at the same pace when the gradients
        shrink by orders of magnitude (a growing residual stream behind a LayerNorm), instead
        of letting the loss vanish with them."""
        shuffle = self.shuffle_targets if shuffle is None else shuffle
        gen = self.generator(p.states[0].device)
        depth = len(p.states) - 1
        total = 0.0
        for l in range(depth + 1):  # at l = L, Lfwd is the readout alone
            h = at_least_fp32(p.states[l].detach())
            u = unit_directions(self.M, h, gen)
            target = directional_targets(self.model, l, h, p.y, u, self.step(h),
                                         self.per_sample_loss, self.one_sided)
            if shuffle:  # control: each sample is trained toward another sample's targets
                target = target[:, torch.randperm(h.shape[0], generator=gen, device=h.device)]
            a = output(l, h, s)
            pred = (a[None] * u).flatten(2).sum(2)
            total = total + self.sq_error(pred - target, target, h.shape[0])
        if self.terminal_weight > 0:
            a_top = output(depth, p.states[-1].detach(), s)
            g = at_least_fp32(p.g_top)
            if shuffle:  # the control gets no sample's own gradient anywhere, h_L included
                g = g[torch.randperm(g.shape[0], generator=gen, device=g.device)]
            total = total + self.terminal_weight * self.sq_error(a_top - g, g, g.shape[0])
        return total
