"""Feedback alignment, blockwise (the original study's form, the default) or layerwise
(Lillicrap et al. 2016).

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

from typing import Literal

from lcredit.errors import ConfigError
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
        dt = grad_out.dtype
        if feedback.dtype != dt:  # under autocast the incoming gradient may be bf16
            feedback, x = feedback.to(dt), x.to(dt)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ feedback
        if grad_out.dim() > 2:  # token sequences: (batch, tokens, features)
            grad_out, x = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = (grad_out.T @ x).to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0).to(ctx.weight_dtype)
        return grad_x, grad_w, grad_b, None


class _FeedbackConv2d(torch.autograd.Function):
    """conv2d whose input-gradient uses ``feedback`` (shape of the kernel) instead of it."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, stride, padding, dilation, groups):
        ctx.save_for_backward(x, feedback)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, feedback = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, feedback.to(grad_out.dtype), grad_out,
                                                stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            grad_w = torch.nn.grad.conv2d_weight(x.to(grad_out.dtype), feedback.shape, grad_out,
                                                 stride, padding, dilation, groups)
            grad_w = grad_w.to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3)).to(ctx.weight_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _feedback_forward(layer, fb):
    if isinstance(layer, nn.Linear):
        return lambda x: _FeedbackLinear.apply(x, layer.weight, layer.bias, fb)
    if layer.padding_mode != "zeros":
        raise ValueError(f"fa(layerwise): {layer} uses padding_mode={layer.padding_mode!r}")
    return lambda x: _FeedbackConv2d.apply(x, layer.weight, layer.bias, fb, layer.stride,
                                           layer.padding, layer.dilation, layer.groups)


def feedback_sites(module: nn.Module):
    """(qualified name, layer) of every layer whose backward FA replaces: the linear and
    convolution layers. Attention cores, normalisation and activations keep exact backward."""
    return [(name, m) for name, m in module.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))]


# Largest dense blockwise feedback matrix (entries): 2^24 floats = 64 MB.
MAX_DENSE_FEEDBACK = 2**24


class FA(Rule):
    name = "fa"
    # The original study's FA is blockwise (docs/rules.md Fidelity); layerwise is Lillicrap's.
    ORIGINAL = {"variant": "blockwise"}

    def __init__(self, model, input_shape, num_classes, optimizer=None, penalty_lam=0.0,
                 variant: Literal["blockwise", "layerwise"] = "blockwise"):
        super().__init__(model, input_shape, num_classes, optimizer, penalty_lam)
        self.variant = variant
        self.needs_vjp = self.credit_is_vjp = variant == "layerwise"
        self._sites = []
        if variant == "layerwise":
            for name, layer in feedback_sites(self.model.blocks):
                buf = f"feedback_{name.replace('.', '_')}"
                self.register_buffer(buf, torch.empty(layer.weight.shape, dtype=layer.weight.dtype,
                                                      device=layer.weight.device))
                self._sites.append((layer, buf))
            if not self._sites:
                raise ConfigError("method=fa variant=layerwise: the model's blocks contain no "
                                  "linear or convolution layer; use variant=blockwise")
        else:
            self._tokenwise = []
            for l in range(len(self.state_shapes) - 1):
                s_in, s_out = self.state_shapes[l], self.state_shapes[l + 1]
                # A token sequence keeps its shape through a block: one d x d matrix per block,
                # shared by the tokens (docs/rules.md: "B_l fixed random d x d").
                tokenwise = len(s_in) == 2 and s_in == s_out
                self._tokenwise.append(tokenwise)
                shape = (s_in[-1], s_out[-1]) if tokenwise else (self.state_dim(l),
                                                                 self.state_dim(l + 1))
                if shape[0] * shape[1] > MAX_DENSE_FEEDBACK:
                    raise ConfigError(
                        f"method.variant=blockwise: block {l} maps {tuple(s_in)} -> "
                        f"{tuple(s_out)}, which needs a {shape[0]}x{shape[1]} feedback matrix "
                        f"({shape[0] * shape[1] * 4 / 2**30:.1f} GiB); use "
                        f"method.variant=layerwise for this model")
                self.register_buffer(f"feedback_{l}", torch.empty(shape))
        self.draw_feedback()

    @torch.no_grad()
    def draw_feedback(self, generator=None):
        """(Re)draw the fixed random matrices; diagnostics redraw a copy's for null_gamma."""
        if self.variant == "layerwise":
            for _, buf in self._sites:
                fb = getattr(self, buf)
                # Drawn like the layer's own init (kaiming-uniform bound 1/sqrt(fan_in)).
                bound = 1.0 / math.sqrt(fb[0].numel())
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
            layer.forward = _feedback_forward(layer, getattr(self, buf))
        try:
            yield
        finally:
            for layer, _ in self._sites:
                del layer.forward

    def layer_credit(self, l, p, vjp):
        if self.variant == "layerwise":
            return vjp
        fb = getattr(self, f"feedback_{l}")
        a_above = p.credits[l + 1]
        if self._tokenwise[l]:
            return a_above @ fb.T.to(a_above.dtype)
        return (a_above.flatten(1) @ fb.T.to(a_above.dtype)).view(-1, *self.state_shapes[l])
