"""Any module seen as embed / blocks / readout, through forward hooks (docs/diagnostics.md).

The protocol's metrics are functions of a model with ``embed`` / ``blocks`` / ``readout``
(lcredit's own models have them). ``HookedModel`` gives any ``nn.Module`` — a user's
LightningModule, torchvision's resnet18 — that shape without touching it: the user names the
modules that form the residual stream (``blocks``), and

- ``embed(x)`` = everything before the first block: the module runs on ``x`` and a forward
  pre-hook on the first block takes its input h_0 and stops the run there;
- ``blocks[l](h)`` = the user's block module itself (a block must map h_l to h_{l+1} alone,
  as a residual stream's blocks do);
- ``readout(h_L)`` = everything after the last block: the module runs again from the last
  input ``embed`` saw, and a forward hook on the last block replaces its output with h_L —
  slower than a model that exposes its readout, but exact for any architecture in which
  nothing after the last block reads anything but its output.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable

import torch
from torch import nn

from lcredit.errors import ConfigError


class _Stop(Exception):
    """Raised by the pre-hook of the first block: the rest of the forward is not needed."""


def find_blocks(module: nn.Module, blocks) -> tuple[list[str], list[nn.Module]]:
    """The block modules named by ``blocks``: names or glob patterns (``"net.layers.*"``,
    matched against ``named_modules()``, in the module's order), or a callable returning the
    modules. A name that matches nothing is refused, naming the nearest candidates."""
    named = dict(module.named_modules())
    if callable(blocks) and not isinstance(blocks, (str, nn.Module)):
        found = list(blocks(module))
        by_id = {id(m): n for n, m in named.items()}
        names = [by_id.get(id(m), f"<block {i}>") for i, m in enumerate(found)]
    else:
        patterns = [blocks] if isinstance(blocks, str) else list(blocks)
        names = []
        for p in patterns:
            hits = [n for n in named if n and fnmatch.fnmatchcase(n, p)
                    and "." not in n[len(p.rstrip("*")):]]  # "layers.*": children, not deeper
            if not hits:
                near = difflib.get_close_matches(p, [n for n in named if n], n=3)
                raise ConfigError(f"blocks: {p!r} names no submodule"
                                  + (f"; did you mean {', '.join(near)}?" if near else ""))
            names += [n for n in hits if n not in names]
        found = [named[n] for n in names]
    if not found:
        raise ConfigError("blocks: no block modules given (the residual stream's blocks, "
                          "e.g. blocks=['layer1', 'layer2'] or 'net.blocks.*')")
    return names, found


class HookedModel(nn.Module):
    """``module`` with ``embed`` / ``blocks`` / ``readout`` (see the module docstring).
    ``forward_fn(module, x)`` runs the module on an input (default ``module(x)``);
    ``embed_fn(module, x)`` / ``readout_fn(module, h)`` replace the hooks where the user has
    them at hand."""

    def __init__(self, module: nn.Module, blocks, forward_fn: Callable | None = None,
                 embed_fn: Callable | None = None, readout_fn: Callable | None = None):
        super().__init__()
        self.block_names, found = find_blocks(module, blocks)
        self.module = module
        self.blocks = nn.ModuleList(found)  # the same modules, shared with ``module``
        self.forward_fn = forward_fn or (lambda m, x: m(x))
        self.embed_fn, self.readout_fn = embed_fn, readout_fn
        self._last_x = None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self._last_x = x
        if self.embed_fn is not None:
            return self.embed_fn(self.module, x)
        seen = []

        def take(block, args):
            seen.append(args[0])
            raise _Stop

        handle = self.blocks[0].register_forward_pre_hook(take)
        try:
            self.forward_fn(self.module, x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not seen:
            raise ConfigError(f"blocks: {self.block_names[0]!r} never ran in the module's "
                              f"forward; name modules the forward pass goes through")
        return seen[0]

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        if self.readout_fn is not None:
            return self.readout_fn(self.module, h)
        if self._last_x is None:
            raise RuntimeError("HookedModel.readout before embed: no input to run from")

        def replace(block, args, out):
            return h

        x = self._last_x
        if len(x) != len(h):  # rho's perturbed copies: the prefix only has to reach the hook
            x = x[:1]
        handle = self.blocks[-1].register_forward_hook(replace)
        try:
            return self.forward_fn(self.module, x)
        finally:
            handle.remove()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_fn(self.module, x)
