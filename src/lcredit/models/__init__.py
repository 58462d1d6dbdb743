"""Block-structured models: every model exposes ``embed``, ``blocks`` and ``readout``.

Rules and diagnostics only ever touch those three parts, so a new architecture is one module
here and one yaml in ``conf/model/``.
"""
from lcredit.models.base import BlockModel, block_branch
from lcredit.models.resmlp import ResMLP

__all__ = ["BlockModel", "ResMLP", "block_branch"]
