"""Block-structured models: every model exposes ``embed``, ``blocks`` and ``readout``.

Rules and diagnostics only ever touch those three parts, so a new architecture is one module
here and one yaml in ``conf/model/``. A model that needs image input sets ``image_input = True``
and takes ``image_size``; the task is then given to it as (C, image_size, image_size).
"""
from lcredit.models.base import BlockModel, block_branch, exact_credit, hidden_states, run_blocks
from lcredit.models.resmlp import ResMLP
from lcredit.models.small_cnn import SmallCNN
from lcredit.models.student import Student
from lcredit.models.vit_mini import ViTMini

__all__ = ["BlockModel", "ResMLP", "SmallCNN", "Student", "ViTMini", "block_branch",
           "exact_credit", "hidden_states", "run_blocks"]
