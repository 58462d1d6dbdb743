"""Studies of docs/studies.md, one command each: ``python -m lcredit.study <study> [scale=smoke] [...]``.

A study is ``conf/experiment/<study>.yaml``: the original settings as an experiment, plus a
``study:`` node that says what it sweeps (arms × axes × seeds) and, for studies with stages,
in what order (a snapshot to probe, a checkpoint to branch from, then arms). This module
expands that node into jobs (the Hydra sweeper in ``hydra_plugins/lcredit_study`` uses the same
expansion for ``python -m lcredit.train experiment=<study> -m``) and runs the stages in order
through ``train()`` and the snapshot tools, under one study directory:

    <out>/<job>/seed=<n>/results.json               a single-stage study (as the sweeper lays it out)
    <out>/<stage>/<job>/seed=<n>/results.json       a staged study

A job whose results.json says completed (or aborted) is not run again, so a rerun continues
where the last one stopped; a job whose source failed is recorded as failed, never dropped.
``lcredit.report`` turns the directory into the study's tables and figures.
"""
from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path

from omegaconf import OmegaConf

from lcredit.analysis.calibrate import calibrate
from lcredit.analysis.exploit import exploit
from lcredit.analysis.probe import probe
from lcredit.cli import quote_path_overrides, register_resolvers
from lcredit.errors import ConfigError
# the plan of a study (re-exported: the runner's callers name them from here too)
from lcredit.jobs import (DONE, Job, SourceFailed, _quote, compose_job, expand,  # noqa: F401
                          known_studies, replicated, stages, study_node, sweep_overrides)
from lcredit.results import read_json, versions, write_json
from lcredit.training import train

log = logging.getLogger("lcredit")


# ---- running ---------------------------------------------------------------------------------

def _source_job(job: Job, done: dict[str, list[tuple[Job, Path]]]) -> tuple[Job, Path]:
    """The job of the source stage this one builds on: same seed, same labels on the axes both
    have (a probe of the L=6 snapshot reads the L=6 bp run)."""
    candidates = [(j, d) for j, d in done.get(job.source["stage"], [])
                  if j.seed == job.seed and all(job.labels.get(a, v) == v
                                                for a, v in j.labels.items())]
    if len(candidates) != 1:
        raise ConfigError(f"study {job.study}: job {job.stage}/{job.name} seed {job.seed} matches "
                          f"{len(candidates)} jobs of stage {job.source['stage']} (needs one)")
    return candidates[0]


def _checkpoint(job: Job, src_dir: Path) -> Path:
    which = job.source.get("checkpoint", "last")
    if which == "last":
        return src_dir / "checkpoints" / "last.ckpt"
    return src_dir / "checkpoints" / f"epoch={job.labels[which]}.ckpt"


def run(name: str, scale: str = "paper", out: str | Path | None = None, overrides=(),
        arms=None, seeds=None) -> Path:
    """Run study ``name`` at ``scale`` under ``out`` (default studies/<name>/<scale>); jobs
    already completed are skipped. ``overrides`` go to every train job (e.g. trainer=gpu);
    ``arms`` keeps only those arms in the stages that have them and ``seeds`` replaces the
    study's seeds (a quick look). Returns the study dir."""
    base = compose_job(name, [f"scale={scale}", *overrides])
    study = study_node(base)
    root = Path(out or Path("studies") / name / scale)
    for key, given in (("arms", arms), ("seeds", seeds)):
        if given is not None and not list(given):  # `arms=` is a slip, never "all of them"
            raise ConfigError(f"{key}= is empty: name at least one (e.g. {key}="
                              f"{'dfa,sb' if key == 'arms' else '0,1'}), or leave {key} out for "
                              f"the study's own")
    jobs = _only_arms(expand(study, scale, seeds=seeds), arms, name)
    root.mkdir(parents=True, exist_ok=True)
    done: dict[str, list[tuple[Job, Path]]] = {}
    failed, ran, skipped = [], 0, 0
    plan = stages(study, scale, seeds)
    queue: list = []
    for stage in plan:  # a replication stage's jobs are known once the stages before it ran
        queue += [stage] if plan[stage].get("replicate") else [j for j in jobs if j.stage == stage]
    for job in _unroll(queue, study, scale, done, failed, seeds):
        d = job.directory(root)
        done.setdefault(job.stage, []).append((job, d))
        prior = read_json(d / "results.json")
        if prior is not None and prior.get("status") in DONE:
            skipped += 1
            continue
        log.info("study %s: %s/%s seed %d", name, job.stage, job.name, job.seed)
        try:
            src, ckpt = _source(job, done)
            RUNNERS[job.kind](job, d, overrides, src, ckpt, prior)
            ran += 1
        except Exception as err:  # noqa: BLE001 — one failed job must not end the study
            _record_failed(job, d, err)
            failed.append(f"{job.stage}/{job.name}/seed={job.seed}: {err}")
    print(f"lcredit.study {name} ({scale}): {ran} job(s) ran, {skipped} already done, "
          f"{len(failed)} failed; {root}")
    if failed:
        for line in failed:
            print(f"  failed: {line}", file=sys.stderr)
    return root


def _only_arms(jobs: list[Job], arms, name: str) -> list[Job]:
    """``arms=a,b``: those arms in the stages that have them; a stage that has none of the
    named arms (a source stage) runs whole."""
    if not arms:
        return jobs
    unknown = sorted(set(arms) - {j.arm for j in jobs})
    if unknown:
        raise ConfigError(f"arms: {unknown[0]!r} is not an arm of study {name}")
    by_stage: dict[str, set] = {}
    for j in jobs:
        by_stage.setdefault(j.stage, set()).add(j.arm)
    return [j for j in jobs if j.arm in arms or not set(arms) & by_stage[j.stage]]


def _source(job: Job, done) -> tuple[dict | None, Path | None]:
    """The results and the checkpoint of the job a stage builds on (none for a first stage);
    SourceFailed when that job did not complete or left no checkpoint."""
    if job.source is None:
        return None, None
    src_job, src_dir = _source_job(job, done)
    src = read_json(src_dir / "results.json")
    if src is None or src.get("status") not in DONE:
        raise SourceFailed(f"its source {src_job.stage}/{src_job.name} seed {src_job.seed} did "
                           f"not complete ({(src or {}).get('status', 'no results')})")
    ckpt = _checkpoint(job, src_dir)
    if not ckpt.is_file():
        raise SourceFailed(f"its source checkpoint {ckpt} does not exist")
    return src, ckpt


def _record_failed(job: Job, d: Path, err: Exception) -> None:
    """A failed job's results.json (unless its run already wrote one with its history)."""
    if not isinstance(err, (ConfigError, SourceFailed)):
        traceback.print_exc()
    print(f"lcredit.study: {job.stage}/{job.name} seed {job.seed} failed: {err}",
          file=sys.stderr)
    d.mkdir(parents=True, exist_ok=True)
    rec = read_json(d / "results.json")
    if rec is None or rec.get("status") != "failed":
        write_json(d / "results.json", {"status": "failed", "kind": job.kind,
                                        "error": f"{type(err).__name__}: {err}",
                                        "seed": job.seed, "study": job.record()})


def _unroll(queue, study, scale, done, failed, seeds):
    for item in queue:
        if isinstance(item, Job):
            yield item
            continue
        try:
            yield from replicated(study, scale, item, [p for ps in done.values() for p in ps],
                                  seeds)
        except SourceFailed as err:
            print(f"lcredit.study: stage {item} not run: {err}", file=sys.stderr)
            failed.append(f"{item}: {err}")



def _run_train(job: Job, d: Path, overrides, src, ckpt, prior) -> None:
    # the command line's overrides last: they win over the study's (a quick look at fewer epochs)
    ov = [f"scale={job.scale}", *sweep_overrides(job), *overrides, f"paths.output_dir={_quote(d)}"]
    snaps = job.extra.get("snapshot_epochs")
    if snaps:
        ov.append(f"snapshot_epochs=[{','.join(map(str, snaps))}]")
    if ckpt is not None:
        ov.append(f"init_from={_quote(ckpt)}")
        if job.source.get("continue"):
            # Continue to the source's total: the epochs left after the branch point, plus the
            # estimator-only prefit epochs the arm spends first (they move no block).
            arm = compose_job(job.study, ov)
            total = int(src["config"]["trainer"]["max_epochs"])
            t0 = int(job.labels[job.source["checkpoint"]]) if job.source.get(
                "checkpoint", "last") != "last" else len(src.get("history") or [])
            prefit = int(arm.method.get("prefit_epochs") or 0)
            ov.append(f"trainer.max_epochs={max(1, total - t0 + prefit)}")
    ckpt_last = d / "checkpoints" / "last.ckpt"
    if prior is not None and prior.get("status") == "interrupted" and ckpt_last.is_file():
        ov.append(f"resume={_quote(ckpt_last)}")  # continue the interrupted job where it stopped
    cfg = compose_job(job.study, ov)
    train(cfg)


def _tool_options(job: Job) -> dict:
    opts = dict(job.extra.get("config") or {})
    for item in job.overrides:  # axis values of a tool stage: key=value options of the tool
        key, _, value = item.partition("=")
        opts[key] = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]))["v"]
    return opts


def _tool_record(job: Job, d: Path, ckpt: Path, kind: str, result: dict, start: float) -> None:
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "results.json", {
        "status": "completed", "kind": kind, "study": job.record(), "seed": job.seed,
        "source": str(ckpt), "options": _tool_options(job), kind: result,
        "wall_time_s": time.perf_counter() - start, "versions": versions(),
        "command": " ".join(sys.argv)})


def _run_probe(job: Job, d: Path, overrides, src, ckpt, prior) -> None:
    start = time.perf_counter()
    result = probe(ckpt, **_tool_options(job))
    _tool_record(job, d, ckpt, "probe", result, start)


def _run_exploit(job: Job, d: Path, overrides, src, ckpt, prior) -> None:
    start = time.perf_counter()
    opts = _tool_options(job)
    opts.setdefault("seed", job.seed)
    result = exploit(ckpt, **opts)
    _tool_record(job, d, ckpt, "exploit", result, start)


def _run_calibrate(job: Job, d: Path, overrides, src, ckpt, prior) -> None:
    start = time.perf_counter()
    result = calibrate(ckpt, **_tool_options(job))
    _tool_record(job, d, ckpt, "calibrate", result, start)


RUNNERS = {"train": _run_train, "probe": _run_probe, "exploit": _run_exploit,
           "calibrate": _run_calibrate}


# ---- command line ----------------------------------------------------------------------------

USAGE = """usage: python -m lcredit.study <study> [scale=paper|smoke] [out=DIR] [arms=a,b] [seeds=0,1] [overrides...]
  runs every stage of conf/experiment/<study>.yaml in order under DIR (default
  studies/<study>/<scale>); a rerun skips the jobs that completed. Overrides (e.g. trainer=gpu)
  go to every training job. Then: python -m lcredit.report DIR"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print("studies: " + ", ".join(known_studies()))
        return 0 if argv else 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    register_resolvers()
    name, rest = argv[0], argv[1:]
    scale, out, arms, seeds, overrides = "paper", None, None, None, []
    quote_path_overrides(["", *rest])
    for item in rest:
        key, _, value = item.partition("=")
        if key == "scale":
            scale = value
        elif key == "out":
            out = value.strip("'\"")
        elif key == "arms":
            arms = [a for a in value.strip("[]").split(",") if a]
        elif key == "seeds":
            try:
                seeds = [int(a) for a in value.strip("[]").split(",") if a]
            except ValueError:
                print(f"lcredit.study: error: seeds={value}: give integers, e.g. seeds=0,1",
                      file=sys.stderr)
                return 2
        else:
            overrides.append(item)
    try:
        if name not in known_studies():
            raise ConfigError(f"no study {name!r} (conf/experiment/{name}.yaml); the studies: "
                              f"{', '.join(known_studies())}")
        root = run(name, scale, out, overrides, arms=arms, seeds=seeds)
    except ConfigError as err:
        print(f"lcredit.study: error: {err}", file=sys.stderr)
        return 2
    failed = [p for p in root.glob("**/results.json")
              if (read_json(p) or {}).get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
