"""Credit quality of every rule on the original study's ladder, each rule's original form next
to each of lcredit's switches (and the preset that sets them all), over several seeds.

    python scripts/ladder_credit.py --readme README.md        # docs/ladder_credit.{json,md}
    python scripts/ladder_credit.py --jobs 8 --device cuda    # the same, 8 runs at a time on a GPU

Setup (docs/studies.md "synthetic ladder"): ladder d=128, C=10, alpha=1, teacher depth 4, gain 1, a
fixed 20k training set; the student (pre-LN residual MLP, no terminal LN) d=128, depth 4,
trained as the ladder studies train it (Adam at 5e-5: docs/reproduction.md); default batch; no
early abort and no frozen comparator. Epochs are fewer than the
study's 80 (``--epochs``, recorded in the table). Each cell is mean ± std (ddof = 1) over the
seeds of the protocol's final measurement; every run's results.json is kept under --runs.
"""
import argparse
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The original study's ladder and student, spelled out (the defaults of data=ladder may differ).
LADDER = ["data=ladder", "data.d=128", "data.num_classes=10", "data.alpha=1.0",
          "data.teacher_depth=4", "data.teacher_gain=1.0", "data.teacher_bias=0.0",
          "data.fresh=false", "data.n_train=20000", "model=student", "model.d=128",
          "model.depth=4", "optim.lr=5e-5", "protocol.abort.enabled=false", "protocol.frozen_baseline=null",
          "protocol.print_report=false", "logger=none", "trainer.enable_progress_bar=false"]
# (rule, label, overrides): the original form first, then one switch at a time, then the preset.
ROWS = [
    ("bp", "bp", ["method=bp"]),
    ("frozen", "frozen", ["method=frozen"]),
    ("dfa", "dfa", ["method=dfa"]),
    ("fa", "fa (blockwise, original)", ["method=fa"]),
    ("fa", "variant=layerwise", ["method=fa", "method.variant=layerwise"]),
    ("ep", "ep (original)", ["method=ep"]),
    ("ep", "credit=displacement", ["method=ep", "method.credit=displacement"]),
    ("ep", "update_at=free", ["method=ep", "method.update_at=free"]),
    ("sb", "sb (original)", ["method=sb"]),
    ("sb", "predictor=skip", ["method=sb", "method.predictor=skip"]),
    ("sb", "credit_norm=batch", ["method=sb", "method.credit_norm=batch"]),
    ("sb", "preset sb_skip", ["method=sb_skip"]),
    ("cb", "cb (original)", ["method=cb"]),
    ("cb", "bridge_noise=input", ["method=cb", "method.bridge_noise=input"]),
    ("cb", "bridge_slope=1", ["method=cb", "method.bridge_slope=1.0"]),
    ("cb", "sigma_scale=relative", ["method=cb", "method.sigma_scale=relative"]),
    ("cb", "terminal_scale=relative", ["method=cb", "method.terminal_scale=relative"]),
    ("cb", "field=gated", ["method=cb", "method.field=gated"]),
    ("cb", "credit_norm=batch", ["method=cb", "method.credit_norm=batch"]),
    ("cb", "preset cb_relative", ["method=cb_relative"]),
    ("vec", "vec (original)", ["method=vec"]),
    ("vec", "field=gated", ["method=vec", "method.field=gated"]),
    ("vec", "eps_scale=relative", ["method=vec", "method.eps_scale=relative"]),
    ("vec", "loss_scale=relative", ["method=vec", "method.loss_scale=relative"]),
    ("vec", "credit_norm=batch", ["method=vec", "method.credit_norm=batch"]),
    ("vec", "preset vec_gated", ["method=vec_gated"]),
    ("blend", "blend (original: vec, alpha .5)", ["method=blend"]),
    ("blend", "mix=one_scale", ["method=blend", "method.mix=one_scale"]),
    ("blend", "preset blend_gated", ["method=blend_gated"]),
]
METRICS = ("gamma_hidden", "test_acc", "gamma_deep", "rho_deep", "growth")


def run_one(job):
    """One training run (in a worker process); returns the figures the table needs."""
    label, overrides, epochs, seed, out_dir, device, threads = job
    import torch
    torch.set_num_threads(threads)
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import lcredit.train as lt

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            *LADDER, *overrides, f"trainer.max_epochs={epochs}", f"seed={seed}",
            f"paths.output_dir={out_dir}", f"paths.cache_dir={Path(out_dir).parent / 'cache'}",
            *(["trainer=gpu"] if device == "cuda" else [])])
    r = lt.train(cfg)
    p = r["protocol"]
    agg = p["aggregates"]
    return {"label": label, "seed": seed, "results": str(Path(out_dir) / "results.json"),
            "form": r["form"], "test_acc": r["final"]["test_acc"],
            "gamma_hidden": agg.get("gamma_hidden"), "gamma_deep": agg.get("gamma_deep"),
            "rho_deep": agg.get("rho_deep"), "growth": p["diagnostics"]["a"]["value"],
            "verdict": p["verdict"], "train_time_s": r["train_time_s"]}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for m in METRICS:
        vals = [r[m] for r in runs if r[m] is not None]
        out[m] = {"mean": statistics.mean(vals) if vals else None,
                  "std": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}
    out["walk_back"] = sum(r["verdict"] == "walk back" for r in runs)
    out["train_time_s"] = statistics.mean(r["train_time_s"] for r in runs)
    return out


def render(report: dict, out: Path) -> str:
    s = report["setup"]
    lr = next((o.split("=", 1)[1] for o in s.get("overrides", []) if o.startswith("optim.lr=")),
              "1e-3")
    lines = [f"Original ladder (d=128, C=10, alpha=1, teacher depth 4, 20k fixed samples), "
             f"student d=128 depth 4 at Adam {lr}, {s['epochs']} epochs (the study runs 80), seeds "
             f"{', '.join(map(str, s['seeds']))}; mean ± std (ddof=1) over seeds "
             f"({s['date']}, {s['device']}"
             + (f", {s['jobs']} runs at a time" if s.get("jobs", 1) > 1 else "")
             + "; `scripts/ladder_credit.py`):", "",
             "| rule | form | gamma_hidden | test acc | gamma_deep | rho_deep | (a) growth | "
             "walk back | train s |", "|---|---|---|---|---|---|---|---|---|"]

    def f(cell, digits=3):
        if cell["mean"] is None:
            return "—"
        if cell["std"] is None:
            return f"{cell['mean']:.{digits}f}"
        return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"

    for row in report["rows"]:
        c = row["summary"]
        lines.append(f"| {row['rule']} | {row['label']} | {f(c['gamma_hidden'])} | "
                     f"{f(c['test_acc'])} | {f(c['gamma_deep'])} | {f(c['rho_deep'])} | "
                     f"{f(c['growth'], 1)} | {c['walk_back']}/{len(row['runs'])} | "
                     f"{c['train_time_s']:.0f} |")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", help="comma-separated rules to run (default: all)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (worker processes)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--runs", default=str(REPO / "outputs" / "ladder_credit"))
    ap.add_argument("--out", default=str(REPO / "docs" / "ladder_credit"))
    ap.add_argument("--readme", help="also copy the table into this README, between its markers")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.render_only:
        seeds = [int(s) for s in args.seeds.split(",")]
        rows = [r for r in ROWS if not args.only or r[0] in args.only.split(",")]
        cores = os.cpu_count() or 1
        threads = max(1, cores // args.jobs)
        jobs = [(label, ov, args.epochs, seed, str(Path(args.runs) / f"row{i}" / f"seed{seed}"),
                 args.device, threads)
                for i, (_, label, ov) in enumerate(rows) for seed in seeds]
        if args.jobs > 1:
            import multiprocessing as mp
            with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
                done = list(pool.map(run_one, jobs))
        else:
            done = [run_one(j) for j in jobs]
        report = {"setup": {"epochs": args.epochs, "seeds": seeds, "device": args.device,
                            "jobs": args.jobs,
                            "date": time.strftime("%Y-%m-%d"), "overrides": LADDER},
                  "rows": []}
        for i, (rule, label, ov) in enumerate(rows):
            runs = done[i * len(seeds):(i + 1) * len(seeds)]
            report["rows"].append({"rule": rule, "label": label, "overrides": ov, "runs": runs,
                                   "summary": summarise(runs)})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    text = render(json.loads(out.with_suffix(".json").read_text()), out)
    print(text)
    if args.readme:
        from readme_table import update

        update(Path(args.readme), text, marker="ladder")


if __name__ == "__main__":
    main()
