"""The learner for the synthetic teacher task: pre-LN residual MLP blocks, no terminal LayerNorm."""
from lcredit.models.resmlp import ResMLP


class Student(ResMLP):
    # the options are ResMLP's (declared there), with the teacher's defaults
    def __init__(self, input_shape, num_classes, d=128, depth=4, mlp_ratio=4.0, act="gelu",
                 residual=True, block_ln=True, w2_std=None, input_layer="linear"):
        super().__init__(input_shape, num_classes, d=d, depth=depth, mlp_ratio=mlp_ratio,
                         act=act, out_ln=False, residual=residual, block_ln=block_ln,
                         w2_std=w2_std, input_layer=input_layer)
