"""The end-to-end smoke run of a study and its report (tests/test_study_smoke_*.py, the studies
in two halves)."""
import json
import os
import time
from pathlib import Path

from conftest import LIGHT_MEASURE
from lcredit.report import report
from lcredit.study import compose_job, run, stages, study_node

QUIET = ["logger=none", "trainer.enable_progress_bar=false", "protocol.print_report=false"]
# ---- end to end at scale=smoke ---------------------------------------------------------------

# The cheapest arm of each study's last stage (its sources run whole) and one seed: every
# study's every stage still runs, and its report is produced.
CHEAPEST = {
    "architecture_ablations": "bp", "both_below_frozen": "frozen", "cb_boundary": "warmup_0",
    "checkpointed_handoff": "continue_dfa", "cifar100": "bp", "cross_architecture": "dfa",
    "fa_depth": "dfa", "online_conditioning": "dfa", "penalty_rescue": "bp",
    "periodic_refit": "topdown_1", "prefit_threshold": "prefit_15",
    "protocol_calibration": None, "random_target_control": "dfa",
    "scaffold_dissection": "source_zero_target", "schedule_timing": "dfa_only",
    "six_rule_audit": "dfa", "snapshot_exploitability": None, "snapshot_recovery": None,
    "snapshot_time_sweep": None, "synthetic_ladder": "bp", "toy_lq": "bp",
    "vector_field_pilot": "dfa", "width": "dfa",
}
CHEAP_STEPS = ["study.stages.exploit.config.step_sizes=[0.1]",
               "study.smoke.stages.exploit.config.fit_steps=10"]
TRIM = {  # tool stages and rule lists cheap enough for a test (the studies keep them all)
    "snapshot_recovery": ["study.stages.probe.config.rules=[dfa,vec]",
                          "~study.stages.probe.config.overrides",
                          "study.smoke.stages.probe.config.steps=10"],
    "snapshot_exploitability": ["study.stages.exploit.config.sources=[dfa,bp]", *CHEAP_STEPS],
    "snapshot_time_sweep": CHEAP_STEPS,
    "protocol_calibration": ["study.stages.runs.axes.rule.values=[bp,dfa]",
                             "study.stages.calibrate.axes.rule.values=[bp,dfa]"],
}


# The frozen-blocks comparator (one more training run per job) is trained only where the
# study's table turns on it; the others run without diagnostic (d) in this test.
FROZEN_KEPT = {"both_below_frozen", "protocol_calibration", "six_rule_audit", "synthetic_ladder",
               "checkpointed_handoff"}
# the test checks the plumbing, not the numbers: the smallest measurement that still measures
LIGHTER = ["protocol.measure.rho_samples=128", "protocol.measure.rho_directions=4",
           "protocol.measure.null_draws=2"]
HEADINGS = {"train": "## Training runs", "probe": "## Credit recovered",
            "exploit": "## Exploitability", "calibrate": "## Protocol calibration"}


def run_smoke(tmp_path, name):
    arm = CHEAPEST[name]
    start = time.perf_counter()
    staged = list(stages(study_node(compose_job(name, ["scale=smoke"])), "smoke")) != ["main"]
    root = run(name, "smoke", tmp_path / "study",
               [*QUIET, *LIGHT_MEASURE, *LIGHTER, f"paths.cache_dir={tmp_path / 'cache'}",
                *TRIM.get(name, []), *([] if staged else ["trainer.max_epochs=2"]),
               *([] if name in FROZEN_KEPT else ["protocol.frozen_baseline=null"])],
               arms=[arm] if arm else None, seeds=[0])
    results = sorted(root.glob("**/results.json"))
    assert results
    records = [json.loads(p.read_text()) for p in results]
    for rec, path in zip(records, results):
        assert rec["status"] == "completed", (path, rec.get("error"))
        assert rec["study"]["name"] == name and rec["study"]["scale"] == "smoke", path
        assert rec["study"]["arm"], path
    _record_time(name, time.perf_counter() - start, len(records))
    kinds = {rec.get("kind", "train") for rec in records}
    assert kinds == {stages(study_node(compose_job(name, ["scale=smoke"])), "smoke")[s]["kind"]
                     for s in {r["study"]["stage"] for r in records}}
    written = report([root])
    md = (root / "report" / f"{name}.md").read_text()
    for kind in kinds:  # each kind of stage has its table, and a CSV beside it
        assert HEADINGS[kind] in md, kind
    assert any(p.suffix == ".csv" for p in written)
    for png in (p for p in written if p.suffix == ".png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if name == "protocol_calibration":
        assert "Threshold sensitivity" in md
        assert (root / "report" / f"{name}_threshold_sensitivity.csv").is_file()


def _record_time(name, seconds, jobs):
    """LCREDIT_SMOKE_TIMES=<file>: the seconds per job of each study's smoke test, from which
    scripts/studies_doc.py estimates each study's smoke cost."""
    path = os.environ.get("LCREDIT_SMOKE_TIMES")
    if not path:
        return
    from filelock import FileLock

    with FileLock(path + ".lock"):
        times = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
        times[name] = {"seconds": round(seconds, 1), "jobs": jobs}
        Path(path).write_text(json.dumps(times, indent=1, sort_keys=True))


