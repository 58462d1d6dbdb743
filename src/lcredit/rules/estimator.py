"""What the learned credit estimators (sb, cb, vec, blend) share (docs/rules.md).

An estimator rule is DFA plus a trained auxiliary network: its fixed feedback is the fallback
credit (cb's warm-up, ``topdown``'s lower blocks, the blend's other half), and the auxiliary
network is trained on its own objective from every minibatch the rule sees, through the
``train_auxiliary`` hook of the shared block-local update. Both live in the rule's state, so
every checkpoint carries them.

Phases, by epoch (``phase``):
- ``fit``: only the estimator trains, on the frozen network (``prefit_epochs``, and the refit
  epochs of ``periodic_refit``);
- ``warmup``: the blocks follow DFA while the estimator trains (``warmup_ratio`` of the epochs);
- ``rule``: the blocks follow the estimator's credit (for the blocks ``topdown`` selects).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, TypedDict, get_args

import torch
import torch.nn.functional as F
from torch import nn

from lcredit.errors import ConfigError
from lcredit.models.base import preserved_buffers
from lcredit.options import Count, Fraction, Index, NonNegative, Positive, _plain, check_options
from lcredit.rules.base import Pass
from lcredit.rules.update import at_least_fp32, trainable
from lcredit.rules.dfa import DFA

SType = Literal["none", "eT", "deltaL", "eT_hL", "deltaL_hL"]
S_TYPES = get_args(SType)


# true / "sample": docs/rules.md's a / (RMS(a) + 1e-6) with each sample's own RMS (the original form);
# "batch": lcredit's switch, the RMS over the layer's whole batch of credit.
CREDIT_NORMS = {True: "sample", False: None, "batch": "batch", "sample": "sample", "none": None}
CreditNorm = Literal[True, False, "batch", "sample", "none"]


class Refit(TypedDict):
    """``periodic_refit``: every ``every`` epochs, ``epochs`` epochs of refit."""
    every: Count
    epochs: Count


def credit_rms(a: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """The RMS of ``a`` over the whole tensor, or per sample (shaped to broadcast against a)."""
    if per_sample:
        return a.flatten(1).pow(2).mean(1).sqrt().view(-1, *([1] * (a.ndim - 1)))
    return a.pow(2).mean().sqrt()


def rms_normalise(a: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """credit_norm: a / (RMS(a) + 1e-6), the RMS over each sample's own credit (docs/rules.md's form,
    ``credit_norm: sample``) or over the layer's whole batch (``credit_norm: batch``).

    Per-sample normalisation gives a sample the model already gets right (tiny e, tiny
    gradient) the same push as a misclassified one; on the ladder it lets the residual stream
    grow by orders of magnitude even under a well-aligned credit field; the batch RMS keeps each
    sample's relative weight (scripts/ladder_credit.py measures both)."""
    return a / (credit_rms(a, per_sample) + 1e-6)


Field = Literal["concat", "gated"]
# A size (noise, step, loss) taken as it is, or relative to the size of what it applies to.
Scale = Literal["absolute", "relative"]
# A squared-error loss summed over its entries per sample (``absolute``), relative to its
# target's size (``relative``), or the mean over all its entries (``mean``: F.mse_loss's).
LossScale = Literal["absolute", "relative", "mean"]
# How the layer index t enters the concat field (see CreditNet).
LayerCode = Literal["add", "embed", "scalar", "onehot"]
FIELDS, SCALES, LOSS_SCALES, LAYER_CODES = map(get_args, (Field, Scale, LossScale, LayerCode))
EMBED_DIM = 16  # layer_code=embed: the learned embedding's size


class CreditNet(nn.Module):
    """``net(h, t, s)`` for every layer t = 0..L: the network of cb's value and vec's field.

    ``form``:

    - ``concat``: a plain MLP on the concatenation of its inputs, ``[flatten(h), code(t), s]``
      → width → width → output. Its first linear layer is written as the sum of one linear map
      per input (the same function); where the layers' states differ in size (a CNN's stages)
      the h part of that layer, and the output layer, are per layer, since one matrix cannot
      take them all. ``ln=True`` layer-normalises h first (the original study's estimator input,
      ``[LN(h_l), time_embed(t_l), s]``). ``layer_code`` says how t enters:

      - ``add``: a learned N(0,1) vector of the network's width added to the first layer's
        pre-activation (one reading of "an embedding of t"; it dominates that layer, so every
        sample starts with nearly the same output);
      - ``embed``: a learned N(0,1) embedding of 16 numbers, concatenated like any input;
      - ``scalar``: t / L as one input; ``onehot``: the one-hot of t as inputs.

      With a concatenated code the first layer is initialised as one ``nn.Linear`` over the
      whole concatenation would be (bound 1/sqrt(total fan-in)).
    - ``gated`` (lcredit's, ``method.field=gated``): h is layer-normalised first (a growing
      residual stream does not saturate it), each layer has its own input projection and output
      head, and the output is *linear in s*: the features gate a bias-free projection of s.
      The true credit has that form (g_l = J_l^T e for cross-entropy), so the field starts,
      like DFA, with a credit that averages out over samples — an additive code gives every
      sample the same initial push, and the blocks drift along it. A scalar net (cb's value)
      adds an s-free term for the value's offset.

    ``inputs``: ``full`` (h, t, s), ``time_only`` (t alone), ``constant`` (one constant input:
    no sample, no layer index, no code — one shared output for every layer, cut to each layer's
    size).
    """

    def __init__(self, dims: list[int], cond_dim: int, width: int, out: str = "vector",
                 inputs: str = "full", form: str = "concat", ln: bool = False,
                 layer_code: str = "add"):
        super().__init__()
        self.dims, self.out, self.inputs, self.form = list(dims), out, inputs, form
        shared = len(set(dims)) == 1 and form == "concat"
        self.shared = shared
        gated = form == "gated"
        self.ln = bool(ln) or gated
        # time_only / constant inputs and the gated form keep the additive code
        self.layer_code = layer_code if inputs == "full" and not gated else "add"
        self.embed_in = nn.ModuleList(nn.Linear(d, width) for d in (dims[:1] if shared else dims))
        code_in = {"add": 0, "embed": EMBED_DIM, "scalar": 1, "onehot": len(dims)}[self.layer_code]
        self.layer = (nn.Embedding(len(dims), EMBED_DIM if self.layer_code == "embed" else width)
                      if self.layer_code in ("add", "embed") else None)
        self.code = nn.Linear(code_in, width, bias=False) if code_in else None
        self.trunk = nn.Sequential(nn.GELU(), nn.Linear(width, width), nn.GELU())
        use_code = bool(cond_dim) and inputs == "full"  # time_only / constant see no code either
        self.cond = nn.Linear(cond_dim, width, bias=False) if use_code else None
        if out == "scalar":
            n_out = [1]
        elif inputs == "constant":
            n_out = [max(dims)]
        else:
            n_out = dims[:1] if shared else dims
        self.heads = nn.ModuleList(nn.Linear(width, d, bias=not (gated and use_code))
                                   for d in n_out)
        self.offset = (nn.Linear(width, 1) if gated and out == "scalar" and use_code else None)
        if self.code is not None:
            # one nn.Linear over [h, code(t), s]: every part of it shares the default bound
            with torch.no_grad():
                for i, lin in enumerate(self.embed_in):
                    fan_in = (dims[i] if not shared else dims[0]) + code_in + (cond_dim if use_code else 0)
                    bound = fan_in ** -0.5
                    parts = [lin.weight, lin.bias, self.code.weight] + (
                        [self.cond.weight] if self.cond is not None else [])
                    for w in parts:
                        w.uniform_(-bound, bound)

    def code_term(self, t: int) -> torch.Tensor:
        """The layer index's contribution to the first layer's pre-activation."""
        if self.layer_code == "add":
            return self.layer.weight[t]
        if self.layer_code == "embed":
            return self.code(self.layer.weight[t])
        if self.layer_code == "scalar":
            return self.code.weight[:, 0] * (t / max(len(self.dims) - 1, 1))
        return self.code.weight[:, t]  # onehot

    def forward(self, h: torch.Tensor, t: int, s: torch.Tensor | None) -> torch.Tensor:
        n = h.shape[0]
        gated = self.form == "gated"
        if self.inputs == "full":
            flat = h.flatten(1)
            if self.ln:
                flat = F.layer_norm(flat, flat.shape[1:])
            z = self.embed_in[0 if self.shared else t](flat) + self.code_term(t)
            if not gated and self.cond is not None and s is not None:
                z = z + self.cond(s.to(z.dtype))
        elif self.inputs == "time_only":
            z = self.layer.weight[t].expand(n, -1)
        else:  # constant: not even the layer index
            z = self.layer.weight[0].expand(n, -1)
        z = self.trunk(z)
        mixed = z * self.cond(s.to(z.dtype)) if gated and self.cond is not None and s is not None else z
        if self.out == "scalar":
            v = self.heads[0](mixed).squeeze(-1)
            return v if self.offset is None else v + self.offset(z).squeeze(-1)
        if self.inputs == "constant":
            return self.heads[0](mixed)[:, :h[0].numel()].reshape(h.shape)
        return self.heads[0 if len(self.heads) == 1 else t](mixed).view_as(h)


@dataclass(kw_only=True)
class EstimatorOptions:
    """The options every estimator rule has (docs/rules.md); a rule's own options extend them
    (``SBOptions``, ``CBOptions``, ...), and its yaml gives the same defaults. A rule is built
    from keyword options (``method.<option>=...`` on the command line): ``parse`` checks each
    against its declaration here (docs/options.md) and converts it."""

    feedback_std: Positive | None = None   # the DFA fallback's feedback (None: 1/sqrt(dim h_l))
    s_type: SType = "eT"                   # the conditioning code
    width: Count = 256                     # the estimator network's hidden width
    aux_lr: Positive = 1e-3                # the estimator's learning rate (its own group)
    credit_norm: CreditNorm = "sample"     # a / (RMS(a) + 1e-6): per sample, per batch, none
    # Fraction of epochs the blocks follow DFA while the estimator trains
    warmup_ratio: Fraction = 0.0
    prefit_epochs: Index = 0               # estimator-only epochs on the frozen network first
    periodic_refit: Refit | None = None    # {every, epochs}: estimator-only refit epochs
    topdown: Index | None = None           # the estimator's credit for the last k blocks only
    # The _hL codes see h_L through a learned projection to hL_dim numbers (the original
    # study's 32), trained with the estimator; None concatenates h_L itself.
    hL_dim: Count | None = 32
    # credit_norm also for the DFA credit the rule falls back to (the warm-up, topdown's lower
    # blocks): every block update then has the same scale, before and after the estimator.
    norm_fallback: bool = False

    @classmethod
    def parse(cls, options: dict):
        check_options(cls, options, "method")
        opts = cls(**{k: _plain(v) for k, v in options.items()})
        for f in fields(opts):  # a whole number given where a real one is declared: a float
            if isinstance(f.default, float) and isinstance(getattr(opts, f.name), int) \
                    and not isinstance(getattr(opts, f.name), bool):
                setattr(opts, f.name, float(getattr(opts, f.name)))
        return opts


@dataclass(kw_only=True)
class FieldOptions:
    """The network of cb's value and vec's field (``CreditNet``)."""

    field: Field = "concat"       # concat (the original's MLP) | gated (lcredit's)
    field_ln: bool = True         # concat: LayerNorm h first
    layer_code: LayerCode = "embed"  # how the layer index enters the concat field


class Estimator(DFA):
    """DFA + a trained estimator of credit; subclasses say what it is and how it is trained.

    Subclasses implement ``estimator_credit(l, p)`` (the estimator's a_l, before credit_norm)
    and ``estimator_loss(p)`` (a scalar, or None when there is nothing to train).
    """

    # Redrawing the fallback feedback does not give this rule's chance level (null_gamma).
    credit_is_feedback = False
    exact_top = False  # a_L is the exact output-local gradient (sb: no predictor at L)

    ORIGINAL = {"credit_norm": "sample", "hL_dim": 32}

    Options = EstimatorOptions

    def __init__(self, model, input_shape, num_classes, optimizer=None,
                 penalty_lam: NonNegative = 0.0, **options):
        opts = self.Options.parse(options)
        super().__init__(model, input_shape, num_classes, optimizer, penalty_lam,
                         opts.feedback_std)
        self.options = opts
        # every option is an attribute of the rule, by its name, but these: credit_norm by its
        # form, the field's form as ``field_form`` (``field`` is cb's value / vec's network),
        # the refit schedule as two numbers
        for f in fields(opts):
            if f.name not in ("credit_norm", "field", "periodic_refit"):
                setattr(self, f.name, getattr(opts, f.name))
        self.credit_norm = CREDIT_NORMS[opts.credit_norm]
        self.field_form = getattr(opts, "field", None)
        self.refit_every, self.refit_epochs = self._parse_refit(opts.periodic_refit)
        depth = len(self.state_shapes) - 1
        if self.topdown is not None and self.topdown > depth:
            raise ConfigError(f"method.topdown={self.topdown} must be <= {depth} (the model's "
                              f"depth)")
        self.dims = [self.state_dim(l) for l in range(depth + 1)]
        # The _hL codes see h_L through a learned projection to hL_dim numbers (the original
        # study's 32), trained with the estimator; null concatenates h_L itself.
        self.hL_proj = (nn.Linear(self.dims[-1], self.hL_dim)
                        if self.s_type.endswith("_hL") and self.hL_dim else None)
        # Resumable randomness (directions, bridge noise): drawn from (seed, aux step), and the
        # step counter is part of the state.
        self.register_buffer("aux_steps", torch.zeros((), dtype=torch.long))
        # ...and mirrored on the host, where the noise seed is formed: reading the buffer each
        # step would wait for the device. The mirror follows every load of a state dict.
        self._aux_host = 0
        self.register_load_state_dict_post_hook(Estimator._mirror_aux_steps)
        self.register_buffer("_aux_sums", torch.zeros(2, dtype=torch.float64), persistent=False)

    @staticmethod
    def _mirror_aux_steps(module, incompatible_keys) -> None:
        module._aux_host = int(module.aux_steps)

    def seek_noise(self, step: int) -> None:
        """Draw the next step's noise as step ``step`` did (the counter, host and device)."""
        self._aux_host = int(step)
        self.aux_steps.fill_(self._aux_host)

    @staticmethod
    def _parse_refit(spec):
        if spec is None:
            return None, 0
        return int(spec["every"]), int(spec["epochs"])

    # ---------------------------------------------------------------- schedule
    # The schedule reads the trainer's epoch; a copy without a trainer (the protocol's measuring
    # copy, a rule restored for an audit) keeps the epoch it was taken at, so its credit is the
    # one the run was using then.
    _clock = (0, 0)  # (epoch, max_epochs) when last seen

    def epoch(self) -> int:
        return self.current_epoch if self._trainer is not None else self._clock[0]

    def max_epochs(self) -> int:
        trainer = self._trainer
        if trainer is None:
            return self._clock[1]
        return int(trainer.max_epochs) if trainer.max_epochs else 0

    def schedule_needs_epochs(self) -> list[str]:
        """The options set whose schedule is a fraction of ``trainer.max_epochs``."""
        return ["method.warmup_ratio"] if self.warmup_ratio > 0 else []

    def check_trainer(self, trainer_cfg: dict) -> None:
        super().check_trainer(trainer_cfg)
        needs = self.schedule_needs_epochs()
        max_epochs = trainer_cfg.get("max_epochs")
        if needs and (max_epochs is None or max_epochs < 1):
            raise ConfigError(f"{' and '.join(needs)} {'schedules' if len(needs) == 1 else 'schedule'} by a fraction of "
                              f"trainer.max_epochs, which is {max_epochs} (a run bounded by "
                              f"steps or time has no epoch count): set trainer.max_epochs, or "
                              f"turn that schedule off (warmup_ratio=0, alpha_decay=constant)")

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._clock = (self.current_epoch, self.max_epochs())

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        trainer_cfg = ((checkpoint.get("lcredit") or {}).get("config") or {}).get("trainer") or {}
        self._clock = (int(checkpoint.get("epoch", 0)), int(trainer_cfg.get("max_epochs") or 0))

    def phase(self, epoch: int | None = None) -> str:
        e = self.epoch() if epoch is None else epoch
        if e < self.prefit_epochs:
            return "fit"
        k = e - self.prefit_epochs
        if self.refit_every and k % (self.refit_every + self.refit_epochs) >= self.refit_every:
            return "fit"
        if k < self.warmup_ratio * max(self.max_epochs() - self.prefit_epochs, 0):
            return "warmup"
        return "rule"

    def updates_model(self) -> bool:
        return super().updates_model() and self.phase() != "fit"

    def compute_gradients(self, x, y):
        if self.updates_model():
            return super().compute_gradients(x, y)
        # A frozen network is frozen whole: BatchNorm's running statistics stay put too.
        with preserved_buffers(self.model):
            return super().compute_gradients(x, y)

    def trains_estimator(self) -> bool:
        return True

    def uses_estimator(self, l: int) -> bool:
        """Whether a_l comes from the estimator now (else DFA's fixed feedback)."""
        if self.phase() == "warmup":
            return False
        depth = len(self.state_shapes) - 1
        # topdown=k: the last k blocks (trained from a_{L-k+1} .. a_L) get the estimator.
        return self.topdown is None or l > depth - self.topdown

    # ---------------------------------------------------------------- credit
    def condition(self, p: Pass) -> torch.Tensor | None:
        """The conditioning code s per sample: e or g_L (detached), and for the _hL codes
        h_L's projection (which trains with the estimator) or h_L itself."""
        if self.s_type == "none":
            return None
        base = p.error if self.s_type.startswith("eT") else p.g_top.flatten(1)
        base = at_least_fp32(base).detach()
        if not self.s_type.endswith("_hL"):
            return base
        top = at_least_fp32(p.states[-1].detach().flatten(1))
        code = top if self.hL_proj is None else self.hL_proj(top.to(self.hL_proj.weight.dtype))
        return torch.cat([base, code.to(base.dtype)], dim=1)

    def cond_dim(self) -> int:
        if self.s_type == "none":
            return 0
        base = self.num_classes if self.s_type.startswith("eT") else self.dims[-1]
        if not self.s_type.endswith("_hL"):
            return base
        return base + (self.hL_dim or self.dims[-1])

    def option_applies(self, option: str) -> bool:
        if option == "hL_dim":
            return self.s_type.endswith("_hL")
        return super().option_applies(option)

    def estimator_credit(self, l: int, p: Pass) -> torch.Tensor:
        raise NotImplementedError

    def estimator_loss(self, p: Pass):
        raise NotImplementedError

    def learned_credit(self, l: int, p: Pass) -> torch.Tensor:
        if self.exact_top and l == len(self.state_shapes) - 1:
            a = p.g_top  # normalised like every other layer's, so all blocks share one scale
        else:
            with torch.enable_grad():
                a = self.estimator_credit(l, p).detach()
        if self.credit_norm is None:
            return a
        return rms_normalise(a, per_sample=self.credit_norm == "sample")

    def rule_credit(self, l: int, p: Pass) -> torch.Tensor:
        if not self.uses_estimator(l):
            a = self.dfa_credit(l, p)
            if self.norm_fallback and self.credit_norm is not None:
                a = rms_normalise(a, per_sample=self.credit_norm == "sample")
            return a
        return self.learned_credit(l, p).to(p.states[l].dtype)

    def top_credit(self, p):
        return self.rule_credit(len(self.state_shapes) - 1, p)

    def layer_credit(self, l, p, vjp):
        return self.rule_credit(l, p)

    # ---------------------------------------------------------------- training the estimator
    def estimator_parameters(self) -> list[nn.Parameter]:
        own = {id(q) for q in self.model.parameters()}
        return [q for q in trainable(self) if id(q) not in own]

    def generator(self, device, stream: int = 0) -> torch.Generator:
        """A generator for this step's noise: a function of (seed, step, stream), so resumes
        are exact; independent draws (one per layer, say) use different streams."""
        seed = int((self.run_config or {}).get("seed", 0))
        return torch.Generator(device=device).manual_seed(
            (seed * 1_000_003 + self._aux_host * 7_919 + stream * 104_729 + stream)
            % (2**63 - 1))

    def train_auxiliary(self, p: Pass) -> None:
        # Every update step advances the noise, whether or not anything is trained (a
        # gaussian_noise blend draws fresh noise from it).
        params = self.estimator_parameters() if self.trains_estimator() else []
        loss = None
        if params:
            with torch.enable_grad():
                loss = self.estimator_loss(p)
        self._aux_host += 1
        self.aux_steps.fill_(self._aux_host)
        if loss is None:
            return
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for q, g in zip(params, grads):
            if g is not None:
                q.grad = g.detach() if q.grad is None else q.grad + g.detach()
        self._aux_sums[0] += loss.detach().double()
        self._aux_sums[1] += 1

    def optimized_parameters(self):
        return trainable(self.model)

    def param_groups(self) -> list[dict]:
        return [{"params": self.optimized_parameters(), "name": "network"},
                {"params": self.estimator_parameters(), "lr": self.aux_lr, "name": "estimator"}]

    def on_validation_epoch_end(self):
        n_rows = len(self.history)
        super().on_validation_epoch_end()
        total, steps = self._aux_sums.tolist()
        if len(self.history) > n_rows:
            row = self.history[-1]
            row["phase"] = self.phase()
            row["estimator_loss"] = total / steps if steps else None
            if steps:
                self.log("aux/loss", total / steps)
            self._aux_sums.zero_()


def per_sample_sq(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).pow(2).sum(1)


def unit_directions(m, h, generator) -> torch.Tensor:
    """``m`` random directions of unit norm per sample of ``h``: shape (m, *h.shape)."""
    u = torch.randn((m, *h.shape), generator=generator, device=h.device, dtype=h.dtype)
    return u / u.flatten(2).norm(dim=2).view(m, h.shape[0], *([1] * (h.ndim - 1)))


def relative_sq(err: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||err||^2 / ||target||^2 over the whole batch: a squared error on the target's scale."""
    return err.pow(2).sum() / target.detach().pow(2).sum().clamp_min(1e-30)
