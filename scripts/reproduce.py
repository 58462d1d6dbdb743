"""The original study's offline results out of lcredit: ``make reproduce`` writes
docs/reproduction.md (and .json) from lcredit runs.

    python scripts/reproduce.py --readme README.md          # search + confirm + the document
    python scripts/reproduce.py --part search               # only the search runs
    python scripts/reproduce.py --part confirm --jobs 12 --device cuda
    python scripts/reproduce.py --render-only --readme README.md

Two parts, each a set of ordinary lcredit training runs whose results.json files (under --runs)
are the only source of the document's numbers; a run already completed there is not run again,
so an interrupted reproduction continues where it stopped.

1. **search** — for each detail the original study's notes leave open (SEARCH below), its
   plausible readings, each one run at the study's own settings for one seed and a budget that
   tells the readings apart (fewer epochs than the study's); every other detail at its chosen
   reading (lcredit's defaults). The table gives each reading's numbers and says which one the
   defaults take and why.
2. **confirm** — the three studies at ``scale=paper`` (every seed, the full budget): the jobs
   ``python -m lcredit.train experiment=<study> arm=<arm> seed=<s>`` runs, laid out as
   ``lcredit.study`` lays them out (``python -m lcredit.report <runs>/<study>/paper`` prints the
   published value beside each cell). Each published number (the study config's ``reference:``)
   is set beside lcredit's mean ± std (ddof = 1) over the seeds, with the difference and a ✓ where
   it is within the tolerance (0.10; the costate cosine 0.03).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

SEED = 42  # the search's one seed (the studies' first)
TOLERANCE = {"costate_all": 0.03}  # |published - lcredit| for a ✓; every other metric: 0.10
DEFAULT_TOLERANCE = 0.10


@dataclass
class Detail:
    """A detail the original's notes leave open, and the readings tried for it."""
    key: str
    title: str
    study: str
    arm: str
    point: dict            # axis -> value of the study's job it is tried on
    budget: list           # overrides that make the search run shorter than the study's
    candidates: list       # [(label, overrides)]; the first is lcredit's default (chosen)
    notes: str             # what the original's notes say, and why the default is chosen
    metrics: tuple = ("gamma_all", "rho_all", "test_acc", "growth")


# ---- what is searched ------------------------------------------------------------------------
# Each candidate's overrides go on top of lcredit's defaults, which are the chosen readings of
# every other detail; the first candidate of each detail is the default itself (no override).

LADDER_CB = dict(study="synthetic_ladder", arm="cb", point={"alpha": "1.0", "depth": "4"})
PILOT_VEC = dict(study="vector_field_pilot", arm="vec_m4", point={"depth": "4"})
LQ = dict(study="toy_lq", point={})

SEARCH: list[Detail] = []   # filled in below (see the end of this block)


# ---- the runs --------------------------------------------------------------------------------

@dataclass
class Run:
    kind: str              # "search" or the study's name
    label: str
    study: str
    arm: str
    point: dict
    seed: int
    overrides: list
    directory: Path
    extra: dict = field(default_factory=dict)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_")[:80] or "default"


def search_runs(root: Path) -> list[Run]:
    runs = []
    for d in SEARCH:
        for label, ov in d.candidates:
            runs.append(Run("search", label, d.study, d.arm if "arm" not in dict(ov_pairs(ov)) else
                            dict(ov_pairs(ov))["arm"], d.point, SEED,
                            [o for o in [*d.budget, *ov] if not o.startswith("arm=")],
                            root / "search" / d.key / slug(label), {"detail": d.key}))
    return runs


def ov_pairs(ov):
    return [tuple(o.split("=", 1)) for o in ov if "=" in o]


def confirm_runs(root: Path, studies: dict) -> list[Run]:
    """The jobs of each study's arms at the points its reference names, every seed."""
    runs = []
    for name, spec in studies.items():
        for arm, point in spec["jobs"]:
            for seed in spec["seeds"]:
                runs.append(Run(name, arm, name, arm, point, seed, [], None))
    return runs


def run_one(run: Run, device: str, threads: int) -> dict:
    """One training run in this (worker) process; returns where its results are."""
    import torch

    torch.set_num_threads(threads)
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lcredit.results import read_json
    from lcredit.study import arm_job
    from lcredit.train import CONF_DIR, train

    prior = read_json(run.directory / "results.json")
    if prior is not None and prior.get("status") in ("completed", "aborted"):
        return {"dir": str(run.directory), "status": prior["status"], "skipped": True}
    user = [f"{a}={v}" for a, v in run.point.items()] + list(run.overrides) + [f"seed={run.seed}"]
    if device == "cuda":
        user.append("trainer=gpu")
    job, ov, user = arm_job(run.study, run.arm, "paper", user)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[
            f"experiment={run.study}", "scale=paper", *ov, *job.marker_overrides(), *user,
            f"paths.output_dir={run.directory}", "logger=none", "protocol.print_report=false",
            "trainer.enable_progress_bar=false", f"threads={threads}",
            f"paths.cache_dir={run.directory.parent.parent / 'cache'}"])
    start = time.perf_counter()
    try:
        r = train(cfg)
    except Exception as err:  # noqa: BLE001 — the document says a run failed; others go on
        return {"dir": str(run.directory), "status": "failed", "error": repr(err)[:300]}
    return {"dir": str(run.directory), "status": r["status"], "seconds": time.perf_counter() - start}


def execute(runs: list[Run], jobs: int, device: str) -> None:
    todo = []
    from lcredit.results import read_json

    for run in runs:
        prior = read_json(run.directory / "results.json")
        if prior is None or prior.get("status") not in ("completed", "aborted"):
            todo.append(run)
    print(f"reproduce: {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run",
          flush=True)
    if not todo:
        return
    threads = 1 if device == "cuda" else max(1, (os.cpu_count() or 1) // max(jobs, 1))
    with ProcessPoolExecutor(max_workers=max(jobs, 1)) as pool:
        futures = {pool.submit(run_one, run, device, threads): run for run in todo}
        for i, fut in enumerate(as_completed(futures), 1):
            run = futures[fut]
            try:
                out = fut.result()
            except Exception as err:  # noqa: BLE001 — a worker that died
                out = {"status": "failed", "error": repr(err)[:300]}
            print(f"reproduce: [{i}/{len(todo)}] {run.kind} {run.label} seed {run.seed}: "
                  f"{out.get('status')} {out.get('error', '')}", flush=True)
