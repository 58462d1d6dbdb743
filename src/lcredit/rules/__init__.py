"""Learning rules: one module per rule; the credit contract is ``base``, the shared block-local
update ``update``."""
from lcredit.rules.base import Pass, Rule
from lcredit.rules.update import exact_gradients
from lcredit.rules.blend import Blend
from lcredit.rules.bp import BP
from lcredit.rules.brsf import BRSF
from lcredit.rules.cb import CB
from lcredit.rules.dfa import DFA
from lcredit.rules.drtp import DRTP
from lcredit.rules.ep import EP
from lcredit.rules.fa import FA
from lcredit.rules.frozen import Frozen
from lcredit.rules.frsf import FRSF
from lcredit.rules.kp import KP
from lcredit.rules.sb import SB
from lcredit.rules.usf import USF
from lcredit.rules.vec import VEC

__all__ = ["BP", "BRSF", "Blend", "CB", "DFA", "DRTP", "EP", "FA", "FRSF", "Frozen", "KP", "Pass",
           "Rule", "SB", "USF", "VEC", "exact_gradients"]
