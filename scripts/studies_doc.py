"""docs/studies.md, the README's "Reproduce the studies" table and the cost line of every
conf/experiment/<study>.yaml, from the study configs themselves (``make studies-doc``).

Costs are estimates, and say so:
- paper (GPU-hours on one H100): every training job's epochs x the seconds per epoch measured
  on an H100 (../shared/GPU.md, 2026-11-27: bp 1.82 s per CIFAR-10-sized epoch of 391 steps, the
  other rules in their measured ratio to bp on the ladder), + 20% for the protocol, + one frozen
  baseline per distinct run; a probe/exploit stage as its estimator steps of the fitted rules.
- smoke (CPU minutes on this 2-core machine): measured, the wall time of the whole study at
  scale=smoke (``--measure-smoke`` runs each one and writes docs/smoke_times.json).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lcredit.study import compose_job, expand, stages, study_node  # noqa: E402

# H100 seconds per training epoch (../shared/GPU.md): CIFAR-sized (391 steps) for bp; the rest
# scaled by their ratio to bp on the ladder (0.80 bp, 1.18 dfa, 1.08 fa, 2.75 sb, 4.36 vec,
# 6.41 cb, 10.19 ep). blend ~ vec (it trains the vec field); frozen ~ bp's forward-heavy half.
LADDER = {"bp": 0.80, "dfa": 1.18, "fa": 1.08, "sb": 2.75, "vec": 4.36, "cb": 6.41, "ep": 10.19}
RATIO = {k: v / LADDER["bp"] for k, v in LADDER.items()} | {"blend": LADDER["vec"] / LADDER["bp"],
                                                            "frozen": 0.6}
BP_EPOCH = {"cifar10": 1.82, "cifar100": 1.82, "ladder": 0.80, "lq": 0.80 * 32 / 157}
IMAGE_MODELS = 2.0   # vit_mini / small_cnn vs the ResMLP (unmeasured; a guess, said so)
PROTOCOL = 1.2


def rule_of(cfg) -> str:
    return cfg.method._target_.rsplit(".", 1)[-1].lower().replace("directfeedbackalignment", "dfa")


RULE_NAMES = {"bp": "bp", "backprop": "bp", "dfa": "dfa", "fa": "fa", "feedbackalignment": "fa",
              "ep": "ep", "equilibriumpropagation": "ep", "sb": "sb", "statebridge": "sb",
              "cb": "cb", "creditbridge": "cb", "vec": "vec", "blend": "blend", "frozen": "frozen"}


def paper_hours(name: str) -> float:
    study = study_node(compose_job(name, []))
    seconds, frozen = 0.0, set()
    for job in expand(study, "paper"):
        if job.kind != "train":
            opts = job.extra.get("config") or {}
            steps = int(opts.get("steps", opts.get("fit_steps", 0)) or 0)
            fitted = [r.split(":")[-1] for r in opts.get("rules", opts.get("sources", []))]
            seconds += sum(steps / 391 * BP_EPOCH["cifar10"] * RATIO.get(r, 1.0) for r in fitted)
            continue
        cfg = compose_job(name, [*job.overrides, "++study.arm=x"])
        rule = RULE_NAMES.get(cfg.method._target_.rsplit(".", 1)[-1].lower(), "bp")
        data = cfg.data.get("name") or cfg.data._target_.rsplit(".", 1)[-1]
        per_epoch = BP_EPOCH.get(data, 0.8) * RATIO.get(rule, 1.0) * PROTOCOL
        if "ResMLP" not in cfg.model._target_ and "Student" not in cfg.model._target_:
            per_epoch *= IMAGE_MODELS
        seconds += per_epoch * int(cfg.trainer.max_epochs)
        key = (data, job.seed, str(dict(cfg.model)), int(cfg.trainer.max_epochs), job.source is not None)
        if key not in frozen and rule != "frozen":
            frozen.add(key)
            seconds += BP_EPOCH.get(data, 0.8) * RATIO["frozen"] * int(cfg.trainer.max_epochs)
    return seconds / 3600


def smoke_jobs(name: str) -> int:
    return len(expand(study_node(compose_job(name, ["scale=smoke"])), "smoke"))


def describe(name: str) -> dict:
    cfg = compose_job(name, [])
    study = study_node(cfg)
    text = (ROOT / "src/lcredit/conf/experiment" / f"{name}.yaml").read_text()
    comment = [ln[2:] for ln in text.splitlines() if ln.startswith("# ") and "@package" not in ln]
    comment = [ln for ln in comment if not ln.startswith(("Cost:", "  python -m"))]
    plan = stages(study, "paper")
    return {"name": name, "question": study.get("question", ""), "about": " ".join(comment),
            "staged": list(plan) != ["main"], "stages": plan, "reported": study.get("reported", []),
            "report": study.get("report") or {},
            "paper_jobs": len(expand(study, "paper")), "smoke_jobs": smoke_jobs(name)}


def _plain(v) -> str:
    """A report option as its yaml reads."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_plain(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(map(_plain, v)) + "]"
    return str(v).lower() if isinstance(v, bool) else str(v)


def command(d: dict, scale: str = "") -> str:
    extra = f" scale={scale}" if scale else ""
    if d["staged"]:
        return f"python -m lcredit.study {d['name']}{extra}"
    return f"python -m lcredit.train experiment={d['name']}{extra} -m"


def render(rows: list[dict], smoke_times: dict) -> tuple[str, str]:
    table = ["| study | run (paper scale; add `scale=smoke` for the offline version) | report | jobs paper / smoke | cost paper (H100 GPU-h, est.) | cost smoke (2-core CPU min, measured) |",
             "|---|---|---|---|---|---|"]
    doc = ["# Studies", "",
           "Every study of the original work (its settings, machine-readable: `docs/spec_studies.yaml`)",
           "is one config, `conf/experiment/<study>.yaml`,",
           "at its original settings (`scale=paper`, the default: data, model, epochs, seeds, arms, axes,",
           "abort off so the numbers are final-epoch numbers) with an offline version `scale=smoke`",
           "(digits, the small ladder or lq; few epochs; 2 seeds; lighter measurement: rho 256 samples,",
           "4 null draws) that runs in minutes on a CPU. Both scales are recorded in every results.json",
           "(`study: {name, scale, stage, arm, point, job}`).", "",
           "- A single-stage study is a sweep: `python -m lcredit.train experiment=<study> [scale=smoke] -m`",
           "  (Hydra's `study` sweeper expands the study's arms × axes × seeds; jobs land in",
           "  `studies/<study>/<scale>/<arm>[,<axis>=<value>…]/seed=<n>/`). `seed=1,2` replaces the seeds;",
           "  any other override applies to every job.",
           "- A study with stages (a snapshot to probe, a checkpoint to branch from, then arms):",
           "  `python -m lcredit.study <study> [scale=smoke] [out=DIR] [arms=a,b] [seeds=0,1] [overrides…]`",
           "  runs the stages in order through the same `train()` (and the probe / exploit / calibrate",
           "  tools), under `studies/<study>/<scale>/<stage>/…`. A job whose results.json says completed",
           "  is skipped, so rerunning the command continues where it stopped; a job whose source failed",
           "  is recorded as failed. (It runs single-stage studies too.)",
           "- `python -m lcredit.report studies/<study>/<scale>` reads the results.json files only and",
           "  writes `report/<study>.md` and `.csv` (mean ± std, ddof = 1, over seeds; n; the status of",
           "  every job, failed ones listed), `<study>_diagnostics.png` (the four diagnostics per arm,",
           "  arms by accuracy, thresholds drawn), `<study>_trajectories.png` (‖h_L‖, ‖g_L‖, test accuracy",
           "  per epoch with the (b) floor and the frozen baseline) and `<study>_layers.png` (gamma and rho",
           "  per layer); snapshot stages add their tables. What else a study's report shows is",
           "  declared in its yaml's `study.report` node: `figures` (default: all three),",
           "  `per_seed: {arms: [a, b], below: c}` (per seed, which arms end below c with positive",
           "  cosines) and `threshold_sensitivity: true` (per diagnostic, how far its threshold can",
           "  move before a verdict changes).", "",
           "Paper costs are estimates (`scripts/studies_doc.py` says how): the per-epoch times measured",
           "on an H100 times each job's epochs. Smoke costs are measured: the whole study at",
           "scale=smoke on this 2-core CPU (`make studies-doc ARGS=--measure-smoke=<dir>`;",
           "`docs/smoke_times.json`).", ""]
    for d in rows:
        paper = d["paper_hours"]
        smoke = d.get("smoke_minutes")
        smoke_cell = "—" if smoke is None else f"{smoke:.1f}"
        table.append(f"| [{d['name']}](docs/studies.md#{d['name'].replace('_', '_')}) | "
                     f"`{command(d)}` | `python -m lcredit.report studies/{d['name']}/paper` | "
                     f"{d['paper_jobs']} / {d['smoke_jobs']} | {paper:.1f} | {smoke_cell} |")
        doc += [f"## {d['name']}", "", d["about"], "",
                f"- Run: `{command(d)}` (offline: `{command(d, 'smoke')}`)",
                f"- Report: `python -m lcredit.report studies/{d['name']}/<scale>` → "
                f"`studies/{d['name']}/<scale>/report/{d['name']}.md`, `.csv`, `*.png`",
                f"- Reported per arm: {', '.join(d['reported'])}"
                + "".join(f"; {k}: {_plain(v)}" for k, v in d["report"].items()),
                f"- Jobs: {d['paper_jobs']} at paper scale (≈ {paper:.1f} H100 GPU-hours), "
                f"{d['smoke_jobs']} at smoke (≈ {smoke_cell} CPU minutes)"]
        for stage, st in d["stages"].items():
            if stage == "main":
                continue
            what = st.get("replicate") and f"the best arm of `{st['replicate']['stage']}` again" \
                or ", ".join(st["arms"])
            src = f", from `{st['source']['stage']}`" if st.get("source") else ""
            doc.append(f"- Stage `{stage}` ({st['kind']}{src}): {what}")
        doc.append("")
    return "\n".join(table), "\n".join(doc) + "\n"


def write_cost_lines(rows):
    for d in rows:
        path = ROOT / "src/lcredit/conf/experiment" / f"{d['name']}.yaml"
        text = path.read_text()
        smoke = d.get("smoke_minutes")
        line = (f"# Cost: paper ~{d['paper_hours']:.1f} H100 GPU-hours ({d['paper_jobs']} jobs, "
                f"estimated); smoke {'not measured' if smoke is None else f'{smoke:.1f} CPU minutes'} on "
                f"2 cores ({d['smoke_jobs']} jobs, measured).")
        text = re.sub(r"^# Cost:.*$", line, text, count=1, flags=re.M)
        path.write_text(text)


def measure_smoke(names, path: Path, out: Path) -> None:
    """Run every study at scale=smoke, one after another, and record each one's wall time."""
    import datetime
    import platform
    import subprocess
    import time

    times = json.loads(path.read_text()) if path.is_file() else {}
    for name in names:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "lcredit.study", name, "scale=smoke",
                               f"out={out / name}", "trainer.enable_progress_bar=false",
                               "protocol.print_report=false", f"paths.cache_dir={out / name / 'cache'}"],
                              capture_output=True, text=True, cwd=out)
        seconds = time.perf_counter() - start
        jobs = len([p for p in (out / name).glob("**/results.json") if "cache" not in p.parts])
        times[name] = {"seconds": round(seconds, 1), "jobs": jobs, "exit": proc.returncode,
                       "date": datetime.date.today().isoformat(), "machine": platform.node(),
                       "cores": len(os.sched_getaffinity(0))}
        path.write_text(json.dumps(times, indent=1, sort_keys=True))
        print(f"{name}: {seconds / 60:.1f} min, {jobs} jobs, exit {proc.returncode}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--readme", action="store_true", help="replace the README's table")
    ap.add_argument("--measure-smoke", metavar="DIR",
                    help="first run every study at scale=smoke under DIR and time it")
    args = ap.parse_args()
    times_path = ROOT / "docs" / "smoke_times.json"
    names = sorted(p.stem for p in (ROOT / "src/lcredit/conf/experiment").glob("*.yaml"))
    if args.measure_smoke:
        out = Path(args.measure_smoke).resolve()
        out.mkdir(parents=True, exist_ok=True)
        measure_smoke(names, times_path, out)
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    rows = []
    for name in names:
        d = describe(name)
        d["paper_hours"] = paper_hours(name)
        t = times.get(name)
        if t and t.get("exit") == 0:
            d["smoke_minutes"] = t["seconds"] / 60
        rows.append(d)
    table, doc = render(rows, times)
    (ROOT / "docs" / "studies.md").write_text(doc)
    write_cost_lines(rows)
    if args.readme:
        readme = ROOT / "README.md"
        text = readme.read_text()
        start, end = "<!-- studies:start -->", "<!-- studies:end -->"
        i, j = text.index(start) + len(start), text.index(end)
        readme.write_text(text[:i] + "\n" + table + "\n" + text[j:])
    print(table)


if __name__ == "__main__":
    main()
