"""scripts/audit_table.py's page from results only: the comparison with BioTorch's published
order is decided by the numbers (never typed), and a rule a model refuses is shown as such."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import audit_table  # noqa: E402


def rows(accs, **kw):
    """Completed runs with these test accuracies (one per seed)."""
    base = dict(status="completed", frozen_acc=0.5, gamma_hidden=0.3, gamma_0=0.9, growth=2.0,
                floor=1e-3, verdict="trustworthy", reasons=[], first_fired={}, wall_time_s=10.0,
                epochs=15)
    return [dict(base, seed=s, test_acc=a, **kw) for s, a in enumerate(accs)]


def task(sign, random_):
    out = {"bp": rows([0.95, 0.96, 0.97])}
    out |= {n: rows([sign] * 2 + [sign + 0.01]) for n in audit_table.SIGN}
    out |= {n: rows([random_] * 2 + [random_ + 0.01]) for n in audit_table.RANDOM}
    return out


def test_the_order_paragraph_follows_the_numbers():
    kept = "\n".join(audit_table.ordering(task(0.94, 0.80)))
    assert "The coarse order holds" in kept and "WHY" not in kept
    broken = "\n".join(audit_table.ordering(task(0.80, 0.94)))
    assert "does not hold" in broken and "WHY (placeholder" in broken
    assert "usf/fa (layerwise)" in broken  # a swapped pair, with its gap


def test_a_refused_rule_and_fired_diagnostics_are_shown():
    t = {"fa (blockwise)": [{"seed": 0, "status": "refused", "error": "method.variant=blockwise: "
                             "block 0 needs a 8192x8192 feedback matrix"}],
         "dfa": rows([0.6, 0.7], verdict="walk back", reasons=["(a) residual growth: 80 > 50"],
                     first_fired={"a": 2})}
    text = "\n".join(audit_table.table(t))
    assert "| fa (blockwise) | not run: method.variant=blockwise" in text
    assert "0.650 ± 0.071" in text  # mean ± std with ddof = 1
    assert "walk back (2/2; (a) residual growth)" in text and "a@2 (×2)" in text
