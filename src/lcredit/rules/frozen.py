"""The frozen-blocks baseline: blocks keep their initialisation; embedding and readout learn.

It is the comparator of diagnostic (d): a rule whose accuracy does not beat this has not
shown that its blocks learned anything.
"""
from lcredit.rules.base import Rule
from lcredit.rules.update import trainable


class Frozen(Rule):
    name = "frozen"
    needs_vjp = True       # the embedding's credit is the exact gradient through the blocks
    credit_is_vjp = True
    trains_blocks = False

    def layer_credit(self, l, p, vjp):
        return vjp

    def optimized_parameters(self):
        return trainable(self.model.embed) + trainable(self.model.readout)
