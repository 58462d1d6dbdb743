"""Stopping a run cleanly on a signal: SIGINT, SIGTERM, SIGUSR1 and SIGUSR2 (a scheduler's
preemption or time-limit warning) stop the fit between batches, the run writes its checkpoint
and results, and the signal's previous handler (submitit's requeue) runs after that."""
from __future__ import annotations

import contextlib
import random
import signal
import threading
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


@contextlib.contextmanager
def preserved_rng():
    """Python's, numpy's and torch's (CPU and CUDA) global random states are as they were."""
    py, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(py)
    np.random.set_state(np_state)


class Interrupted(BaseException):
    """SIGINT or SIGTERM asked the run to stop (raised between batches, so the last checkpoint
    and the history agree)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


# SIGUSR2 is what submitit has SLURM send before a time limit (--signal=USR2@90); its handler
# requeues the job and exits at once, so lcredit takes the signal first, saves, then hands on.
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2")
                     if hasattr(signal, n))


def hand_on(signals: dict) -> None:
    """After an interrupted run is saved: the signal's previous Python handler, if any (under
    submitit: requeue the job, which then resumes from its checkpoint)."""
    signum = signals.get("signum")
    prev = (signals.get("previous") or {}).get(signum)
    if signum is not None and callable(prev) and prev is not signal.default_int_handler:
        prev(signum, None)


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT, SIGTERM, SIGUSR1 and SIGUSR2 (a scheduler's preemption or time-limit warning) set a flag
    that ``SignalStop`` turns into ``Interrupted`` at the next batch; a second SIGINT stops at
    once. The handlers that were there before (submitit's, which requeues the job) are kept in
    ``state["previous"]``, for ``hand_on`` once the checkpoint and results are written. Outside
    the main thread signals cannot be caught here, and the run keeps Python's defaults."""
    state = {"signum": None, "previous": {}}

    def handler(signum, frame):
        if state["signum"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        state["signum"] = signum

    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    old = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    state["previous"] = old
    for s in old:
        signal.signal(s, handler)
    try:
        yield state
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class SignalStop(Callback):
    """Stops the fit between batches once a signal arrived; makes sure a checkpoint exists to
    resume from before the first epoch ends (the epoch-0 state)."""

    def __init__(self, state: dict):
        self.state = state

    def _check(self):
        if self.state["signum"] is not None:
            raise Interrupted(self.state["signum"])

    def on_train_start(self, trainer, pl_module):
        ckpt_cb = trainer.checkpoint_callback
        if ckpt_cb is not None and ckpt_cb.dirpath:
            path = Path(ckpt_cb.dirpath) / f"{ckpt_cb.filename or 'last'}{ckpt_cb.FILE_EXTENSION}"
            if not path.exists():  # a fresh run, or one resumed into a new directory
                trainer.save_checkpoint(str(path))
        self._check()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._check()

    def on_validation_start(self, trainer, pl_module):
        self._check()
