"""Studies (docs/studies.md): the paper configs are the original settings, every study runs end to end
at scale=smoke and reports, the report's numbers are numpy's, a staged rerun resumes."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import CONF, LIGHT_MEASURE, forked_cli
from lcredit.errors import ConfigError
from lcredit.report import report
from lcredit.study import compose_job, expand, run, stages, study_node

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL_STUDIES = yaml.safe_load((ROOT / "docs" / "spec_studies.yaml").read_text())
STUDIES = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))
QUIET = ["logger=none", "trainer.enable_progress_bar=false", "protocol.print_report=false"]


def test_every_study_has_a_spec_row_and_back():
    assert sorted(ORIGINAL_STUDIES) == STUDIES


def _job_cfg(name, job):
    return compose_job(name, ["scale=paper", *job.overrides, f"seed={job.seed}",
                              *job.marker_overrides()])


@pytest.mark.parametrize("name", STUDIES)
def test_paper_scale_is_the_original_study(name):
    """data, model, size, epochs, seeds, arms, axes and abort off, per stage, as docs/studies.md says."""
    base = compose_job(name, [])
    assert base.scale == "paper"
    study = study_node(base)
    plan = stages(study, "paper")
    assert sorted(plan) == sorted(ORIGINAL_STUDIES[name]), "stages"
    jobs = expand(study, "paper")
    for stage, row in ORIGINAL_STUDIES[name].items():
        st = plan[stage]
        mine = [j for j in jobs if j.stage == stage]
        if row.get("replicate"):
            assert st["replicate"]["stage"] == row["replicate"]
            assert st["seeds"] == row["seeds"]
            continue
        if "seeds" in row:
            assert sorted(st["seeds"]) == sorted(row["seeds"]), "seeds"
        if "arms" in row:
            assert list(st["arms"]) == row["arms"], "arms"
        for axis, values in (row.get("axes") or {}).items():
            labels = [j.labels[axis] for j in mine if axis in j.labels]
            assert sorted(set(labels), key=str) == sorted({str(v) for v in values}, key=str), axis
        if "snapshot_epochs" in row:
            assert st["snapshot_epochs"] == row["snapshot_epochs"]
        if row.get("kind", "train") != "train":
            assert st["kind"] == row["kind"]
            opts = st.get("config") or {}
            for key in ("rules", "sources"):
                if key in row:
                    assert [r.split(":")[0] for r in opts[key]] == row[key], key
            for key in ("blocks", "null_draws"):
                if key in row:
                    assert opts[key] == row[key], key
            continue
        # every arm once and every axis value once: its composed config carries the settings
        seen = set()
        for job in mine:
            keys = [("arm", job.arm)] + [("axis", a, v) for a, v in job.labels.items()]
            if all(k in seen for k in keys):
                continue
            seen.update(keys)
            cfg = _job_cfg(name, job)
            want = dict(row)
            for label in job.labels.values():
                want |= (row.get("per_value") or {}).get(str(label), {})
            assert cfg.protocol.abort.enabled is False, "headline numbers are final-epoch numbers"
            if "data" in want:
                assert _data_name(cfg.data) == want["data"], "data"
            if want.get("model") == "linear_resmlp":  # a linear ResMLP (docs/models_and_tasks.md's lq learner)
                assert cfg.model.act == "identity" and not cfg.model.block_ln, "linear learner"
            elif "model" in want:
                assert cfg.model._target_.rsplit(".", 1)[-1].lower() == want["model"].replace("_", ""), "model"
                if want["model"] == "resmlp":
                    assert cfg.model.out_ln is want.get("out_ln", True), "terminal LN"
            for key in ("d", "depth", "residual", "w2_std"):
                if key in want:
                    assert cfg.model[key] == want[key], f"model.{key}"
            if "epochs" in want:
                assert cfg.trainer.max_epochs == want["epochs"], "epochs"
            if "steps" in want:  # toy LQ: 8000 steps
                steps = cfg.trainer.max_epochs * math.ceil(cfg.data.n_train / cfg.data.batch_size)
                assert steps == want["steps"], "steps"
            for key, cfg_key in (("ladder_d", "d"), ("classes", "num_classes"), ("alpha", "alpha"),
                                 ("random_targets", "random_targets")):
                if key in want:
                    assert cfg.data[cfg_key] == want[key], f"data.{cfg_key}"
            if "prefit" in want and job.arm != "continue_dfa" and "prefit_epochs" in cfg.method:
                assert cfg.method.prefit_epochs == want["prefit"], "prefit"
            if st.get("source"):
                assert st["source"]["stage"] in plan and st["source"].get("continue"), "branch"
    if name == "scaffold_dissection":
        arms = plan["arms"]["arms"]
        sources = {a.removeprefix("source_") for a in arms if a.startswith("source_")}
        assert sources == set(ORIGINAL_STUDIES[name]["arms"]["sources"])
        assert {f"freeze_{f}" for f in ORIGINAL_STUDIES[name]["arms"]["freeze_after"]} <= set(arms)
        assert {f"{s}_alpha_{a}" for s in ("perlayer_vector", "random_trainable")
                for a in ORIGINAL_STUDIES[name]["arms"]["alphas"]} <= set(arms)


def _data_name(node) -> str:
    return node.get("name") or node["_target_"].rsplit(".", 1)[-1]


def test_a_study_config_is_not_a_lone_run(make_cfg):
    from lcredit.train import train

    with pytest.raises(ConfigError, match="is a study"):
        train(make_cfg("experiment=six_rule_audit"))
    with pytest.raises(ConfigError, match="scale='huge'"):
        train(make_cfg("scale=huge"))


def test_a_staged_study_refuses_the_plain_sweep(tmp_path):
    out = forked_cli("lcredit.train", "experiment=checkpointed_handoff", "scale=smoke",
                     f"hydra.sweep.dir={tmp_path}", "-m", cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    assert "python -m lcredit.study checkpointed_handoff" in out.stderr
    assert "Traceback" not in out.stderr


# ---- the report ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A 2-arm x 2-seed study sweep through the CLI (the Hydra sweeper plugin)."""
    root = tmp_path_factory.mktemp("sweep")
    env = dict(os.environ, LCREDIT_CACHE=str(root / "cache"))
    out = forked_cli("lcredit.train", "experiment=six_rule_audit", "scale=smoke", "seed=0,1",
                     "hydra.sweeper.arms=[bp,dfa]", "trainer.max_epochs=2",
                     f"hydra.sweep.dir={root / 'six'}", *QUIET, *LIGHT_MEASURE, "-m",
                     cwd=root, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "six"


@pytest.mark.slow
def test_sweep_records_and_report_statistics(sweep, tmp_path):
    import shutil

    study_dir = tmp_path / "six"
    shutil.copytree(sweep, study_dir)
    jobs = sorted(study_dir.glob("*/seed=*/results.json"))
    assert len(jobs) == 4  # arms bp and dfa x seeds 0 and 1
    by_arm = {}
    for p in jobs:
        rec = json.loads(p.read_text())
        assert rec["study"]["name"] == "six_rule_audit" and rec["study"]["scale"] == "smoke"
        assert rec["config"]["scale"] == "smoke" and _data_name(rec["config"]["data"]) == "digits"
        by_arm.setdefault(rec["study"]["arm"], []).append(rec)
        assert p.parent.parent.name == rec["study"]["arm"]
    # a third seed of bp that failed: marked, never averaged in
    failed = study_dir / "bp" / "seed=2"
    failed.mkdir()
    (failed / "results.json").write_text(json.dumps({
        "status": "failed", "error": "RuntimeError: boom", "seed": 2,
        "study": {"name": "six_rule_audit", "scale": "smoke", "stage": "main", "arm": "bp",
                  "point": {}, "job": "bp"}}))
    written = report([study_dir])
    rows = {r["arm"]: r for r in _csv(study_dir / "report" / "six_rule_audit.csv")}
    for arm in ("bp", "dfa"):
        recs = by_arm[arm]
        acc = np.array([r["final"]["test_acc"] for r in recs])
        gam = np.array([r["protocol"]["aggregates"]["gamma_hidden"] for r in recs])
        growth = np.array([r["protocol"]["diagnostics"]["a"]["value"] for r in recs])
        for col, v in (("test_acc", acc), ("gamma_hidden", gam), ("growth", growth)):
            assert float(rows[arm][f"{col}_mean"]) == pytest.approx(v.mean(), rel=1e-12)
            assert float(rows[arm][f"{col}_std"]) == pytest.approx(v.std(ddof=1), rel=1e-12)
        assert rows[arm]["n"] == "2"
    assert "1 failed" in rows["bp"]["status"] and "2 completed" in rows["bp"]["status"]
    md = (study_dir / "report" / "six_rule_audit.md").read_text()
    assert "boom" in md and "Jobs without final numbers" in md
    assert md.index("gamma_hidden") < md.index("test_acc")  # tables lead with gamma_hidden
    pngs = [p for p in written if p.suffix == ".png"]
    assert {p.stem.rsplit("_", 1)[-1] for p in pngs} == {"diagnostics", "trajectories", "layers"}
    import matplotlib.image as mpimg

    for p in pngs:
        assert mpimg.imread(p).ndim == 3  # decodes as an image


def _csv(path):
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))


def test_threshold_sensitivity_is_the_interval_that_keeps_every_verdict():
    from lcredit.report import threshold_sensitivity

    def rep(a, b, d):
        fired = {"a": a > 50, "b": b < 1e-7, "d": d < 2}
        return {"diagnostics": {
            "a": {"value": a, "op": ">", "threshold": 50.0, "fired": fired["a"]},
            "b": {"value": b, "op": "<", "threshold": 1e-7, "fired": fired["b"]},
            "c": {"value": None, "op": ">", "threshold": 0.3, "fired": False},
            "d": {"value": d, "op": "<", "threshold": 2.0, "fired": fired["d"]}}}

    # growth 3, 30 (not fired), 120 (fired), 400 (fired, but its run is walked back by (d) too)
    reports = [rep(3, 1e-3, 5), rep(30, 1e-3, 5), rep(120, 1e-3, 5), rep(400, 1e-3, -10)]
    rows = {r["diagnostic"]: r for r in threshold_sensitivity(reports)}
    assert (rows["a"]["lower"], rows["a"]["upper"]) == (30, 120)
    assert rows["a"]["holds"] and rows["a"]["runs"] == 3
    # (d): fired at -10 only where (a) does not already walk it back -> the 400 run is excluded
    assert rows["d"]["lower"] == -math.inf and rows["d"]["upper"] == 5
    # moving a threshold inside its interval leaves the verdicts as they are
    for t in (30.0, 60.0, 119.9):
        assert [r > t for r in (3, 30, 120)] == [False, False, True]


# ---- staged studies: rerun skips what finished -----------------------------------------------

@pytest.mark.slow
def test_rerunning_a_staged_study_skips_finished_stages_and_reproduces(tmp_path, capsys):
    ov = [*QUIET, *LIGHT_MEASURE, f"paths.cache_dir={tmp_path / 'cache'}"]
    root = run("checkpointed_handoff", "smoke", tmp_path / "h", ov, arms=["continue_dfa"],
               seeds=[0])
    source = root / "source" / "dfa" / "seed=0" / "results.json"
    job = root / "handoff" / "continue_dfa,t0=2" / "seed=0" / "results.json"
    first = json.loads(job.read_text())
    assert first["init_from"]["checkpoint"].endswith("epoch=2.ckpt")
    assert first["final"]["epochs"] == 2  # 4 epochs in all: 2 before the branch, 2 after
    stamp = source.stat().st_mtime_ns
    import shutil

    shutil.rmtree(job.parent)  # as if the study had stopped before this job
    capsys.readouterr()
    run("checkpointed_handoff", "smoke", tmp_path / "h", ov, arms=["continue_dfa"], seeds=[0])
    said = capsys.readouterr().out
    assert "1 job(s) ran, 2 already done" in said
    assert source.stat().st_mtime_ns == stamp  # the source stage did not run again
    again = json.loads(job.read_text())
    assert again["final"] == first["final"]
    assert [h["test_acc"] for h in again["history"]] == [h["test_acc"] for h in first["history"]]


def test_the_smoke_tests_cover_every_study():
    import test_study_smoke_1
    import test_study_smoke_2
    from study_smoke import CHEAPEST

    halves = test_study_smoke_1.STUDIES + test_study_smoke_2.STUDIES
    assert sorted(halves) == STUDIES == sorted(CHEAPEST)


ENTRY_POINTS = ("train", "audit", "probe", "exploit", "study", "report")
# Imported where they are used: optional or heavy dependencies a run may never need.
LAZY_IMPORTS = ("matplotlib", "wandb", "submitit", "torch._dynamo", "sklearn",
                "torchvision.datasets")


def _package_imports():
    """{module: [(imported module, inside a function)]} for every module of src/lcredit."""
    import ast

    pkg = ROOT / "src" / "lcredit"
    out = {}
    for path in pkg.rglob("*.py"):
        tree = ast.parse(path.read_text())
        inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                found += [(node.module, id(node) in inner)]
                found += [(f"{node.module}.{a.name}", id(node) in inner) for a in node.names]
            elif isinstance(node, ast.Import):
                found += [(a.name, id(node) in inner) for a in node.names]
        name = path.relative_to(pkg).with_suffix("").as_posix().replace("/", ".")
        out[name.removesuffix(".__init__")] = found
    return out


def test_the_entry_points_sit_on_top():
    """No module of lcredit imports an entry point (train, audit, probe, exploit, study,
    report): the entry points are thin command lines over the layers below (docs/architecture.md),
    and cli.py imports nothing but the leaf modules errors, results and options (no circle)."""
    imports = _package_imports()
    entry = {f"lcredit.{e}" for e in ENTRY_POINTS}
    for module, found in imports.items():
        bad = {m for m, _ in found if m in entry} - {f"lcredit.{module}"}
        assert not bad, (module, bad)
    assert not {m for m, _ in imports["cli"] if m.startswith("lcredit.")
                and m.split(".")[1] not in ("errors", "results", "options")}, imports["cli"]


def test_no_module_imports_inside_a_function_but_the_optional_dependencies():
    """Every module's dependencies are at its top, where a reader sees the graph; only the
    optional or heavy ones (LAZY_IMPORTS) are imported where they are used."""
    for module, found in _package_imports().items():
        inner = sorted({m for m, lazy in found if lazy and not m.startswith(LAZY_IMPORTS)})
        if module == "__init__":  # lcredit/__init__: the public API, loaded on use (PEP 562)
            continue
        assert not inner, (module, inner)


def test_config_resolvers_are_registered_by_the_entry_points_not_by_an_import():
    """Importing lcredit's modules registers nothing; ``register_resolvers`` (called by every
    entry point) does, once, and the sweep's job directory resolves through it."""
    code = ("from omegaconf import OmegaConf\n"
            "import lcredit.train, lcredit.study, lcredit.training\n"
            "assert not OmegaConf.has_resolver('lcredit_subdir')\n"
            "from lcredit.cli import register_resolvers\n"
            "register_resolvers(); register_resolvers()\n"
            "c = OmegaConf.create({'o': ['method=fa', 'seed=1'], 'd': '${lcredit_subdir:${o}}'})\n"
            "print(c.d)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "method=fa"


def test_functions_stay_on_one_screen():
    """Every function of src/lcredit reads on one screen (at most 60 lines) and the rule base
    class, the credit contract a new rule's author reads, at most 250 lines
    (docs/architecture.md)."""
    import ast

    long = []
    for path in (ROOT / "src" / "lcredit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert not long, long
    base = ROOT / "src" / "lcredit" / "rules" / "base.py"
    assert len(base.read_text().splitlines()) <= 250


def test_what_a_report_shows_is_declared_by_its_study(tmp_path):
    """report.py names no study and no rule: the per-seed table (``study.report.per_seed``)
    compares the arms the yaml names, figures are the ones it lists, and an option or figure
    the report does not have is refused by name."""
    from lcredit.report import report_study

    def rec(arm, seed, acc, gamma, report):
        study = {"reported": ["test_acc"], "arms": {"p": [], "q": [], "base": []},
                 "report": report}
        return {"status": "completed", "seed": seed, "_path": str(tmp_path / arm / f"{seed}.json"),
                "study": {"name": "s", "stage": "main", "arm": arm, "point": {}, "job": arm,
                          "scale": "paper"},
                "config": {"study": study}, "final": {"test_acc": acc},
                "protocol": {"aggregates": {"gamma_hidden": gamma}, "layers": []}}

    spec = {"per_seed": {"arms": ["p", "q"], "below": "base"}, "figures": []}
    records = [rec("p", 1, 0.3, 0.2, spec), rec("q", 1, 0.35, 0.1, spec), rec("base", 1, 0.4, 0, spec),
               rec("p", 2, 0.5, 0.2, spec), rec("q", 2, 0.3, 0.1, spec), rec("base", 2, 0.4, 0, spec)]
    files = report_study("s", records, tmp_path / "out")
    md = files[0].read_text()
    assert "## p and q below base, per seed" in md
    assert "seeds with all below base and positive cosines: 1 (1 of 2)" in md
    assert not [f for f in files if f.suffix == ".png"]  # figures: [] draws none
    for bad, word in (({"per_sed": {}}, "study.report.per_sed"),
                      ({"figures": ["layer"]}, "'layer'")):
        with pytest.raises(ConfigError, match=word):
            report_study("s", [rec("p", 1, 0.3, 0.2, bad)], tmp_path / "bad")
