"""Tables and figures of a study from its results files: ``python -m lcredit.report <dir>...``.

Reads every results.json under the given directories (nothing else: results files are the single
source of every number) and writes, per study, into ``<out>`` (default ``<first dir>/report``):

- ``<study>.md`` and ``<study>.csv``: one row per arm and axis point, the study's "reported"
  columns (``study.reported`` in its config) as mean ± std (ddof = 1) over seeds, n seeds, and
  the status of every job (failed, aborted or diverged jobs are counted and marked, never
  dropped); snapshot stages (probe, exploit, calibrate) get their own tables;
- ``<study>_diagnostics.png``: one panel per diagnostic, arms sorted by accuracy, thresholds
  drawn, log scale where the values span decades;
- ``<study>_trajectories.png``: ‖h_L‖, ‖g_L‖ and test accuracy per epoch, with the gradient-floor
  threshold and the frozen baseline;
- ``<study>_layers.png``: per-layer gamma and rho;
- for protocol calibration, the threshold-sensitivity table: per diagnostic, the interval of
  thresholds that leaves every verdict unchanged.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from lcredit.diagnostics.protocol import DIAGNOSTICS, VERDICT_IDS
from lcredit.errors import ConfigError
from lcredit.results import read_json


def diagnostic_columns() -> dict:
    """id -> column name of every diagnostic, from the protocol's one definition of them
    (imported on use: lcredit.diagnostics loads torch, which reading results does not need)."""
    return {d.id: d.short for d in DIAGNOSTICS}
DEFAULT_REPORTED = ["test_acc", "gamma_hidden", "gamma_deep", "rho_deep", "verdict"]
NUMBERED = ("completed", "aborted")  # jobs whose final numbers are results


# ---- reading ---------------------------------------------------------------------------------

def collect(dirs) -> dict[str, list[dict]]:
    """Every results.json under ``dirs``, grouped by study (a plain sweep is its own study,
    named after its directory). Each record gains ``_path``."""
    studies: dict[str, list[dict]] = defaultdict(list)
    for d in map(Path, dirs):
        if not d.exists():
            raise ConfigError(f"{d}: no such directory")
        paths = [d] if d.is_file() else sorted(d.glob("**/results.json"))
        for path in paths:
            if d.is_dir() and "report" in path.relative_to(d).parts[:-1]:
                continue
            rec = read_json(path)
            if not isinstance(rec, dict):  # unreadable, or JSON that is not a run's record
                rec = {"status": "failed", "error": "unreadable results.json"}
            rec["_path"] = str(path)
            study = rec.get("study") or {}
            if not study:  # a lone run or a plain sweep: its job is its directory
                job = path.parent.parent.name if path.parent.name.startswith("seed") else path.parent.name
                study = {"name": d.name, "stage": "main", "arm": job, "point": {}, "job": job,
                         "scale": None}
                rec["study"] = study
            studies[study["name"]].append(rec)
    if not any(studies.values()):
        raise ConfigError(f"no results.json under {', '.join(map(str, dirs))}")
    for records in studies.values():
        split_by_what_ran(records)
    return dict(studies)


def what_ran(rec: dict) -> str:
    """What a run is, from its own record (its seed aside): rule, form, model, data, optimiser,
    length and study point. Runs filed under one name that differ here are different arms."""
    c = rec.get("config") or {}
    return json.dumps({"rule": rec.get("rule"), "form": rec.get("form"), "method": c.get("method"),
                       "model": c.get("model"), "data": c.get("data"), "optim": c.get("optim"),
                       "epochs": (c.get("trainer") or {}).get("max_epochs"),
                       "point": (rec.get("study") or {}).get("point")}, sort_keys=True, default=str)


def split_by_what_ran(records: list[dict]) -> None:
    """An arm is the set of runs that ran the same thing, never a directory name: records
    under one job name (two sweeps' ``defaults/seed=0``) that differ are relabelled
    ``<job> [<rule>]`` (or ``[#<hash>]`` when the rule is the same) and marked for the note."""
    groups = defaultdict(list)
    for r in records:
        if r.get("config"):  # a failure record without a config cannot be told apart
            s = r["study"]
            groups[(s.get("stage", "main"), s.get("job") or s.get("arm"))].append(r)
    for (_, job), recs in groups.items():
        kinds = {what_ran(r) for r in recs}
        if len(kinds) < 2:
            continue
        rules = {what_ran(r): r.get("rule") for r in recs}
        by_rule = len(set(rules.values())) == len(kinds)
        for r in recs:
            key = what_ran(r)
            tag = rules[key] if by_rule else "#" + hashlib.sha1(key.encode()).hexdigest()[:6]
            s = r["study"]
            r["study"] = dict(s, job=f"{job} [{tag}]", arm=f"{s.get('arm')} [{tag}]")
            r["_split_from"] = job


def study_config(records: list[dict]) -> dict:
    """The study node as the runs recorded it (the first run's config that has one)."""
    for r in records:
        node = (r.get("config") or {}).get("study")
        if node:
            return node
    return {}


def _layers(rec: dict) -> list[dict]:
    return ((rec.get("protocol") or {}).get("layers")) or []


def _agg(rec: dict, key: str):
    return ((rec.get("protocol") or {}).get("aggregates") or {}).get(key)


def _diag(rec: dict, key: str):
    return (((rec.get("protocol") or {}).get("diagnostics") or {}).get(key) or {}).get("value")


def _deep_mean(rec: dict, key: str):
    vals = [row.get(key) for row in _layers(rec)[1:]]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def _acc_at(rec: dict, epoch: int):
    row = next((h for h in rec.get("history") or [] if h.get("epoch") == epoch), None)
    return None if row is None else row.get("test_acc")


def metric(rec: dict, key: str):
    """One reported number of a training job (None where the run has none)."""
    final = rec.get("final") or {}
    if key in ("test_acc", "train_acc", "test_loss", "train_loss"):
        return final.get(key)
    columns = diagnostic_columns()
    if key in columns.values():
        return _diag(rec, next(k for k, v in columns.items() if v == key))
    if key == "hL_norm":
        return (_layers(rec) or [{}])[-1].get("hidden_norm")
    if key == "gL_norm":
        return (_layers(rec) or [{}])[-1].get("bp_grad_norm")
    if key == "frozen_acc":
        return (rec.get("protocol") or {}).get("frozen_baseline_acc")
    if key == "costate_deep":
        return _deep_mean(rec, "costate_cosine")
    if key == "costate_all":
        vals = [row.get("costate_cosine") for row in _layers(rec)]
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None
    if key == "loss_drop":
        hist = [h.get("train_loss") for h in rec.get("history") or []]
        return None if len(hist) < 1 or None in (hist[0], hist[-1]) else hist[0] - hist[-1]
    if key.startswith("acc@"):
        return _acc_at(rec, int(key[4:]))
    if key.startswith("gamma_l") and key[7:].isdigit():
        rows = _layers(rec)
        k = int(key[7:])
        return rows[k].get("gamma") if k < len(rows) else None
    return _agg(rec, key)


def mean_std(values) -> tuple[float | None, float | None, int]:
    """Mean and sample std (ddof = 1; None for one value) of the finite values, and their n."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return None, None, 0
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None), len(v)


def fmt(m, s, digits=3) -> str:
    if m is None:
        return "—"
    small = m != 0 and (abs(m) < 10 ** -digits or abs(m) >= 10 ** 5)
    f = (lambda x: f"{x:.2e}") if small else (lambda x: f"{x:.{digits}f}")
    return f(m) if s is None else f"{f(m)} ± {f(s)}"


# ---- the training table ----------------------------------------------------------------------

def columns(study: dict, records: list[dict]) -> list[str]:
    reported = list(study.get("reported") or DEFAULT_REPORTED)
    out = []
    for key in reported:
        if key == "gamma_layers":
            depth = max((len(_layers(r)) for r in records), default=0)
            out += [f"gamma_l{k}" for k in range(depth)]
        elif key == "acc_at":
            out += [f"acc@{e}" for e in study.get("acc_at") or []]
        elif key == "trajectories":
            continue  # a figure
        else:
            out.append(key)
    if "gamma_hidden" in out:  # docs/studies.md: tables lead with gamma_hidden
        out.remove("gamma_hidden")
        out.insert(0, "gamma_hidden")
    return out


def _status_cell(recs: list[dict]) -> str:
    counts = defaultdict(int)
    for r in recs:
        counts[r.get("status", "?")] += 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def job_groups(records: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        s = r["study"]
        groups[(s.get("stage", "main"), s.get("job") or s.get("arm"))].append(r)
    return groups


def completed_groups(records: list[dict], lines: list[str]):
    """For each (stage, job): append its heading (with the status tally) to ``lines`` and yield
    (stage, job, completed records) where it has any."""
    for (stage, job), recs in job_groups(records).items():
        ok = [r for r in recs if r.get("status") == "completed"]
        lines.append(f"### {stage}/{job} ({_status_cell(recs)})")
        if not ok:
            lines.append("")
            continue
        yield stage, job, ok


def train_rows(study: dict, records: list[dict]) -> tuple[list[str], list[dict]]:
    """One row per (arm, point): status, n, and mean/std of every reported column."""
    cols = columns(study, records)
    compare = study.get("compare_to")
    groups = job_groups(records)
    # the comparator's runs (compare_to): each run is set against the comparator runs of the same
    # seed at the same values of the axes both have (continue-dfa from the same t0)
    baseline = [r for r in records if compare and r["study"].get("arm") == compare
                and r.get("status") in NUMBERED]

    def comparator(r):
        point = r["study"].get("point") or {}
        return [metric(b, "test_acc") for b in baseline if b.get("seed") == r.get("seed")
                and all(point.get(a, v) == v for a, v in (b["study"].get("point") or {}).items())]
    axes = sorted({a for r in records for a in (r["study"].get("point") or {})})
    rows = []
    for (stage, job), recs in groups.items():
        numbered = [r for r in recs if r.get("status") in NUMBERED]
        first = recs[0]["study"]
        row = {"stage": stage, "job": job, "arm": first.get("arm"),
               **{a: (first.get("point") or {}).get(a, "") for a in axes},
               "n": len(numbered), "status": _status_cell(recs),
               "seeds": sorted(r.get("seed") for r in recs if r.get("seed") is not None)}
        for col in cols:
            if col == "verdict":
                verdicts = [(r.get("protocol") or {}).get("verdict") for r in numbered]
                tally = defaultdict(int)
                for v in verdicts:
                    tally[v or "not measured"] += 1
                row[col] = ", ".join(f"{v} {n}/{len(numbered)}" for v, n in sorted(tally.items()))
                continue
            if col == "vs":
                diffs = []
                for r in numbered:
                    base = [b for b in comparator(r) if b is not None]
                    acc = metric(r, "test_acc")
                    if base and acc is not None:
                        diffs.append(acc - float(np.mean(base)))
                row[col] = mean_std(diffs)
                continue
            row[col] = mean_std([metric(r, col) for r in numbered])
        rows.append(row)
    # the study's own order: its arms as listed, each over its axis values in order
    arm_order = list((study.get("arms") or {}))
    rows.sort(key=lambda r: (r["stage"], arm_order.index(r["arm"]) if r["arm"] in arm_order
                             else len(arm_order), str(r["arm"]),
                             [_sortable(r.get(a, "")) for a in axes]))
    return cols, rows


def _sortable(v):
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def published(study: dict, row: dict) -> dict:
    """The original study's published values for this row's arm and axis point (the study
    config's ``reference:`` block: ``values: [{arm, point: {axis: value}, <metric>: value}]``)."""
    ref = study.get("reference") or {}
    for entry in ref.get("values") or []:
        if str(entry.get("arm")) != str(row.get("arm")):
            continue
        point = entry.get("point") or {}
        if all(_same(row.get(a), v) for a, v in point.items()):
            return {k: v for k, v in entry.items() if k not in ("arm", "point")}
    return {}


def _same(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def train_markdown(title: str, cols, rows, axes, study: dict | None = None) -> str:
    head = ["arm", *axes, "n", "status", *cols]
    lines = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    any_ref = False
    for r in rows:
        cells = [str(r["arm"]), *(str(r.get(a, "")) for a in axes), str(r["n"]), r["status"]]
        ref = published(study or {}, r)
        for c in cols:
            v = r.get(c)
            cell = v if isinstance(v, str) else fmt(*(v or (None, None))[:2])
            if c in ref and ref[c] is not None:  # the original's number beside lcredit's
                cell += f" (published {fmt(float(ref[c]), None)})"
                any_ref = True
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "mean ± std over seeds (ddof = 1; no ± with one seed); n = seeds with final "
              "numbers (completed or aborted); a failed or diverged job is counted in status "
              "and has no numbers."]
    if any_ref:
        source = ((study or {}).get("reference") or {}).get("source", "the original study")
        lines.append(f"(published x): the value {source} reports for that cell.")
    lines.append("")
    return "\n".join(lines)


def train_csv(path: Path, cols, rows, axes, study: dict | None = None) -> None:
    refs = [published(study or {}, r) for r in rows]
    with_ref = [c for c in cols if any(c in ref for ref in refs)]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stage", "arm", *axes, "n", "status", "seeds",
                    *(x for c in cols for x in (f"{c}_mean", f"{c}_std")),
                    *(f"{c}_published" for c in with_ref)])
        for r, ref in zip(rows, refs):
            out = [r["stage"], r["arm"], *(r.get(a, "") for a in axes), r["n"], r["status"],
                   " ".join(map(str, r["seeds"]))]
            for c in cols:
                v = r.get(c)
                out += [v, ""] if isinstance(v, str) else list((v or (None, None))[:2])
            out += [ref.get(c) for c in with_ref]
            w.writerow(["" if x is None else x for x in out])


def per_seed_table(records: list[dict], spec: dict) -> str:
    """``study.report.per_seed: {arms: [a, b], below: c}``: per seed, the arms' test accuracy
    and gamma_hidden beside arm c's, and which seeds have every arm below c while its
    gamma_hidden is positive (the failure (d) exists for)."""
    arms, below = list(spec["arms"]), spec["below"]
    by = defaultdict(dict)
    for r in records:
        if r.get("status") in NUMBERED:
            by[r.get("seed")][r["study"].get("arm")] = r
    title = " and ".join(arms) + f" below {below}"
    lines = [f"## {title}, per seed", "",
             "| seed | " + " | ".join(f"{a} acc" for a in (*arms, below)) + " | "
             + " | ".join(f"{a} gamma_hidden" for a in arms)
             + f" | all below {below}, cosines positive |",
             "|---" * (2 * len(arms) + 3) + "|"]
    hits = []
    for seed in sorted(s for s in by if s is not None):
        runs = by[seed]
        acc = {a: metric(runs[a], "test_acc") if a in runs else None for a in (*arms, below)}
        gam = {a: metric(runs[a], "gamma_hidden") if a in runs else None for a in arms}
        known = None not in (*acc.values(), *gam.values())
        hit = known and all(acc[a] < acc[below] and gam[a] > 0 for a in arms)
        if hit:
            hits.append(seed)
        lines.append(f"| {seed} | " + " | ".join(fmt(acc[a], None) for a in (*arms, below))
                     + " | " + " | ".join(fmt(gam[a], None) for a in arms)
                     + f" | {'yes' if hit else ('—' if not known else 'no')} |")
    lines += ["", f"seeds with all below {below} and positive cosines: "
              f"{', '.join(map(str, hits)) or 'none'} ({len(hits)} of {len(by)})", ""]
    return "\n".join(lines)


# ---- snapshot stages -------------------------------------------------------------------------

def probe_markdown(records: list[dict]) -> tuple[str, list[list]]:
    """Per snapshot and fitted rule: gamma, rho, nudge per layer, mean ± std over seeds."""
    lines, rows = ["## Credit recovered on the frozen snapshot (probe)", ""], []
    for stage, job, ok in completed_groups(records, lines):
        rules = list(ok[0]["probe"]["rules"])
        depth = len(next(iter(ok[0]["probe"]["rules"].values()))["layers"])
        for key in ("gamma", "rho", "nudge"):
            lines += ["", f"{key} per layer", "", "| layer | " + " | ".join(rules) + " |",
                      "|---|" + "---|" * len(rules)]
            for l in range(depth):
                cells = []
                for rule in rules:
                    m, s, n = mean_std([r["probe"]["rules"][rule]["layers"][l].get(key) for r in ok])
                    cells.append(fmt(m, s))
                    rows.append([stage, job, rule, l, key, m, s, n])
                lines.append(f"| {l} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines), rows


def exploit_markdown(records: list[dict]) -> tuple[str, list[list]]:
    lines, rows = ["## Exploitability: loss change after local steps", ""], []
    for stage, job, ok in completed_groups(records, lines):
        e = ok[0]["exploit"]
        lines += ["", f"{e['k']} step(s) on {e['blocks']} blocks; Δ loss (negative: the step "
                  "helped), mean ± std over seeds", "",
                  "| source | credit | step size | Δ same batch | Δ held out | diverged |",
                  "|---|---|---|---|---|---|"]
        keyed = defaultdict(list)
        for r in ok:
            for row in r["exploit"]["rows"]:
                keyed[(row["source"], row["credit"], row["step_size"])].append(row)
        for (src, credit, lr), vals in keyed.items():
            same = mean_std([v["same_batch_delta"] if v["finite"] else None for v in vals])
            held = mean_std([v["held_out_delta"] if v["finite"] else None for v in vals])
            bad = sum(not v["finite"] for v in vals)
            lines.append(f"| {src} | {credit} | {lr:g} | {fmt(*same[:2], 4)} | "
                         f"{fmt(*held[:2], 4)} | {bad}/{len(vals)} |")
            rows.append([stage, job, src, credit, lr, *same, *held[:2], bad])
        lines.append("")
    return "\n".join(lines), rows


def calibration_markdown(records: list[dict]) -> tuple[str, list[list]]:
    lines = ["## Protocol calibration", "",
             "| snapshot | rule gamma_deep | null gamma_deep (mean ± std of draws) | rho of bp gradient | rho of random vectors | random-init verdict |",
             "|---|---|---|---|---|---|"]
    rows = []
    for (stage, job), recs in job_groups(records).items():
        for r in recs:
            if r.get("status") != "completed":
                lines.append(f"| {job} seed {r.get('seed')} | {r.get('status')} | | | | |")
                continue
            c = r["calibrate"]
            agg = c["rule"]["aggregates"]
            deep = c["rule"]["layers"][1:]
            null_std = mean_std([x.get("null_gamma_std") for x in deep])[0]
            init = c["random_init"]
            fired = [k for k, d in init["diagnostics"].items() if d.get("fired")]
            lines.append(f"| {job} seed {r.get('seed')} | {fmt(agg.get('gamma_deep'), None)} | "
                         f"{fmt(agg.get('null_gamma_deep'), null_std)} | "
                         f"{fmt(c['bp_rho']['rho_deep'], None)} | "
                         f"{fmt(c['random_rho']['rho_deep'], None)} | {init['verdict']}"
                         f"{' (' + ','.join(fired) + ' fired)' if fired else ''} |")
            rows.append([stage, job, r.get("seed"), agg.get("gamma_deep"),
                         agg.get("null_gamma_deep"), null_std, c["bp_rho"]["rho_deep"],
                         c["random_rho"]["rho_deep"], init["verdict"]])
    lines.append("")
    return "\n".join(lines), rows


def threshold_sensitivity(reports: list[dict]) -> list[dict]:
    """Per diagnostic, the interval of its threshold over which every verdict (for (c), every
    sub-mode) stays what it is, the other thresholds held. A run whose verdict another
    diagnostic already decides does not constrain it."""
    out = []
    for k in diagnostic_columns():
        lo, hi, n, op, th = -math.inf, math.inf, 0, None, None
        for rep in reports:
            d = (rep.get("diagnostics") or {}).get(k) or {}
            v = d.get("value")
            if v is None or not math.isfinite(v):
                continue
            op, th = d.get("op"), d.get("threshold")
            others = [j for j in VERDICT_IDS if j != k
                      and ((rep.get("diagnostics") or {}).get(j) or {}).get("fired")]
            if k in VERDICT_IDS and others:
                continue  # walked back by another diagnostic whatever this threshold is
            n += 1
            fired = d.get("fired")
            # '>' fires when v > t: keeping it, t < v; keeping a non-firing one, t >= v.
            # '<' fires when v < t: keeping it, t > v; keeping a non-firing one, t <= v.
            if (op == ">") == bool(fired):
                hi = min(hi, v)
            else:
                lo = max(lo, v)
        out.append({"diagnostic": k, "op": op, "threshold": th, "runs": n,
                    "lower": lo, "upper": hi,
                    "lower_inclusive": op == ">", "upper_inclusive": op == "<",
                    "holds": th is None or (lo <= th <= hi)})
    return out


def sensitivity_markdown(rows: list[dict]) -> str:
    lines = ["## Threshold sensitivity", "",
             "The interval of each diagnostic's threshold that leaves every verdict (for (c): "
             "every sub-mode) of these runs unchanged, the other thresholds held; runs that "
             "another diagnostic already walks back do not constrain it.", "",
             "| diagnostic | fires when | threshold | runs | interval |", "|---|---|---|---|---|"]
    for r in rows:
        lo = "−∞" if r["lower"] == -math.inf else f"{r['lower']:.4g}"
        hi = "∞" if r["upper"] == math.inf else f"{r['upper']:.4g}"
        left = "[" if r["lower_inclusive"] and r["lower"] != -math.inf else "("
        right = "]" if r["upper_inclusive"] and r["upper"] != math.inf else ")"
        lines.append(f"| ({r['diagnostic']}) | value {r['op']} threshold | {r['threshold']} | "
                     f"{r['runs']} | {left}{lo}, {hi}{right} |")
    return "\n".join(lines) + "\n"


# ---- figures ---------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _spans_decades(values) -> bool:
    v = [x for x in values if x is not None and math.isfinite(x) and x > 0]
    return len(v) >= 2 and max(v) / min(v) > 100 and len(v) == len([x for x in values if x is not None])


def _job_order(records: list[dict]) -> list[tuple[str, list[dict]]]:
    groups = [(job, recs) for (_, job), recs in job_groups(records).items()]
    return sorted(groups, key=lambda g: -(mean_std([metric(r, "test_acc") for r in g[1]
                                                    if r.get("status") in NUMBERED])[0] or -1))


def diagnostics_figure(path: Path, title: str, records: list[dict]) -> None:
    plt = _plt()
    order = _job_order(records)
    names = [job for job, _ in order]
    fig, axes = plt.subplots(1, 4, figsize=(max(12, 0.5 * len(names) * 4), 4.2))
    for ax, (k, label) in zip(axes, diagnostic_columns().items()):
        th, op, all_vals = None, None, []
        for i, (job, recs) in enumerate(order):
            vals = []
            for r in recs:
                d = ((r.get("protocol") or {}).get("diagnostics") or {}).get(k) or {}
                if d.get("value") is not None and math.isfinite(d["value"]) and r.get("status") in NUMBERED:
                    vals.append(d["value"])
                th, op = d.get("threshold", th), d.get("op", op)
            all_vals += vals
            ax.scatter([i] * len(vals), vals, s=14, color="C0", alpha=0.7)
            if vals:
                ax.hlines(np.mean(vals), i - 0.3, i + 0.3, color="C1")
        if th is not None:
            ax.axhline(th, color="red", ls="--", lw=1, label=f"threshold ({op} {th:g})")
            ax.legend(fontsize=7)
        if _spans_decades(all_vals + ([th] if th else [])):
            ax.set_yscale("log")
        ax.set_title(f"({k}) {label}")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    fig.suptitle(f"{title}: the four diagnostics (arms by accuracy, best first)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def trajectories_figure(path: Path, title: str, records: list[dict]) -> None:
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    th_a, th_b, frozen = None, None, []
    for i, (job, recs) in enumerate(_job_order(records)):
        color = f"C{i % 10}"
        for j, r in enumerate(r for r in recs if r.get("history")):
            hist = r["history"]
            # every measured epoch: (a), (b) and the norms are measured every epoch
            meas = [(h["epoch"], h["protocol"]) for h in hist
                    if (h.get("protocol") or {}).get("layers")]
            lab = job if j == 0 else None
            if meas:
                e = [m[0] for m in meas]
                top = [m[1]["layers"][-1] for m in meas]
                axes[0].plot(e, [t.get("hidden_norm") for t in top], color=color, marker=".", label=lab)
                axes[1].plot(e, [t.get("bp_grad_norm") for t in top], color=color, marker=".")
                axes[2].plot(e, [((m[1].get("diagnostics") or {}).get("a") or {}).get("value")
                                 for m in meas], color=color, marker=".")
            axes[3].plot([h["epoch"] for h in hist], [h.get("test_acc") for h in hist], color=color)
            diags = (r.get("protocol") or {}).get("diagnostics") or {}
            th_a = (diags.get("a") or {}).get("threshold", th_a)
            th_b = (diags.get("b") or {}).get("threshold", th_b)
            fb = r.get("frozen_baseline") or {}
            if fb.get("final_acc") is not None:
                frozen.append(fb["final_acc"])
    if th_b is not None:
        axes[1].axhline(th_b, color="red", ls="--", lw=1, label=f"(b) floor {th_b:g}")
    if th_a is not None:
        axes[2].axhline(th_a, color="red", ls="--", lw=1, label=f"(a) threshold {th_a:g}")
    if frozen:
        axes[3].axhline(float(np.mean(frozen)), color="black", ls=":", lw=1.2,
                        label=f"frozen blocks {np.mean(frozen):.3f}")
    for ax, name in zip(axes, ("‖h_L‖", "‖g_L‖", "(a) residual growth", "test accuracy")):
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    for ax in axes[:3]:
        if ax.lines:
            ax.set_yscale("log")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{title}: trajectories (one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def layers_figure(path: Path, title: str, records: list[dict]) -> None:
    plt = _plt()
    order = [(job, [r for r in recs if r.get("status") in NUMBERED and _layers(r)])
             for job, recs in _job_order(records)]
    order = [(job, recs) for job, recs in order if recs]
    depth = max((len(_layers(r)) for _, recs in order for r in recs), default=1)
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 0.25 * depth * len(order) * 2), 4.2))
    width = 0.8 / max(1, len(order))
    for ax, key in zip(axes, ("gamma", "rho")):
        for i, (job, recs) in enumerate(order):
            stats = [mean_std([(_layers(r)[l] if l < len(_layers(r)) else {}).get(key) for r in recs])
                     for l in range(depth)]
            x = np.arange(depth) + (i - (len(order) - 1) / 2) * width
            ax.bar(x, [s[0] if s[0] is not None else np.nan for s in stats], width,
                   yerr=[s[1] or 0 for s in stats], label=job, color=f"C{i % 10}")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(depth))
        ax.set_xlabel("layer l")
        ax.set_title(f"{key} per layer (mean ± std over seeds)")
    if order:
        axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- putting it together ---------------------------------------------------------------------

FIGURES = {"diagnostics": diagnostics_figure, "trajectories": trajectories_figure,
           "layers": layers_figure}
SNAPSHOT_TABLES = {"probe": probe_markdown, "exploit": exploit_markdown,
                   "calibrate": calibration_markdown}
# What a study's report shows beyond its columns (``study.reported``), declared in its yaml's
# ``study.report`` node (docs/studies.md): its defaults.
REPORT_DEFAULTS = {"figures": list(FIGURES), "per_seed": None, "threshold_sensitivity": False}


def report_spec(study: dict) -> dict:
    """The study's ``report`` node over the defaults; a key or figure it cannot have is refused
    by name."""
    given = study.get("report") or {}
    for key in given:
        if key not in REPORT_DEFAULTS:
            raise ConfigError(f"study.report.{key}: no such option; the options: "
                              f"{', '.join(REPORT_DEFAULTS)}")
    spec = REPORT_DEFAULTS | given
    unknown = [f for f in spec["figures"] if f not in FIGURES]
    if unknown:
        raise ConfigError(f"study.report.figures: {unknown[0]!r} is not one of {', '.join(FIGURES)}")
    per_seed = spec["per_seed"]
    if per_seed is not None and (not isinstance(per_seed, dict) or set(per_seed) != {"arms", "below"}):
        raise ConfigError(f"study.report.per_seed={per_seed!r}: give {{arms: [a, b], below: c}}")
    return spec


def report_study(name: str, records: list[dict], out: Path) -> list[Path]:
    """``<name>.md`` with its tables and figures, and a CSV per table, from a study's records:
    what it shows is declared by the study (``study.reported``, ``study.report``)."""
    out.mkdir(parents=True, exist_ok=True)
    study = study_config(records)
    spec = report_spec(study)
    kinds = defaultdict(list)
    for r in records:
        kinds[r.get("kind", "train")].append(r)
    text, written = _header(name, study, records), []
    train = kinds.pop("train", [])
    for stage in sorted({r["study"].get("stage", "main") for r in train}):
        recs = [r for r in train if r["study"].get("stage", "main") == stage]
        text += _train_section(name, study, spec, stage, recs, out, written)
    for kind, fn in SNAPSHOT_TABLES.items():
        recs = kinds.pop(kind, [])
        if recs:
            md, rows = fn(recs)
            text.append(md)
            written.append(_write_rows(out / f"{name}_{kind}.csv", rows))
    if spec["threshold_sensitivity"]:
        reports = [r["protocol"] for r in train if r.get("status") in NUMBERED and r.get("protocol")]
        sens = threshold_sensitivity(reports)
        text.append(sensitivity_markdown(sens))
        written.append(_write_rows(out / f"{name}_threshold_sensitivity.csv",
                                   [list(sens[0]), *[list(r.values()) for r in sens]]))
    text += _failed_section(records)
    md = out / f"{name}.md"
    md.write_text("\n".join(text))
    return [md, *written]


def _write_rows(path: Path, rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["" if x is None else x for x in row] for row in rows])
    return path


def _header(name: str, study: dict, records: list[dict]) -> list[str]:
    """The title, the question, the scale, and notes on what the rows can be trusted for."""
    scales = sorted({str(r["study"].get("scale")) for r in records})
    text = [f"# {name}", ""]
    if study.get("question"):
        text += [f"Question: {study['question']}", ""]
    text += [f"Scale: {', '.join(scales)}. {len(records)} job(s) from "
             f"{len({str(Path(r['_path']).parent) for r in records})} result files.", ""]
    split = sorted({r["_split_from"] for r in records if r.get("_split_from")})
    if split:
        text += [f"Note: runs filed under one name ran different things and are separate rows: "
                 f"{', '.join(split)} (the bracket names the rule, or a hash of what differs).", ""]
    unchecked = [r for r in records if (r.get("frozen_baseline") or {}).get("check") == "off"]
    if unchecked:  # (d) against a comparator nobody matched to its run
        fields = sorted({k for r in unchecked for k in r["frozen_baseline"].get("mismatched") or []})
        text += [f"Note: {len(unchecked)} run(s) compared with a frozen baseline that was not "
                 f"checked against them (protocol.frozen_baseline_check=false; mismatched: "
                 f"{', '.join(fields) or 'unknown'}): their (d) may compare different runs.", ""]
    return text


def _train_section(name, study, spec, stage, recs, out: Path, written: list) -> list[str]:
    """One stage's training runs: the table (and its CSV), the per-seed table, the figures."""
    axes = sorted({a for r in recs for a in (r["study"].get("point") or {})})
    # a stage others build on (a snapshot, a run to branch from) reports the usual columns;
    # the study's own columns belong to the stage that answers its question
    feeds = any(((st or {}).get("source") or {}).get("stage") == stage
                for st in (study.get("stages") or {}).values())
    shown = dict(study, reported=DEFAULT_REPORTED) if feeds else study
    cols, rows = train_rows(shown, recs)
    if "vs" in cols:  # say against what: test accuracy minus the comparator's, per seed
        name_vs = f"acc_minus_{study.get('compare_to')}"
        cols = [name_vs if c == "vs" else c for c in cols]
        for r in rows:
            r[name_vs] = r.pop("vs", None)
    stage_axes = [a for a in axes if any(r.get(a) for r in rows)]
    label = "" if stage == "main" else f"_{stage}"
    text = [train_markdown(f"Training runs{'' if stage == 'main' else ' — stage ' + stage}",
                           cols, rows, stage_axes, study)]
    csv_path = out / f"{name}{label}.csv"
    train_csv(csv_path, cols, rows, stage_axes, study)
    written.append(csv_path)
    if spec["per_seed"] and not feeds:
        text.append(per_seed_table(recs, spec["per_seed"]))
    title = f"{name}{'' if stage == 'main' else ' / ' + stage}"
    for kind in spec["figures"]:
        png = out / f"{name}{label}_{kind}.png"
        FIGURES[kind](png, title, recs)
        written.append(png)
        text.append(f"![{kind}]({png.name})")
    return text + [""]


def _failed_section(records: list[dict]) -> list[str]:
    failed = [r for r in records if r.get("status") not in NUMBERED]
    if not failed:
        return []
    text = ["## Jobs without final numbers", "", "| job | seed | status | error |",
            "|---|---|---|---|"]
    for r in failed:
        s = r["study"]
        err = str(r.get("error") or (r.get("divergence") and "diverged") or "").replace("|", "/")
        text.append(f"| {s.get('stage', 'main')}/{s.get('job')} | {r.get('seed')} | "
                    f"{r.get('status')} | {err[:160]} |")
    return text + [""]


def report(dirs, out=None, wandb_mode=None, project="lcredit") -> list[Path]:
    """``wandb_mode``: offline or online uploads each study's figures and tables to W&B too
    (group = the study, job_type = report); None: files only."""
    studies = collect(dirs)
    out = Path(out) if out else Path(dirs[0]) / "report"
    written = []
    for name, records in sorted(studies.items()):
        files = report_study(name, records, out)
        written += files
        if wandb_mode:
            scales = sorted({str(r["study"].get("scale")) for r in records})
            upload(name, "/".join(scales), files, out, wandb_mode, project)
    return written


def upload(name: str, scale: str, files: list[Path], out: Path, mode: str, project: str) -> None:
    import wandb

    run = wandb.init(project=project, group=f"{name}/{scale}", job_type="report",
                     name=f"report {name}/{scale}", dir=str(out), mode=mode, reinit=True,
                     config={"study": name, "scale": scale})
    for path in files:
        if path.suffix == ".png":
            run.log({f"figures/{path.stem}": wandb.Image(str(path))})
        elif path.suffix == ".csv":
            with path.open() as f:
                rows = list(csv.reader(f))
            if rows:
                run.log({f"tables/{path.stem}": wandb.Table(columns=rows[0], data=rows[1:])})
    run.finish()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lcredit.report",
                                 description="Tables and figures of studies from their results.json files.")
    ap.add_argument("dirs", nargs="+", help="study or sweep directories (searched recursively)")
    ap.add_argument("--out", help="where the tables and figures go (default: <first dir>/report)")
    ap.add_argument("--wandb", nargs="?", const="offline", choices=("offline", "online"),
                    help="also upload the figures and tables to W&B (offline unless --wandb online)")
    ap.add_argument("--wandb-project", default="lcredit")
    args = ap.parse_args(argv)
    try:
        written = report(args.dirs, args.out, args.wandb, args.wandb_project)
    except ConfigError as err:
        print(f"lcredit.report: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the output directory cannot be written
        print(f"lcredit.report: error: {err.filename or args.out}: cannot write there "
              f"({err.strerror or err})", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
