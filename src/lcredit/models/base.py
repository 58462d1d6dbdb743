import torch
from torch import nn


class BlockModel(nn.Module):
    """``readout(blocks[L-1](...blocks[0](embed(x))))`` with the hidden states exposed.

    Subclasses set ``self.embed`` (module), ``self.blocks`` (``nn.ModuleList``) and
    ``self.readout`` (module). A block may set ``residual = True`` when its output is
    ``h + f(h)``; the penalty of SPEC §3 is then taken on ``f`` alone.
    """

    embed: nn.Module
    blocks: nn.ModuleList
    readout: nn.Module

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states h_0 .. h_L (connected in one autograd graph)."""
        h = self.embed(x)
        hs = [h]
        for block in self.blocks:
            h = block(h)
            hs.append(h)
        return hs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.states(x)[-1])


def block_branch(block: nn.Module, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """f_l(h_l): the residual branch of a residual block, else its whole output."""
    return h_out - h_in if getattr(block, "residual", False) else h_out
