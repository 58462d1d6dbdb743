"""Batchwise random-magnitude sign-concordant feedback, brSF (Liao, Leibo & Poggio 2016), as
BioTorch defines it: frSF whose magnitudes ``|M|`` are redrawn after every optimizer step, so
each minibatch's backward uses ``|M_t| * sign(W_t)`` with fresh ``M_t`` (docs/rules.md, brsf).

The draws are resumable: step t's magnitudes come from a generator seeded by (run seed, t), and
t is part of the state, so a resumed run draws what an uninterrupted one would.
"""
import torch

from lcredit.rules.frsf import FRSF, uniform_magnitude


def magnitude_generator(seed: int, draw: int, device) -> torch.Generator:
    """The generator of a run's ``draw``-th magnitudes (the draw after optimizer step ``draw``)."""
    return torch.Generator(device=device).manual_seed(
        (int(seed) * 1_000_003 + int(draw) * 7_919 + 17) % (2**63 - 1))


class BRSF(FRSF):
    name = "brsf"

    def __init__(self, model, input_shape, num_classes, optimizer=None, penalty_lam=0.0):
        super().__init__(model, input_shape, num_classes, optimizer, penalty_lam)
        # How many times the magnitudes were redrawn; mirrored on the host, where the seed is
        # formed (reading the buffer each step would wait for the device).
        self.register_buffer("magnitude_draws", torch.zeros((), dtype=torch.long))
        self._draws_host = 0
        self.register_load_state_dict_post_hook(BRSF._mirror_draws)

    @staticmethod
    def _mirror_draws(module, incompatible_keys) -> None:
        module._draws_host = int(module.magnitude_draws)

    @torch.no_grad()
    def after_step(self) -> None:
        """Fresh magnitudes for the next minibatch."""
        super().after_step()
        self._draws_host += 1
        self.magnitude_draws.fill_(self._draws_host)
        seed = int((self.run_config or {}).get("seed", 0))
        device = self.magnitude(0, self._sites[0]).device
        gen = magnitude_generator(seed, self._draws_host, device)
        for i, layer in enumerate(self._sites):
            m = self.magnitude(i, layer)
            m.copy_(uniform_magnitude(m, gen))
