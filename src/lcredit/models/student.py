"""The learner for the synthetic teacher task: pre-LN residual MLP blocks, no terminal LayerNorm."""
from lcredit.models.resmlp import ResMLP


class Student(ResMLP):
    def __init__(self, input_shape, num_classes: int, d: int = 128, depth: int = 4,
                 mlp_ratio: float = 4.0, act: str = "gelu", residual: bool = True,
                 block_ln: bool = True, w2_std=None, input_layer: str = "linear"):
        super().__init__(input_shape, num_classes, d=d, depth=depth, mlp_ratio=mlp_ratio,
                         act=act, out_ln=False, residual=residual, block_ln=block_ln,
                         w2_std=w2_std, input_layer=input_layer)
