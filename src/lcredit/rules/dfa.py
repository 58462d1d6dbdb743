"""Direct feedback alignment (Nøkland 2016): a_l = e · B_l with fixed random B_l."""
import torch

from lcredit.options import Positive
from lcredit.rules.base import Pass, Rule


class DFA(Rule):
    name = "dfa"

    def __init__(self, model, input_shape, num_classes, optimizer=None, penalty_lam=0.0,
                 feedback_std: Positive | None = None):
        super().__init__(model, input_shape, num_classes, optimizer, penalty_lam)
        self.feedback_std = feedback_std
        for l in range(len(self.state_shapes)):
            self.register_buffer(f"feedback_{l}", torch.empty(self.num_classes, self.state_dim(l)))
        self.draw_feedback()

    @torch.no_grad()
    def draw_feedback(self, generator=None):
        """(Re)draw every B_l; diagnostics call it on a copy for the chance level (null_gamma)."""
        for l in range(len(self.state_shapes)):
            buf = self.feedback(l)
            # std 1/sqrt(dim(h_l)) keeps ||a_l|| close to ||e|| whatever the width.
            std = self.feedback_std if self.feedback_std is not None else buf.shape[1] ** -0.5
            buf.copy_(torch.randn(buf.shape, generator=generator) * std)

    @torch.no_grad()
    def feedback_draws(self, draws: int, generator=None) -> "FeedbackDraws":
        """``draws`` fresh sets of B_l, as ``draw_feedback`` on that many copies would draw them
        (same generator order), for the chance level; their credit comes from one forward pass."""
        sets = []
        for _ in range(draws):
            sets.append([torch.randn(self.feedback(l).shape, generator=generator)
                         * (self.feedback_std if self.feedback_std is not None
                            else self.feedback(l).shape[1] ** -0.5)
                         for l in range(len(self.state_shapes))])
        return FeedbackDraws(self, sets)

    def feedback(self, l: int) -> torch.Tensor:
        return getattr(self, f"feedback_{l}")

    def dfa_credit(self, l, p):
        e = p.error
        return (e @ self.feedback(l).to(e.dtype)).view(-1, *self.state_shapes[l])

    def top_credit(self, p):
        return self.dfa_credit(len(self.state_shapes) - 1, p)

    def layer_credit(self, l, p, vjp):
        return self.dfa_credit(l, p)


class FeedbackDraws:
    """The credit of several feedback draws at once: one forward pass for the error e, then per
    layer every draw's e B_l as one batched product (draws stacked in front)."""

    def __init__(self, rule: DFA, sets: list[list[torch.Tensor]]):
        self.rule = rule
        device, dtype = rule.feedback(0).device, rule.feedback(0).dtype
        self.stacked = [torch.stack([s[l] for s in sets]).to(device=device, dtype=dtype)
                        for l in range(len(rule.state_shapes))]

    def __len__(self) -> int:
        return self.stacked[0].shape[0]

    @torch.no_grad()
    def credit_sets(self, x: torch.Tensor, y: torch.Tensor) -> list[list[torch.Tensor]]:
        rule = self.rule
        e = Pass(x, y, rule.model(x), [], None, loss_kind=rule.loss_kind).error
        per_layer = [torch.einsum("bc,dcn->dbn", e, B.to(e.dtype)).reshape(
            len(self), -1, *rule.state_shapes[l]) for l, B in enumerate(self.stacked)]
        return [[a[d] for a in per_layer] for d in range(len(self))]
