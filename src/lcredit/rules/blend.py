"""Scaffold blends: a = alpha * a_aux + (1 - alpha) * a_dfa, with an auxiliary source chosen
to dissect what a learned credit field contributes (docs/rules.md).

Sources (``source``):
- ``vec``: the vector credit field, trained online on its perturbation targets (and taken
  from ``init_from``'s checkpoint when there is one);
- ``random_trainable``: the same network from a random init (never branched), same objective;
- ``shuffled_trainable``: trained on targets shuffled across samples;
- ``fresh_random_target``: trained toward new Gaussian targets every step;
- ``zero_target``: trained toward zero, and taken as it is (~0; ``zero_target_renorm: true``
  puts it through credit_norm like every other source);
- ``time_only``: the network sees the layer index only;
- ``constant_input``: the network sees one constant input and no layer index: one shared
  output for every sample and layer;
- ``perlayer_vector``: one trainable vector per layer, on the vec objective;
- ``gaussian_noise``: fresh Gaussian noise, nothing trained;
- ``frozen_random``: the network at its random init, never trained;
- ``dfa_norm_matched``: DFA's direction at the norm the vec blend would have (a norm control).

The aux credit is what its own rule would give (the field through ``credit_norm``), and the
blend is docs/rules.md's ``alpha * a_aux + (1 - alpha) * a_dfa`` (``mix: plain``). ``mix: one_scale``
(lcredit's switch) mixes the two at one scale (each over its RMS, over the batch or per sample)
and gives the mixture the alpha-interpolated RMS, so alpha is the share of direction. Either way
alpha = 0 is DFA exactly and alpha = 1 the aux source exactly (for ``vec``: the vec rule's credit).
Schedule: ``alpha`` constant, or decaying linearly to ``alpha_end`` over the run
(``alpha_decay: linear``); ``freeze_after`` (epochs) stops training the aux, after which alpha
moves linearly to ``decay_to`` over ``decay_epochs`` (0: at once).
"""
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from lcredit.errors import ConfigError
from lcredit.options import Fraction, Index
from lcredit.rules.base import Pass
from lcredit.rules.update import at_least_fp32
from lcredit.rules.estimator import CreditNorm, credit_rms, per_sample_sq
from lcredit.rules.vec import VEC, VECOptions

Source = Literal["vec", "random_trainable", "shuffled_trainable", "fresh_random_target",
                 "zero_target", "time_only", "constant_input", "perlayer_vector",
                 "gaussian_noise", "frozen_random", "dfa_norm_matched"]
SOURCES = get_args(Source)
UNTRAINED = ("gaussian_noise", "frozen_random")


class PerLayerVector(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.vectors = nn.ParameterList(nn.Parameter(torch.zeros(s)) for s in shapes)

    def forward(self, h, t, s):
        return self.vectors[t].to(h.dtype).expand_as(h)


@dataclass(kw_only=True)
class BlendOptions(VECOptions):
    """blend's options (conf/method/blend.yaml says what each does)."""

    credit_norm: CreditNorm = "sample"
    # A blend is DFA mixed with its aux source from the start (or from the branch it starts
    # from): no warm-up unless asked for.
    warmup_ratio: Fraction = 0.0
    source: Source = "vec"
    alpha: Fraction = 0.5
    alpha_decay: Literal["constant", "linear"] = "constant"
    alpha_end: Fraction = 0.0
    freeze_after: Index | None = None
    decay_to: Fraction | None = None
    decay_epochs: Index = 0
    mix: Literal["plain", "one_scale"] = "plain"
    zero_target_renorm: bool = False


class Blend(VEC):
    name = "blend"
    ORIGINAL = VEC.ORIGINAL | {"mix": "plain", "zero_target_renorm": False,
                               "credit_norm": "sample"}

    Options = BlendOptions

    def __init__(self, model, input_shape, num_classes, optimizer=None, penalty_lam=0.0,
                 **options):
        # make_field (called by VEC's constructor) reads the source
        self.source = options.get("source", BlendOptions.source)
        super().__init__(model, input_shape, num_classes, optimizer, penalty_lam, **options)
        source, freeze_after, decay_to = self.source, self.freeze_after, self.decay_to
        if decay_to is not None and freeze_after is None:
            raise ConfigError("method.decay_to needs method.freeze_after (alpha decays after "
                              "the aux is frozen)")
        if self.decay_epochs and decay_to is None:
            raise ConfigError("method.decay_epochs needs method.decay_to")
        if source in UNTRAINED:
            self.field.requires_grad_(False)
        # Only the vec field itself (and the norm it lends dfa_norm_matched) may come from the
        # checkpoint a run branches from; every control starts from its own random init, or it
        # would start from the answer (a "frozen_random" field that is a trained one).
        self.fresh_on_branch = () if source in ("vec", "dfa_norm_matched") else ("field.",)

    def make_field(self, inputs="full"):
        if self.source == "perlayer_vector":
            return PerLayerVector(self.state_shapes)
        inputs = {"time_only": "time_only", "constant_input": "constant"}.get(self.source, "full")
        return super().make_field(inputs)

    # ---------------------------------------------------------------- schedule
    def alpha_at(self, epoch: int) -> float:
        a = self.alpha
        if self.alpha_decay == "linear" and self.max_epochs() > 1:
            a = self.alpha + (self.alpha_end - self.alpha) * min(epoch / (self.max_epochs() - 1), 1)
        if self.freeze_after is not None and self.decay_to is not None and epoch >= self.freeze_after:
            frac = 1.0 if self.decay_epochs == 0 else min(
                (epoch - self.freeze_after + 1) / self.decay_epochs, 1.0)
            a = a + (self.decay_to - a) * frac
        return a

    def schedule_needs_epochs(self) -> list[str]:
        return super().schedule_needs_epochs() + (
            ["method.alpha_decay=linear"] if self.alpha_decay == "linear" else [])

    def current_alpha(self) -> float:
        return self.alpha_at(self.epoch())

    def trains_estimator(self) -> bool:
        if self.source in UNTRAINED:
            return False
        return self.freeze_after is None or self.epoch() < self.freeze_after

    # ---------------------------------------------------------------- credit
    def estimator_credit(self, l: int, p: Pass) -> torch.Tensor:
        """The aux source's raw a_l (``learned_credit`` applies credit_norm, as the vec rule)."""
        h = p.states[l]
        if self.source == "gaussian_noise":
            return torch.randn(h.shape, generator=self.generator(h.device, stream=1 + l),
                               device=h.device, dtype=at_least_fp32(h).dtype)
        return self.field_output(l, h.detach(), self.condition(p))

    def option_applies(self, option: str) -> bool:
        if option == "zero_target_renorm":
            return self.source == "zero_target"
        return super().option_applies(option)

    def learned_credit(self, l: int, p: Pass) -> torch.Tensor:
        if self.source == "zero_target" and not self.zero_target_renorm:
            # The original control: the field trained toward zero, taken as it is (~0), not
            # blown back up to unit RMS by credit_norm (which would make it a random direction).
            with torch.enable_grad():
                return self.estimator_credit(l, p).detach()
        return super().learned_credit(l, p)

    def blend(self, alpha: float, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """alpha * a + (1 - alpha) * d (``mix: plain``, docs/rules.md's). ``mix: one_scale`` (lcredit's)
        mixes the two at one scale (each divided by its RMS, over the batch or per sample as
        credit_norm says) and gives the result the interpolated RMS, so alpha is the share of
        direction. Either way alpha = 1 is ``a`` and alpha = 0 is ``d`` exactly."""
        if alpha == 1:
            return a
        if alpha == 0:
            return d
        if self.mix == "plain" or self.credit_norm is None:
            return alpha * a + (1 - alpha) * d
        per_sample = self.credit_norm == "sample"
        ra, rd = credit_rms(a, per_sample), credit_rms(d, per_sample)
        tiny = torch.finfo(d.dtype).tiny
        mixed = alpha * a / ra.clamp_min(tiny) + (1 - alpha) * d / rd.clamp_min(tiny)
        return mixed * (alpha * ra + (1 - alpha) * rd)

    def rule_credit(self, l, p):
        d = self.dfa_credit(l, p)
        alpha = self.current_alpha()
        if not self.uses_estimator(l) or alpha == 0:
            return d
        # the aux source's a_l as its own rule gives it (for dfa_norm_matched, the vec field's)
        b = self.blend(alpha, self.learned_credit(l, p).to(d.dtype), d)
        if self.source != "dfa_norm_matched":
            return b
        # the vec blend's norm per sample, DFA's direction
        ratio = per_sample_sq(b).sqrt() / per_sample_sq(d).sqrt().clamp_min(1e-30)
        return d * ratio.view(-1, *([1] * (d.ndim - 1)))

    # ---------------------------------------------------------------- the aux objective
    def estimator_loss(self, p: Pass):
        s = self.condition(p)
        if self.source in ("fresh_random_target", "zero_target"):
            gen = self.generator(p.states[0].device)
            total = 0.0
            for l, h in enumerate(p.states):
                a = self.field_output(l, h.detach(), s)
                target = (torch.randn(a.shape, generator=gen, device=a.device, dtype=a.dtype)
                          if self.source == "fresh_random_target" else torch.zeros_like(a))
                total = total + per_sample_sq(a - target).mean()
            return total
        return self.field_loss(p, s, self.field_output,
                               shuffle=self.shuffle_targets or self.source == "shuffled_trainable")

    def on_validation_epoch_end(self):
        n_rows = len(self.history)
        super().on_validation_epoch_end()
        if len(self.history) > n_rows:
            self.history[-1]["alpha"] = self.current_alpha()
            self.history[-1]["aux_trained"] = self.trains_estimator()
