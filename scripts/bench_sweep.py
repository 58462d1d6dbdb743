"""Sweep throughput on one machine: the same 4-seed sweep of the default task (bp, which trains
all of its epochs; dfa's runs stop at their first measurement), once with Hydra's
basic launcher (one job after another) and once with hydra/launcher=joblib (2 jobs at once, each
on cores // 2 torch threads), timed end to end as a user would run them.

    python scripts/bench_sweep.py [--readme README.md]   # writes docs/bench_sweep.json and .md

Target: joblib >= 1.6x the sequential throughput on a 2-core CPU. Both sweeps share one frozen
baseline cache, filled before the timing, so neither pays for it.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = ["trainer.enable_progress_bar=false", "protocol.print_report=false"]


def timed_sweep(root: Path, seeds: str, extra: list[str], env: dict) -> float:
    cmd = [sys.executable, "-m", "lcredit.train", *RUN, f"seed={seeds}",
           f"hydra.sweep.dir={root}", *extra, "-m"]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root.parent, env=env)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"sweep failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--readme", help="copy the table into this README between its markers")
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--method", default="bp")
    args = ap.parse_args()
    RUN.append(f"method={args.method}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, LCREDIT_CACHE=str(tmp / "cache"))
        env.pop("LCREDIT_THREADS", None)
        timed_sweep(tmp / "warm", args.seeds, [], env)   # fills the frozen-baseline cache
        seq = timed_sweep(tmp / "sequential", args.seeds, [], env)
        par = timed_sweep(tmp / "joblib", args.seeds,
                          ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.jobs}"], env)
    n = len(args.seeds.split(","))
    result = {"date": datetime.date.today().isoformat(), "machine": platform.node(),
              "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
              "command": f"python -m lcredit.train method={args.method} seed={args.seeds} -m "
                         f"(the default task)",
              "jobs": n, "n_jobs": args.jobs, "sequential_s": round(seq, 1),
              "joblib_s": round(par, 1), "speedup": round(seq / par, 2), "target": 1.6}
    out = REPO / "docs" / "bench_sweep.json"
    out.write_text(json.dumps(result, indent=2))
    md = (f"| sweep: `method={args.method} seed={args.seeds}` on the default task | jobs | wall time | "
          f"throughput vs sequential (target ≥ 1.6×) |\n"
          "|---|---|---|---|\n"
          f"| sequential (Hydra's basic launcher) | {n} | {seq:.0f} s | 1.00× |\n"
          f"| `hydra/launcher=joblib hydra.launcher.n_jobs={args.jobs}` | {n} | {par:.0f} s | "
          f"{seq / par:.2f}× |\n\n"
          f"Measured {result['date']} on {result['machine']} ({result['cores']} cores), "
          f"`python scripts/bench_sweep.py` (docs/bench_sweep.json).\n")
    out.with_suffix(".md").write_text(md)
    print(md)
    if args.readme:
        sys.path.insert(0, str(REPO / "scripts"))
        from readme_table import update

        update(Path(args.readme), md, marker="bench_sweep")


if __name__ == "__main__":
    main()
