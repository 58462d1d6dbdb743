"""Studies of SPEC §7, one command each: ``python -m lcredit.study <study> [scale=smoke] [...]``.

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

import itertools
import logging
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lcredit.errors import ConfigError
from lcredit.results import read_json, write_json

log = logging.getLogger("lcredit")

SCALES = ("paper", "smoke")
KINDS = ("train", "probe", "exploit", "calibrate")
DONE = ("completed", "aborted")
MAIN = "main"  # the one stage of a single-stage study (its jobs sit directly under the study dir)


@dataclass
class Job:
    """One run of a study: a stage's arm at one point of its axes, for one seed."""
    study: str
    scale: str
    stage: str
    kind: str
    arm: str
    labels: dict            # axis -> label of the value at this point
    seed: int
    overrides: list         # Hydra overrides (train) or key=value options of the tool
    source: dict | None = None   # {"stage", "checkpoint": "last" | axis name, "continue"}
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return ",".join([self.arm] + [f"{a}={v}" for a, v in self.labels.items()])

    def directory(self, root: Path) -> Path:
        base = root if self.stage == MAIN else root / self.stage
        return base / self.name / f"seed={self.seed}"

    def record(self) -> dict:
        """What results.json says about the job's place in its study."""
        return {"name": self.study, "scale": self.scale, "stage": self.stage, "arm": self.arm,
                "point": dict(self.labels), "job": self.name}

    def marker_overrides(self) -> list:
        return [f"++study.stage={_quote(self.stage)}", f"++study.arm={_quote(self.arm)}",
                f"++study.job={_quote(self.name)}",
                *(f"++study.point.{a}={_quote(v)}" for a, v in self.labels.items())]


def _quote(v) -> str:
    """A value as one Hydra string, whatever it holds (',' and '=' in job names and paths)."""
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


# ---- the study node -------------------------------------------------------------------------

def study_node(cfg: DictConfig) -> dict:
    """The ``study`` node of a composed config, as plain containers (or a ConfigError)."""
    node = cfg.get("study")
    if node is None:
        raise ConfigError("this experiment has no `study:` node; a study is "
                          "conf/experiment/<name>.yaml with one")
    return OmegaConf.to_container(node, resolve=False)


def stages(study: dict, scale: str, seeds=None) -> dict[str, dict]:
    """The study's stages at ``scale``, in order: {name: {kind, arms, axes, seeds, ...}};
    ``seeds`` replaces every stage's seeds."""
    if scale not in SCALES:
        raise ConfigError(f"scale={scale!r}: the scales are {', '.join(SCALES)}")
    if not study.get("name"):
        raise ConfigError("study.name is missing")
    top = {k: v for k, v in study.items() if k not in ("stages", "smoke")}
    raw = study.get("stages") or {MAIN: {}}
    smoke = study.get("smoke") or {}
    if scale == "smoke" and not smoke:
        raise ConfigError(f"study {study['name']}: no smoke scale defined (study.smoke)")
    out = {}
    for name, node in raw.items():
        stage = {"kind": "train", "seeds": top.get("seeds"), "arms": top.get("arms"),
                 "axes": top.get("axes") or {}, "overrides": []}
        if name == MAIN:
            stage.update({k: v for k, v in top.items() if k in ("arms", "axes", "seeds")})
        stage.update(node or {})
        if scale == "smoke":
            _apply_scale(stage, smoke, (smoke.get("stages") or {}).get(name) or {})
        if stage["kind"] not in KINDS:
            raise ConfigError(f"study {study['name']}: stage {name}: kind={stage['kind']!r} "
                              f"(one of {', '.join(KINDS)})")
        if not stage.get("arms"):
            stage["arms"] = {name: []}
        if seeds:
            stage["seeds"] = [int(x) for x in seeds]
        if not stage.get("seeds"):
            raise ConfigError(f"study {study['name']}: stage {name} has no seeds")
        out[name] = stage
    return out


def _apply_scale(stage: dict, smoke: dict, own: dict) -> None:
    """The smoke scale: its overrides go first in every train job (arms and axes may still
    set what they sweep), its seeds, axes (each replaced whole) and per-arm extras replace the
    paper ones; ``smoke.stages.<stage>`` does the same for one stage."""
    for node in (smoke, own):
        if node.get("seeds"):
            stage["seeds"] = node["seeds"]
        for axis, spec in (node.get("axes") or {}).items():
            stage["axes"] = dict(stage.get("axes") or {}) | {axis: spec}
        for arm, extra in (node.get("arms_overrides") or {}).items():
            stage.setdefault("arm_extra", {}).setdefault(arm, []).extend(extra)
        for key in ("config", "source", "replicate"):
            if key in node:
                stage[key] = dict(stage.get(key) or {}) | node[key]
        for key in ("snapshot_epochs", "arms"):
            if key in node:
                stage[key] = node[key]
        if stage["kind"] == "train":
            stage["scale_overrides"] = list(stage.get("scale_overrides", [])) + list(
                node.get("overrides") or [])


def _axis_values(name: str, spec: dict) -> list[tuple[str, list]]:
    """[(label, overrides)] of one axis: ``{key: K, values: [...]}`` (K=v), ``{values:
    {label: [overrides]}}``, or ``{values: [...]}`` (a parameter other parts refer to)."""
    values = spec.get("values")
    if isinstance(values, dict):
        return [(str(label), list(ov or [])) for label, ov in values.items()]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"study axis {name}: values must be a non-empty list or mapping")
    key = spec.get("key")
    return [(_label(v), [f"{key}={_value(v)}"] if key else []) for v in values]


def _label(v) -> str:
    return str(v)


def _value(v) -> str:
    if isinstance(v, list):
        return "[" + ",".join(map(str, v)) + "]"
    return "null" if v is None else str(v)


def expand(study: dict, scale: str, stage_name: str | None = None, seeds=None) -> list[Job]:
    """Every job of every stage (or of ``stage_name``) in order: arms × their axes × seeds."""
    jobs = []
    for name, stage in stages(study, scale, seeds).items():
        if stage_name is not None and name != stage_name:
            continue
        if stage.get("replicate"):
            continue  # its jobs depend on results: replicated(), once its source stage ran
        axes = stage.get("axes") or {}
        for arm, spec in stage["arms"].items():
            spec = {"overrides": spec} if isinstance(spec, list) else dict(spec or {})
            arm_axes = spec.get("axes", list(axes))
            unknown = [a for a in arm_axes if a not in axes]
            if unknown:
                raise ConfigError(f"study {study['name']}: arm {arm} names axis {unknown[0]!r}, "
                                  f"which stage {name} does not have")
            only = spec.get("only") or {}
            choices = [[(a, label, ov) for label, ov in _axis_values(a, axes[a])
                        if a not in only or label in map(str, only[a])] for a in arm_axes]
            for point in itertools.product(*choices):
                for seed in stage["seeds"]:
                    ov = (list(stage.get("scale_overrides", [])) + list(stage.get("overrides", []))
                          + list(spec.get("overrides") or [])
                          + [o for _, _, axis_ov in point for o in axis_ov]
                          + list((stage.get("arm_extra") or {}).get(arm, [])))
                    jobs.append(Job(study["name"], scale, name, stage["kind"], arm,
                                    {a: label for a, label, _ in point}, int(seed), ov,
                                    stage.get("source"),
                                    {"config": stage.get("config") or {},
                                     "snapshot_epochs": stage.get("snapshot_epochs")}))
    return jobs


def replicated(study: dict, scale: str, stage_name: str, done: list[tuple[Job, Path]],
               seeds=None) -> list[Job]:
    """The jobs of a replication stage: the best job of its source stage (highest mean of
    ``by`` over its completed seeds, arms in ``exclude`` left out), again with ``seeds``."""
    stage = stages(study, scale, seeds)[stage_name]
    spec = stage["replicate"]
    by, exclude = spec.get("by", "test_acc"), set(spec.get("exclude") or [])
    scores: dict[str, list] = {}
    first: dict[str, Job] = {}
    for job, d in done:
        if job.stage != spec["stage"] or job.arm in exclude:
            continue
        rec = read_json(d / "results.json") or {}
        value = (rec.get("final") or {}).get(by) if rec.get("status") in DONE else None
        first.setdefault(job.name, job)
        if value is not None:
            scores.setdefault(job.name, []).append(value)
    if not scores:
        raise SourceFailed(f"stage {stage_name}: no job of stage {spec['stage']} completed, "
                           f"so there is no best one to replicate")
    best = max(scores, key=lambda n: sum(scores[n]) / len(scores[n]))
    job = first[best]
    return [Job(job.study, scale, stage_name, job.kind, job.arm, dict(job.labels), int(seed),
                list(job.overrides), job.source, dict(job.extra) | {"replicates": best})
            for seed in stage["seeds"]]


def sweep_overrides(job: Job) -> list[str]:
    """A train job's overrides as the sweeper passes them (seed and the study markers last)."""
    return [*job.overrides, f"seed={job.seed}", *job.marker_overrides()]


# ---- running ---------------------------------------------------------------------------------

def compose_job(name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lcredit.train import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", *overrides])


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
    jobs = expand(study, scale, seeds=seeds)
    if arms:
        unknown = sorted(set(arms) - {j.arm for j in jobs})
        if unknown:
            raise ConfigError(f"arms: {unknown[0]!r} is not an arm of study {name}")
        by_stage: dict[str, set] = {}
        for j in jobs:
            by_stage.setdefault(j.stage, set()).add(j.arm)
        # a stage that has none of the named arms (a source stage) runs whole
        jobs = [j for j in jobs if j.arm in arms or not set(arms) & by_stage[j.stage]]
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
            if job.source is not None:
                src_job, src_dir = _source_job(job, done)
                src = read_json(src_dir / "results.json")
                if src is None or src.get("status") not in DONE:
                    raise SourceFailed(f"its source {src_job.stage}/{src_job.name} seed "
                                       f"{src_job.seed} did not complete "
                                       f"({(src or {}).get('status', 'no results')})")
                ckpt = _checkpoint(job, src_dir)
                if not ckpt.is_file():
                    raise SourceFailed(f"its source checkpoint {ckpt} does not exist")
            else:
                src, ckpt = None, None
            RUNNERS[job.kind](job, d, overrides, src, ckpt, prior)
            ran += 1
        except Exception as err:  # noqa: BLE001 — one failed job must not end the study
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
            failed.append(f"{job.stage}/{job.name}/seed={job.seed}: {err}")
    print(f"lcredit.study {name} ({scale}): {ran} job(s) ran, {skipped} already done, "
          f"{len(failed)} failed; {root}")
    if failed:
        for line in failed:
            print(f"  failed: {line}", file=sys.stderr)
    return root


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


class SourceFailed(RuntimeError):
    """A job could not start because the stage it builds on did not complete."""


def _run_train(job: Job, d: Path, overrides, src, ckpt, prior) -> None:
    from lcredit.train import train

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
    from lcredit.train import versions

    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "results.json", {
        "status": "completed", "kind": kind, "study": job.record(), "seed": job.seed,
        "source": str(ckpt), "options": _tool_options(job), kind: result,
        "wall_time_s": time.perf_counter() - start, "versions": versions(),
        "command": " ".join(sys.argv)})


def _run_probe(job: Job, d: Path, overrides, src, ckpt, prior) -> None:
    from lcredit.probe import probe

    start = time.perf_counter()
    result = probe(ckpt, **_tool_options(job))
    _tool_record(job, d, ckpt, "probe", result, start)


def _run_exploit(job: Job, d: Path, overrides, src, ckpt, prior) -> None:
    from lcredit.exploit import exploit

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


def calibrate(ckpt_path, null_draws: int = 20, data_root=None) -> dict:
    """The protocol's own controls on one checkpoint (SPEC §7, protocol calibration): the
    rule's gamma against ``null_draws`` fresh feedback draws; rho of backprop's gradient (≈ 1)
    and of random vectors (≈ 0); and the full protocol on a randomly initialised network of
    the same settings (its verdict should be trustworthy apart from (d), which needs a run)."""
    import torch

    from lcredit.audit import load_checkpoint, restore
    from lcredit.callbacks.protocol import evaluation_batches
    from lcredit.diagnostics import diagnose, measure
    from lcredit.errors import check_range
    from lcredit.models.base import exact_credit
    from lcredit.train import build_rule

    check_range("null_draws", null_draws, 1, integer=True)
    snapshot, task, cfg = restore(load_checkpoint(ckpt_path), data_root)
    p = cfg.protocol
    opts = OmegaConf.to_container(p.measure, resolve=True) | {"null_draws": int(null_draws),
                                                               "seed": int(p.seed)}
    eval_b, stab_b, rho_b = evaluation_batches(
        task.x_train, task.y_train, int(p.eval_batches), int(p.stability_batches),
        int(p.batch_size), int(p.seed), int(opts.get("rho_samples", 0)))
    loss = snapshot.task_loss

    def bp(model, x, y):
        return exact_credit(model, x, y, loss)[1]

    gen = torch.Generator().manual_seed(int(p.seed) + 1)

    def noise(model, x, y):
        return [torch.randn(g.shape, generator=gen, dtype=g.dtype).to(g.device)
                for g in exact_credit(model, x, y, loss)[1]]

    snapshot.eval()
    own = measure(None, eval_b, snapshot, rho_batches=rho_b, **opts)
    kw = dict(loss_fn=snapshot.per_sample_loss, rho_batches=rho_b, **opts)
    with_bp = measure(snapshot.model, eval_b, bp, **kw)
    with_noise = measure(snapshot.model, eval_b, noise, **kw)
    torch.manual_seed(int(cfg.seed))
    fresh = build_rule(cfg, task)
    fresh.eval()
    th = OmegaConf.to_container(p.thresholds, resolve=True)
    report = diagnose(None, eval_b, credit=fresh, thresholds=th, stability_batches=stab_b,
                      rho_batches=rho_b, epoch=0, **opts)

    def layers(m, keys):
        return [{k: row.get(k) for k in ("layer", *keys)} for row in m["layers"]]

    return {"snapshot": str(ckpt_path), "snapshot_rule": snapshot.name,
            "snapshot_epoch": snapshot.history[-1]["epoch"] if snapshot.history else 0,
            "null_draws": int(null_draws),
            "rule": {"layers": layers(own, ("gamma", "null_gamma", "null_gamma_std")),
                     "aggregates": own["aggregates"]},
            "bp_rho": {"layers": layers(with_bp, ("rho", "rho_se")),
                       "rho_0": with_bp["aggregates"].get("rho_0"),
                       "rho_deep": with_bp["aggregates"].get("rho_deep")},
            "random_rho": {"layers": layers(with_noise, ("rho", "rho_se")),
                           "rho_0": with_noise["aggregates"].get("rho_0"),
                           "rho_deep": with_noise["aggregates"].get("rho_deep")},
            "random_init": report.to_dict()}


# ---- one arm as one job ----------------------------------------------------------------------

def single_job_argv(argv: list[str]) -> list[str]:
    """``python -m lcredit.train experiment=<study> arm=<arm> [<axis>=<value>...] seed=<s>``:
    one job of a single-stage study, as its sweep would run it. ``arm=`` and the axis values
    are replaced by the job's overrides (the smoke scale's, the arm's, the axis values'), the
    study markers (recorded in results.json) and, unless the command names one, the run
    directory the study lays the job out in (``studies/<study>/<scale>/<job>/seed=<s>``), so
    ``lcredit.study`` and ``lcredit.report`` see it as that study's job. An axis left out takes
    the value the config gives its key. The command line's own overrides still come last and
    win. With ``-m``, ``arm=a,b`` keeps those arms of the study sweep. argv without ``arm=`` is
    returned as it is."""
    prog, rest = argv[:1], list(argv[1:])
    arm_items = [a for a in rest if a.partition("=")[0] == "arm"]
    if not arm_items:
        return argv
    arm = arm_items[-1].partition("=")[2].strip("'\"")
    rest = [a for a in rest if a.partition("=")[0] != "arm"]
    multirun = any(a in ("-m", "--multirun") for a in rest)
    experiment = next((a.partition("=")[2] for a in rest if a.partition("=")[0] in
                       ("experiment", "+experiment")), None)
    if not experiment:
        raise ConfigError(f"arm={arm}: an arm belongs to a study; name it with "
                          f"experiment=<study> (the studies: {', '.join(known_studies())})")
    if multirun:
        if experiment not in known_studies():
            raise ConfigError(f"experiment={experiment}: no such study (the studies: "
                              f"{', '.join(known_studies())})")
        arms = [a for a in arm.strip("[]").split(",") if a]
        return prog + rest + [f"hydra.sweeper.arms=[{','.join(arms)}]"]
    scale = next((a.partition("=")[2] for a in rest if a.partition("=")[0] == "scale"), "paper")
    user = [a for a in rest if a.partition("=")[0] not in ("experiment", "+experiment", "scale")]
    job, ov, user = arm_job(experiment, arm, scale, user)
    out = [] if any(a.partition("=")[0].lstrip("+") in ("hydra.run.dir", "paths.output_dir")
                    for a in user) else [
        f"hydra.run.dir={_quote(job.directory(Path('studies') / job.study / scale))}"]
    return prog + [f"experiment={experiment}", f"scale={scale}", *ov, *job.marker_overrides(),
                   *out, *user]


def arm_job(experiment: str, arm: str, scale: str = "paper", user=()) -> tuple[Job, list, list]:
    """The job of ``arm`` of single-stage study ``experiment`` at the axis values ``user`` gives
    as ``<axis>=<value>`` (the rest of ``user`` are overrides of the run): (the Job, its
    overrides, the user's overrides without the axis values). An axis left out takes the value
    the composed config gives its key."""
    from hydra.core.global_hydra import GlobalHydra

    if experiment not in known_studies():
        raise ConfigError(f"experiment={experiment}: no such study (the studies: "
                          f"{', '.join(known_studies())})")
    node = study_node(compose_job(experiment, [f"scale={scale}"]))
    plan = stages(node, scale)
    if list(plan) != [MAIN]:
        raise ConfigError(f"study {experiment} has stages ({', '.join(plan)}), which run in "
                          f"order: python -m lcredit.study {experiment} arms={arm}")
    stage = plan[MAIN]
    if arm not in stage["arms"]:
        raise ConfigError(f"arm={arm} is not an arm of study {experiment} "
                          f"({', '.join(stage['arms'])})")
    spec = stage["arms"][arm]
    spec = {"overrides": spec} if isinstance(spec, list) else dict(spec or {})
    axes = {a: stage["axes"][a] for a in spec.get("axes", list(stage["axes"]))}
    user = list(user)
    given = {a.partition("=")[0]: a.partition("=")[2] for a in user if a.partition("=")[0] in axes}
    user = [a for a in user if a.partition("=")[0] not in axes]
    axis_ov = []
    for name, axis in axes.items():
        options = dict(_axis_values(name, axis))
        if name in given:
            label = given[name]
            if label not in options and not axis.get("key"):
                raise ConfigError(f"{name}={label}: axis {name} of study {experiment} has the "
                                  f"values {', '.join(options)}")
            axis_ov += options.get(label) or [f"{axis['key']}={label}"]
        elif not axis.get("key"):
            raise ConfigError(f"study {experiment}: give a value of its axis {name} "
                              f"({name}=<{'|'.join(options)}>)")
    ov = (list(stage.get("scale_overrides", [])) + list(stage.get("overrides", []))
          + list(spec.get("overrides") or []) + axis_ov
          + list((stage.get("arm_extra") or {}).get(arm, [])))
    cfg = compose_job(experiment, [f"scale={scale}", *ov, *user])
    labels = {name: given[name] if name in given else _label(OmegaConf.select(cfg, axis["key"]))
              for name, axis in axes.items()}
    GlobalHydra.instance().clear()  # hydra.main initialises its own
    return Job(node["name"], scale, MAIN, "train", arm, labels, int(cfg.seed), ov), ov, user


# ---- command line ----------------------------------------------------------------------------

USAGE = """usage: python -m lcredit.study <study> [scale=paper|smoke] [out=DIR] [arms=a,b] [seeds=0,1] [overrides...]
  runs every stage of conf/experiment/<study>.yaml in order under DIR (default
  studies/<study>/<scale>); a rerun skips the jobs that completed. Overrides (e.g. trainer=gpu)
  go to every training job. Then: python -m lcredit.report DIR"""


def known_studies() -> list[str]:
    from lcredit.train import CONF_DIR

    return sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


def main(argv=None) -> int:
    from lcredit.cli import quote_path_overrides

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print("studies: " + ", ".join(known_studies()))
        return 0 if argv else 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
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
