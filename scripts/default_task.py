"""What the default run shows: bp, fa and dfa at lcredit's defaults (the `make run` task and
budget), the frozen-blocks baseline they are judged against, and a linear probe of the input,
over several seeds.

    python scripts/default_task.py --readme README.md     # docs/default_task.{json,md}

Every run is `python -m lcredit.train method=<rule> seed=<s>` with nothing else changed (early
abort on, the auto frozen baseline), so each row is what a user sees from `make run`. The
frozen accuracy is the baseline those runs used; the linear probe (`lcredit.baseline.
linear_probe`) trains a softmax regression on the raw input with the same data stream and
epochs. Mean ± std over seeds use ddof = 1.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RULES = ("bp", "fa", "dfa")


def run(rule, seed, runs: Path, extra=()):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import lcredit.train as lt

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"method={rule}", f"seed={seed}", f"paths.output_dir={runs / rule / f'seed{seed}'}",
            f"paths.cache_dir={runs / 'cache'}", "protocol.print_report=false",
            "trainer.enable_progress_bar=false", *extra])
    return lt.train(cfg), cfg


def measure(seeds, runs: Path, extra=(), rules=RULES) -> dict:
    """The figures of the table (and of the slow test that checks its inequalities)."""
    from lcredit.baseline import linear_probe
    from lcredit.data import build_task

    out = {"rules": {}, "frozen": [], "linear": [], "seeds": list(seeds), "overrides": list(extra)}
    for seed in seeds:
        for rule in rules:
            r, cfg = run(rule, seed, runs, extra)
            p = r["protocol"]
            out["rules"].setdefault(rule, []).append({
                "seed": seed, "test_acc": r["final"]["test_acc"], "epochs": r["final"]["epochs"],
                "status": r["status"], "verdict": p["verdict"], "reasons": p["reasons"],
                "gamma_hidden": p["aggregates"].get("gamma_hidden"),
                "growth": p["diagnostics"]["a"]["value"],
                "grad_floor": p["diagnostics"]["b"]["value"],
                "margin_pp": p["diagnostics"]["d"]["value"],
                "results": str(Path(r["output_dir"]) / "results.json")})
            if rule == "bp":
                out["frozen"].append(r["frozen_baseline"]["final_acc"])
                out["linear"].append(linear_probe(build_task(cfg.data), cfg.trainer.max_epochs,
                                                  cfg.data.batch_size, seed=seed))
    return out


def mean_std(vals, fmt: str = ".3f", spread: str | None = None):
    """mean ± std (ddof = 1) of the values given, in ``fmt`` (the std in ``spread``, default
    ``fmt``); "—" for none."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:{fmt}}"
    return f"{statistics.mean(vals):{fmt}} ± {statistics.stdev(vals):{spread or fmt}}"


def render(full: dict) -> str:
    s = full["setup"]
    lines = [f"`make run`'s task and budget (`{s['task']}`), seeds "
             f"{', '.join(map(str, full['default']['seeds']))}; mean ± std (ddof=1) "
             f"({s['date']}, `scripts/default_task.py`):", ""]
    lines += section(full["default"])
    for key, what in (("original", "the original ladder"),
                      ("original_fresh", "the original ladder with fresh samples every epoch")):
        if key in full:
            lines += ["", f"bp on {what} (`{' '.join(full[key]['overrides'])}`), same budget:", ""]
            lines += section(full[key])
    return "\n".join(lines) + "\n"


def section(report: dict) -> list[str]:
    lines = ["| run | gamma_hidden | test acc | (a) growth | (d) margin pp | verdict | epochs run |",
             "|---|---|---|---|---|---|---|"]
    for rule, rows in report["rules"].items():
        verdicts = [r["verdict"] for r in rows]
        walked = sum(v == "walk back" for v in verdicts)
        reasons = sorted({x.split(":")[0] for r in rows for x in r["reasons"]})
        lines.append(
            f"| {rule} | {mean_std([r['gamma_hidden'] for r in rows])} | "
            f"{mean_std([r['test_acc'] for r in rows])} | "
            f"{mean_std([r['growth'] for r in rows])} | {mean_std([r['margin_pp'] for r in rows])} | "
            f"{'walk back' if walked else 'trustworthy'} ({walked}/{len(rows)} walk back"
            f"{'; ' + ', '.join(reasons) if reasons else ''}) | "
            f"{', '.join(str(r['epochs']) for r in rows)} |")
    lines.append(f"| frozen blocks (the comparator) | | {mean_std(report['frozen'])} | | | | |")
    lines.append(f"| linear probe of the input | | {mean_std(report['linear'])} | | | | |")
    gap = [b["test_acc"] - f for b, f in zip(report["rules"]["bp"], report["frozen"])]
    lines += ["", f"bp − frozen: {mean_std([100 * g for g in gap])} pp; "
                  f"bp − linear probe: "
                  f"{mean_std([100 * (b['test_acc'] - l) for b, l in zip(report['rules']['bp'], report['linear'])])} pp."]
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", default=str(REPO / "outputs" / "default_task"))
    ap.add_argument("--out", default=str(REPO / "docs" / "default_task"))
    ap.add_argument("--readme", help="also copy the table into this README, between its markers")
    ap.add_argument("--sections", default="default,original,original_fresh",
                    help="default: the defaults' task; original: bp (and its frozen baseline) "
                         "and the linear probe on data=ladder at the same budget; "
                         "original_fresh: the same with fresh samples every epoch")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.render_only:
        from omegaconf import OmegaConf
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config")
        task = " ".join(f"{k}={v}" for k, v in OmegaConf.to_container(cfg.data).items()
                        if k not in ("_target_",)) + f", model={cfg.model._target_.split('.')[-1]} " \
            f"d={cfg.model.d} depth={cfg.model.depth}, {cfg.trainer.max_epochs} epochs"
        seeds = [int(s) for s in args.seeds.split(",")]
        path = out.with_suffix(".json")
        full = json.loads(path.read_text()) if path.exists() else {}
        full["setup"] = {"task": task, "date": time.strftime("%Y-%m-%d")}
        sections = args.sections.split(",")
        if "default" in sections:
            full["default"] = measure(seeds, Path(args.runs))
        if "original" in sections:
            full["original"] = measure(seeds, Path(args.runs) / "original", ["data=ladder"],
                                       rules=("bp",))
        if "original_fresh" in sections:
            full["original_fresh"] = measure(seeds, Path(args.runs) / "original_fresh",
                                             ["data=ladder", "data.fresh=true"], rules=("bp",))
        out.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(full, indent=2))
    text = render(json.loads(out.with_suffix(".json").read_text()))
    out.with_suffix(".md").write_text(text)
    print(text)
    if args.readme:
        from readme_table import update

        update(Path(args.readme), text, marker="default_task")


if __name__ == "__main__":
    main()
