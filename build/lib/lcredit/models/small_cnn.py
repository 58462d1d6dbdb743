"""A small CNN: a stem, three conv stages (conv + BatchNorm + act, 2x downsampling) and one
fully-connected stage as blocks, a linear head; no terminal LayerNorm."""
from torch import nn

from lcredit.errors import ConfigError, check_choice, check_range
from lcredit.models.base import BlockModel
from lcredit.models.resmlp import ACTIVATIONS


def conv_bn_act(c_in, c_out, act):
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            ACTIVATIONS[act]()]


class SmallCNN(BlockModel):
    image_input = True

    def __init__(self, input_shape, num_classes: int, widths=(32, 64, 128), fc_width: int = 256,
                 act: str = "relu", image_size: int = 32):
        super().__init__()
        check_choice("model.act", act, ACTIVATIONS)
        if not isinstance(widths, (list, tuple)) or len(widths) != 3:
            raise ConfigError(f"model.widths={widths!r} must list the 3 conv stages' channels")
        for w in widths:
            check_range("model.widths", w, 1, integer=True)
        widths = [int(w) for w in widths]
        check_range("model.image_size", image_size, 8, integer=True)
        check_range("model.fc_width", fc_width, 1, integer=True)
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
