"""Fixed random-magnitude sign-concordant feedback, frSF (Liao, Leibo & Poggio 2016), as
BioTorch defines it: uSF with ``|M| * sign(W)`` in place of each block layer's weight ``W``,
``M`` a fixed random matrix of the weight's shape drawn like the layer's own init
(U(+-1/sqrt(fan_in))), its signs taken from the current weights at every pass (docs/rules.md,
frsf). Redrawing ``M`` gives the chance level (null_gamma): fresh magnitudes, the same signs.
"""
import math

import torch

from lcredit.rules.usf import USF


class FRSF(USF):
    name = "frsf"

    def __init__(self, model, input_shape, num_classes, optimizer=None, penalty_lam=0.0):
        super().__init__(model, input_shape, num_classes, optimizer, penalty_lam)
        for i, layer in enumerate(self._sites):
            self.register_buffer(f"magnitude_{i}", torch.empty(
                layer.weight.shape, dtype=layer.weight.dtype, device=layer.weight.device))
        self.draw_feedback()

    def magnitude(self, i, layer):
        return getattr(self, f"magnitude_{i}")

    @torch.no_grad()
    def draw_feedback(self, generator=None):
        """(Re)draw every |M|; diagnostics redraw a copy's for null_gamma."""
        for i, layer in enumerate(self._sites):
            m = self.magnitude(i, layer)
            m.copy_(uniform_magnitude(m, generator))


def uniform_magnitude(like: torch.Tensor, generator=None) -> torch.Tensor:
    """|U(+-1/sqrt(fan_in))| (BioTorch: abs of the layer's default init) in ``like``'s shape,
    device and dtype, drawn from ``generator`` where it lives."""
    bound = 1.0 / math.sqrt(like[0].numel())
    device = generator.device if generator is not None else torch.device("cpu")
    draw = torch.rand(like.shape, generator=generator, device=device, dtype=like.dtype)
    return (draw * bound).to(like.device)
