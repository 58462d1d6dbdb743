"""The default task shows what the protocol is for: depth matters (backprop clearly above the
frozen blocks and a linear probe), backprop is trustworthy and DFA is walked back. The README's
table (scripts/default_task.py, 3 seeds at `make run`'s budget) is checked here on one seed at a
reduced budget, through the same code."""
import sys
from pathlib import Path

import pytest

from conftest import LIGHT_MEASURE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

REDUCED = ["trainer.max_epochs=8", "data.n_train=10000", "logger=none", *LIGHT_MEASURE]


@pytest.mark.slow
def test_default_task_separates_depth_and_the_protocol_walks_back_dfa(tmp_path):
    import default_task

    got = default_task.measure([0], tmp_path, REDUCED, rules=("bp", "dfa"))
    bp, dfa = got["rules"]["bp"][0], got["rules"]["dfa"][0]
    frozen, linear = got["frozen"][0], got["linear"][0]
    assert bp["test_acc"] - frozen >= 0.05, (bp["test_acc"], frozen)
    assert bp["test_acc"] - linear >= 0.08, (bp["test_acc"], linear)
    assert bp["verdict"] == "trustworthy", bp["reasons"]
    assert dfa["verdict"] == "walk back" and dfa["status"] == "aborted", dfa
