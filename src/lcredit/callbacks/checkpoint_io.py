"""Checkpoints written whole or not at all: Lightning's ``torch.save`` checkpoint, staged in the
checkpoint's own directory and renamed over the previous one (lcredit.files)."""
from __future__ import annotations

import io
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lcredit.files import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoints, written by :func:`atomic_write` (local paths;
    a remote URL goes through Lightning's writer as before)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, buffer.getbuffer())
