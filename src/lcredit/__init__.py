"""lcredit: train and audit local credit-assignment learning rules against backprop, per layer."""

__version__ = "0.1.0"
