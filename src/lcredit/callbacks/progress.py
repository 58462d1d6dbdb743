"""One line per epoch where stdout is not a terminal (SLURM, joblib, CI logs): a progress bar's
every redraw would otherwise land in the log."""
from __future__ import annotations

import sys

from lightning.pytorch.callbacks import Callback


def _num(v, fmt=".4f") -> str:
    return "—" if v is None else format(v, fmt)


class EpochLine(Callback):
    # after the epoch's validation and the protocol's measurement (both come before it)
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not getattr(pl_module, "history", None):
            return
        r = pl_module.history[-1]
        hidden = ((r.get("protocol") or {}).get("aggregates") or {}).get("gamma_hidden")
        verdict = (r.get("protocol") or {}).get("verdict")
        line = (f"epoch {r['epoch']}/{trainer.max_epochs} · train loss {_num(r.get('train_loss'))}"
                f" acc {_num(r.get('train_acc'))} · test loss {_num(r.get('test_loss'))}"
                f" acc {_num(r.get('test_acc'))} · {_num(r.get('train_time_s'), '.1f')} s")
        growth = (((r.get("protocol") or {}).get("diagnostics") or {}).get("a") or {}).get("value")
        if growth is not None:  # measured every epoch (protocol.cheap_every)
            line += f" · growth {growth:.3g}"
        if hidden is not None:
            line += f" · gamma_hidden {hidden:.4f} · {verdict}"
        print(line, file=sys.stdout, flush=True)
