"""The four-diagnostic protocol (docs/diagnostics.md) and its report."""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Annotated, Callable, Literal, TypedDict

from rich.console import Console
from rich.table import Table

from lcredit.options import (Count, Fraction, Index, NonNegative, Positive, Range, Seed,
                             check_options)


@dataclass(frozen=True)
class Diagnostic:
    """One diagnostic of the protocol, defined once: the verdict, the report's columns, the
    threshold option's declaration, the abort policy's default and lcredit.report all read it."""
    id: str
    name: str
    measures: str                 # what its value is, in words
    op: str                       # fires when value `op` threshold
    threshold: float              # the default threshold (conf/protocol/default.yaml's)
    declared: object              # the threshold option's type and range (lcredit.options)
    value: Callable               # fn(measured, headline_acc, frozen_acc) -> float | None
    judges: bool = True           # decides the verdict ((c) names a sub-mode instead)
    aborts: bool = False          # in the default abort.monitor
    cheap: bool = False           # measured by the every-epoch measurement (no credit needed)
    short: str = ""               # its column name in lcredit.report's tables


def _margin(measured, headline, frozen):
    return 100.0 * (headline - frozen) if headline is not None and frozen is not None else None


DIAGNOSTICS = (
    Diagnostic("a", "residual growth", "max_l hidden_norm_{l+1} / hidden_norm_l", ">", 50.0,
               Positive, lambda m, h, f: m.get("residual_growth"), aborts=True, cheap=True,
               short="growth"),
    Diagnostic("b", "gradient floor", "bp_grad_norm at h_L", "<", 1e-7, NonNegative,
               lambda m, h, f: m.get("bp_grad_norm_top"), aborts=True, cheap=True,
               short="grad_floor"),
    Diagnostic("c", "cross-batch direction stability", "mean pairwise cosine of block updates",
               ">", 0.30, Annotated[float, Range(-1.0, 1.0)],
               lambda m, h, f: m.get("stability", {}).get("value"), judges=False,
               short="stability"),
    Diagnostic("d", "frozen-baseline comparator", "headline acc - frozen-blocks acc (pp)", "<",
               2.0, float, _margin, short="margin"),
)
BY_ID = {d.id: d for d in DIAGNOSTICS}
DEFAULT_THRESHOLDS = {d.id: d.threshold for d in DIAGNOSTICS}
DESCRIPTIONS = {d.id: (d.name, d.measures, d.op) for d in DIAGNOSTICS}
VERDICT_IDS = tuple(d.id for d in DIAGNOSTICS if d.judges)
DEFAULT_MONITOR = [d.id for d in DIAGNOSTICS if d.aborts]
DiagnosticId = Literal[tuple(BY_ID)]
# an accuracy, a results.json, auto, or null (no (d))
FrozenBaseline = Fraction | str | os.PathLike | None

# The protocol's options (conf/protocol/default.yaml gives their defaults): each declared once
# here, and checked by lcredit.options for the run's config, the callbacks and the audit alike.
Thresholds = TypedDict("Thresholds", {d.id: d.declared for d in DIAGNOSTICS}, total=False)


class Measure(TypedDict, total=False):
    rho_samples: Count
    rho_directions: Annotated[int, Range(2)]
    rho_eps: Positive
    nudge_step: Positive
    null_draws: Count


class Abort(TypedDict, total=False):
    enabled: bool
    monitor: list[DiagnosticId] | DiagnosticId
    min_epochs: Index
    patience: Count


class ProtocolOptions(TypedDict, total=False):
    thresholds: Thresholds
    frozen_baseline: FrozenBaseline
    frozen_baseline_check: bool
    every_n_epochs: Count
    cheap_every: Count
    print_report: bool
    eval_batches: Count
    stability_batches: Annotated[int, Range(2)]
    batch_size: Count
    seed: Seed
    measure: Measure
    abort: Abort


def check_thresholds(thresholds: dict | None, prefix: str = "protocol.thresholds") -> dict:
    """The thresholds to judge by: the defaults, with ``thresholds`` (checked) in their place."""
    check_options(Thresholds, thresholds or {}, prefix)
    return DEFAULT_THRESHOLDS | {k: float(v) for k, v in (thresholds or {}).items()}


def _fires(value, threshold, op) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return value > threshold if op == ">" else value < threshold


@dataclass
class Report:
    """One measurement of one run: per-layer table, the four diagnostics, the verdict."""

    layers: list[dict]
    aggregates: dict
    diagnostics: dict
    verdict: str
    reasons: list[str]
    submode: str | None
    headline_acc: float | None = None
    frozen_baseline_acc: float | None = None
    rule: str | None = None
    epoch: int | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- renderings
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(finite(self.to_dict()), **({"indent": 2} | kw))

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def layer_columns(self) -> list[str]:
        keys = ["gamma", "null_gamma", "null_gamma_std", "rho", "hidden_norm", "bp_grad_norm",
                "gamma_flat", "nudge", "costate_cosine"]
        return [k for k in keys if any(k in r for r in self.layers)]

    def to_markdown(self) -> str:
        cols = self.layer_columns()
        lines = [f"### lcredit protocol — {self.rule or 'model'}"
                 + (f", epoch {self.epoch}" if self.epoch is not None else ""), ""]
        if "gamma_hidden" in self.aggregates:
            lines += [f"**gamma_hidden = {_fmt(self.aggregates['gamma_hidden'])}** "
                      f"(mean cosine with backprop over layers 1..L-1)", ""]
        lines += [f"**Verdict: {self.verdict}**" + (f" — {'; '.join(self.reasons)}"
                                                    if self.reasons else ""), ""]
        lines += ["| layer | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for r in self.layers:
            lines.append(f"| {r['layer']} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        lines += ["", "| id | diagnostic | value | threshold | fired | first fired (epoch) |",
                  "|---|---|---|---|---|---|"]
        for k, d in self.diagnostics.items():
            lines.append(f"| {k} | {d['name']} | {_fmt(d['value'])} | {d['op']} {_fmt(d['threshold'])}"
                         f" | {'yes' if d['fired'] else 'no'} | {_fmt(d.get('first_fired_epoch'))} |")
        if self.aggregates:
            lines += ["", ", ".join(f"{k} = {_fmt(v)}" for k, v in self.aggregates.items())]
        if self.submode:
            lines += ["", f"Sub-mode (c): {self.submode}"]
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def to_text(self) -> str:
        console = Console(file=io.StringIO(), record=True, width=120, force_terminal=False)
        self.print(console)
        return console.export_text()

    def print(self, console=None) -> None:
        console = console or Console()
        if "gamma_hidden" in self.aggregates:
            console.print(f"[bold]gamma_hidden = {_fmt(self.aggregates['gamma_hidden'])}[/bold] "
                          f"(mean cosine with backprop over layers 1..L-1)"
                          + (f" — {self.rule}" if self.rule else ""))
        # two narrow tables, not one wide one: a log is often 80 columns, and a cut value
        # ("885.7…") is no value. null_gamma_std and gamma_flat: in results.json and markdown.
        cols = [c for c in self.layer_columns() if c not in ("null_gamma_std", "gamma_flat")]
        where = f" ({self.rule or 'model'}" + (f", epoch {self.epoch})" if self.epoch is not None else ")")
        for title, group in ((f"credit vs backprop{where}", [c for c in cols if c not in STATE_COLUMNS]),
                             (f"norms{where}", [c for c in cols if c in STATE_COLUMNS])):
            if not group:
                continue
            t = Table(title=title)
            t.add_column("layer", justify="right")
            for c in group:
                t.add_column(c, justify="right", no_wrap=True)
            for r in self.layers:
                t.add_row(str(r["layer"]), *(_short(r.get(c)) for c in group))
            console.print(t)
        p = Table(title="protocol")
        for c in ("id", "diagnostic", "value", "threshold", "fired", "first fired"):
            p.add_column(c)
        for k, d in self.diagnostics.items():
            p.add_row(k, d["name"], _fmt(d["value"]), f"{d['op']} {_fmt(d['threshold'])}",
                      "FIRED" if d["fired"] else "no", _fmt(d.get("first_fired_epoch")))
        console.print(p)
        if self.aggregates:
            console.print(", ".join(f"{k}={_fmt(v)}" for k, v in self.aggregates.items()))
        style = "bold green" if self.verdict == "trustworthy" else "bold red"
        console.print(f"verdict: [{style}]{self.verdict}[/{style}]"
                      + (f" — {'; '.join(self.reasons)}" if self.reasons else "")
                      + (f" (sub-mode: {self.submode})" if self.submode else ""))
        for n in self.notes:
            console.print(f"note: {n}")

    TEMPLATE_HEADER = ("| rule | gamma_hidden | headline acc | frozen acc | gamma_0 | gamma_deep"
                       " | rho_deep | (a) growth | (b) grad floor | (c) stability | (d) margin pp"
                       " | verdict |\n|---|---|---|---|---|---|---|---|---|---|---|---|")

    def template_row(self) -> str:
        """One row of the reporting template: the headline number beside what qualifies it."""
        a, g = self.aggregates, self.diagnostics

        def diag(k):
            return _fmt(g[k]["value"]) + (" ⚠" if g[k]["fired"] else "")
        return (f"| {self.rule or '-'} | {_fmt(a.get('gamma_hidden'))} | {_fmt(self.headline_acc)}"
                f" | {_fmt(self.frozen_baseline_acc)} | {_fmt(a.get('gamma_0'))}"
                f" | {_fmt(a.get('gamma_deep'))} | {_fmt(a.get('rho_deep'))}"
                f" | {diag('a')} | {diag('b')} | {diag('c')} | {diag('d')} | {self.verdict} |")

    def template(self) -> str:
        return self.TEMPLATE_HEADER + "\n" + self.template_row() + "\n"

    def __str__(self) -> str:
        return self.to_text()


def judge(measured: dict, headline_acc=None, frozen_baseline_acc=None, thresholds=None,
          rule=None, epoch=None, first_fired=None) -> Report:
    th = check_thresholds(thresholds)
    values = {d.id: d.value(measured, headline_acc, frozen_baseline_acc) for d in DIAGNOSTICS}
    first_fired = dict(first_fired or {})
    diagnostics, reasons = {}, []
    for k, (name, what, op) in DESCRIPTIONS.items():
        v = values[k]
        fired = _fires(v, th[k], op)
        if fired and first_fired.get(k) is None and epoch is not None:
            first_fired[k] = epoch
        diagnostics[k] = {"name": name, "measures": what, "value": v, "threshold": th[k],
                          "op": op, "fired": fired, "first_fired_epoch": first_fired.get(k),
                          "measured": v is not None and not (isinstance(v, float) and math.isnan(v))}
        if fired and k in VERDICT_IDS:
            reasons.append(f"({k}) {name}: {_fmt(v)} {op} {_fmt(th[k])}")
    submode = None  # the diagnostic that does not judge names the failure's sub-mode instead
    for d in DIAGNOSTICS:
        if not d.judges and diagnostics[d.id]["measured"]:
            submode = "drift" if diagnostics[d.id]["fired"] else "noise"
    notes = list(measured.get("notes", []))
    if not diagnostics["d"]["measured"]:
        notes.append("(d) not evaluated: no headline accuracy or frozen baseline given")
    return Report(layers=measured["layers"], aggregates=measured.get("aggregates", {}),
                  diagnostics=diagnostics, verdict="walk back" if reasons else "trustworthy",
                  reasons=reasons, submode=submode, headline_acc=headline_acc,
                  frozen_baseline_acc=frozen_baseline_acc, rule=rule, epoch=epoch, notes=notes,
                  extra={"stability": measured.get("stability"),
                         "residual_growth_per_block": measured.get("residual_growth_per_block"),
                         "n_samples": measured.get("n_samples"),
                         "rho_samples": measured.get("rho_samples"),
                         "rho_directions": measured.get("rho_directions"),
                         "null_draws": measured.get("null_draws")})


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
            return f"{v:.3g}"
        return f"{v:.4f}"
    return str(v)


STATE_COLUMNS = ("hidden_norm", "bp_grad_norm")


def _short(v) -> str:
    """A console cell: three significant digits (886, -0.0099, 7.34e-05), never cut."""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3g}"
    return _fmt(v)


def finite(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite(v) for v in o]
    return o
