"""lcredit: train and audit local credit-assignment learning rules against backprop, per layer."""

__version__ = "0.1.0"


def diagnose(*args, **kwargs):
    """See :func:`lcredit.diagnostics.diagnose` (imported lazily: torch-free package import)."""
    from lcredit.diagnostics import diagnose as _diagnose

    return _diagnose(*args, **kwargs)


def __getattr__(name: str):
    # `from lcredit import Protocol`: the callback for any LightningModule, imported on use
    if name == "Protocol":
        from lcredit.callbacks.protocol import Protocol

        return Protocol
    if name == "frozen_baseline":
        from lcredit.baseline import frozen_baseline

        return frozen_baseline
    raise AttributeError(f"module 'lcredit' has no attribute {name!r}")
