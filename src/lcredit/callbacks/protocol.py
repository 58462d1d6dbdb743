"""Measure the protocol during training (``ProtocolMonitor``) and stop broken runs
(``EarlyAbort``). Neither raises: a sweep always carries on to its next job."""
from __future__ import annotations

import copy
import logging
import math
import time

import torch
from lightning.pytorch.callbacks import Callback

from lcredit.baseline import accuracy_at
from lcredit.diagnostics import diagnose
from lcredit.diagnostics.measure import DEFAULTS as MEASURE_DEFAULTS
from lcredit.diagnostics.measure import MeasuringCopy, evaluation_batches, measure
from lcredit.diagnostics.protocol import (DEFAULT_MONITOR, Abort, ProtocolOptions,
                                         check_thresholds, judge)
from lcredit.errors import ConfigError
from lcredit.options import Count, checked

log = logging.getLogger("lcredit")

LAYER_METRICS = ("gamma", "null_gamma", "null_gamma_std", "rho", "hidden_norm", "bp_grad_norm",
                 "gamma_flat", "nudge", "costate_cosine")


class ProtocolMonitor(Callback):
    """Measures every ``every_n_epochs`` epochs and after the last one, on fixed batches drawn
    from the training set; writes each report into the run's history and its loggers."""

    # the options' types and ranges: ProtocolOptions (diagnostics/protocol.py); the defaults
    # are conf/protocol/default.yaml's
    @checked("protocol", like=ProtocolOptions)
    def __init__(self, every_n_epochs=5, eval_batches=2, stability_batches=10, batch_size=128,
                 seed=0, thresholds=None, measure=None, print_report=True, cheap_every=1):
        self.every, self.cheap_every = int(every_n_epochs), int(cheap_every)
        self.n_eval, self.n_stab, self.batch_size = int(eval_batches), int(stability_batches), int(batch_size)
        self.seed = int(seed)
        self.thresholds = check_thresholds(dict(thresholds or {}))
        self.measure_opts = dict(measure or {})
        self.print_report = print_report
        self.frozen_baseline: dict | None = None  # set by train(): {"final_acc", "history_acc"}
        self._batches = None
        self._cheap_copy = MeasuringCopy()

    # ----------------------------------------------------------------- data
    def batches(self, trainer):
        if self._batches is None:
            loader = trainer.train_dataloader
            if not hasattr(loader, "x"):
                raise ConfigError("protocol: the training data must be lcredit DeviceBatches")
            self._batches = evaluation_batches(
                loader.x, loader.y, self.n_eval, self.n_stab, self.batch_size, self.seed,
                int(self.measure_opts.get("rho_samples", MEASURE_DEFAULTS["rho_samples"])))
        return self._batches

    # ----------------------------------------------------------------- schedule
    def due(self, trainer) -> bool:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        return epoch % self.every == 0 or last or trainer.should_stop

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not pl_module.history:
            return
        row = pl_module.history[-1]
        if not math.isfinite(row.get("train_loss", math.nan)):
            return  # a diverged run has nothing left to measure
        full = self.due(trainer)
        if not full and row["epoch"] % self.cheap_every:
            return
        abort = next((cb for cb in trainer.callbacks if isinstance(cb, EarlyAbort)), None)
        report = self.run(trainer, pl_module, row["epoch"], row.get("test_acc"), cheap=not full)
        if not full and abort is not None and abort.would_stop(pl_module, report):
            # the run ends here: with the full report, as at any measured epoch
            report = self.run(trainer, pl_module, row["epoch"], row.get("test_acc"))
        if abort is not None:
            abort.consider(trainer, pl_module, report)

    def run(self, trainer, pl_module, epoch, headline_acc, cheap: bool = False):
        """One measurement: the full report, or (``cheap``) the hidden norms, (a) and (b) only
        — two forward passes and one backward on the evaluation batches, every epoch."""
        t0 = time.perf_counter()
        eval_b, stab_b, rho_b = self.batches(trainer)
        state = pl_module.protocol_state
        frozen_acc = accuracy_at(self.frozen_baseline, epoch, headline_acc)
        if cheap:
            report = diagnose(self._cheap_copy(pl_module.model), eval_b, model_is_copy=True,
                              thresholds=self.thresholds, epoch=epoch,
                              first_fired=state.get("first_fired"), seed=self.seed,
                              loss_fn=pl_module.per_sample_loss, rule=pl_module.name)
        else:
            report = diagnose(None, eval_b, credit=pl_module, headline_acc=headline_acc,
                              frozen_baseline_acc=frozen_acc, thresholds=self.thresholds,
                              stability_batches=stab_b, rho_batches=rho_b, epoch=epoch,
                              first_fired=state.get("first_fired"), seed=self.seed,
                              **self.measure_opts)
        if (self.frozen_baseline or {}).get("source") == "self":
            report.notes = [n for n in report.notes if not n.startswith("(d)")] + [
                "(d) not evaluated: this is the frozen-blocks run, the comparator itself"]
        state["first_fired"] = {k: d["first_fired_epoch"] for k, d in report.diagnostics.items()}
        if cheap:
            state.setdefault("cheap_epochs", []).append(epoch)
        else:
            state["last"] = report.to_dict()
            state.setdefault("measured_epochs", []).append(epoch)
        pl_module.history[-1]["protocol"] = compact(report) | {"kind": "cheap" if cheap else "full"}
        self.log_report(trainer, report)
        # What the protocol cost this run (the bench script checks it against its budgets).
        spent = time.perf_counter() - t0
        kind = "cheap" if cheap else "full"
        state["seconds"] = state.get("seconds", 0.0) + spent
        state[f"{kind}_seconds"] = state.get(f"{kind}_seconds", 0.0) + spent
        state[f"{kind}_count"] = state.get(f"{kind}_count", 0) + 1
        return report

    def log_report(self, trainer, report):
        metrics = {}
        for r in report.layers:
            for m in LAYER_METRICS:
                if m in r and r[m] is not None:
                    metrics[f"diag/{m}/l{r['layer']}"] = float(r[m])
        for k, v in report.aggregates.items():
            metrics[f"diag/{k}"] = float(v)
        for k, d in report.diagnostics.items():
            if d["value"] is not None:
                metrics[f"protocol/{k}"] = float(d["value"])
            metrics[f"protocol/{k}_fired"] = float(d["fired"])
        metrics["protocol/trustworthy"] = float(report.verdict == "trustworthy")
        for logger in trainer.loggers:
            if is_wandb(logger):
                log_to_wandb(logger, metrics, report, trainer.global_step)
            else:
                logger.log_metrics(metrics, step=trainer.global_step)


def is_wandb(logger) -> bool:
    from lightning.pytorch.loggers import WandbLogger

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


class EarlyAbort(Callback):
    """Stops training when any ``monitor`` diagnostic has fired on ``patience`` consecutive
    measurements at or after ``min_epochs``; records when, why and the compute saved."""

    @checked("protocol.abort", like=Abort)  # the defaults: conf/protocol/default.yaml's
    def __init__(self, monitor=tuple(DEFAULT_MONITOR), min_epochs=1, patience=1):
        monitor = [monitor] if isinstance(monitor, str) else monitor
        self.monitor, self.min_epochs, self.patience = tuple(monitor), int(min_epochs), int(patience)

    def would_stop(self, pl_module, report) -> bool:
        """Whether ``consider`` would stop the run on ``report`` (nothing is changed)."""
        fired = [k for k in self.monitor if report.diagnostics[k]["fired"]]
        streak = pl_module.protocol_state.get("abort_streak", 0) + 1 if fired else 0
        return bool(fired) and report.epoch >= self.min_epochs and streak >= self.patience

    def consider(self, trainer, pl_module, report):
        state = pl_module.protocol_state
        fired = [k for k in self.monitor if report.diagnostics[k]["fired"]]
        state["abort_streak"] = state.get("abort_streak", 0) + 1 if fired else 0
        if not fired or report.epoch < self.min_epochs or state["abort_streak"] < self.patience:
            return
        epochs_total = trainer.max_epochs or report.epoch
        times = [r["train_time_s"] for r in pl_module.history]
        saved = max(0, epochs_total - report.epoch)
        pl_module.abort_info = {
            "epoch": report.epoch, "diagnostics": fired,
            "reasons": [r for r in report.reasons if r[1] in fired],
            "epochs_planned": epochs_total, "epochs_saved": saved,
            "fraction_saved": saved / epochs_total if epochs_total else 0.0,
            "est_seconds_saved": saved * (sum(times) / len(times)) if times else None,
        }
        log.warning("protocol: aborting at epoch %d: %s (saves %d of %d epochs)", report.epoch,
                    "; ".join(pl_module.abort_info["reasons"]), saved, epochs_total)
        trainer.should_stop = True


class Protocol(Callback):
    """The protocol for any LightningModule and DataLoader (docs/diagnostics.md, "In your own
    Lightning code"): ``Trainer(callbacks=[Protocol(blocks=["layer1", "layer2"])])``.

    ``blocks``: the modules that form the residual stream — names or glob patterns of
    ``named_modules()`` (``"net.layers.*"``) or a callable returning them; h_0 is the first
    block's input, h_l block l's output (``lcredit.diagnostics.hooked``). ``batch``:
    ``fn(batch) -> (x, y)`` (default: the batch's first two items); ``loss_fn``: the per-sample
    loss ``fn(output, y)`` (default cross-entropy); ``forward``: ``fn(module, x)`` (default
    ``module(x)``); ``embed`` / ``readout``: ``fn(module, x) -> h_0`` / ``fn(module, h_L) ->
    output`` where the hooks' defaults (everything before the first block / after the last)
    do not fit.

    Without credit it measures hidden norms, (a) and (b) — cheaply, every ``cheap_every``
    epochs, and aborts on them. With ``credit=fn(module, x, y) -> [a_0..a_L]`` (or a
    ``lcredit_credit(x, y)`` method on the module) every ``every_n_epochs`` epochs and after
    the last it adds gamma (against a random-feedback null), rho and nudge. (c) is measured at
    those epochs too, with or without credit: from ``block_update=fn(module, x, y) -> [the
    update of block 0, ..., block L-1]`` (tensors or lists of tensors) on the ``stability_batches``
    evaluation batches, else from the parameter changes the module's own optimizer steps make
    to each block on the first ``stability_batches`` steps of that epoch (for Adam and the
    like: its update directions, not the raw gradient's). (d) compares ``headline`` (a metric the module logs,
    an accuracy in [0, 1]) with ``frozen_baseline`` (a number, a frozen run's results.json, or
    what ``lcredit.frozen_baseline`` returns) after the last epoch.

    An abort sets ``trainer.should_stop``; the reason is in ``state_dict()`` (checkpointed and
    restored with the run) and in the logged metrics (``protocol/aborted``). It never raises
    during training.
    """

    @checked("protocol", like=ProtocolOptions)
    def __init__(self, blocks, *, credit=None, block_update=None, batch=None, loss_fn=None,
                 forward=None, embed=None, readout=None, frozen_baseline=None,
                 headline: str = "val_acc",
                 every_n_epochs=5, cheap_every: Count = 1, eval_batches=2,
                 stability_batches=10, seed=0, thresholds=None, measure=None, abort=None,
                 print_report: bool = False):
        self.blocks, self.credit, self.batch_fn = blocks, credit, batch
        self.block_update = block_update
        self.loss_fn, self.forward_fn, self.embed_fn, self.readout_fn = loss_fn, forward, embed, readout
        self.headline = headline
        self.every, self.cheap_every = int(every_n_epochs), int(cheap_every)
        self.n_eval, self.n_stab, self.seed = int(eval_batches), int(stability_batches), int(seed)
        self.thresholds = check_thresholds(thresholds)
        self.measure_opts = dict(measure or {})
        abort = {"enabled": True, "monitor": DEFAULT_MONITOR, "min_epochs": 1,
                 "patience": 1} | dict(abort or {})
        monitor = abort["monitor"]
        self.abort = dict(abort, monitor=[monitor] if isinstance(monitor, str) else list(monitor))
        self.frozen_acc = _frozen_accuracy(frozen_baseline)
        self.print_report = print_report
        self.state = {"first_fired": {}, "abort": None, "streak": 0, "reports": [],
                      "seconds": 0.0}
        self._batches = None
        self._cheap_copy = MeasuringCopy()

    # ------------------------------------------------------------------ Lightning's hooks
    def state_dict(self) -> dict:
        return copy.deepcopy(self.state)

    def load_state_dict(self, state_dict: dict) -> None:
        self.state = copy.deepcopy(state_dict)

    def on_train_start(self, trainer, pl_module) -> None:
        from lcredit.diagnostics.hooked import find_blocks

        self._batches = None  # drawn at the first measurement, the same at every one
        self._block_modules = find_blocks(pl_module, self.blocks)[1]
        self._steps = None

    def _full_epoch(self, trainer, epoch: int) -> bool:
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        return epoch % self.every == 0 or last

    # (c) without a block_update function: the optimizer's own steps on the first K batches
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        track = self.block_update is None and self._full_epoch(trainer, trainer.current_epoch + 1)
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
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        full = self._full_epoch(trainer, epoch)
        if not (full or epoch % self.cheap_every == 0):
            return
        try:
            report = self.measure(trainer, pl_module, epoch, full=full, last=last)
        except ConfigError:
            raise  # a mistake in the callback's arguments: the user must see it
        except Exception as err:  # noqa: BLE001 — a measurement must never end the user's run
            log.warning("lcredit.Protocol: the measurement at epoch %d failed (%s: %s)",
                        epoch, type(err).__name__, err)
            return
        self._consider_abort(trainer, report, epoch)

    # ------------------------------------------------------------------ measurement
    def eval_batches(self, trainer, pl_module):
        """The first batches of the train dataloader under the callback's seed (the user's
        RNG and the loader's generator are left as they were): the same samples at every
        measurement and after a resume."""
        if self._batches is None:
            loader = trainer.train_dataloader
            n = max(self.n_eval, self.n_stab)
            rho_samples = int(self.measure_opts.get("rho_samples", MEASURE_DEFAULTS["rho_samples"]))
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
                    if i >= n and sum(len(y) for _, y in batches) >= rho_samples:
                        break
                    x, y = self.batch_fn(b) if self.batch_fn else (b[0], b[1])
                    batches.append((x.to(pl_module.device), y.to(pl_module.device)))
            for g, s in zip(gens, saved):
                g.set_state(s)
            if not batches:
                raise ConfigError("lcredit.Protocol: the train dataloader gave no batch")
            self._batches = batches
        return self._batches[:self.n_eval], self._batches[:self.n_stab], self._batches

    def measure(self, trainer, pl_module, epoch: int, full: bool, last: bool):
        from lcredit.diagnostics.hooked import HookedModel

        t0 = time.perf_counter()
        eval_b, stab_b, rho_b = self.eval_batches(trainer, pl_module)
        view = HookedModel(pl_module, self.blocks, self.forward_fn, self.embed_fn, self.readout_fn)
        credit = None
        if full and (self.credit is not None or callable(getattr(pl_module, "lcredit_credit", None))):
            user = self.credit or (lambda m, x, y: m.lcredit_credit(x, y))
            credit = lambda net, x, y: user(net.module, x, y)  # noqa: E731 — the copy's module
        headline = frozen = None
        if last and self.frozen_acc is not None:
            value = trainer.callback_metrics.get(self.headline)
            headline = None if value is None else float(value)
            frozen = self.frozen_acc
        trainer_ref, pl_module._trainer = pl_module._trainer, None  # a copy without the Trainer
        was_training = pl_module.training
        try:
            opts = {"loss_fn": self.loss_fn} if self.loss_fn is not None else {}
            if full:
                opts |= {"stability_batches": [], "rho_batches": rho_b}
            else:  # the every-epoch one: a refreshed copy, not a new one
                view, opts = self._cheap_copy(view), opts | {"model_is_copy": True}
            measured = measure(view, eval_b, credit, seed=self.seed, **self.measure_opts, **opts)
            if full:
                measured["notes"] = [n for n in measured["notes"]
                                     if not n.startswith("direction stability")]
                measured["stability"] = self._stability(pl_module, stab_b)
            report = judge(measured, headline, frozen, self.thresholds,
                           rule=type(pl_module).__name__, epoch=epoch,
                           first_fired=self.state["first_fired"])
        finally:
            pl_module._trainer = trainer_ref
            pl_module.train(was_training)
        self.state["first_fired"] = {k: d["first_fired_epoch"] for k, d in report.diagnostics.items()}
        row = {"epoch": epoch, "kind": "full" if full else "cheap", **compact(report)}
        self.state["reports"].append(row)
        spent = time.perf_counter() - t0
        self.state["seconds"] += spent
        self.state[f"{row['kind']}_seconds"] = self.state.get(f"{row['kind']}_seconds", 0.0) + spent
        self.last_report = report
        metrics = {f"diag/hidden_norm/l{r['layer']}": float(r["hidden_norm"]) for r in report.layers}
        metrics |= {f"diag/bp_grad_norm/l{r['layer']}": float(r["bp_grad_norm"]) for r in report.layers}
        for k, d in report.diagnostics.items():
            if d["measured"]:
                metrics[f"protocol/{k}"] = float(d["value"])
                metrics[f"protocol/{k}_fired"] = float(d["fired"])
        metrics |= {f"diag/{k}": float(v) for k, v in report.aggregates.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if self.print_report or last:
            log.info("lcredit.Protocol, epoch %d:\n%s", epoch, report.to_text())
        return report

    def _stability(self, pl_module, batches) -> dict:
        """(c): the mean pairwise cosine of the block updates, from ``block_update`` on the
        evaluation batches or from the optimizer's steps recorded this epoch."""
        if self.block_update is not None:
            steps = _StepDirections(len(self._block_modules))
            for x, y in batches:
                update = self.block_update(pl_module, x, y)
                steps.add([torch.cat([t.detach().flatten() for t in (u if isinstance(u, (list, tuple))
                                                                     else [u])]) for u in update])
            source = "block_update"
        else:
            steps, source = self._steps or _StepDirections(len(self._block_modules)), "optimizer steps"
        return steps.stability() | {"source": source}

    def _consider_abort(self, trainer, report, epoch: int) -> None:
        a = self.abort
        fired = [k for k in a["monitor"] if report.diagnostics[k]["fired"]]
        self.state["streak"] = self.state["streak"] + 1 if fired else 0
        if (not a["enabled"] or not fired or epoch < a["min_epochs"]
                or self.state["streak"] < a["patience"]):
            return
        reasons = [r for r in report.reasons if r[1] in fired]
        self.state["abort"] = {"epoch": epoch, "diagnostics": fired, "reasons": reasons,
                               "max_epochs": trainer.max_epochs}
        trainer.should_stop = True
        for logger in trainer.loggers:
            logger.log_metrics({"protocol/aborted": 1.0, "protocol/abort_epoch": float(epoch)},
                               step=trainer.global_step)
        log.warning("lcredit.Protocol: stopping at epoch %d: %s", epoch, "; ".join(reasons))

    @property
    def aborted(self) -> dict | None:
        """The abort record (epoch, diagnostics, reasons), or None."""
        return self.state["abort"]

    @property
    def reports(self) -> list[dict]:
        """One compact report per measurement: epoch, kind (cheap / full), verdict, values."""
        return self.state["reports"]


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


def _frozen_accuracy(frozen_baseline) -> float | None:
    """(d)'s comparator as an accuracy: a number, or a frozen run's results.json."""
    if frozen_baseline is None:
        return None
    if isinstance(frozen_baseline, (int, float)):
        return float(frozen_baseline)
    from pathlib import Path

    from lcredit.baseline import from_results

    return from_results(Path(str(frozen_baseline)))["final_acc"]
