"""Plain reference loops: each rule's math as a minimal PyTorch step on a ResMLP, with no
Lightning and no lcredit rule class. They are the baseline `scripts/bench.py` times lcredit
against, and the oracle tests/test_reference.py holds lcredit to: from the same initial
network, feedback matrices and batches, 20 steps of lcredit and of the loop end with the same
parameters.

Rules here: bp, dfa, fa (blockwise, the original study's; layerwise, Lillicrap's), frozen.
Not yet: ep, sb, cb, vec, blend (issue 13).

A step takes the model (embed / blocks / readout, ResMLP blocks ``h + fc2(act(fc1(ln(h))))``),
the rule's fixed feedback (``feedback``: dfa a list of (C, dim h_l) matrices B_0..B_L; fa
blockwise a list of (dim h_l, dim h_{l+1}) matrices; fa layerwise a dict from each block
linear layer to its (out, in) feedback), an optimizer and one batch.
"""
import torch
import torch.nn.functional as F


class FeedbackLinearFn(torch.autograd.Function):
    """x W^T + b whose input gradient goes through ``fb`` (shape of W) instead of W."""

    @staticmethod
    def forward(ctx, x, w, b, fb):
        ctx.save_for_backward(x, fb)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, fb = ctx.saved_tensors
        return g @ fb, g.T @ x, g.sum(0), None


def bp_step(model, feedback, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def frozen_step(model, feedback, opt, x, y):
    """Backprop's gradient for the embedding and the readout; ``opt`` holds only those."""
    bp_step(model, feedback, opt, x, y)


def fa_layerwise_step(model, feedback, opt, x, y):
    """One graph whose block linears send their input gradient through fixed random matrices."""
    opt.zero_grad(set_to_none=True)
    h = model.embed(x)
    for block in model.blocks:
        f = FeedbackLinearFn.apply(block.ln(h), block.fc1.weight, block.fc1.bias,
                                   feedback[block.fc1])
        f = FeedbackLinearFn.apply(block.act(f), block.fc2.weight, block.fc2.bias,
                                   feedback[block.fc2])
        h = h + f
    F.cross_entropy(model.readout(h), y).backward()
    opt.step()


def _cut_forward(model, x):
    """h_0 and every block's output, each block fed a detached input."""
    h0 = model.embed(x)
    outs, h = [], h0.detach()
    for block in model.blocks:
        h = block(h)
        outs.append(h)
        h = h.detach()
    return h0, outs, h.requires_grad_(True)


def dfa_step(model, feedback, opt, x, y):
    """Every block output (and h_0) gets e B_l, e = softmax - onehot over the batch size."""
    opt.zero_grad(set_to_none=True)
    h0, outs, top = _cut_forward(model, x)
    logits = model.readout(top)
    loss = F.cross_entropy(logits, y)
    e = (torch.softmax(logits.detach(), -1) - F.one_hot(y, logits.shape[-1])) / len(y)
    torch.autograd.backward([loss, h0, *outs], [None] + [e @ B for B in feedback])
    opt.step()


def fa_blockwise_step(model, feedback, opt, x, y):
    """a_L the exact gradient at h_L; a_l = a_{l+1} B_l^T down the blocks."""
    opt.zero_grad(set_to_none=True)
    h0, outs, top = _cut_forward(model, x)
    loss = F.cross_entropy(model.readout(top), y)
    loss.backward()                      # the readout's gradient, and top.grad = dLoss/dh_L
    a = top.grad
    credits = [a]
    for B in reversed(feedback):         # B_{L-1} .. B_0
        a = a @ B.T
        credits.append(a)
    credits.reverse()                    # a_0 .. a_L (batch-mean units)
    torch.autograd.backward([h0, *outs], credits)
    opt.step()


STEPS = {"bp": bp_step, "frozen": frozen_step, "dfa": dfa_step,
         "fa_layerwise": fa_layerwise_step, "fa_blockwise": fa_blockwise_step}


def trained_parameters(rule: str, model):
    """What the rule's optimizer holds: everything, or (frozen) the embedding and readout."""
    if rule == "frozen":
        return [*model.embed.parameters(), *model.readout.parameters()]
    return list(model.parameters())
