"""The audit table: every rule's default form, trained and judged by the protocol, on the default
task (`make run`'s) and on digits with small_cnn, over several seeds.

    python scripts/audit_table.py --readme README.md          # docs/audit.{json,md}, README table
    python scripts/audit_table.py --seeds 0 --epochs 1 --rules bp,usf --tasks digits \
        --out /tmp/audit                                      # a tiny run of the same path

Each run is `python -m lcredit.train method=<rule> [task] seed=<s>` at the rule's defaults,
with the protocol measuring but not aborting (`protocol.abort.enabled=false`: every rule trains
the full budget, so the accuracies compare, and the epoch each diagnostic first fired is
recorded); the frozen baseline is the auto one those runs were judged against. Mean ± std over
seeds use ddof = 1. Under the digits table: whether lcredit's order keeps BioTorch's published
one, from the figures (the interpretation, where it does not, is left to a marked placeholder).
Runs already done with the same overrides (a completed results.json) are read back, not rerun.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from default_task import mean_std  # noqa: E402

# (row, overrides): every rule's default form (docs/rules.md); fa's two variants are two rows.
ROWS = {
    "bp": ["method=bp"], "frozen": ["method=frozen"],
    "fa (blockwise)": ["method=fa"], "fa (layerwise)": ["method=fa", "method.variant=layerwise"],
    "dfa": ["method=dfa"], "drtp": ["method=drtp"],
    "usf": ["method=usf"], "brsf": ["method=brsf"], "frsf": ["method=frsf"], "kp": ["method=kp"],
    "ep": ["method=ep"], "sb": ["method=sb"], "cb": ["method=cb"], "vec": ["method=vec"],
    "blend": ["method=blend"],
}
# On small_cnn one measurement at docs/metrics.md's rho sizes (1024 samples x 32 directions of
# float64 forward passes through the CNN, per layer) takes ~7 minutes on a 2-core CPU, three
# per run; rho is pooled from 256 x 8 there so that the table fits a working session (the
# sizes are in the table's header and in every results.json).
TASKS = {"default": [], "digits": ["data=digits", "model=small_cnn",
                                   "protocol.measure.rho_samples=256",
                                   "protocol.measure.rho_directions=8"]}
# BioTorch's published top-1 error (%), LeNet on MNIST and Fashion-MNIST, ResNet-20 (SGD) on
# CIFAR-10 (issue 23); lcredit's rows: fa is BioTorch's layerwise FA.
BIOTORCH = {
    "MNIST": {"bp": 0.91, "usf": 0.94, "brsf": 0.91, "frsf": 0.97, "fa (layerwise)": 1.7,
              "dfa": 1.61},
    "Fashion-MNIST": {"bp": 9.2, "usf": 9.69, "brsf": 10.02, "frsf": 9.61,
                      "fa (layerwise)": 13.06, "dfa": 12.81},
    "CIFAR-10 (ResNet-20)": {"bp": 8.63, "usf": 10.05, "brsf": 11.02, "frsf": 11.2,
                             "fa (layerwise)": 32.16, "dfa": 45.94},
}
SIGN, RANDOM = ("usf", "brsf", "frsf"), ("fa (layerwise)", "dfa")
COMPARED_ON = "digits"


def slug(row: str) -> str:
    return row.replace(" (", "_").replace(")", "")


def run(row, task, seed, runs: Path, extra=()) -> dict:
    """One run, or its results.json where a completed one is there already."""
    out = runs / task / slug(row) / f"seed{seed}"
    overrides = [*ROWS[row], *TASKS[task], f"seed={seed}", *extra]
    done, asked = out / "results.json", out / "audit_overrides.json"
    if done.exists() and asked.exists() and json.loads(asked.read_text()) == overrides:
        r = json.loads(done.read_text())
        if r.get("status") == "completed":
            return r
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import lcredit.train as lt
    from lcredit.errors import ConfigError

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            *overrides, f"paths.output_dir={out}", f"paths.cache_dir={runs / 'cache'}",
            "protocol.print_report=false", "protocol.abort.enabled=false",
            "trainer.enable_progress_bar=false"])
    out.mkdir(parents=True, exist_ok=True)
    asked.write_text(json.dumps(overrides))
    try:
        return lt.train(cfg)
    except ConfigError as err:  # a rule that cannot run this model (fa blockwise on a CNN)
        return {"status": "refused", "error": str(err)}


def summary(r: dict, seed: int) -> dict:
    if r.get("status") != "completed":
        return {"seed": seed, "status": r.get("status"), "error": r.get("error")}
    p = r["protocol"]
    return {
        "seed": seed, "status": "completed", "test_acc": r["final"]["test_acc"],
        "epochs": r["final"]["epochs"],
        "frozen_acc": (r.get("frozen_baseline") or {}).get("final_acc"),
        "gamma_hidden": p["aggregates"].get("gamma_hidden"),
        "gamma_0": p["aggregates"].get("gamma_0"),
        "growth": p["diagnostics"]["a"]["value"], "floor": p["diagnostics"]["b"]["value"],
        "verdict": p["verdict"], "reasons": p["reasons"],
        "first_fired": {k: v for k, v in (r.get("protocol_first_fired") or {}).items()
                        if v is not None},
        "wall_time_s": r["wall_time_s"], "results": str(Path(r["output_dir"]) / "results.json")}


def measure(tasks, rows, seeds, runs: Path, extra=()) -> dict:
    out = {}
    for task in tasks:
        out[task] = {}
        for row in rows:
            out[task][row] = [summary(run(row, task, s, runs, extra), s) for s in seeds]
    return out


# ---------------------------------------------------------------- rendering
def done(rows):
    return [r for r in rows if r["status"] == "completed"]


def sci(vals):
    return mean_std(vals, ".2e", ".1e")


def fired(rows) -> str:
    """Each seed's first-fire epochs, e.g. `a@2 d@15`; one entry with ×n where seeds agree."""
    per_seed = [" ".join(f"{k}@{e}" for k, e in sorted(r["first_fired"].items())) or "none"
                for r in rows]
    if per_seed and len(set(per_seed)) == 1:
        return per_seed[0] + (f" (×{len(per_seed)})" if len(per_seed) > 1 else "")
    return " · ".join(per_seed)


def verdict(rows) -> str:
    walked = sum(r["verdict"] == "walk back" for r in rows)
    reasons = sorted({x.split(":")[0] for r in rows for x in r["reasons"]})
    return (f"{'walk back' if walked else 'trustworthy'} ({walked}/{len(rows)}"
            f"{'; ' + ', '.join(reasons) if reasons else ''})")


def table(task_rows: dict) -> list[str]:
    lines = ["| rule | test acc | frozen baseline | gamma_hidden | gamma_0 | (a) growth | "
             "(b) ‖g_L‖ floor | verdict (walk back / seeds) | fired (diagnostic@epoch) | "
             "wall s / run |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row, all_rows in task_rows.items():
        rows = done(all_rows)
        if not rows:
            why = next((r.get("error") for r in all_rows if r.get("error")), "no completed run")
            lines.append(f"| {row} | not run: {str(why).splitlines()[0][:240]} |  |  |  |  |  |  |  |  |")
            continue
        lines.append(
            f"| {row} | {mean_std([r['test_acc'] for r in rows])} | "
            f"{mean_std([r['frozen_acc'] for r in rows])} | "
            f"{mean_std([r['gamma_hidden'] for r in rows])} | "
            f"{mean_std([r['gamma_0'] for r in rows])} | {mean_std([r['growth'] for r in rows])} | "
            f"{sci([r['floor'] for r in rows])} | {verdict(rows)} | {fired(rows)} | "
            f"{statistics.mean(r['wall_time_s'] for r in rows):.0f} |")
    return lines


def accuracies(task_rows, names):
    out = {}
    for name in names:
        rows = done(task_rows.get(name, []))
        if rows:
            vals = [r["test_acc"] for r in rows]
            out[name] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return out


def ordering(task_rows: dict) -> list[str]:
    """BioTorch's order against lcredit's, from the numbers of ``task_rows`` only."""
    names = ("bp",) + SIGN + RANDOM
    acc = accuracies(task_rows, names)
    lines = ["**Against BioTorch's published order.** BioTorch's top-1 error (%): " + "; ".join(
        f"{ds}: " + ", ".join(f"{n} {e}" for n, e in sorted(errs.items(), key=lambda kv: kv[1]))
        for ds, errs in BIOTORCH.items())
        + ". On all three, the sign-symmetry rules (usf, brsf, frsf) are close to bp and fa and "
          "dfa far behind."]
    missing = [n for n in names if n not in acc]
    if missing:
        return lines + ["", f"Not compared: no completed run of {', '.join(missing)}."]
    order = sorted(names, key=lambda n: -acc[n][0])
    lines += ["", "lcredit here, by mean test accuracy: " + " > ".join(
        f"{n} {100 * acc[n][0]:.1f}%" for n in order) + "."]
    worst_sign = min(SIGN, key=lambda n: acc[n][0])
    best_random = max(RANDOM, key=lambda n: acc[n][0])
    gap = 100 * (acc[worst_sign][0] - acc[best_random][0])
    noise = 100 * max(acc[worst_sign][1], acc[best_random][1])
    keeps = gap > 0
    bp_sign = 100 * (acc["bp"][0] - statistics.mean(acc[n][0] for n in SIGN))
    bp_random = 100 * (acc["bp"][0] - statistics.mean(acc[n][0] for n in RANDOM))
    lines += ["", (f"The coarse order {'holds' if keeps else 'does not hold'}: the worst "
                   f"sign-symmetry rule ({worst_sign}) is {abs(gap):.1f} pp "
                   f"{'above' if keeps else 'below'} the best of fa and dfa ({best_random})"
                   + (f", within the seeds' spread ({noise:.1f} pp std)" if abs(gap) <= noise
                      else "") + f"; bp leads the sign rules by {bp_sign:.1f} pp on average and "
                   f"fa/dfa by {bp_random:.1f} pp.")]
    pub = BIOTORCH["MNIST"]
    swapped = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
               if (pub[a] - pub[b]) * (acc[b][0] - acc[a][0]) < 0]  # error up = acc down
    if swapped:
        lines += ["", "Pairs in the other order than BioTorch's MNIST: " + ", ".join(
            f"{a}/{b} ({100 * (acc[a][0] - acc[b][0]):+.1f} pp)" for a, b in swapped) + "."]
    frozen = [r["frozen_acc"] for n in names for r in done(task_rows[n]) if r["frozen_acc"]]
    facts = "; ".join(
        f"{n}: gamma_hidden {mean_std([r['gamma_hidden'] for r in done(task_rows[n])])}, "
        f"{verdict(done(task_rows[n]))}" for n in names)
    lines += ["", f"What the protocol says of these rows: {facts}; frozen baseline "
                  f"{mean_std(frozen)}."]
    if not keeps or swapped:
        lines += ["", "<!-- WHY (placeholder, to be written by hand from the figures above once "
                      "the full run exists): why lcredit's order differs from BioTorch's here. -->"]
    return lines


def render(full: dict) -> str:
    s = full["setup"]
    lines = [f"Every rule's default form, {len(s['seeds'])} seed(s) ({', '.join(map(str, s['seeds']))}), "
             f"mean ± std (ddof=1); the protocol measures every run and does not abort it "
             f"({s['date']}, `scripts/audit_table.py`{' ' + ' '.join(s['extra']) if s['extra'] else ''}; "
             f"the script took {s['script_wall_s'] / 60:.0f} minutes on {s['host']}, its runs "
             f"{s['cpu_s'] / 60:.0f} minutes of wall time in all)."]
    for task, rows in full["tasks"].items():
        lines += ["", f"**{task}** (`{s['task_overrides'][task] or 'make run'}`):", ""]
        lines += table(rows)
        if task == COMPARED_ON:
            lines += [""] + ordering(rows)
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--rules", default=",".join(ROWS), help="rows, comma-separated (names of ROWS)")
    ap.add_argument("--epochs", type=int, help="trainer.max_epochs (default: the task's own)")
    ap.add_argument("--extra", default="", help="more overrides, space-separated (tiny runs)")
    ap.add_argument("--runs", default=str(REPO / "outputs" / "audit_table"))
    ap.add_argument("--out", default=str(REPO / "docs" / "audit"))
    ap.add_argument("--readme", help="also copy the tables into this README, between its markers")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.render_only:
        import platform
        import os

        seeds = [int(x) for x in args.seeds.split(",")]
        rows = [r.strip() for r in args.rules.split(",")]
        unknown = [r for r in rows if r not in ROWS]
        if unknown:
            raise SystemExit(f"--rules: unknown {unknown}; known: {', '.join(ROWS)}")
        extra = ([f"trainer.max_epochs={args.epochs}"] if args.epochs else []) + args.extra.split()
        tasks = args.tasks.split(",")
        t0 = time.process_time(), time.time()
        measured = measure(tasks, rows, seeds, Path(args.runs), extra)
        full = {"setup": {"seeds": seeds, "extra": extra, "date": time.strftime("%Y-%m-%d"),
                          "task_overrides": {t: " ".join(TASKS[t]) for t in tasks},
                          "cpu_s": sum(r.get("wall_time_s", 0) for t in measured.values()
                                       for rs in t.values() for r in rs),
                          "script_wall_s": time.time() - t0[1],
                          "host": f"{platform.node()} ({os.cpu_count()} cores)"},
                "tasks": measured}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(full, indent=2))
    text = render(json.loads(out.with_suffix(".json").read_text()))
    out.with_suffix(".md").write_text("# The audit table\n\n" + text)
    print(text)
    if args.readme:
        from readme_table import update

        update(Path(args.readme), text, marker="audit_table")


if __name__ == "__main__":
    main()
