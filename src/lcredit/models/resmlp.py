import math
from typing import Literal

import torch
from torch import nn

from lcredit.errors import ConfigError
from lcredit.models.base import BlockModel
from lcredit.options import Count, NonNegative, Positive

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "identity": nn.Identity}
Activation = Literal[tuple(ACTIVATIONS)]


class ResMLPBlock(nn.Module):
    """``h + W2 act(W1 LN(h))`` (pre-LN); without ``residual`` just the branch."""

    def __init__(self, d: int, hidden: int, act: str, residual: bool, block_ln: bool, w2_std):
        super().__init__()
        self.residual = residual
        self.ln = nn.LayerNorm(d) if block_ln else nn.Identity()
        self.fc1 = nn.Linear(d, hidden)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, d)
        if w2_std is not None:
            nn.init.normal_(self.fc2.weight, std=float(w2_std))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        f = self.fc2(self.act(self.fc1(self.ln(h))))
        return h + f if self.residual else f


class Readout(nn.Module):
    def __init__(self, d: int, num_classes: int, out_ln: bool):
        super().__init__()
        self.ln = nn.LayerNorm(d) if out_ln else nn.Identity()
        self.head = nn.Linear(d, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(h))


class ResMLP(BlockModel):
    """Flattened input → Linear(d) (``input_layer=identity``: the input itself) → L pre-LN
    residual MLP blocks → [LayerNorm] → Linear head."""

    def __init__(
        self,
        input_shape,
        num_classes: int,
        d: Count = 128,
        depth: Count = 4,
        mlp_ratio: Positive = 4.0,
        act: Activation = "gelu",
        out_ln: bool = True,
        residual: bool = True,
        block_ln: bool = True,
        w2_std: NonNegative | None = None,
        input_layer: Literal["linear", "identity"] = "linear",
    ):
        super().__init__()
        in_features = math.prod(input_shape)
        if input_layer == "identity" and in_features != d:
            raise ConfigError(f"model.input_layer=identity makes h_0 the flattened input, which "
                              f"has {in_features} features, not model.d={d}: set model.d="
                              f"{in_features} or model.input_layer=linear")
        hidden = max(1, round(d * mlp_ratio))
        # identity: h_0 = x (no embedding to train; the student of a teacher whose input is d-dim)
        self.embed = nn.Sequential(nn.Flatten(1), nn.Linear(in_features, d)
                                   if input_layer == "linear" else nn.Identity())
        self.blocks = nn.ModuleList(
            ResMLPBlock(d, hidden, act, residual, block_ln, w2_std) for _ in range(depth)
        )
        self.readout = Readout(d, num_classes, out_ln)
