"""The rule base class: the credit contract every rule fulfils (docs/rules.md).

A local rule only says how it computes credit ``a_l`` for each hidden state ``h_l``:
``top_credit`` gives ``a_L``, ``layer_credit`` gives ``a_l`` for ``l < L`` (top-down, so a rule
may use ``a_{l+1}``; a rule with ``needs_vjp`` also receives the vector–Jacobian product of
``a_{l+1}`` through block ``l``, taken under its ``backward_context``). The one block-local
update they share is ``lcredit.rules.update``; what a run records (history, divergence, the
checkpoint's record) is the rule's ``Recorder`` (``lcredit.rules.recorder``).
"""
from __future__ import annotations

import contextlib
import math

import lightning as L
import torch
from torch import nn

from lcredit.errors import ConfigError
from lcredit.options import CheckedInit, NonNegative
from lcredit.models.base import CUDAGRAPH_MODES, BlockModel, compile_parts, state_shapes
from lcredit.rules.recorder import Recorder, locate_divergence
from lcredit.rules.update import (Pass, clip_blocks, cosine_schedule, local_pass,
                                  per_sample_loss, task_loss, trainable)


class Rule(CheckedInit, L.LightningModule):
    """A learning rule around a block model, with manual optimisation. Subclasses override
    ``top_credit`` / ``layer_credit`` (local rules) or ``compute_gradients`` / ``credit`` (bp)."""

    name = "rule"
    needs_vjp = False      # layer_credit wants the vjp of a_{l+1} through block l
    # a_L = g_L and a_l = vjp(a_{l+1}) exactly (fa layerwise, frozen): the block-by-block chain
    # then equals one backward pass through the rule's backward graph, which the shared update
    # may run as such (same numbers, one autograd call instead of one per block).
    credit_is_vjp = False
    trains_blocks = True   # frozen: blocks stay at their initialisation
    # The protocol's stability check (c) runs the update on a copy: it needs the block update
    # directions only, not a step of the rule's own estimator.
    aux_training = True
    # option -> its value in the original study's form (docs/rules.md Fidelity), for the options
    # where lcredit offers a switch of its own; ``form()`` says which of them a rule departs from.
    ORIGINAL: dict = {}

    option_group = "method"  # options are declared by annotation (docs/options.md)

    def __init__(self, model: BlockModel, input_shape, num_classes: int, optimizer=None,
                 penalty_lam: NonNegative = 0.0):
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.input_shape = tuple(input_shape)
        self.num_classes = int(num_classes)
        self.optimizer_factory = optimizer
        self.penalty_lam = float(penalty_lam)
        self.state_shapes = state_shapes(self.model, self.input_shape)
        self.recorder = Recorder(self.num_classes)
        # The run's settings, from the task and the top-level config (build.build_rule):
        self.loss_kind = "ce"
        self.run_config: dict | None = None  # the resolved run config (train; the checkpoint)
        self.costate = None     # the task's exact adjoint, when it has one (diagnostics)
        self.log_every = 50
        # block_grad_clip: each block's gradient norm clipped before the step (None: no clip)
        self.block_grad_clip: float | None = None
        self.compile_mode: str | None = None  # trainer.compile's torch.compile mode (None: eager)
        # fixed_network: only the rule's own estimator trains (the toy LQ's fixed system)
        self.fixed_network = False
        self.lr_schedule = "constant"   # or cosine over the run (the network's group)

    # ---------------------------------------------------------------- credit interface
    def top_credit(self, p: Pass) -> torch.Tensor:
        """a_L; by default the exact output-local gradient."""
        return p.g_top

    def layer_credit(self, l: int, p: Pass, vjp: torch.Tensor | None) -> torch.Tensor:
        """a_l for l < L, called top-down (``p.credits[l+1]`` is set)."""
        raise NotImplementedError

    # What ORIGINAL is the form of (ep's default is the literature's EP, not the study's).
    FORM_REFERENCE = "the original study"

    def form(self) -> dict:
        """Which form of the rule runs: ``original`` when every option with an lcredit switch
        has its reference value (docs/rules.md Fidelity), else the switches that depart from it.
        Options that do nothing in this configuration (``hL_dim`` without an _hL code) are not
        compared."""
        # an option whose attribute name is taken by a module (vec's ``field``) is ``<name>_form``
        value = {k: getattr(self, f"{k}_form", None) or getattr(self, k) for k in self.ORIGINAL}
        departures = {k: value[k] for k, v in self.ORIGINAL.items()
                      if value[k] != v and self.option_applies(k)}
        return {"original": not departures, "departures": departures,
                "original_values": dict(self.ORIGINAL), "reference": self.FORM_REFERENCE}

    def option_applies(self, option: str) -> bool:
        """Whether ``option`` changes anything in this rule's configuration."""
        return True

    def update_points(self, p: Pass):
        """Where the block-local update evaluates the blocks: None for the forward pass's own
        states (every rule but ep), else ``[(weight, states h_0..h_{L-1}, credits a_0..a_L)]``
        and block l's parameter gradient is sum_w w <f_l(states_l), a_{l+1}> / B."""
        return None

    def updates_model(self) -> bool:
        """False while a rule trains only its auxiliary state (prefit / refit phases), and for
        the whole run with ``fixed_network`` (the network is the fixed system whose credit the
        rule's estimator learns)."""
        return not self.fixed_network

    def train_auxiliary(self, p: Pass) -> None:
        """Accumulate the gradients of the rule's own estimator on this pass (none by default)."""

    def trains_auxiliary(self) -> bool:
        """Whether ``train_auxiliary`` does anything (it may read the pass's g_top)."""
        return type(self).train_auxiliary is not Rule.train_auxiliary

    def backward_context(self):
        """Context under which the forward pass is recorded (fa substitutes its feedback)."""
        return contextlib.nullcontext()

    def credit(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """The rule's per-layer credit a_0..a_L (per-sample units) on one batch; no update."""
        with torch.enable_grad():
            return [a.detach() for a in local_pass(self, x, y, update=False)[2]]

    # ---------------------------------------------------------------- the shared update
    def per_sample_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_sample_loss(self.loss_kind, logits, y)

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch-mean task loss (the loss BP descends; g_l is its gradient)."""
        return task_loss(self.loss_kind, logits, y)

    def compute_gradients(self, x: torch.Tensor, y: torch.Tensor):
        """Fill ``.grad`` of every trained parameter; return (batch-mean loss, logits)."""
        loss, logits, _ = local_pass(self, x, y, update=True)
        return loss, logits

    # ---------------------------------------------------------------- Lightning plumbing
    def optimized_parameters(self) -> list[nn.Parameter]:
        return trainable(self.model)

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups; the first is the network's (the one the learning-
        rate schedule follows), an estimator rule adds its own with ``aux_lr``."""
        return [{"params": self.optimized_parameters(), "name": "network"}]

    def make_optimizer(self):
        groups = [g for g in self.param_groups() if g["params"]]
        if self.optimizer_factory is None:
            return torch.optim.Adam(groups, lr=1e-3)
        return self.optimizer_factory(groups)

    def configure_optimizers(self):
        opt = self.make_optimizer()
        if self.lr_schedule == "constant":
            return opt
        return cosine_schedule(opt, int(getattr(self.trainer, "max_epochs", 0) or 0))

    def on_train_epoch_end(self):
        scheduler = self.lr_schedulers() if self.lr_schedule != "constant" else None
        if scheduler is not None:  # manual optimisation: the rule steps its own schedule
            scheduler.step()

    def forward(self, x):
        return self.model(x)

    def compile_model(self, mode: str | None) -> None:
        """trainer.compile: the model's embed, blocks and readout through torch.compile in
        ``mode`` (None: eager)."""
        self.compile_mode = mode
        if mode is not None:
            compile_parts(self.model, mode)

    def update(self, x: torch.Tensor, y: torch.Tensor, opt):
        """One optimizer step of the rule on (x, y): the training step without Lightning's
        bookkeeping. Returns (batch-mean loss, logits)."""
        if self.compile_mode in CUDAGRAPH_MODES:  # each step starts a new graph replay
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        loss, logits = self.compute_gradients(x, y)
        clip_blocks(self.model, self.block_grad_clip)
        opt.step()
        self.after_step()
        return loss, logits

    def after_step(self) -> None:
        """Called after every optimizer step (cb's target network follows its value net)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss, logits = self.update(x, y, self.optimizers())
        self.recorder.train_step(loss, logits, y, self.loss_kind == "ce")
        # self.log costs ~0.3 ms a call: log per step only every log_every batches.
        if batch_idx % self.log_every == 0:
            self.log("train/loss_step", loss, prog_bar=True, on_step=True, on_epoch=False)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        self.recorder.eval_step(self.task_loss(logits, y), logits, y, self.loss_kind == "ce")

    def check_trainer(self, trainer_cfg: dict) -> None:
        """Refuse trainer settings this rule's options cannot work with (before training)."""
        max_epochs = trainer_cfg.get("max_epochs")
        if self.lr_schedule == "cosine" and (max_epochs is None or max_epochs < 1):
            raise ConfigError(f"lr_schedule=cosine runs over trainer.max_epochs, which is "
                              f"{max_epochs}: set trainer.max_epochs, or lr_schedule=constant")

    def on_fit_start(self):
        self.log_every = max(1, int(getattr(self.trainer, "log_every_n_steps", 50) or 50))

    # ---------------------------------------------------------------- the recorder's hooks
    @property
    def history(self) -> list[dict]:
        """One row per epoch (results.json "history"), kept by the rule's recorder."""
        return self.recorder.history

    def on_train_epoch_start(self):
        self.recorder.epoch_start(self.device, self.trainer.global_step)

    def on_validation_epoch_start(self):
        self.recorder.train_end(self.device)

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            return
        row, bad_step = self.recorder.epoch_end(self.current_epoch + 1, self.loss_kind == "ce")
        if row is None:
            return
        self.log_dict({f"{split}/{m}": row[f"{split}_{m}"] for split in ("train", "test")
                       for m in ("loss", "acc") if row[f"{split}_{m}"] is not None},
                      prog_bar=True)
        if bad_step is not None:
            # A diverged run is stopped and reported as such, not trained on NaNs.
            self.recorder.divergence = locate_divergence(self, row["epoch"], bad_step)
            self.trainer.should_stop = True

    def divergence(self) -> dict | None:
        return self.recorder.divergence

    def on_save_checkpoint(self, checkpoint):
        checkpoint["lcredit"] = self.recorder.checkpoint_record(self.name, self.run_config)

    def on_load_checkpoint(self, checkpoint):
        self.recorder.load_record(checkpoint)

    # ---------------------------------------------------------------- helpers
    def state_dim(self, l: int) -> int:
        return math.prod(self.state_shapes[l])
