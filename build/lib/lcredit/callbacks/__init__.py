"""Thin Lightning adapters over ``lcredit.diagnostics``: they schedule, log and stop."""
from lcredit.callbacks.protocol import EarlyAbort, ProtocolMonitor, evaluation_batches

__all__ = ["EarlyAbort", "ProtocolMonitor", "evaluation_batches"]
