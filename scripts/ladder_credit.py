"""Credit quality of every rule on the synthetic ladder, and the ablations behind lcredit's
departures from a literal reading of SPEC §3, in one run.

    python scripts/ladder_credit.py --readme README.md   # docs/ladder_credit.{json,md}

Setup: ladder alpha=1 (full tanh teacher), resmlp d=128 depth 4, default batch and optimiser,
the same seed for every row; the protocol's final measurement of each run (its own evaluation
batches) gives gamma and the diagnostics. Each row is one lcredit.train run; its results.json is
kept under --runs.
"""
import argparse
import json
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import lcredit.train as lt

REPO = Path(__file__).resolve().parents[1]
LADDER = ["data=ladder", "data.alpha=1.0", "model=resmlp", "model.d=128", "model.depth=4",
          "protocol.abort.enabled=false", "protocol.frozen_baseline=null",
          "protocol.print_report=false", "logger=none", "trainer.enable_progress_bar=false"]
ROWS = [  # (label, overrides)
    ("bp", ["method=bp"]),
    ("dfa", ["method=dfa"]),
    ("ep", ["method=ep"]),
    ("sb", ["method=sb"]),
    ("cb", ["method=cb"]),
    ("vec", ["method=vec"]),
    ("vec, credit_norm=sample (per-sample RMS)", ["method=vec", "method.credit_norm=sample"]),
    ("vec, eps_scale=absolute", ["method=vec", "method.eps_scale=absolute"]),
    ("cb, SPEC's literal bridge (bridge_noise=target, bridge_slope=0)",
     ["method=cb", "method.bridge_noise=target", "method.bridge_slope=0"]),
    ("cb, tgw=0", ["method=cb", "method.tgw=0"]),
]


def run(label, overrides, epochs, n_train, seed, out_dir):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*LADDER, *overrides, f"trainer.max_epochs={epochs}",
                                           f"data.n_train={n_train}", f"seed={seed}",
                                           f"paths.output_dir={out_dir}"])
    r = lt.train(cfg)
    p = r["protocol"]
    agg = p["aggregates"]
    return {"label": label, "overrides": overrides, "results": str(out_dir / "results.json"),
            "test_acc": r["final"]["test_acc"], "gamma_0": agg["gamma_0"],
            "gamma_deep": agg["gamma_deep"], "gamma_hidden": agg["gamma_hidden"],
            "rho_deep": agg.get("rho_deep"), "residual_growth": p["diagnostics"]["a"]["value"],
            "verdict": p["verdict"], "train_time_s": r["train_time_s"]}


def render(report: dict, out: Path) -> str:
    s = report["setup"]
    lines = [f"Ladder alpha={s['alpha']}, resmlp d={s['d']} depth {s['depth']}, "
             f"{s['epochs']} epochs of {s['n_train']} samples, seed {s['seed']} "
             f"({s['date']}; `scripts/ladder_credit.py`):", "",
             "| run | test acc | gamma_0 | gamma_deep | gamma_hidden | rho_deep | (a) growth | "
             "verdict (no (d) here) | train s |", "|---|---|---|---|---|---|---|---|---|"]

    def f(v):
        return "—" if v is None else f"{v:.3f}"

    for r in report["rows"]:
        lines.append(f"| {r['label']} | {f(r['test_acc'])} | {f(r['gamma_0'])} | "
                     f"{f(r['gamma_deep'])} | {f(r['gamma_hidden'])} | {f(r['rho_deep'])} | "
                     f"{r['residual_growth']:.1f} | {r['verdict']} | {r['train_time_s']:.0f} |")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", help="comma-separated row labels to run (default: all)")
    ap.add_argument("--runs", default=str(REPO / "outputs" / "ladder_credit"))
    ap.add_argument("--out", default=str(REPO / "docs" / "ladder_credit"))
    ap.add_argument("--readme", help="also copy the table into this README, between its markers")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.render_only:
        rows = [r for r in ROWS if not args.only or r[0] in args.only.split(",")]
        report = {"setup": {"alpha": 1.0, "d": 128, "depth": 4, "epochs": args.epochs,
                            "n_train": args.n_train, "seed": args.seed,
                            "date": time.strftime("%Y-%m-%d")},
                  "rows": [run(label, ov, args.epochs, args.n_train, args.seed,
                               Path(args.runs) / f"row{i}")
                           for i, (label, ov) in enumerate(rows)]}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    text = render(json.loads(out.with_suffix(".json").read_text()), out)
    print(text)
    if args.readme:
        from readme_table import update

        update(Path(args.readme), text, marker="ladder")


if __name__ == "__main__":
    main()
