"""Direct random target projection, DRTP (Frenkel, Lefebvre & Bol 2021, "Learning without
feedback"): dfa with the error replaced by the target, ``a_l = onehot(y) · B_l`` with fixed
random ``B_l`` at every layer including the top. No error signal reaches the blocks: the credit
depends on the label only, not on the input or the network's output, so it needs no backward
pass at all. The sign is Frenkel et al.'s (their code descends ``labels @ B``, where dfa
descends ``(y_hat - labels) @ B``). The readout still learns from its own exact gradient.
On a regression task (lq) the target vector ``y`` itself is projected (docs/rules.md, drtp).
"""
import torch
import torch.nn.functional as F

from lcredit.rules.dfa import DFA, FeedbackDraws


class DRTP(DFA):
    name = "drtp"

    def target(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """What is projected: onehot(y), or the regression target itself (mse tasks)."""
        if self.loss_kind == "mse":
            return y.to(dtype)
        return F.one_hot(y, self.num_classes).to(dtype)

    def dfa_credit(self, l, p):
        B = self.feedback(l)
        return (self.target(p.y, B.dtype) @ B).view(-1, *self.state_shapes[l])

    @torch.no_grad()
    def feedback_draws(self, draws: int, generator=None) -> "TargetDraws":
        return TargetDraws(self, super().feedback_draws(draws, generator).stacked)


class TargetDraws(FeedbackDraws):
    """Several redrawn B_l at once, projecting the target instead of e: no forward pass."""

    def __init__(self, rule: DRTP, stacked: list[torch.Tensor]):
        self.rule, self.stacked = rule, stacked

    @torch.no_grad()
    def credit_sets(self, x: torch.Tensor, y: torch.Tensor) -> list[list[torch.Tensor]]:
        rule = self.rule
        t = rule.target(y, self.stacked[0].dtype)
        per_layer = [torch.einsum("bc,dcn->dbn", t, B).reshape(len(self), -1, *rule.state_shapes[l])
                     for l, B in enumerate(self.stacked)]
        return [[a[d] for a in per_layer] for d in range(len(self))]
