"""What a run records about its rule, apart from the rule (docs/architecture.md): the per-step
train sums, the evaluation metrics, one history row per epoch (results.json "history"), the
epoch's training time, where a diverged run broke (by replaying the step), and the checkpoint's
lcredit record. A rule is given one ``Recorder``; its Lightning hooks hand over to it, so a new
rule's author reads only the credit interface and ``update``."""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lcredit.models.base import hidden_states

# [loss sum, correct, samples, first non-finite batch of the epoch (-1: none), batches]
_EMPTY_SUMS = (0, 0, 0, -1, 0)


class Recorder(nn.Module):
    """A submodule of the rule (its buffers follow the rule's device; none is persistent)."""

    def __init__(self, num_classes: int):
        super().__init__()
        # Per step, train metrics are three on-device adds (a torchmetrics update costs ~10x
        # that in Python); evaluation runs a few large batches and uses torchmetrics.
        self.register_buffer("sums", torch.tensor(_EMPTY_SUMS, dtype=torch.float64),
                             persistent=False)
        self.test_loss = MeanMetric()
        self.test_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.history: list[dict] = []       # one row per epoch (results.json "history")
        # (the protocol's findings are the Protocol callback's state, not the rule's)
        self.divergence: dict | None = None  # where and when the loss went non-finite
        self.frozen_baseline: dict | None = None  # the run's comparator (d), for the checkpoint
        self.epoch_start_step = 0
        self._t0 = None
        self._train_time = None

    # ---------------------------------------------------------------- per step
    def train_step(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                   classify: bool) -> None:
        sums = self.sums
        sums[0] += loss.detach() * len(y)
        if classify:
            sums[1] += (logits.argmax(-1) == y).sum()
        sums[2] += len(y)
        # the first batch whose loss is non-finite, found on the device (no host sync)
        sums[3] = torch.where(~torch.isfinite(loss.detach()) & (sums[3] < 0), sums[4], sums[3])
        sums[4] += 1

    def eval_step(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                  classify: bool) -> None:
        self.test_loss.update(loss, weight=len(y))
        if classify:
            self.test_acc.update(logits, y)

    # ---------------------------------------------------------------- per epoch
    def epoch_start(self, device: torch.device, global_step: int) -> None:
        _sync(device)
        self._t0 = time.perf_counter()
        self._train_time = None
        self.epoch_start_step = global_step

    def train_end(self, device: torch.device) -> None:
        """At the first evaluation of the epoch: the training time stops."""
        if self._t0 is not None and self._train_time is None:
            _sync(device)
            self._train_time = time.perf_counter() - self._t0

    def epoch_end(self, epoch: int, classify: bool) -> tuple[dict | None, int | None]:
        """The epoch's history row (None in a sanity check, before any training), and the
        optimizer step of its first non-finite loss (None: none). The row of a diverged epoch
        says ``status: diverged`` (the caller stops the run)."""
        if self._train_time is None:
            return None, None
        loss_sum, correct, seen, first_bad, _ = self.sums.tolist()
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / seen if seen else math.nan,
            "train_acc": correct / seen if seen and classify else None,
            "test_loss": float(self.test_loss.compute()),
            "test_acc": float(self.test_acc.compute()) if classify else None,
            "train_time_s": self._train_time,
        }
        self.sums.copy_(torch.tensor(_EMPTY_SUMS, dtype=torch.float64))
        for m in (self.test_loss, self.test_acc):
            m.reset()
        self.history.append(row)
        if first_bad >= 0 or not math.isfinite(row["train_loss"]):
            row["status"] = "diverged"
            return row, self.epoch_start_step + int(max(first_bad, 0))
        return row, None

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_record(self, rule_name: str, run_config: dict | None) -> dict:
        return {"history": self.history, "config": run_config, "rule": rule_name,
                "frozen_baseline": self.frozen_baseline, "divergence": self.divergence}

    def load_record(self, checkpoint: dict) -> None:
        state = checkpoint.get("lcredit", {})
        self.history = list(state.get("history", []))
        self.divergence = state.get("divergence")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def locate_divergence(rule, epoch: int, step: int) -> dict:
    """Where the run broke: the epoch and optimizer step of the first non-finite loss, and
    the first hidden state h_l that was non-finite in that step's forward pass. By then the
    parameters are non-finite everywhere, so the step is replayed: from the checkpoint the
    epoch started from (the previous epoch's, or the one saved before the first), through
    the same batches, in full precision (under bf16-mixed a replay may not reach the same
    point; the layer is then reported as unknown)."""
    info = {"epoch": int(epoch), "step": int(step), "first_nonfinite_layer": None}
    trainer = rule._trainer
    cb = getattr(trainer, "checkpoint_callback", None) if trainer is not None else None
    loader = getattr(trainer, "train_dataloader", None) if trainer is not None else None
    path = (Path(cb.dirpath) / f"{cb.filename or 'last'}{cb.FILE_EXTENSION}"
            if cb is not None and cb.dirpath else None)
    if path is None or not path.is_file() or not hasattr(loader, "sampler"):
        info["note"] = "no checkpoint to replay the step from"
        return info
    ckpt = torch.load(path, map_location=rule.device, weights_only=False)
    if int(ckpt.get("global_step", -1)) != rule.recorder.epoch_start_step:
        info["note"] = "the checkpoint is not the one this epoch started from"
        return info
    # everything the replay touches comes back as it was: parameters and buffers (the
    # per-epoch sums too), and the train/eval mode (this runs from a validation hook)
    saved = copy.deepcopy(rule.state_dict())
    buffers = {n: b.clone() for n, b in rule.named_buffers()}
    was_training = rule.training
    try:
        info["first_nonfinite_layer"] = _replay(rule, ckpt, loader, epoch, step, trainer)
    except Exception as err:  # noqa: BLE001 — the report must survive a failed replay
        info["note"] = f"the step could not be replayed ({type(err).__name__}: {err})"[:200]
        return info
    finally:
        rule.load_state_dict(saved)
        for n, b in rule.named_buffers():
            b.copy_(buffers[n])
        rule.train(was_training)
        rule.zero_grad(set_to_none=True)
    if info["first_nonfinite_layer"] is None:
        info["note"] = "the replayed step stayed finite (the run broke outside the forward pass)"
    return info


def _replay(rule, ckpt, loader, epoch: int, step: int, trainer) -> int | None:
    """From ``ckpt``, the rule's updates through the epoch's batches up to ``step``; the first
    non-finite h_l of that step's forward pass."""
    convert = getattr(getattr(trainer, "precision_plugin", None), "convert_input", None)
    rule.train()
    rule.load_state_dict(ckpt["state_dict"])
    opt = rule.make_optimizer()
    opt.load_state_dict(ckpt["optimizer_states"][0])
    loader.sampler.set_epoch(epoch - 1)
    first = step - int(ckpt.get("global_step", 0))
    with torch.enable_grad():
        for i, batch in enumerate(loader):
            x, y = convert(batch) if convert is not None else batch
            if i == first:
                with torch.no_grad():
                    states = hidden_states(rule.model, x)
                return next((l for l, h in enumerate(states) if not torch.isfinite(h).all()),
                            None)
            rule.update(x, y, opt)
    return None
