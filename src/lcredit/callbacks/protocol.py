"""The protocol as one Lightning callback (``Protocol``), for lcredit's own runs and for any
LightningModule of a user's, and the abort policy it follows (``EarlyAbort``). Neither raises
during training: a sweep always carries on to its next job (docs/diagnostics.md)."""
from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from lcredit.baseline import accuracy_at, from_results
from lcredit.diagnostics.hooked import HookedModel
from lcredit.diagnostics.measure import (DEFAULTS as MEASURE_DEFAULTS, MeasuringCopy, _is_rule,
                                         evaluation_batches, measure)
from lcredit.diagnostics.protocol import (DEFAULT_MONITOR, Abort, ProtocolOptions, check_thresholds,
                                          judge)
from lcredit.errors import ConfigError
from lcredit.options import Count, checked

log = logging.getLogger("lcredit")

LAYER_METRICS = ("gamma", "null_gamma", "null_gamma_std", "rho", "hidden_norm", "bp_grad_norm",
                 "gamma_flat", "nudge", "costate_cosine")


class EarlyAbort(Callback):
    """The abort policy of lcredit's runs, as a callback of its own so that a config can drop
    it (``~callbacks.early_abort``, or ``protocol.abort.enabled=false``): the ``Protocol``
    callback follows it where it is present; it does nothing by itself."""

    @checked("protocol.abort", like=Abort)  # the defaults: conf/protocol/default.yaml's
    def __init__(self, monitor=tuple(DEFAULT_MONITOR), min_epochs=1, patience=1):
        monitor = [monitor] if isinstance(monitor, str) else monitor
        self.monitor, self.min_epochs, self.patience = tuple(monitor), int(min_epochs), int(patience)

    def policy(self) -> dict:
        return {"enabled": True, "monitor": list(self.monitor), "min_epochs": self.min_epochs,
                "patience": self.patience}


class Protocol(Callback):
    """The four-diagnostic protocol for any LightningModule and DataLoader (docs/diagnostics.md,
    "In your own Lightning code"): ``Trainer(callbacks=[Protocol(blocks=["layer1", "layer2"])])``.

    ``blocks``: the modules that form the residual stream — names or glob patterns of
    ``named_modules()`` (``"net.layers.*"``) or a callable returning them; h_0 is the first
    block's input, h_l block l's output (``lcredit.diagnostics.hooked``). ``blocks=None``: the
    module has ``embed`` / ``blocks`` / ``readout`` itself (or as ``module.model``, as lcredit's
    rules do), measured directly. ``batch``: ``fn(batch) -> (x, y)`` (default: the batch's
    first two items); ``loss_fn``: the per-sample loss ``fn(output, y)`` (default cross-entropy,
    or the rule's own); ``forward``: ``fn(module, x)`` (default ``module(x)``); ``embed`` /
    ``readout``: ``fn(module, x) -> h_0`` / ``fn(module, h_L) -> output`` where the hooks'
    defaults (everything before the first block / after the last) do not fit.

    Every ``cheap_every`` epochs it measures the hidden norms, (a) and (b) — two forward passes
    and a backward on fixed evaluation batches — and may abort on them. Every
    ``every_n_epochs`` epochs, after the last and at an abort it measures in full: with
    ``credit=fn(module, x, y) -> [a_0..a_L]`` (or a ``lcredit_credit(x, y)`` method, or an
    lcredit rule's own credit) gamma (against a random-feedback null), rho and nudge; and (c),
    from an lcredit rule's own update, from ``block_update=fn(module, x, y) -> [the update of
    block 0, ..., block L-1]`` (tensors or lists of tensors) on the ``stability_batches``
    evaluation batches, else from the parameter changes the module's own optimizer steps make
    to each block on the first ``stability_batches`` steps of that epoch (for Adam and the
    like: its update directions, not the raw gradient's). (d) compares the headline accuracy
    (an lcredit run's test accuracy, else the metric the module logs as ``headline``, in
    [0, 1]) with ``frozen_baseline`` (a number, a frozen run's results.json, or what
    ``lcredit.frozen_baseline`` returns).

    The abort follows an ``EarlyAbort`` callback where the Trainer has one, else ``abort``; it
    sets ``trainer.should_stop``. Everything the protocol found — first-fired epochs, every
    measurement, the last full report, the abort record, its own cost — is the callback's
    ``state_dict()``, checkpointed and restored with the run (``saved_state(ckpt)`` reads it).
    """

    @checked("protocol", like=ProtocolOptions)
    def __init__(self, blocks=None, *, credit=None, block_update=None, batch=None, loss_fn=None,
                 forward=None, embed=None, readout=None, frozen_baseline=None,
                 headline: str = "val_acc", every_n_epochs=5, cheap_every: Count = 1,
                 eval_batches=2, stability_batches=10, batch_size: Count | None = None, seed=0,
                 thresholds=None, measure=None, abort=None, print_report: bool = False):
        self.blocks, self.credit, self.batch_fn = blocks, credit, batch
        self.block_update = block_update
        self.loss_fn, self.forward_fn, self.embed_fn, self.readout_fn = loss_fn, forward, embed, readout
        self.headline = headline
        self.every, self.cheap_every = int(every_n_epochs), int(cheap_every)
        self.n_eval, self.n_stab, self.seed = int(eval_batches), int(stability_batches), int(seed)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.thresholds = check_thresholds(thresholds)
        self.measure_opts = dict(measure or {})
        abort = {"enabled": True, "monitor": DEFAULT_MONITOR, "min_epochs": 1,
                 "patience": 1} | dict(abort or {})
        monitor = abort["monitor"]
        self.abort = dict(abort, monitor=[monitor] if isinstance(monitor, str) else list(monitor))
        # {"source", "final_acc", "history_acc"}: train() sets it for lcredit's runs
        self.frozen_baseline = _frozen_record(frozen_baseline)
        self.print_report = print_report
        self.continue_after_abort = False  # train(): a resumed aborted run trained on on purpose
        self.state = {"first_fired": {}, "abort": None, "streak": 0, "reports": [],
                      "last": None, "previous_aborts": [], "seconds": 0.0}
        self._batches = None
        self._cheap_copy = MeasuringCopy()
        self._steps = None
        self._block_modules = None
        self.last_report = None

    # ------------------------------------------------------------------ Lightning's hooks
    def state_dict(self) -> dict:
        return copy.deepcopy(self.state)

    def load_state_dict(self, state_dict: dict) -> None:
        self.state = self.state | copy.deepcopy(state_dict)

    def on_train_start(self, trainer, pl_module) -> None:
        self._batches = None  # drawn at the first measurement, the same at every one
        self._block_modules = self._target(pl_module)[1]
        if self.continue_after_abort and self.state["abort"]:
            # trained on after an abort (protocol.abort.enabled=false): the record is kept
            abort = self.state["abort"]
            self.state["previous_aborts"].append(abort)
            for row in getattr(pl_module, "history", None) or []:
                if row.get("epoch") == abort.get("epoch"):
                    row["abort"] = abort
            self.state["abort"], self.state["streak"] = None, 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # (c) of a module with neither its own update nor block_update: the optimizer's steps
        track = (self.block_update is None and not _is_rule(pl_module)
                 and self._full_epoch(trainer, trainer.current_epoch + 1))
        self._steps = _StepDirections(len(self._block_modules)) if track else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._steps is not None and self._steps.k < self.n_stab:
            self._steps.before([_flat_params(b) for b in self._block_modules])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._steps is not None and self._steps.pending:
            self._steps.after([_flat_params(b) for b in self._block_modules])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.state["abort"] is not None:
            return
        history = getattr(pl_module, "history", None)
        if history is not None and (not history or not math.isfinite(
                history[-1].get("train_loss", math.nan))):
            return  # a diverged epoch has nothing left to measure
        epoch = trainer.current_epoch + 1
        full = self._full_epoch(trainer, epoch) or trainer.should_stop
        if not (full or epoch % self.cheap_every == 0):
            return
        policy = self.policy(trainer)
        try:
            report = self.measure(trainer, pl_module, epoch, full=full)
            if not full and self._would_stop(policy, report, epoch):
                # the run ends here: with the full report, as at any measured epoch
                report = self.measure(trainer, pl_module, epoch, full=True)
        except ConfigError:
            raise  # a mistake in the callback's arguments: the user must see it
        except Exception as err:  # noqa: BLE001 — a measurement must never end the user's run
            if _is_rule(pl_module):
                raise  # lcredit's own runs: a failure record says what broke
            log.warning("lcredit.Protocol: the measurement at epoch %d failed (%s: %s)",
                        epoch, type(err).__name__, err)
            return
        self._consider_abort(trainer, pl_module, policy, report, epoch)

    # ------------------------------------------------------------------ what is measured
    def _full_epoch(self, trainer, epoch: int) -> bool:
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        return epoch % self.every == 0 or last

    def _target(self, pl_module):
        """(the model measured, its block modules): a hooked view of the user's module, or
        the module's own embed / blocks / readout."""
        if self.blocks is not None:
            view = HookedModel(pl_module, self.blocks, self.forward_fn, self.embed_fn,
                               self.readout_fn)
            return view, list(view.blocks)
        for m in (pl_module, getattr(pl_module, "model", None)):
            if m is not None and all(hasattr(m, k) for k in ("embed", "blocks", "readout")):
                return m, list(m.blocks)
        raise ConfigError("lcredit.Protocol: name the residual stream's blocks (blocks=...): "
                          f"{type(pl_module).__name__} has no embed / blocks / readout")

    def eval_batches(self, trainer, pl_module):
        """(metrics, (c), rho's pool): fixed training samples, the same at every measurement
        and after a resume. lcredit's own data: ``evaluation_batches`` of its tensors (what an
        audit uses); a DataLoader: its first batches under the callback's seed (the user's RNG
        and the loader's generator are left as they were)."""
        if self._batches is None:
            loader = trainer.train_dataloader
            rho_samples = int(self.measure_opts.get("rho_samples", MEASURE_DEFAULTS["rho_samples"]))
            if hasattr(loader, "x") and hasattr(loader, "y"):
                self._batches = evaluation_batches(
                    loader.x, loader.y, self.n_eval, self.n_stab,
                    self.batch_size or loader.batch_size, self.seed, rho_samples)
            else:
                batches = self._draw(loader, pl_module, rho_samples)
                self._batches = batches[:self.n_eval], batches[:self.n_stab], batches
        return self._batches

    def _draw(self, loader, pl_module, rho_samples):
        gens = [g for g in (getattr(loader, "generator", None),
                            getattr(getattr(loader, "sampler", None), "generator", None))
                if isinstance(g, torch.Generator)]
        saved = [g.get_state() for g in gens]
        batches = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for g in gens:
                g.manual_seed(self.seed)
            for i, b in enumerate(loader):  # enough for (c) and for rho's samples
                if i >= max(self.n_eval, self.n_stab) and sum(len(y) for _, y in batches) >= rho_samples:
                    break
                x, y = self.batch_fn(b) if self.batch_fn else (b[0], b[1])
                batches.append((x.to(pl_module.device), y.to(pl_module.device)))
        for g, s in zip(gens, saved):
            g.set_state(s)
        if not batches:
            raise ConfigError("lcredit.Protocol: the train dataloader gave no batch")
        return batches

    def _headline(self, trainer, pl_module):
        history = getattr(pl_module, "history", None)
        if history:
            return history[-1].get("test_acc")
        value = trainer.callback_metrics.get(self.headline)
        return None if value is None else float(value)

    def measure(self, trainer, pl_module, epoch: int, full: bool):
        """One measurement: the full report, or (not ``full``) the hidden norms, (a) and (b)
        only, on a refreshed float64 copy."""
        t0 = time.perf_counter()
        eval_b, stab_b, rho_b = self.eval_batches(trainer, pl_module)
        target, _ = self._target(pl_module)
        rule = _is_rule(pl_module)
        credit = None
        if full and rule:
            credit = pl_module
        elif full and (self.credit is not None or callable(getattr(pl_module, "lcredit_credit", None))):
            user = self.credit or (lambda m, x, y: m.lcredit_credit(x, y))
            hooked = self.blocks is not None
            credit = lambda net, x, y: user(net.module if hooked else net, x, y)  # noqa: E731
        headline = self._headline(trainer, pl_module) if full else None
        frozen = accuracy_at(self.frozen_baseline, epoch, headline) if full else None
        loss_fn = self.loss_fn or (pl_module.per_sample_loss if rule else None)
        was_training = pl_module.training  # (measure copies without the Trainer)
        try:
            opts = {"loss_fn": loss_fn} if loss_fn is not None else {}
            if full:
                opts |= {"stability_batches": stab_b if rule else [], "rho_batches": rho_b}
                model = None if rule else target
            else:  # the every-epoch one: a refreshed copy, not a new one
                model, opts = self._cheap_copy(target), opts | {"model_is_copy": True}
            measured = measure(model, eval_b, credit, seed=self.seed, **self.measure_opts, **opts)
            if full and not rule:
                measured["notes"] = [n for n in measured["notes"]
                                     if not n.startswith("direction stability")]
                measured["stability"] = self._stability(pl_module, stab_b)
            report = judge(measured, headline, frozen, self.thresholds,
                           rule=getattr(pl_module, "name", type(pl_module).__name__),
                           epoch=epoch, first_fired=self.state["first_fired"])
        finally:  # a user's block_update may leave the module in another mode
            pl_module.train(was_training)
        if (self.frozen_baseline or {}).get("source") == "self":
            report.notes = [n for n in report.notes if not n.startswith("(d)")] + [
                "(d) not evaluated: this is the frozen-blocks run, the comparator itself"]
        self._record(trainer, pl_module, report, epoch, full, time.perf_counter() - t0)
        return report

    def _record(self, trainer, pl_module, report, epoch, full, spent) -> None:
        kind = "full" if full else "cheap"
        state = self.state
        state["first_fired"] = {k: d["first_fired_epoch"] for k, d in report.diagnostics.items()}
        row = compact(report) | {"kind": kind}
        if state["reports"] and state["reports"][-1]["epoch"] == epoch:
            state["reports"][-1] = {"epoch": epoch, **row}  # the full one an abort asked for
        else:
            state["reports"].append({"epoch": epoch, **row})
        if full:
            state["last"] = report.to_dict()
        history = getattr(pl_module, "history", None)
        if history:
            history[-1]["protocol"] = row
        self.last_report = report
        self.log_report(trainer, report)
        # what the protocol cost this run (the bench script checks it against its budgets)
        state["seconds"] += spent
        state[f"{kind}_seconds"] = state.get(f"{kind}_seconds", 0.0) + spent
        state[f"{kind}_count"] = state.get(f"{kind}_count", 0) + 1
        if self.print_report:
            log.info("lcredit.Protocol, epoch %d:\n%s", epoch, report.to_text())

    def _stability(self, pl_module, batches) -> dict:
        """(c) of a user's module: the mean pairwise cosine of its block updates, from
        ``block_update`` on the evaluation batches or from the optimizer's steps this epoch."""
        if self.block_update is not None:
            steps = _StepDirections(len(self._block_modules))
            for x, y in batches:
                update = self.block_update(pl_module, x, y)
                steps.add([torch.cat([t.detach().flatten() for t in (
                    u if isinstance(u, (list, tuple)) else [u])]) for u in update])
            source = "block_update"
        else:
            steps, source = self._steps or _StepDirections(len(self._block_modules)), "optimizer steps"
        return steps.stability() | {"source": source}

    def log_report(self, trainer, report):
        metrics = {}
        for r in report.layers:
            for m in LAYER_METRICS:
                if m in r and r[m] is not None:
                    metrics[f"diag/{m}/l{r['layer']}"] = float(r[m])
        for k, v in report.aggregates.items():
            metrics[f"diag/{k}"] = float(v)
        for k, d in report.diagnostics.items():
            if d["measured"]:
                metrics[f"protocol/{k}"] = float(d["value"])
            metrics[f"protocol/{k}_fired"] = float(d["fired"])
        metrics["protocol/trustworthy"] = float(report.verdict == "trustworthy")
        for logger in trainer.loggers:
            if is_wandb(logger):
                log_to_wandb(logger, metrics, report, trainer.global_step)
            else:
                logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ abort
    def policy(self, trainer) -> dict:
        """An EarlyAbort callback's policy where the Trainer has one (lcredit's runs), else the
        callback's own ``abort``."""
        found = next((cb for cb in trainer.callbacks if isinstance(cb, EarlyAbort)), None)
        return found.policy() if found is not None else self.abort

    def _would_stop(self, policy, report, epoch) -> bool:
        fired = [k for k in policy["monitor"] if report.diagnostics[k]["fired"]]
        streak = self.state["streak"] + 1 if fired else 0
        return (policy.get("enabled", True) and bool(fired) and epoch >= policy["min_epochs"]
                and streak >= policy["patience"])

    def _consider_abort(self, trainer, pl_module, policy, report, epoch: int) -> None:
        fired = [k for k in policy["monitor"] if report.diagnostics[k]["fired"]]
        stop = self._would_stop(policy, report, epoch)
        self.state["streak"] = self.state["streak"] + 1 if fired else 0
        if not stop:
            return
        planned = trainer.max_epochs or epoch
        times = [r["train_time_s"] for r in getattr(pl_module, "history", None) or []]
        saved = max(0, planned - epoch)
        self.state["abort"] = {
            "epoch": epoch, "diagnostics": fired,
            "reasons": [r for r in report.reasons if r[1] in fired],
            "epochs_planned": planned, "epochs_saved": saved,
            "fraction_saved": saved / planned if planned else 0.0,
            "est_seconds_saved": saved * (sum(times) / len(times)) if times else None}
        trainer.should_stop = True
        for logger in trainer.loggers:
            logger.log_metrics({"protocol/aborted": 1.0, "protocol/abort_epoch": float(epoch)},
                               step=trainer.global_step)
        log.warning("protocol: aborting at epoch %d: %s (saves %d of %d epochs)", epoch,
                    "; ".join(self.state["abort"]["reasons"]), saved, planned)

    @property
    def aborted(self) -> dict | None:
        """The abort record (epoch, diagnostics, reasons, epochs saved), or None."""
        return self.state["abort"]

    @property
    def reports(self) -> list[dict]:
        """One compact report per measurement: epoch, kind (cheap / full), verdict, values."""
        return self.state["reports"]


# lcredit's configs before the callback measured any LightningModule named it so
ProtocolMonitor = Protocol


def find(callbacks) -> Protocol | None:
    return next((cb for cb in callbacks if isinstance(cb, Protocol)), None)


def saved_state(ckpt: dict) -> dict:
    """The protocol's state a checkpoint holds (the Protocol callback's; a checkpoint of an
    older lcredit: its rule's ``protocol_state`` and ``abort``)."""
    for key, value in (ckpt.get("callbacks") or {}).items():
        if str(key).startswith("Protocol") and isinstance(value, dict) and "first_fired" in value:
            return value
    old = (ckpt.get("lcredit") or {})
    state = dict(old.get("protocol_state") or {})
    state["abort"] = old.get("abort")
    return state


def is_wandb(logger) -> bool:
    return isinstance(logger, WandbLogger)


# Norms span decades (a growing stream, a vanishing gradient): W&B gets their log10 beside them,
# so their line charts read on a log scale without setting the axis by hand.
LOG_SCALED = ("hidden_norm", "bp_grad_norm")
REPORT_COLUMNS = ["epoch", "layer", "gamma", "null_gamma", "rho", "nudge", "hidden_norm",
                  "bp_grad_norm", "verdict", "fired"]


def log_to_wandb(logger, metrics: dict, report, step: int) -> None:
    """The per-layer metrics (with log10 of the norms) and the report as a wandb.Table, one row
    per layer, at each measurement."""
    extra = {}
    for key, v in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[1] in LOG_SCALED and v > 0:
            extra[f"diag/log10_{parts[1]}/{parts[2]}"] = math.log10(v)
    logger.log_metrics({**metrics, **extra, "epoch": report.epoch}, step=step)
    fired = ",".join(k for k, d in report.diagnostics.items() if d["fired"]) or "-"
    rows = [[report.epoch, r["layer"], *(r.get(m) for m in REPORT_COLUMNS[2:8]), report.verdict,
             fired] for r in report.layers]
    logger.log_table(key="protocol/report", columns=REPORT_COLUMNS, data=rows, step=step)


def compact(report) -> dict:
    """What a history row keeps of a measurement (the full report goes to results.json once)."""
    return {"verdict": report.verdict, "reasons": report.reasons, "submode": report.submode,
            "diagnostics": {k: {"value": d["value"], "fired": d["fired"]}
                            for k, d in report.diagnostics.items()},
            "aggregates": report.aggregates,
            "layers": [{m: r.get(m) for m in ("layer",) + LAYER_METRICS if m in r}
                       for r in report.layers]}


def _flat_params(module) -> torch.Tensor:
    params = [p.detach().flatten() for p in module.parameters()]
    return torch.cat(params).clone() if params else torch.zeros(0)


class _StepDirections:
    """Running sums of unit update directions, per block and for all blocks together: the
    mean pairwise cosine of K directions is (|sum u_i|^2 - K) / (K (K - 1)), so no direction
    is kept (a resnet18's K = 10 updates would be 450 MB)."""

    def __init__(self, n_blocks: int):
        self.per_block = [None] * n_blocks
        self.counts = [0] * n_blocks  # a block that did not move on a step has no direction
        self.whole, self.whole_count, self.k, self.pending = None, 0, 0, None

    def before(self, flats):
        self.pending = flats

    def after(self, flats):
        self.add([b - a for a, b in zip(self.pending, flats)])
        self.pending = None

    def add(self, deltas):
        def unit(v):
            n = v.double().norm()
            return v.double() / n if n > 0 else None

        units = [unit(d) for d in deltas]
        for i, u in enumerate(units):
            if u is not None:
                self.per_block[i] = u if self.per_block[i] is None else self.per_block[i] + u
                self.counts[i] += 1
        whole = unit(torch.cat([d.flatten() for d in deltas]))
        if whole is not None:
            self.whole = whole if self.whole is None else self.whole + whole
            self.whole_count += 1
        self.k += 1

    def stability(self) -> dict:
        def mean_cos(s, k):
            if s is None or k < 2:
                return math.nan
            return float((s.pow(2).sum() - k) / (k * (k - 1)))

        return {"value": mean_cos(self.whole, self.whole_count),
                "per_block": [mean_cos(s, k) for s, k in zip(self.per_block, self.counts)],
                "k": self.k}


def _frozen_record(frozen_baseline) -> dict | None:
    """(d)'s comparator: a number, a frozen run's results.json, or a record as train() gives
    it ({"source", "final_acc", "history_acc"})."""
    if frozen_baseline is None or isinstance(frozen_baseline, dict):
        return frozen_baseline
    if isinstance(frozen_baseline, (int, float)):
        return {"source": "number", "final_acc": float(frozen_baseline), "history_acc": None}
    return from_results(Path(str(frozen_baseline)))
