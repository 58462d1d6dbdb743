"""What lcredit measures on a saved checkpoint (docs/architecture.md): the protocol's audit,
credit recovery on a frozen snapshot (probe), exploitability (exploit) and the protocol's own
controls (calibrate). Plain functions; ``lcredit.audit``, ``lcredit.probe`` and
``lcredit.exploit`` are their command lines, the study runs them as stages."""
