"""A small CNN: a stem, three conv stages (conv + BatchNorm + act, 2x downsampling) and one
fully-connected stage as blocks, a linear head; no terminal LayerNorm."""
from typing import Annotated

from torch import nn

from lcredit.errors import ConfigError
from lcredit.models.base import BlockModel
from lcredit.models.resmlp import ACTIVATIONS, Activation
from lcredit.options import Count, Range


def conv_bn_act(c_in, c_out, act):
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            ACTIVATIONS[act]()]


class SmallCNN(BlockModel):
    image_input = True

    def __init__(self, input_shape, num_classes: int,
                 widths: tuple[Count, ...] = (32, 64, 128), fc_width: Count = 256,
                 act: Activation = "relu", image_size: Annotated[int, Range(8)] = 32):
        super().__init__()
        if len(widths) != 3:
            raise ConfigError(f"model.widths={widths!r} must list the 3 conv stages' channels")
        widths = [int(w) for w in widths]
        channels, h, w = input_shape
        self.embed = nn.Sequential(*conv_bn_act(channels, widths[0], act))
        stages, c = [], widths[0]
        for out in widths:
            stages.append(nn.Sequential(*conv_bn_act(c, out, act), nn.MaxPool2d(2)))
            c, h, w = out, h // 2, w // 2
        stages.append(nn.Sequential(nn.Flatten(1), nn.Linear(c * h * w, fc_width),
                                    ACTIVATIONS[act]()))
        self.blocks = nn.ModuleList(stages)
        self.readout = nn.Linear(fc_width, num_classes)
