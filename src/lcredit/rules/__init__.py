"""Learning rules: one module per rule; the shared block-local update is in ``base``."""
from lcredit.rules.base import Pass, Rule, exact_gradients
from lcredit.rules.bp import BP
from lcredit.rules.dfa import DFA
from lcredit.rules.fa import FA
from lcredit.rules.frozen import Frozen

__all__ = ["BP", "DFA", "FA", "Frozen", "Pass", "Rule", "exact_gradients"]
