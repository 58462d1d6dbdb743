"""Feedback alignment (Lillicrap et al. 2016), layerwise or blockwise.

Credit starts from the exact output-local gradient a_L = g_L and travels down block by block
with fixed random matrices in place of the transposed forward weights:

- ``layerwise``: inside every block, each linear layer's backward uses a fixed random matrix of
  its weight's shape in place of the weight; nonlinearity derivatives, normalisation backward
  and skip paths stay exact. The same substitution shapes the block's own parameter update (the
  delta reaching fc1 has passed through fc2's feedback matrix, as in the paper).
- ``blockwise``: a_l = B_l a_{l+1} with one fixed random dim(h_l) x dim(h_{l+1}) matrix per block.
"""
import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from lcredit.errors import check_choice
from lcredit.rules.base import Rule


class _FeedbackLinear(torch.autograd.Function):
    """y = x W^T + b whose input-gradient uses ``feedback`` (shape of W) instead of W."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback):
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, feedback = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ feedback.to(grad_out.dtype)
        flat_g = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            flat_x = x.reshape(-1, x.shape[-1]).to(flat_g.dtype)
            grad_w = (flat_g.T @ flat_x).to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat_g.sum(0).to(ctx.weight_dtype)
        return grad_x, grad_w, grad_b, None


def feedback_sites(module: nn.Module):
    """(qualified name, layer) of every layer whose backward FA replaces."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]


class FA(Rule):
    name = "fa"

    def __init__(self, model, input_shape, num_classes, optimizer=None, penalty_lam=0.0,
                 variant: str = "layerwise"):
        super().__init__(model, input_shape, num_classes, optimizer, penalty_lam)
        check_choice("method.variant", variant, ("layerwise", "blockwise"))
        self.variant = variant
        self.needs_vjp = variant == "layerwise"
        self._sites = []
        if variant == "layerwise":
            for name, layer in feedback_sites(self.model.blocks):
                buf = f"feedback_{name.replace('.', '_')}"
                self.register_buffer(buf, torch.empty(layer.weight.shape, dtype=layer.weight.dtype,
                                                      device=layer.weight.device))
                self._sites.append((layer, buf))
            if not self._sites:
                raise ValueError("fa(layerwise): the model's blocks contain no linear layer")
        else:
            for l in range(len(self.state_shapes) - 1):
                self.register_buffer(f"feedback_{l}",
                                     torch.empty(self.state_dim(l), self.state_dim(l + 1)))
        self.draw_feedback()

    @torch.no_grad()
    def draw_feedback(self, generator=None):
        """(Re)draw the fixed random matrices; diagnostics redraw a copy's for null_gamma."""
        if self.variant == "layerwise":
            for _, buf in self._sites:
                fb = getattr(self, buf)
                # Drawn like the layer's own init (kaiming-uniform bound 1/sqrt(fan_in)).
                bound = 1.0 / math.sqrt(fb.shape[1])
                fb.copy_(torch.rand(fb.shape, generator=generator) * (2 * bound) - bound)
        else:
            for l in range(len(self.state_shapes) - 1):
                fb = getattr(self, f"feedback_{l}")
                fb.copy_(torch.randn(fb.shape, generator=generator) * fb.shape[1] ** -0.5)

    @contextlib.contextmanager
    def backward_context(self):
        if self.variant != "layerwise":
            yield
            return
        for layer, buf in self._sites:
            fb = getattr(self, buf)
            layer.forward = (lambda x, _l=layer, _fb=fb:
                             _FeedbackLinear.apply(x, _l.weight, _l.bias, _fb))
        try:
            yield
        finally:
            for layer, _ in self._sites:
                del layer.forward

    def layer_credit(self, l, p, vjp):
        if self.variant == "layerwise":
            return vjp
        a_above = p.credits[l + 1].flatten(1)
        fb = getattr(self, f"feedback_{l}")
        return (a_above @ fb.T.to(a_above.dtype)).view(-1, *self.state_shapes[l])
