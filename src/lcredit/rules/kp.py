"""Kolen–Pollack (Kolen & Pollack 1994; Akrout et al. 2019): fa's ``layerwise`` backward whose
feedback matrices learn. Every block layer's feedback ``B`` (the weight's shape, standing where
``W`` stands in the backward) receives the update the optimizer gave ``W``, and both decay:

    W_{t+1} = W_t + dW_t - kp_decay W_t,    B_{t+1} = B_t + dW_t - kp_decay B_t,

with ``dW_t`` the optimizer step's change of ``W`` (Akrout et al.'s eqs. 16-17 and their code:
``W <- (1 - lambda) W - eta grad``, the decay a per-step factor, not scaled by the learning
rate). So ``W_t - B_t = (1 - kp_decay)^t (W_0 - B_0)`` under any optimizer: B converges to W.

The optimizer steps the parameters as for every rule; ``after_step`` then applies the same
change to B and the decay to both, which needs W as it was before the step (kept by
``compute_gradients``). B starts as fa's fixed random matrices (U(+-1/sqrt(fan_in))); redrawing
it gives the chance level (null_gamma): what a feedback the network has not shaped gives.
"""
import torch

from lcredit.options import Fraction
from lcredit.rules.fa import FA


class KP(FA):
    name = "kp"
    ORIGINAL: dict = {}  # fa's blockwise/layerwise switch is not kp's: kp is layerwise

    def __init__(self, model, input_shape, num_classes, optimizer=None, penalty_lam=0.0,
                 kp_decay: Fraction = 1e-4):
        super().__init__(model, input_shape, num_classes, optimizer, penalty_lam,
                         variant="layerwise")
        self.kp_decay = float(kp_decay)
        self._before = None  # W of every site before this step's optimizer step

    def compute_gradients(self, x, y):
        out = super().compute_gradients(x, y)
        if self.updates_model():
            self._before = [layer.weight.detach().clone() for layer, _ in self._sites]
        return out

    @torch.no_grad()
    def after_step(self) -> None:
        super().after_step()
        if self._before is None:
            return
        lam = self.kp_decay
        for (layer, buf), w0 in zip(self._sites, self._before):
            B, W = getattr(self, buf), layer.weight
            B.add_(W - w0 - lam * B)
            if lam:
                W.sub_(lam * w0)
        self._before = None
