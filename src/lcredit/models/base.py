import contextlib

import torch
from torch import nn

from lcredit.errors import ConfigError
from lcredit.options import CheckedInit


class BlockModel(CheckedInit, nn.Module):
    """``readout(blocks[L-1](...blocks[0](embed(x))))`` with the hidden states exposed.

    Subclasses set ``self.embed`` (module), ``self.blocks`` (``nn.ModuleList``) and
    ``self.readout`` (module). A block may set ``residual = True`` when its output is
    ``h + f(h)``; the penalty of docs/rules.md is then taken on ``f`` alone.
    """

    embed: nn.Module
    blocks: nn.ModuleList
    readout: nn.Module
    option_group = "model"  # a model's options are declared by annotation (docs/options.md)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def states(self, x: torch.Tensor) -> list[torch.Tensor]:
        return hidden_states(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(hidden_states(self, x)[-1])


# Rules and diagnostics call these, not methods, so any module with embed / blocks / readout
# works with them (docs/diagnostics.md: the Python API needs nothing else of a model).
def run_blocks(model, h: torch.Tensor, start: int = 0) -> list[torch.Tensor]:
    """[h_start, ..., h_L]: the blocks from ``start`` on, applied to ``h`` = h_start."""
    hs = [h]
    for block in list(model.blocks)[start:]:
        h = block(h)
        hs.append(h)
    return hs


def hidden_states(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Hidden states h_0 .. h_L (connected in one autograd graph)."""
    return run_blocks(model, model.embed(x))


@torch.no_grad()
def state_shapes(model, input_shape) -> list[torch.Size]:
    """Shapes of h_0..h_L (without the batch) from one forward on a dummy batch."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(2, *input_shape, device=param.device, dtype=param.dtype)
        return [h.shape[1:] for h in hidden_states(model, x)]
    finally:
        model.train(was_training)


def exact_credit(model, x, y, loss_fn) -> tuple[list, list]:
    """States h_l and backprop's per-sample credit B * dLoss/dh_l, where ``loss_fn(logits, y)``
    is the batch-mean task loss (the reference every rule is measured against)."""
    with torch.enable_grad():
        h0 = model.embed(x)
        if not h0.requires_grad:  # an identity input layer: h_0 is the input itself
            h0 = h0.detach().requires_grad_(True)
        hs = run_blocks(model, h0)
        loss = loss_fn(model.readout(hs[-1]), y)
        grads = torch.autograd.grad(loss * x.shape[0], hs)
    return [h.detach() for h in hs], [g.detach() for g in grads]


def block_branch(block: nn.Module, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """f_l(h_l): the residual branch of a residual block, else its whole output."""
    return h_out - h_in if getattr(block, "residual", False) else h_out



# trainer.compile: torch.compile's modes (true picks reduce-overhead on CUDA, default elsewhere).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# Modes that capture CUDA graphs: a graph replays fixed buffer addresses, and lcredit swaps
# buffers (preserved_buffers) for its extra passes, so models with buffers (BatchNorm) don't get them.
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
# Compiled variants a process may keep per code object: every compiled part shares one (the
# wrapper of nn.Module.compile), and each module type x batch shape x grad mode x train/eval
# is a variant. Torch's default (8) would leave later variants running eagerly, with a warning.
RECOMPILE_LIMIT = 256


def compile_mode(value, device: torch.device, model: nn.Module | None = None) -> str | None:
    """The torch.compile mode ``trainer.compile`` asks for on ``device`` (None: eager). true is
    reduce-overhead (CUDA graphs) on CUDA for a model without buffers, else inductor's default."""
    if value in (None, False):
        return None
    has_buffers = model is not None and any(True for _ in model.buffers())
    if value is True:
        return "reduce-overhead" if device.type == "cuda" and not has_buffers else "default"
    if value not in COMPILE_MODES:
        raise ConfigError(f"trainer.compile={value!r} must be false, true or one of "
                          f"{', '.join(COMPILE_MODES)}")
    if value in CUDAGRAPH_MODES and has_buffers:
        raise ConfigError(f"trainer.compile={value!r} captures CUDA graphs, which cannot follow "
                          f"the buffer swaps of this model's extra passes (it has buffers, e.g. "
                          f"BatchNorm); use default or max-autotune-no-cudagraphs")
    return value


def compile_parts(model: nn.Module, mode: str) -> None:
    """Compile the units every rule runs (embed, each block, readout), with static shapes, in
    place: parameter names, checkpoints and the rules' block-by-block calls stay as they are,
    and so does the math (the block graphs are fused, forward and backward). A deep copy of
    the model (the protocol's measuring copies) runs eagerly."""
    import torch._dynamo.config as dynamo

    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit,
                                             4 * RECOMPILE_LIMIT)
    for part in (model.embed, *model.blocks, model.readout):
        part.compile(mode=mode, dynamic=False)


@contextlib.contextmanager
def preserved_buffers(module: nn.Module):
    """Run extra forward passes (a relaxation, perturbed copies of a batch) on copies of every
    buffer, then put the originals back: BatchNorm in train mode would otherwise fold each pass
    into its running statistics. The originals are swapped, never written in place: the
    training pass's graph may have saved them."""
    originals = [(m, name, b) for m in module.modules()
                 for name, b in m.named_buffers(recurse=False)]
    for m, name, b in originals:
        setattr(m, name, b.clone())
    try:
        yield
    finally:
        for m, name, b in originals:
            setattr(m, name, b)
