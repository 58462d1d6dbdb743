"""Sweep throughput on one machine: the same 4-seed sweep of the default task (bp, which trains
all of its epochs; dfa's runs stop at their first measurement), once with Hydra's basic launcher
(one job after another, each on every core through torch's intra-op threads) and once with
hydra/launcher=joblib (2 jobs at once, each on cores // 2 threads), timed end to end as a user
would run them. Neither trains the frozen baseline (protocol.frozen_baseline=null): it is the
same extra run in both and says nothing about the launcher.

To say what bounds the gain, one job also runs alone on 1 thread and on all threads: if one
thread takes s times as long as all of them, two 1-thread jobs at once can be at most
2 / s times the sequential throughput (less each process's start-up).

    python scripts/bench_sweep.py [--readme README.md]   # writes docs/bench_sweep.json and .md

Target: joblib >= 1.6x the sequential throughput on a 2-core CPU.
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
RUN = ["trainer.enable_progress_bar=false", "protocol.print_report=false",
       "protocol.frozen_baseline=null"]


def timed_sweep(root: Path, seeds: str, extra: list[str], env: dict) -> float:
    cmd = [sys.executable, "-m", "lcredit.train", *RUN, f"seed={seeds}",
           f"hydra.sweep.dir={root}", *extra, "-m"]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root.parent, env=env)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"sweep failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return seconds


def job_seconds(root: Path) -> float:
    (path,) = root.glob("**/results.json")
    process = json.loads(path.read_text())["process"]
    return process["finished"] - process["started"]


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
        env = dict(os.environ)
        env.pop("LCREDIT_THREADS", None)
        seq = timed_sweep(tmp / "sequential", args.seeds, [], env)
        par = timed_sweep(tmp / "joblib", args.seeds,
                          ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.jobs}"], env)
        cores = len(os.sched_getaffinity(0))
        # the job itself (results.json's process times), without the interpreter's start-up
        alone = {}
        for threads in (1, cores):
            timed_sweep(tmp / f"threads{threads}", "0", [f"threads={threads}"], env)
            alone[threads] = job_seconds(tmp / f"threads{threads}")
        one, every = alone[1], alone[cores]
    n = len(args.seeds.split(","))
    s = one / every
    result = {"date": datetime.date.today().isoformat(), "machine": platform.node(),
              "cores": cores, "python": platform.python_version(),
              "command": f"python -m lcredit.train method={args.method} seed={args.seeds} -m "
                         f"(the default task)",
              "jobs": n, "n_jobs": args.jobs, "sequential_s": round(seq, 1),
              "joblib_s": round(par, 1), "speedup": round(seq / par, 2), "target": 1.6,
              "one_job_1_thread_s": round(one, 1), f"one_job_{cores}_threads_s": round(every, 1),
              "thread_speedup": round(s, 2), "ceiling": round(args.jobs / s, 2)}
    out = REPO / "docs" / "bench_sweep.json"
    out.write_text(json.dumps(result, indent=2))
    md = (f"| sweep: `method={args.method} seed={args.seeds}` on the default task | jobs | wall time | "
          f"throughput vs sequential (target ≥ 1.6×) |\n"
          "|---|---|---|---|\n"
          f"| sequential (Hydra's basic launcher, {cores} threads a job) | {n} | {seq:.0f} s | 1.00× |\n"
          f"| `hydra/launcher=joblib hydra.launcher.n_jobs={args.jobs}` (1 thread a job) | {n} | "
          f"{par:.0f} s | {seq / par:.2f}× |\n\n"
          f"One job alone (its training, without start-up): {one:.0f} s on 1 thread, {every:.0f} s on {cores} (×{s:.2f}), so "
          f"{args.jobs} one-thread jobs at once can reach at most {args.jobs / s:.2f}× the "
          f"sequential throughput here. Measured {result['date']} on {result['machine']} "
          f"({cores} cores), `python scripts/bench_sweep.py` (docs/bench_sweep.json).\n")
    out.with_suffix(".md").write_text(md)
    print(md)
    if args.readme:
        sys.path.insert(0, str(REPO / "scripts"))
        from readme_table import update

        update(Path(args.readme), md, marker="bench_sweep")


if __name__ == "__main__":
    main()
