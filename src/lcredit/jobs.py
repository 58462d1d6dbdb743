"""What a study runs: its ``study:`` node expanded into jobs (arms × axes × seeds, per stage),
and one arm of it as one job (``python -m lcredit.train experiment=<study> arm=<arm>``).

Below the study runner (lcredit.study) and the Hydra sweeper, which both lay out the jobs this
module names; it runs nothing itself.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lcredit.build import CONF_DIR
from lcredit.cli import hydra_error_line, register_resolvers
from lcredit.errors import ConfigError
from lcredit.results import read_json

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


# ---- a job's config ----------------------------------------------------------------------------

def compose_job(name: str, overrides: list[str]) -> DictConfig:
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("config", overrides=[f"experiment={name}", *overrides])
    except (HydraException, OmegaConfBaseException) as err:  # a mistyped key or value
        raise ConfigError(f"{' '.join(overrides) or name}: {hydra_error_line(err)}") from None


class SourceFailed(RuntimeError):
    """A job could not start because the stage it builds on did not complete."""


def known_studies() -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


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
