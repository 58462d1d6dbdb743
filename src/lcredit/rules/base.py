"""The rule base class and the one block-local update every local rule shares (docs/rules.md).

A local rule only says how it computes credit ``a_l`` for each hidden state ``h_l``:
``top_credit`` gives ``a_L``, ``layer_credit`` gives ``a_l`` for ``l < L`` (top-down, so a rule
may use ``a_{l+1}``; a rule with ``needs_vjp`` also receives the vector–Jacobian product of
``a_{l+1}`` through block ``l``, taken under its ``backward_context``). Everything else — the
forward pass cut at every block, the exact output-local readout gradient, the surrogate
``mean_batch <f_l(sg h_l), sg a_{l+1}>`` and ``penalty_lam`` — lives here, once.

Credit is in *per-sample* units: ``a_l`` estimates d(per-sample loss)/dh_l, so the exact credit
is ``B * g_l`` for the batch-mean gradient ``g_l``. The mean over the batch in the surrogate then
restores the batch-mean scale, and with ``a = B g`` the parameter gradients are exactly BP's.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lcredit.errors import ConfigError
from lcredit.options import CheckedInit, NonNegative
from lcredit.models.base import (CUDAGRAPH_MODES, BlockModel, block_branch, compile_parts,
                                 exact_credit, hidden_states, preserved_buffers, run_blocks)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Losses and credits are formed in float32 or better, even under bf16 autocast."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def no_autocast(device: torch.device):
    """Full precision for small differences (an O(beta) nudge, a finite-difference step): they
    are lost in bf16 rounding under an outer autocast."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def accumulate(params, grads) -> None:
    """Add ``grad`` into ``.grad`` (the optimizer applies it; rules never step)."""
    for p, g in zip(params, grads):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g.detach().to(p.dtype)
        else:
            p.grad.add_(g.to(p.dtype))


@dataclass
class Pass:
    """What a rule may look at when it computes credit for one minibatch."""

    x: torch.Tensor
    y: torch.Tensor
    logits: torch.Tensor          # detached
    states: list[torch.Tensor]    # h_0 .. h_L, detached
    g_top_value: torch.Tensor | None  # exact per-sample d loss / d h_L (output-local) ...
    credits: list = field(default_factory=list)  # filled top-down: credits[l] = a_l
    loss_kind: str = "ce"
    top_grad: object = None       # ... or what computes it, on the first read of g_top

    @property
    def g_top(self) -> torch.Tensor:
        if self.g_top_value is None and self.top_grad is not None:
            self.g_top_value = self.top_grad()
        return self.g_top_value

    @functools.cached_property
    def error(self) -> torch.Tensor:
        """e = d(per-sample loss)/d output: softmax(logits) - onehot(y) for cross-entropy,
        output - y for the quadratic cost."""
        out = at_least_fp32(self.logits)
        if self.loss_kind == "mse":
            return out - self.y.to(out.dtype)
        e = torch.softmax(out, dim=-1)
        return e - F.one_hot(self.y, e.shape[-1]).to(e.dtype)


class Rule(CheckedInit, L.LightningModule):
    """A learning rule wrapped around a block model, with manual optimisation.

    Subclasses override ``top_credit`` / ``layer_credit`` (local rules) or
    ``compute_gradients`` / ``credit`` outright (bp).
    """

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
        self.state_shapes = self._probe_state_shapes()
        # Per step, train metrics are three on-device adds (a torchmetrics update costs ~10x
        # that in Python); evaluation runs a few large batches and uses torchmetrics.
        # [loss sum, correct, samples, first non-finite batch of the epoch (-1: none), batches]
        self.register_buffer("_train_sums", torch.tensor([0, 0, 0, -1, 0], dtype=torch.float64),
                             persistent=False)
        self.test_loss = MeanMetric()
        self.test_acc = MulticlassAccuracy(self.num_classes, average="micro", validate_args=False)
        self.history: list[dict] = []       # one row per epoch (results.json "history")
        # (the protocol's findings are the Protocol callback's state, not the rule's)
        self.divergence_info: dict | None = None  # where and when the loss went non-finite
        self._epoch_start_step = 0
        self.frozen_baseline: dict | None = None
        self.run_config: dict | None = None
        self.loss_kind = "ce"   # set from the task by train.build_rule
        self.costate = None     # the task's exact adjoint, when it has one (diagnostics)
        self.log_every = 50
        # Clip each block's gradient norm before the step (null: no clip). The original ladder
        # study clipped its student's block updates; its clip norm is not recorded.
        self.block_grad_clip: float | None = None
        self._epoch_t0 = None
        self._train_time = None
        self.compile_mode: str | None = None  # trainer.compile's torch.compile mode (None: eager)
        # fixed_network (top-level config): the network never changes, only the rule's own
        # estimator trains (the toy LQ's fixed system, whose exact costate is the reference).
        self.fixed_network = False
        # lr_schedule (top-level config): constant, or cosine over the run (the network's group)
        self.lr_schedule = "constant"

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
            return [a.detach() for a in self._local_pass(x, y, update=False)[2]]

    # ---------------------------------------------------------------- the shared update
    def per_sample_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = at_least_fp32(logits)
        if self.loss_kind == "mse":
            return 0.5 * (out - y.to(out.dtype)).pow(2).flatten(1).sum(1)
        return F.cross_entropy(out, y, reduction="none")

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch-mean task loss (the loss BP descends; g_l is its gradient)."""
        if self.loss_kind == "mse":
            return self.per_sample_loss(logits, y).mean()
        return F.cross_entropy(at_least_fp32(logits), y)

    def compute_gradients(self, x: torch.Tensor, y: torch.Tensor):
        """Fill ``.grad`` of every trained parameter; return (batch-mean loss, logits)."""
        loss, logits, _ = self._local_pass(x, y, update=True)
        return loss, logits

    def _local_pass(self, x, y, update: bool):
        model, n = self.model, x.shape[0]
        blocks = list(model.blocks)
        depth = len(blocks)
        train_model = update and self.updates_model()
        # The penalty needs the block graphs a second time.
        penalise = train_model and self.trains_blocks and self.penalty_lam > 0
        if self.credit_is_vjp and self.needs_vjp and not penalise:
            return self._chained_pass(x, y, train_model)
        with self.backward_context():
            h0 = model.embed(x)
            ins, outs, h = [], [], h0
            for block in blocks:
                # Cut the graph at every block input: nothing below can see the loss.
                leaf = h.detach().requires_grad_(self.needs_vjp)
                h = block(leaf)
                ins.append(leaf)
                outs.append(h)
            top = h.detach().requires_grad_(True)
            logits = model.readout(top)
            loss = self.task_loss(logits, y)

        train_blocks = train_model and self.trains_blocks
        # Readout: its exact, output-local gradient; g_top is dLoss/dh_L (batch mean). Where
        # the update ends in one backward call (no vjp chain, no penalty), the readout's
        # gradient joins that call, and g_top is taken only if the rule's credit reads it (dfa's
        # never does): one autograd call for the whole update, as a plain loop makes it.
        one_call = train_model and not self.needs_vjp and not penalise
        head = trainable(model.readout) if train_model else []
        states = [h0.detach()] + [o.detach() for o in outs]
        if one_call:
            p = Pass(x, y, logits.detach(), states, None, [None] * (depth + 1), self.loss_kind,
                     top_grad=lambda: torch.autograd.grad(loss, top, retain_graph=True)[0]
                     .detach() * n)
        else:
            grads = torch.autograd.grad(loss, [top] + head)
            accumulate(head, grads[1:])
            p = Pass(x, y, logits.detach(), states, grads[0].detach() * n,
                     [None] * (depth + 1), self.loss_kind)
        p.credits[depth] = self.top_credit(p)

        if self.needs_vjp:
            for l in reversed(range(depth)):
                params = trainable(blocks[l]) if train_blocks else []
                # Scale the (small) credit by 1/n rather than every parameter gradient.
                a = (p.credits[l + 1] / n).to(outs[l].dtype)
                g = torch.autograd.grad(outs[l], [ins[l]] + params, a, retain_graph=penalise)
                accumulate(params, g[1:])
                p.credits[l] = self.layer_credit(l, p, g[0].detach() * n)
            if train_model and trainable(model.embed):
                torch.autograd.backward(h0, (p.credits[0] / n).to(h0.dtype),
                                        inputs=trainable(model.embed))
        else:
            for l in reversed(range(depth)):
                p.credits[l] = self.layer_credit(l, p, None)
            points = self.update_points(p) if train_blocks else None
            # (root, its incoming gradient) pairs and the parameters of one backward call
            roots, inputs = ([(loss, None)], list(head)) if one_call else ([], [])
            if train_blocks:
                inputs += [q for b in blocks for q in trainable(b)]
            if train_blocks and points is None:
                roots += [(outs[l], (p.credits[l + 1] / n).to(outs[l].dtype))
                          for l in range(depth)]
            elif train_blocks:
                # The blocks again, at the rule's own states (BatchNorm statistics untouched).
                with preserved_buffers(model):
                    for weight, at_states, credits in points:
                        at = [b(at_states[l].detach().to(outs[l].dtype))
                              for l, b in enumerate(blocks)]
                        roots += [(at[l], (weight * credits[l + 1] / n).to(at[l].dtype))
                                  for l in range(depth)]
            if train_model and trainable(model.embed):  # (an identity input layer has none)
                inputs += trainable(model.embed)
                roots.append((h0, (p.credits[0] / n).to(h0.dtype)))
            if one_call and self.aux_training and self.trains_auxiliary():
                p.g_top  # the estimator's objective reads it after this call frees the graph
            if roots and inputs:
                torch.autograd.backward([r for r, _ in roots], [g for _, g in roots],
                                        inputs=inputs, retain_graph=penalise)
        if penalise:
            torch.autograd.backward(self.penalty(blocks, ins, outs),
                                    inputs=[q for b in blocks for q in trainable(b)])
        if update and self.aux_training:
            self.train_auxiliary(p)
        return loss.detach(), logits.detach(), p.credits

    def _chained_pass(self, x, y, update: bool):
        """The block-local update for a rule whose credit is the vjp chain from the exact a_L,
        in one backward call. Each block's parameter gradient is still <f_l, a_{l+1}>'s: the
        gradient reaching h_{l+1} is a_{l+1} / B. The embedding is cut off and updated from
        a_0 like every other rule's; no penalty here (its gradient must stay block-local)."""
        model, n = self.model, x.shape[0]
        with self.backward_context():
            h0 = model.embed(x)
            states = run_blocks(model, h0.detach().requires_grad_(True))
            logits = model.readout(states[-1])
            loss = self.task_loss(logits, y)
        head = trainable(model.readout) if update else []
        body = [q for b in model.blocks for q in trainable(b)] if update and self.trains_blocks else []
        grads = torch.autograd.grad(loss, states + head + body)
        accumulate(head + body, grads[len(states):])
        credits = [g.detach() * n for g in grads[:len(states)]]
        if update and trainable(model.embed):
            torch.autograd.backward(h0, (credits[0] / n).to(h0.dtype),
                                    inputs=trainable(model.embed))
        return loss.detach(), logits.detach(), credits

    def penalty(self, blocks, ins, outs) -> torch.Tensor:
        """penalty_lam * sum over blocks of mean_batch ||f_l(h_l)||^2."""
        terms = [at_least_fp32(block_branch(b, i, o)).pow(2).flatten(1).sum(1).mean()
                 for b, i, o in zip(blocks, ins, outs)]
        return self.penalty_lam * torch.stack(terms).sum()

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
        # lr_schedule=cosine: the network's learning rate follows half a cosine from its value to
        # 0 over trainer.max_epochs (stepped at each epoch's end); an estimator keeps its aux_lr.
        epochs = max(int(getattr(self.trainer, "max_epochs", 0) or 0), 1)
        def cosine(e):
            return 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs))

        lambdas = [cosine if g.get("name") == "network" else (lambda e: 1.0)
                   for g in opt.param_groups]
        return {"optimizer": opt, "lr_scheduler": {
            "scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambdas), "interval": "epoch"}}

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
        self.clip_block_gradients()
        opt.step()
        self.after_step()
        return loss, logits

    def after_step(self) -> None:
        """Called after every optimizer step (cb's target network follows its value net)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss, logits = self.update(x, y, self.optimizers())
        sums = self._train_sums
        sums[0] += loss.detach() * len(y)
        if self.loss_kind == "ce":
            sums[1] += (logits.argmax(-1) == y).sum()
        sums[2] += len(y)
        # the first batch whose loss is non-finite, found on the device (no host sync)
        sums[3] = torch.where(~torch.isfinite(loss.detach()) & (sums[3] < 0), sums[4], sums[3])
        sums[4] += 1
        # self.log costs ~0.3 ms a call: log per step only every log_every batches.
        if batch_idx % self.log_every == 0:
            self.log("train/loss_step", loss, prog_bar=True, on_step=True, on_epoch=False)

    def clip_block_gradients(self) -> None:
        if self.block_grad_clip is not None:
            for block in self.model.blocks:
                nn.utils.clip_grad_norm_(trainable(block), self.block_grad_clip)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        self.test_loss.update(self.task_loss(logits, y), weight=len(y))
        if self.loss_kind == "ce":
            self.test_acc.update(logits, y)

    def check_trainer(self, trainer_cfg: dict) -> None:
        """Refuse trainer settings this rule's options cannot work with (before training)."""
        max_epochs = trainer_cfg.get("max_epochs")
        if self.lr_schedule == "cosine" and (max_epochs is None or max_epochs < 1):
            raise ConfigError(f"lr_schedule=cosine runs over trainer.max_epochs, which is "
                              f"{max_epochs}: set trainer.max_epochs, or lr_schedule=constant")

    def on_fit_start(self):
        self.log_every = max(1, int(getattr(self.trainer, "log_every_n_steps", 50) or 50))

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_epoch_start(self):
        self._sync()
        self._epoch_t0 = time.perf_counter()
        self._train_time = None
        self._epoch_start_step = self.trainer.global_step

    def on_validation_epoch_start(self):
        if self._epoch_t0 is not None and self._train_time is None:
            self._sync()
            self._train_time = time.perf_counter() - self._epoch_t0

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking or self._train_time is None:
            return
        loss_sum, correct, seen, first_bad, _ = self._train_sums.tolist()
        row = {
            "epoch": self.current_epoch + 1,
            "train_loss": loss_sum / seen if seen else math.nan,
            "train_acc": correct / seen if seen and self.loss_kind == "ce" else None,
            "test_loss": float(self.test_loss.compute()),
            "test_acc": float(self.test_acc.compute()) if self.loss_kind == "ce" else None,
            "train_time_s": self._train_time,
        }
        self._train_sums.copy_(torch.tensor([0, 0, 0, -1, 0], dtype=torch.float64))
        for m in (self.test_loss, self.test_acc):
            m.reset()
        self.history.append(row)
        self.log_dict({f"{split}/{m}": row[f"{split}_{m}"] for split in ("train", "test")
                       for m in ("loss", "acc") if row[f"{split}_{m}"] is not None},
                      prog_bar=True)
        if first_bad >= 0 or not math.isfinite(row["train_loss"]):
            # A diverged run is stopped and reported as such, not trained on NaNs.
            row["status"] = "diverged"
            self.divergence_info = self.locate_divergence(
                row["epoch"], self._epoch_start_step + int(max(first_bad, 0)))
            self.trainer.should_stop = True

    def locate_divergence(self, epoch: int, step: int) -> dict:
        """Where the run broke: the epoch and optimizer step of the first non-finite loss, and
        the first hidden state h_l that was non-finite in that step's forward pass. By then the
        parameters are non-finite everywhere, so the step is replayed: from the checkpoint the
        epoch started from (the previous epoch's, or the one saved before the first), through
        the same batches, in full precision (under bf16-mixed a replay may not reach the same
        point; the layer is then reported as unknown)."""
        info = {"epoch": int(epoch), "step": int(step), "first_nonfinite_layer": None}
        trainer = self._trainer
        cb = getattr(trainer, "checkpoint_callback", None) if trainer is not None else None
        loader = getattr(trainer, "train_dataloader", None) if trainer is not None else None
        path = (Path(cb.dirpath) / f"{cb.filename or 'last'}{cb.FILE_EXTENSION}"
                if cb is not None and cb.dirpath else None)
        if path is None or not path.is_file() or not hasattr(loader, "sampler"):
            info["note"] = "no checkpoint to replay the step from"
            return info
        ckpt = torch.load(path, map_location=self.device, weights_only=False)
        if int(ckpt.get("global_step", -1)) != self._epoch_start_step:
            info["note"] = "the checkpoint is not the one this epoch started from"
            return info
        # everything the replay touches comes back as it was: parameters and buffers (the
        # per-epoch sums too), and the train/eval mode (this runs from a validation hook)
        saved = copy.deepcopy(self.state_dict())
        buffers = {n: b.clone() for n, b in self.named_buffers()}
        was_training = self.training
        convert = getattr(getattr(trainer, "precision_plugin", None), "convert_input", None)
        try:
            self.train()
            self.load_state_dict(ckpt["state_dict"])
            opt = self.make_optimizer()
            opt.load_state_dict(ckpt["optimizer_states"][0])
            loader.sampler.set_epoch(epoch - 1)
            first = step - int(ckpt.get("global_step", 0))
            with torch.enable_grad():
                for i, batch in enumerate(loader):
                    x, y = convert(batch) if convert is not None else batch
                    if i == first:
                        with torch.no_grad():
                            states = hidden_states(self.model, x)
                        info["first_nonfinite_layer"] = next(
                            (l for l, h in enumerate(states) if not torch.isfinite(h).all()), None)
                        break
                    self.update(x, y, opt)
        except Exception as err:  # noqa: BLE001 — the report must survive a failed replay
            info["note"] = f"the step could not be replayed ({type(err).__name__}: {err})"[:200]
            return info
        finally:
            self.load_state_dict(saved)
            for n, b in self.named_buffers():
                b.copy_(buffers[n])
            self.train(was_training)
            self.zero_grad(set_to_none=True)
        if info["first_nonfinite_layer"] is None:
            info["note"] = "the replayed step stayed finite (the run broke outside the forward pass)"
        return info

    def divergence(self) -> dict | None:
        return self.divergence_info

    def on_save_checkpoint(self, checkpoint):
        checkpoint["lcredit"] = {"history": self.history, "config": self.run_config,
                                 "rule": self.name, "frozen_baseline": self.frozen_baseline,
                                 "divergence": self.divergence_info}

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get("lcredit", {})
        self.history = list(state.get("history", []))
        self.divergence_info = state.get("divergence")

    # ---------------------------------------------------------------- helpers
    @torch.no_grad()
    def _probe_state_shapes(self) -> list[torch.Size]:
        """Shapes of h_0..h_L (without the batch) from one forward on a dummy batch."""
        was_training = self.model.training
        self.model.eval()
        try:
            param = next(self.model.parameters())
            x = torch.zeros(2, *self.input_shape, device=param.device, dtype=param.dtype)
            shapes = [h.shape[1:] for h in hidden_states(self.model, x)]
        finally:
            self.model.train(was_training)
        return shapes

    def state_dim(self, l: int) -> int:
        return math.prod(self.state_shapes[l])


def local_update_gradients(model, x, credits, params) -> tuple:
    """Gradients for ``params`` of the block-local surrogate sum_l mean_batch
    <f_l(sg h_l), sg a_{l+1}> with the given per-sample credits (for a credit that is not a
    rule's: a function's, backprop's, a normalised one)."""
    with torch.enable_grad():
        h, outs = model.embed(x).detach(), []
        for block in model.blocks:
            outs.append(block(h))
            h = outs[-1].detach()
        n = x.shape[0]
        return torch.autograd.grad(outs, params, [(credits[l + 1] / n).to(o.dtype)
                                                  for l, o in enumerate(outs)],
                                   allow_unused=True)


def exact_gradients(model, x, y, loss_fn=None) -> tuple[list, list]:
    """(states, backprop's per-sample credit B * dLoss/dh_l) for the cross-entropy default."""
    return exact_credit(model, x, y,
                        loss_fn or (lambda logits, t: F.cross_entropy(at_least_fp32(logits), t)))
