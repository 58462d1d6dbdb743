"""The one block-local update every local rule shares (docs/rules.md).

A rule says how it computes credit ``a_l`` (``top_credit``, ``layer_credit``); this module does
the rest, once: the forward pass cut at every block, the exact output-local readout gradient, the
surrogate ``mean_batch <f_l(sg h_l), sg a_{l+1}>`` and ``penalty_lam``.

Credit is in *per-sample* units: ``a_l`` estimates d(per-sample loss)/dh_l, so the exact credit
is ``B * g_l`` for the batch-mean gradient ``g_l``. The mean over the batch in the surrogate then
restores the batch-mean scale, and with ``a = B g`` the parameter gradients are exactly BP's.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lcredit.models.base import block_branch, exact_credit, preserved_buffers, run_blocks


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Losses and credits are formed in float32 or better, even under bf16 autocast."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def no_autocast(device: torch.device):
    """Full precision for small differences (an O(beta) nudge, a finite-difference step): they
    are lost in bf16 rounding under an outer autocast."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def per_sample_loss(kind: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss of each sample: cross-entropy ("ce") or the quadratic cost ("mse")."""
    out = at_least_fp32(logits)
    if kind == "mse":
        return 0.5 * (out - y.to(out.dtype)).pow(2).flatten(1).sum(1)
    return F.cross_entropy(out, y, reduction="none")


def task_loss(kind: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The batch-mean task loss (the loss BP descends; g_l is its gradient)."""
    if kind == "mse":
        return per_sample_loss(kind, logits, y).mean()
    return F.cross_entropy(at_least_fp32(logits), y)


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


@dataclass
class _Cut:
    """The forward pass cut at every block input: nothing below a block can see the loss."""

    h0: torch.Tensor
    ins: list[torch.Tensor]
    outs: list[torch.Tensor]
    top: torch.Tensor
    logits: torch.Tensor
    loss: torch.Tensor


def _cut_forward(rule, x, y) -> _Cut:
    model = rule.model
    with rule.backward_context():
        h0 = model.embed(x)
        ins, outs, h = [], [], h0
        for block in model.blocks:
            leaf = h.detach().requires_grad_(rule.needs_vjp)
            h = block(leaf)
            ins.append(leaf)
            outs.append(h)
        top = h.detach().requires_grad_(True)
        logits = model.readout(top)
        return _Cut(h0, ins, outs, top, logits, rule.task_loss(logits, y))


def local_pass(rule, x, y, update: bool):
    """The rule's credit a_0..a_L on (x, y), and with ``update`` its block-local gradients in
    ``.grad``. Returns (batch-mean loss, logits, credits)."""
    depth = len(rule.model.blocks)
    train_model = update and rule.updates_model()
    # The penalty needs the block graphs a second time.
    penalise = train_model and rule.trains_blocks and rule.penalty_lam > 0
    if rule.credit_is_vjp and rule.needs_vjp and not penalise:
        return chained_pass(rule, x, y, train_model)
    c = _cut_forward(rule, x, y)
    # Where the update ends in one backward call (no vjp chain, no penalty), the readout's
    # gradient joins that call, and g_top is taken only if the rule's credit reads it (dfa's
    # never does): one autograd call for the whole update, as a plain loop makes it.
    one_call = train_model and not rule.needs_vjp and not penalise
    p = _readout(rule, c, x, y, train_model, one_call)
    p.credits[depth] = rule.top_credit(p)
    if rule.needs_vjp:
        _vjp_chain(rule, c, p, train_model, penalise)
    else:
        for l in reversed(range(depth)):
            p.credits[l] = rule.layer_credit(l, p, None)
        _surrogate_backward(rule, c, p, train_model, one_call, penalise)
    if penalise:
        blocks = list(rule.model.blocks)
        torch.autograd.backward(penalty(rule.penalty_lam, blocks, c.ins, c.outs),
                                inputs=[q for b in blocks for q in trainable(b)])
    if update and rule.aux_training:
        rule.train_auxiliary(p)
    return c.loss.detach(), c.logits.detach(), p.credits


def _readout(rule, c: _Cut, x, y, train_model: bool, one_call: bool) -> Pass:
    """The readout's exact, output-local gradient, and the Pass with g_top = dLoss/dh_L
    (per-sample units), taken now or, in a one-call update, on its first read."""
    n, depth = x.shape[0], len(c.outs)
    states = [c.h0.detach()] + [o.detach() for o in c.outs]
    if one_call:
        return Pass(x, y, c.logits.detach(), states, None, [None] * (depth + 1), rule.loss_kind,
                    top_grad=lambda: torch.autograd.grad(c.loss, c.top, retain_graph=True)[0]
                    .detach() * n)
    head = trainable(rule.model.readout) if train_model else []
    grads = torch.autograd.grad(c.loss, [c.top] + head)
    accumulate(head, grads[1:])
    return Pass(x, y, c.logits.detach(), states, grads[0].detach() * n, [None] * (depth + 1),
                rule.loss_kind)


def _vjp_chain(rule, c: _Cut, p: Pass, train_model: bool, penalise: bool) -> None:
    """Credit down the blocks for a rule that reads the vjp of a_{l+1} through block l; each
    block's parameter gradient comes from the same autograd call."""
    model, n = rule.model, p.x.shape[0]
    blocks = list(model.blocks)
    for l in reversed(range(len(blocks))):
        params = trainable(blocks[l]) if train_model and rule.trains_blocks else []
        # Scale the (small) credit by 1/n rather than every parameter gradient.
        a = (p.credits[l + 1] / n).to(c.outs[l].dtype)
        g = torch.autograd.grad(c.outs[l], [c.ins[l]] + params, a, retain_graph=penalise)
        accumulate(params, g[1:])
        p.credits[l] = rule.layer_credit(l, p, g[0].detach() * n)
    if train_model and trainable(model.embed):
        torch.autograd.backward(c.h0, (p.credits[0] / n).to(c.h0.dtype),
                                inputs=trainable(model.embed))


def _surrogate_backward(rule, c: _Cut, p: Pass, train_model, one_call, penalise) -> None:
    """The block-local surrogate's gradients (and, in one call, the readout's) with the credits
    set: at the forward pass's own states, or at the rule's ``update_points``."""
    model, n = rule.model, p.x.shape[0]
    blocks, depth = list(model.blocks), len(c.outs)
    train_blocks = train_model and rule.trains_blocks
    points = rule.update_points(p) if train_blocks else None
    # (root, its incoming gradient) pairs and the parameters of one backward call
    roots = [(c.loss, None)] if one_call else []
    inputs = list(trainable(model.readout)) if one_call else []
    if train_blocks:
        inputs += [q for b in blocks for q in trainable(b)]
    if train_blocks and points is None:
        roots += [(c.outs[l], (p.credits[l + 1] / n).to(c.outs[l].dtype)) for l in range(depth)]
    elif train_blocks:
        # The blocks again, at the rule's own states (BatchNorm statistics untouched).
        with preserved_buffers(model):
            for weight, at_states, credits in points:
                at = [b(at_states[l].detach().to(c.outs[l].dtype)) for l, b in enumerate(blocks)]
                roots += [(at[l], (weight * credits[l + 1] / n).to(at[l].dtype))
                          for l in range(depth)]
    if train_model and trainable(model.embed):  # (an identity input layer has none)
        inputs += trainable(model.embed)
        roots.append((c.h0, (p.credits[0] / n).to(c.h0.dtype)))
    if one_call and rule.aux_training and rule.trains_auxiliary():
        p.g_top  # the estimator's objective reads it after this call frees the graph
    if roots and inputs:
        torch.autograd.backward([r for r, _ in roots], [g for _, g in roots],
                                inputs=inputs, retain_graph=penalise)


def chained_pass(rule, x, y, update: bool):
    """The block-local update for a rule whose credit is the vjp chain from the exact a_L,
    in one backward call. Each block's parameter gradient is still <f_l, a_{l+1}>'s: the
    gradient reaching h_{l+1} is a_{l+1} / B. The embedding is cut off and updated from
    a_0 like every other rule's; no penalty here (its gradient must stay block-local)."""
    model, n = rule.model, x.shape[0]
    with rule.backward_context():
        h0 = model.embed(x)
        states = run_blocks(model, h0.detach().requires_grad_(True))
        logits = model.readout(states[-1])
        loss = rule.task_loss(logits, y)
    head = trainable(model.readout) if update else []
    body = ([q for b in model.blocks for q in trainable(b)]
            if update and rule.trains_blocks else [])
    grads = torch.autograd.grad(loss, states + head + body)
    accumulate(head + body, grads[len(states):])
    credits = [g.detach() * n for g in grads[:len(states)]]
    if update and trainable(model.embed):
        torch.autograd.backward(h0, (credits[0] / n).to(h0.dtype), inputs=trainable(model.embed))
    return loss.detach(), logits.detach(), credits


def penalty(lam: float, blocks, ins, outs) -> torch.Tensor:
    """lam * sum over blocks of mean_batch ||f_l(h_l)||^2."""
    terms = [at_least_fp32(block_branch(b, i, o)).pow(2).flatten(1).sum(1).mean()
             for b, i, o in zip(blocks, ins, outs)]
    return lam * torch.stack(terms).sum()


def clip_blocks(model, clip: float | None) -> None:
    """block_grad_clip: each block's gradient norm clipped before the step (None: no clip). The
    original ladder study clipped its student's block updates; its clip norm is not recorded."""
    if clip is not None:
        for block in model.blocks:
            nn.utils.clip_grad_norm_(trainable(block), clip)


def cosine_schedule(opt: torch.optim.Optimizer, epochs: int) -> dict:
    """lr_schedule=cosine: the network's learning rate (the group named "network") follows half
    a cosine from its value to 0 over ``epochs`` (stepped at each epoch's end); an estimator's
    group keeps its aux_lr."""
    epochs = max(epochs, 1)

    def cosine(e):
        return 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs))

    lambdas = [cosine if g.get("name") == "network" else (lambda e: 1.0)
               for g in opt.param_groups]
    return {"optimizer": opt, "lr_scheduler": {
        "scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambdas), "interval": "epoch"}}


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
