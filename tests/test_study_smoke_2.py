"""Every study runs end to end at scale=smoke and its report is produced (part 2 of 2; the
other part is tests/test_study_smoke_1.py)."""
import pytest

from study_smoke import run_smoke

STUDIES = ['architecture_ablations', 'both_below_frozen', 'checkpointed_handoff', 'cross_architecture', 'fa_depth', 'online_conditioning', 'penalty_rescue', 'periodic_refit', 'protocol_calibration', 'schedule_timing', 'toy_lq', 'vector_field_pilot']


@pytest.mark.slow
@pytest.mark.parametrize("name", STUDIES)
def test_study_runs_at_smoke_scale_and_reports(tmp_path, name):
    run_smoke(tmp_path, name)
