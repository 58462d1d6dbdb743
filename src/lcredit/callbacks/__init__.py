"""Thin Lightning adapters over ``lcredit.diagnostics``: they schedule, log and stop."""
from lcredit.callbacks.protocol import EarlyAbort, Protocol, ProtocolMonitor

__all__ = ["EarlyAbort", "Protocol", "ProtocolMonitor"]
