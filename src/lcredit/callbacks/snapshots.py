"""Checkpoints after chosen epochs (``snapshot_epochs``), for studies that branch from a run
part-way (a DFA run at t0 handed to vec) or probe it at several ages (bp at epochs 5, 20, 100)."""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import Callback


class Snapshots(Callback):
    """``<dir>/epoch=<e>.ckpt`` once epoch ``e`` is done (its validation and protocol
    measurement included, so the snapshot's history ends with that epoch's row); ``e = 0`` is
    the network before any training."""

    def __init__(self, epochs, dirpath):
        self.epochs = sorted({int(e) for e in epochs})
        self.dirpath = Path(dirpath)

    def _save(self, trainer, epoch: int) -> None:
        path = self.dirpath / f"epoch={epoch}.ckpt"
        if epoch in self.epochs and not path.exists():
            self.dirpath.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(str(path))

    def on_train_start(self, trainer, pl_module):
        self._save(trainer, 0)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._save(trainer, len(pl_module.history))
