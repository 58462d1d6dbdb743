"""Uniform sign-concordant feedback, uSF (Liao, Leibo & Poggio 2016), as BioTorch defines it.

Layerwise like fa's ``layerwise`` variant: inside every block, each linear and convolution layer
computes its input gradient with ``scale * sign(W)`` in place of its weight ``W``, taken from the
current weights at every pass; nonlinearity derivatives, normalisation backward, attention cores
and skip paths stay exact, and the block's own update goes through the same substituted graph.
``scale = 1/sqrt(3 fan_in)`` is BioTorch's constant for layers at torch's default init (the std
of U(+-1/sqrt(fan_in))): sign(W) alone has entries of size 1 and would blow up the credit by
sqrt(3 fan_in) per layer (docs/rules.md, usf).

There is no random feedback to redraw: the chance level (null_gamma) is the protocol's DFA null.
"""
import contextlib
import math

import torch

from lcredit.errors import ConfigError
from lcredit.rules.base import Rule
from lcredit.rules.fa import _feedback_forward, feedback_sites


class USF(Rule):
    name = "usf"
    needs_vjp = credit_is_vjp = True

    def __init__(self, model, input_shape, num_classes, optimizer=None, penalty_lam=0.0):
        super().__init__(model, input_shape, num_classes, optimizer, penalty_lam)
        self._sites = [layer for _, layer in feedback_sites(self.model.blocks)]
        if not self._sites:
            raise ConfigError(f"method={self.name}: the model's blocks contain no linear or "
                              "convolution layer, whose backward sign symmetry replaces")

    @staticmethod
    def scale(layer) -> float:
        """BioTorch's uSF constant for a layer at torch's default init: 1/sqrt(3 fan_in)."""
        return 1.0 / math.sqrt(3 * layer.weight[0].numel())

    def magnitude(self, i: int, layer) -> torch.Tensor | float:
        """What multiplies sign(W) in layer ``i``'s backward (brsf and frsf: random |M|)."""
        return self.scale(layer)

    @torch.no_grad()
    def feedback(self, i: int, layer) -> torch.Tensor:
        """The matrix layer ``i``'s input gradient goes through, from the current weights."""
        return torch.sign(layer.weight) * self.magnitude(i, layer)

    @contextlib.contextmanager
    def backward_context(self):
        for i, layer in enumerate(self._sites):
            layer.forward = _feedback_forward(layer, self.feedback(i, layer))
        try:
            yield
        finally:
            for layer in self._sites:
                del layer.forward

    def layer_credit(self, l, p, vjp):
        return vjp
