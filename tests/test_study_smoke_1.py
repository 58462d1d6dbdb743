"""Every study runs end to end at scale=smoke and its report is produced (part 1 of 2; the
other part is tests/test_study_smoke_2.py)."""
import pytest

from study_smoke import run_smoke

STUDIES = ['cb_boundary', 'cifar100', 'prefit_threshold', 'random_target_control', 'scaffold_dissection', 'six_rule_audit', 'snapshot_exploitability', 'snapshot_recovery', 'snapshot_time_sweep', 'synthetic_ladder', 'width']


@pytest.mark.slow
@pytest.mark.parametrize("name", STUDIES)
def test_study_runs_at_smoke_scale_and_reports(tmp_path, name):
    run_smoke(tmp_path, name)
