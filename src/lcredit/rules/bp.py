"""End-to-end backpropagation: the reference every other rule is measured against."""
import torch

from lcredit.models.base import exact_credit, hidden_states
from lcredit.rules.base import Rule
from lcredit.rules.update import penalty


class BP(Rule):
    name = "bp"

    def compute_gradients(self, x, y):
        if not self.updates_model():  # fixed_network: nothing of bp's own to train
            with torch.no_grad():
                logits = self.model(x)
            return self.task_loss(logits, y), logits
        hs = hidden_states(self.model, x)
        logits = self.model.readout(hs[-1])
        loss = self.task_loss(logits, y)
        total = loss
        if self.penalty_lam > 0:
            total = loss + penalty(self.penalty_lam, self.model.blocks, hs[:-1], hs[1:])
        # Plain backward, like every other rule: precision plugins that need Lightning's
        # manual_backward (fp16 loss scaling) are refused at config time.
        total.backward()
        return loss.detach(), logits.detach()

    def credit(self, x, y):
        return exact_credit(self.model, x, y, self.task_loss)[1]
