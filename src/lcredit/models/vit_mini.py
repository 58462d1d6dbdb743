"""A small vision transformer for 32x32 images; h_l is the whole token sequence."""
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from lcredit.errors import ConfigError
from lcredit.models.base import BlockModel
from lcredit.models.resmlp import ACTIVATIONS, Activation
from lcredit.options import Count, Positive, Range


class Attention(nn.Module):
    """Multi-head self-attention with explicit nn.Linear projections (fa replaces their backward)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    residual = True

    def __init__(self, d: int, heads: int, mlp_ratio: float, act: str):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        hidden = max(1, round(d * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(d, hidden), ACTIVATIONS[act](), nn.Linear(hidden, d))

    def forward(self, h):
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class PatchEmbed(nn.Module):
    def __init__(self, channels: int, d: int, patch: int, image_size: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, d, patch, stride=patch)
        n = (image_size // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        cls = self.cls.expand(x.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos


class ClassTokenReadout(nn.Module):
    def __init__(self, d: int, num_classes: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, h):
        return self.head(self.ln(h[:, 0]))


class ViTMini(BlockModel):
    image_input = True

    def __init__(self, input_shape, num_classes: int, d: Count = 128, depth: Count = 4,
                 heads: Count = 4, patch: Count = 4, mlp_ratio: Positive = 2.0,
                 act: Activation = "gelu", image_size: Annotated[int, Range(8)] = 32):
        super().__init__()
        if d % heads:
            raise ConfigError(f"model.d={d} must be divisible by model.heads={heads}")
        if image_size % patch:
            raise ConfigError(f"model.image_size={image_size} must be divisible by "
                              f"model.patch={patch}")
        self.embed = PatchEmbed(input_shape[0], d, patch, image_size)
        self.blocks = nn.ModuleList(TransformerBlock(d, heads, mlp_ratio, act)
                                    for _ in range(depth))
        self.readout = ClassTokenReadout(d, num_classes)
